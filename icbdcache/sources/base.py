"""Sources: where a cache miss gets its bytes (the interface, its errors, the retry policy).

A :class:`Source` returns the bytes of a byte range of one iMI version, asynchronously. The read
path's fault layer (:mod:`icbdcache.layers.fault`) asks for whole chunks (``offset = index *
chunk_size``, ``length = min(chunk_size, size - offset)``) with :meth:`Source.fetch`, healthy
sources first, and does single-flight. Sources own everything about getting the bytes: their
timeouts, connection pools, and the one retry policy (:class:`RetryPolicy`, applied by
:meth:`Source.fetch` around single attempts of :meth:`Source.read`, with the caller's
check of the bytes, the digest, counted as a failed attempt).

Errors: every failure of :meth:`Source.read` is a :class:`SourceError`, one of

- :class:`SourceUnavailable`: the bytes cannot be had from this source now (file missing,
  upstream unreachable or gone, timed out, backing off). Try the next source; this one may
  recover by itself.
- :class:`SourceDataError`: the source answered, but not with what was asked (wrong length,
  short read, export of another size). Try the next source; this one is probably misconfigured.

Arguments out of range are the caller's bug and raise ValueError.

Implementations: :class:`~icbdcache.sources.snapshot.SnapshotSource` (a raw image file) and
:class:`~icbdcache.sources.nbd.NBDSource` (any NBD server); :func:`open_source` picks one from a
spec string.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

#: Default TCP port of NBD (IANA), used when an ``nbd://`` spec has none.
NBD_PORT = 10809


class SourceError(Exception):
    """A source could not return the bytes asked for."""


class SourceUnavailable(SourceError):
    """The source cannot be reached, is gone, timed out, or is backing off after a failure."""


class SourceDataError(SourceError):
    """The source answered with the wrong amount of data or for an image of another size."""


@dataclass(slots=True)
class SourceStats:
    """Counters of one source since it was opened.

    ``requests``: :meth:`Source.read` calls that returned data; ``bytes``: bytes they returned;
    ``errors``: calls that raised :class:`SourceError`.
    """

    requests: int = 0
    bytes: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :meth:`Source.fetch` retries: at most ``attempts`` attempts in all, waiting
    ``first_wait`` seconds before the second and twice as long before each further one, and
    never past the caller's deadline."""

    attempts: int = 3
    first_wait: float = 0.05

    def wait(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (0-based; 0 for the first)."""
        return 0.0 if attempt == 0 else self.first_wait * 2 ** (attempt - 1)


#: The policy of every source unless given another.
DEFAULT_RETRY = RetryPolicy()


class Source(ABC):
    """Where missing chunks come from. One instance serves one iMI version.

    Subclasses implement :meth:`_read` and :meth:`close`; :meth:`read` checks the range and keeps
    :attr:`stats`. Instances belong to the event loop they are first used on.
    """

    #: For logs: the path or URI this source reads from.
    name: str
    #: Expected image size in bytes, or None while unknown.
    size: int | None = None
    #: How :meth:`fetch` retries.
    retry: RetryPolicy = DEFAULT_RETRY
    #: Seconds within which this source's own :meth:`read` ends (answers or raises
    #: SourceUnavailable), or None if it sets no such bound; :meth:`fetch` adds a timer of
    #: its own only when the deadline is nearer than this.
    read_timeout: float | None = None

    def __init__(self, name: str, size: int | None = None) -> None:
        self.name = name
        self.size = size
        self.stats = SourceStats()
        self._closed = False

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """Whether a read is worth trying now.

        False for a while after a failure (the file was missing, the upstream went away); True
        again once a retry is due, so a read path that only asks healthy sources still lets a
        source recover. A hint, never a promise: a healthy source's read may still fail.
        """

    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` (both in bytes) of the image.

        Raises SourceUnavailable or SourceDataError (see the module docstring); ValueError if
        the range is negative or, when :attr:`size` is known, runs past the end.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset={offset} length={length}")
        if self.size is not None and offset + length > self.size:
            raise ValueError(f"range {offset}+{length} past the end of {self.size} bytes")
        if self._closed:
            self.stats.errors += 1
            raise SourceUnavailable(f"{self.name}: source closed")
        if length == 0:
            return b""
        try:
            data = await self._read(offset, length)
        except SourceError:
            self.stats.errors += 1
            raise
        if len(data) != length:
            self.stats.errors += 1
            raise SourceDataError(f"{self.name}: got {len(data)} bytes at {offset}, "
                                  f"wanted {length}")
        self.stats.requests += 1
        self.stats.bytes += length
        return data

    async def fetch(self, offset: int, length: int, *,
                    check: Callable[[bytes], bool] | None = None,
                    deadline: float | None = None) -> bytes:
        """:meth:`read` under this source's :attr:`retry` policy: a failed attempt (a
        SourceError, or bytes that ``check`` refuses) is tried again after a wait, until
        the policy's attempts are spent or ``deadline`` (``time.monotonic()`` seconds) has
        passed. Raises the last attempt's SourceError (a refused check is a
        SourceDataError naming the source); ValueError as :meth:`read`."""
        error: SourceError = SourceUnavailable(f"{self.name}: no attempt before the deadline")
        for attempt in range(max(1, self.retry.attempts)):
            wait = self.retry.wait(attempt)
            if deadline is not None and deadline - time.monotonic() <= wait:
                break
            if wait:
                await asyncio.sleep(wait)
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is None or (self.read_timeout is not None and self.read_timeout <= left):
                    data = await self.read(offset, length)  # the source's own bound comes first
                else:
                    cm = asyncio.timeout(left)
                    try:
                        async with cm:  # no task per attempt, unlike wait_for
                            data = await self.read(offset, length)
                    except TimeoutError:
                        if not cm.expired():  # not ours: raised inside the read
                            raise
                        error = SourceUnavailable(f"{self.name}: no data before the deadline")
                        break
            except SourceError as e:
                error = e
                continue
            if check is not None and not check(data):
                self.stats.errors += 1
                error = SourceDataError(f"{self.name}: bytes at {offset} failed their check")
                continue
            return data
        raise error

    @abstractmethod
    async def _read(self, offset: int, length: int) -> bytes:
        """Fetch the range (already checked, ``length`` > 0); raise SourceError on failure."""

    async def close(self) -> None:
        """Release files and connections. Later reads raise SourceUnavailable. Idempotent."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} healthy={self.healthy} {self.stats}>"


class RetryClock:
    """Exponential back-off: after a failure, wait ``initial`` seconds, doubling on every
    further failure up to ``maximum``; a success resets it. Times are ``time.monotonic()``
    seconds."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.delay = initial
        #: No attempt before this time; 0 when not backing off.
        self.retry_at = 0.0
        #: Why the last failure happened (for error messages).
        self.reason = ""

    def failed(self, reason: str) -> None:
        """Record a failure. Failures while already backing off (several connections lost at
        once) do not lengthen the wait."""
        now = time.monotonic()
        self.reason = reason
        if now < self.retry_at:
            return
        self.retry_at = now + self.delay
        self.delay = min(self.delay * 2, self.maximum)

    def succeeded(self) -> None:
        """Record a success: the next failure waits ``initial`` again."""
        self.delay = self.initial
        self.retry_at = 0.0

    def remaining(self) -> float:
        """Seconds left to wait before the next attempt (0 if one may start now)."""
        return max(0.0, self.retry_at - time.monotonic())


__all__ = [
    "DEFAULT_RETRY",
    "NBD_PORT",
    "RetryClock",
    "RetryPolicy",
    "Source",
    "SourceDataError",
    "SourceError",
    "SourceStats",
    "SourceUnavailable",
]
