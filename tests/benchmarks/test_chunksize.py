"""icbd-bench chunksize: exact fault and byte counts of a trace replayed against a cold cache."""

from __future__ import annotations

from pathlib import Path

import zstandard

from bench.chunksize import DEFAULT_TRACE, analyse, load_trace


def test_counts_on_a_small_trace() -> None:
    k = 1024
    reads = [(0.0, 0, 4 * k), (1.0, 60 * k, 8 * k), (2.0, 200 * k, 4 * k), (3.0, 4 * k, 4 * k)]
    rows = {r.chunk_size: r for r in analyse(reads, [16 * k, 64 * k])}
    # 16 KiB chunks: [0], [3, 4], [12], then chunk 0 again (a hit)
    assert rows[16 * k].faults == 4
    assert rows[16 * k].fetched_bytes == 4 * 16 * k
    assert rows[16 * k].read_bytes == 5 * 4 * k
    # 64 KiB chunks: [0], [0, 1], [3], then chunk 0 again: 3 distinct chunks, 2 reads hit
    assert rows[64 * k].faults == 3
    assert rows[64 * k].reads_hit_after_fault == 0.25


def test_loads_zstd_trace(tmp_path: Path) -> None:
    csv = b"# t_ms,conn,op,offset,count,lat_us\n0.0,1,Read,4096,4096,10\n1.5,1,Write,0,512,3\n"
    p = tmp_path / "t.csv.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(csv))
    assert load_trace(p) == [(0.0, 4096, 4096)]


def test_shipped_trace_is_a_real_boot() -> None:
    reads = load_trace(DEFAULT_TRACE)
    assert len(reads) > 500
    assert sum(n for _, _, n in reads) > 30 << 20
