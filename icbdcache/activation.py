"""systemd's side of a restart: listening sockets passed in (socket activation) and readiness
sent out (``sd_notify``), without linking libsystemd.

Socket activation (systemd.socket(5), sd_listen_fds(3)): a ``.socket`` unit holds the
listening sockets and starts the service with them as descriptors 3, 4, ... and
``LISTEN_FDS=N``, ``LISTEN_PID=<its pid>``. Because the sockets outlive the process, a client
that connects while the server restarts (a crash, an upgrade) waits in the kernel's accept
queue instead of being refused; the new process accepts it as soon as it is up.

Readiness (sd_notify(3)): with ``Type=notify`` the server sends ``READY=1`` once it accepts
connections, and after taking over from a predecessor (``serve --handover``) also
``MAINPID=<pid>``, so systemd follows the new process (``NotifyAccess=all``).
"""

from __future__ import annotations

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


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``MAINPID=123\\nREADY=1``, ...) to ``$NOTIFY_SOCKET``;
    False when there is none or it cannot be reached (never raises)."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path
    with contextlib.suppress(OSError), \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(message.encode())
        return True
    return False
