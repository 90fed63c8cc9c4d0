"""``icbd-bench abuse``: misbehaving and hostile clients, to run against a server while real
clients use it (docs/serve.md and docs/replication.md say what each limit is for).

Each class of abuse takes its numbers as parameters; the tests in tests/serve/test_abuse.py
and tests/replication/test_master_abuse.py run them with some, and they are meant to be run
with others:

* ``pipeline``: connections that negotiate an export and then pipeline ``depth`` requests of
  ``size`` bytes (READ, WRITE, BLOCK_STATUS, CACHE) without ever reading a reply.
* ``stall``: connections that stop at a point of the handshake (``connect``: send nothing;
  ``flags``: after the client flags; ``option``: half an option header; ``trickle``: an
  option every ``interval`` seconds, forever; ``go``: a finished handshake, then nothing).
* ``churn``: connections opened and dropped at once, as fast as they go, for ``duration``
  seconds (refusals and closes by the thousand: what the log does with them).
* ``names``: NBD_OPT_GO for export names made of control characters and forged log lines.
* ``streams``: ``POST /v1/chunks`` streams to a master that stall (``body``: half the body
  sent; ``read``: the answer never read; ``slow``: read at ``rate`` bytes a second), each
  asking for ``digests`` chunks of a published version.

Connections spread over the ``sources`` addresses in turn (``127.0.0.2+3``: 127.0.0.2 to
127.0.0.4), so one run can be one address or many. The command line prints one JSON object a
line: ``{"event": "holding", ...}`` once every connection reached its stall point (or was
refused), then ``{"event": "done", ...}`` with the counts when ``--hold`` seconds passed or on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nbd import wire
from nbd.constants import IHAVEOPT, REQUEST_MAGIC, ClientFlag, Cmd, Info, Opt, Rep

#: Names tried by ``names`` (each a forged log line or control characters), after the
#: ``prefix``.
FORGED_NAMES = (
    "x\n2030-01-01T00:00:00.000 INFO icbdcache.server conn=1 forged=yes",
    "x\r\nforged=yes",
    "x\x1b[2Jforged=yes",
    "x\x00\x7f\x85forged=yes",
    "x\u2028forged=yes",
)


#: tcp_info.tcpi_state of an established connection (Linux, include/net/tcp_states.h).
TCP_ESTABLISHED = 1

# ------------------------------------------------------------------------------ results


@dataclass
class Report:
    """What one run did. Counts of connections: ``opened`` (TCP connected), ``reached`` (got
    to their stall point or sent their requests), ``refused`` (closed by the server before
    that), ``closed`` (closed by the server while held), ``alive`` (open at the end); bytes
    sent and read; ``errors`` by kind."""

    kind: str
    opened: int = 0
    reached: int = 0
    refused: int = 0
    closed: int = 0
    alive: int = 0
    bytes_sent: int = 0
    bytes_read: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k not in ("errors", "extra")}
        d["errors"] = dict(self.errors)
        d.update(self.extra)
        return d


def parse_sources(text: str) -> list[str]:
    """``A``, ``A+N`` (N addresses from A on) or ``A,B,...`` -> addresses. Raises ValueError."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        base, _, count = part.partition("+")
        first = ipaddress.ip_address(base)
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"{part!r}: the count after + must be at least 1")
        out += [str(first + i) for i in range(n)]
    if not out:
        raise ValueError("no source address")
    return out


@dataclass
class Target:
    """Where to connect and from where: ``host``:``port``, source addresses in turn."""

    host: str
    port: int
    sources: list[str] = field(default_factory=lambda: [""])

    async def open(self, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connection number ``i`` (from source ``i`` modulo their count)."""
        src = self.sources[i % len(self.sources)]
        return await asyncio.open_connection(
            self.host, self.port, local_addr=(src, 0) if src else None, limit=1 << 20)


def _alive(writer: asyncio.StreamWriter) -> bool:
    """Whether the server still holds the connection: TCP still established (no FIN or
    reset from the server), read from the kernel without reading what the server sent."""
    if writer.is_closing():
        return False
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return bool(info[0] == TCP_ESTABLISHED)


async def _each(n: int, parallel: int | None, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(0)`` .. ``one(n - 1)``, at most ``parallel`` at a time (None: all at once)."""
    if not parallel or parallel >= n:
        await asyncio.gather(*(one(i) for i in range(n)))
        return
    for start in range(0, n, parallel):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + parallel))))


async def _hold(seconds: float | None, stop: asyncio.Event) -> None:
    if seconds is None:
        await stop.wait()
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# -------------------------------------------------------------------------------- NBD


async def _exact(reader: asyncio.StreamReader, n: int, report: Report) -> bytes:
    data = await reader.readexactly(n)
    report.bytes_read += n
    return data


def _send(writer: asyncio.StreamWriter, data: bytes, report: Report) -> None:
    writer.write(data)
    report.bytes_sent += len(data)


def _option(opt: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def _go_data(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogatepass")
    return wire.U32.pack(len(raw)) + raw + wire.U16.pack(0)


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 report: Report) -> None:
    await _exact(reader, wire.GREETING.size, report)
    _send(writer, wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES),
          report)


async def _go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str,
              report: Report) -> tuple[int, int] | None:
    """NBD_OPT_GO: (export size, transmission flags), or None when refused."""
    _send(writer, _option(Opt.GO, _go_data(export)), report)
    size = flags = 0
    while True:
        head = await _exact(reader, wire.OPTION_REPLY_HEADER.size, report)
        _, _, rep, length = wire.OPTION_REPLY_HEADER.unpack(head)
        data = await _exact(reader, length, report)
        if rep == Rep.INFO and len(data) >= 2 and wire.U16.unpack_from(data)[0] == Info.EXPORT:
            _, size, flags = wire.INFO_EXPORT.unpack(data[: wire.INFO_EXPORT.size])
        elif rep == Rep.ACK:
            return size, flags
        elif rep & 0x80000000:
            return None


def _requests(command: str, depth: int, size: int, export_size: int, first: int) -> bytes:
    cmd = {"read": Cmd.READ, "write": Cmd.WRITE, "block-status": Cmd.BLOCK_STATUS,
           "cache": Cmd.CACHE}[command]
    span = max(1, export_size - size)
    out = bytearray()
    payload = bytes(size) if cmd is Cmd.WRITE else b""
    for i in range(depth):
        offset = ((first + i) * size) % span
        offset -= offset % 4096
        out += wire.REQUEST.pack(REQUEST_MAGIC, 0, cmd, first + i, offset, size) + payload
    return bytes(out)


async def nbd_pipeline(target: Target, export: str, *, connections: int = 1, depth: int = 40,
                       size: int = 32 << 20, command: str = "read", hold: float | None = None,
                       parallel: int | None = None, stop: asyncio.Event | None = None,
                       on_holding: Callable[[Report], None] | None = None) -> Report:
    """``connections`` connections (``parallel`` at a time; None: all at once) negotiate
    ``export``, each sends ``depth`` ``command`` requests of ``size`` bytes in one go and never
    reads a reply; held ``hold`` seconds (None: until ``stop``)."""
    report = Report("pipeline", extra={"connections": connections, "depth": depth,
                                       "size": size, "command": command})
    stop = stop or asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        try:
            reader, writer = await target.open(i)
        except OSError as e:
            report.errors[type(e).__name__] += 1
            return
        report.opened += 1
        writers.append(writer)
        try:
            await _greet(reader, writer, report)
            got = await _go(reader, writer, export, report)
            if got is None:
                report.errors["export refused"] += 1
                return
            _send(writer, _requests(command, depth, size, got[0], i * depth), report)
            # not drained: the server may read none of it (that is the point)
            report.reached += 1
        except (OSError, asyncio.IncompleteReadError):
            report.refused += 1

    await _each(connections, parallel, one)
    await _held(report, writers, hold, stop, on_holding)
    return report


async def _held(report: Report, writers: Sequence[asyncio.StreamWriter], hold: float | None,
                stop: asyncio.Event, on_holding: Callable[[Report], None] | None) -> None:
    """Hold the connections; count those the server closed meanwhile; close them all."""
    if on_holding is not None:
        on_holding(report)
    await _hold(hold, stop)
    report.alive = sum(1 for w in writers if _alive(w))
    report.closed = max(0, report.reached - report.alive)
    for w in writers:
        w.transport.abort()


STALLS = ("connect", "flags", "option", "trickle", "go")


async def nbd_stall(target: Target, *, connections: int = 1, at: str = "go",
                    export: str = "", interval: float = 5.0, hold: float | None = None,
                    parallel: int | None = None, stop: asyncio.Event | None = None,
                    on_holding: Callable[[Report], None] | None = None) -> Report:
    """``connections`` connections (``parallel`` at a time; None: all at once) that stop at
    ``at`` (one of :data:`STALLS`; ``export`` is the name ``go`` negotiates); ``trickle``
    sends an unknown option every ``interval`` seconds (answered with an error: progress, to
    the server) for as long as it is held."""
    if at not in STALLS:
        raise ValueError(f"stall point {at!r}: one of {', '.join(STALLS)}")
    report = Report("stall", extra={"connections": connections, "at": at})
    stop = stop or asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    tricklers: list[asyncio.Task[None]] = []

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await asyncio.sleep(interval)
                _send(writer, _option(0x7FFF), report)  # unknown: answered ERR_UNSUP
                head = await _exact(reader, wire.OPTION_REPLY_HEADER.size, report)
                await _exact(reader, wire.OPTION_REPLY_HEADER.unpack(head)[3], report)

    async def one(i: int) -> None:
        try:
            reader, writer = await target.open(i)
        except OSError as e:
            report.errors[type(e).__name__] += 1
            return
        report.opened += 1
        writers.append(writer)
        try:
            if at == "connect":  # the greeting read (or a refusal), then nothing sent
                await _exact(reader, wire.GREETING.size, report)
                report.reached += 1
                return
            await _greet(reader, writer, report)
            if at == "option":
                _send(writer, _option(Opt.GO, _go_data(export))[:10], report)
            elif at == "trickle":
                tricklers.append(asyncio.ensure_future(trickle(reader, writer)))
            elif at == "go" and await _go(reader, writer, export, report) is None:
                report.errors["export refused"] += 1
                return
            await writer.drain()
            report.reached += 1
        except (OSError, asyncio.IncompleteReadError):
            report.refused += 1

    await _each(connections, parallel, one)
    try:
        await _held(report, writers, hold, stop, on_holding)
    finally:
        for t in tricklers:
            t.cancel()
    return report


async def nbd_churn(target: Target, *, connections: int = 64, duration: float = 5.0,
                    wait_close: bool = False, stop: asyncio.Event | None = None) -> Report:
    """``connections`` loops that connect and drop (RST) at once, for ``duration`` seconds;
    ``wait_close``: each connection waits for the server to close it first (a client retrying
    as soon as it is refused; counted in ``closed``, and those still open after 5 s in
    ``alive``)."""
    report = Report("churn", extra={"connections": connections, "duration": duration})
    stop = stop or asyncio.Event()
    end = time.monotonic() + duration

    async def loop(i: int) -> None:
        while time.monotonic() < end and not stop.is_set():
            try:
                reader, writer = await target.open(i)
            except OSError as e:
                report.errors[type(e).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            report.opened += 1
            if wait_close:
                try:
                    while await asyncio.wait_for(reader.read(1 << 16), 5.0):
                        pass
                    report.closed += 1
                except TimeoutError:
                    report.alive += 1
                except OSError:
                    report.closed += 1
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.sleep(0)

    await asyncio.gather(*(loop(i) for i in range(connections)))
    return report


async def nbd_names(target: Target, *, prefix: str = "", names: Sequence[str] = FORGED_NAMES,
                    stop: asyncio.Event | None = None) -> Report:
    """NBD_OPT_GO for each of ``names`` (after ``prefix``) on its own connection; the names
    the server accepted are in ``extra["accepted"]``."""
    report = Report("names", extra={"accepted": []})
    for i, name in enumerate(names):
        try:
            reader, writer = await target.open(i)
        except OSError as e:
            report.errors[type(e).__name__] += 1
            continue
        report.opened += 1
        try:
            await _greet(reader, writer, report)
            got = await _go(reader, writer, prefix + name, report)
            report.reached += 1
            if got is not None:
                report.extra["accepted"].append(prefix + name)
        except (OSError, asyncio.IncompleteReadError):
            report.refused += 1
        finally:
            writer.transport.abort()
    return report


# ----------------------------------------------------------------------------- master

STREAM_STALLS = ("body", "read", "slow")


async def _http(target: Target, i: int, method: str, path: str, headers: dict[str, str],
                body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request with ``Connection: close``: (status, body)."""
    reader, writer = await target.open(i)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {target.host}", "Connection: close",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = await reader.read()
    finally:
        writer.transport.abort()
    top, _, rest = raw.partition(b"\r\n\r\n")
    status = int(top.split(b" ", 2)[1]) if top.startswith(b"HTTP/") else 0
    return status, rest


async def version_digests(target: Target, version: str | None, headers: dict[str, str]
                          ) -> list[bytes]:
    """The distinct non-zero chunk digests of ``version`` (``IMI@VERSION``; None: the first
    published one), from the master's catalog and manifest. Raises ValueError."""
    status, body = await _http(target, 0, "GET", "/v1/catalog", headers)
    if status != 200:
        raise ValueError(f"GET /v1/catalog: HTTP {status}")
    records = json.loads(body)["versions"]
    live = [r for r in records if not r.get("retired")]
    if version is not None:
        live = [r for r in live if f"{r['imi']}@{r['version']}" == version]
    if not live:
        raise ValueError(f"no published version {version or ''}".rstrip())
    r = live[0]
    status, chunk_map = await _http(target, 0, "GET", f"/v1/manifest/{r['imi']}/{r['version']}",
                                    headers)
    if status != 200:
        raise ValueError(f"GET manifest: HTTP {status}")
    zero, unknown = bytes(16), b"\xff" * 16
    ds = [chunk_map[i : i + 16] for i in range(0, len(chunk_map), 16)]
    return list(dict.fromkeys(d for d in ds if d not in (zero, unknown)))


async def chunk_streams(target: Target, *, streams: int = 8, at: str = "read",
                        digests: int = 4096, rate: int = 1024, version: str | None = None,
                        token: str | None = None, site: str | None = None,
                        answer_wait: float = 2.0, hold: float | None = None,
                        stop: asyncio.Event | None = None,
                        on_holding: Callable[[Report], None] | None = None) -> Report:
    """``streams`` ``POST /v1/chunks`` of ``digests`` digests of ``version`` (repeated to fill
    the count), each stalled at ``at`` (:data:`STREAM_STALLS`; ``slow`` reads ``rate``
    bytes a second). ``token``: a bearer token; ``site``: the ``X-Icbd-Site`` header. Counts
    the answers by status in ``extra["status"]``, and in ``extra["waiting"]`` the streams not
    answered within ``answer_wait`` seconds (queued at the master; held, and read if
    ``slow``); a stream the master ended counts as ``closed``."""
    if at not in STREAM_STALLS:
        raise ValueError(f"stall point {at!r}: one of {', '.join(STREAM_STALLS)}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if site:
        headers["X-Icbd-Site"] = site
    have = await version_digests(target, version, headers)
    body = b"".join(have[i % len(have)] for i in range(digests))
    report = Report("streams", extra={"streams": streams, "at": at, "status": Counter(),
                                      "waiting": 0})
    stop = stop or asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.Task[None]] = []

    async def slow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while not stop.is_set():
                got = await reader.read(max(1, rate // 10))
                if not got:
                    return
                report.bytes_read += len(got)
                await asyncio.sleep(0.1)

    async def one(i: int) -> None:
        try:
            reader, writer = await target.open(i)
        except OSError as e:
            report.errors[type(e).__name__] += 1
            return
        report.opened += 1
        writers.append(writer)
        head = ["POST /v1/chunks HTTP/1.1", f"Host: {target.host}",
                f"Content-Length: {len(body)}", "Content-Type: application/x-icbd-chunks",
                *(f"{k}: {v}" for k, v in headers.items())]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode()
        try:
            if at == "body":
                _send(writer, raw + body[: len(body) // 2], report)
                await writer.drain()
                report.reached += 1
                return
            _send(writer, raw + body, report)
            try:
                top = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), answer_wait)
            except TimeoutError:  # queued behind others at the master: held all the same
                report.reached += 1
                report.extra["waiting"] += 1
                if at == "slow":
                    readers.append(asyncio.ensure_future(slow(reader)))
                return
            report.bytes_read += len(top)
            status = int(top.split(b" ", 2)[1])
            report.extra["status"][status] += 1
            if status != 200:  # refused: the answer is all there is to it
                report.refused += 1
                writers.remove(writer)
                writer.transport.abort()
                return
            report.reached += 1
            if at == "slow":
                readers.append(asyncio.ensure_future(slow(reader)))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            report.refused += 1

    await asyncio.gather(*(one(i) for i in range(streams)))
    try:
        await _held(report, writers, hold, stop, on_holding)
    finally:
        for t in readers:
            t.cancel()
    report.extra["status"] = {str(k): v for k, v in report.extra["status"].items()}
    return report


# ------------------------------------------------------------------------- command line


def _target(args: argparse.Namespace) -> Target:
    if getattr(args, "url", None):
        u = urlsplit(args.url)
        host, port = u.hostname or "127.0.0.1", u.port or 10810
    else:
        host, port = args.host, args.port
    return Target(host, port, parse_sources(args.sources) if args.sources else [""])


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    target = _target(args)

    def holding(r: Report) -> None:
        _print({"event": "holding", **r.as_dict()})

    work: Awaitable[Report]
    if args.abuse == "pipeline":
        work = nbd_pipeline(target, args.export, connections=args.connections, depth=args.depth,
                            size=args.size, command=args.command, hold=args.hold,
                            parallel=args.parallel, stop=stop, on_holding=holding)
    elif args.abuse == "stall":
        work = nbd_stall(target, connections=args.connections, at=args.at, export=args.export,
                         interval=args.interval, hold=args.hold, parallel=args.parallel,
                         stop=stop, on_holding=holding)
    elif args.abuse == "churn":
        work = nbd_churn(target, connections=args.connections, duration=args.duration,
                         wait_close=args.wait_close, stop=stop)
    elif args.abuse == "names":
        work = nbd_names(target, prefix=args.export, stop=stop)
    else:
        work = chunk_streams(target, streams=args.streams, at=args.at, digests=args.digests,
                             rate=args.rate, version=args.version, token=args.token,
                             site=args.site, answer_wait=args.answer_wait, hold=args.hold,
                             stop=stop, on_holding=holding)
    try:
        report = await work
    except (OSError, ValueError) as e:
        print(f"icbd-bench abuse: {e}", file=sys.stderr)
        return 1
    _print({"event": "done", **report.as_dict()})
    return 0


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or 64K, 32M)") \
            from None


def register(subparsers: Any) -> None:
    """Add the ``abuse`` subcommand and its classes of abuse."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "abuse", help="misbehaving clients against a server (limits under test)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  icbd-bench abuse pipeline --port 10809 --export lab@1 --depth 80 --size 32M\n"
               "  icbd-bench abuse stall --port 10809 --at go --connections 600 "
               "--sources 127.0.0.2+4\n"
               "  icbd-bench abuse streams --url http://127.0.0.1:10810 --streams 40 "
               "--at read --sources 127.0.0.2+3")
    sub = p.add_subparsers(dest="abuse", metavar="ABUSE", required=True)

    def nbd(name: str, text: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        q.add_argument("--host", default="127.0.0.1")
        q.add_argument("--port", type=int, default=10809)
        q.add_argument("--export", default="", help="export name (names: a prefix)")
        q.add_argument("--sources", default="",
                       help="source addresses, in turn: A, A+N or A,B,... (default: any)")
        q.add_argument("--connections", type=int, default=1)
        q.add_argument("--parallel", type=int, default=None,
                       help="connections opened at a time (default: all at once)")
        q.add_argument("--hold", type=float, default=None,
                       help="seconds to hold the connections (default: until SIGTERM/SIGINT)")
        q.set_defaults(func=lambda a: asyncio.run(_main(a)))
        return q

    q = nbd("pipeline", "negotiate, pipeline requests, never read a reply")
    q.add_argument("--depth", type=int, default=40, help="requests per connection")
    q.add_argument("--size", type=_size, default=32 << 20, help="bytes per request")
    q.add_argument("--command", choices=("read", "write", "block-status", "cache"),
                   default="read")
    q = nbd("stall", "stop at a point of the handshake")
    q.add_argument("--at", choices=STALLS, default="go")
    q.add_argument("--interval", type=float, default=5.0, help="trickle: seconds per option")
    q = nbd("churn", "connect and drop, as fast as it goes")
    q.add_argument("--duration", type=float, default=5.0)
    q.add_argument("--wait-close", action="store_true",
                   help="wait for the server to close each connection before the next")
    nbd("names", "NBD_OPT_GO for names made of control characters and forged log lines")
    q = sub.add_parser("streams", help="stalled POST /v1/chunks streams to a master")
    q.add_argument("--url", default="http://127.0.0.1:10810")
    q.add_argument("--sources", default="")
    q.add_argument("--streams", type=int, default=8)
    q.add_argument("--at", choices=STREAM_STALLS, default="read")
    q.add_argument("--digests", type=int, default=4096, help="digests per stream")
    q.add_argument("--rate", type=_size, default=1024, help="slow: bytes a second")
    q.add_argument("--version", default=None, help="IMI@VERSION (default: the first one)")
    q.add_argument("--token", default=None)
    q.add_argument("--site", default=None, help="the X-Icbd-Site header")
    q.add_argument("--answer-wait", type=float, default=2.0,
                   help="seconds to wait for each answer before holding it unanswered")
    q.add_argument("--hold", type=float, default=None)
    q.set_defaults(func=lambda a: asyncio.run(_main(a)))
