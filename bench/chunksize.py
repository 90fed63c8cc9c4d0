"""``icbd-bench chunksize``: what a recorded boot costs a cold cache at each chunk size.

For every chunk size it replays the trace's reads against an empty cache and counts the chunks
faulted (round trips to the upstream, the latency a booting client waits on) and the bytes
fetched (what crosses the WAN), against the bytes the boot really read. Pure arithmetic on the
trace: no server, no clock, so the numbers are exact and repeatable.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard


@dataclass
class ChunkSizeRow:
    """One chunk size: faults (count), fetched and distinct-read bytes, amplification ratio."""

    chunk_size: int
    faults: int
    fetched_bytes: int
    read_bytes: int
    amplification: float
    reads_hit_after_fault: float


def load_trace(path: Path) -> list[tuple[float, int, int]]:
    """(t_ms, offset, count) of each read of a boot trace (``t_ms,conn,op,offset,count,...``
    CSV, optionally zstd-compressed)."""
    raw = path.read_bytes()
    if path.suffix == ".zst":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    rows = []
    for line in raw.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split(",")
        if f[2].lower() == "read":
            rows.append((float(f[0]), int(f[3]), int(f[4])))
    return rows


def analyse(reads: list[tuple[float, int, int]], sizes: list[int]) -> list[ChunkSizeRow]:
    """Replay ``reads`` against an empty cache for each chunk size."""
    distinct: set[int] = set()
    for _, off, n in reads:
        distinct.update(range(off // 4096, (off + n - 1) // 4096 + 1))
    read_bytes = len(distinct) * 4096
    out = []
    for cs in sizes:
        held: set[int] = set()
        hits = 0
        for _, off, n in reads:
            idx = range(off // cs, (off + n - 1) // cs + 1)
            new = [i for i in idx if i not in held]
            if not new:
                hits += 1
            held.update(new)
        fetched = len(held) * cs
        out.append(ChunkSizeRow(cs, len(held), fetched, read_bytes, fetched / read_bytes,
                                hits / len(reads)))
    return out


def run(trace: Path, out_dir: Path | None) -> list[ChunkSizeRow]:
    rows = analyse(load_trace(trace), [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10,
                                       512 << 10, 1 << 20])
    print("| chunk | faults (round trips) | fetched MiB | read MiB | fetched/read | reads "
          "needing no fault |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.chunk_size >> 10} KiB | {r.faults} | {r.fetched_bytes / 2**20:.1f} | "
              f"{r.read_bytes / 2**20:.1f} | {r.amplification:.2f} | "
              f"{100 * r.reads_hit_after_fault:.0f}% |")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "chunksize.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "debian-boot.csv.zst"


def register(subparsers: Any) -> None:
    """Add the ``chunksize`` subcommand."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "chunksize", help="faults and bytes a recorded boot costs a cold cache per chunk size",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  icbd-bench chunksize\n"
               "  icbd-bench chunksize --trace my-boot.csv.zst --out out/chunks")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                   help="boot trace: t_ms,conn,op,offset,count CSV, optionally .zst "
                        "(default: the recorded Debian boot shipped in bench/traces)")
    p.add_argument("--out", type=Path, default=None, help="also write chunksize.json here")
    p.set_defaults(func=lambda a: 0 if run(a.trace, a.out) else 1)
