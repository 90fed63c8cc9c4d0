"""``icbd-cache serve``: the NBD server on asyncio (uvloop).

One :class:`NBDProtocol` per connection binds the sans-IO :class:`nbd.server.ServerConnection`
to a transport. The hit path has no task, no await and no exception per request: every request
in a receive buffer is parsed in one loop, carried out, and all the replies of that batch leave
in one ``writelines`` (uvloop: one ``writev``), header and payload together (corked), payloads
being memoryviews of the mapped image. Reads that must wait (a cache miss, in the layers to
come) complete later through a future callback, so replies may go out of order.

Limits, so that one client cannot take the service from the others (docs/serve.md, LIMITS):
connections per server, per address and per address in the handshake, the last ones kept for
addresses that hold few (:class:`icbdcache.limits.ConnectionLimits`); the handshake bounded by
``handshake_timeout`` seconds between options and ``handshake_total`` in all; in transmission,
a connection idle for ``idle_timeout`` (nothing in flight, no overlay) is closed, and so is one
whose client has not taken a byte of its replies for ``send_timeout``; TCP keep-alive on every
connection. Replies in flight are bounded in bytes per connection, per address and per server
(:class:`icbdcache.limits.ReplyBudget`): a request that does not fit waits, with everything
after it, and its connection is not read meanwhile. Refusals, closes caused by clients and
request errors are logged at most once a second per reason, with counts. On SIGTERM/SIGINT the
server stops accepting, lets in-flight replies finish within ``grace`` seconds, then closes
every connection.

Restarts (docs/serve.md): listening sockets passed by systemd (``LISTEN_FDS``,
:mod:`icbdcache.activation`) are used instead of binding, so clients queue while the process
restarts; with ``--handover PATH`` a new server takes the listening sockets and the live
connections of the running one (:mod:`icbdcache.handover`; SIGUSR2 makes the running one
start its successor), and clients see no drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

from icbdcache import activation, earlyhup, handover, heap, metricsmerge, steering, tlspeer
from icbdcache.access import AllowList
from icbdcache.busypoll import DEFAULT_WINDOW_US, BusyPoll
from icbdcache.exports import Catalog, Export, ExportSpec, Resolved
from icbdcache.layers.base import Buffer, Client, Layer
from icbdcache.layers.cowdir import LOCK_NAME as COW_LOCK
from icbdcache.layers.cowdir import CowDir, default_cow_dir, lock_soon, write_layout
from icbdcache.limits import ConnectionLimits, ReplyBudget, reset
from icbdcache.log import Throttled, kv, tag_process
from icbdcache.loop import finish_loop, new_event_loop
from icbdcache.node import Node, NodeService
from icbdcache.startbarrier import StartAborted, StartBarrier
from icbdcache.store import Store, StoreError
from nbd import wire
from nbd.constants import Cmd, CmdFlag, Errno, Rep, TransmissionFlag
from nbd.errors import LocalProtocolError, RemoteProtocolError
from nbd.events import (
    Disconnect,
    OptionHaggled,
    Request,
    RequestRejected,
    StartTLS,
    TransmissionStarted,
    WritePiece,
)
from nbd.server import ServerConnection, TransmissionState

log = logging.getLogger("icbdcache.server")
reqlog = logging.getLogger("icbdcache.requests")

_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_WRITE_LIKE = frozenset({Cmd.WRITE, Cmd.FLUSH, Cmd.WRITE_ZEROES, Cmd.TRIM})


#: Bytes a request counts for in the reply budget besides its data (its reply header, the
#: objects that carry it), so that a flood of small requests is bounded too; a BLOCK_STATUS
#: counts for the most its reply may take here.
REQUEST_OVERHEAD = 512
BLOCK_STATUS_COST = 64 << 10
_READ = Cmd.READ


def _cost(req: Request) -> int:
    """Bytes ``req`` holds in the reply budget from its start until its reply has left. A
    streamed WRITE holds at most two pieces of its payload at once (the one being gathered,
    and an edge piece whose partial blocks wait for the bytes below them), not its length."""
    cmd = req.command
    if req.streamed:
        return min(req.length, 2 * wire.WRITE_PIECE) + REQUEST_OVERHEAD
    if cmd is Cmd.READ or cmd is Cmd.WRITE:
        return req.length + REQUEST_OVERHEAD
    if cmd is Cmd.BLOCK_STATUS:
        return BLOCK_STATUS_COST
    return REQUEST_OVERHEAD


def _write_like(b: Layer, req: Request) -> Awaitable[None] | None:
    """Carry out a WRITE, FLUSH, WRITE_ZEROES or TRIM on ``b``: None when done, else an
    awaitable that completes when it is (FUA: durable)."""
    fua = bool(req.flags & _FUA)
    cmd = req.command
    if cmd is Cmd.WRITE:
        return b.pwrite(req.offset, req.data, fua)
    if cmd is Cmd.FLUSH:
        return b.flush()
    if cmd is Cmd.WRITE_ZEROES:
        return b.zero(req.offset, req.length, bool(req.flags & _NO_HOLE), fua)
    return b.trim(req.offset, req.length, fua)

async def _all_done(waits: list[Awaitable[None]], flush: Callable[[], Awaitable[None] | None]
                    | None) -> None:
    """Wait for every piece of a streamed WRITE (the first error is raised), then, for FUA,
    for ``flush()`` (every completed write durable)."""
    await asyncio.gather(*waits)
    if flush is not None and (pending := flush()) is not None:
        await pending


@dataclass
class _WriteStream:
    """A streamed WRITE on its way in: the pieces' writes still running, the first error."""

    request: Request
    cost: int
    start: float
    waits: list[Awaitable[None]] = field(default_factory=list)
    error: Exception | None = None


DEFAULT_PORT = 10809
#: Seconds between looks at the transports' buffers while requests wait for reply budget.
WAITER_POLL = 0.1


@dataclass
class ServeConfig:
    """Settings of ``icbd-cache serve`` (see docs/serve.md). Times are seconds."""

    exports: list[ExportSpec]
    listen: list[tuple[str, int]] = field(default_factory=list)
    unix: str | None = None
    default_export: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_required: bool = False
    tls_ca: str | None = None
    tls_verify_peer: bool = False
    tls_identity: str = "address"
    max_connections: int = 512
    address_connections: int = 64
    address_handshakes: int = 16
    reserved_connections: int = 64
    handshake_timeout: float = 10.0
    handshake_total: float = 300.0
    idle_timeout: float = 0.0
    send_timeout: float = 60.0
    reply_budget: int = 512 << 20
    connection_reply_budget: int = 64 << 20
    address_reply_budget: int = 128 << 20
    grace: float = 10.0
    cow_dir: str | None = None
    cow_linger: float = 120.0
    cow_max: int | None = None
    debug_requests: bool = False
    trace: str | None = None
    workers: int = 1
    store: str | None = None
    create_store: bool = False
    store_cow: bool = False
    store_size: int | None = None
    hot_bytes: int = 1 << 30
    fault_timeout: float = 10.0
    source_timeout: float = 5.0
    readahead: int = 8
    #: ``--busy-poll``: µs the event loop polls on after a client's request (0: off).
    busy_poll_us: int = DEFAULT_WINDOW_US
    handover: str | None = None
    allow: list[str] = field(default_factory=list)
    metrics_listen: tuple[str, int] | None = None
    #: Set by the parent of ``--workers N`` for each worker: its index, and with
    #: ``metrics_listen`` the directory of the workers' metrics sockets
    #: (:mod:`icbdcache.metricsmerge`).
    worker: int = 0
    metrics_dir: str | None = None
    #: Why ``workers`` is what it is when ``--workers`` was not given (logged at the start).
    workers_why: str = ""
    #: With workers: the connection counters they share (:mod:`icbdcache.sharedlimits`),
    #: and the step at which a successor's workers take over together
    #: (:mod:`icbdcache.startbarrier`).
    shared_counts: Any = None
    start_barrier: Any = None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``. Raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in --listen {text!r}")
    return host or "0.0.0.0", int(port)


def tls_context(cert: str, key: str, ca: str | None = None,
                verify_peer: bool = False) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from PEM files; client certificates are
    checked against ``ca`` alone (:func:`icbdcache.tlspeer.server_context`). Raises
    OSError/SSLError, ValueError for ``verify_peer`` without ``ca``."""
    return tlspeer.server_context(cert, key, ca, verify_peer)


def _identity(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(client identity, printable peer) of a connection: the peer's IP address, or for a
    Unix socket the peer process (SO_PEERCRED)."""
    return _identity_of(transport.get_extra_info("peername"),
                        transport.get_extra_info("socket"))


def _identity_of(peer: object, sock: Any) -> tuple[str, str]:
    """:func:`_identity` from the peer address and the socket."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), f"{peer[0]}:{peer[1]}"
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", raw)
            return f"unix:pid={pid}", f"unix:pid={pid},uid={uid}"
        except OSError:
            pass
    return "unknown", str(peer)


class RequestTrace:
    """``--trace FILE``: one CSV line per request, ``t_ms,conn,op,offset,count,lat_us`` (the
    boot-trace format ``icbd-bench bootstorm`` replays). ``t_ms`` counts from the first request;
    ``lat_us`` is the time from the request to its reply being queued."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - lives as long as the server
        self.f.write("# t_ms,conn,op,offset,count,lat_us\n")
        self.t0: float | None = None
        self._sized = False

    def opened(self, conn: int, export: str, size: int) -> None:
        """Connection ``conn`` opened ``export`` of ``size`` bytes: ``# export_size=`` (the
        header ``icbd-bench bootstorm`` reads) and a ``# conn=`` comment line."""
        if not self._sized:
            self._sized = True
            self.f.write(f"# export_size={size}\n")
        self.f.write(f"# conn={conn} export={export}\n")

    def answered(self, conn: int, req: Request, start: float) -> None:
        """``req`` of connection ``conn``, received at ``start`` (monotonic s), is answered."""
        if self.t0 is None:
            self.t0 = start
        lat = int((time.monotonic() - start) * 1e6)
        self.f.write(f"{(start - self.t0) * 1000:.3f},{conn},{req.command.name.title()},"
                     f"{req.offset},{req.length},{lat}\n")

    def close(self) -> None:
        self.f.close()


class NBDProtocol(asyncio.Protocol):
    """One client connection (``sm``: a connection in transmission carried on from another
    process, see :meth:`Server.adopt`).

    Requests are started as long as the reply budget (:class:`icbdcache.limits.ReplyBudget`)
    has room; one that does not fit waits in :attr:`queue` with everything the client sent
    after it, and the socket is not read until the queue is empty. A request counts from when
    it starts until its reply has left the process: ``_reserved`` (started, reply not handed
    to the transport yet) and ``_flushed`` (handed to the transport, not known to be sent;
    known when the transport's buffer empties, which its write limits of 0 make it report)."""

    def __init__(self, server: Server, sm: ServerConnection | None = None) -> None:
        self.server = server
        self.id = next(server.ids)
        self.transport: asyncio.Transport | None = None
        self.sm = sm or ServerConnection(
            server.catalog.for_peer(lambda: self.identity, self._export_refused,
                                    identity=lambda: self.owner, names=lambda: self.cert_names),
            tls=server.ssl is not None,
            tls_required=server.config.tls_required)
        self.backend: Layer | None = None
        self.export: Export | None = None
        self.client: Client | None = None
        #: The export name as the client sent it, and the options after ``?``.
        self.requested = ""
        self.options: dict[str, str] = {}
        self.handing_over = False
        self.identity = "unknown"
        self.peer = "?"
        #: The identity overlays belong to: the address (:attr:`identity`), or with
        #: ``--tls-identity subject`` the subject of a verified client certificate.
        self.owner = "unknown"
        #: Names of the client's verified TLS certificate (subject CN, subjectAltName).
        self.cert_names: frozenset[str] = frozenset()
        self.inflight = 0
        self.requests = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.tls = False
        self.closing = False
        self.draining = False
        self.disc_pending = False
        self.reason = "client closed"
        self._timer: asyncio.TimerHandle | None = None
        self.debug = server.config.debug_requests
        self.tracer = server.tracer
        self._busy = server.busy
        #: Parsed events (requests first of all) waiting for room in the reply budget.
        self.queue: deque[object] = deque()
        #: The streamed WRITE whose payload is arriving (:class:`nbd.events.WritePiece`).
        self.wstream: _WriteStream | None = None
        self._reserved = 0
        self._answered = 0
        self._flushed = 0
        self._counted = False
        self._handshaking = False
        now = time.monotonic()
        #: Monotonic seconds: connected, last option answered (handshake), last request
        #: received or answered (transmission).
        self.started = now
        self.progress = now
        self.active = now
        #: Bytes of replies handed to the transport in all, and what had left of them at the
        #: last look of the watchdog (a client that reads nothing is seen by these).
        self._sent = 0
        self._seen_left = -1
        self._still_since = now

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.identity, self.peer = _identity(transport)
        if not self.tls:
            self.owner = self.identity
        srv = self.server
        if self.backend is None:  # a new client
            tcp = isinstance(transport.get_extra_info("peername"), tuple)
            if tcp and not srv.allow.allows(self.identity):
                srv.refuse(self, "not in --allow",
                           f"{self.identity} is not in --allow {srv.allow}")
                self.closing = True
                self.transport.abort()
                return
            why = "shutting down" if srv.stopping else srv.limits.admit(self.identity)
            if why is not None:
                srv.refuse(self, why, why)
                self.closing = True
                self.transport.abort()
                return
            self._handshaking = True
        else:  # carried on from another process (:meth:`Server.adopt`)
            srv.limits.adopt(self.identity)
        self._counted = True
        srv.connections.add(self)
        # 0: pause_writing as soon as anything waits in the buffer, resume_writing when it is
        # empty; the reply budget learns from that when replies have left
        self.transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        if self.backend is None:
            self._arm(min(srv.config.handshake_timeout, srv.config.handshake_total))
        else:
            self._arm(self._watch_interval(time.monotonic()))
        self._flush()

    def _export_refused(self, name: str, why: str) -> None:
        reason = "export tls-name" if "tls-name=" in why else "export allow"
        self.server.refuse(self, reason, why, export=name)

    @property
    def export_name(self) -> str | None:
        """The export this connection is attached to (None while negotiating)."""
        return self.export.name if self.export is not None else None

    def _arm(self, delay: float | None) -> None:
        """(Re)start the connection's one timer: the handshake's, or in transmission the
        watchdog (idle, replies not read)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None and self.transport is not None and not self.closing:
            self._timer = asyncio.get_running_loop().call_later(max(0.01, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.transport is None or self.closing:
            return
        if self.backend is None:
            self._handshake_tick()
        else:
            self._watchdog()

    def _handshake_tick(self) -> None:
        cfg = self.server.config
        now = time.monotonic()
        idle_end = self.progress + cfg.handshake_timeout
        total_end = self.started + cfg.handshake_total
        if now < idle_end and now < total_end:
            self._arm(min(idle_end, total_end) - now)
            return
        self.reason = ("handshake timeout" if now >= idle_end
                       else f"handshake not done in {cfg.handshake_total:g} s")
        self._drop(self.reason, "handshake timeout")

    def _watch_interval(self, now: float) -> float | None:
        """Seconds to the watchdog's next look (None: nothing to watch)."""
        cfg = self.server.config
        waits: list[float] = []
        if cfg.idle_timeout > 0:
            waits.append(max(0.0, self.active + cfg.idle_timeout - now))
        if cfg.send_timeout > 0:
            waits.append(cfg.send_timeout / 4)
        return min(waits) if waits else None

    def _watchdog(self) -> None:
        """Close a connection idle for ``idle_timeout`` (no request in flight or waiting,
        nothing unsent, no copy-on-write overlay), or whose client has not taken a byte of
        its replies for ``send_timeout`` seconds."""
        t = self.transport
        if t is None or t.is_closing():
            return
        cfg = self.server.config
        now = time.monotonic()
        unsent = t.get_write_buffer_size()
        left = self._sent - unsent
        if unsent == 0 or left != self._seen_left:
            self._still_since = now
        self._seen_left = left
        if cfg.send_timeout > 0 and unsent and now - self._still_since >= cfg.send_timeout:
            self._drop(f"replies not read for {cfg.send_timeout:g} s", "replies not read")
            return
        writable = self.export is not None and self.export.writable
        if (cfg.idle_timeout > 0 and not writable and not self.inflight and not self.queue
                and not unsent and now - self.active >= cfg.idle_timeout):
            self.reason = f"idle {cfg.idle_timeout:g} s"
            self.server.closes.info(kv(event="closed", conn=self.id, peer=self.peer,
                                       closed=self.reason), "idle")
            self._close()
            return
        self._arm(self._watch_interval(now))

    def _drop(self, reason: str, kind: str) -> None:
        """Reset the connection because of the client, logged (throttled) under ``kind``.
        A reset, not a FIN: the kernel would otherwise keep trying to send what the client
        does not read, and the client would not learn that the server gave up."""
        self.reason = reason
        self.server.closes.info(kv(event="closed", conn=self.id, peer=self.peer,
                                   closed=reason), kind)
        self.closing = True
        if self.transport is not None:
            reset(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        srv = self.server
        srv.connections.discard(self)
        if self._counted:
            self._counted = False
            srv.limits.release(self.identity, self._handshaking)
        self.queue.clear()
        srv.budget.done_waiting(self)
        held = self._reserved + self._flushed
        self._reserved = self._answered = self._flushed = 0
        srv.budget.release(self.identity, held)
        if self.export is not None:
            t = srv.closed_totals.setdefault(self.export.name, [0, 0, 0])
            t[0] += self.requests
            t[1] += self.read_bytes
            t[2] += self.write_bytes
            self.requests = self.read_bytes = self.write_bytes = 0
        if self.export is not None and self.backend is not None and self.client is not None:
            self.export.disconnect(replace(self.client, now=time.monotonic()), self.backend)
            log.debug(kv(event="closed", conn=self.id, peer=self.peer, closed=self.reason,
                         requests=self.requests, error=exc or ""))
        self.backend = None

    def pause_writing(self) -> None:
        # Replies wait in the transport's buffer: the reply budget holds them until
        # resume_writing says they left.
        pass

    def resume_writing(self) -> None:
        # The transport's buffer is empty (low-water mark 0): every reply handed to it left.
        if self._flushed:
            n, self._flushed = self._flushed, 0
            self.server.budget.release(self.identity, n)

    def _flush(self) -> None:
        out = self.sm.data_to_send()
        t = self.transport
        if t is not None and t.is_closing():
            t = None
        if out and t is not None:
            t.writelines(out)
        n = self._answered
        if n:
            self._answered = 0
            self._reserved -= n
            self._sent += n
            if t is None:
                self.server.budget.release(self.identity, n)
                return
            # what the transport could not send at once is still held
            held = self._flushed + n
            unsent = t.get_write_buffer_size()
            if unsent < held:
                self._flushed = unsent
                self.server.budget.release(self.identity, held - unsent)
            else:
                self._flushed = held

    # ------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self._busy is not None and self.backend is not None:
            # requests only: a peer still negotiating (before TLS, before the export
            # decided it may connect) must not make the process poll
            self._busy.kick()
        try:
            events = self.sm.receive_data(data)
        except RemoteProtocolError as e:
            self.reason = f"protocol error: {e}"
            self.server.closes.info(kv(event="closed", conn=self.id, peer=self.peer,
                                       closed=self.reason), "protocol error")
            self._flush()
            self._close()
            return
        if self.backend is None:
            if self.sm.has_output():  # an option answered: the handshake moves on
                self.progress = time.monotonic()
        elif events:
            self.active = time.monotonic()
        if self.queue:  # requests wait already: these wait behind them
            self.queue.extend(events)
        else:
            self._run(events)
        self._flush()

    def _run(self, events: Iterable[object]) -> None:
        """Carry out ``events`` in order until a request does not fit in the reply budget;
        it and the rest wait in :attr:`queue`, and the socket is not read meanwhile."""
        if type(events) is list and events and self._run_reads(events):
            return
        handle = self._request
        take = self.server.budget.take
        it = iter(events)
        for ev in it:
            if type(ev) is Request:
                cost = ev.length + REQUEST_OVERHEAD if ev.command is _READ else _cost(ev)
                if take(self._reserved + self._flushed, self.identity, cost):
                    self._reserved += cost  # (:meth:`_take`'s first try, inline)
                elif not self._take(cost):
                    self.queue.append(ev)
                    self.queue.extend(it)
                    self._wait_for_room()
                    return
                handle(ev, cost)
            else:
                self._event(ev)
            if self.closing:
                return

    def _run_reads(self, events: list[object]) -> bool:
        """:meth:`_run` of the usual batch, READs only, when it fits in the reply budget as a
        whole: charged at once, as each would be one after another (every bound is on a sum;
        the batch is kept within one connection's and one address's bound, which a lone
        request may exceed). False, and nothing done, otherwise. (One budget call per batch,
        not per request: a profile of 64 KiB reads put the per-request accounting at most
        of the Python a request costs beyond the build before the layers.)"""
        total = 0
        for ev in events:
            if type(ev) is not Request or ev.command is not _READ:
                return False
            total += ev.length + REQUEST_OVERHEAD
        budget = self.server.budget
        used = self._reserved + self._flushed
        if (used + total > budget.per_connection or total > budget.per_address
                or not budget.take(used, self.identity, total)):
            return False
        self._reserved += total
        handle = self._request
        for req in cast(list[Request], events):
            cost = req.length + REQUEST_OVERHEAD
            total -= cost
            handle(req, cost)
            if self.closing:
                if total:  # not started: given back
                    self._reserved -= total
                    budget.release(self.identity, total)
                return True
        return True

    def _run_queue(self) -> None:
        """:meth:`_run` on what waits in :attr:`queue`, in order, as far as the budget goes."""
        q = self.queue
        while q and not self.closing:
            ev = q[0]
            if type(ev) is Request:
                cost = ev.length + REQUEST_OVERHEAD if ev.command is _READ else _cost(ev)
                if not self._take(cost):
                    return
                q.popleft()
                self._request(ev, cost)
            else:
                q.popleft()
                self._event(ev)

    def _take(self, cost: int) -> bool:
        """Charge a request of ``cost`` bytes to the reply budget if it fits."""
        budget = self.server.budget
        if not budget.take(self._reserved + self._flushed, self.identity, cost):
            if not self._flushed:
                return False
            self.refresh_held()  # look again at what is really unsent
            if not budget.take(self._reserved + self._flushed, self.identity, cost):
                return False
        self._reserved += cost
        return True

    def refresh_held(self) -> None:
        """Release what the transport has sent of the replies handed to it."""
        t = self.transport
        if t is None or not self._flushed:
            return
        unsent = t.get_write_buffer_size()
        if unsent < self._flushed:
            n, self._flushed = self._flushed - unsent, unsent
            self.server.budget.release(self.identity, n)

    def _wait_for_room(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.server.budget.wait(self)
        self.server.watch_waiters()

    def budget_freed(self) -> None:
        """Room in the reply budget: start what waits, and read again once nothing does."""
        if self.closing or self.transport is None:
            self.server.budget.done_waiting(self)
            return
        self._run_queue()
        self._flush()
        if not self.queue:
            self.server.budget.done_waiting(self)
            self._read_again()
            self._close_if_finished()

    def _read_again(self) -> None:
        t = self.transport
        if (t is not None and not t.is_closing() and not self.closing and not self.queue
                and not self.draining and not self.handing_over and not self.disc_pending):
            t.resume_reading()

    def eof_received(self) -> bool | None:
        self.sm.receive_data(b"")
        if self.wstream is not None:  # its payload will never come: nobody to answer
            self.wstream = None
            self.inflight -= 1
        if self.inflight or self.queue:
            # The client half-closed with requests still waiting: keep our side open until
            # their replies are out (closed in _done).
            self.disc_pending = True
            return True
        return None

    def _event(self, ev: object) -> None:
        if type(ev) is WritePiece:
            self._write_piece(ev)
        elif isinstance(ev, TransmissionStarted):
            self._start(ev)
        elif isinstance(ev, RequestRejected):
            if self.debug:
                reqlog.debug(kv(conn=self.id, cookie=ev.cookie, cmd=ev.command,
                                error=ev.error.name, reason=ev.reason))
        elif isinstance(ev, Disconnect):
            self.reason = "disconnect" if ev.clean else "client closed"
            self._flush()
            if self.inflight and self.transport is not None:
                # NBD proto.md, NBD_CMD_DISC: the server MUST handle all outstanding requests
                # before closing. Read no more; close when the last reply has been queued.
                self.disc_pending = True
                self.transport.pause_reading()
            else:
                self._close()
        elif isinstance(ev, StartTLS):
            self._flush()
            asyncio.get_running_loop().create_task(self._start_tls())
        elif isinstance(ev, OptionHaggled) and ev.reply == Rep.ERR_UNKNOWN:
            self.server.unknown_exports.warning(kv(
                event="unknown_export", conn=self.id, peer=self.peer, why=ev.detail))
        elif self.debug:
            reqlog.debug(kv(conn=self.id, event=ev))

    def _close(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.ssl is not None
        loop = asyncio.get_running_loop()
        try:
            tr = await loop.start_tls(self.transport, self, self.server.ssl, server_side=True,
                                      ssl_handshake_timeout=self.server.config.handshake_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            self.reason = f"TLS handshake failed: {e}"
            self.server.closes.info(kv(event="closed", conn=self.id, peer=self.peer,
                                       closed=self.reason), "TLS handshake failed")
            if self.transport is not None:
                self.transport.abort()
            return
        if tr is None:
            return
        self.transport = tr
        tr.set_write_buffer_limits(high=0)
        self.tls = True
        self._learn_certificate(tr.get_extra_info("peercert"))
        self.sm.tls_started()

    def _learn_certificate(self, cert: tlspeer.PeerCert | None) -> None:
        """The client's verified certificate (None or empty: none): its names, and under
        ``--tls-identity subject`` the identity its overlays belong to."""
        self.cert_names = tlspeer.peer_names(cert)
        subject = tlspeer.subject_text(cert)
        if subject and self.server.config.tls_identity == "subject":
            self.owner = f"cert:{subject}"
        if subject:
            log.debug(kv(event="tls_client", conn=self.id, peer=self.peer, subject=subject))

    def _start(self, ev: TransmissionStarted) -> None:
        resolved = ev.export.handle
        if not isinstance(resolved, Resolved):  # the catalog answered the GO: always ours
            self._close()
            return
        export = resolved.export
        client = Client(self.owner, resolved.options, time.monotonic())
        try:
            self.backend = export.connect(client)
        except OSError as e:
            log.error(kv(event="connect_failed", conn=self.id, peer=self.peer, export=export.name,
                         error=e))
            self._close()
            return
        if self._handshaking:
            self._handshaking = False
            self.server.limits.negotiated(self.identity)
        self.export = export
        self.client = client
        self.requested = ev.requested
        self.options = dict(resolved.options)
        if export.writable:
            self.server.writable_clients += 1
        if self.tracer is not None:
            self.tracer.opened(self.id, export.name, export.size)
        self.active = time.monotonic()
        self._arm(self._watch_interval(self.active))
        log.info(kv(
            event="connect", conn=self.id, peer=self.peer,
            export=ev.requested or f"(default) {export.name}",
            size=ev.export.size, opt=ev.option.name,
            structured="yes" if ev.structured_replies else "no",
            meta=",".join(ev.meta_contexts) or "-", tls="yes" if self.tls else "no",
            mode="cow" if export.writable else "ro",
            **({"client": self.owner} if self.owner != self.identity else {}),
        ))

    # ------------------------------------------------------------ requests

    def _request(self, req: Request, cost: int) -> None:
        b = self.backend
        sm = self.sm
        self.requests += 1
        if self.debug:
            reqlog.debug(kv(conn=self.id, cookie=req.cookie, cmd=req.command.name,
                            flags=int(req.flags), offset=req.offset, length=req.length))
        start = time.monotonic() if self.tracer is not None else 0.0
        self._answered += cost  # undone below when the reply must wait
        if b is None:
            sm.reply_error(req, Errno.EIO, "no export")
            return
        cmd = req.command
        try:
            if cmd is Cmd.READ:
                self.read_bytes += req.length
                result = b.pread(req.offset, req.length)
                if type(result) is list:
                    sm.reply_read(req, result)
                else:
                    self._answered -= cost
                    self._wait(req, cast(Awaitable[list[Buffer]], result), start, cost)
                    return
            elif cmd is Cmd.BLOCK_STATUS:
                sm.reply_block_status(req, b.extents(req.offset, req.length))
            elif cmd is Cmd.CACHE:
                b.cache(req.offset, req.length)
                sm.reply_ok(req)
            elif req.streamed:  # its payload follows as WritePiece events
                self._answered -= cost
                self.inflight += 1
                self.wstream = _WriteStream(req, cost, start)
                return
            elif cmd in _WRITE_LIKE:
                if cmd is Cmd.WRITE:
                    self.write_bytes += req.length
                pending = _write_like(b, req)
                if pending is not None:
                    self._answered -= cost
                    self._wait(req, pending, start, cost)
                    return
                sm.reply_ok(req)
            else:
                sm.reply_error(req, Errno.EINVAL, f"{cmd.name} is not supported")
        except OSError as e:
            err = Errno.from_os(e.errno or 0)
            self.server.errors.warning(kv(event="request_error", conn=self.id, cmd=cmd.name,
                                          offset=req.offset, length=req.length, error=e,
                                          reply=err.name), "request error")
            sm.reply_error(req, err, str(e))
        except Exception:
            log.exception(kv(event="request_error", conn=self.id, cmd=cmd.name, offset=req.offset,
                             length=req.length))
            sm.reply_error(req, Errno.EIO, "internal error")
        if self.tracer is not None:
            self.tracer.answered(self.id, req, start)

    def _write_piece(self, ev: WritePiece) -> None:
        """Write one piece of a streamed WRITE; after the last, answer it (once every piece's
        write has completed, and for FUA once it is durable). After an error the rest of the
        payload is read and dropped, and the reply carries the error (the range's contents are
        unspecified then, as after any failed WRITE)."""
        st = self.wstream
        if st is None or st.request is not ev.request:
            return  # the connection lost its backend meanwhile
        b = self.backend
        self.write_bytes += len(ev.data)
        if st.error is None:
            try:
                if b is None:
                    raise OSError(errno.EIO, "no export")
                pending = b.pwrite(ev.offset, ev.data, False)
                if pending is not None:
                    st.waits.append(pending)
            except Exception as e:
                st.error = e
        if not ev.last:
            return
        self.wstream = None
        self.inflight -= 1
        req = st.request
        if st.error is None and (st.waits or req.flags & _FUA):
            flush = b.flush if b is not None and req.flags & _FUA else None
            self._wait(req, _all_done(st.waits, flush), st.start, st.cost)
            return
        self._answered += st.cost
        if st.error is None:
            self.sm.reply_ok(req)
        else:
            for w in st.waits:  # they still run; their outcome no longer matters
                asyncio.ensure_future(w).add_done_callback(_retrieve)
            exc = st.error
            err = Errno.from_os(exc.errno or 0) if isinstance(exc, OSError) else Errno.EIO
            self.server.errors.warning(kv(event="request_error", conn=self.id, cmd="WRITE",
                                          offset=req.offset, length=req.length, error=exc,
                                          reply=err.name), "request error")
            self.sm.reply_error(req, err, str(exc))
        if self.tracer is not None:
            self.tracer.answered(self.id, req, st.start)
        self._close_if_finished()

    def _wait(self, req: Request, result: Awaitable[list[Buffer]] | Awaitable[None],
              start: float, cost: int) -> None:
        """Answer ``req`` when ``result`` completes (a READ's buffers, or a write's None)."""
        self.inflight += 1
        fut: asyncio.Future[list[Buffer] | None] = asyncio.ensure_future(result)
        fut.add_done_callback(partial(self._done, req, start, cost))

    def _done(self, req: Request, start: float, cost: int,
              fut: asyncio.Future[list[Buffer] | None]) -> None:
        self.inflight -= 1
        if self.tracer is not None:
            self.tracer.answered(self.id, req, start)
        if self.transport is None or self.transport.is_closing():
            if not fut.cancelled():
                fut.exception()  # retrieved: the client is gone, nobody to answer
            return
        self.active = time.monotonic()
        self._answered += cost
        exc = fut.exception()
        if exc is None:
            buffers = fut.result()
            if buffers is None:
                self.sm.reply_ok(req)
            else:
                self.sm.reply_read(req, buffers)
        else:
            err = Errno.from_os(exc.errno or 0) if isinstance(exc, OSError) else Errno.EIO
            self.server.errors.warning(kv(event="request_error", conn=self.id,
                                          cmd=req.command.name, offset=req.offset,
                                          length=req.length, error=exc, reply=err.name),
                                       "request error")
            self.sm.reply_error(req, err, str(exc))
        self._flush()
        self._close_if_finished()

    def _close_if_finished(self) -> None:
        """After NBD_CMD_DISC or EOF: close once every request has been answered."""
        if self.disc_pending and not self.inflight and not self.queue:
            self._close()

    # ------------------------------------------------------------ hand-over

    async def quiesce(self, deadline: float) -> handover.Outgoing | None:
        """Stop reading and wait (until ``deadline``, monotonic s) until every reply is
        written; then what the successor needs to carry the connection on. None when it
        cannot cross (still negotiating, TLS, not idle in time): it is closed then."""
        t = self.transport
        if t is None or t.is_closing() or self.closing:
            return None
        self.handing_over = True
        t.pause_reading()
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        why = ("still negotiating" if self.backend is None or self.export is None
               else "TLS cannot cross" if self.tls
               else "replies still pending" if self.busy else "")
        sock = t.get_extra_info("socket")
        if not why and sock is None:
            why = "no socket"
        if not why:
            try:
                st = self.sm.transmission_state()
            except LocalProtocolError as e:
                why = str(e)
        if why:
            self.reason = f"server hand-over: {why}"
            log.info(kv(event="closed", conn=self.id, peer=self.peer, closed=self.reason))
            if self.busy:
                t.abort()
            else:
                t.close()
            return None
        assert self.export is not None
        state: dict[str, Any] = {
            "conn": self.id, "peer": self.peer, "export": self.export.name,
            "requested": self.requested, "options": self.options, "size": st.size,
            "flags": st.flags, "structured": st.structured,
            "meta_contexts": list(st.meta_contexts), "no_zeroes": st.no_zeroes,
            "requests": self.requests,
            # what identifies the export's bytes: a successor whose export of that name has
            # other bytes (a version replaced since this connection opened it) refuses it
            "identity": self.export.identity,
            # the successor's idle clock goes on from here (its own --idle-timeout applies)
            "idle_s": round(max(0.0, time.monotonic() - self.active), 3),
        }
        return handover.Outgoing(state, sock.fileno(), st.pending)

    def handed_over(self) -> None:
        """The socket now belongs to the successor: let go of it without a word."""
        self.reason = "handed over"
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def resume_after_rollback(self) -> None:
        self.handing_over = False
        self._read_again()

    # ------------------------------------------------------------ shutdown

    def drain(self) -> None:
        """Stop reading requests; connections still in the handshake close now."""
        self.draining = True
        if self.transport is None:
            return
        if self.backend is None:
            self.reason = "server shutdown"
            self.transport.abort()
        else:
            self.transport.pause_reading()

    @property
    def busy(self) -> bool:
        """Requests in flight or waiting, or replies not sent yet."""
        t = self.transport
        return self.inflight > 0 or bool(self.queue) or (
            t is not None and not t.is_closing() and t.get_write_buffer_size() > 0)


class Server:
    """The listening sockets, the exports and the live connections of one process."""

    def __init__(self, config: ServeConfig, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.ssl = (tls_context(config.tls_cert, config.tls_key, config.tls_ca,
                                config.tls_verify_peer)
                    if config.tls_cert and config.tls_key else None)
        self.connections: set[NBDProtocol] = set()
        self.ids = itertools.count(1)
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False
        self._stop = asyncio.Event()
        self._janitor: asyncio.Task[None] | None = None
        self._waiter_poll: asyncio.TimerHandle | None = None
        self.node: Node | None = None
        self.tracer = RequestTrace(config.trace) if config.trace else None
        #: Log streams a client can fill at will, one line a second per reason.
        self.errors = Throttled(log)
        #: Refusals (logged at most once a second per reason) and their counts by reason.
        self.refusals = Throttled(log, 1.0, logging.INFO)
        self.refused: dict[str, int] = {}
        self.closes = Throttled(log, 1.0, logging.INFO)
        self.unknown_exports = Throttled(log, 1.0, logging.INFO)
        #: ``--allow`` (exports may narrow it with their own ``allow=`` lists).
        self.allow = AllowList(config.allow)
        if config.shared_counts is not None:
            from icbdcache.sharedlimits import SharedConnectionLimits

            self.limits: ConnectionLimits = SharedConnectionLimits(
                config.shared_counts, config.worker, config.max_connections,
                config.address_connections, config.address_handshakes,
                config.reserved_connections)
        else:
            self.limits = ConnectionLimits(config.max_connections, config.address_connections,
                                           config.address_handshakes,
                                           config.reserved_connections)
        self.budget = ReplyBudget(config.reply_budget, config.connection_reply_budget,
                                  config.address_reply_budget)
        #: Per export: [requests, read bytes, write bytes] of connections closed.
        self.closed_totals: dict[str, list[int]] = {}
        #: Connections ever attached to a writable export (their overlays live here).
        self.writable_clients = 0
        #: Set once a successor took everything over (``--handover``).
        self.handed_over = False
        self.handover_listener: handover.Listener | None = None
        self.successor: subprocess.Popen[bytes] | None = None
        self.started = time.monotonic()
        #: ``--metrics-listen``'s server (closed at shutdown), if any.
        self.metrics: Any = None
        #: ``--busy-poll``: the loop polls on after each client read (None: off).
        self.busy = (BusyPoll(asyncio.get_running_loop(), config.busy_poll_us / 1e6)
                     if config.busy_poll_us > 0 else None)

    @property
    def busy_poll_seconds(self) -> float:
        """Seconds spent busy polling (``--busy-poll``), the period under way included; 0
        when off."""
        return self.busy.polled() if self.busy is not None else 0.0

    async def start(self, *, unix_sock: socket.socket | None = None,
                    reuse_port: bool = False, sockets: Sequence[socket.socket] = ()) -> None:
        """Open every listening socket, or accept on ``sockets`` (passed by systemd or a
        predecessor) instead. Raises OSError (address in use, ...)."""
        loop = asyncio.get_running_loop()
        if sockets:
            for sock in sockets:
                await self._serve_on(sock)
            self._janitor = loop.create_task(self._expire_overlays())
            return
        # the Unix socket first: once a TCP port answers, every listener is up
        if unix_sock is not None or self.config.unix:
            if unix_sock is None:
                path = cast(str, self.config.unix)
                with contextlib.suppress(FileNotFoundError):
                    if os.path.exists(path) and not _is_socket(path):
                        raise OSError(f"{path} exists and is not a socket")
                    os.unlink(path)
                srv = await loop.create_unix_server(lambda: NBDProtocol(self), path, backlog=1024)
            else:
                srv = await loop.create_unix_server(lambda: NBDProtocol(self), sock=unix_sock)
            self.servers.append(srv)
            log.info(kv(listening=f"unix:{self.config.unix}"))
        for host, port in self.config.listen:
            try:
                srv = await loop.create_server(
                    lambda: NBDProtocol(self), host, port, reuse_address=True,
                    reuse_port=reuse_port or None, backlog=1024,
                )
            except OSError as e:
                raise _listen_error(host, port, e) from None
            self.servers.append(srv)
            for s in srv.sockets:
                log.info(kv(listening=_fmt_addr(s.getsockname()), tls=(
                    "required" if self.config.tls_required else "offered" if self.ssl else "no"
                )))
        self._janitor = loop.create_task(self._expire_overlays())

    async def _serve_on(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        srv: asyncio.AbstractServer
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: NBDProtocol(self), sock=sock,
                                                backlog=1024)
        else:
            srv = await loop.create_server(lambda: NBDProtocol(self), sock=sock, backlog=1024)
        self.servers.append(srv)
        log.info(kv(listening=_fmt_addr(sock.getsockname()) if sock.family != socket.AF_UNIX
                    else f"unix:{sock.getsockname()}", passed="yes"))

    async def _expire_overlays(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(30.0, self.config.cow_linger / 2)))
            dropped = self.catalog.expire(time.monotonic())
            if dropped:
                log.debug(kv(overlays_expired=dropped))

    def watch_waiters(self) -> None:
        """Requests wait for room in the reply budget: look every :data:`WAITER_POLL` seconds
        at what transports have sent (a buffer that drained without telling) while any do."""
        if self._waiter_poll is None:
            self._waiter_poll = asyncio.get_running_loop().call_later(WAITER_POLL,
                                                                      self._poll_waiters)

    def _poll_waiters(self) -> None:
        self._waiter_poll = None
        if not self.budget.waiting:
            return
        for c in list(self.connections):
            c.refresh_held()
        self.budget.wake()
        self.watch_waiters()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to shut down (signal handlers call this)."""
        self._stop.set()

    def refuse(self, conn: NBDProtocol, reason: str, why: str, **fields: object) -> None:
        """Count and log (at most once a second, with how many were held back) a refused
        connection or export."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.refusals.warning(kv(event="refused", conn=conn.id, peer=conn.peer, reason=reason,
                                 why=why, **fields), reason)

    def set_allow(self, cidrs: Sequence[str]) -> None:
        """Replace ``--allow`` (SIGHUP): new connections are checked against ``cidrs``;
        connected clients stay."""
        self.allow = AllowList(cidrs)

    def connection_views(self) -> list[NBDProtocol]:
        """The live connections (for the metrics)."""
        return list(self.connections)

    # ------------------------------------------------------------ hand-over: giving

    def start_handover(self) -> None:
        """Listen at ``--handover PATH`` for a successor. Raises OSError."""
        if self.config.handover:
            path = handover.worker_path(self.config.handover, self.config.worker,
                                        self.config.workers)
            self.handover_listener = handover.Listener(path, self, self.config.grace,
                                                       self.config.workers)
            self.handover_listener.start()
            log.info(kv(handover_socket=path))

    def spawn_successor(self) -> None:
        """SIGUSR2: start this program again (the code on disk now) to take over."""
        if not self.config.handover:
            log.warning(kv(signal="SIGUSR2", ignored="no --handover socket to hand over on"))
            return
        if self.config.workers > 1:
            log.warning(kv(signal="SIGUSR2", ignored="a worker: send it to the parent, "
                                                     f"pid {os.getppid()}"))
            return
        if self.successor is not None and self.successor.poll() is None:
            log.warning(kv(signal="SIGUSR2", ignored=f"successor {self.successor.pid} runs"))
            return
        try:
            self.successor = handover.spawn_successor()
        except OSError as e:
            log.error(kv(signal="SIGUSR2", successor="not started", error=e))
            return
        log.info(kv(signal="SIGUSR2", successor=self.successor.pid))

    def refusal(self) -> str | None:
        if self.stopping:
            return "this server is shutting down"
        if self.writable_clients:
            return (f"{self.writable_clients} connection(s) used copy-on-write overlays, which "
                    "a hand-over does not carry (a restart does: they are kept in --cow-dir)")
        return None

    def stop_accepting(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for srv in self.servers:
            for s in cast(asyncio.Server, srv).sockets:
                name = s.getsockname()
                addr = f"unix:{name}" if s.family == socket.AF_UNIX else _fmt_addr(name)
                out.append((addr, os.dup(s.fileno())))
            srv.close()
        self.servers = []
        return out

    async def resume_accepting(self, listeners: list[tuple[str, int]]) -> None:
        for _, fd in listeners:
            await self._serve_on(socket.socket(fileno=fd))

    async def stop_services(self) -> None:
        # No connection ever used an overlay (refusal): --cow-dir goes to the successor.
        if self.catalog.cowdir is not None:
            self.catalog.cowdir.close()
        if self.node is not None:
            for svc in self.node.services:
                try:
                    await svc.close()
                except Exception as e:
                    log.error(kv(service=type(svc).__name__, close_error=e))

    async def start_services(self) -> None:
        if self.catalog.cowdir is not None:  # rolled back: --cow-dir is ours again
            self.catalog.cowdir.open(time.monotonic())
        if self.node is not None:
            for svc in self.node.services:
                try:
                    await svc.start(self.node)
                except Exception as e:
                    log.error(kv(service=type(svc).__name__, start_error=e))

    def live(self) -> list[NBDProtocol]:
        return [c for c in self.connections if not c.closing]

    async def quiesce(self, conn: NBDProtocol, deadline: float) -> handover.Outgoing | None:
        return await conn.quiesce(deadline)

    def sent(self, conn: NBDProtocol) -> None:
        conn.handed_over()

    def resume(self, conn: NBDProtocol) -> None:
        conn.resume_after_rollback()

    def finished(self) -> None:
        self.handed_over = True
        self.request_stop()

    # ------------------------------------------------------------ hand-over: taking

    async def start_with(self, listeners: list[tuple[str, socket.socket]]) -> None:
        """Start the node (its services), take --cow-dir (the predecessor let it go), and
        accept on the predecessor's sockets."""
        if self.node is not None:
            await self.node.start()
        if self.catalog.cowdir is not None:
            self.catalog.cowdir.open(time.monotonic())
        wanted = {_fmt_addr(a) for a in self.config.listen}
        if self.config.unix:
            wanted.add(f"unix:{self.config.unix}")
        got = {a for a, _ in listeners}
        if wanted != got:
            log.warning(kv(handover="listening where the predecessor did",
                           addresses=",".join(sorted(got)), configured=",".join(sorted(wanted))))
        await self.start(sockets=[s for _, s in listeners])
        barrier = self.config.start_barrier
        if barrier is not None:  # every worker of this server takes over, or none does
            barrier.arrive(self.config.worker)
            await barrier.wait(handover.READY_TIMEOUT - 10.0)

    async def adopt(self, state: dict[str, Any], sock: socket.socket, pending: bytes) -> bool:
        """Carry on a connection handed over by the predecessor (:meth:`NBDProtocol.quiesce`
        made ``state``): the same export version, the same negotiated state. False, and the
        socket closed, when this server cannot (the export is gone or changed: its size, its
        flags, or its bytes, such as a version replaced with ``import --force --force-in-use``
        while the client read the old one; the client then reconnects as after a restart)."""
        name = str(state.get("export", ""))
        why = ""
        try:
            size, flags = int(state["size"]), int(state["flags"])
            resolved = self.catalog.resolve(name)
            if resolved is None:
                why = "export not found here"
            elif resolved.export.size != size:
                why = f"size {resolved.export.size} != {size}"
            elif not flags_fit(flags, int(resolved.export.info().flags)):
                why = f"flags {flags:#x} do not fit {int(resolved.export.info().flags):#x}"
            elif "identity" in state and state["identity"] != resolved.export.identity:
                # (a predecessor that does not say is trusted on size and flags, as before)
                why = (f"its bytes changed: {state['identity']} here is now "
                       f"{resolved.export.identity} (replaced since the client opened it)")
        except (KeyError, TypeError, ValueError) as e:
            why = f"bad state: {e}"
        if why or resolved is None:
            log.warning(kv(handover_refused=state.get("conn"), export=name, reason=why))
            sock.close()
            return False
        export = resolved.export
        resolved = Resolved(export, {str(k): str(v) for k, v in dict(state["options"]).items()})
        sm = ServerConnection.resume(self.catalog, export.info(handle=resolved), TransmissionState(
            size, flags, bool(state["structured"]), tuple(state["meta_contexts"]),
            bool(state["no_zeroes"])))
        proto = NBDProtocol(self, sm)
        proto.identity, proto.peer = _identity_of(_peername(sock), sock)
        proto.owner = proto.identity
        client = Client(proto.identity, resolved.options, time.monotonic())
        try:
            proto.backend = export.connect(client)
        except OSError as e:
            log.warning(kv(handover_refused=state.get("conn"), export=name, error=e))
            sock.close()
            return False
        proto.export, proto.client = export, client
        proto.requested = str(state.get("requested", ""))
        proto.options = dict(resolved.options)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            proto.active -= max(0.0, float(state["idle_s"]))
        if export.writable:
            self.writable_clients += 1
        await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, sock)
        log.info(kv(event="connect", conn=proto.id, peer=proto.peer, export=export.name,
                    handed_over_from=state.get("conn"), pending=len(pending),
                    structured="yes" if sm.structured else "no",
                    meta=",".join(sm.meta_contexts) or "-"))
        if pending and proto.transport is not None and not proto.closing:
            proto.data_received(pending)
        return True

    async def serve(self) -> None:
        """Run until :meth:`request_stop`, then shut down gracefully."""
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight replies within ``grace`` seconds, close all."""
        self.stopping = True
        if self.config.workers <= 1:  # with workers, the parent says it
            activation.stopping()
        for srv in self.servers:
            srv.close()
        conns = list(self.connections)
        log.info(kv(event="shutdown", shutdown="begin", connections=len(conns),
                    grace=self.config.grace))
        for c in conns:
            c.drain()
        deadline = time.monotonic() + self.config.grace
        while any(c.busy for c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [c for c in conns if c.busy]
        for c in conns:
            c.reason = "server shutdown"
            if c.transport is not None:
                if c in left:
                    c.transport.abort()
                else:
                    c.transport.close()
        await asyncio.sleep(0)
        if self._janitor is not None:
            self._janitor.cancel()
        if self._waiter_poll is not None:
            self._waiter_poll.cancel()
        if self.handover_listener is not None:
            self.handover_listener.close(unlink=not self.handed_over)
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self.config.unix and os.path.exists(self.config.unix) and not self.handed_over:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix)
        self.catalog.close()
        self.budget.close()
        if self.node is not None:
            await self.node.close()
            self.node.store.close()
        if self.tracer is not None:
            self.tracer.close()
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        log.info(kv(event="shutdown", shutdown="done", unfinished=len(left)))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


#: Transmission flags that let a client send a command: a server carrying a connection on
#: must accept every one the client was given.
_COMMAND_FLAGS = int(TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
                     | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
                     | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_FAST_ZERO)


def flags_fit(told: int, now: int) -> bool:
    """May a client told transmission flags ``told`` talk to an export whose flags are
    ``now``: every command it may send is still carried out, and it was not told it may
    write to what is now read-only."""
    ro = int(TransmissionFlag.READ_ONLY)
    if not told & ro and now & ro:
        return False
    return not told & _COMMAND_FLAGS & ~now


def _peername(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def _fmt_addr(addr: object) -> str:
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def cow_dir_of(config: ServeConfig) -> str | None:
    """Where ``config``'s overlays live: ``--cow-dir``, else the default named after the
    listen addresses (:func:`~icbdcache.layers.cowdir.default_cow_dir`); None when nothing is
    writable."""
    if not (config.store_cow or any(e.cow for e in config.exports)):
        return None
    if config.cow_dir:
        return config.cow_dir
    return default_cow_dir([f"{h}:{p}" for h, p in config.listen]
                           + ([f"unix:{config.unix}"] if config.unix else []))


def build_catalog(config: ServeConfig, node: Node | None = None, *,
                  recover: bool = True) -> Catalog:
    """Open every file export of ``config`` (exports of ``nbd://`` URIs are the node's), and
    with ``recover`` the ``--cow-dir`` (locked; what a previous run left is recovered).
    Without it, writable exports are only checked (startup checks). Raises OSError or
    ValueError with the export named."""
    cowdir = None
    path = cow_dir_of(config)
    if path is not None:
        cowdir = CowDir(path, linger=config.cow_linger, max_bytes=config.cow_max)
        if recover:
            cowdir.open(time.monotonic())
            if config.workers == 1:
                write_layout(path, 1)
    exports: list[Export] = []
    try:
        for spec in config.exports:
            if spec.is_upstream:
                continue
            try:
                exports.append(Export.from_file(spec, overlays=cowdir))
            except OSError as e:
                raise OSError(e.errno, f"export {spec.name}: {e.strerror}: {spec.path}") \
                    from None
        return Catalog(exports, config.default_export, node, versions_cow=config.store_cow,
                       cowdir=cowdir)
    except BaseException:
        for x in exports:
            x.close()
        if cowdir is not None:
            cowdir.close()
        raise


def open_node(config: ServeConfig, services: Sequence[NodeService] = ()) -> Node | None:
    """The store of ``--store`` with ``services`` running beside it, or None. Raises
    StoreError."""
    if config.store is None:
        return None
    store = Store(config.store, size_limit=config.store_size)
    try:
        store.set_bound(config.store_size)  # what imports must fit in (docs/store.md)
    except StoreError:
        store.close()
        raise
    return Node(store, hot_bytes=config.hot_bytes, fault_timeout=config.fault_timeout,
                source_timeout=config.source_timeout, readahead=config.readahead,
                services=services)


#: ``serve``'s SIGHUP: re-read the settings and apply what can change without a restart
#: (logs what it did; raises ValueError or OSError when the new settings are refused).
Reload = Callable[["Server"], None]


def _on_sighup(server: Server, reload: Reload | None) -> None:
    if reload is None:
        log.info(kv(event="reload", result="nothing to reload"))
        return
    try:
        reload(server)
    except (ValueError, OSError) as e:
        log.error(kv(event="reload", result="refused, settings unchanged", error=e))
    except Exception as e:  # a reload must never take the server down
        log.exception(kv(event="reload", result="failed, settings unchanged", error=e))


def _collectors(server: Server, node: Node | None, *, per_client: bool = False
                ) -> list[Any]:
    """The metrics collectors of this process: the server, the node's read path, and those of
    its services (a service may have ``collectors()``). ``per_client``: a worker of several,
    whose clients worker 0 counts with the others' (icbdcache/metricsmerge.py)."""
    from icbdcache import metrics

    out: list[Any] = [metrics.ServerCollector(server, per_client=per_client)]
    if node is not None:
        out.append(metrics.ReadPathCollector(node.stats, node.store.stats))
        store = node.store
        out.append(metrics.StoreWriterCollector(node.reader.writer, lambda: store.stand_aside))
        for svc in node.services:
            more = getattr(svc, "collectors", None)
            if more is not None:
                out.extend(more())
    return out


def _arrive(config: ServeConfig) -> None:
    """This worker serves: the successor's other workers need not wait for it."""
    if config.start_barrier is not None:
        config.start_barrier.arrive(config.worker)


async def _take_over(config: ServeConfig, server: Server, chan: handover.Channel) -> bool:
    """Take the predecessor's sockets and connections on ``chan``; True when it did. A
    worker of ``--workers N`` whose predecessor refuses or is gone before its sockets came
    returns False (it then serves on a socket of its own: the other workers' clients, taken
    over already, must not be dropped for it). Raises HandoverError in a single process."""
    try:
        taken = await handover.take(chan, server)
    except handover.HandoverError as e:
        if config.workers <= 1:
            raise
        log.warning(kv(handover="not taken", worker=config.worker, error=e,
                       serving="on a socket of its own (a predecessor's worker that rolled "
                               "back serves on beside it until it is stopped)"))
        if server.node is not None and not server.node.started:
            await server.node.start()
        return False
    log.info(kv(handover="taken", connections=taken.adopted, refused=taken.refused,
                seconds=f"{taken.seconds:.3f}"))
    return True


async def _start_metrics(config: ServeConfig, server: Server, node: Node | None, *,
                         wait: float = 0.0) -> Any:
    """``--metrics-listen``: this process's ``/metrics`` server; with workers, worker 0's
    adds up every worker's and the others answer it on their sockets. ``wait``: seconds to
    go on trying while the address is in use (a predecessor stopping). Raises OSError."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await _open_metrics(config, server, node)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def _open_metrics(config: ServeConfig, server: Server, node: Node | None) -> Any:
    from icbdcache.metrics import MetricsServer, new_registry

    registry = new_registry(*_collectors(server, node,
                                         per_client=config.metrics_dir is not None))
    out: Any
    if config.metrics_dir is None:
        out = MetricsServer(registry, *cast(tuple[str, int], config.metrics_listen))
    elif config.worker == 0:
        out = MetricsServer(registry, *cast(tuple[str, int], config.metrics_listen),
                            peers=[metricsmerge.socket_path(config.metrics_dir, i)
                                   for i in range(1, config.workers)])
    else:
        out = metricsmerge.WorkerExposition(
            registry, metricsmerge.socket_path(config.metrics_dir, config.worker))
    await out.start()
    return out


async def _run(config: ServeConfig, *, unix_sock: socket.socket | None = None,
               reuse_port: bool = False, services: Sequence[NodeService] = (),
               sockets: Sequence[socket.socket] = (), reload: Reload | None = None,
               hup: list[bool] | None = None) -> bool:
    """One serving process; returns True when it ended by handing over to a successor.
    ``hup``: a worker's SIGHUP seen before its event loop handles them (``hup[0]``: reload
    once, as soon as the handler is in place)."""
    # full collector passes skip what the imports made; before the hand-over socket is
    # opened, so a successor's collection does not widen its window before its hello
    frozen = heap.freeze_startup()
    node = open_node(config, services)
    chan: handover.Channel | None = None
    try:
        if node is not None:
            for spec in config.exports:
                if spec.is_upstream:
                    try:
                        await node.add_upstream(spec.name, spec.path)
                    except StoreError as e:
                        # One unreachable upstream must not take down what the store holds.
                        log.error(kv(export=spec.name, upstream=spec.path, error=e,
                                     serving="without it"))
        if config.handover and not sockets:
            chan = await asyncio.to_thread(handover.connect, handover.worker_path(
                config.handover, config.worker, config.workers))
        if node is not None and chan is None:
            await node.start()  # its services (the replica, PXE) before any client
    except BaseException:
        if chan is not None:
            chan.close()
        if node is not None:
            await node.close()
            node.store.close()
        raise
    # taking over: --cow-dir is opened once the predecessor lets it go (Server.start_with)
    catalog = build_catalog(config, node, recover=chan is None)
    if node is not None:
        for name in catalog.by_name:
            if node.store.version(name) is not None:
                log.warning(kv(export=name, shadows="a version in the store with this name"))
    server = Server(config, catalog)
    server.node = node
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGUSR2, server.spawn_successor)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, server, reload)
    if hup is not None and hup[0]:  # a SIGHUP came while this worker started
        _on_sighup(server, reload)
    metrics_server = None
    watchdog = activation.Watchdog()
    try:
        if config.metrics_listen is not None and chan is None:
            metrics_server = await _start_metrics(config, server, node)
            server.metrics = metrics_server
        if chan is not None:
            # a server runs at --handover: take its sockets, services' ports and connections
            if await _take_over(config, server, chan):
                activation.ready("serving (taken over)",
                                 mainpid=os.getpid() if config.workers <= 1 else os.getppid())
            else:
                await server.start(unix_sock=unix_sock, reuse_port=reuse_port, sockets=sockets)
                _arrive(config)
                activation.ready("serving")
            if config.metrics_listen is not None:
                # the predecessor let go of the address as it stopped, just now
                server.metrics = metrics_server = await _start_metrics(
                    config, server, node, wait=config.grace + 5.0)
        else:
            await server.start(unix_sock=unix_sock, reuse_port=reuse_port, sockets=sockets)
            _arrive(config)
            activation.ready("serving")
        server.start_handover()
    except BaseException:
        await server.shutdown()  # closes the node, its store and the metrics server
        raise
    watchdog.start()
    log.info(kv(event="serving", serving="yes", startup_s=f"{_process_age():.2f}",
                gc_frozen=frozen))
    try:
        await server.serve()
    finally:
        watchdog.stop()
    return server.handed_over


def _process_age() -> float:
    """Seconds since this process started (the kernel's start time)."""
    import psutil

    return max(0.0, time.time() - float(psutil.Process().create_time()))


def run(config: ServeConfig, *, services: Sequence[NodeService] = (),
        reload: Reload | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or until a successor took over, ``--handover``); with
    ``workers`` > 1, one process per worker sharing the port with SO_REUSEPORT. Listening
    sockets passed by systemd (``LISTEN_FDS``) replace ``listen`` and ``unix``. ``services``
    run with the store's node (``serve --master``: the replica; in worker 0 only). Returns the
    exit status. ``reload``: what SIGHUP does (:data:`Reload`). Raises OSError, StoreError or
    HandoverError when it cannot start, ValueError for a bad ``LISTEN_FDS`` (or, with
    copy-on-write exports and workers, sockets that cannot be steered)."""
    _raise_fd_limit()
    sockets = activation.listen_sockets()
    running = None
    if config.handover and not sockets:
        running = handover.running_workers(config.handover)
        if running is not None and running != config.workers:
            raise handover.HandoverError(
                f"the server running at --handover {config.handover} has {running} "
                f"worker(s), this one {config.workers}: a hand-over needs the same --workers "
                "(restart it instead: clients reconnect)")
    if config.workers <= 1:
        if config.workers_why:
            log.info(kv(event="workers", workers=1, why=config.workers_why))
        hup = [False]  # a SIGHUP before the event loop handles them: applied once it does
        signal.signal(signal.SIGHUP, lambda _sig, _frame: hup.__setitem__(0, True))
        hup[0] = hup[0] or earlyhup.seen()  # or one that came during the imports
        loop = new_event_loop()
        try:
            loop.run_until_complete(_run(config, services=services, sockets=sockets,
                                         reload=reload, hup=hup))
        finally:
            finish_loop(loop)
        return 0
    if running is None and not sockets and cow_dir_of(config) is None:
        _check_free(config.listen)  # the steered sockets of copy-on-write are the parent's
    return _run_workers(config, services, sockets, reload)


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: A worker killed (by a signal other than SIGTERM/SIGINT) or failing after it ran this
#: many seconds is started again in its place; one that exits with an error sooner failed
#: at its start, and the server stops rather than loop.
WORKER_MIN_LIFE = 2.0
#: ... and so does a worker started again this many times within
#: :data:`WORKER_RESTART_WINDOW` seconds.
WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW = 60.0


#: The signals the parent of ``serve --workers`` hands on to its workers.
FORWARDED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
#: ... blocked across a worker's fork, with SIGUSR2 (the parent's: a successor).
BLOCKED = FORWARDED | {signal.SIGUSR2}
#: The exit status of a worker that handed over to its successor's (``--handover``): not
#: started again.
HANDED_OVER = 75


def _run_workers(config: ServeConfig, services: Sequence[NodeService],
                 sockets: Sequence[socket.socket] = (), reload: Reload | None = None) -> int:
    unix_sock = None
    if config.unix and not sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.unix)
        unix_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix_sock.bind(config.unix)
        unix_sock.listen(1024)
    cow_dir = cow_dir_of(config)
    steered: list[list[socket.socket]] = []
    cow_lock = -1
    if cow_dir is not None:
        # a client's overlay lives in one worker: its connections are steered there by
        # address (steering.py); worker i keeps its overlays in COW_DIR/worker-i
        if sockets or unix_sock is not None:
            raise ValueError("copy-on-write exports with --workers > 1 need TCP --listen "
                             "addresses (a client is steered to its worker by address), not "
                             "--unix or sockets passed by systemd")
        cow_lock = _hold_dir(cow_dir)
        try:
            write_layout(cow_dir, config.workers)
            steered = steering.steered_listeners(list(config.listen), config.workers)
        except BaseException:
            os.close(cow_lock)
            raise
    # --metrics-listen: worker 0 listens there and adds up the others', which answer it on
    # their sockets in this directory (icbdcache/metricsmerge.py)
    metrics_dir = (metricsmerge.socket_dir() if config.metrics_listen is not None else None)
    hup = [False]  # in a worker: a SIGHUP to apply once its loop handles them
    reloaded = False  # the parent got a SIGHUP: a worker started again reloads at once

    parent = os.getpid()
    # --max-connections and the per-address limits hold for the server: the workers count
    # in one table (icbdcache/sharedlimits.py)
    from icbdcache.sharedlimits import SharedCounts

    counts = SharedCounts(config.workers)
    barrier = StartBarrier(config.workers)

    def spawn(i: int) -> int:
        """Fork worker ``i``; return its pid (in the parent)."""
        pid = os.fork()
        if pid != 0:
            return pid
        # a worker started again is forked after the parent's handlers are set; the three
        # signals are blocked across the fork (:func:`start`): one sent to this worker
        # before its own handlers are in place waits for them instead of being lost
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # until its event loop handles SIGHUP, one is noted and applied then; a worker
        # started again after a SIGHUP applies the settings as they are now, not as the
        # parent started with them
        hup[0] = reloaded
        signal.signal(signal.SIGHUP, lambda _sig, _frame: hup.__setitem__(0, True))
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the parent's (its event loop: warns)
        _die_with_parent(parent)
        if cow_lock >= 0:  # the parent's hold on --cow-dir ends with the parent
            os.close(cow_lock)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        tag_process()
        code = 0
        try:
            own: Sequence[socket.socket] = sockets
            # the server's memory budgets are shared out: each worker holds its part
            wcfg = replace(config, worker=i, metrics_dir=metrics_dir, shared_counts=counts,
                           start_barrier=barrier,
                           hot_bytes=config.hot_bytes // config.workers,
                           reply_budget=max(1, config.reply_budget // config.workers))
            if steered:
                for j, socks in enumerate(steered):
                    if j != i:
                        for sk in socks:
                            sk.close()
                own = steered[i]
                wcfg = replace(wcfg, cow_dir=os.path.join(cast(str, cow_dir),
                                                            f"worker-{i}"))
            loop = new_event_loop()
            if loop.run_until_complete(_run(wcfg, unix_sock=unix_sock, reuse_port=True,
                                            services=_services_of_worker(services, i),
                                            sockets=own, reload=reload, hup=hup)):
                code = HANDED_OVER
        except (OSError, StoreError, ValueError, handover.HandoverError, StartAborted) as e:
            log.error(kv(event="worker_failed", worker=i, error=e))
            code = 1
        except BaseException:
            log.exception("worker failed")
            code = 1
        os._exit(code)

    # The parent keeps every steered socket open: a worker that dies leaves its socket in
    # the port's group, its clients' connections wait in its backlog (a pause), and the
    # worker started again in its place takes the same socket and overlays.
    workers: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started, monotonic)

    def send_all(sig: int) -> None:
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reload_all(sig: int, _frame: object) -> None:
        # SIGHUP (systemctl reload): every worker reloads its own settings; none stops
        nonlocal reloaded
        reloaded = True
        send_all(sig)

    def start(i: int) -> int:
        """Fork worker ``i`` and note it, with SIGHUP, SIGTERM and SIGINT blocked meanwhile:
        one that comes then reaches the parent's handler once the new pid is in ``workers``
        (and so is sent on to it), never a worker without handlers (it was lost, or a
        SIGTERM left the server running)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        barrier.reset(i)
        try:
            pid = spawn(i)
            workers[pid] = (i, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        return pid

    successor: list[subprocess.Popen[bytes]] = []

    def start_successor(_sig: int, _frame: object) -> None:
        # SIGUSR2 (--handover): start this program again; its workers take over ours
        if not config.handover:
            log.warning(kv(signal="SIGUSR2", ignored="no --handover socket to hand over on"))
        elif successor and successor[-1].poll() is None:
            log.warning(kv(signal="SIGUSR2", ignored=f"successor {successor[-1].pid} runs"))
        else:
            try:
                successor[:] = [handover.spawn_successor()]
            except OSError as e:
                log.error(kv(signal="SIGUSR2", successor="not started", error=e))
                return
            log.info(kv(signal="SIGUSR2", successor=successor[-1].pid))

    signal.signal(signal.SIGUSR2, start_successor)
    signal.signal(signal.SIGHUP, reload_all)  # before the first fork: none is lost
    reloaded = reloaded or earlyhup.seen()  # one during the imports: the workers reload
    for i in range(config.workers):
        start(i)
    log.info(kv(workers=len(workers), pids=",".join(map(str, workers)),
                why=config.workers_why or "--workers"))
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        first = not stopping
        stopping = True
        send_all(sig)
        if first:
            # the service's main process says so, its workers do not (a manager whose queue
            # is full would hold each one's event loop); no event loop here to hold up
            activation.stopping(wait=2.0)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    handed_over = False  # a worker handed over: the successor serves the --unix socket now
    restarts: dict[int, deque[float]] = {}  # worker index -> when it was started again
    while workers:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid not in workers:
            continue
        i, started = workers.pop(pid)
        code = os.waitstatus_to_exitcode(st)
        if not barrier.arrived(i):
            barrier.fail()  # the others call off a hand-over they wait to finish
        # a worker that exits by itself (0, handed over, or after SIGTERM/SIGINT: the whole
        # service is being stopped) or fails at its start is not started again; one that is
        # killed or fails while it serves is
        handed_over = handed_over or code == HANDED_OVER
        crashed = code not in (0, HANDED_OVER, -signal.SIGTERM, -signal.SIGINT)
        if stopping or not crashed:
            status = status or (1 if crashed else 0)
            continue
        if handed_over or (successor and successor[-1].poll() is None):
            # a hand-over has begun: the successor's worker of that index serves its port;
            # one started again here would serve beside it, uncounted, and take its socket
            log.warning(kv(event="worker_exited", worker=i, pid=pid, status=code,
                           action="not started again: a successor takes over"))
            continue
        now = time.monotonic()
        recent = restarts.setdefault(i, deque(maxlen=WORKER_RESTARTS))
        if (code > 0 and now - started < WORKER_MIN_LIFE) or (
                len(recent) == WORKER_RESTARTS and now - recent[0] < WORKER_RESTART_WINDOW):
            status = status or 1
            log.error(kv(event="worker_exited", worker=i, pid=pid, status=code,
                         action="stopping the server (it fails at its start, or again and "
                                "again)"))
            forward(signal.SIGTERM, None)
            continue
        recent.append(now)
        new = start(i)
        if stopping:  # SIGTERM came while it was forked, before forward() could see it
            with contextlib.suppress(ProcessLookupError):
                os.kill(new, signal.SIGTERM)
        log.warning(kv(event="worker_exited", worker=i, pid=pid, status=code,
                       action=f"started again as {new}"))
    for socks in steered:
        for sk in socks:
            sk.close()
    if config.unix and not handed_over:
        with contextlib.suppress(OSError):
            os.unlink(config.unix)
    if cow_lock >= 0:
        os.close(cow_lock)
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _listen_error(host: str, port: int, e: OSError) -> OSError:
    """The error of ``--listen HOST:PORT`` that could not be bound."""
    what = ("address already in use (another icbd-cache serve, nbd-server, or a systemd "
            "socket unit holding it?)" if e.errno == errno.EADDRINUSE else e.strerror or str(e))
    return OSError(e.errno, f"--listen {_fmt_addr((host, port))}: {what}")


def _check_free(listen: Sequence[tuple[str, int]]) -> None:
    """Bind each address once, without SO_REUSEPORT, before the workers bind it with it: an
    address in use (also by another server's workers, whose group ours would otherwise join)
    is refused here, in the parent. Raises OSError (:func:`_listen_error`)."""
    for host, port in listen:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EINVAL, f"--listen {host}:{port}: {e}") from None
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(addr)
                except OSError as e:
                    raise _listen_error(host, port, e) from None


def _die_with_parent(parent: int) -> None:
    """In a worker: be killed (SIGKILL) when the parent dies, as the workers of a killed
    server must not serve on beside the server started again in its place (two processes
    on one client's overlay); exit at once if it died already (``prctl(PR_SET_PDEATHSIG)``,
    Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning(kv(event="worker", pdeathsig="not set", errno=ctypes.get_errno()))
    if os.getppid() != parent:
        os._exit(1)


def _services_of_worker(services: Sequence[NodeService], index: int) -> list[NodeService]:
    """The node services worker ``index`` runs: a service with ``for_worker(index)`` says
    (the replica of ``--master`` replicates in worker 0 only and opens master sources in
    every worker); any other (PXE: its ports) runs in worker 0 only."""
    out: list[NodeService] = []
    for svc in services:
        per_worker = getattr(svc, "for_worker", None)
        mine = per_worker(index) if per_worker is not None else svc if index == 0 else None
        if mine is not None:
            out.append(mine)
    return out


def _hold_dir(path: str) -> int:
    """Lock ``--cow-dir`` (made if missing) for the parent of the workers, as one server's
    (:meth:`CowDir.check_free` sees it held). Returns the lock's descriptor. Raises OSError
    when another server holds it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(path, COW_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_soon(fd)
    except OSError:
        os.close(fd)
        raise OSError(f"--cow-dir {path} is in use by another icbd-cache server") from None
    return fd
