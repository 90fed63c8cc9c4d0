"""The parts both drivers of ``icbd-bench bootstorm`` share: what a storm is (:class:`Scenario`)
and the resolved options (:class:`Settings`), the servers under test and the upstream they
fault from, starting and probing their processes, and the figures read from them (CPU, peak
RSS, upstream reads, icbd-cache counters).

Notes on the design:

- ``bench/bootstorm.py`` (the options, the trace driver, its summary and report) and
  ``bench/vmdriver.py`` (real guests) both import this module; it imports neither, so the
  dependency runs one way: ``bootstorm -> vmdriver -> storm`` and ``bootstorm -> storm``.
- SIGTERM: :func:`sigterm_handler` is given the PID of the process that runs the benchmark and
  returns a handler bound to it (no module global written from elsewhere). In that process the
  signal ends the benchmark like Ctrl-C; in a forked helper (pyroute2 forks to work inside a
  namespace, and stops it with SIGTERM) it exits at once instead of unwinding the bench's
  stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import netlab, servers
from bench.serve import warm_page_cache

#: Bytes in a MiB.
MIB = 1 << 20

#: icbd-cache's chunk size (docs/store.md), for the expected upstream traffic.
CHUNK_SIZE = 64 * 1024

#: Every server the benchmark knows, in run order (icbd-warm needs icbd-cold's store).
SERVER_NAMES: tuple[str, ...] = ("icbd-cold", "icbd-warm", "nbdkit", "nbdkit-cache", "qemu-nbd")

#: Servers that read the image from the upstream across the WAN.
UPSTREAM_SERVERS = frozenset({"icbd-cold", "icbd-warm", "nbdkit-cache"})

#: The export name the servers under test serve by default; the upstream's is always this one.
EXPORT = servers.EXPORT

#: The executable of each server.
_BINARY = {"icbd-cold": "icbd-cache", "icbd-warm": "icbd-cache", "nbdkit": "nbdkit",
           "nbdkit-cache": "nbdkit", "qemu-nbd": "qemu-nbd"}


@dataclass(frozen=True)
class Scenario:
    """``clients`` clients started ``mode`` (``simultaneous`` or ``sequential``)."""

    mode: str
    clients: int

    @property
    def key(self) -> str:
        """``alone`` for one client, else ``MODE-N``."""
        return "alone" if self.clients == 1 else f"{self.mode}-{self.clients}"

    @property
    def label(self) -> str:
        """For people: ``1 alone``, ``15 simultaneous``."""
        return "1 alone" if self.clients == 1 else f"{self.clients} {self.mode}"


@dataclass(frozen=True)
class Settings:
    """Resolved options of a run (``--quick`` applied; made by :func:`bench.bootstorm.resolve`).
    Rates in bits/s, times in seconds."""

    scenarios: list[Scenario]
    servers: list[str]
    trace: Path
    requests: int | None
    think_scale: float
    image: Path | None
    shaping: netlab.Shaping
    net: str
    timeout: float | None
    wait_idle: float | None
    wait_idle_max: float
    icbd_args: list[str]
    out: Path
    tmpdir: Path | None
    sweep: bool
    driver: str = "trace"
    reps: int = 1
    vm_mem: int = 320
    vm_timeout: float | None = None
    accel: str = "auto"


# --------------------------------------------------------------------------- building blocks


_LOG_READ = re.compile(r"connection=\d+ Read id=\d+ offset=(0x[0-9a-fA-F]+) "
                       r"count=(0x[0-9a-fA-F]+)")


def log_reads(path: Path) -> list[tuple[int, int]]:
    """(offset, count) of every read in an nbdkit log-filter file, in bytes."""
    out: list[tuple[int, int]] = []
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        for line in f:
            m = _LOG_READ.search(line)
            if m:
                out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def peak_rss(pid: int) -> int | None:
    """Peak resident set (VmHWM, bytes) of ``pid`` plus its live descendants; None if gone."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(OSError), open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total or None


def cpu_busy(before: Any, after: Any) -> tuple[float, float]:
    """Machine-wide CPU busy % (everything but idle and iowait) and soft-interrupt % between
    two :func:`psutil.cpu_times` readings."""
    delta = {k: getattr(after, k) - getattr(before, k) for k in after._fields}
    total = sum(delta.values()) or 1.0
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    return 100 * (total - idle) / total, 100 * delta.get("softirq", 0.0) / total


def warm_store(store: Path) -> None:
    """Read a store's LMDB file once so that the page cache holds it."""
    data = store / "data.mdb"
    if data.exists():
        warm_page_cache(data)


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          port: int = 0) -> servers.RunningServer:
    """Start ``argv`` in a session of its own, output appended to ``log``."""
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env} if env else None)
    return servers.RunningServer(name, proc, port, argv, log)


def wait_ready(net: netlab.Network, role: str, host: str, port: int,
               procs: Sequence[servers.RunningServer], timeout: float = 60.0,
               export: str = EXPORT) -> int:
    """Wait until NBD export ``export`` answers on ``host:port`` as seen from ``role``;
    return its size in bytes. Raises ServerError when a process in ``procs`` exits first or
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    probe = net.argv(role, [sys.executable, "-m", "bench.replay", "probe", host, str(port),
                            export, "--timeout", "3"])
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise servers.ServerError(f"{p.name} exited with {p.proc.returncode}:\n"
                                          f"{p.log_tail()}")
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0:
            return int(out.stdout.strip())
        last = out.stderr.strip()[-500:]
    raise servers.ServerError(f"nothing served {host}:{port}/{export} within {timeout:.0f} s: "
                              f"{last}")


@dataclass
class Upstream:
    """The upstream nbdkit (with its log filter) and the delay relay in front of it.
    ``host``/``port``: where the site reaches it."""

    nbdkit: servers.RunningServer
    relay: servers.RunningServer | None
    log: Path
    relay_stats: Path | None
    host: str
    port: int

    def cpu_seconds(self) -> float:
        """CPU seconds used by the upstream nbdkit so far."""
        return self.nbdkit.cpu_seconds()

    def relay_counts(self) -> netlab.RelayStats | None:
        """The relay's byte counters (None without a relay)."""
        return None if self.relay_stats is None else netlab.read_relay_stats(self.relay_stats)

    def stop(self) -> None:
        """Stop the relay, then nbdkit (its log is complete afterwards)."""
        if self.relay is not None:
            self.relay.stop()
        self.nbdkit.stop()


@contextlib.contextmanager
def upstream(net: netlab.Network, nbdkit: str, image: Path, run_dir: Path,
             log_dir: Path, tag: str) -> Iterator[Upstream]:
    """Context manager: the upstream nbdkit (log filter, one line per request in
    ``log_dir/upstream-TAG.requests.log``) and, when the WAN has a delay, the relay in front
    of it, both in the upstream namespace; stopped on exit."""
    delay = net.shaping.wan_delay
    log = log_dir / f"upstream-{tag}.requests.log"
    port = net.port("upstream")
    listen = net.upstream_local if delay else net.upstream_host
    argv = net.argv("upstream", [nbdkit, "-r", "-f", "-p", str(port), "-i", listen,
                                 "--exit-with-parent", "--filter=log", "file", str(image),
                                 f"logfile={log}"])
    up = spawn("upstream", argv, log_dir / f"upstream-{tag}.log", port=port)
    relay: servers.RunningServer | None = None
    stats: Path | None = None
    try:
        host, rport = listen, port
        if delay:
            rport = net.port("upstream")
            stats = run_dir / "relay.json"
            rargv = net.argv("upstream", [
                sys.executable, "-m", "bench.netlab", "relay", "--listen",
                f"{net.upstream_host}:{rport}", "--connect", f"{listen}:{port}",
                "--delay", repr(delay), "--stats", str(stats)])
            relay = spawn("relay", rargv, log_dir / f"relay-{tag}.log", port=rport)
            host = net.upstream_host
        u = Upstream(up, relay, log, stats, host, rport)
        wait_ready(net, "site", host, rport, [p for p in (up, relay) if p is not None])
        yield u
    finally:
        if relay is not None:
            relay.stop()
        up.stop()


def server_argv(name: str, binary: str, image: Path, host: str, port: int,
                up: tuple[str, int] | None, store: Path | None, extra: Sequence[str],
                export: str = EXPORT) -> list[str]:
    """The argv of server ``name`` listening on ``host:port`` (before the namespace prefix);
    ``up`` is the upstream's (host, port), ``store`` icbd-cache's store directory, ``export``
    the name clients ask for (nbdkit serves any name; the upstream's is always ``img``)."""
    if name in ("icbd-cold", "icbd-warm"):
        assert up is not None and store is not None
        return [binary, "serve", "--store", str(store), "--create-store", "--export",
                f"{export}=nbd://{up[0]}:{up[1]}/{EXPORT}", "--listen", f"{host}:{port}",
                *extra]
    if name == "nbdkit":
        return [binary, "-r", "-f", "-p", str(port), "-i", host, "--exit-with-parent",
                "file", str(image)]
    if name == "nbdkit-cache":
        assert up is not None
        return [binary, "-r", "-f", "-p", str(port), "-i", host, "--exit-with-parent",
                "--filter=cache", "nbd", f"hostname={up[0]}", f"port={up[1]}",
                f"export={EXPORT}", "cache-on-read=true"]
    if name == "qemu-nbd":
        return [binary, "-r", "-t", "-e", "0", "-x", export, "-p", str(port), "-b", host,
                "-f", "raw", str(image)]
    raise ValueError(f"unknown server {name!r}")


def icbd_stats(icbd: str, store: Path) -> dict[str, int]:
    """The persistent counters of an icbd-cache store (``icbd-cache stats --json``)."""
    if not (store / "data.mdb").exists():
        return {}
    out = subprocess.run([icbd, "stats", "--json", "--store", str(store)], capture_output=True,
                         text=True, timeout=60, check=False)
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in doc.items() if isinstance(v, int)}


def icbd_code_version(binary: str) -> str:
    """``icbd-cache VERSION (git COMMIT)``, plus ``+dirty`` when the checkout's server code
    (``icbdcache/``, ``nbd/``) has uncommitted changes."""
    version = servers.tool_version(binary)
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "icbdcache", "nbd"],
                             capture_output=True, text=True, timeout=10, check=False, cwd=repo)
    except (OSError, subprocess.TimeoutExpired):
        return version
    return version + (" +dirty" if out.returncode == 0 and out.stdout.strip() else "")


def sigterm_handler(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler for the benchmark run by process ``main_pid``: there it raises
    KeyboardInterrupt (the run ends like Ctrl-C and writes what it measured); in any other
    process (a forked helper) it exits at once with status 0."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(0)
        raise KeyboardInterrupt(f"signal {signum}")

    return handler


def find_binaries(names: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Executables of the servers ``names`` (and of the upstream nbdkit, under ``upstream``,
    when a server needs it): the ones found (name -> path) and the ones missing (name -> why).
    A server whose upstream cannot run is missing too."""
    found: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name in names:
        b = servers.find_tool(_BINARY[name])
        if b is None:
            missing[name] = servers.missing_message(_BINARY[name])
        else:
            found[name] = b
    if any(n in UPSTREAM_SERVERS for n in found):
        nbdkit = servers.find_tool("nbdkit")
        if nbdkit is None:
            for n in [n for n in found if n in UPSTREAM_SERVERS]:
                missing[n] = "the upstream needs " + servers.missing_message("nbdkit")
                del found[n]
        else:
            found["upstream"] = nbdkit
    return found, missing
