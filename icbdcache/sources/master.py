"""A version being replicated, read from its master by chunk digest.

A site that has a version's manifest (chunk map) but not yet all its chunks serves it at once:
a read the store cannot answer faults the chunks that cover it from the master through the same
chunk protocol the replica pulls with (``POST /v1/chunks``, docs/replication.md). The spec of
such a source, kept in the version's :class:`~icbdcache.store.VersionMeta`, is
``icbd+http://HOST:PORT/IMI@VERSION`` (``icbd+https://`` over TLS): it names the master, never
its credentials; only a process that runs the replica (``serve --master``) holds a
:class:`~icbdcache.replication.client.MasterClient` and can open it.

Notes on the design:

- Reads of one event-loop turn are coalesced: every digest asked for before the loop comes
  back to the batcher goes in one request (at most ``batch`` digests each), so a readahead
  burst of 16 chunks is one round trip, not 16. A digest already being fetched is not asked
  for twice.
- Every chunk is checked against its digest here (a mismatch is SourceDataError) and again by
  the read path.
- Failures start a back-off (:class:`~icbdcache.sources.RetryClock`, 0.1 s doubling to 5 s);
  during it :meth:`read` raises SourceUnavailable at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from icbdcache.log import kv
from icbdcache.sources.base import RetryClock, Source, SourceDataError, SourceUnavailable
from icbdcache.store.chunks import DIGEST_SIZE, UNKNOWN, ZERO, digest

if TYPE_CHECKING:
    from icbdcache.replication.client import MasterClient

log = logging.getLogger("icbdcache.sources")

#: Scheme prefixes of a master source spec.
SCHEMES = ("icbd+http://", "icbd+https://")


def master_spec(master_url: str, key: str) -> str:
    """The source spec of version ``key`` (``IMI@VERSION``) held by the master at
    ``master_url`` (``http(s)://HOST:PORT``): ``icbd+http(s)://HOST:PORT/IMI@VERSION``."""
    return f"icbd+{master_url.rstrip('/')}/{key}"


def is_master_spec(spec: str) -> bool:
    return spec.startswith(SCHEMES)


class MasterSource(Source):
    """Reads byte ranges of one version from a master, by the digests of ``chunk_map``
    (16 bytes per chunk index; ZERO chunks are answered with zeros, never fetched).

    ``size``, ``chunk_size``: the version's, in bytes. ``timeout``: seconds per read, waiting
    included. ``batch``: most digests per request. Raises nothing until used; :meth:`read`
    raises SourceUnavailable (master unreachable, lacks the chunk, timed out, backing off) or
    SourceDataError (a chunk that fails its digest, a chunk map entry not known).
    """

    def __init__(self, client: MasterClient, key: str, chunk_map: bytes, size: int,
                 chunk_size: int, *, timeout: float = 5.0, batch: int = 256,
                 name: str | None = None) -> None:
        super().__init__(name or master_spec(client.url, key), size)
        if len(chunk_map) < -(-size // chunk_size) * DIGEST_SIZE:
            raise ValueError(f"{key}: chunk map too short for {size} bytes")
        self.client = client
        self.key = key
        self.map = bytes(chunk_map)
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.batch = batch
        self._clock = RetryClock(0.1, 5.0)
        self._wanted: dict[bytes, asyncio.Future[bytes]] = {}  # digest -> future (all)
        self._queue: list[bytes] = []  # digests not requested yet
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False

    @property
    def healthy(self) -> bool:
        return self._clock.remaining() == 0

    async def _read(self, offset: int, length: int) -> bytes:
        if self._clock.remaining() > 0:
            raise SourceUnavailable(f"{self.name}: backing off after: {self._clock.reason}")
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        digests: list[bytes] = []
        for i in range(first, last + 1):
            d = self.map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            if d == UNKNOWN:
                raise SourceDataError(f"{self.name}: chunk {i} is not in the manifest")
            digests.append(d)
        futs = [self._want(d) for d in digests if d != ZERO]
        try:
            async with asyncio.timeout(self.timeout):
                got = await asyncio.gather(*(asyncio.shield(f) for f in futs))
        except TimeoutError:
            self._failed("timed out")
            raise SourceUnavailable(f"{self.name}: no answer in {self.timeout} s") from None
        datas = iter(got)
        parts: list[bytes] = []
        for i, d in zip(range(first, last + 1), digests, strict=True):
            n = min(cs, self.size - i * cs) if self.size is not None else cs
            parts.append(bytes(n) if d == ZERO else next(datas))
        blob = b"".join(parts)
        lo = offset - first * cs
        return blob[lo : lo + length]

    # ------------------------------------------------------------------ batching

    def _want(self, d: bytes) -> asyncio.Future[bytes]:
        fut = self._wanted.get(d)
        if fut is not None:
            return fut
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._wanted[d] = fut
        self._queue.append(d)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), self.batch):
            t = asyncio.ensure_future(self._fetch(queue[i : i + self.batch]))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _settle(self, d: bytes, data: bytes | None, error: Exception | None) -> None:
        fut = self._wanted.pop(d, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
            fut.exception()  # retrieved: the readers that wait get it
        else:
            assert data is not None
            fut.set_result(data)

    async def _fetch(self, batch: list[bytes]) -> None:
        from icbdcache.replication.client import MasterError

        left = set(batch)
        try:
            async for frame in self.client.chunks(batch):
                if frame.digest not in left:
                    continue
                left.discard(frame.digest)
                if frame.data is None:
                    self._settle(frame.digest, None, SourceUnavailable(
                        f"{self.name}: the master does not hold chunk {frame.digest.hex()}"))
                elif digest(frame.data) != frame.digest:
                    self._settle(frame.digest, None, SourceDataError(
                        f"{self.name}: chunk {frame.digest.hex()} failed its digest check"))
                else:
                    self._settle(frame.digest, frame.data, None)
            self._succeeded()
        except (MasterError, ValueError) as e:
            self._failed(str(e))
            for d in left:
                self._settle(d, None, SourceUnavailable(f"{self.name}: {e}"))
            left.clear()
        finally:
            for d in left:
                self._settle(d, None, SourceDataError(f"{self.name}: chunk {d.hex()} was not "
                                                      "in the master's answer"))

    def _failed(self, reason: str) -> None:
        self._clock.failed(reason)
        if not self._down:
            self._down = True
            log.warning(kv(source=self.name, error=reason, retry_in=round(
                self._clock.remaining(), 2)))

    def _succeeded(self) -> None:
        self._clock.succeeded()
        if self._down:
            self._down = False
            log.info(kv(source=self.name, state="reachable"))

    async def close(self) -> None:
        await super().close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for d in list(self._wanted):
            self._settle(d, None, SourceUnavailable(f"{self.name}: source closed"))


__all__ = ["SCHEMES", "MasterSource", "is_master_spec", "master_spec"]
