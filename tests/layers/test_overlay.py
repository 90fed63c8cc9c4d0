"""The copy-on-write overlay against a model (a bytearray that takes the same writes), and its
life in ``--cow-dir`` (:class:`CowDir`): identity, linger, boot ids, durability across a
"crash" (the directory reopened without closing anything, as after kill -9), lost overlays
refused, space freed and bounded."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from conftest import sha256_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icbdcache.layers.base import Client
from icbdcache.layers.cowdir import CowDir
from icbdcache.layers.cowfile import OverlayFiles, OverlayMeta, overlay_key, paths, read_meta
from icbdcache.layers.file import FileLayer
from icbdcache.layers.overlay import BLOCK, CowOverlay, OverlayLayer, OverlayLost

SIZE = 64 * BLOCK + 123  # not a multiple of the block size: the last block is partial


def _base(tmp: Path) -> Path:
    p = tmp / "base.img"
    if not p.exists():
        p.write_bytes(bytes((i * 7 + 3) % 251 for i in range(SIZE)))
    return p


def _overlay(base: FileLayer, tmp: Path, **kw: object) -> CowOverlay:
    """A lone overlay over ``base`` with its files in ``tmp``."""
    meta = OverlayMeta("t", "client", None, base.fingerprint, base.size)
    files = OverlayFiles.create(str(tmp), overlay_key("t", "client"), meta)
    return CowOverlay(base, files, **kw)  # type: ignore[arg-type]


def _read(ov: CowOverlay, off: int, n: int) -> bytes:
    parts = ov.pread(off, n)
    assert isinstance(parts, list)
    return b"".join(bytes(p) for p in parts)


def _settle(request: Callable[[], object]) -> None:
    """Make a write-like request in an event loop (FUA and FLUSH sync in its executor) and
    run what it returns to its end."""
    async def main() -> None:
        result = request()
        if result is not None:
            await result  # type: ignore[misc]

    asyncio.run(main())


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "trim", "read", "flush"]),
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
    ov = _overlay(base, tmp_path)
    model = bytearray(base_path.read_bytes())
    trimmed = bytearray(SIZE)  # bytes whose contents a TRIM made unspecified
    for op, off, n, val in seq:
        n = min(n, SIZE - off)
        if op == "write":
            _settle(partial(ov.pwrite, off, bytes([val]) * n, fua=bool(val & 2)))
            model[off : off + n] = bytes([val]) * n
            trimmed[off : off + n] = bytes(n)
        elif op == "zero":
            _settle(partial(ov.zero, off, n, no_hole=bool(val & 1)))
            model[off : off + n] = bytes(n)
            trimmed[off : off + n] = bytes(n)
        elif op == "trim":
            _settle(partial(ov.trim, off, n))
            trimmed[off : off + n] = b"\x01" * n
        elif op == "flush":
            _settle(ov.flush)
            assert ov.synced_gen == ov.write_gen
        got = _read(ov, off, n)
        for i in range(n):
            if not trimmed[off + i]:
                assert got[i] == model[off + i], (op, off, n, i)
    whole = _read(ov, 0, SIZE)
    for i in range(SIZE):
        if not trimmed[i]:
            assert whole[i] == model[i]
    st_ = ov.state
    assert ov.allocated == st_.count(1) + st_.count(3)  # DATA + ZALLOC blocks
    ov.close()
    assert sha256_file(base_path) == before


def test_trim_only_whole_blocks(tmp_path: Path) -> None:
    base_path = _base(tmp_path)
    ov = _overlay(FileLayer(base_path), tmp_path)
    orig = base_path.read_bytes()
    ov.trim(100, 3 * BLOCK)  # covers block 1 and 2 whole, parts of 0 and 3
    got = _read(ov, 0, 5 * BLOCK)
    assert got[:BLOCK] == orig[:BLOCK]
    assert got[BLOCK : 3 * BLOCK] == bytes(2 * BLOCK)
    assert got[3 * BLOCK :] == orig[3 * BLOCK : 5 * BLOCK]


def test_extents_report_zeroed_blocks(tmp_path: Path) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path)
    ov.zero(BLOCK, 2 * BLOCK)
    ov.pwrite(3 * BLOCK, b"x" * BLOCK)
    assert ov.extents(BLOCK, 4 * BLOCK)[0] == (2 * BLOCK, 3)
    assert ov.extents(3 * BLOCK, BLOCK) == [(BLOCK, 0)]
    ov.zero(5 * BLOCK, BLOCK, no_hole=True)  # NO_HOLE: zeros, but allocated
    assert ov.extents(5 * BLOCK, BLOCK) == [(BLOCK, 2)]
    assert _read(ov, 5 * BLOCK, BLOCK) == bytes(BLOCK)


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_and_zero_give_space_back_and_no_hole_takes_it(tmp_path: Path) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path)
    data = paths(str(tmp_path), overlay_key("t", "client"))[0]
    ov.pwrite(0, b"\x55" * (32 * BLOCK))
    full = _allocated(data)
    assert full >= 32 * BLOCK
    ov.trim(0, 16 * BLOCK)
    ov.zero(16 * BLOCK, 16 * BLOCK)
    if _allocated(data) > full // 4:
        pytest.skip(f"the file system of {tmp_path} does not punch holes")
    assert _allocated(data) == 0
    assert ov.allocated == 0
    ov.zero(40 * BLOCK, 8 * BLOCK, no_hole=True)
    assert _allocated(data) >= 8 * BLOCK  # provisioned
    assert ov.allocated == 8
    assert _read(ov, 0, 32 * BLOCK) == bytes(32 * BLOCK)
    assert _read(ov, 40 * BLOCK, 8 * BLOCK) == bytes(8 * BLOCK)


def test_the_bound_refuses_growth_but_not_rewrites(tmp_path: Path) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path, max_bytes=8 * BLOCK)
    ov.pwrite(0, b"a" * (8 * BLOCK))
    ov.pwrite(BLOCK + 5, b"b" * 100)  # inside allocated blocks: fine
    with pytest.raises(OSError) as e:
        ov.pwrite(8 * BLOCK, b"c")
    assert e.value.errno == errno.ENOSPC
    before = bytes(ov.state)
    with pytest.raises(OSError) as e:
        ov.zero(10 * BLOCK, 4 * BLOCK, no_hole=True)  # NO_HOLE fails up front ...
    assert e.value.errno == errno.ENOSPC
    assert bytes(ov.state) == before  # ... and changes nothing
    ov.trim(0, 4 * BLOCK)  # frees four blocks
    ov.zero(10 * BLOCK, 4 * BLOCK, no_hole=True)
    assert ov.allocated == 8


def test_a_failed_sync_fails_the_overlay(tmp_path: Path) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path)
    ov.pwrite(0, b"x" * BLOCK)

    def broken(*_: object) -> None:
        raise OSError(errno.EIO, "disk gone")

    ov.files.sync = broken  # type: ignore[method-assign]
    with pytest.raises(OSError) as e:
        _settle(ov.flush)
    assert e.value.errno == errno.EIO
    for request in (lambda: ov.pread(0, 10), lambda: ov.pwrite(0, b"y"), ov.flush):
        with pytest.raises(OSError) as e:
            request()
        assert e.value.errno == errno.EIO


def test_a_flush_during_a_sync_waits_for_the_next_one(tmp_path: Path) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path)
    real = ov.files.sync
    calls: list[dict[int, bytes]] = []

    def slow(data: bool, full: bool, pages: dict[int, bytes]) -> None:
        import time

        calls.append(pages)
        time.sleep(0.2)
        real(data, full, pages)

    ov.files.sync = slow  # type: ignore[method-assign]

    async def main() -> None:
        ov.pwrite(0, b"1" * BLOCK)
        first = asyncio.ensure_future(ov.flush())  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # the first sync is running
        ov.pwrite(40 * BLOCK, b"2" * BLOCK)
        second = ov.flush()
        assert second is not None
        await asyncio.gather(first, second)

    asyncio.run(main())
    assert len(calls) == 2  # the second write needed a sync of its own
    assert ov.synced_gen == ov.write_gen == 2
    assert ov.flush() is None  # nothing left to make durable


# ------------------------------------------------------------------ the cow dir


class Site:
    """A CowDir in ``tmp/cow`` with one file export ``rw`` over ``tmp/base.img``."""

    def __init__(self, tmp: Path, *, linger: float = 10.0, now: float = 0.0) -> None:
        self.tmp = tmp
        self.cowdir = CowDir(str(tmp / "cow"), linger=linger, max_bytes=0)
        self.cowdir.open(now)
        self.base = FileLayer(_base(tmp))
        self.layer = OverlayLayer(self.base, self.cowdir, "rw", self.base.fingerprint)

    def connect(self, identity: str, boot: str | None, now: float) -> CowOverlay:
        view = self.layer.connect(Client(identity, {"boot": boot} if boot else {}, now))
        assert isinstance(view, CowOverlay)
        return view

    def disconnect(self, identity: str, view: CowOverlay, now: float) -> None:
        self.layer.disconnect(Client(identity, {}, now), view)

    def crash(self) -> None:
        """What kill -9 leaves: the files as they are, the lock released, nothing synced."""
        os.close(self.cowdir._lock_fd)
        self.cowdir._lock_fd = -1
        self.cowdir.pool.shutdown(wait=True)


def test_cowdir_identity_linger_and_boot_id(tmp_path: Path) -> None:
    s = Site(tmp_path)
    a = s.connect("10.0.0.1", None, 0.0)
    a2 = s.connect("10.0.0.1", None, 0.5)  # a second connection of the same client
    b = s.connect("10.0.0.2", None, 0.5)
    assert a is a2 and a is not b
    s.disconnect("10.0.0.1", a, 1.0)
    s.disconnect("10.0.0.1", a, 1.0)
    assert s.connect("10.0.0.1", None, 5.0) is a  # reconnect within linger
    s.disconnect("10.0.0.1", a, 6.0)
    assert s.cowdir.expire(now=10.0) == 0
    assert s.cowdir.expire(now=16.1) == 1  # idle for more than linger: boots anew
    fresh = s.connect("10.0.0.1", "boot-1", 17.0)
    assert fresh is not a
    assert s.connect("10.0.0.1", "boot-1", 17.5) is fresh
    newer = s.connect("10.0.0.1", "boot-2", 18.0)  # rebooted: stale connections remain
    assert newer is not fresh
    s.disconnect("10.0.0.1", fresh, 19.0)
    s.disconnect("10.0.0.1", fresh, 19.0)  # the old boot's connections end
    assert s.connect("10.0.0.1", "boot-2", 19.5) is newer  # not disturbed by them
    assert len(s.cowdir) == 2
    s.cowdir.close()
    assert len(s.cowdir) == 0


def test_flushed_writes_survive_a_crash(tmp_path: Path) -> None:
    s = Site(tmp_path)
    ov = s.connect("10.0.0.1", "A", 0.0)
    ov.pwrite(100, b"\xaa" * 10000)
    ov.zero(20 * BLOCK, 3 * BLOCK, no_hole=True)
    _settle(lambda: ov.pwrite(40 * BLOCK + 7, b"\xbb" * 33, fua=True))  # FUA: durable on its own
    _settle(ov.flush)
    want = _read(ov, 0, SIZE)
    s.crash()

    again = Site(tmp_path, now=100.0)
    got = again.connect("10.0.0.1", "A", 101.0)
    assert _read(got, 0, SIZE) == want
    assert got.extents(20 * BLOCK, 3 * BLOCK) == [(3 * BLOCK, 2)]
    meta = read_meta(paths(str(tmp_path / "cow"), overlay_key("rw", "10.0.0.1"))[2])
    assert (meta.export, meta.identity, meta.boot, meta.flushed) == ("rw", "10.0.0.1", "A", True)
    # Another client never sees it.
    other = again.connect("10.0.0.2", None, 101.0)
    assert _read(other, 0, SIZE) == _base(tmp_path).read_bytes()
    again.cowdir.close()


def test_a_boot_id_adopted_later_is_kept_with_the_next_flush(tmp_path: Path) -> None:
    s = Site(tmp_path)
    ov = s.connect("10.0.0.1", None, 0.0)
    ov.pwrite(0, b"z" * BLOCK)
    _settle(ov.flush)
    assert s.connect("10.0.0.1", "B", 1.0) is ov  # adopts boot id B
    ov.pwrite(BLOCK, b"y" * BLOCK)
    _settle(ov.flush)
    s.crash()
    again = Site(tmp_path, now=50.0)
    got = _read(again.connect("10.0.0.1", "B", 51.0), 0, 2 * BLOCK)
    assert got == b"z" * BLOCK + b"y" * BLOCK
    fresh = again.connect("10.0.0.1", "C", 52.0)  # another boot: the base again
    assert _read(fresh, 0, BLOCK) == _base(tmp_path).read_bytes()[:BLOCK]


def test_an_overlay_never_flushed_is_dropped_at_recovery(tmp_path: Path) -> None:
    s = Site(tmp_path)
    s.connect("10.0.0.1", None, 0.0).pwrite(0, b"q" * BLOCK)
    s.crash()
    again = Site(tmp_path, now=10.0)
    assert len(again.cowdir) == 0  # nothing was promised durable: a fresh overlay is right
    ov = again.connect("10.0.0.1", None, 11.0)
    assert _read(ov, 0, BLOCK) == _base(tmp_path).read_bytes()[:BLOCK]


def _flushed_then_crashed(tmp_path: Path, boot: str | None) -> Path:
    s = Site(tmp_path)
    ov = s.connect("10.0.0.1", boot, 0.0)
    ov.pwrite(0, b"mine" * BLOCK)
    _settle(ov.flush)
    s.crash()
    return Path(paths(str(tmp_path / "cow"), overlay_key("rw", "10.0.0.1"))[0])


def test_a_lost_overlay_is_refused_until_the_client_boots_anew(tmp_path: Path) -> None:
    _flushed_then_crashed(tmp_path, None).unlink()  # its data file is deleted
    again = Site(tmp_path, linger=10.0, now=100.0)
    for t, boot in ((101.0, None), (105.0, "X"), (114.0, None)):  # X adopts: the same boot
        with pytest.raises(OverlayLost) as e:
            again.connect("10.0.0.1", boot, t)
        assert "data file is missing" in str(e.value) and e.value.errno == errno.EIO
        with pytest.raises(OverlayLost):
            again.layer.check(Client("10.0.0.1", {}, t))  # at the handshake too
    assert again.cowdir.overlays() == [("rw", "10.0.0.1", "lost", 0)]
    # The tombstone outlives a restart as well.
    again.crash()
    third = Site(tmp_path, linger=10.0, now=200.0)
    with pytest.raises(OverlayLost):
        third.connect("10.0.0.1", None, 201.0)
    # Away for the linger (refused attempts count): it booted anew, and starts clean.
    assert third.cowdir.expire(212.0) == 1
    ov = third.connect("10.0.0.1", None, 212.5)
    assert _read(ov, 0, BLOCK) == _base(tmp_path).read_bytes()[:BLOCK]


def test_a_lost_overlay_of_a_boot_gives_way_to_a_new_boot(tmp_path: Path) -> None:
    _flushed_then_crashed(tmp_path, "A").unlink()
    again = Site(tmp_path, now=100.0)
    for boot in ("A", None):
        with pytest.raises(OverlayLost):
            again.connect("10.0.0.1", boot, 101.0)
    ov = again.connect("10.0.0.1", "B", 102.0)
    assert _read(ov, 0, BLOCK) == _base(tmp_path).read_bytes()[:BLOCK]
    assert again.cowdir.overlays() == [("rw", "10.0.0.1", "live", 0)]


def test_an_overlay_over_a_changed_base_is_lost(tmp_path: Path) -> None:
    _flushed_then_crashed(tmp_path, None)
    base = _base(tmp_path)
    os.utime(base, ns=(1, 1))  # the image was replaced or modified
    again = Site(tmp_path, now=100.0)
    with pytest.raises(OverlayLost) as e:
        again.connect("10.0.0.1", None, 101.0)
    assert "base changed" in str(e.value)
    assert not Path(paths(str(tmp_path / "cow"), overlay_key("rw", "10.0.0.1"))[0]).exists()


def test_an_expired_boot_is_refused_and_other_boots_start_clean(tmp_path: Path) -> None:
    s = Site(tmp_path, linger=10.0)
    ov = s.connect("10.0.0.1", "A", 0.0)
    ov.pwrite(0, b"a" * BLOCK)
    s.disconnect("10.0.0.1", ov, 1.0)
    assert s.connect("10.0.0.1", "A", 20.0) is ov  # idle, not yet expired: A keeps it
    s.disconnect("10.0.0.1", ov, 21.0)
    assert s.cowdir.expire(32.0) == 1
    assert s.cowdir.overlays() == [("rw", "10.0.0.1", "expired", 0)]
    with pytest.raises(OverlayLost) as e:
        s.connect("10.0.0.1", "A", 33.0)
    assert "expired" in str(e.value)
    assert _read(s.connect("10.0.0.1", None, 34.0), 0, BLOCK) != b"a" * BLOCK


def test_a_store_cow_dir_expires_overlays_of_exports_never_opened_again(
        tmp_path: Path) -> None:
    s = Site(tmp_path, linger=10.0)
    ov = s.connect("10.0.0.1", None, 0.0)
    ov.pwrite(0, b"w" * BLOCK)
    _settle(ov.flush)
    s.crash()
    cowdir = CowDir(str(tmp_path / "cow"), linger=10.0, max_bytes=0)
    cowdir.open(100.0)  # no export attaches: the version is not asked for in this run
    assert cowdir.overlays() == [("rw", "10.0.0.1", "live", 0)]
    assert cowdir.expire(105.0) == 0
    assert cowdir.expire(111.0) == 1
    assert [p.name for p in (tmp_path / "cow").iterdir() if p.name.startswith("ov-")] == []
    cowdir.close()


def test_two_servers_cannot_share_a_cow_dir(tmp_path: Path) -> None:
    s = Site(tmp_path)
    with pytest.raises(OSError, match="in use"):
        CowDir.check_free(str(tmp_path / "cow"))
    s.cowdir.close()
    CowDir.check_free(str(tmp_path / "cow"))


def test_a_flush_syncs_data_then_map_then_meta_before_it_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ov = _overlay(FileLayer(_base(tmp_path)), tmp_path)
    files = ov.files
    names = {files.data_fd: "data", files.map_fd: "map", files.meta_fd: "meta"}
    events: list[str] = []
    real_pwrite = os.pwrite

    def fsync(fd: int) -> None:
        events.append(f"fsync {names.get(fd, 'dir')}")

    def fdatasync(fd: int) -> None:
        events.append(f"fdatasync {names.get(fd, '?')}")

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        events.append(f"pwrite {names.get(fd, '?')}")
        return real_pwrite(fd, data, offset)

    import icbdcache.layers.cowfile as cowfile

    monkeypatch.setattr(cowfile.os, "fsync", fsync)
    monkeypatch.setattr(cowfile.os, "fdatasync", fdatasync)
    monkeypatch.setattr(cowfile.os, "pwrite", pwrite)

    async def main() -> list[str]:
        ov.pwrite(0, b"x" * BLOCK)  # the overlay's own pwrite, before the flush
        events.clear()
        pending = ov.flush()
        assert isinstance(pending, asyncio.Future) and not pending.done()  # not answered yet
        await pending
        return list(events)

    first = asyncio.run(main())
    assert first == ["fdatasync data", "pwrite map", "fdatasync map", "pwrite meta",
                     "fdatasync meta", "fsync dir"]
    # Later: a TRIM changed extents (fsync, not fdatasync); the meta is not rewritten.
    ov.trim(0, BLOCK)
    events.clear()
    _settle(ov.flush)
    assert events == ["fsync data", "pwrite map", "fdatasync map"]


def test_an_export_made_anew_over_other_bytes_loses_the_overlays_made_before(
        tmp_path: Path) -> None:
    s = Site(tmp_path)
    ov = s.connect("10.0.0.1", None, 0.0)
    ov.pwrite(0, b"m" * BLOCK)
    # The store version is made anew under the same name (another base): its export too.
    OverlayLayer(s.base, s.cowdir, "rw", "version rw made again")
    assert _read(ov, 0, BLOCK) == b"m" * BLOCK  # the connection in use keeps working
    with pytest.raises(OverlayLost, match="base changed"):
        s.connect("10.0.0.1", None, 1.0)  # a new one is refused, never given the new bytes
