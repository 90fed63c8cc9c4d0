"""The files of one copy-on-write overlay in ``--cow-dir``, and the order that makes them durable.

Notes on the design
-------------------
* An overlay is three files named after a key (a hash of the export name and the client's
  identity, :func:`overlay_key`):

  ===============  ===================================================================
  file             holds
  ===============  ===================================================================
  ``ov-KEY.data``  the client's blocks at their own offsets: sparse, the export's size
  ``ov-KEY.map``   one state byte per 4 KiB block (overlay.py), allocated when made
  ``ov-KEY.meta``  JSON (:class:`OverlayMeta`): export, identity, boot id, base, state
  ===============  ===================================================================

* :meth:`OverlayFiles.sync` makes an overlay durable in this order: the data file, then the
  map pages that changed, then (when it changed) the meta; the first sync also fsyncs the
  directory, which keeps the three names. So the map on disk never names data that is not on
  disk. A map page torn by a crash holds one valid state per byte, old or new, and either
  agrees with the data already on disk.
* Nothing a sync writes needs new space: the map is allocated whole when the overlay is made,
  and the meta file holds two fixed slots (allocated too) written in turn, each with its
  generation and a checksum; the valid slot of the highest generation is the meta. A full
  ``--cow-dir`` fails writes with ENOSPC, never a FLUSH.
* A meta whose ``flushed`` is false belongs to an overlay on which no FLUSH (or FUA) ever
  completed: nothing of it was promised durable, and recovery discards it.
* A meta whose state is ``lost`` or ``expired`` is a tombstone: the data and map are gone, and
  the client that used them is refused until it boots anew (cowdir.py says when).
* Punching holes (TRIM, WRITE_ZEROES) and allocating (NO_HOLE) change the data file's extents,
  so a sync after them is an fsync, not an fdatasync.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field

#: Bytes of the export per state byte of the map.
BLOCK = 4096
#: Bytes of the map written at once when it changed (a dirty page of the map).
MAP_PAGE = 4096

LIVE, LOST, EXPIRED = "live", "lost", "expired"
FORMAT = 1
#: Bytes of one slot of a meta file; the file holds two.
META_SLOT = 16384

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class OverlayDamaged(Exception):
    """An overlay's files cannot be used (missing, wrong size, unreadable meta); the message
    says which and why."""


@dataclass
class OverlayMeta:
    """What ``ov-KEY.meta`` says of one overlay. ``size`` in bytes; ``base`` identifies the
    bytes below (a file's inode, size and mtime, or a store version); ``created`` is wall-clock
    seconds; ``reason`` says why a tombstone is one."""

    export: str
    identity: str
    boot: str | None
    base: str
    size: int
    state: str = LIVE
    flushed: bool = False
    reason: str = ""
    created: float = field(default_factory=time.time)
    format: int = FORMAT
    #: Counts the writes of this meta; its slot is ``gen % 2``.
    gen: int = 0

    def to_slot(self) -> bytes:
        """This meta as one slot: its JSON, a line with the JSON's sha256, zeros up to
        :data:`META_SLOT`. Raises OSError (ENAMETOOLONG) if it does not fit."""
        body = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()
        raw = body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"
        if len(raw) > META_SLOT:
            raise OSError(errno.ENAMETOOLONG, "export name, identity and boot id are too "
                                              "long for an overlay's meta")
        return raw + bytes(META_SLOT - len(raw))

    @classmethod
    def from_slot(cls, raw: bytes) -> OverlayMeta | None:
        """Parse one slot; None if it is empty or torn (its checksum does not match)."""
        body, _, rest = raw.partition(b"\n")
        digest = rest.partition(b"\n")[0]
        if not body or hashlib.sha256(body).hexdigest().encode() != digest:
            return None
        try:
            meta = cls(**json.loads(body))
        except (ValueError, TypeError):
            return None
        if meta.format != FORMAT or meta.state not in (LIVE, LOST, EXPIRED):
            return None
        return meta


def overlay_key(export: str, identity: str) -> str:
    """The file-name key of ``identity``'s overlay on ``export`` (32 hex digits)."""
    return hashlib.sha256(f"{export}\0{identity}".encode()).hexdigest()[:32]


def paths(directory: str, key: str) -> tuple[str, str, str]:
    """(data, map, meta) paths of overlay ``key`` in ``directory``."""
    stem = os.path.join(directory, f"ov-{key}")
    return f"{stem}.data", f"{stem}.map", f"{stem}.meta"


def map_bytes(size: int) -> int:
    """Length of the map of an export of ``size`` bytes (one byte per block)."""
    return (size + BLOCK - 1) // BLOCK


_libc: ctypes.CDLL | None = None


def punch(fd: int, offset: int, length: int) -> bool:
    """Free ``length`` bytes at ``offset`` of file ``fd`` (they read as zeros; the size stays).
    False when the file system cannot punch holes. Raises OSError for other failures."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"cannot free overlay space: {os.strerror(err)}")


def sync_dir(directory: str) -> None:
    """fsync a directory, so the names in it survive a crash. Raises OSError."""
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_meta(path: str) -> int:
    """Open (made if missing, both slots allocated) a meta file for writing. Raises OSError
    (ENOSPC)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, 2 * META_SLOT)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_meta(fd: int, meta: OverlayMeta, durable: bool) -> None:
    """Write ``meta`` as its next generation into the other slot of meta file ``fd``; with
    ``durable`` fdatasync it. Needs no new space. Raises OSError."""
    meta.gen += 1
    _pwrite_all(fd, meta.to_slot(), (meta.gen % 2) * META_SLOT)
    if durable:
        os.fdatasync(fd)


def read_meta(path: str) -> OverlayMeta:
    """The meta file at ``path``: its valid slot of the highest generation. Raises
    OverlayDamaged (no valid slot) or OSError."""
    with open(path, "rb") as f:
        raw = f.read(2 * META_SLOT)
    found = [m for m in (OverlayMeta.from_slot(raw[:META_SLOT]),
                         OverlayMeta.from_slot(raw[META_SLOT:])) if m is not None]
    if not found:
        raise OverlayDamaged("no readable meta (empty or torn)")
    return max(found, key=lambda m: m.gen)


def write_tombstone(directory: str, key: str, meta: OverlayMeta) -> None:
    """Make ``meta`` (state lost or expired) the overlay's durable record, then remove its data
    and map: in that order, so a crash in between never forgets the client. Raises OSError."""
    data, map_path, meta_path = paths(directory, key)
    fd = open_meta(meta_path)
    try:
        write_meta(fd, meta, durable=True)
    finally:
        os.close(fd)
    sync_dir(directory)
    for p in (data, map_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def remove(directory: str, key: str) -> None:
    """Remove every file of overlay ``key`` (the meta first)."""
    data, map_path, meta_path = paths(directory, key)
    for p in (meta_path, data, map_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class OverlayFiles:
    """The open data and map files of one live overlay, and its meta. Made by :meth:`create`
    or :meth:`open`."""

    def __init__(self, directory: str, key: str, meta: OverlayMeta, data_fd: int,
                 map_fd: int, meta_fd: int) -> None:
        self.directory = directory
        self.key = key
        self.meta = meta
        self.data_fd = data_fd
        self.map_fd = map_fd
        self.meta_fd = meta_fd
        #: The meta changed since it was last written durably.
        self.meta_dirty = False
        #: The overlay was dropped (its files removed, maybe made anew for another boot):
        #: nothing is written to its names any more (:meth:`detach`).
        self.detached = False
        self._lock = threading.Lock()  # held by a sync, so detach() waits for it

    @classmethod
    def create(cls, directory: str, key: str, meta: OverlayMeta) -> OverlayFiles:
        """Make the files of a new overlay (replacing any of that key): a sparse data file of
        ``meta.size`` bytes, a map and a meta allocated whole, so a sync never needs space.
        Raises OSError (ENOSPC when they do not fit)."""
        remove(directory, key)
        data, map_path, meta_path = paths(directory, key)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fds: list[int] = []
        try:
            fds.append(os.open(data, flags, 0o600))
            os.ftruncate(fds[0], meta.size)
            fds.append(os.open(map_path, flags, 0o600))
            if meta.size:
                os.posix_fallocate(fds[1], 0, map_bytes(meta.size))
            fds.append(open_meta(meta_path))
            write_meta(fds[2], meta, durable=False)
        except OSError:
            for fd in fds:
                os.close(fd)
            remove(directory, key)
            raise
        return cls(directory, key, meta, *fds)

    @classmethod
    def open(cls, directory: str, key: str, meta: OverlayMeta) -> OverlayFiles:
        """Open the files of a recovered overlay. Raises OverlayDamaged naming what is wrong."""
        data, map_path, meta_path = paths(directory, key)
        fds: list[int] = []
        try:
            for p, want, what in ((data, meta.size, "data"),
                                  (map_path, map_bytes(meta.size), "map")):
                try:
                    fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise OverlayDamaged(f"its {what} file is missing") from None
                except OSError as e:
                    raise OverlayDamaged(f"its {what} file cannot be opened: {e}") from None
                fds.append(fd)
                got = os.fstat(fd).st_size
                if got != want:
                    raise OverlayDamaged(f"its {what} file has {got} bytes, not {want}")
            try:
                fds.append(open_meta(meta_path))
            except OSError as e:
                raise OverlayDamaged(f"its meta file cannot be opened: {e}") from None
        except OverlayDamaged:
            for fd in fds:
                os.close(fd)
            raise
        return cls(directory, key, meta, *fds)

    def load_map(self) -> bytearray:
        """The state bytes as last synced. Raises OverlayDamaged on a short read or a byte that
        is no state (``states`` are 0..3)."""
        n = map_bytes(self.meta.size)
        out = bytearray(n)
        view = memoryview(out)
        pos = 0
        while pos < n:
            got = os.preadv(self.map_fd, [view[pos:]], pos)
            if got <= 0:
                raise OverlayDamaged("its map file is short")
            pos += got
        if out.translate(None, b"\x00\x01\x02\x03"):
            raise OverlayDamaged("its map file holds bytes that are no block state")
        return out

    def sync(self, data: bool, full: bool, pages: dict[int, bytes]) -> None:
        """Make the overlay durable up to now: the data file (``data``: written since the last
        sync; ``full``: its extents changed, fsync instead of fdatasync), then the map
        ``pages`` (page index -> its bytes), then the meta if it changed. Blocking: call it in
        a thread. Raises OSError."""
        with self._lock:
            if self.detached:
                return
            if full:
                os.fsync(self.data_fd)
            elif data:
                os.fdatasync(self.data_fd)
            if pages:
                for index, raw in sorted(pages.items()):
                    _pwrite_all(self.map_fd, raw, index * MAP_PAGE)
                os.fdatasync(self.map_fd)
            if self.meta_dirty or not self.meta.flushed:
                first = not self.meta.flushed
                self.meta.flushed = True
                self.meta_dirty = False
                write_meta(self.meta_fd, self.meta, durable=True)
                if first:
                    sync_dir(self.directory)  # the names of all three files

    def detach(self) -> None:
        """The overlay's names are no longer its own (it was dropped): later syncs write
        nothing. Waits for a sync in flight."""
        with self._lock:
            self.detached = True

    def set_boot(self, boot: str) -> None:
        """The overlay now belongs to boot id ``boot`` (written with the next sync)."""
        self.meta.boot = boot
        self.meta_dirty = True

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd, self.meta_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.data_fd = self.map_fd = self.meta_fd = -1


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
