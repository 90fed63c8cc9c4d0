"""Fault leases: which of the processes sharing a store fetches a missing chunk.

Notes on the design
-------------------
* A lease is a write lock on one byte of ``STORE/faulting.lock``, at an offset made from the
  fault's key (a chunk digest, or a version's chunk not learned yet): an open-file-description
  lock (``fcntl`` ``F_OFD_SETLK``), taken without waiting. The process that takes it fetches;
  the others see it taken and wait for the chunk to appear in the store.
* The kernel drops a lock when its owner's file is closed, so a process that dies (``kill -9``
  included) leaves no lease behind: there is no owner id, deadline or clean-up to get wrong,
  and nothing of it outlives a reboot (the file holds no data).
* Each process opens the file itself (checked by PID: a ``fork`` after the store was opened
  gets a file of its own), since locks of one open file description do not exclude each
  other. Within a process, single-flight is the fault layer's (one fetch per key), so one
  file per process suffices.
* Two keys whose offsets collide (62-bit offsets from BLAKE2b) share a lease: correct, only
  one of them waits for the other first.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading

#: ``struct flock`` on Linux x86-64/aarch64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")

LEASE_FILE = "faulting.lock"


def _offset(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 2


class FaultLeases:
    """The fault leases of the store at ``store_dir`` (file made on first use)."""

    def __init__(self, store_dir: str) -> None:
        self.path = os.path.join(store_dir, LEASE_FILE)
        self._fd = -1
        self._pid = 0
        self._lock = threading.Lock()

    def _file(self) -> int:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    # a forked child must not use its parent's description (same owner)
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    self._pid = os.getpid()
        return self._fd

    def take(self, key: bytes) -> bool:
        """Take the lease of ``key`` without waiting: True when this process holds it now
        (it was free, or this process held it already), False when another holds it.
        Raises OSError when the lease file cannot be opened or locked."""
        req = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _offset(key), 1, 0)
        try:
            fcntl.fcntl(self._file(), fcntl.F_OFD_SETLK, req)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def release(self, key: bytes) -> None:
        """Give the lease of ``key`` back (nothing if this process does not hold it). Safe
        from any thread of the process."""
        if self._pid != os.getpid():
            return
        req = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, _offset(key), 1, 0)
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, req)

    def close(self) -> None:
        """Close the file: every lease of this process is given back."""
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd, self._pid = -1, 0
