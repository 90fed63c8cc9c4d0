"""``icbd-bench replication``: replicating a new iMI version to a site, icbd against rsync.

A real pair of versions (:mod:`bench.imipair`: v1 a debootstrapped Debian image of about 1 GB
used, v2 = v1 updated in place with apt) is moved from a "master" to a "site" in every way:

* ``rsync``: an rsync daemon started by the bench (its own config in the work directory) serves
  v2 as ``imi.img``; the client runs ``rsync -a --inplace --sparse --ignore-times --stats``.
  ``--inplace`` is what rsync users replicating disk images use (no second copy of the image
  at the destination); ``--ignore-times`` only makes sure the quick check never skips a run.
  ``rsync-zstd`` adds ``--compress --compress-choice=zstd --compress-level=L``.
* ``icbd``: ``icbd-cache master`` on a store where v1 then v2 were published, and
  ``icbd-cache replica --once`` pulling into a site store; modes plain, ``zstd``
  (``--compress zstd:L``), ``tls`` (https master with a test CA made in the work directory,
  replica token) and ``zstd-tls``.

Two kinds of transfer: **full** (the site holds nothing: an empty destination directory or
store) and **delta** (the site holds v1: the same file name for rsync, which then runs its
rolling-checksum algorithm; a store holding v1, for icbd, which then asks only for the chunks
it lacks).

Measured per run: wall time (s) of the client from start to exit; CPU seconds of both ends
(the client's rusage, children included; the server's CPU time delta, its children included,
by psutil); bytes on the wire (both directions, headers included) from the kernel's counters of
the interface the transfer crosses: ``lo`` of a network namespace made for the bench (still
127.0.0.1, nothing else on it), or the shaped veth of ``--link``. Ratios are to ``rsync``
(plain) in the same run and repetition. The reference for bytes is the zstd-compressed size
(same level, one stream) of the chunks of v2 that v1 lacks. The site's copy is checked after
every run (sha256 of the rsync file; chunk map and chunks held for the icbd store).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import imipair, netlab, repllimit, serve

MIB = 1 << 20
#: The transfers, in the order they run within a repetition; the first is the baseline.
TOOLS: tuple[str, ...] = ("rsync", "rsync-zstd", "icbd", "icbd-zstd", "icbd-tls",
                          "icbd-zstd-tls")
BASELINE = "rsync"
#: Before each transfer: wait until the machine's CPU busy % is at most this (sampled over
#: 0.5 s), at most IDLE_WAIT_MAX seconds (the defaults of ``--wait-idle``, ``--wait-idle-max``).
IDLE_BUSY_PCT = 10.0
IDLE_WAIT_MAX = 20.0
KINDS: tuple[str, ...] = ("full", "delta")
#: The iMI name the bench publishes.
IMI = "bench"
CHUNK = 64 * 1024
#: Repetitions of each measurement of the machine's limit (stages, fixed cost).
LIMIT_REPS = 3

EPILOG = """examples:
  icbd-bench replication --quick --out out/replication-quick
  icbd-bench replication --out out/replication                 # builds the ~1 GB pair once
  icbd-bench replication --link 1gbit --out out/replication-1g # across shaped namespaces
  icbd-bench replication --pair DIR --tools rsync,icbd-zstd    # DIR/v1.img, DIR/v2.img
"""


# --------------------------------------------------------------------------- settings


def _names(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {','.join(bad) or text!r}; choose from {','.join(choices)}")
        return names
    return parse


def register(subparsers: Any) -> None:
    """Add the ``replication`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replication", help="full and delta replication of a real iMI pair: icbd vs rsync",
        description="Replicate v2 of a real pair of iMI versions to a site, full (the site "
                    "holds nothing) and delta (it holds v1), with rsync (plain, zstd) and "
                    "icbd-cache master/replica (plain, zstd, TLS, zstd+TLS): wall time, CPU "
                    "of both ends, bytes on the wire, ratios to rsync.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/replication"),
                   help="directory for replication.json, .md and .png (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="the small pair (the test iMI, about 350 MB used, and it with a "
                        "package installed and one purged): a few minutes")
    p.add_argument("--pair", type=Path, metavar="DIR",
                   help="use DIR/v1.img and DIR/v2.img instead of a built pair")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the cached pair, print its directory and stop")
    p.add_argument("--tools", type=_names(TOOLS, "tool"), default=list(TOOLS),
                   metavar="T[,T...]", help=f"transfers to run (default {','.join(TOOLS)}; "
                                            f"{BASELINE} is always added as the baseline)")
    p.add_argument("--kinds", type=_names(KINDS, "kind"), default=list(KINDS),
                   metavar="full,delta", help="full, delta or both (default both)")
    p.add_argument("--reps", type=int, default=1, metavar="N",
                   help="repetitions of every run; medians and paired ratios (default 1)")
    p.add_argument("--zstd-level", type=int, default=3, metavar="L",
                   help="zstd level for rsync-zstd, icbd-zstd and the reference (default 3)")
    p.add_argument("--link", metavar="RATE",
                   help="run across two network namespaces joined by a veth shaped to RATE "
                        "each way (tbf), e.g. 1gbit (default: loopback in one namespace)")
    p.add_argument("--net", choices=("auto", "netns", "host"), default="auto",
                   help="auto: a network namespace of the bench's own, else the host's "
                        "127.0.0.1 with the tools' own byte counts (default); netns: fail "
                        "without namespaces; host: the host's 127.0.0.1")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="limit of one transfer (default %(default)s)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the site's copy after each run")
    p.add_argument("--wait-idle", type=float, default=IDLE_BUSY_PCT, metavar="PCT",
                   help="before each transfer, wait until the machine's CPU busy %% is at "
                        "most PCT (default %(default)s; the busy %% is kept with the run)")
    p.add_argument("--wait-idle-max", type=float, default=IDLE_WAIT_MAX, metavar="SECONDS",
                   help="give up waiting for --wait-idle after this long (default "
                        "%(default)s; 0: one 0.5 s sample, no wait)")
    p.add_argument("--work", type=Path, metavar="DIR",
                   help="work directory (default: a new one in /var/tmp, removed at the end)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="measure nothing: summarize the runs of a replication.json again "
                        "(rows, targets) and write JSON, markdown and PNG into --out")
    p.add_argument("--icbd", default=None, metavar="PATH",
                   help="the icbd-cache command (default: next to this Python, or on PATH)")
    p.add_argument("--baseline-bin", default=None, metavar="PATH",
                   help="another build's icbd-cache (e.g. the previous commit installed in a "
                        "venv of its own) measured in the same run: each icbd transfer gets a "
                        "'-base' twin run right after it, with its own master store")
    p.set_defaults(func=main)


@dataclass
class Settings:
    """A resolved command line (see :func:`register` for the meaning of each)."""

    out: Path
    quick: bool
    pair_dir: Path | None
    build_only: bool
    tools: list[str]
    kinds: list[str]
    reps: int
    zstd_level: int
    link_bps: int | None
    net: str
    timeout: float
    verify: bool
    work: Path | None
    icbd: str
    baseline: str | None = None
    wait_idle: float = IDLE_BUSY_PCT
    wait_idle_max: float = IDLE_WAIT_MAX


#: Suffix of a transfer run with the baseline build (``icbd-zstd-base``).
BASE_SUFFIX = "-base"


def tool_order(tools: Sequence[str]) -> list[str]:
    """``tools`` in TOOLS order, each ``-base`` twin right after its tool."""
    return [t for base in TOOLS for t in (base, base + BASE_SUFFIX) if t in tools]


def resolve(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments (raises ValueError on a bad --link rate)."""
    tools = list(args.tools)
    if BASELINE not in tools:
        tools.insert(0, BASELINE)
    tools = [t for t in TOOLS if t in tools]
    baseline = getattr(args, "baseline_bin", None)
    if baseline:
        if not os.access(baseline, os.X_OK):
            raise ValueError(f"--baseline-bin {baseline}: not an executable")
        tools = tool_order(tools + [t + BASE_SUFFIX for t in tools if t.startswith("icbd")])
    icbd = args.icbd or str(Path(sys.executable).with_name("icbd-cache"))
    if not os.path.exists(icbd):
        icbd = shutil.which("icbd-cache") or icbd
    return Settings(out=args.out, quick=args.quick, pair_dir=args.pair,
                    build_only=args.build_only, tools=tools, kinds=list(args.kinds),
                    reps=max(1, args.reps), zstd_level=args.zstd_level,
                    link_bps=netlab.parse_rate(args.link) if args.link else None,
                    net=args.net, timeout=args.timeout, verify=not args.no_verify,
                    work=args.work, icbd=icbd,
                    baseline=str(Path(baseline).resolve()) if baseline else None,
                    wait_idle=getattr(args, "wait_idle", IDLE_BUSY_PCT),
                    wait_idle_max=max(0.0, getattr(args, "wait_idle_max", IDLE_WAIT_MAX)))


# --------------------------------------------------------------------------- the pair


@dataclass
class Analysis:
    """What the pair holds, in 64 KiB chunks (bytes unless said): ``changed_*`` are the
    distinct non-zero chunks of v2 that v1 lacks (what a delta must move at least),
    ``*_zstd`` their zstd-compressed size (one stream, the bench's level)."""

    v1_bytes: int
    v2_bytes: int
    v2_chunks: int
    v2_zero_chunks: int
    v2_distinct_chunks: int
    v2_distinct_bytes: int
    v2_distinct_zstd: int
    changed_chunks: int
    changed_bytes: int
    changed_zstd: int
    zstd_level: int
    seconds: float
    v2_map: bytes = field(repr=False, default=b"")


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return
            yield block


def analyse(v1: Path, v2: Path, level: int) -> Analysis:
    """Chunk maps of both versions and the zstd reference sizes (reads both images once)."""
    import zstandard

    from icbdcache.store.chunks import ZERO, digest

    t0 = time.monotonic()
    held = {digest(b) for b in _chunks(v1)}
    held.discard(ZERO)
    seen: set[bytes] = set()
    all_z = zstandard.ZstdCompressor(level=level).compressobj()
    new_z = zstandard.ZstdCompressor(level=level).compressobj()
    all_len = new_len = 0
    zero = distinct_bytes = changed = changed_bytes = 0
    v2_map = bytearray()
    for block in _chunks(v2):
        d = digest(block)
        v2_map += d
        if d == ZERO:
            zero += 1
            continue
        if d in seen:
            continue
        seen.add(d)
        distinct_bytes += len(block)
        all_len += len(all_z.compress(block))
        if d not in held:
            changed += 1
            changed_bytes += len(block)
            new_len += len(new_z.compress(block))
    all_len += len(all_z.flush())
    new_len += len(new_z.flush())
    return Analysis(v1_bytes=v1.stat().st_size, v2_bytes=v2.stat().st_size,
                    v2_chunks=len(v2_map) // 16, v2_zero_chunks=zero,
                    v2_distinct_chunks=len(seen), v2_distinct_bytes=distinct_bytes,
                    v2_distinct_zstd=all_len, changed_chunks=changed,
                    changed_bytes=changed_bytes, changed_zstd=new_len, zstd_level=level,
                    seconds=round(time.monotonic() - t0, 1), v2_map=bytes(v2_map))


# --------------------------------------------------------------------------- network


class BenchNet:
    """Where the two ends run and how the bytes between them are counted.

    ``server_host``: the address servers listen on and clients connect to. :meth:`wire_bytes`
    is the total of both directions so far (bytes, link-layer headers included), or None when
    the bench cannot count them (then the tools' own counts are used).
    """

    kind = "host"
    server_host = "127.0.0.1"
    rate_bps: int | None = None

    def argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` made to run at ``role`` (``server`` or ``client``)."""
        return list(cmd)

    def wire_bytes(self) -> int | None:
        """Bytes both ways across the measured interface so far (None: not counted)."""
        return None

    def describe(self) -> str:
        """One line for the report."""
        return ("loopback (the host's 127.0.0.1, no namespace): bytes are the tools' own "
                "counts (rsync --stats, the master's wire_bytes)")

    def close(self) -> None:
        """Undo whatever was set up. Safe to call twice."""


def _ip() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def _dev_bytes(pid: int, ifname: str) -> tuple[int, int]:
    """(rx, tx) bytes of ``ifname`` in the network namespace of process ``pid``."""
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                v = rest.split()
                return int(v[0]), int(v[8])
    raise OSError(f"no interface {ifname} in the namespace of process {pid}")


class _Anchor:
    """A ``sleep`` in a namespace: its /proc/PID/net/dev shows that namespace's counters."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen([_ip(), "netns", "exec", ns, "sleep", "1000000"],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != os.readlink(
                        "/proc/self/ns/net") and os.readlink(f"/proc/{self.proc.pid}/exe"
                                                             ).endswith("sleep"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise netlab.LabError(f"ip netns exec {ns} sleep exited")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


class LoopbackNs(BenchNet):
    """One network namespace of the bench's own: both ends on its 127.0.0.1, so its ``lo``
    carries exactly the transfer's packets (each counted once as sent, once as received:
    ``tx_bytes`` is the total of both directions)."""

    kind = "loopback"

    def __init__(self) -> None:
        self.ns = f"icbdrepl{os.getpid()}"
        self._made = False
        self._owner = os.getpid()
        self.anchor: _Anchor | None = None

    @classmethod
    def create(cls) -> LoopbackNs:
        """Make the namespace (lo up). Raises LabError, having removed what it made."""
        net = cls()
        try:
            from pyroute2 import NetNS, config, netns

            config.disable_mp_signal = True
            netns.create(net.ns)
            net._made = True
            with NetNS(net.ns) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            net.anchor = _Anchor(net.ns)
        except Exception as e:
            net.close()
            raise netlab.LabError(f"{type(e).__name__}: {e}") from e
        return net

    def argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        return [_ip(), "netns", "exec", self.ns, *cmd]

    def wire_bytes(self) -> int | None:
        assert self.anchor is not None
        return _dev_bytes(self.anchor.proc.pid, "lo")[1]

    def describe(self) -> str:
        return (f"loopback: 127.0.0.1 of a network namespace made for the bench ({self.ns}), "
                f"no shaping; bytes = its lo counter (both directions, headers included)")

    def close(self) -> None:
        if self.anchor is not None:
            self.anchor.stop()
            self.anchor = None
        if self._made and os.getpid() == self._owner:
            with contextlib.suppress(Exception):
                from pyroute2 import netns

                netns.remove(self.ns)
            self._made = False


class LinkNs(BenchNet):
    """Servers in bench/netlab's upstream namespace, clients in its site namespace, joined by
    a veth with a tbf of ``rate_bps`` on each end (no delay). Bytes: the server end's veth,
    received + sent."""

    kind = "link"

    def __init__(self, rate_bps: int) -> None:
        self.rate_bps = rate_bps
        self.lab = netlab.NetnsLab.create(netlab.Shaping(wan_rate=rate_bps, wan_delay=0.0,
                                                         lan_rate=None))
        self.server_host = netlab.WAN_UPSTREAM
        try:
            self.anchor = _Anchor(self.lab.ns["upstream"])
        except Exception:
            self.lab.close()
            raise

    def argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        return self.lab.argv("upstream" if role == "server" else "site", cmd)

    def wire_bytes(self) -> int | None:
        rx, tx = _dev_bytes(self.anchor.proc.pid, self.lab.veth["wan_up"])
        return rx + tx

    def describe(self) -> str:
        return (f"two network namespaces joined by a veth shaped to "
                f"{netlab.fmt_rate(self.rate_bps)} each way (tbf, no delay); bytes = the "
                f"server end's veth counters (both directions, headers included)")

    def close(self) -> None:
        self.anchor.stop()
        self.lab.close()


def make_net(s: Settings) -> tuple[BenchNet, str | None]:
    """The network for ``s`` and, when ``--net auto`` fell back to the host, why."""
    if s.link_bps is not None:
        return LinkNs(s.link_bps), None
    if s.net == "host":
        return BenchNet(), None
    try:
        return LoopbackNs.create(), None
    except netlab.LabError as e:
        if s.net == "netns":
            raise
        return BenchNet(), str(e)


# --------------------------------------------------------------------------- processes


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``: its own, its reaped children's and its live descendants'."""
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = c.cpu_times()
                total += float(ct.user + ct.system)
    except psutil.Error:
        return 0.0
    return total


@dataclass
class Server:
    """A long-running process of the bench (rsync daemon, master), in its own session."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu(self) -> float:
        """CPU seconds so far, descendants included."""
        return _tree_cpu(self.proc.pid)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the server has no child processes left (an rsync daemon's per-connection
        child is reaped, so its CPU time is in the parent's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not psutil.Process(self.proc.pid).children(recursive=True):
                    return
            except psutil.Error:
                return
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL to its process group after 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def spawn(name: str, argv: list[str], log: Path) -> Server:
    """Start a server; its output goes to ``log``."""
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, log)


@dataclass
class ClientResult:
    """A client run: exit status, wall seconds, CPU seconds (rusage, children included),
    its output."""

    rc: int
    wall_s: float
    cpu_s: float
    output: str


def run_client(argv: list[str], log: Path, timeout: float,
               tick: Callable[[float], None] | None = None) -> ClientResult:
    """Run a client to completion (killed after ``timeout`` s); ``tick(elapsed)`` every
    0.5 s while it runs. The wall time ends when the client exits (a thread waits for it),
    not at the next tick."""
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        start = out.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        ended: list[tuple[float, int, Any]] = []

        def reap() -> None:
            _, st, ru = os.wait4(proc.pid, 0)
            ended.append((time.monotonic(), st, ru))

        reaper = threading.Thread(target=reap, name="bench-reap", daemon=True)
        reaper.start()
        while True:
            elapsed = time.monotonic() - t0
            reaper.join(0.1 if elapsed < 2 else 0.5)
            if not reaper.is_alive():
                break
            elapsed = time.monotonic() - t0
            if elapsed > timeout:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                reaper.join()
                break
            if tick is not None:
                tick(elapsed)
        t1, status, rusage = ended[0]
        wall = t1 - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_bytes()[start:].decode(errors="replace")
    cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
    return ClientResult(proc.returncode, wall, cpu, text)


def _wait_port(net: BenchNet, host: str, port: int, server: Server, timeout: float = 60.0
               ) -> None:
    """Wait until ``host:port`` accepts TCP connections as seen from the client's side."""
    probe = net.argv("client", [sys.executable, "-c",
                                "import socket,sys; socket.create_connection("
                                "(sys.argv[1], int(sys.argv[2])), 1).close()",
                                host, str(port)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited: {server.tail()}")
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} does not listen on {host}:{port}: {server.tail()}")


#: Ports handed out in the bench's own namespaces (all free there).
_NS_PORTS = itertools.count(20001)


def _port(net: BenchNet) -> int:
    """A port for a listener: the next one in a namespace of the bench's own, a free one of
    the host otherwise."""
    if isinstance(net, LoopbackNs | LinkNs):
        return next(_NS_PORTS)
    return netlab.free_port()


# --------------------------------------------------------------------------- progress


class Progress:
    """A live progress line on stderr (rewritten in place on a TTY) and a line per run."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def note(self, text: str) -> None:
        """A line of its own."""
        sys.stderr.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        sys.stderr.flush()

    def live(self, label: str, elapsed: float, wire: int | None) -> None:
        """Rewrite the live line (TTY: every call; otherwise every 30 s)."""
        text = f"[{self.done + 1}/{self.total}] {label}: {elapsed:6.1f} s"
        if wire is not None:
            text += f", {wire / MIB:9.1f} MiB on the wire"
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
        elif elapsed - self._last >= 30:
            self._last = elapsed
            self.note(text)

    def finish(self, run: dict[str, Any]) -> None:
        """The line of a finished run."""
        self.done += 1
        self._last = 0.0
        head = f"[{self.done}/{self.total}] {run['kind']:<5} {run['tool']:<13} rep {run['rep'] + 1}"
        if run.get("error"):
            self.note(f"{head} FAILED: {str(run['error']).splitlines()[0][:300]}")
            return
        self.note(f"{head} {run['wall_s']:7.2f} s  cpu {run['cpu_s']:6.2f} s "
                  f"(server {run['cpu_server_s']:.2f} + client {run['cpu_client_s']:.2f})  "
                  f"{_mib(run['bytes'])} MiB")


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.1f}"


# --------------------------------------------------------------------------- rsync


RSYNC_FLAGS = ("-a", "--inplace", "--sparse", "--ignore-times", "--stats")


@dataclass
class RsyncSide:
    """The rsync daemon serving v2 as ``pair/imi.img``."""

    daemon: Server
    port: int
    host: str


def start_rsync(net: BenchNet, v2: Path, work: Path, log_dir: Path) -> RsyncSide:
    """An rsync daemon (no detach, its own config) serving a directory with v2 as imi.img."""
    rsync = shutil.which("rsync")
    if rsync is None:
        raise RuntimeError("rsync is not installed (Debian package rsync)")
    src = work / "rsync-src"
    src.mkdir(parents=True, exist_ok=True)
    target = src / "imi.img"
    target.unlink(missing_ok=True)
    try:
        os.link(v2, target)
    except OSError:
        subprocess.run(["cp", "--sparse=always", str(v2), str(target)], check=True)
    conf = work / "rsyncd.conf"
    conf.write_text(f"# icbd-bench replication: the master's side\n"
                    f"pid file = {work / 'rsyncd.pid'}\nuse chroot = no\nuid = root\n"
                    f"gid = root\nmax connections = 4\nlog file = {log_dir / 'rsyncd.log'}\n"
                    f"[pair]\n  path = {src}\n  read only = yes\n")
    port = _port(net)
    daemon = spawn("rsync daemon", net.argv("server", [
        rsync, "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
        f"--address={net.server_host}"]), log_dir / "rsync-daemon.log")
    _wait_port(net, net.server_host, port, daemon)
    return RsyncSide(daemon, port, net.server_host)


def _rsync_stat(text: str, label: str) -> int | None:
    m = re.search(rf"{label}:\s*([\d,.]+)", text)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else None


def warm_up(files: Sequence[Path], argv: Sequence[str] | None = None) -> float:
    """Read ``files`` (regular files, or every file under a directory) into the page cache and
    run ``argv`` (the transfer's program with ``--help``: its interpreter, libraries and
    imports) once, so that each run of a pair starts from the same warm state; seconds taken.
    (Measured on the full pair: whichever transfer ran first after rsync took 1.2x to 2x as
    long as its twin, in its own CPU time too; this machine's kernel pages out memory unused
    for a minute (DAMON), and a run's first access pays for it.)"""
    t0 = time.monotonic()
    buf = bytearray(8 << 20)
    for top in files:
        for path in ([top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())):
            with contextlib.suppress(OSError), open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    if argv:
        subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False, timeout=120)
    return time.monotonic() - t0


def rsync_run(ctx: Context, kind: str, tool: str, rep: int) -> dict[str, Any]:
    """One rsync transfer of v2 into a fresh directory (holding v1 for a delta)."""
    side = ctx.rsync
    assert side is not None
    run_dir = ctx.work / f"run-{kind}-{tool}-{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    dest = run_dir / "imi.img"
    try:
        if kind == "delta":
            subprocess.run(["cp", "--sparse=always", str(ctx.pair.v1), str(dest)], check=True)
        os.sync()
        warmed = warm_up([ctx.pair.v2, *([dest] if kind == "delta" else [])],
                         [shutil.which("rsync") or "rsync", "--version"])
        argv = [shutil.which("rsync") or "rsync", *RSYNC_FLAGS]
        if tool == "rsync-zstd":
            argv += ["--compress", "--compress-choice=zstd",
                     f"--compress-level={ctx.s.zstd_level}"]
        argv += [f"rsync://{side.host}:{side.port}/pair/imi.img", str(dest)]
        res = ctx.measure(kind, tool, [side.daemon], ctx.net.argv("client", argv))
        res["warm_up_s"] = round(warmed, 2)
        if res["rc"] != 0:
            res["error"] = f"rsync exit {res['rc']}: {res.pop('output')[-800:]}"
            return res
        out = res.pop("output")
        sent = _rsync_stat(out, "Total bytes sent")
        received = _rsync_stat(out, "Total bytes received")
        res["tool_bytes"] = None if sent is None or received is None else sent + received
        res["rsync_literal_bytes"] = _rsync_stat(out, "Literal data")
        res["rsync_matched_bytes"] = _rsync_stat(out, "Matched data")
        if ctx.s.verify:
            got = imipair.sha256_file(dest)
            res["verified"] = got == ctx.pair.meta["files"]["v2"]["sha256"]
            if not res["verified"]:
                res["error"] = "the rsync copy differs from v2 (sha256)"
        return res
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- icbd


@dataclass
class IcbdSide:
    """The master store (v1 and v2 published), its masters (plain, TLS) and the files a
    replica needs."""

    store: Path
    masters: dict[str, tuple[Server, str]]  # "plain"/"tls" -> (server, URL)
    ca: Path | None
    token_file: Path | None
    site_token_file: Path | None
    delta_base: Path  # a replica store holding v1 (copied for every delta run)
    publish_s: dict[str, float]
    binary: str = ""
    #: what its replicas are given to trust (the signing key's public half), or nothing
    #: (a build without signed manifests)
    trust: list[str] = field(default_factory=list)
    #: wall seconds of replica runs with nothing to fetch (the site holds the newest
    #: version), and of ``icbd-cache --help`` (the bare start): the fixed cost of a pull
    empty_pull_s: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)


def _icbd_help_has(icbd: str, sub: str) -> bool:
    p = subprocess.run([icbd, sub, "--help"], capture_output=True, text=True, check=False)
    return p.returncode == 0


def make_tls(work: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for ``hosts`` (trustme): (ca.pem, cert.pem, key.pem)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(*hosts)
    ca_path, cert_path, key_path = work / "ca.pem", work / "master.pem", work / "master.key"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_path, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    return ca_path, cert_path, key_path


def _checked(argv: list[str], what: str, log: Path, timeout: float) -> ClientResult:
    res = run_client(argv, log, timeout)
    if res.rc != 0:
        raise RuntimeError(f"{what}: exit {res.rc}: {res.output[-1200:]}")
    return res


def start_icbd(ctx: Context, binary: str | None = None, tag: str = "") -> IcbdSide:
    """Publish v1 into a master store, make the delta base (a replica store holding v1, pulled
    over plain HTTP), publish v2, start the masters the chosen modes need. ``binary``: the
    icbd-cache to run (default the bench's; the baseline's for ``tag`` "base"). A build
    that has ``keygen`` signs what it publishes (a key made in the work directory) and its
    replicas trust that key: verification on, as a site runs it."""
    s, net = ctx.s, ctx.net
    icbd = binary or s.icbd
    for sub in ("master", "publish", "replica"):
        if not _icbd_help_has(icbd, sub):
            raise RuntimeError(f"'{icbd} {sub}' is not available (not built yet?)")
    store = ctx.work / f"master-store{tag}"
    log = ctx.log_dir / f"icbd-setup{tag}.log"
    publish_s: dict[str, float] = {}
    sign: list[str] = []
    trust: list[str] = []
    if _icbd_help_has(icbd, "keygen"):
        key = ctx.work / f"signing{tag}.key"
        if not key.exists():
            _checked([icbd, "keygen", "--out", str(key), "-q"], "keygen", log, 60)
        sign, trust = ["--signing-key", str(key)], ["--trust-key", f"{key}.pub"]
    ctx.progress.note(f"replication: publishing v1 on the master{' ' + tag if tag else ''}")
    r = _checked([icbd, "publish", str(ctx.pair.v1), "--store", str(store), "--imi", IMI,
                  "--version", "1", "-q", *sign], "publish v1", log, 3600)
    publish_s["v1"] = round(r.wall_s, 2)
    masters: dict[str, tuple[Server, str]] = {}
    token_file = site_token_file = ca = None
    tls_files = None
    if any("tls" in t for t in s.tools):
        tls_dir = ctx.work / f"tls{tag}"  # each build's masters their own certificate
        tls_dir.mkdir(exist_ok=True)
        ca, cert, key = make_tls(tls_dir, [net.server_host, "localhost"])
        tls_files = (cert, key)
        token_file = tls_dir / "tokens"
        token_file.write_text("* icbd-bench-replication-token\n")
        site_token_file = tls_dir / "site-token"
        site_token_file.write_text("icbd-bench-replication-token\n")

    def master(mode: str) -> tuple[Server, str]:
        port = _port(net)
        argv = [icbd, "master", "--store", str(store), "--listen", f"{net.server_host}:{port}"]
        scheme = "http"
        if mode == "tls":
            assert tls_files is not None and token_file is not None
            argv += ["--tls-cert", str(tls_files[0]), "--tls-key", str(tls_files[1]),
                     "--token-file", str(token_file)]
            scheme = "https"
        srv = spawn(f"master{tag} ({mode})", net.argv("server", argv),
                    ctx.log_dir / f"master{tag}-{mode}.log")
        _wait_port(net, net.server_host, port, srv)
        return srv, f"{scheme}://{net.server_host}:{port}"

    masters["plain"] = master("plain")
    ctx.servers.append(masters["plain"][0])
    delta_base = ctx.work / f"replica-v1{tag}"
    ctx.progress.note("replication: the delta base (a site store holding v1)")
    _checked(net.argv("client", [icbd, "replica", "--store", str(delta_base), "--master",
                                 masters["plain"][1], "--site", f"delta-base{tag}",
                                 "--subscribe", IMI, "--once", *trust]),
             "replica of v1", log, 3600)
    empty: list[float] = []
    start: list[float] = []
    if not tag:  # the fixed cost of a pull, for the machine's limit (bench/repllimit.py)
        for i in range(LIMIT_REPS):
            empty.append(round(_checked(net.argv("client", [
                icbd, "replica", "--store", str(delta_base), "--master", masters["plain"][1],
                "--site", f"empty-{i}", "--subscribe", IMI, "--once", *trust]),
                "replica with nothing to fetch", log, 600).wall_s, 3))
            start.append(round(_checked([icbd, "--help"], "icbd-cache --help", log,
                                        60).wall_s, 3))
    ctx.progress.note("replication: publishing v2 on the master")
    r = _checked([icbd, "publish", str(ctx.pair.v2), "--store", str(store), "--imi", IMI,
                  "--version", "2", "-q", *sign], "publish v2", log, 3600)
    publish_s["v2"] = round(r.wall_s, 2)
    if any("tls" in t for t in s.tools):
        masters["tls"] = master("tls")
        ctx.servers.append(masters["tls"][0])
    # a replica pulls the newest version of each subscribed iMI: v2 only, for a fresh store
    return IcbdSide(store, masters, ca, token_file, site_token_file, delta_base, publish_s,
                    icbd, trust, empty, start)


def verify_store(store: Path, expected_map: bytes) -> str | None:
    """None if ``store`` holds v2 whole (its chunk map equals ``expected_map`` and every
    non-zero chunk is present), else what is wrong."""
    from icbdcache.store import Store

    st = Store(store, readonly=True, allow_old=True)  # a baseline build's store too
    try:
        key = f"{IMI}@2"
        if st.version(key) is None:
            return f"the site store has no {key}"
        if bytes(st.chunk_map(key)) != expected_map:
            return f"the site's chunk map of {key} differs from v2's"
        held, need = st.held_of(key)
        if held != need:
            return f"the site holds {held} of {need} bytes of {key}"
        return None
    finally:
        st.close()


def icbd_run(ctx: Context, kind: str, tool: str, rep: int) -> dict[str, Any]:
    """One replica pull of v2 into a fresh site store (a copy of the delta base for delta)."""
    side = ctx.icbd_base if tool.endswith(BASE_SUFFIX) else ctx.icbd
    assert side is not None
    mode = "tls" if "tls" in tool else "plain"
    srv, url = side.masters[mode]
    site = ctx.work / f"site-{kind}-{tool}-{rep}"
    shutil.rmtree(site, ignore_errors=True)
    try:
        if kind == "delta":
            shutil.copytree(side.delta_base, site)
        os.sync()
        argv = [side.binary, "replica", "--store", str(site), "--master", url,
                "--site", f"{kind}-{tool}-{rep}-{os.getpid()}", "--subscribe", IMI, "--once",
                *side.trust]
        if "zstd" in tool:
            argv += ["--compress", f"zstd:{ctx.s.zstd_level}"]
        if mode == "tls":
            assert side.ca is not None and side.site_token_file is not None
            argv += ["--master-ca", str(side.ca), "--master-token-file",
                     str(side.site_token_file)]
        warmed = warm_up([side.store, *([site] if kind == "delta" else [])],
                         [side.binary, "replica", "--help"])
        res = ctx.measure(kind, tool, [srv], ctx.net.argv("client", argv))
        res["warm_up_s"] = round(warmed, 2)
        out = res.pop("output")
        if res["rc"] != 0:
            res["error"] = f"replica exit {res['rc']}: {out[-800:]}"
            return res
        # the replica's own count: chunk-stream bytes received (HTTP bodies, after zstd)
        m = re.findall(r"(\d+) bytes on the wire", out)
        res["tool_bytes"] = int(m[-1]) if m else None
        # the version's kernel and initrd, fetched whole by the replica (not chunks)
        boot = site / "boot" / f"{IMI}@2"
        res["boot_file_bytes"] = (sum(f.stat().st_size for f in boot.iterdir() if f.is_file())
                                  if boot.is_dir() else 0)
        if ctx.s.verify:
            why = verify_store(site, ctx.analysis.v2_map)
            res["verified"] = why is None
            if why:
                res["error"] = why
        return res
    finally:
        shutil.rmtree(site, ignore_errors=True)


# --------------------------------------------------------------------------- the run


@dataclass
class Context:
    """Everything a run needs."""

    s: Settings
    net: BenchNet
    pair: imipair.Pair
    analysis: Analysis
    work: Path
    log_dir: Path
    progress: Progress
    rsync: RsyncSide | None = None
    icbd: IcbdSide | None = None
    icbd_base: IcbdSide | None = None
    servers: list[Server] = field(default_factory=list)

    def measure(self, kind: str, tool: str, servers: Sequence[Server], argv: list[str]
                ) -> dict[str, Any]:
        """Run a client against ``servers``: wall time, CPU of both ends, bytes on the wire.
        Each run waits first (at most ``--wait-idle-max`` s) until the machine is idle
        (``--wait-idle``); its busy % then is kept with the run. (The transfer right after
        rsync's still takes up to 2x the one after it, in its own CPU time too, with the
        machine idle before both: :func:`vs_baseline` pairs runs so that this cancels.)"""
        label = f"{kind} {tool}"
        busy, _, waited = serve.wait_for_idle(0.5, self.s.wait_idle, self.s.wait_idle_max)
        w0 = self.net.wire_bytes()
        cpu0 = sum(s.cpu() for s in servers)
        load0 = os.getloadavg()[0]

        def tick(elapsed: float) -> None:
            w = self.net.wire_bytes()
            self.progress.live(label, elapsed, None if w is None or w0 is None else w - w0)

        res = run_client(argv, self.log_dir / f"{kind}-{tool}.log", self.s.timeout, tick)
        for srv in servers:
            srv.settle()
        cpu_server = sum(s.cpu() for s in servers) - cpu0
        w1 = self.net.wire_bytes()
        return {"kind": kind, "tool": tool, "rc": res.rc, "wall_s": round(res.wall_s, 3),
                "cpu_client_s": round(res.cpu_s, 3), "cpu_server_s": round(cpu_server, 3),
                "cpu_s": round(res.cpu_s + cpu_server, 3),
                "wire_bytes": None if w0 is None or w1 is None else w1 - w0,
                "load1_before": round(load0, 2), "idle_busy_pct": round(busy, 1),
                "idle_wait_s": round(waited, 2), "output": res.output}


def plan(s: Settings) -> list[tuple[int, str, str]]:
    """(rep, kind, tool) in run order: per repetition, per kind, every tool; a ``-base`` twin
    runs right after its tool in even repetitions and right before it in odd ones (ABBA), so
    that neither build always runs in the other's wake."""
    out = []
    for rep in range(s.reps):
        for kind in s.kinds:
            tools = list(s.tools)
            if rep % 2:
                for i, t in enumerate(tools[:-1]):
                    if tools[i + 1] == t + BASE_SUFFIX:
                        tools[i], tools[i + 1] = tools[i + 1], t
            out += [(rep, kind, tool) for tool in tools]
    return out


def summarize(runs: Sequence[dict[str, Any]], kinds: Sequence[str], tools: Sequence[str]
              ) -> list[dict[str, Any]]:
    """One row per (kind, tool): medians of wall_s, cpu_s (and both ends), bytes; paired
    ratios (median over repetitions) of time, CPU and bytes to the baseline."""
    rows = []
    for kind in kinds:
        base = {r["rep"]: r for r in runs
                if r["kind"] == kind and r["tool"] == BASELINE and not r.get("error")}
        for tool in tools:
            ok = [r for r in runs if r["kind"] == kind and r["tool"] == tool
                  and not r.get("error")]
            failed = [r for r in runs if r["kind"] == kind and r["tool"] == tool
                      and r.get("error")]
            row: dict[str, Any] = {"kind": kind, "tool": tool, "ok": len(ok),
                                   "failed": len(failed),
                                   "error": failed[0]["error"] if failed and not ok else None}
            for m in ("wall_s", "cpu_s", "cpu_server_s", "cpu_client_s", "bytes", "tool_bytes",
                      "boot_file_bytes"):
                vals = [float(r[m]) for r in ok if r.get(m) is not None]
                row[m] = statistics.median(vals) if vals else None
            for m in ("wall_s", "cpu_s", "bytes"):
                ratios = [float(r[m]) / float(base[r["rep"]][m]) for r in ok
                          if r["rep"] in base and r.get(m) is not None
                          and base[r["rep"]].get(m)]
                row[f"{m}_vs_rsync"] = statistics.median(ratios) if ratios else None
            rows.append(row)
    return rows


def vs_baseline(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, icbd tool) that has a ``-base`` twin: the geometric means of the paired
    per-repetition ratios of wall time and CPU (both ends) of this build to the baseline
    build (``*_pairs``: the ratios themselves), and whether the time is within 10% (issue 16:
    verification on costs a transfer no more). The geometric mean over the ABBA order cancels
    what running first in a pair costs (a transfer right after rsync's took up to 2x the one
    after it, also in CPU time, with the machine idle before both); a median of an odd number
    of pairs would not."""
    out = []
    ok = [r for r in runs if not r.get("error")]
    pairs = sorted({(r["kind"], r["tool"]) for r in ok if r["tool"].endswith(BASE_SUFFIX)})
    for kind, base_tool in pairs:
        tool = base_tool.removesuffix(BASE_SUFFIX)
        base = {r["rep"]: r for r in ok if r["kind"] == kind and r["tool"] == base_tool}
        new = {r["rep"]: r for r in ok if r["kind"] == kind and r["tool"] == tool}
        row: dict[str, Any] = {"kind": kind, "tool": tool}
        for m in ("wall_s", "cpu_s"):
            ratios = [float(new[k][m]) / float(base[k][m]) for k in new
                      if k in base and new[k].get(m) and base[k].get(m)]
            row[f"{m}_vs_base"] = statistics.geometric_mean(ratios) if ratios else None
            row[f"{m}_pairs"] = [round(x, 3) for x in ratios]
            row[f"{m}_new"] = statistics.median([float(r[m]) for r in new.values()]) \
                if new else None
            row[f"{m}_base"] = statistics.median([float(r[m]) for r in base.values()]) \
                if base else None
        ratio = row["wall_s_vs_base"]
        row["met"] = None if ratio is None else ratio <= 1.10
        out.append(row)
    return out


def machine_limit(ctx: Context) -> dict[str, Any] | None:
    """The machine's limit (bench/repllimit.py), measured now: each stage's bandwidth on a
    sample of v2's chunks, the fixed cost of a pull (the median replica run with nothing to
    fetch), and the limits of a full copy (v2's distinct chunks) and a delta (the chunks v1
    lacks). None without an icbd side or when it could not be measured."""
    side = ctx.icbd
    if side is None or not side.empty_pull_s:
        return None
    from icbdcache.replication.replica import COMMIT_BYTES

    chunks = repllimit.sample_chunks(ctx.pair.v2, ctx.analysis.v2_map, CHUNK)
    if not chunks:
        return None
    stages = repllimit.measure_stages(chunks, COMMIT_BYTES, LIMIT_REPS)
    fixed = statistics.median(side.empty_pull_s)
    a = ctx.analysis
    ctx.progress.note("replication: the machine's limit: commits as each transfer meets them")
    commit = {"full": repllimit.commit_bandwidth(chunks, COMMIT_BYTES, a.v2_distinct_bytes,
                                                 None, LIMIT_REPS),
              "delta": repllimit.commit_bandwidth(chunks, COMMIT_BYTES, a.changed_bytes,
                                                  side.delta_base, LIMIT_REPS)}
    return {"stages": stages, "sample_bytes": sum(len(c) for c in chunks), "commit": commit,
            "commit_bytes": COMMIT_BYTES, "empty_pull_s": side.empty_pull_s,
            "start_s": side.start_s, "fixed_s": fixed,
            "combine": "limit = fixed cost + bytes x sum of 1/bandwidth over the stages "
                       "(serial, one core); overlapped = fixed cost + bytes / the slowest "
                       "stage (every stage on a core of its own)",
            "full": repllimit.limits(stages, a.v2_distinct_bytes, fixed,
                                     commit["full"]["mib_s"]),
            "delta": repllimit.limits(stages, a.changed_bytes, fixed,
                                      commit["delta"]["mib_s"])}


def add_limit(rows: Sequence[dict[str, Any]], limit: dict[str, Any] | None) -> None:
    """Add to each icbd row ``limit_s`` (its kind's serial limit) and ``time_vs_limit``
    (its median wall time over it); nothing without a limit."""
    if not limit:
        return
    for r in rows:
        lim = limit.get(r["kind"])
        if not r["tool"].startswith("icbd") or lim is None:
            continue
        r["limit_s"] = lim["limit_serial_s"]
        r["time_vs_limit"] = (r["wall_s"] / lim["limit_serial_s"]
                              if r.get("wall_s") and lim["limit_serial_s"] else None)


#: The issue's targets: (kind, what, limit on loopback, limit on a shaped link).
def targets(rows: Sequence[dict[str, Any]], a: Analysis, link_bps: int | None
            ) -> list[dict[str, Any]]:
    """Each target of issue 6 checked against the rows present: name, row, value, limit,
    met (None when the row is missing)."""
    by = {(r["kind"], r["tool"]): r for r in rows}
    icbd_tools = [t for t in TOOLS if t.startswith("icbd")]
    out: list[dict[str, Any]] = []

    def add(name: str, row: tuple[str, str], value: float | None, limit: float,
            upper: bool = True) -> None:
        met = None if value is None else (value <= limit if upper else value >= limit)
        out.append({"target": name, "kind": row[0], "tool": row[1], "value": value,
                    "limit": limit, "upper": upper, "met": met})

    for kind in KINDS:
        r = by.get((kind, "icbd"))
        if r is not None and r.get("time_vs_limit") is not None and link_bps is None:
            add("time vs the machine's limit (issue 17)", (kind, "icbd"), r["time_vs_limit"],
                1.2)
    for t in icbd_tools:
        r = by.get(("delta", t))
        if r is not None:
            lim = 0.2 if link_bps is None else 0.35
            add("delta time vs rsync", ("delta", t), r["wall_s_vs_rsync"], lim)
            if "zstd" in t and r["bytes"] is not None and a.changed_zstd:
                add("delta bytes vs zstd of the changed chunks", ("delta", t),
                    r["bytes"] / a.changed_zstd, 1.15)
                if r.get("tool_bytes") is not None:
                    add("(the chunk stream alone, replica's count)", ("delta", t),
                        r["tool_bytes"] / a.changed_zstd, 1.15)
        r = by.get(("full", t))
        if r is not None:
            if link_bps is None:
                add("full time vs rsync", ("full", t), r["wall_s_vs_rsync"], 0.5)
            elif r["bytes"] and r["wall_s"] and "zstd" not in t:
                # compressed streams are bound by the compressor, not by the link
                add("full: share of the link used", ("full", t),
                    r["bytes"] * 8 / r["wall_s"] / link_bps, 0.9, upper=False)
            rz = by.get(("full", "rsync-zstd"))
            if "zstd" in t and r["bytes"] is not None and rz and rz["bytes"]:
                add("full bytes vs rsync-zstd", ("full", t), r["bytes"] / rz["bytes"], 1.15)
    for kind in KINDS:
        for tls, plain in (("icbd-tls", "icbd"), ("icbd-zstd-tls", "icbd-zstd")):
            rt, rp = by.get((kind, tls)), by.get((kind, plain))
            if rt and rp and rt["cpu_s"] is not None and rp["cpu_s"]:
                add(f"TLS CPU vs {plain}", (kind, tls), rt["cpu_s"] / rp["cpu_s"], 1.2)
    return out


# --------------------------------------------------------------------------- report


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(doc: dict[str, Any]) -> str:
    """The report: setup, the table, the targets."""
    a = doc["analysis"]
    meta = doc["meta"]
    pair = doc["pair"]
    lines = [f"# icbd-bench replication ({meta['started']})", "",
             f"- machine: {meta['host']['cpus']} CPUs ({meta['host']['cpu']}), "
             f"{meta['host']['mem_bytes'] / (1 << 30):.0f} GiB, kernel {meta['host']['kernel']}; "
             f"1-min load {meta['load1_start']:.1f} at the start, {meta['load1_end']:.1f} at "
             f"the end (shared machine: other work ran meanwhile)",
             f"- network: {doc['network']}",
             f"- pair: {pair.get('recipe')} — v1 {a['v1_bytes'] / MIB:,.0f} MiB, v2 "
             f"{a['v2_bytes'] / MIB:,.0f} MiB image; v2 has {a['v2_distinct_bytes'] / MIB:,.1f} "
             f"MiB of distinct non-zero chunks ({a['v2_zero_chunks']} of {a['v2_chunks']} "
             f"chunks are zeros), {a['changed_bytes'] / MIB:,.1f} MiB "
             f"({a['changed_chunks']} chunks) of them new in v2",
             *([f"- pair recipe: v1 = the test iMI + `update-imi "
                 f"{' '.join(pair['steps']['v1']['args'])}` "
                 f"({pair['steps']['v1']['fs_used_bytes'] / 1e9:.2f} GB used); v2 = v1 + "
                 f"`update-imi {' '.join(pair['steps']['v2']['args'])}` "
                 f"({pair['steps']['v2']['fs_used_bytes'] / 1e9:.2f} GB used)"]
               if pair.get("steps") and pair["steps"]["v1"].get("fs_used_bytes")
               and pair["steps"]["v2"].get("fs_used_bytes") else []),
             f"- reference: zstd -{a['zstd_level']} of v2's new chunks "
             f"{a['changed_zstd'] / MIB:,.1f} MiB (delta target 1.15x = "
             f"{a['changed_zstd'] * 1.15 / MIB:,.1f} MiB); of all v2's distinct chunks "
             f"{a['v2_distinct_zstd'] / MIB:,.1f} MiB",
             f"- rsync: `rsync {' '.join(RSYNC_FLAGS)} [--compress --compress-choice=zstd "
             f"--compress-level={a['zstd_level']}] rsync://HOST:PORT/pair/imi.img DEST` "
             f"against `rsync --daemon` (destination holds v1 under the same name for delta)",
             f"- icbd: `icbd-cache replica --once` against `icbd-cache master` "
             f"(v1 and v2 published; publish took {_f(doc.get('publish_s', {}).get('v1'), '.1f')}"
             f" s and {_f(doc.get('publish_s', {}).get('v2'), '.1f')} s; a site store holding "
             f"v1 for delta)",
             f"- {meta['reps']} repetition(s); medians; ratios are paired with rsync (plain) "
             f"of the same repetition; bytes = {doc['bytes_source']}", "",
             "| kind | tool | wall s | CPU s (server + client) | MiB on the wire | time vs rsync "
             "| CPU vs rsync | bytes vs rsync | tool's own count, MiB | time vs limit |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in doc["rows"]:
        if r["ok"] == 0:
            why = str(r.get("error") or "not run").splitlines()[0][:120]
            lines.append(f"| {r['kind']} | {r['tool']} | failed: {why} | | | | | | | |")
            continue
        lines.append(
            f"| {r['kind']} | {r['tool']} | {_f(r['wall_s'])} | {_f(r['cpu_s'])} "
            f"({_f(r['cpu_server_s'])} + {_f(r['cpu_client_s'])}) | {_mib(r['bytes'])} | "
            f"{_x(r['wall_s_vs_rsync'])} | {_x(r['cpu_s_vs_rsync'])} | "
            f"{_x(r['bytes_vs_rsync'])} | {_mib(r.get('tool_bytes'))} | "
            f"{_x(r.get('time_vs_limit'))} |")
    boot = [r["boot_file_bytes"] for r in doc["rows"] if r.get("boot_file_bytes")]
    lines += ["", "Tool's own count: rsync's `--stats` total bytes sent + received; for icbd "
              "the replica's chunk-stream bytes (HTTP bodies after zstd: no manifest, headers, "
              "TLS or boot files)."]
    if boot:
        lines += [f"icbd's bytes on the wire include the version's kernel and initrd "
                  f"({max(boot) / MIB:,.1f} MiB, fetched over `/v1/boot` unless the site "
                  f"already keeps the same bytes for another version: then the master answers "
                  f"304 and a delta whose kernel did not change sends none); rsync finds them "
                  f"inside the image."]
    lines += limit_lines(doc.get("limit"))
    base_rows = doc.get("vs_baseline") or []
    if base_rows:
        lines += ["", "This build against the baseline build (`-base`, `--baseline-bin`), the "
                  "same transfer right after it (before it in odd repetitions); both sign and "
                  "verify when the baseline has `keygen` (the manifest's signature, every "
                  "chunk's BLAKE3-256). Ratios are geometric means of the paired repetitions' "
                  "ratios (the ABBA order: what running first costs cancels), each pair's "
                  "time ratio listed (issue 16: time within 1.10x):", "",
                  "| kind | tool | wall s | wall s (base) | time vs base | CPU s | CPU s (base) "
                  "| CPU vs base | within 10% | time ratio of each pair |",
                  "|---|---|--:|--:|--:|--:|--:|--:|---|---|"]
        for r in base_rows:
            met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {r['kind']} | {r['tool']} | {_f(r['wall_s_new'])} | "
                         f"{_f(r['wall_s_base'])} | {_x(r['wall_s_vs_base'])} | "
                         f"{_f(r['cpu_s_new'])} | {_f(r['cpu_s_base'])} | "
                         f"{_x(r['cpu_s_vs_base'])} | {met} | "
                         f"{' '.join(f'{x:.2f}' for x in r.get('wall_s_pairs', []))} |")
    lines += ["", "Targets (issue 6):", "",
              "| target | run | value | limit | met |", "|---|---|--:|--:|---|"]
    for t in doc["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        op = "<=" if t["upper"] else ">="
        lines.append(f"| {t['target']} | {t['kind']} {t['tool']} | {_f(t['value'])} | "
                     f"{op} {t['limit']:g} | {met} |")
    return "\n".join(lines) + "\n"


def limit_lines(limit: dict[str, Any] | None) -> list[str]:
    """The markdown of the machine's limit (empty without one)."""
    if not limit:
        return []
    st = limit["stages"]
    out = ["", f"The machine's limit, measured in this run (bench/repllimit.py; each stage the "
           f"best of {LIMIT_REPS} on {limit['sample_bytes'] / MIB:,.0f} MiB of v2's own "
           f"chunks; LMDB: a fresh store, {limit['commit_bytes'] / MIB:,.0f} MiB a "
           f"transaction, synced): {limit['combine']}. Fixed cost: the median replica run "
           f"with nothing to fetch, {limit['fixed_s']:.2f} s "
           f"({', '.join(f'{v:.2f}' for v in limit['empty_pull_s'])}); the bare start "
           f"(`icbd-cache --help`) {', '.join(f'{v:.2f}' for v in limit['start_s'])} s.", "",
           "| stage | " + " | ".join(repllimit.STAGES) + " |",
           "|---|" + "--:|" * len(repllimit.STAGES),
           "| MiB/s | " + " | ".join(f"{st[n]['mib_s']:,.0f}" for n in repllimit.STAGES)
           + " |", "",
           "| kind | new MiB | LMDB as the transfer meets it, MiB/s (runs, s) | "
           "stages, serial s | limit s (serial) | limit s (overlapped) |",
           "|---|--:|--:|--:|--:|--:|"]
    for kind in KINDS:
        lim = limit.get(kind)
        com = (limit.get("commit") or {}).get(kind)
        shown = (f"{com['mib_s']:,.0f} ({', '.join(f'{v:.2f}' for v in com['seconds'])})"
                 if com else "the sample's")
        if lim:
            out.append(f"| {kind} | {lim['new_bytes'] / MIB:,.1f} | {shown} | "
                       f"{lim['stages_serial_s']:.2f} | {lim['limit_serial_s']:.2f} | "
                       f"{lim['limit_overlapped_s']:.2f} |")
    out += ["", "Time vs limit: an icbd row's median wall time over its kind's serial limit "
            "(the bytes are the chunk bytes new to the site; kernel and initrd not counted). "
            "The LMDB stage of each limit is its transfer's own: all its new bytes committed "
            "into a fresh store (full) or a copy of the site's store holding v1 (delta), the "
            f"median of {LIMIT_REPS} (bench/repllimit.py, commit_bandwidth); the table above "
            "gives the sample's best run on a fresh store, for comparison."]
    return out


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Bars per tool, full and delta side by side: wall time (s), CPU of both ends (s) and
    bytes on the wire (MiB), with the delta bytes target as a line. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["rows"] if r["ok"]]
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    tools = tool_order([r["tool"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.8 / max(1, len(tools))
    panels = (("wall_s", "wall time, s", axes[0]), ("cpu_s", "CPU s, both ends", axes[1]),
              ("bytes", "MiB on the wire", axes[2]))
    for metric, title, ax in panels:
        for i, tool in enumerate(tools):
            vals = []
            for k in kinds:
                r = next((r for r in rows if r["kind"] == k and r["tool"] == tool), None)
                v = None if r is None else r[metric]
                if v is not None and metric == "bytes":
                    v = v / MIB
                vals.append(v or 0.0)
            xs = [j + (i - (len(tools) - 1) / 2) * width for j in range(len(kinds))]
            bars = ax.bar(xs, vals, width, label=tool)
            ax.bar_label(bars, fmt="%.0f" if metric == "bytes" else "%.1f", fontsize=6,
                         padding=1)
        if metric == "bytes":
            ref = doc["analysis"]["changed_zstd"] / MIB
            if "delta" in kinds:
                j = kinds.index("delta")
                ax.plot([j - 0.45, j + 0.45], [ref * 1.15] * 2, "k--", lw=1,
                        label="delta target (1.15x zstd of new chunks)")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"icbd-bench replication: {doc['network_short']}, "
                 f"pair {doc['pair'].get('recipe')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def _host_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": model, "mem_bytes": psutil.virtual_memory().total,
            "kernel": os.uname().release}


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def get_pair(s: Settings, progress: Progress) -> imipair.Pair:
    """The pair: --pair DIR, or the cached quick/full pair (built if missing)."""
    if s.pair_dir is not None:
        return imipair.pair_from_dir(s.pair_dir)
    recipe = imipair.QUICK if s.quick else imipair.FULL
    return imipair.build_pair(recipe, log=progress.note)


def run(s: Settings) -> int:
    """Run the benchmark; write replication.json, .md, .png into ``s.out``; exit status."""
    progress = Progress(len(plan(s)))
    try:
        pair = get_pair(s, progress)
    except imipair.PairError as e:
        progress.note(f"replication: no pair: {e}")
        return 77 if e.unavailable else 1
    if s.build_only:
        print(pair.v1.parent)
        return 0
    s.out.mkdir(parents=True, exist_ok=True)
    work = s.work or Path(tempfile.mkdtemp(prefix="icbd-bench-repl-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    log_dir = s.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    old = signal.signal(signal.SIGTERM, _sigterm)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    progress.note(f"replication: analysing the pair ({pair.v1} -> {pair.v2})")
    analysis = analyse(pair.v1, pair.v2, s.zstd_level)
    progress.note(f"replication: v2 {analysis.v2_distinct_bytes / MIB:,.1f} MiB distinct, "
                  f"{analysis.changed_bytes / MIB:,.1f} MiB new, zstd of the new chunks "
                  f"{analysis.changed_zstd / MIB:,.1f} MiB")
    runs: list[dict[str, Any]] = []
    limit: dict[str, Any] | None = None
    net: BenchNet | None = None
    ctx: Context | None = None
    fallback = None
    try:
        net, fallback = make_net(s)
        if fallback:
            progress.note(f"replication: no namespace ({fallback}): host loopback")
        progress.note(f"replication: {net.describe()}")
        ctx = Context(s, net, pair, analysis, work, log_dir, progress)
        setup_error: dict[str, str] = {}
        try:
            ctx.rsync = start_rsync(net, pair.v2, work, log_dir)
            ctx.servers.append(ctx.rsync.daemon)
        except Exception as e:
            setup_error["rsync"] = f"rsync daemon: {e}"
        if any(t.startswith("icbd") for t in s.tools):
            try:
                ctx.icbd = start_icbd(ctx)
            except Exception as e:
                setup_error["icbd"] = f"icbd setup: {e}"
                progress.note(f"replication: {setup_error['icbd'][:400]}")
        if s.baseline is not None:
            try:
                ctx.icbd_base = start_icbd(ctx, s.baseline, "-base")
            except Exception as e:
                setup_error["icbd-base"] = f"icbd baseline setup: {e}"
                progress.note(f"replication: {setup_error['icbd-base'][:400]}")
        if ctx.icbd is not None and s.link_bps is None:  # a loopback's limit
            progress.note("replication: measuring the machine's limit (copy, hashes, LMDB, "
                          "loopback)")
            try:
                limit = machine_limit(ctx)
            except Exception as e:
                progress.note(f"replication: no limit: {type(e).__name__}: {e}")
        for rep, kind, tool in plan(s):
            family = "rsync" if tool.startswith("rsync") else (
                "icbd-base" if tool.endswith(BASE_SUFFIX) else "icbd")
            if family in setup_error:
                rec: dict[str, Any] = {"kind": kind, "tool": tool, "error": setup_error[family]}
            else:
                try:
                    rec = (rsync_run if family == "rsync" else icbd_run)(ctx, kind, tool, rep)
                except Exception as e:
                    rec = {"kind": kind, "tool": tool, "error": f"{type(e).__name__}: {e}"}
            rec["rep"] = rep
            rec.pop("output", None)
            wire = rec.get("wire_bytes")
            rec["bytes"] = wire if wire is not None else rec.get("tool_bytes")
            runs.append(rec)
            progress.finish(rec)
    except KeyboardInterrupt:
        progress.note("replication: interrupted; writing what was measured")
    finally:
        if ctx is not None:
            for srv in reversed(ctx.servers):
                srv.stop()
        if net is not None:
            net.close()
        if s.work is None:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    rows = summarize(runs, s.kinds, s.tools)
    add_limit(rows, limit)
    tgts = targets(rows, analysis, s.link_bps)
    network = net.describe() if net is not None else "-"
    doc: dict[str, Any] = {
        "meta": {"started": started, "host": _host_info(), "reps": s.reps,
                 "load1_start": load_start, "load1_end": os.getloadavg()[0],
                 "zstd_level": s.zstd_level, "argv": sys.argv[1:], "link_bps": s.link_bps,
                 "net_fallback": fallback},
        "network": network,
        "network_short": (f"{netlab.fmt_rate(s.link_bps)} link" if s.link_bps
                          else "loopback"),
        "bytes_source": ("kernel interface counters (both directions, headers included)"
                         if net is not None and net.kind != "host"
                         else "the tools' own counts"),
        "pair": dict(pair.meta) | {"v1": str(pair.v1), "v2": str(pair.v2)},
        "analysis": {k: v for k, v in vars(analysis).items() if k != "v2_map"},
        "publish_s": ctx.icbd.publish_s if ctx is not None and ctx.icbd else {},
        "runs": runs, "rows": rows, "targets": tgts, "vs_baseline": vs_baseline(runs),
        "limit": limit,
    }
    (s.out / "replication.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (s.out / "replication.md").write_text(md)
    plotted = plot(doc, s.out / "replication.png")
    print(md)
    for t in tgts:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"target {t['target']} ({t['kind']} {t['tool']}): {_f(t['value'])} "
              f"{'<=' if t['upper'] else '>='} {t['limit']:g}: {met}")
    print(f"wrote {s.out / 'replication.json'}, replication.md"
          + (", replication.png" if plotted else ""))
    return 0 if all(not r.get("error") for r in runs) else 1


def main(args: argparse.Namespace) -> int:
    """Entry point of ``icbd-bench replication``."""
    try:
        s = resolve(args)
    except ValueError as e:
        print(f"replication: {e}", file=sys.stderr)
        return 2
    if args.report is not None:
        doc = json.loads(args.report.read_text())
        doc["rows"] = summarize(doc["runs"], [k for k in KINDS if any(
            r["kind"] == k for r in doc["runs"])], tool_order([r["tool"] for r in doc["runs"]]))
        add_limit(doc["rows"], doc.get("limit"))
        doc["targets"] = targets(doc["rows"], Analysis(**doc["analysis"]),
                                 doc["meta"].get("link_bps"))
        doc["vs_baseline"] = vs_baseline(doc["runs"])
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "replication.json").write_text(json.dumps(doc, indent=1))
        (s.out / "replication.md").write_text(markdown(doc))
        plot(doc, s.out / "replication.png")
        print(f"wrote {s.out / 'replication.md'}, replication.png")
        return 0
    return run(s)
