"""The machine's limit of ``icbd-bench replication`` (bench/repllimit.py): which chunks are
measured, every stage measured on all of them, and the limits made of the bytes given. Shapes
and counts, never timings."""

from __future__ import annotations

import random
from pathlib import Path

from bench import repllimit
from icbdcache.store.chunks import ZERO, digest

CHUNK = 64 * 1024


def _image(path: Path) -> tuple[bytes, list[bytes]]:
    """An image of 12 chunks: zeros, duplicates, distinct ones. (chunk map, the distinct
    non-zero chunks in image order)."""
    rng = random.Random(17)
    distinct = [rng.randbytes(CHUNK) for _ in range(5)]
    blocks = [bytes(CHUNK), distinct[0], distinct[1], distinct[0], bytes(CHUNK), distinct[2],
              distinct[3], distinct[1], distinct[4], bytes(CHUNK), distinct[4], distinct[2]]
    path.write_bytes(b"".join(blocks))
    return b"".join(digest(b) for b in blocks), distinct


def test_sample_is_the_distinct_non_zero_chunks_in_order(tmp_path: Path) -> None:
    img = tmp_path / "v2.img"
    chunk_map, distinct = _image(img)
    assert chunk_map[:16] == ZERO
    assert repllimit.sample_chunks(img, chunk_map, CHUNK) == distinct
    # capped: stops at the first chunk that reaches the limit
    assert repllimit.sample_chunks(img, chunk_map, CHUNK, limit=2 * CHUNK + 1) == distinct[:3]


def test_stages_and_limits(tmp_path: Path) -> None:
    img = tmp_path / "v2.img"
    chunk_map, distinct = _image(img)
    chunks = repllimit.sample_chunks(img, chunk_map, CHUNK)
    stages = repllimit.measure_stages(chunks, commit_bytes=2 * CHUNK, reps=1)
    assert list(stages) == list(repllimit.STAGES)
    for st in stages.values():
        assert st["bytes"] == len(distinct) * CHUNK
        assert st["seconds"] > 0 and st["mib_s"] > 0
    new = 3 << 20
    lim = repllimit.limits(stages, new, fixed_s=0.25)
    serial = sum(new / (st["mib_s"] * (1 << 20)) for st in stages.values())
    slowest = max(new / (st["mib_s"] * (1 << 20)) for st in stages.values())
    assert lim["new_bytes"] == new and lim["fixed_s"] == 0.25
    assert abs(lim["stages_serial_s"] - round(serial, 3)) < 1e-9
    assert abs(lim["limit_serial_s"] - round(0.25 + serial, 3)) < 1e-9
    assert abs(lim["limit_overlapped_s"] - round(0.25 + slowest, 3)) < 1e-9
    assert lim["limit_serial_s"] >= lim["limit_overlapped_s"] > 0.25
    # twice the bytes: twice the stages' time, the same fixed cost
    lim2 = repllimit.limits(stages, 2 * new, fixed_s=0.25)
    assert abs(lim2["stages_serial_s"] - 2 * lim["stages_serial_s"]) <= 0.002


def test_commit_bandwidth_as_a_transfer_meets_it(tmp_path: Path) -> None:
    """commit_bandwidth commits exactly the bytes asked for (the sample's values again under
    keys of their own), into a copy of the seed store (left as it was) or a fresh one; and
    the limit takes its bandwidth for the LMDB stage."""
    from icbdcache.store import Store
    from icbdcache.store.chunks import digest

    img = tmp_path / "v2.img"
    _, distinct = _image(img)
    seed = tmp_path / "seed"
    st = Store(seed)
    st.write_batch([(digest(c), c) for c in distinct[:2]])
    before = st.held
    st.close()
    new = 5 * CHUNK + 100  # more than the sample: its values again
    for s in (None, seed):
        out = repllimit.commit_bandwidth(distinct, 2 * CHUNK, new, s, reps=2)
        assert out["bytes"] == new and len(out["seconds"]) == 2
        assert out["mib_s"] > 0 and out["median_s"] > 0
    st = Store(seed, readonly=True)
    try:
        assert st.missing([digest(c) for c in distinct[:2]]) == []
        assert st.held == before == 2 * CHUNK  # the seed itself is not written
    finally:
        st.close()
    stages = {n: {"bytes": 1.0, "seconds": 1.0, "mib_s": 100.0} for n in repllimit.STAGES}
    lim = repllimit.limits(stages, 100 << 20, 0.0, commit_mib_s=25.0)
    assert abs(lim["stages_serial_s"] - (4 * 1.0 + 4.0)) < 1e-9  # LMDB 4 s at 25 MiB/s
    assert abs(lim["limit_overlapped_s"] - 4.0) < 1e-9
