"""The copy-on-write overlay against a model: a bytearray that takes the same writes."""

from __future__ import annotations

from pathlib import Path

from conftest import sha256_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icbdcache.layers.file import FileLayer
from icbdcache.layers.overlay import BLOCK, CowOverlay, OverlayRegistry

SIZE = 64 * BLOCK + 123  # not a multiple of the block size: the last block is partial


def _base(tmp: Path) -> Path:
    p = tmp / "base.img"
    p.write_bytes(bytes((i * 7 + 3) % 251 for i in range(SIZE)))
    return p


def _read(ov: CowOverlay, off: int, n: int) -> bytes:
    parts = ov.pread(off, n)
    assert isinstance(parts, list)
    return b"".join(bytes(p) for p in parts)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "trim", "read"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 6 * BLOCK),
        st.integers(1, 255),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_overlay_matches_model(tmp_path: Path, seq: list[tuple[str, int, int, int]]) -> None:
    base_path = _base(tmp_path)
    before = sha256_file(base_path)
    base = FileLayer(base_path)
    ov = CowOverlay(base, str(tmp_path))
    model = bytearray(base_path.read_bytes())
    trimmed = bytearray(SIZE)  # bytes whose contents a TRIM made unspecified
    for op, off, n, val in seq:
        n = min(n, SIZE - off)
        if op == "write":
            ov.pwrite(off, bytes([val]) * n)
            model[off : off + n] = bytes([val]) * n
            trimmed[off : off + n] = bytes(n)
        elif op == "zero":
            ov.zero(off, n)
            model[off : off + n] = bytes(n)
            trimmed[off : off + n] = bytes(n)
        elif op == "trim":
            ov.trim(off, n)
            trimmed[off : off + n] = b"\x01" * n
        got = _read(ov, off, n)
        for i in range(n):
            if not trimmed[off + i]:
                assert got[i] == model[off + i], (op, off, n, i)
    whole = _read(ov, 0, SIZE)
    for i in range(SIZE):
        if not trimmed[i]:
            assert whole[i] == model[i]
    ov.close()
    assert sha256_file(base_path) == before


def test_trim_only_whole_blocks(tmp_path: Path) -> None:
    base_path = _base(tmp_path)
    ov = CowOverlay(FileLayer(base_path), str(tmp_path))
    orig = base_path.read_bytes()
    ov.trim(100, 3 * BLOCK)  # covers block 1 and 2 whole, parts of 0 and 3
    got = _read(ov, 0, 5 * BLOCK)
    assert got[:BLOCK] == orig[:BLOCK]
    assert got[BLOCK : 3 * BLOCK] == bytes(2 * BLOCK)
    assert got[3 * BLOCK :] == orig[3 * BLOCK : 5 * BLOCK]


def test_extents_report_zeroed_blocks(tmp_path: Path) -> None:
    ov = CowOverlay(FileLayer(_base(tmp_path)), str(tmp_path))
    ov.zero(BLOCK, 2 * BLOCK)
    ov.pwrite(3 * BLOCK, b"x" * BLOCK)
    assert ov.extents(BLOCK, 4 * BLOCK)[0] == (2 * BLOCK, 3)
    assert ov.extents(3 * BLOCK, BLOCK) == [(BLOCK, 0)]
    ov.zero(5 * BLOCK, BLOCK, no_hole=True)  # NO_HOLE: zeros, but allocated
    assert ov.extents(5 * BLOCK, BLOCK) == [(BLOCK, 2)]
    assert _read(ov, 5 * BLOCK, BLOCK) == bytes(BLOCK)


def test_registry_identity_linger_and_boot_id(tmp_path: Path) -> None:
    base = FileLayer(_base(tmp_path))
    reg = OverlayRegistry(lambda: CowOverlay(base, str(tmp_path)), linger=10.0)
    a = reg.acquire("10.0.0.1", None, now=0.0)
    a2 = reg.acquire("10.0.0.1", None, now=0.5)  # a second connection of the same client
    b = reg.acquire("10.0.0.2", None, now=0.5)
    assert a is a2 and a is not b
    reg.release("10.0.0.1", a, 1.0)
    reg.release("10.0.0.1", a, 1.0)
    assert reg.acquire("10.0.0.1", None, now=5.0) is a  # reconnect within linger
    reg.release("10.0.0.1", a, 6.0)
    assert reg.expire(now=10.0) == 0
    assert reg.expire(now=16.1) == 1  # idle for more than linger: boots anew
    fresh = reg.acquire("10.0.0.1", "boot-1", now=17.0)
    assert fresh is not a
    assert reg.acquire("10.0.0.1", "boot-1", now=17.5) is fresh
    newer = reg.acquire("10.0.0.1", "boot-2", now=18.0)  # rebooted: stale connections remain
    assert newer is not fresh
    reg.release("10.0.0.1", fresh, 19.0)
    reg.release("10.0.0.1", fresh, 19.0)  # the old boot's connections end
    assert reg.acquire("10.0.0.1", "boot-2", now=19.5) is newer  # not disturbed by them
    assert len(reg) == 2
    reg.close()
    assert len(reg) == 0
