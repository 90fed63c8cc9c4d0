"""Fault leases: which of the processes sharing a store fetches a missing chunk.

Notes on the design
-------------------
* A lease is a write lock on one byte of one of the ``SHARDS`` files
  ``STORE/faulting/NN.lock``, at a file and offset made from the fault's key (a chunk
  digest, or a version's chunk not learned yet): an open-file-description lock (``fcntl``
  ``F_OFD_SETLK``), taken without waiting. The process that takes it fetches; the others see
  it taken and wait for the chunk to appear in the store.
* Why several files: the kernel keeps a file's locks in one list and walks all of it on every
  lock and unlock. A lease is held until its chunk is committed, so a cold fill holds one per
  chunk in the writer's queue (a thousand and more); with one file, that walk was 16% of a
  cold server's CPU (``perf``: ``posix_lock_inode``, 1 MiB sequential reads from a loopback
  upstream). Spread over ``SHARDS`` files each list is short.
* The kernel drops a lock when its owner's file is closed, so a process that dies (``kill -9``
  included) leaves no lease behind: there is no owner id, deadline or clean-up to get wrong,
  and nothing of it outlives a reboot (the files hold no data).
* Each process opens the files itself (a ``fork`` after the store was opened gets files of
  its own: :func:`os.register_at_fork`), since locks of one open file description do not
  exclude each other. Within a process, single-flight is the fault layer's (one fetch per
  key), so one description per file and process suffices.
* Two keys that hash to the same file and offset (6 + 62 bits from BLAKE2b) share a lease:
  correct, only one of them waits for the other first.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import threading
import weakref


class _Flock(ctypes.Structure):
    """``struct flock`` (Linux)."""

    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64),
                ("l_pid", ctypes.c_int)]


# fcntl(2) called with the GIL held: F_OFD_SETLK never waits, and Python's fcntl.fcntl lets
# the GIL go around it. Under a cold fill the writer's thread gives a lease back per chunk
# committed while the event loop takes one per fault: each GIL hand-over was a thread switch.
_libc = ctypes.PyDLL(None, use_errno=True)
_fcntl = _libc.fcntl
_fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Flock)]
_fcntl.restype = ctypes.c_int


def _setlk(fd: int, kind: int, offset: int) -> bool:
    """One ``F_OFD_SETLK`` of byte ``offset``: True if done, False if another holds it.
    Raises OSError otherwise."""
    lock = _Flock(kind, os.SEEK_SET, offset, 1, 0)
    if _fcntl(fd, fcntl.F_OFD_SETLK, ctypes.byref(lock)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EACCES):
        return False
    raise OSError(err, os.strerror(err))

#: The folder of the lease files, in the store's folder.
LEASE_DIR = "faulting"
#: Lease files (each a separate lock list in the kernel).
SHARDS = 64

_open: weakref.WeakSet[FaultLeases] = weakref.WeakSet()


def _forked() -> None:
    for leases in list(_open):
        leases._forget()


os.register_at_fork(after_in_child=_forked)


def _place(key: bytes) -> tuple[int, int]:
    """(file, offset) of ``key``'s lease."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=9).digest(), "big")
    return h % SHARDS, (h >> 8) >> 2


class FaultLeases:
    """The fault leases of the store at ``store_dir`` (files made on first use)."""

    def __init__(self, store_dir: str) -> None:
        self.path = os.path.join(store_dir, LEASE_DIR)
        self._fds: list[int] = [-1] * SHARDS
        self._lock = threading.Lock()
        _open.add(self)

    def _forget(self) -> None:
        # in a forked child: the parent's descriptions are not this process's to lock with
        # (same owner); closing the child's copies leaves the parent's locks as they are
        fds, self._fds = self._fds, [-1] * SHARDS
        self._lock = threading.Lock()
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _file(self, shard: int) -> int:
        fd = self._fds[shard]
        if fd < 0:
            with self._lock:
                fd = self._fds[shard]
                if fd < 0:
                    os.makedirs(self.path, mode=0o700, exist_ok=True)
                    fd = os.open(os.path.join(self.path, f"{shard:02x}.lock"),
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    self._fds[shard] = fd
        return fd

    def take(self, key: bytes) -> bool:
        """Take the lease of ``key`` without waiting: True when this process holds it now
        (it was free, or this process held it already), False when another holds it.
        Raises OSError when the lease file cannot be opened or locked."""
        shard, offset = _place(key)
        return _setlk(self._file(shard), fcntl.F_WRLCK, offset)

    def release(self, key: bytes) -> None:
        """Give the lease of ``key`` back (nothing if this process does not hold it). Safe
        from any thread of the process."""
        shard, offset = _place(key)
        fd = self._fds[shard]
        if fd < 0:
            return  # never taken here (or taken by the process this one was forked from)
        _setlk(fd, fcntl.F_UNLCK, offset)

    def close(self) -> None:
        """Close the files: every lease of this process is given back."""
        with self._lock:
            fds, self._fds = self._fds, [-1] * SHARDS
        for fd in fds:
            if fd >= 0:
                os.close(fd)
