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

Faulting alone
--------------
Most of the time one process faults on a store (one ``serve``). Its leases then exclude
nobody, yet each fault paid two ``fcntl`` calls, a look in LMDB under the lease and a writer
batch cut short to give the lease back: about a fifth of a cold server's CPU per chunk
(``icbd-bench serve``, cold store, 64 KiB reads, docs/bench.md). So :meth:`FaultLeases.begin`
first asks whether another process faults on the store, through the file
``STORE/faulting/active.lock``:

* byte ``FAULTER``: every process that faults holds a read lock on it from its first fault
  until it closes (or dies);
* byte ``ALONE``: a process holds a read lock on it while it has faults in flight that took
  no lease (from :meth:`begin` until :meth:`end`, called once the chunk is committed).

A process faults alone when, holding ``ALONE``, it finds no other process's lock on
``FAULTER`` (``F_OFD_GETLK``). While it has faults in flight it looks again every
``LOOK_EVERY`` seconds (:meth:`FaultLeases.look`, from the event loop), and it gives ``ALONE``
up when its last fault in flight ends. A process's first fault (and every fault until it has
once seen ``ALONE`` free of other processes) waits while another holds ``ALONE``. Each takes
its own lock before it looks at the other's byte, so of a newcomer and a process faulting
alone at least one sees the other: the newcomer waits, or the other does not fault alone. A
process that finds a newcomer stops faulting alone: it takes the leases of its faults in
flight (nobody else can hold them: the newcomer waits) and gives ``ALONE`` up, and the
newcomer goes on with leases, waiting only for those very chunks. So no chunk is fetched
twice across the processes, however they start and stop, and a process alone pays one
``fcntl`` per burst of faults and one per ``LOOK_EVERY``, nothing per fault. A process that
holds ``ALONE`` and does not look (stopped with ``SIGSTOP``) holds a newcomer up for at most
``ALONE_WAIT``; the newcomer then goes on with leases (at worst fetching a chunk the other has
in flight once more).

A fault alone skips the look under the lease, but one look matters even then: a version whose
chunk map is learned from an upstream may have entries another process learned after this one
read the map (``warm`` that has since exited). So bytes 8 to 15 of ``active.lock`` count the
commits of learned map entries by any process (``LEARNED``, little-endian, changed under a
write lock on byte ``COUNTING``): :meth:`FaultLeases.learned` after each such commit,
:meth:`FaultLeases.learned_elsewhere` on a fault of a chunk not learned yet (one ``pread``;
not ``mmap``: a file truncated under a mapping kills the process with SIGBUS). A process knows
which of the counts are its own, so a fault alone looks for the stored map entry only once
another process has learned one since it started (or the count cannot be read).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import hashlib
import os
import threading
import time
import weakref
from collections import Counter


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


def _others(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte ``offset`` (a write lock
    asked with ``F_OFD_GETLK``: our own locks never conflict with it). Raises OSError."""
    lock = _Flock(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    if _fcntl(fd, fcntl.F_OFD_GETLK, ctypes.byref(lock)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bool(lock.l_type != fcntl.F_UNLCK)


class Grant(enum.Enum):
    """What :meth:`FaultLeases.begin` gives a fault."""

    #: no other process faults on the store: fetch; nobody else can have stored it since
    #: the caller looked
    ALONE = "alone"
    #: this process holds the key's lease: look in the store again, then fetch
    HELD = "held"
    #: another process holds the lease (or still faults alone): wait and ask again
    BUSY = "busy"

#: The folder of the lease files, in the store's folder.
LEASE_DIR = "faulting"
#: Lease files (each a separate lock list in the kernel).
SHARDS = 64
#: The file of the ``FAULTER`` and ``ALONE`` bytes, in ``LEASE_DIR``.
ACTIVE = "active.lock"
FAULTER = 0
ALONE = 1
COUNTING = 2
LEARNED = 8
_SIZE = 16
#: How often a process faulting alone looks for other processes that fault (seconds): the
#: longest a newcomer's first fault waits for it, besides the commit of what it has in flight.
LOOK_EVERY = 0.01
#: The longest a newcomer waits for another process's ALONE (seconds): one that looks every
#: ``LOOK_EVERY`` gives it up at once, so a longer wait means a process that is stopped
#: (``SIGSTOP``) or starved; the newcomer then goes on with leases.
ALONE_WAIT = 1.0

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
        self._opening = threading.Lock()  # opening the files
        self._lock = threading.Lock()  # the state of faulting alone
        self._start()
        self._watching = False  # counting the map entries other processes learn
        self._seen = 0  # the count when watched, and this process's own commits since
        _open.add(self)

    def _start(self) -> None:
        self._active = -1  # active.lock
        self._registered = False  # its FAULTER byte read-locked
        self._alone = False  # ALONE read-locked, and no other faulter at the last look
        self._looked = 0.0  # time.monotonic() of that look
        self._clear = False  # seen ALONE free of other processes since registering
        self._blocked = 0.0  # time.monotonic() of the first wait for another's ALONE
        #: the event loop calls :meth:`look` every LOOK_EVERY (set and read on its thread)
        self.looking = False
        self._inflight: Counter[bytes] = Counter()  # keys begun alone, not ended
        self._covered: set[bytes] = set()  # ... of those, given a lease on leaving alone

    def _forget(self) -> None:
        # in a forked child: the parent's descriptions are not this process's to lock with
        # (same owner); closing the child's copies leaves the parent's locks as they are
        fds, self._fds = [*self._fds, self._active], [-1] * SHARDS
        self._opening = threading.Lock()
        self._lock = threading.Lock()
        self._start()
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _file(self, shard: int) -> int:
        fd = self._fds[shard]
        if fd < 0:
            with self._opening:
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

    def _open_active(self) -> int:
        if self._active < 0:
            with self._opening:
                if self._active < 0:
                    os.makedirs(self.path, mode=0o700, exist_ok=True)
                    fd = os.open(os.path.join(self.path, ACTIVE),
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    try:
                        if os.fstat(fd).st_size < _SIZE:  # (a no-op once another made it)
                            os.ftruncate(fd, _SIZE)
                    except OSError:
                        os.close(fd)
                        raise
                    self._active = fd
        return self._active

    def register(self) -> int:
        """Make this process known as one that faults on the store (a read lock on
        ``FAULTER``, held until :meth:`close`); the file's descriptor. Raises OSError."""
        fd = self._open_active()
        if not self._registered:
            _setlk(fd, fcntl.F_RDLCK, FAULTER)  # (read locks never conflict)
            self._registered = True
        return fd

    def watch(self) -> None:
        """Start counting the map entries other processes learn (call before reading the
        chunk maps to serve). Raises OSError (the store's folder read-only: then
        :meth:`learned_elsewhere` is always True)."""
        self._open_active()
        self._seen = self._count()
        self._watching = True

    def _count(self) -> int:
        # read with pread, not through mmap: a file truncated under a mapping is a SIGBUS
        data = os.pread(self._active, 8, LEARNED)
        return int.from_bytes(data, "little") if len(data) == 8 else -1

    def learned_elsewhere(self) -> bool:
        """Whether another process may have learned map entries since :meth:`watch` (then a
        map entry not learned here may be in the store)."""
        if not self._watching or self._active < 0:
            return True
        try:
            return self._count() != self._seen
        except OSError:
            return True

    def learned(self) -> None:
        """Count a commit of learned map entries by this process (from the writer's thread:
        it waits for the count's lock). Raises OSError."""
        if not self._watching:
            return
        fd = self._open_active()
        lock = _Flock(fcntl.F_WRLCK, os.SEEK_SET, COUNTING, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, bytes(lock))  # (lets the GIL go while it waits)
        try:
            n = max(self._count(), 0)
            os.pwrite(fd, ((n + 1) % (1 << 64)).to_bytes(8, "little"), LEARNED)  # (wraps)
            with self._lock:
                if self._seen == n:  # nobody else counted since: still all seen
                    self._seen = n + 1
        finally:
            _setlk(fd, fcntl.F_UNLCK, COUNTING)

    def begin(self, key: bytes) -> Grant:
        """Start the fault of ``key`` (on the event loop's thread): ALONE when no other
        process faults on the store, HELD when this process holds ``key``'s lease, BUSY when
        it must wait (docs at the top). Every ALONE or HELD must be followed by one
        :meth:`end`. Raises OSError when the files cannot be opened or locked."""
        try:
            fd = self.register()
        except OSError:  # active.lock unusable (a folder, a FIFO): leases only, never alone
            return Grant.HELD if self.take(key) else Grant.BUSY
        now = time.monotonic()
        with self._lock:
            if self._alone:
                if now - self._looked >= LOOK_EVERY:
                    self._looked = now
                    if _others(fd, FAULTER):
                        self._leave()
                if self._alone:
                    self._inflight[key] += 1
                    return Grant.ALONE
            elif now - self._looked >= LOOK_EVERY:
                self._looked = now
                _setlk(fd, fcntl.F_RDLCK, ALONE)  # first ours, then a look at the others'
                if not _others(fd, FAULTER):
                    self._alone = self._clear = True
                    self._inflight[key] += 1
                    return Grant.ALONE
                _setlk(fd, fcntl.F_UNLCK, ALONE)
            if not self._clear:
                if _others(fd, ALONE):  # its faults in flight took no lease: wait for it
                    if not self._blocked:
                        self._blocked = now
                    if now - self._blocked < ALONE_WAIT:
                        return Grant.BUSY
                    # it does not look (stopped, or a clock that jumped): go on with
                    # leases; at worst a chunk it has in flight is fetched twice
                self._clear = True
        return Grant.HELD if self.take(key) else Grant.BUSY

    def look(self) -> bool:
        """While this process faults alone, look for other processes that fault now (the
        event loop calls this every ``LOOK_EVERY`` seconds while faults are in flight, so a
        newcomer need not wait for them to end): True while it still faults alone. Raises
        OSError."""
        with self._lock:
            if self._alone:
                self._looked = time.monotonic()
                if _others(self._active, FAULTER):
                    self._leave()
            return self._alone

    def _leave(self) -> None:
        # another process faults now (it waits while ALONE is held): our faults in flight
        # take their leases, then ALONE is given up. (Call holding _lock.)
        for key in self._inflight:
            self.take(key)  # free: nobody else takes leases while we hold ALONE
            self._covered.add(key)
        self._alone = False
        _setlk(self._active, fcntl.F_UNLCK, ALONE)

    def end(self, key: bytes) -> None:
        """End a fault :meth:`begin` granted (its chunk committed, or its fetch failed):
        its lease given back, or, for the last fault in flight alone, ``ALONE``. Safe from
        any thread of the process."""
        with self._lock:
            n = self._inflight.get(key, 0)
            if n:
                if n > 1:
                    self._inflight[key] = n - 1
                    return
                del self._inflight[key]
                covered = key in self._covered
                self._covered.discard(key)
                if not self._inflight and self._alone:
                    # idle: a newcomer need not wait for our next look
                    self._alone = False
                    self._looked = 0.0
                    _setlk(self._active, fcntl.F_UNLCK, ALONE)
                if not covered:
                    return
        self.release(key)

    @property
    def in_flight(self) -> bool:
        """Whether faults begun alone have not ended yet."""
        return bool(self._inflight)

    @property
    def alone(self) -> bool:
        """Whether this process faults alone now (for tests and stats)."""
        return self._alone

    def close(self) -> None:
        """Close the files: every lease of this process is given back, and it is no longer
        known as faulting."""
        with self._lock, self._opening:  # (the order of begin -> _leave -> take)
            fds, self._fds = [*self._fds, self._active], [-1] * SHARDS
            self._start()
            self._watching = False
        for fd in fds:
            if fd >= 0:
                os.close(fd)
