"""A raw image file in a read-only snapshot directory (btrfs/ext4 snapshot of an iMI version).

Notes on the design:

- The file is immutable while it exists (a version never changes), so one open descriptor may
  serve every read; ``os.pread`` runs in the loop's default thread executor, because a read
  from a cold disk or a network file system can block for a long time.
- A missing file, a failed open or read, or a short read (the file is shorter than the version:
  truncated, or still being copied in) raise :class:`SourceUnavailable`, so that the read path
  falls back to the next source. Nothing is remembered as permanent: the descriptor is dropped
  and the next read opens the path again, so a file that (re)appears is used from then on.
- A descriptor is closed only once no thread is reading from it (a read that timed out may
  still be running in its thread), so a read can never land on a recycled descriptor number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from icbdcache.log import kv
from icbdcache.sources.base import RetryClock, Source, SourceDataError, SourceUnavailable

log = logging.getLogger("icbdcache.sources")

T = TypeVar("T")

#: Seconds :attr:`SnapshotSource.healthy` stays False after a failure. Reads always try again.
RECHECK = 1.0


class _Retired(Exception):
    """The handle was dropped between choosing it and using it; open the file again."""


class _Handle:
    """An open descriptor shared by reader threads; closed by its last user once retired."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        """Read in a worker thread. Raises OSError, or _Retired if the handle was dropped."""
        with self._lock:
            if self._retired:
                raise _Retired
            self._users += 1
        try:
            return os.pread(self.fd, length, offset)
        finally:
            with self._lock:
                self._users -= 1
                last = self._retired and self._users == 0
            if last:
                os.close(self.fd)

    def retire(self) -> None:
        """Drop the handle: close now, or when the last running read ends."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            last = self._users == 0
        if last:
            os.close(self.fd)


def _open(path: str) -> _Handle:
    """Open ``path`` read-only (in a worker thread). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _Handle(fd, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise


class SnapshotSource(Source):
    """Reads a raw image file with ``os.pread`` in the default thread executor.

    ``path``: the image file. ``size``: the version's size in bytes if known; a file of another
    size is refused (shorter: SourceUnavailable, it may still be copied in; longer:
    SourceDataError, it is another image). Without ``size`` the size of the file at its first
    successful open becomes the expected size. ``timeout``: seconds per read (and per open);
    a read still blocked in its thread after that raises SourceUnavailable, the thread finishes
    on its own.
    """

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None,
                 timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        super().__init__(self.path, size)
        self.timeout = timeout
        self._handle: _Handle | None = None
        self._opening: asyncio.Lock | None = None
        self._clock = RetryClock(RECHECK, RECHECK)

    @property
    def healthy(self) -> bool:
        """False for :data:`RECHECK` seconds after a failed open or read."""
        return not self._closed and self._clock.remaining() == 0.0

    async def _in_thread(self, fn: Callable[[], T], cleanup: Callable[[T], None] | None = None,
                         ) -> T:
        """Run ``fn`` in the default executor for at most :attr:`timeout` seconds.

        On a timeout or a cancellation the thread goes on; ``cleanup`` then gets its result
        when it ends. Raises SourceUnavailable on the timeout, else whatever ``fn`` raises.
        """
        fut = asyncio.get_running_loop().run_in_executor(None, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            if cleanup is not None:
                def late(f: asyncio.Future[T]) -> None:
                    if not f.cancelled() and f.exception() is None:
                        cleanup(f.result())
                fut.add_done_callback(late)
            else:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            if isinstance(e, asyncio.CancelledError):
                raise
            raise SourceUnavailable(f"{self.path}: no answer in {self.timeout:g} s") from None

    def _fail(self, handle: _Handle | None, reason: str) -> None:
        if handle is not None:
            handle.retire()
            if self._handle is handle:
                self._handle = None
        if self._clock.remaining() == 0.0:  # log once per RECHECK, not once per read
            log.warning(kv(source=self.path, unavailable=reason))
        self._clock.failed(reason)

    async def _get_handle(self) -> _Handle:
        if self._handle is not None:
            return self._handle
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._handle is not None:
                return self._handle
            try:
                handle = await self._in_thread(partial(_open, self.path), _Handle.retire)
            except OSError as e:
                self._fail(None, e.strerror or str(e))
                raise SourceUnavailable(f"{self.path}: {e.strerror or e}") from e
            except SourceUnavailable as e:
                self._fail(None, str(e))
                raise
            if self.size is None:
                self.size = handle.size
            elif handle.size != self.size:
                what = "truncated" if handle.size < self.size else "too long"
                msg = f"{self.path}: {what}, {handle.size} bytes instead of {self.size}"
                self._fail(handle, msg)
                if handle.size < self.size:
                    raise SourceUnavailable(msg)
                raise SourceDataError(msg)
            if self._closed:  # closed while opening
                handle.retire()
                raise SourceUnavailable(f"{self.path}: source closed")
            self._handle = handle
            if self._clock.retry_at:
                log.info(kv(source=self.path, available="file is back"))
            self._clock.succeeded()
            return handle

    async def _read(self, offset: int, length: int) -> bytes:
        """Raises SourceUnavailable (missing, unreadable, truncated, timed out) or
        SourceDataError (the file is longer than the version)."""
        for _ in range(2):  # a second time only if the handle was dropped under us
            handle = await self._get_handle()
            try:
                data = await self._in_thread(partial(handle.pread, length, offset))
            except _Retired:
                continue
            except OSError as e:
                self._fail(handle, e.strerror or str(e))
                raise SourceUnavailable(f"{self.path}: {e.strerror or e}") from e
            except SourceUnavailable as e:
                self._fail(None, str(e))
                raise
            if len(data) < length:
                msg = f"{self.path}: truncated, {len(data)} of {length} bytes at {offset}"
                self._fail(handle, msg)
                raise SourceUnavailable(msg)
            return data
        raise SourceUnavailable(f"{self.path}: reopened twice during one read")

    async def close(self) -> None:
        """Close the file (once no thread reads from it any more)."""
        await super().close()
        if self._handle is not None:
            self._handle.retire()
            self._handle = None


__all__ = ["RECHECK", "SnapshotSource"]
