"""Planned restarts: a running server hands its listening sockets and live connections to its
successor, so that clients see no drop (``icbd-cache serve --handover PATH``; docs/serve.md).

The successor (N) is the new version started with the same arguments, by hand or by the old
server itself on SIGUSR2 (:func:`spawn_successor`). The two talk over the Unix stream socket
at PATH, where the running server (O) listens:

==========================================  ====================================================
N                                           O
==========================================  ====================================================
opens its store, connects to PATH,
``hello``                                   refuses (``refuse``: N exits 1), or stops
                                            accepting, closes its node services (PXE ports),
                                            sends ``listeners`` with the listening sockets
starts its services, accepts on the
received sockets, ``ready``                 for each connection: stops reading it, waits for
                                            its replies to be written, sends ``conn`` (the
                                            negotiated state, unparsed bytes, the socket)
adopts each (``resume`` of nbd.server)      ``done``; closes its store and exits
listens at PATH
==========================================  ====================================================

A connection crosses only between requests: nothing in flight, nothing queued, the bytes of a
request cut in two carried along; the kernel keeps what the client sends meanwhile in the
socket's receive queue. TLS connections cannot cross (the TLS state lives in the process):
they are drained and closed. Writable (copy-on-write) clients make O refuse: their overlays
live in O's memory.

Rollback: if N goes away before ``done``, O accepts again on the sockets it kept, restarts
its services and reads the connections it still holds again; a connection already sent is
lost with N (its client reconnects).

With ``serve --workers N`` each worker hands over on a socket of its own, ``PATH-wI``
(:func:`worker_path`), to the successor's worker of the same index; SIGUSR2 goes to the
parent, which starts the successor. N must equal the running server's number of workers: the
successor first asks (``probe``, answered ``{"op": "probe", "workers": N}`` without a
hand-over) and refuses to start otherwise (:func:`running_workers`).

Frames: an 8-byte header (JSON length, blob length, big-endian u32), the JSON object, the blob;
descriptors (SCM_RIGHTS) ride on the header's first byte. This module knows nothing of the
server: the two sides are the :class:`Giver` and :class:`Taker` protocols (icbdcache/server.py).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from icbdcache.log import kv

log = logging.getLogger("icbdcache.handover")

_HEADER = struct.Struct(">II")
#: Limits of a frame: JSON header, blob (unparsed bytes of one request: a WRITE header and up
#: to 32 MiB of payload), descriptors.
MAX_JSON = 1 << 20
MAX_BLOB = 64 << 20
MAX_FDS = 64
#: Seconds N waits for each message from O (O may drain a slow connection for --grace).
TAKER_TIMEOUT = 120.0
#: Seconds N waits for the answer to its ``probe``.
PROBE_TIMEOUT = 10.0
#: Seconds O waits for N's ``ready`` (N starts its services in between).
READY_TIMEOUT = 60.0
#: Seconds the listener waits for a peer's first frame (``probe`` or ``hello``).
FIRST_FRAME_TIMEOUT = 5.0


class HandoverError(Exception):
    """The hand-over cannot go on (the peer went away, refused, or sent garbage)."""


def worker_path(path: str, worker: int, workers: int) -> str:
    """The hand-over socket of worker ``worker`` of a server of ``workers`` workers: ``path``
    itself for a single process, else ``PATH-wI``."""
    return path if workers <= 1 else f"{path}-w{worker}"


# ----------------------------------------------------------------------------------- frames


class Channel:
    """Framed messages with descriptors over a connected Unix stream socket (blocking, with a
    timeout in seconds; call from a worker thread inside an event loop)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        sock.settimeout(timeout)

    def send(self, msg: dict[str, Any], fds: Sequence[int] = (), blob: bytes = b"") -> None:
        """Send one frame. Raises HandoverError."""
        body = json.dumps(msg).encode()
        head = _HEADER.pack(len(body), len(blob))
        try:
            if fds:
                socket.send_fds(self.sock, [head[:1]], list(fds))
                self.sock.sendall(head[1:] + body)
            else:
                self.sock.sendall(head + body)
            if blob:
                self.sock.sendall(blob)
        except OSError as e:
            raise HandoverError(f"sending {msg.get('op')}: {e}") from e

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except OSError as e:
                raise HandoverError(f"receiving: {e}") from e
            if not chunk:
                raise HandoverError("the other server closed the hand-over socket")
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[dict[str, Any], list[int], bytes]:
        """One frame: (message, descriptors, blob). Raises HandoverError."""
        fds = array.array("i")
        try:
            first, anc, flags, _ = self.sock.recvmsg(1, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except OSError as e:
            raise HandoverError(f"receiving: {e}") from e
        if not first:
            raise HandoverError("the other server closed the hand-over socket")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        received = list(fds)
        try:
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("too many descriptors in one frame")
            jlen, blen = _HEADER.unpack(first + self._exact(_HEADER.size - 1))
            if jlen > MAX_JSON or blen > MAX_BLOB:
                raise HandoverError(f"frame of {jlen}+{blen} bytes is over the limits")
            msg = json.loads(self._exact(jlen))
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise HandoverError("a frame without an op")
            blob = self._exact(blen) if blen else b""
        except (HandoverError, ValueError) as e:
            for fd in received:
                os.close(fd)
            raise HandoverError(str(e)) from e
        return msg, received, blob

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------ the two sides


@dataclass
class Outgoing:
    """One connection O is about to hand over: its state, the descriptor of its socket
    (still O's: :meth:`Giver.sent` closes it once sent), the unparsed bytes."""

    state: dict[str, Any]
    fd: int
    pending: bytes


class Giver(Protocol):
    """What the running server (O) does for a hand-over (icbdcache/server.py)."""

    def refusal(self) -> str | None:
        """Why this server cannot hand over now, or None."""

    def stop_accepting(self) -> list[tuple[str, int]]:
        """Stop accepting; (address, duplicated descriptor) of each listening socket."""

    async def resume_accepting(self, listeners: list[tuple[str, int]]) -> None:
        """Rollback: accept again on the sockets :meth:`stop_accepting` returned (it owns
        their descriptors then)."""

    async def stop_services(self) -> None: ...

    async def start_services(self) -> None: ...

    def live(self) -> list[Any]:
        """The connections to hand over (opaque to this module)."""

    async def quiesce(self, conn: Any, deadline: float) -> Outgoing | None:
        """Stop reading ``conn`` and wait (until ``deadline``, monotonic s) for its replies;
        its :class:`Outgoing`, or None when it cannot cross (it is then closed)."""

    def sent(self, conn: Any) -> None:
        """``conn`` crossed: forget it here without telling the client."""

    def resume(self, conn: Any) -> None:
        """Rollback: read ``conn`` again."""

    def finished(self) -> None:
        """Everything crossed: shut this process down."""


class Taker(Protocol):
    """What the new server (N) does for a hand-over (icbdcache/server.py)."""

    async def start_with(self, listeners: list[tuple[str, socket.socket]]) -> None:
        """Start the node's services and accept on ``listeners``."""

    async def adopt(self, state: dict[str, Any], sock: socket.socket, pending: bytes) -> bool:
        """Carry a connection on; False when it could not be (it is then closed)."""


# ------------------------------------------------------------------------------- O: giving


class Listener:
    """O's end: listens at ``path`` for a successor and runs :func:`give` for it (one at a
    time; a second one meanwhile is refused)."""

    def __init__(self, path: str, giver: Giver, grace: float, workers: int = 1) -> None:
        self.path = path
        self.giver = giver
        self.grace = grace
        self.workers = workers
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._talks: set[asyncio.Task[None]] = set()
        self._busy = False

    def start(self) -> None:
        """Listen (an old socket file at the path is replaced). Raises OSError."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = loop.create_task(self._one(conn))
            self._talks.add(task)
            task.add_done_callback(self._talks.discard)

    async def _one(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        chan = Channel(sock, READY_TIMEOUT)
        try:
            # The first frame is read before anything is refused, so a refusal is the
            # answer to it, not a closed socket (a successor's hello once met "Broken pipe"
            # when it came while the talk of its own probe was ending). A probe never makes
            # the listener busy. During a hand-over a probe is refused too: a successor then
            # finds no server to take from and does not start beside this one.
            sock.settimeout(FIRST_FRAME_TIMEOUT)  # a silent peer holds a thread this long
            msg, fds, _ = await asyncio.to_thread(chan.recv)
            sock.settimeout(READY_TIMEOUT)
            for fd in fds:
                os.close(fd)
            if self._busy:
                await asyncio.to_thread(chan.send, {"op": "refuse",
                                                    "reason": "a hand-over is under way"})
                return
            if msg.get("op") == "probe":
                await asyncio.to_thread(chan.send, {"op": "probe", "workers": self.workers})
                return
            self._busy = True
            try:
                await give(chan, msg, self.giver, self.grace)
            finally:
                self._busy = False
        except HandoverError as e:
            log.error(kv(handover="failed", error=e))
        finally:
            chan.close()

    def close(self, *, unlink: bool) -> None:
        """Stop listening; remove the socket file unless a successor listens there now."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


async def give(chan: Channel, msg: dict[str, Any], giver: Giver, grace: float) -> None:
    """O's side of one hand-over on ``chan``: N connected and sent ``msg`` (its first frame,
    which must be a ``hello``). Raises HandoverError after rolling back."""
    t0 = time.monotonic()
    if msg.get("op") != "hello":
        raise HandoverError(f"expected hello, got {msg.get('op')}")
    peer = msg.get("pid", "?")
    reason = giver.refusal()
    if reason is not None:
        log.warning(kv(handover="refused", to_pid=peer, reason=reason))
        await asyncio.to_thread(chan.send, {"op": "refuse", "reason": reason})
        return
    log.info(kv(handover="begin", to_pid=peer))
    listeners = giver.stop_accepting()
    await giver.stop_services()
    held = list(giver.live())
    try:
        await asyncio.to_thread(chan.send, {"op": "listeners",
                                            "addresses": [a for a, _ in listeners]},
                                [fd for _, fd in listeners])
        msg, fds, _ = await asyncio.to_thread(chan.recv)
        for fd in fds:
            os.close(fd)
        if msg["op"] != "ready":
            raise HandoverError(f"the successor did not start: {msg.get('reason', msg['op'])}")
        deadline = time.monotonic() + grace
        sent = closed = 0

        async def idle(conn: Any) -> tuple[Any, Outgoing | None]:
            return conn, await giver.quiesce(conn, deadline)

        # every connection stops reading at once; each crosses as soon as it is idle
        tasks = [asyncio.ensure_future(idle(c)) for c in held]
        try:
            for fut in asyncio.as_completed(tasks):
                conn, out = await fut
                held.remove(conn)
                if out is None:
                    closed += 1
                    continue
                try:
                    await asyncio.to_thread(chan.send, {"op": "conn", **out.state}, [out.fd],
                                            out.pending)
                except BaseException:
                    held.append(conn)  # not sent: it stays here
                    raise
                giver.sent(conn)
                sent += 1
        finally:
            for t in tasks:
                t.cancel()
        await asyncio.to_thread(chan.send, {"op": "done", "sent": sent, "closed": closed})
    except BaseException as e:
        log.error(kv(handover="rolled back", error=e, connections_kept=len(held)))
        for conn in held:
            giver.resume(conn)
        await giver.resume_accepting(listeners)
        await giver.start_services()
        raise
    for _, fd in listeners:
        os.close(fd)
    log.info(kv(handover="done", to_pid=peer, connections=sent, closed=closed,
                seconds=f"{time.monotonic() - t0:.3f}"))
    giver.finished()


# ------------------------------------------------------------------------------ N: taking


@dataclass
class Taken:
    """What a finished take-over brought: connections carried on and those that could not be."""

    adopted: int
    refused: int
    seconds: float


def connect(path: str) -> Channel | None:
    """A channel to the server listening at ``path``, or None when none listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as e:
        sock.close()
        raise HandoverError(f"--handover {path}: {e}") from e
    return Channel(sock, TAKER_TIMEOUT)


def running_workers(path: str) -> int | None:
    """The number of workers of the server handing over at ``path`` (``--handover PATH``:
    its single process at PATH, or its worker 0 at ``PATH-w0``), or None when none runs
    there. Raises HandoverError when one answers with garbage."""
    for where in (path, worker_path(path, 0, 2)):
        chan = connect(where)
        if chan is None:
            continue
        chan.sock.settimeout(PROBE_TIMEOUT)
        try:
            chan.send({"op": "probe"})
            msg, fds, _ = chan.recv()
        finally:
            chan.close()
        for fd in fds:
            os.close(fd)
        if msg.get("op") == "refuse":  # a hand-over is under way there: a worker answers
            continue
        try:
            return int(msg["workers"])
        except (KeyError, TypeError, ValueError):
            raise HandoverError(f"--handover {where}: a bad answer to a probe: {msg}") from None
    return None


async def take(chan: Channel, taker: Taker) -> Taken:
    """N's side: take the listening sockets and the connections of the server at the other
    end of ``chan``. Raises HandoverError (refused, or O went away before the listeners
    came)."""
    t0 = time.monotonic()
    await asyncio.to_thread(chan.send, {"op": "hello", "pid": os.getpid()})
    msg, fds, _ = await asyncio.to_thread(chan.recv)
    if msg["op"] == "refuse":
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"the running server refuses: {msg.get('reason')}")
    if msg["op"] != "listeners":
        raise HandoverError(f"expected listeners, got {msg['op']}")
    addresses = msg.get("addresses", [])
    listeners = [(str(a), socket.socket(fileno=fd)) for a, fd in zip(addresses, fds, strict=True)]
    try:
        await taker.start_with(listeners)
    except BaseException as e:
        with contextlib.suppress(HandoverError):
            await asyncio.to_thread(chan.send, {"op": "abort", "reason": str(e)})
        raise
    await asyncio.to_thread(chan.send, {"op": "ready"})
    adopted = refused = 0
    try:
        while True:
            msg, fds, blob = await asyncio.to_thread(chan.recv)
            if msg["op"] == "done":
                for fd in fds:
                    os.close(fd)
                break
            if msg["op"] != "conn" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise HandoverError(f"unexpected {msg['op']} with {len(fds)} descriptors")
            if await taker.adopt(msg, socket.socket(fileno=fds[0]), blob):
                adopted += 1
            else:
                refused += 1
    except HandoverError as e:
        # O went away mid-way: what crossed is ours, the rest reconnects
        log.error(kv(handover="cut short", error=e, adopted=adopted))
    finally:
        chan.close()
    return Taken(adopted, refused, time.monotonic() - t0)


def spawn_successor() -> subprocess.Popen[bytes]:
    """Start this program again with the arguments it was started with (the code on disk
    now: an upgrade), to take over through ``--handover``. Raises OSError."""
    argv = list(sys.orig_argv) or [sys.executable, *sys.argv]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
