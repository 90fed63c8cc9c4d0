"""The machine's limit for a replica, for ``icbd-bench replication``: how fast could any replica
written against this store take the new bytes of v2, on this machine, in this run?

Every byte new to the site must, at least: cross the loopback socket (the kernel copies it out
of the sender and into the receiver), be copied once in memory (out of the receive buffer into
what is kept), be hashed twice (xxh3-128, its key; BLAKE3-256, checked against the signed
strong map) and be committed into LMDB (copied into the map, written and synced). Each stage's
bandwidth is measured here on a sample of v2's own chunks (:func:`measure_stages`), then:

* ``limit_serial_s`` = fixed start cost + bytes x the sum over the stages of 1 / bandwidth:
  every stage in turn on one core (the replica's time if nothing overlapped);
* ``limit_overlapped_s`` = fixed start cost + bytes / the slowest stage's bandwidth: every
  stage on a core of its own at once (a lower bound no machine of fewer cores reaches).

The LMDB stage of each limit is measured again as its transfer meets it
(:func:`commit_bandwidth`: all the new bytes, into a fresh store for a full copy and a copy of
the site's store holding v1 for a delta, the median of three), since the sample's best run on a
fresh store was far from what the replica could reach on this machine.

The fixed start cost is the median wall time of a replica run that has nothing to fetch (the
site holds the newest version: start, register, catalog, manifest check), measured by the
bench (:func:`fixed_cost`), beside the bare start of ``icbd-cache --version``.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The stages every new byte goes through, in order.
STAGES = ("loopback", "copy", "xxh3", "blake3", "lmdb")
#: Most bytes of v2's chunks a stage is measured on.
SAMPLE_BYTES = 256 << 20


def sample_chunks(v2: Path, v2_map: bytes, chunk: int, limit: int = SAMPLE_BYTES
                  ) -> list[bytes]:
    """Distinct non-zero chunks of ``v2`` (its chunk map ``v2_map``, 16 bytes a chunk), in
    image order, at most ``limit`` bytes of them."""
    from icbdcache.store.chunks import ZERO

    out: list[bytes] = []
    seen: set[bytes] = set()
    total = 0
    with v2.open("rb", buffering=0) as f:
        for i in range(len(v2_map) // 16):
            d = v2_map[i * 16 : (i + 1) * 16]
            if d == ZERO or d in seen:
                continue
            seen.add(d)
            f.seek(i * chunk)
            block = f.read(chunk)
            out.append(block)
            total += len(block)
            if total >= limit:
                break
    return out


def _timed(fn: Callable[[], Any], reps: int) -> float:
    """Shortest wall time of ``reps`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _copy(chunks: Sequence[bytes]) -> None:
    for c in chunks:
        bytearray(c)


def _xxh3(chunks: Sequence[bytes]) -> None:
    import xxhash

    for c in chunks:
        xxhash.xxh3_128_digest(c)


def _blake3(chunks: Sequence[bytes]) -> None:
    import blake3

    for c in chunks:
        blake3.blake3(c).digest()


def _lmdb(chunks: Sequence[bytes], keys: Sequence[bytes], commit_bytes: int) -> float:
    """Seconds to commit ``chunks`` into a fresh store, ``commit_bytes`` a transaction, as
    the replica does (Store.write_batch, digests known)."""
    from icbdcache.store import Store

    with tempfile.TemporaryDirectory(prefix="icbd-limit-", dir="/var/tmp") as d:
        store = Store(Path(d) / "store")
        try:
            t0 = time.perf_counter()
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            for k, c in zip(keys, chunks, strict=True):
                batch.append((k, c))
                size += len(c)
                if size >= commit_bytes:
                    store.write_batch(batch, verified=True)
                    batch, size = [], 0
            if batch:
                store.write_batch(batch, verified=True)
            return time.perf_counter() - t0
        finally:
            store.close()


def commit_bandwidth(chunks: Sequence[bytes], commit_bytes: int, new_bytes: int,
                     seed: Path | None = None, reps: int = 3) -> dict[str, Any]:
    """The LMDB stage measured as a transfer meets it: ``new_bytes`` of chunks (the values of
    ``chunks`` again and again, each under a key of its own) committed ``commit_bytes`` a
    transaction (Store.write_batch, digests known, synced) into a copy of the store ``seed``
    (a delta: the site holds v1; the copy is not timed) or into a fresh store (a full copy).
    ``reps`` times: {"bytes", "seconds" (each run), "median_s", "mib_s" (at the median)}.

    Why not the 256 MiB sample of :func:`measure_stages`: on this machine the same commits
    took 0.3 to 1.2 GiB/s from one run to the next (system time, the kernel copying into
    page-cache pages it had just allocated), and less as the file grows, so the best of three
    runs on a fresh store measured a bandwidth the replica never met."""
    import os
    import shutil

    from icbdcache.store import Store

    runs: list[float] = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="icbd-limit-", dir="/var/tmp") as d:
            path = Path(d) / "store"
            if seed is not None:
                shutil.copytree(seed, path)
            os.sync()
            store = Store(path)
            try:
                salt = os.urandom(8)
                t0 = time.perf_counter()
                batch: list[tuple[bytes, bytes]] = []
                size = done = i = 0
                while done < new_bytes:
                    c = chunks[i % len(chunks)]
                    batch.append((salt + i.to_bytes(8, "big"), c))
                    size += len(c)
                    done += len(c)
                    i += 1
                    if size >= commit_bytes or done >= new_bytes:
                        store.write_batch(batch, verified=True)
                        batch, size = [], 0
                runs.append(time.perf_counter() - t0)
            finally:
                store.close()
    med = statistics.median(runs)
    return {"bytes": new_bytes, "seconds": [round(r, 3) for r in runs],
            "median_s": round(med, 3), "mib_s": round(new_bytes / med / (1 << 20), 1)}


def _loopback(chunks: Sequence[bytes]) -> float:
    """Seconds to move the bytes of ``chunks`` over a TCP connection on 127.0.0.1 (a thread
    sends, this one receives into a buffer allocated once)."""
    total = sum(len(c) for c in chunks)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def send() -> None:
            with socket.create_connection(("127.0.0.1", port)) as s:
                for c in chunks:
                    s.sendall(c)

        conn_t = threading.Thread(target=send, name="limit-send", daemon=True)
        conn_t.start()
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            got = 0
            t0 = time.perf_counter()
            while got < total:
                n = conn.recv_into(view)
                if not n:
                    break
                got += n
            seconds = time.perf_counter() - t0
        conn_t.join()
    return seconds


def measure_stages(chunks: Sequence[bytes], commit_bytes: int, reps: int = 3
                   ) -> dict[str, dict[str, float]]:
    """Bandwidth of each stage of :data:`STAGES` on ``chunks``: {stage: {"bytes",
    "seconds" (the best of ``reps``), "mib_s"}}."""
    from icbdcache.store.chunks import digest

    total = sum(len(c) for c in chunks)
    keys = [digest(c) for c in chunks]
    seconds = {
        "loopback": min(_loopback(chunks) for _ in range(reps)),
        "copy": _timed(lambda: _copy(chunks), reps),
        "xxh3": _timed(lambda: _xxh3(chunks), reps),
        "blake3": _timed(lambda: _blake3(chunks), reps),
        "lmdb": min(_lmdb(chunks, keys, commit_bytes) for _ in range(reps)),
    }
    return {name: {"bytes": total, "seconds": round(seconds[name], 6),
                   "mib_s": round(total / seconds[name] / (1 << 20), 1)}
            for name in STAGES}


def limits(stages: dict[str, dict[str, float]], new_bytes: int, fixed_s: float,
           commit_mib_s: float | None = None) -> dict[str, float]:
    """The limits of moving ``new_bytes`` (see the module docstring): ``limit_serial_s``,
    ``limit_overlapped_s``, and ``stages_serial_s`` (the stages alone, no fixed cost).
    ``commit_mib_s``: the LMDB stage's bandwidth as :func:`commit_bandwidth` measured it
    for this transfer, in place of the sample's."""
    bw = {name: s["mib_s"] for name, s in stages.items()}
    if commit_mib_s is not None:
        bw["lmdb"] = commit_mib_s
    per_stage = {name: new_bytes / (mib_s * (1 << 20)) for name, mib_s in bw.items()}
    serial = sum(per_stage.values())
    return {"new_bytes": new_bytes, "fixed_s": round(fixed_s, 3),
            "stages_serial_s": round(serial, 3),
            "limit_serial_s": round(fixed_s + serial, 3),
            "limit_overlapped_s": round(fixed_s + max(per_stage.values()), 3)}


def fixed_cost(run: Callable[[], float], reps: int = 3) -> float:
    """Median of ``reps`` wall times (seconds) returned by ``run``."""
    return statistics.median(run() for _ in range(reps))
