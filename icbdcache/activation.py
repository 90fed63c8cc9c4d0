"""systemd's side of a restart: listening sockets passed in (socket activation) and readiness
sent out (``sd_notify``), without linking libsystemd.

Socket activation (systemd.socket(5), sd_listen_fds(3)): a ``.socket`` unit holds the
listening sockets and starts the service with them as descriptors 3, 4, ... and
``LISTEN_FDS=N``, ``LISTEN_PID=<its pid>``. Because the sockets outlive the process, a client
that connects while the server restarts (a crash, an upgrade) waits in the kernel's accept
queue instead of being refused; the new process accepts it as soon as it is up.

Readiness (sd_notify(3)): with ``Type=notify`` a long-running command (``serve``, ``master``,
``replica``, ``pxe serve``) sends ``READY=1`` once it accepts connections, after taking over
from a predecessor (``serve --handover``) also ``MAINPID=<pid>``, so systemd follows the new
process (``NotifyAccess=all``), and ``STOPPING=1`` when it begins to shut down.

Watchdog (sd_watchdog_enabled(3)): with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``); :class:`Watchdog` then sends ``WATCHDOG=1`` from the event loop every half
of that, so a process whose loop hangs is restarted.

The protocol is one datagram on a Unix socket; it is written here rather than taken from a
package: the maintained pure-Python one (``systemd-watchdog``) sends no ``MAINPID=`` or
``STOPPING=1``, takes a ``WATCHDOG_PID`` of this very process only (a ``serve --workers``
worker or a hand-over successor would never ping), and raises when the socket is gone, and
a service must not die because its manager's socket did. ``sdnotify`` sends any message and
swallows errors, but has had no release since 2017; the protocol is twenty lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

#: The first passed descriptor (sd_listen_fds(3): SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_sockets(environ: dict[str, str] | None = None, *,
                   pid: int | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed to this process, in order (empty when none
    were passed or they are meant for another process). Removes ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from ``environ`` (default ``os.environ``) so child
    processes do not take them for theirs. Raises ValueError for a passed descriptor that is
    not a listening stream socket."""
    env = os.environ if environ is None else environ
    want_pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if want_pid is None or count is None:
        return []
    if not want_pid.isdigit() or int(want_pid) != (os.getpid() if pid is None else pid):
        return []
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS={count!r} is not a number")
    socks: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            raise ValueError(f"passed descriptor {fd} is not a socket: {e}") from None
        if s.type != socket.SOCK_STREAM or not s.getsockopt(socket.SOL_SOCKET,
                                                           socket.SO_ACCEPTCONN):
            s.detach()
            raise ValueError(f"passed descriptor {fd} is not a listening stream socket")
        os.set_inheritable(fd, False)
        socks.append(s)
    return socks


#: Seconds :func:`notify` waits for room in the manager's queue (a full queue blocks a Unix
#: datagram sender; ``net.unix.max_dgram_qlen`` is 10 by default).
NOTIFY_WAIT = 1.0


def notify(message: str, environ: dict[str, str] | None = None, *,
           wait: float = NOTIFY_WAIT) -> bool:
    """Send ``message`` (``READY=1``, ``MAINPID=123\\nREADY=1``, ...) to ``$NOTIFY_SOCKET``,
    waiting at most ``wait`` seconds (0: not at all) for room in its queue; False when there
    is none, it cannot be reached or it has no room (never raises). The event loop sends
    these: a manager that reads nothing must not stop it."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path
    with contextlib.suppress(OSError), \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(wait)
        s.connect(addr)
        s.sendall(message.encode())
        return True
    return False


def ready(status: str = "", *, mainpid: int | None = None,
          environ: dict[str, str] | None = None) -> bool:
    """``READY=1`` (with ``MAINPID=`` after a hand-over, and ``STATUS=`` text if given);
    False when there is no one to tell (:func:`notify`)."""
    lines = [f"MAINPID={mainpid}"] if mainpid is not None else []
    lines.append("READY=1")
    if status:
        lines.append(f"STATUS={status}")
    return notify("\n".join(lines), environ)


def stopping(status: str = "", *, environ: dict[str, str] | None = None,
             wait: float = NOTIFY_WAIT) -> bool:
    """``STOPPING=1``: the service begins to shut down (``wait``: as :func:`notify`)."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""), environ,
                  wait=wait)


def watchdog_interval(environ: dict[str, str] | None = None, *,
                      pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC`` when systemd's watchdog
    watches this process and there is a ``NOTIFY_SOCKET``; else None. ``WATCHDOG_PID``, when
    set, must be this process (``pid``, default ours) or its parent: a ``serve --workers``
    worker, or the successor a server started on SIGUSR2, which becomes the main process (the
    units have ``NotifyAccess=all``)."""
    env = os.environ if environ is None else environ
    usec, want = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or not env.get("NOTIFY_SOCKET"):
        return None
    ours = {os.getpid(), os.getppid()} if pid is None else {pid}
    if want is not None and (not want.isdigit() or int(want) not in ours):
        return None
    return int(usec) / 2e6


class Watchdog:
    """``WATCHDOG=1`` every :func:`watchdog_interval` seconds from the running event loop
    (nothing when the watchdog is off). The pings come from the loop itself, so a loop that
    stops turning stops them."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = environ
        self.interval = watchdog_interval(environ)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Ping now and then every interval (in the running loop)."""
        if self.interval is None or self._handle is not None:
            return
        self._ping()

    def _ping(self) -> None:
        notify("WATCHDOG=1", self.environ, wait=0)  # a full queue: this ping is dropped
        assert self.interval is not None
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._ping)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
