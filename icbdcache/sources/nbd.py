"""A plain NBD upstream (nbdkit, qemu-nbd, another icbd-cache) read by offset.

Notes on the design:

- The protocol is the project's own client: :func:`nbd.aio.connect` and
  :class:`nbd.aio.AsyncClient` (the sans-IO :class:`nbd.client.ClientConnection` on an
  asyncio transport). Requests on one connection are pipelined, the faults of one loop turn
  in one write; replies come back in any order.
- A pool of at most ``connections`` connections, opened lazily and one at a time: the first
  read opens one; a read that finds every connection busy opens another in the background and
  meanwhile queues on the least loaded one.
- Every read has ``timeout`` seconds in all (connecting, retries and waiting included). A read
  that times out retires its connection: an upstream that leaves a read unanswered that long is
  stuck or unreachable, so no new request goes there; it is closed in the background once the
  requests already on it are answered or have timed out themselves.
- Failures (connect refused or timed out, handshake refused, connection lost with requests in
  flight, read timed out) start an exponential back-off (:class:`~icbdcache.sources.RetryClock`:
  0.1 s doubling to 5 s; a successful reply resets it). While it runs and no connection is
  left, :meth:`read` raises SourceUnavailable at once instead of waiting, so the read path can
  answer EIO fast or fall back. Several connections lost at once count as one failure. An idle
  connection that the upstream closes is only dropped: the next read connects again.
- A read whose connection is lost (or whose upstream answers ESHUTDOWN) fails with
  SourceUnavailable; it is not tried again here. Retrying is :meth:`Source.fetch`'s one
  policy (the next attempt takes another live connection, or connects anew).
- TLS (``nbds://``, ``nbds+unix://``, the NBD URI standard's schemes): the session is upgraded
  with NBD_OPT_STARTTLS before any other option. ``?tls-certificates=DIR`` names a directory laid
  out as libnbd's (nbd_set_tls_certificates(3)): ``ca-cert.pem`` (the CAs the upstream's
  certificate must chain to; without it, the system's trust store), and ``client-cert.pem`` with
  ``client-key.pem`` (presented when the upstream asks for a client certificate, e.g. another
  ``serve --tls-verify-peer``). ``?tls-verify-peer=false`` skips checking the upstream's
  certificate (tests only); ``?tls-hostname=NAME`` is the name checked instead of the host.
- The upstream export must have the expected size (when given) on every connection; reads are
  widened to the upstream's minimum block size and split at its maximum block size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from icbdcache import tlspeer
from icbdcache.log import kv
from icbdcache.sources.base import (
    NBD_PORT,
    RetryClock,
    Source,
    SourceDataError,
    SourceUnavailable,
)
from nbd import aio, wire
from nbd.constants import Errno
from nbd.errors import NegotiationError, ProtocolError, RequestError

log = logging.getLogger("icbdcache.sources")

#: Back-off after a failure, seconds: first wait and longest wait.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0


@dataclass(frozen=True)
class Target:
    """Where an NBD URI points: ``address`` ((host, port), or a Unix socket path), ``export``,
    and with TLS the client context and the name checked against the server's certificate."""

    address: tuple[str, int] | str
    export: str
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None


_TLS_KEYS = ("tls-certificates", "tls-verify-peer", "tls-hostname")


def parse_uri(uri: str) -> Target:
    """``nbd[s]://HOST[:PORT]/EXPORT`` or ``nbd[s]+unix:///EXPORT?socket=PATH``; the TLS
    schemes take ``tls-certificates=DIR``, ``tls-verify-peer=false`` and ``tls-hostname=NAME``
    (see the module notes). Raises ValueError naming what is wrong (also for unreadable
    certificate files)."""
    u = urlsplit(uri)
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = parse_qs(u.query)
    scheme = u.scheme
    tls = scheme in ("nbds", "nbds+unix")
    context: ssl.SSLContext | None = None
    hostname: str | None = None
    if tls:
        opts = {k: query.pop(k) for k in _TLS_KEYS if k in query}
        if any(len(v) != 1 for v in opts.values()):
            raise ValueError(f"a TLS parameter given twice in {uri!r}")
        verify = opts.get("tls-verify-peer", ["true"])[0].lower()
        if verify not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"tls-verify-peer wants true or false in {uri!r}")
        hostname = opts.get("tls-hostname", [None])[0]
        context = _tls_context(opts.get("tls-certificates", [None])[0],
                               verify in ("true", "1", "yes"), uri)
        scheme = scheme.replace("nbds", "nbd", 1)
    address: tuple[str, int] | str
    if scheme == "nbd":
        if not u.hostname:
            raise ValueError(f"no host in {uri!r}")
        if query:
            raise ValueError(f"unsupported query in {uri!r}")
        address = (u.hostname, u.port or NBD_PORT)
    elif scheme == "nbd+unix":
        if u.netloc:
            raise ValueError(f"nbd+unix URI with a host: {uri!r}")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or query:
            raise ValueError(f"nbd+unix URI needs exactly ?socket=PATH: {uri!r}")
        address = sockets[0]
        hostname = hostname or "localhost"
    else:
        raise ValueError(f"unsupported source scheme {u.scheme!r} in {uri!r}")
    return Target(address, export, context, hostname)


def _tls_context(certs: str | None, verify: bool, uri: str) -> ssl.SSLContext:
    """The client context of ``tls-certificates=DIR`` (libnbd's layout). Raises ValueError."""
    ca = cert = key = None
    if certs is not None:
        if not os.path.isdir(certs):
            raise ValueError(f"tls-certificates={certs} is not a directory in {uri!r}")
        found = {n: os.path.join(certs, n) for n in ("ca-cert.pem", "client-cert.pem",
                                                    "client-key.pem")}
        found = {n: p for n, p in found.items() if os.path.exists(p)}
        ca = found.get("ca-cert.pem")
        cert, key = found.get("client-cert.pem"), found.get("client-key.pem")
    try:
        return tlspeer.client_context(ca, cert, key, verify)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ValueError(f"TLS files of {uri!r}: {e}") from e


def _without_query(uri: str) -> str:
    """``uri`` for logs: its query (file paths of TLS settings) left out, but ``socket=``."""
    u = urlsplit(uri)
    keep = "&".join(f"socket={p}" for p in parse_qs(u.query).get("socket", []))
    return u._replace(query=keep).geturl()


async def connect(t: Target, *, timeout: float | None, meta_contexts: tuple[str, ...] = (),
                  ) -> aio.AsyncClient:
    """Open and negotiate one connection to ``t`` (:func:`nbd.aio.connect`, same errors)."""
    if isinstance(t.address, str):
        return await aio.connect(t.server_hostname or "", None, t.export, unix=t.address,
                                 timeout=timeout, meta_contexts=meta_contexts, ssl=t.ssl,
                                 server_hostname=t.server_hostname)
    host, port = t.address
    return await aio.connect(host, port, t.export, timeout=timeout,
                             meta_contexts=meta_contexts, ssl=t.ssl,
                             server_hostname=t.server_hostname)


class _Lost(Exception):
    """The connection went away before the reply came (transient: another connection may
    answer)."""


class NBDSource(Source):
    """Reads by offset from one export of an NBD server, over a small pool of connections.

    ``address``: ``(host, port)`` for TCP or a path for a Unix socket. ``export``: the export
    name. ``size``: expected export size in bytes (an export of another size is refused with
    SourceDataError); without it the size of the first connection's export is expected from
    every later one. ``timeout``: seconds per read, everything included (also the limit of one
    connection attempt). ``connections``: most connections open at once. ``backoff``:
    (first, longest) wait in seconds after failures.

    Raises nothing until used; :meth:`read` raises SourceUnavailable (unreachable, refused,
    lost, timed out, backing off, upstream I/O error) or SourceDataError (wrong export size,
    upstream refusing the range as invalid).
    """

    def __init__(
        self,
        address: tuple[str, int] | str,
        export: str = "",
        *,
        name: str | None = None,
        size: int | None = None,
        timeout: float = 5.0,
        connections: int = 4,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if name is None:
            if isinstance(address, str):
                name = f"nbd+unix:///{export}?socket={address}"
            else:
                host = f"[{address[0]}]" if ":" in address[0] else address[0]
                name = f"nbd://{host}:{address[1]}/{export}"
        super().__init__(name, size)
        self.address = address
        #: TLS client context and the name checked against the upstream's certificate
        #: (``nbds://``, :func:`parse_uri`); None: plaintext.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        self.export = export
        self.timeout = timeout
        self.read_timeout = timeout  # (every read ends within it: :meth:`_read`)
        self.connections = connections
        self._clock = RetryClock(*backoff)
        self._conns: list[aio.AsyncClient] = []
        self._connecting: asyncio.Task[aio.AsyncClient] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # retired connections closing
        self._down = False  # a failure was logged and no reply has come since

    @classmethod
    def from_uri(cls, uri: str, *, size: int | None = None, timeout: float = 5.0,
                 connections: int = 4) -> NBDSource:
        """``nbd[s]://HOST[:PORT]/EXPORT`` or ``nbd[s]+unix:///EXPORT?socket=PATH`` (the NBD
        URI standard; TLS parameters in :func:`parse_uri`). Raises ValueError on anything
        else."""
        t = parse_uri(uri)
        src = cls(t.address, t.export, name=_without_query(uri) if t.ssl else uri, size=size,
                  timeout=timeout, connections=connections)
        src.ssl, src.server_hostname = t.ssl, t.server_hostname
        return src

    # ------------------------------------------------------------------ health

    @property
    def healthy(self) -> bool:
        """True with a live connection, or when no back-off is running (the next read will
        connect)."""
        if self._closed:
            return False
        return any(not c.closed for c in self._conns) or self._clock.remaining() == 0.0

    @property
    def open_connections(self) -> int:
        """Connections in transmission now."""
        return sum(1 for c in self._conns if not c.closed)

    def _failed(self, reason: str) -> None:
        if self._closed:
            return
        if not self._down:
            log.warning(kv(source=self.name, unavailable=reason))
            self._down = True
        self._clock.failed(reason)

    # ------------------------------------------------------------------ pool

    def _prune(self) -> list[aio.AsyncClient]:
        """Drop connections that closed (an idle one the upstream closed: no back-off, the
        next read connects again); return the live ones."""
        live = [c for c in self._conns if not c.closed]
        if len(live) != len(self._conns):
            log.info(kv(source=self.name, disconnected=len(self._conns) - len(live),
                        connections=len(live)))
            self._conns = live
        return live

    def _retire(self, client: aio.AsyncClient) -> None:
        """No new requests to ``client``; close it once its requests are done."""
        with contextlib.suppress(ValueError):
            self._conns.remove(client)
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _connect(self) -> aio.AsyncClient:
        """Open, negotiate and check one connection (at most :attr:`timeout` seconds).

        Raises SourceUnavailable or SourceDataError, having started the back-off.
        """
        try:
            client = await connect(Target(self.address, self.export, self.ssl,
                                          self.server_hostname), timeout=self.timeout)
        except (OSError, ProtocolError, NegotiationError) as e:
            reason = "connect timed out" if isinstance(e, TimeoutError) else str(e)
            self._failed(reason)
            raise SourceUnavailable(f"{self.name}: {reason}") from e
        finally:
            self._connecting = None
        info = client.info
        if self.size is None:
            self.size = info.size
        elif info.size != self.size:
            msg = f"export is {info.size} bytes, expected {self.size}"
            self._retire(client)
            self._failed(msg)
            raise SourceDataError(f"{self.name}: {msg}")
        if self._closed:
            self._retire(client)
            raise SourceUnavailable(f"{self.name}: source closed")
        self._conns.append(client)
        log.debug(kv(source=self.name, connected=len(self._conns), size=info.size,
                     min_block=info.min_block, max_block=info.max_block))
        return client

    def _start_connect(self) -> asyncio.Task[aio.AsyncClient]:
        task = asyncio.get_running_loop().create_task(self._connect())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._connecting = task
        return task

    async def _pick(self) -> aio.AsyncClient:
        """The least loaded live connection, growing the pool when all are busy.

        Raises SourceUnavailable at once while backing off without a live connection, or when
        a new connection fails.
        """
        if self._closed:
            raise SourceUnavailable(f"{self.name}: source closed")
        live = self._prune()
        backing_off = self._clock.remaining()
        if live:
            best = min(live, key=lambda c: c.in_flight)
            if (best.in_flight and len(live) < self.connections
                    and self._connecting is None and not backing_off):
                self._start_connect()
            return best
        if backing_off:
            raise SourceUnavailable(f"{self.name}: backing off {backing_off:.2f} s after: "
                                    f"{self._clock.reason}")
        task = self._connecting or self._start_connect()
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and me is not None and not me.cancelling():
                # close() stopped the connect; this read itself was not cancelled.
                raise SourceUnavailable(f"{self.name}: source closed") from None
            raise

    # ------------------------------------------------------------------ reads

    async def _attempt(self, client: aio.AsyncClient, offset: int, length: int) -> bytes:
        """One try on one connection: widen to the minimum block size, split at the maximum,
        pipeline the parts. Raises _Lost, SourceUnavailable or SourceDataError."""
        info = client.info
        start, end = offset, offset + length
        mn = max(1, info.min_block)
        if mn > 1:
            start -= start % mn
            end = min(-(-end // mn) * mn, info.size)
        step = max(mn, min(info.max_block, wire.MAX_PAYLOAD))
        step -= step % mn
        try:
            if end - start <= step:
                data = await client.pread(start, end - start)
            else:
                loop = asyncio.get_running_loop()
                tasks = [loop.create_task(client.pread(o, min(step, end - o)))
                         for o in range(start, end, step)]
                try:
                    data = b"".join(await asyncio.gather(*tasks))
                finally:
                    for t in tasks:
                        t.cancel()
        except RequestError as e:
            if e.error == Errno.ESHUTDOWN:
                self._retire(client)
                raise _Lost("upstream shutting down") from e
            msg = f"{self.name}: upstream answered {e}"
            if e.error in (Errno.EINVAL, Errno.EOVERFLOW):
                raise SourceDataError(msg) from e
            raise SourceUnavailable(msg) from e
        except ConnectionError as e:
            reason = str(e.__cause__ or e)
            self._prune()
            self._failed(reason)
            raise _Lost(reason) from e
        if self._down:
            log.info(kv(source=self.name, available="upstream answers again"))
            self._down = False
        self._clock.succeeded()
        if start != offset or end != offset + length:
            data = data[offset - start : offset - start + length]
        return data

    async def _read(self, offset: int, length: int) -> bytes:
        """Raises SourceUnavailable or SourceDataError (see the class docstring)."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        client: aio.AsyncClient | None = None
        cm = asyncio.timeout_at(deadline)
        try:
            async with cm:
                client = await self._pick()
                return await self._attempt(client, offset, length)
        except TimeoutError as e:
            if not cm.expired():  # not ours: an OS-level ETIMEDOUT
                raise SourceUnavailable(f"{self.name}: {e}") from e
            if client is not None:
                self._failed(f"no reply in {self.timeout:g} s")
                if client in self._conns:
                    log.info(kv(source=self.name, retired=f"no reply in {self.timeout:g} s",
                                connections=len(self._conns) - 1))
                    self._retire(client)
            raise SourceUnavailable(f"{self.name}: no data in {self.timeout:g} s") from None
        except _Lost as e:
            raise SourceUnavailable(f"{self.name}: {e}") from None

    async def close(self) -> None:
        """Stop connecting and close every connection: each waits for its requests in flight
        (at most :attr:`timeout` seconds in all, then they are left to finish in the
        background), then says NBD_CMD_DISC. Idempotent."""
        await super().close()
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        for c in list(self._conns):
            self._retire(c)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self.timeout)


__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "NBDSource"]
