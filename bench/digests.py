"""``icbd-bench digests``: what hashing a GiB of 64 KiB chunks costs, per digest, on one core.

The store's fast key is xxh3-128; the strong digest every chunk from elsewhere is checked
against was chosen between BLAKE3-256 (the ``blake3`` package) and SHA-256 (``hashlib``,
OpenSSL) by this measurement (docs/replication.md, TRUST). Each digest hashes the same
``--mib`` MiB of random 64 KiB chunks ``--reps`` times; the best repetition counts (the least
disturbed by other work on a shared machine), scaled to seconds per GiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import xxhash

from icbdcache.store.chunks import CHUNK_SIZE, strong_digest

GIB = 1 << 30

#: name -> function of one chunk (what is compared).
DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "xxh3-128": xxhash.xxh3_128_digest,
    "blake3-256": lambda b: blake3.blake3(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "strong check (icbd)": strong_digest,  # BLAKE3 plus the all-zero test the store does
}


def measure(mib: int, reps: int) -> dict[str, Any]:
    """Seconds per GiB (best of ``reps``) and MiB/s of each digest over ``mib`` MiB."""
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(max(1, mib * (1 << 20) // CHUNK_SIZE))]
    total = len(chunks) * CHUNK_SIZE
    out: dict[str, Any] = {"mib": total >> 20, "reps": reps, "digests": {}}
    for name, fn in DIGESTS.items():
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for c in chunks:
                fn(c)
            best = min(best, time.perf_counter() - t0)
        out["digests"][name] = {"s_per_gib": round(best * GIB / total, 4),
                                "mib_per_s": round(total / best / (1 << 20), 1)}
    return out


def markdown(doc: dict[str, Any]) -> str:
    rows = ["| digest | s per GiB | MiB/s |", "|---|--:|--:|"]
    for name, r in doc["digests"].items():
        rows.append(f"| {name} | {r['s_per_gib']:.3f} | {r['mib_per_s']:.0f} |")
    return (f"Hashing {doc['mib']} MiB of 64 KiB chunks on one core, best of {doc['reps']}:"
            "\n\n" + "\n".join(rows) + "\n")


def main(args: argparse.Namespace) -> int:
    doc = measure(args.mib, args.reps)
    text = markdown(doc)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "digests.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "digests.md").write_text(text)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``digests`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "digests", help="hashing cost per GiB: xxh3-128, BLAKE3-256, SHA-256",
        description="Seconds per GiB of 64 KiB chunks, on one core, of each digest the store "
                    "could check chunks with.",
        epilog="example:\n  icbd-bench digests --mib 256 --reps 5 --out out/digests",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, metavar="N",
                   help="MiB of random chunks hashed per repetition (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, metavar="N",
                   help="repetitions; the best counts (default %(default)s)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write digests.json and digests.md here")
    p.set_defaults(func=main)
