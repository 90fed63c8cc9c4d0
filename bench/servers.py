"""Start and stop the NBD servers under test, and measure the CPU time they use.

Every server is started as a real process of its own (a new session, so that its process group id
is its PID), listens on 127.0.0.1 on a port the kernel picked a moment before, and is stopped by
that PID: SIGTERM, then SIGKILL to its process group after a grace time, then SIGKILL to any
descendant still alive. Callers use :func:`running` so that this happens on every path out.

The servers serve the same raw file read-only under the export name ``img``:

- ``icbd``: ``icbd-cache serve --export img=PATH --listen 127.0.0.1:PORT [--icbd-args ...]``
- ``icbd-store`` (warm store): ``icbd-cache serve --store STORE`` where STORE holds the image
  whole (``icbd-cache import PATH --imi img --copy``), read twice before each measured run
  (``icbd-bench serve`` also runs the workload itself, over 8 connections at least, for
  ``--store-warmup`` seconds first) so
  the hot set of each of the server's workers is as a boot storm leaves it
- ``icbd-cold`` (cold store): ``icbd-cache serve --store EMPTY --export img=nbd://UPSTREAM/``
  faulting every chunk from an ``nbdkit file PATH`` upstream on loopback
- ``nbdkit``: ``nbdkit -r -f -p PORT -i 127.0.0.1 --exit-with-parent file PATH`` (nbdkit accepts
  any export name)
- ``qemu-nbd``: ``qemu-nbd -r -t -e 0 -x img -p PORT -b 127.0.0.1 -f raw PATH`` (``-e 0``: any
  number of clients, since qemu-nbd otherwise accepts one connection at a time)

For a write workload each serves it writable (:func:`server_command` with ``scratch``): icbd-cache
and icbd-store through a per-client copy-on-write overlay in ``SCRATCH/cow`` (``,cow`` or
``--store-cow``, ``--cow-max 0``), nbdkit's file plugin and qemu-nbd on ``SCRATCH/img.raw``, a
copy of the image; icbd-cold serves reads only.

Each icbd server has a ``-base`` twin (``icbd-store-base``, ...) run with another build of
``icbd-cache`` (``icbd-bench serve --baseline-bin PATH``, e.g. the previous release installed in
a venv of its own), so a change is measured before and after in one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from icbdcache.commands import demostack

#: Every server the benchmark knows, in the order runs go (A B C A B C).
SERVER_NAMES: tuple[str, ...] = ("icbd", "icbd-store", "icbd-cold", "nbdkit", "qemu-nbd")
#: The servers run when none are named (``--store`` adds the two store-backed ones).
DEFAULT_SERVERS: tuple[str, ...] = ("icbd", "nbdkit", "qemu-nbd")
#: The store-backed variants of icbd (``icbd-bench serve --store``).
STORE_SERVERS: tuple[str, ...] = ("icbd-store", "icbd-cold")

#: The server the ratios are taken against.
BASELINE = "nbdkit"

#: Servers that cannot run a write workload.
READ_ONLY_SERVERS: tuple[str, ...] = ("icbd-cold",)

#: Suffix of an icbd server run with the ``--baseline-bin`` build.
BASE_SUFFIX = "-base"


def kind(name: str) -> str:
    """The server a name runs: ``icbd-store-base`` runs ``icbd-store`` with the baseline build."""
    return name.removesuffix(BASE_SUFFIX)


def base_twin(name: str) -> str:
    """The ``-base`` twin of an icbd server name."""
    return name + BASE_SUFFIX


def known(name: str) -> bool:
    """Whether ``name`` is a server the benchmark can run."""
    k = kind(name)
    return k in SERVER_NAMES and (k == name or k.startswith("icbd"))

#: Export name every server is asked to serve (nbdkit ignores it and serves any name).
EXPORT = "img"

#: Debian package that brings each binary, for the "missing" message.
_PACKAGE = {"icbd-cache": "this project (scripts/setup)", "nbdkit": "nbdkit",
            "qemu-nbd": "qemu-utils", "fio": "fio", "nbdcopy": "libnbd-bin",
            "nbdinfo": "libnbd-bin"}

_BINARY = {"icbd": "icbd-cache", "icbd-store": "icbd-cache", "icbd-cold": "icbd-cache",
           "nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd"}


class ServerError(RuntimeError):
    """A server could not be started (it exited, or never served the export)."""


def find_tool(name: str) -> str | None:
    """Path of an executable: PATH first, then the directory of the running Python (a venv)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def missing_message(tool: str) -> str:
    """A one-line explanation that ``tool`` is not installed, naming what installs it."""
    return f"{tool} not found on PATH (install: {_PACKAGE.get(tool, tool)})"


def server_binary(name: str, baseline: str | None = None) -> str | None:
    """Path of the executable for server ``name`` (one of :data:`SERVER_NAMES`, or an icbd
    server's ``-base`` twin, which runs ``baseline``), or None."""
    if name != kind(name):
        return baseline if baseline and os.access(baseline, os.X_OK) else None
    return find_tool(_BINARY[name])


def binary_name(name: str) -> str:
    """The executable's name for server ``name``, e.g. ``icbd-cache`` for ``icbd``."""
    return _BINARY[kind(name)]


def scratch_image(scratch: Path) -> Path:
    """Where a write run of nbdkit or qemu-nbd finds its copy of the image."""
    return scratch / "img.raw"


def server_command(name: str, binary: str, image: Path, port: int,
                   extra: Sequence[str] = (), scratch: Path | None = None) -> list[str]:
    """The argv that serves ``image`` as export ``img`` on 127.0.0.1:``port``: read-only, or
    with ``scratch`` writable (see the module notes; raises ValueError for icbd-cold).

    ``extra`` is appended for ``icbd`` only (the ``--icbd-args`` of the CLI).
    """
    path = str(image)
    name = kind(name)
    listen = ["--listen", f"127.0.0.1:{port}"]
    cow = ["--cow-dir", str(scratch / "cow"), "--cow-max", "0"] if scratch else []
    if name == "icbd":
        spec = f"{EXPORT}={path}" + (",cow" if scratch else "")
        return [binary, "serve", "--export", spec, *cow, *listen, *extra]
    if name == "icbd-store":
        store_cow = ["--store-cow", *cow] if scratch else []
        return [binary, "serve", "--store", str(warm_store(binary, image)), *store_cow,
                *listen, *extra]
    if name == "icbd-cold":
        if scratch:
            raise ValueError("icbd-cold serves reads only")
        return cold_store_command(binary, image, port, extra)
    ro = [] if scratch else ["-r"]
    target = str(scratch_image(scratch)) if scratch else path
    if name == "nbdkit":
        return [binary, *ro, "-f", "-p", str(port), "-i", "127.0.0.1", "--exit-with-parent",
                "file", target]
    if name == "qemu-nbd":
        return [binary, *ro, "-t", "-e", "0", "-x", EXPORT, "-p", str(port), "-b", "127.0.0.1",
                "-f", "raw", target]
    raise ValueError(f"unknown server {name!r}")


def warm_store(binary: str, image: Path) -> Path:
    """A store beside ``image`` holding it whole as iMI ``img`` (``icbd-cache import --copy``),
    made once per image and build and reused: the warm-store server serves it from LMDB. Each
    build (``binary``, by its resolved path) imports its own store, so a ``--baseline-bin``
    build is measured on a store of its own format (an older build cannot read a newer
    store, and a newer one would have to upgrade an older store in place).

    Raises subprocess.CalledProcessError when the import fails."""
    tag = hashlib.blake2b(str(Path(binary).resolve()).encode(), digest_size=4).hexdigest()
    store = image.with_name(f"{image.name}.icbd-store-{tag}")
    if not (store / "data.mdb").exists():
        subprocess.run([binary, "import", str(image), "--imi", EXPORT, "--version", "1",
                        "--copy", "--store", str(store)], check=True, capture_output=True)
    return store


def cold_store_command(binary: str, image: Path, port: int, extra: Sequence[str]) -> list[str]:
    """A shell that starts an upstream ``nbdkit file`` (bound to its parent's life) on a free
    port, then becomes ``icbd-cache serve`` with an empty store faulting everything from it.
    The server's CPU figures include the upstream's."""
    up = free_port()
    store = image.with_name(f"{image.name}.cold-{port}")
    nbdkit = find_tool("nbdkit") or "nbdkit"
    nbdinfo = find_tool("nbdinfo") or "nbdinfo"
    script = (
        f'rm -rf "{store}"; "{nbdkit}" -r -f -p {up} -i 127.0.0.1 --exit-with-parent '
        f'file "{image}" & '
        f"for i in $(seq 100); do \"{nbdinfo}\" --size nbd://127.0.0.1:{up} >/dev/null 2>&1 "
        f"&& break; sleep 0.1; done; "
        # an empty store must be asked for (a build older than --create-store makes one)
        f'c=; "$0" serve --help 2>/dev/null | grep -q -- --create-store && c=--create-store; '
        f'exec "$0" serve --store "{store}" $c --export {EXPORT}=nbd://127.0.0.1:{up}/ '
        f'--listen 127.0.0.1:{port} "$@"'
    )
    return ["sh", "-c", script, binary, *extra]


def _icbd_version(binary: str | None = None) -> str:
    """``icbd-cache VERSION (git COMMIT)``: the installed package and the commit of the
    checkout ``binary`` was installed from (``CHECKOUT/.venv/bin/icbd-cache``), or of this
    checkout when that is not a git checkout."""
    try:
        version = importlib.metadata.version("icbd-cache")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    here = Path(__file__).resolve().parent
    places = [Path(binary).absolute().parent.parent.parent] if binary else []
    commit = ""
    for cwd in [*places, here]:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=10, check=False, cwd=cwd)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
            break
    return f"icbd-cache {version}" + (f" (git {commit})" if commit else "")


def tool_version(binary: str) -> str:
    """First line of ``binary --version`` (``NAME ?`` if it cannot be run)."""
    if Path(binary).name == "icbd-cache":
        return _icbd_version(binary)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return f"{Path(binary).name} ?"
    if out.returncode != 0:
        return f"{Path(binary).name} ?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    if not lines:
        return "?"
    first, _, rest = lines[0].partition(" ")
    return f"{Path(first).name} {rest}".strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (:func:`demostack.free_port`)."""
    return demostack.free_port()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and all its descendants.

    Counts live descendants directly and reaped ones through the parent's children times, so the
    difference of two readings is the CPU used in between even if workers come and go. Returns
    0.0 for a process that is gone.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class RunningServer:
    """A server process started by :func:`start_server`."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    cmd: list[str]
    log: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """The server's PID (also its process group id)."""
        return int(self.proc.pid)

    @property
    def uri(self) -> str:
        """NBD URI of the export, e.g. ``nbd://127.0.0.1:40123/img``."""
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server and its descendants (user + system)."""
        return tree_cpu_seconds(self.pid)

    def alive(self) -> bool:
        """True while the server process has not exited."""
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters of the server's output."""
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server by PID: SIGTERM, SIGKILL to its group after ``grace`` seconds.

        Descendants still alive afterwards (workers that left the group) are killed by PID too.
        Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        for k in kids:
            with contextlib.suppress(psutil.Error):
                if k.is_running():
                    k.kill()


def _ready(server: RunningServer, size: int, nbdinfo: str | None) -> bool:
    """True once the export answers: nbdinfo reports ``size`` bytes, or TCP accepts."""
    if nbdinfo:
        try:
            out = subprocess.run([nbdinfo, "--size", server.uri], capture_output=True, text=True,
                                 timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        if out.returncode != 0:
            return False
        got = int(out.stdout.strip() or -1)
        if got != size:
            raise ServerError(f"{server.name} serves {got} bytes, expected {size}")
        return True
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
            return True
    except OSError:
        return False


def start_server(name: str, binary: str, image: Path, log_dir: Path,
                 extra: Sequence[str] = (), tag: str = "", timeout: float = 30.0,
                 attempts: int = 3, scratch: Path | None = None) -> RunningServer:
    """Start server ``name`` on a free 127.0.0.1 port and wait until it serves ``image``
    (writable with ``scratch``: :func:`server_command`).

    Output goes to ``log_dir/NAME[-TAG].log``. A server that exits at once (e.g. the port was
    taken between picking and binding) is retried on a new port up to ``attempts`` times.
    ``timeout`` is in seconds per attempt. Raises :class:`ServerError`; never leaves a process
    behind.
    """
    size = image.stat().st_size
    nbdinfo = find_tool("nbdinfo")
    log = log_dir / (f"{name}-{tag}.log" if tag else f"{name}.log")
    last = ""
    for _ in range(attempts):
        port = free_port()
        cmd = server_command(name, binary, image, port, extra, scratch)
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        srv = RunningServer(name, proc, port, cmd, log)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not srv.alive():
                    break
                if _ready(srv, size, nbdinfo):
                    return srv
                time.sleep(0.05)
            else:
                raise ServerError(f"{name} did not serve {srv.uri} within {timeout:.0f}s:\n"
                                  f"{srv.log_tail()}")
            last = f"{name} exited with {srv.proc.returncode}:\n{srv.log_tail()}"
        except BaseException:
            srv.stop()
            raise
        srv.stop()
    raise ServerError(last)


@contextlib.contextmanager
def running(name: str, binary: str, image: Path, log_dir: Path, extra: Sequence[str] = (),
            tag: str = "", scratch: Path | None = None) -> Iterator[RunningServer]:
    """Context manager: a started server (writable with ``scratch``), stopped by PID when the
    block exits in any way."""
    srv = start_server(name, binary, image, log_dir, extra, tag, scratch=scratch)
    try:
        yield srv
    finally:
        srv.stop()
