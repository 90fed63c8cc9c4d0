"""``icbd-bench bootstorm``: many workstations booting at once, replayed from a recorded boot.

Notes on the design:

- **Driver.** ``--driver trace`` replays a recorded boot (``bench/replay.py``: one NBD
  connection per client, each read sent at its recorded time relative to the reads it depended
  on; see that module for the timing model). ``--driver vm`` boots real QEMU guests over
  PXE against the same servers (``bench/vmdriver.py``). What both drivers share (scenarios,
  settings, the servers and the upstream, process helpers) is ``bench/storm.py``; this module
  imports both, neither imports this one.
- **Scenarios.** ``--clients N --mode simultaneous`` starts N clients at once;
  ``--mode sequential`` runs them one after another; ``--sweep 1,5,15`` runs each count.
  One client alone is always measured too (``--no-baseline`` leaves it out): it is what the
  I/O wait of a storm is compared with, on the same server and in the same run.
  ``--reps N`` runs every (scenario, server) cell N times, interleaved (scenario by scenario,
  all servers once per repetition, each repetition's icbd-cold on an empty store of its own);
  the rows give the median over repetitions of each run's figure and the lowest and highest
  per-repetition median.
- **Servers**, all serving the same image as export ``img``, each started fresh for a run and
  stopped by PID right after it:

  - ``icbd-cold``: ``icbd-cache serve --store EMPTY --export img=nbd://UPSTREAM/img``, faulting
    every chunk from the upstream across the WAN;
  - ``icbd-warm``: the same, on the store the scenario's ``icbd-cold`` run left behind (chunks
    and boot profile: what a site holds from the second boot storm on). When ``icbd-cold`` is
    not run, one unmeasured client primes the store first;
  - ``nbdkit``: ``nbdkit -r file IMG`` on the site (the image is local: no WAN);
  - ``nbdkit-cache``: ``nbdkit -r --filter=cache nbd hostname=UPSTREAM port=P export=img
    cache-on-read=true`` (without cache-on-read the filter caches only writes; its cache file
    is new for each run, so it starts cold like ``icbd-cold``);
  - ``qemu-nbd``: ``qemu-nbd -r -t -e 0 -x img IMG`` on the site.

  The upstream is ``nbdkit -r --filter=log file IMG``: its log gives the reads and bytes that
  crossed the WAN, request by request.
- **Network**: ``bench/netlab.py``: an upstream, a site and a clients network namespace joined
  by a WAN and a LAN veth pair with tbf rates, the WAN delay added by a relay; loopback when
  namespaces cannot be made (said in the report).
- **Image**: ``--image FILE``, or a sparse file of the trace's export size with random bytes
  wherever the trace reads (so every read returns real, incompressible, non-zero data and the
  rest is holes, which icbd-cache learns from block status and never fetches). Before each run
  the image (and for ``icbd-warm`` the store) is read once so that the page cache holds it:
  the bench measures servers and network, not the disk.
- **Measures** per client (replay time, I/O wait, latencies: see ``bench/replay.py``) and per
  run: server CPU (user + system, children included) and peak RSS (VmHWM: for icbd-cache it
  includes the LMDB pages it mapped), upstream reads and bytes, WAN bytes (veth counters with
  headers; relay payload bytes), the client process's CPU and the machine's CPU busy %.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import netlab, replay, servers
from bench.serve import Progress, host_info, wait_for_idle, warm_page_cache
from bench.storm import (
    CHUNK_SIZE,
    EXPORT,
    MIB,
    SERVER_NAMES,
    UPSTREAM_SERVERS,
    Scenario,
    Settings,
    Upstream,
    cpu_busy,
    find_binaries,
    icbd_code_version,
    icbd_stats,
    log_reads,
    peak_rss,
    server_argv,
    sigterm_handler,
    spawn,
    upstream,
    wait_ready,
    warm_store,
)

#: The servers of ``--quick``.
QUICK_SERVERS: tuple[str, ...] = ("icbd-cold", "icbd-warm", "nbdkit-cache")

#: The servers of ``--quick --driver vm`` (2 guests at once, no baseline: about 2 minutes).
QUICK_VM_SERVERS: tuple[str, ...] = ("icbd-cold",)

#: The baseline of the "cache vs cache" ratio.
CACHE_BASELINE = "nbdkit-cache"

#: Reads of the trace replayed by ``--quick`` (the first 2.7 s of the Debian boot).
QUICK_REQUESTS = 300

# --------------------------------------------------------------------------- options


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"need numbers >= 1: {text!r}")
    return sorted(set(values))


#: Short names ``--server`` also takes: ``icbd`` is icbd-cache cold, then warm.
SERVER_ALIASES: dict[str, tuple[str, ...]] = {"icbd": ("icbd-cold", "icbd-warm")}


def _names(choices: Sequence[str], what: str,
           aliases: dict[str, tuple[str, ...]] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [m for n in text.split(",") if n.strip()
                 for m in (aliases or {}).get(n.strip(), (n.strip(),))]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or '(empty)'}; choose from {','.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def _wan(text: str) -> tuple[int | None, float]:
    """``RATE,DELAY`` (``100mbit,10ms``), ``RATE`` alone (no delay), or ``none``."""
    if text.strip().lower() == "none":
        return None, 0.0
    rate, _, delay = text.partition(",")
    try:
        return netlab.parse_rate(rate), netlab.parse_delay(delay) if delay else 0.0
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lan(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return netlab.parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


EPILOG = """\
examples:
  icbd-bench bootstorm --quick                           # 1 and 5 clients, 3 servers, ~2 min
  icbd-bench bootstorm --clients 15 --mode simultaneous --out out/storm15
  icbd-bench bootstorm --clients 5 --mode sequential --server icbd-cold,icbd-warm,nbdkit-cache
  icbd-bench bootstorm --sweep 1,5,15,30,60,120 --wan 100mbit,10ms --lan 1gbit
  icbd-bench bootstorm --clients 5 --net loopback --wan none --no-think --requests 200
  icbd-bench bootstorm --clients 15 --reps 3                # median of 3 runs per cell
  icbd-bench bootstorm --driver vm --quick                  # 2 real guests, icbd-cold, ~2 min
  icbd-bench bootstorm --driver vm --clients 15 --server icbd,nbdkit

servers: icbd-cold, icbd-warm (icbd-cache serve faulting from the upstream over the WAN: empty
store, then the store that run left), nbdkit (file, local), nbdkit-cache (cache filter over
the nbd plugin, from the upstream), qemu-nbd (local).

The network is three namespaces (upstream --WAN-- site --LAN-- clients) with tbf rates and
the WAN delay added by a relay; loopback if namespaces cannot be made, or with --net loopback.
Writes bootstorm.json, bootstorm.md, bootstorm-clients.png (and bootstorm-sweep.png for a
sweep) and logs/ under --out. Exit status: 0 when every client of every run replayed every
read correctly, 1 when some did not, 2 when the benchmark could not run.

--driver vm boots real QEMU guests (the test iMI of scripts/build-test-imi, PXE over iPXE/HTTP
from 'icbd-cache pxe serve', root over NBD from the server under test; KVM when usable, else
TCG) and times each from QEMU's start to ICBD-BOOT-OK on its serial console; it writes
bootstorm-guests.png instead of the client plots. A guest that does not boot within
--vm-timeout counts as failed (exit status 1).
"""


def register(subparsers: Any) -> None:
    """Add the ``bootstorm`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bootstorm", help="N clients replaying a recorded boot against each server",
        description="Boot storms: N NBD clients replay a recorded boot at once (or one after "
                    "another) against icbd-cache (cold and warm), nbdkit, nbdkit's cache "
                    "filter and qemu-nbd, over a shaped WAN and LAN.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", choices=("trace", "vm"), default="trace",
                   help="trace: replay a recorded boot (default); vm: real QEMU guests "
                        "PXE-booting the test iMI (bench/vmdriver.py)")
    p.add_argument("--reps", type=int, default=1, metavar="N",
                   help="repeat every (scenario, server) run N times; the report gives the "
                        "median over repetitions and their spread (default 1)")
    p.add_argument("--clients", type=_int_list, metavar="N[,N...]",
                   help="clients per storm (default 15; --quick 5)")
    p.add_argument("--mode", type=_names(("simultaneous", "sequential"), "mode"),
                   default=["simultaneous"], metavar="simultaneous|sequential",
                   help="start the clients at once or one after another; both: "
                        "'simultaneous,sequential' (default simultaneous)")
    p.add_argument("--sweep", type=_int_list, metavar="N,N,...",
                   help="run a storm of each client count (replaces --clients)")
    p.add_argument("--server", "--servers", dest="servers",
                   type=_names(SERVER_NAMES, "server", SERVER_ALIASES),
                   metavar="NAME[,NAME...]",
                   help=f"servers (default all: {','.join(SERVER_NAMES)}; --quick "
                        f"{','.join(QUICK_SERVERS)})")
    p.add_argument("--trace", type=Path, default=replay.DEFAULT_TRACE,
                   help="boot trace (t_ms,conn,op,offset,count,lat_us CSV, .zst or plain; "
                        "default: the Debian boot in bench/traces)")
    p.add_argument("--requests", type=int, metavar="N",
                   help=f"replay only the first N reads (default all; --quick {QUICK_REQUESTS})")
    p.add_argument("--no-think", action="store_true",
                   help="drop the recorded think times: each read leaves as soon as the reads "
                        "it depended on are answered")
    p.add_argument("--image", type=Path,
                   help="serve this raw image (default: a sparse image of the trace's export "
                        "size with random data where the trace reads)")
    p.add_argument("--wan", type=_wan, default=(100_000_000, 0.010), metavar="RATE,DELAY",
                   help="WAN between upstream and site: rate and one-way delay, or 'none' "
                        "(default 100mbit,10ms)")
    p.add_argument("--lan", type=_lan, default=1_000_000_000, metavar="RATE",
                   help="LAN between site and clients, or 'none' (default 1gbit)")
    p.add_argument("--net", choices=("auto", "netns", "loopback"), default="auto",
                   help="auto: namespaces when shaping is asked and possible, else loopback "
                        "(default); netns: namespaces or fail; loopback: 127.0.0.1")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not add the one-client-alone scenario")
    p.add_argument("--quick", action="store_true",
                   help=f"a fast run: 1 and 5 clients, {','.join(QUICK_SERVERS)}, the first "
                        f"{QUICK_REQUESTS} reads (flags given win)")
    p.add_argument("--wait-idle", type=float, metavar="PCT",
                   help="before each run, wait until the machine's CPU busy %% is at most PCT "
                        "(for shared machines; default: do not wait)")
    p.add_argument("--wait-idle-max", type=float, default=60.0, metavar="SECONDS",
                   help="give up waiting for --wait-idle after this long (default %(default)s)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="limit of one run's replay (default from the trace and client count)")
    p.add_argument("--icbd-args", default="",
                   help="extra arguments for 'icbd-cache serve', one shell-quoted string")
    g = p.add_argument_group("vm driver")
    g.add_argument("--vm-mem", type=int, default=320, metavar="MIB",
                   help="RAM per guest, MiB (default %(default)s)")
    g.add_argument("--vm-timeout", type=float, metavar="SECONDS",
                   help="limit from a guest's start to its boot marker; a guest past it "
                        "counts as not booted (default: 300 s under TCG, 120 s under KVM, "
                        "times the guests per CPU in a simultaneous storm)")
    g.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                   help="auto: KVM when usable (hardware VMX/SVM), else TCG (default)")
    p.add_argument("--out", type=Path,
                   help="output directory (default out/bench/bootstorm-YYYYmmdd-HHMMSS)")
    p.add_argument("--tmpdir", type=Path,
                   help="where the image, stores and caches go (default: the system temp dir)")
    p.set_defaults(func=main)


def resolve(args: argparse.Namespace) -> Settings:
    """Turn parsed arguments into :class:`Settings`."""
    quick = bool(args.quick)
    vm = getattr(args, "driver", "trace") == "vm"
    counts = args.sweep or args.clients or ([2 if vm else 5] if quick else [15])
    scenarios: list[Scenario] = []
    if not args.no_baseline and not (vm and quick):
        scenarios.append(Scenario("simultaneous", 1))
    for mode in args.mode:
        for n in counts:
            sc = Scenario(mode, n)
            if all(s.key != sc.key for s in scenarios):
                scenarios.append(sc)
    names = args.servers or list((QUICK_VM_SERVERS if vm else QUICK_SERVERS) if quick
                                 else SERVER_NAMES)
    names = sorted(names, key=SERVER_NAMES.index)
    out = args.out or Path("out/bench") / dt.datetime.now().strftime("bootstorm-%Y%m%d-%H%M%S")
    wan_rate, wan_delay = args.wan
    return Settings(
        scenarios=scenarios, servers=names, trace=args.trace,
        requests=args.requests or (QUICK_REQUESTS if quick else None),
        think_scale=0.0 if args.no_think else 1.0, image=args.image,
        shaping=netlab.Shaping(wan_rate, wan_delay, args.lan), net=args.net,
        timeout=args.timeout, wait_idle=args.wait_idle, wait_idle_max=args.wait_idle_max,
        icbd_args=shlex.split(args.icbd_args), out=out,
        tmpdir=args.tmpdir, sweep=bool(args.sweep),
        driver=getattr(args, "driver", "trace"), reps=max(1, getattr(args, "reps", 1)),
        vm_mem=getattr(args, "vm_mem", 320), vm_timeout=getattr(args, "vm_timeout", None),
        accel=getattr(args, "accel", "auto"))


# --------------------------------------------------------------------------- building blocks


def make_trace_image(trace: replay.Trace, path: Path, size: int, seed: int = 1) -> Path:
    """A sparse file of ``size`` bytes with pseudo-random bytes on every 4 KiB block the trace
    reads, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, end in trace.ranges():
            end = min(end, size)
            f.seek(start)
            while start < end:
                n = min(8 * MIB, end - start)
                f.write(rng.randbytes(n))
                start += n
    return path


def expected_upstream_bytes(trace: replay.Trace, size: int, chunk: int = CHUNK_SIZE) -> int:
    """Bytes a chunk cache fetches to serve ``trace`` once from empty: every chunk it touches
    (the generated image has data in all of them), the last one possibly short."""
    return sum(min(chunk, size - i * chunk) for i in trace.chunks(chunk))


# --------------------------------------------------------------------------- one run


@dataclass
class RunRecord:
    """One storm against one server. Times in seconds, sizes in bytes.

    ``clients``: per-client figures (:class:`bench.replay.ClientResult` as dicts);
    ``server_cpu_s``/``upstream_cpu_s``: CPU used during the replay; ``peak_rss``: the server's
    VmHWM at the end; ``upstream_reads``/``upstream_read_bytes``: reads the upstream served
    during the whole run (its log filter); ``wan_down``/``wan_up``: bytes the site's WAN veth
    received/sent during the replay, headers included (namespaces only); ``relay_down``/
    ``relay_up``: payload bytes through the WAN delay relay during the replay; ``client_cpu_s``:
    the replay process's CPU; ``host_cpu_pct``: machine-wide CPU busy % during the replay
    (steal included); ``softirq_pct``: the part of it in soft interrupts (mostly the kernel
    moving this bench's packets through veths and tbf); ``other_cpu_pct``: what is left once
    the bench's own processes (server, upstream, relay, clients) and soft interrupts are taken
    out: other work on a shared machine; ``idle_cpu_pct``: CPU busy % sampled for 0.5 s before
    the run, after ``idle_wait_s`` seconds of waiting for ``--wait-idle``;
    ``icbd``: icbd-cache counter deltas (faults, coalesced, hits, misses, ...);
    ``server_version``: for icbd-cache, the checkout's commit when the run started, and whether
    its server code had uncommitted changes (a shared checkout can change during a sweep).
    """

    scenario: str
    mode: str
    n_clients: int
    server: str
    clients: list[dict[str, Any]] = field(default_factory=list)
    rep: int = 0
    wall_s: float | None = None
    server_cpu_s: float | None = None
    peak_rss: int | None = None
    upstream_cpu_s: float | None = None
    upstream_reads: int | None = None
    upstream_read_bytes: int | None = None
    upstream_log: str | None = None
    wan_down: int | None = None
    wan_up: int | None = None
    relay_down: int | None = None
    relay_up: int | None = None
    client_cpu_s: float | None = None
    host_cpu_pct: float | None = None
    softirq_pct: float | None = None
    idle_cpu_pct: float | None = None
    idle_wait_s: float | None = None
    other_cpu_pct: float | None = None
    icbd: dict[str, int] | None = None
    server_version: str | None = None
    error: str | None = None


@dataclass
class Context:
    """Everything a run needs that does not change between runs."""

    s: Settings
    net: netlab.Network
    image: Path
    size: int
    trace: replay.Trace
    binaries: dict[str, str]
    work: Path
    log_dir: Path
    progress: StormProgress


def replay_timeout(ctx: Context, sc: Scenario) -> float:
    """Seconds one storm may take: the given --timeout, else generous for the trace."""
    if ctx.s.timeout:
        return ctx.s.timeout
    per_client = ctx.trace.duration_s * max(ctx.s.think_scale, 0.2) + 30
    return 120 + 10 * per_client * (sc.clients if sc.mode == "sequential" else 1) \
        + 2.0 * sc.clients


def run_replay(ctx: Context, sc: Scenario, host: str, port: int, run_dir: Path,
               on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run ``bench.replay`` in the clients' place against ``host:port``; return its results.

    The replay process gets its own session and is killed by PID on timeout or interrupt; its
    stderr goes to ``logs/replay-RUN.log``. Raises RuntimeError when it leaves no results.
    """
    spec = replay.Spec(host=host, port=port, export=EXPORT, trace=str(ctx.s.trace),
                       clients=sc.clients, mode=sc.mode, think_scale=ctx.s.think_scale,
                       requests=ctx.s.requests, image=str(ctx.image))
    spec_path, out = run_dir / "spec.json", run_dir / "replay.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    argv = ctx.net.argv("clients", [sys.executable, "-m", "bench.replay", "run",
                                    str(spec_path), str(out)])
    err_path = ctx.log_dir / f"replay-{run_dir.name}.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True, text=True)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(replay_timeout(ctx, sc), kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                on_progress(json.loads(line))
        proc.wait()
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    if not out.exists():
        tail = err_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"replay exited with {proc.returncode} and no results "
                           f"(timeout {replay_timeout(ctx, sc):.0f} s?):\n{tail}")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def run_one(ctx: Context, sc: Scenario, name: str, store: Path | None = None,
            tag: str | None = None, rep: int = 0) -> RunRecord:
    """Start the upstream (when needed) and server ``name`` (icbd-cache on ``store``), replay
    ``sc``, stop them. ``tag`` names the run's logs (default ``SCENARIO-SERVER``, with
    ``-rN`` for repetitions after the first); ``rep``: the repetition (from 0)."""
    rec = RunRecord(sc.key, sc.mode, sc.clients, name, rep=rep)
    tag = tag or f"{sc.key}-{name}" + (f"-r{rep + 1}" if rep else "")
    run_dir = ctx.work / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    net = ctx.net
    icbd = ctx.binaries.get("icbd-cold") or ctx.binaries.get("icbd-warm")
    if name in ("icbd-cold", "icbd-warm") and icbd is not None:
        # (the icbd-warm store is primed by an icbd-cold run even when icbd-cold is not
        # one of the servers asked for)
        rec.server_version = icbd_code_version(ctx.binaries.get(name, icbd))
    rec.idle_cpu_pct, _, rec.idle_wait_s = wait_for_idle(0.5, ctx.s.wait_idle,
                                                         ctx.s.wait_idle_max)
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            up: Upstream | None = None
            if name in UPSTREAM_SERVERS:
                up = stack.enter_context(upstream(net, ctx.binaries["upstream"], ctx.image,
                                                  run_dir, ctx.log_dir, tag))
                rec.upstream_log = str(up.log)
            before = icbd_stats(icbd, store) if icbd and store else {}
            host, port = net.site_host, net.port("site")
            argv = server_argv(name, ctx.binaries.get(name) or icbd or "", ctx.image, host, port,
                               (up.host, up.port) if up else None, store, ctx.s.icbd_args)
            env = {"TMPDIR": str(run_dir)} if name == "nbdkit-cache" else None
            srv = spawn(name, net.argv("site", argv), ctx.log_dir / f"{tag}.log", env, port)
            stack.callback(srv.stop)
            size = wait_ready(net, "clients", host, port, [srv])
            if size != ctx.size:
                raise servers.ServerError(f"{name} serves {size} bytes, expected {ctx.size}")
            warm_page_cache(ctx.image)
            if store is not None:
                warm_store(store)
            cpu0 = srv.cpu_seconds()
            up_cpu0 = up.cpu_seconds() if up else 0.0
            relay_cpu0 = up.relay.cpu_seconds() if up and up.relay else 0.0
            t0 = time.monotonic()
            wan0 = net.wan_bytes() if up else None
            relay0 = up.relay_counts() if up else None
            times0 = psutil.cpu_times()
            progress = ctx.progress.runner(sc, name, len(ctx.trace.head(ctx.s.requests)),
                                           rep, ctx.s.reps)
            doc = run_replay(ctx, sc, host, port, run_dir, progress)
            rec.host_cpu_pct, rec.softirq_pct = cpu_busy(times0, psutil.cpu_times())
            elapsed = time.monotonic() - t0
            rec.server_cpu_s = max(0.0, srv.cpu_seconds() - cpu0)
            rec.peak_rss = peak_rss(srv.pid)
            if not srv.alive():
                raise RuntimeError(f"{name} exited during the run:\n{srv.log_tail()}")
            if up is not None:
                rec.upstream_cpu_s = max(0.0, up.cpu_seconds() - up_cpu0)
                wan1 = net.wan_bytes()
                if wan0 is not None and wan1 is not None:
                    rec.wan_down, rec.wan_up = wan1[0] - wan0[0], wan1[1] - wan0[1]
            rec.clients = doc["clients"]
            rec.client_cpu_s = doc["client_cpu_s"]
            rec.wall_s = doc["wall_s"]
            ours = rec.server_cpu_s + (rec.upstream_cpu_s or 0.0) + rec.client_cpu_s + (
                up.relay.cpu_seconds() - relay_cpu0 if up and up.relay else 0.0)
            rec.other_cpu_pct = max(0.0, rec.host_cpu_pct - rec.softirq_pct - 100 * ours / (
                elapsed * (os.cpu_count() or 1)))
            srv.stop()
            if up is not None:
                up.stop()
                relay1 = up.relay_counts()
                if relay0 is not None and relay1 is not None:
                    rec.relay_down = relay1.down - relay0.down
                    rec.relay_up = relay1.up - relay0.up
                reads = log_reads(up.log)
                rec.upstream_reads = len(reads)
                rec.upstream_read_bytes = sum(n for _, n in reads)
            if icbd and store:
                after = icbd_stats(icbd, store)
                rec.icbd = {k: v - before.get(k, 0) for k, v in after.items()
                            if v != before.get(k, 0)}
    except (servers.ServerError, RuntimeError, OSError, ValueError, KeyError,
            subprocess.TimeoutExpired) as e:
        rec.error = f"{type(e).__name__}: {e}"
    if rec.wall_s is None:
        rec.wall_s = time.monotonic() - t_start
    return rec


# --------------------------------------------------------------------------- progress


class StormProgress(Progress):
    """One live line per run: rewritten in place on a TTY, a log line every 10 s otherwise."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self._last_log = 0.0

    def runner(self, sc: Scenario, server: str, requests: int, rep: int = 0, reps: int = 1
               ) -> Callable[[dict[str, Any]], None]:
        """The callback for the replay's progress lines of one run (``rep`` of ``reps``)."""
        head = f"[{self.done + 1}/{self.total}] {sc.label} {server}" + (
            f" rep {rep + 1}/{reps}" if reps > 1 else "")
        if not self.tty:
            self._emit(f"{head}: started", True)
        self._last_log = time.monotonic()

        def update(p: dict[str, Any]) -> None:
            text = (f"{head}: {p.get('done', 0)}/{p.get('total', 0)} reads, "
                    f"{p.get('clients_done', 0)}/{p.get('clients', 0)} clients done, "
                    f"{p.get('elapsed_s', 0):.1f} s")
            if self.tty:
                self._emit(text, False)
            elif time.monotonic() - self._last_log >= 10:
                self._last_log = time.monotonic()
                self._emit(text, True)
        return update

    def finished(self, rec: RunRecord) -> None:
        """Report a finished run: its medians, or why it failed."""
        self.done += 1
        head = f"[{self.done}/{self.total}] {Scenario(rec.mode, rec.n_clients).label} " \
               f"{rec.server}" + (f" rep {rec.rep + 1}" if rec.rep else "")
        if rec.error:
            lines = [ln.strip() for ln in rec.error.splitlines() if ln.strip()] or ["error"]
            why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            self._emit(f"{head}: FAILED: {why[:300]}", True)
            return
        cl = rec.clients
        waits = [c["io_wait_s"] for c in cl]
        reps = [c["replay_s"] for c in cl]
        bad = sum(1 for c in cl if c["error"] or c["mismatches"])
        parts = [f"I/O wait median {statistics.median(waits):.2f} s max {max(waits):.2f} s",
                 f"replay median {statistics.median(reps):.2f} s",
                 f"cpu {rec.server_cpu_s or 0:.1f} s"]
        if rec.upstream_read_bytes is not None:
            parts.append(f"upstream {rec.upstream_read_bytes / MIB:.1f} MiB")
        if bad:
            parts.append(f"{bad} clients FAILED")
        self._emit(f"{head}: " + ", ".join(parts), True)


# --------------------------------------------------------------------------- summary


#: Per-run figures that are counts: summed over repetitions rather than taken the median of.
_SUMMED = frozenset({"complete_clients", "requests", "errors", "mismatches"})
#: Per-run medians whose spread over repetitions (lowest, highest) the rows carry.
_SPREAD = ("io_wait_s_median", "replay_s_median")


def summarize(runs: Sequence[dict[str, Any]], expected_requests: int,
              expected_bytes: int) -> list[dict[str, Any]]:
    """One row per (scenario, server): medians, p95 and max over its clients, and the
    ratios; with several repetitions (runs with ``rep`` 0, 1, ...), the median over
    repetitions of each run's figure.

    ``vs_alone``: median I/O wait / the same server's median with one client alone (of the
    same repetition; with several, the median of those ratios); ``vs_cache``: / nbdkit-cache's
    in the same scenario and repetition. ``reps``: repetitions; ``io_wait_s_median_spread`` and
    ``replay_s_median_spread``: [lowest, highest] per-repetition median (None with one);
    ``complete_clients``, ``requests``, ``errors``, ``mismatches``: summed over repetitions,
    ``clients_total``: ``n_clients`` x repetitions. Times in seconds, latencies in ms, sizes in
    bytes.
    """
    per_run = [_run_row(r, expected_requests, expected_bytes) for r in runs]
    alone = {(r["server"], r["rep"]): r.get("io_wait_s_median") for r in per_run
             if r["scenario"] == "alone"}
    cache = {(r["scenario"], r["rep"]): r.get("io_wait_s_median") for r in per_run
             if r["server"] == CACHE_BASELINE}
    for row in per_run:
        w = row.get("io_wait_s_median")
        a = alone.get((row["server"], row["rep"]))
        c = cache.get((row["scenario"], row["rep"]))
        row["vs_alone"] = w / a if w is not None and a else None
        row["vs_cache"] = w / c if w is not None and c else None
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in per_run:
        groups.setdefault((row["scenario"], row["server"]), []).append(row)
    return [_aggregate(rs) for rs in groups.values()]


def _aggregate(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row of one (scenario, server) from its per-repetition rows (see
    :func:`summarize`)."""
    first = rs[0]
    row: dict[str, Any] = {"scenario": first["scenario"], "mode": first["mode"],
                           "n_clients": first["n_clients"], "server": first["server"],
                           "error": next((r["error"] for r in rs if r["error"]), None),
                           "reps": len(rs), "clients_total": first["n_clients"] * len(rs)}
    keys = [k for k in first if k not in row and k != "rep"]
    for r in rs[1:]:
        keys += [k for k in r if k not in keys and k not in row and k != "rep"]
    for k in keys:
        vals = [r[k] for r in rs if r.get(k) is not None]
        if not vals:
            row[k] = None
        elif k in _SUMMED:
            row[k] = sum(vals)
        elif len(vals) == 1:
            row[k] = vals[0]
        else:
            row[k] = statistics.median(vals)
    for k in _SPREAD:
        vals = [r[k] for r in rs if r.get(k) is not None]
        row[f"{k}_spread"] = [min(vals), max(vals)] if len(rs) > 1 and vals else None
    return row


def _run_row(r: dict[str, Any], expected_requests: int, expected_bytes: int
             ) -> dict[str, Any]:
    """Medians, p95 and max over the clients of one run."""
    cl = r["clients"]
    row: dict[str, Any] = {"scenario": r["scenario"], "mode": r["mode"],
                           "n_clients": r["n_clients"], "server": r["server"],
                           "rep": int(r.get("rep", 0)), "error": r["error"]}
    if cl:
        complete = [c for c in cl if c["requests"] == expected_requests
                    and c["bytes"] == expected_bytes and not c["mismatches"]
                    and not c["error"]]
        for metric in ("io_wait_s", "replay_s", "io_busy_s"):
            vals = [float(c[metric]) for c in cl]
            row[f"{metric}_median"] = statistics.median(vals)
            row[f"{metric}_p95"] = replay.percentile(vals, 95)
            row[f"{metric}_max"] = max(vals)
        row["lat_p50_ms"] = statistics.median(c["lat_p50_ms"] for c in cl)
        row["lat_p95_ms"] = statistics.median(c["lat_p95_ms"] for c in cl)
        row["lat_max_ms"] = max(c["lat_max_ms"] for c in cl)
        row["lag_s_median"] = statistics.median(c["lag_s"] for c in cl)
        row["complete_clients"] = len(complete)
        row["requests"] = sum(c["requests"] for c in cl)
        row["errors"] = sum(c["errors"] for c in cl)
        row["mismatches"] = sum(c["mismatches"] for c in cl)
    for k in ("server_cpu_s", "peak_rss", "upstream_cpu_s", "upstream_reads",
              "upstream_read_bytes", "wan_down", "wan_up", "relay_down", "relay_up",
              "client_cpu_s", "host_cpu_pct", "softirq_pct", "other_cpu_pct",
              "idle_cpu_pct", "idle_wait_s", "wall_s"):
        row[k] = r.get(k)
    return row


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """The results document as a markdown report: setup, the summary table, the ratios and
    per-client tables."""
    meta = doc["meta"]
    rows: list[dict[str, Any]] = doc["rows"]
    tr = meta["trace"]
    lines = ["# icbd-bench bootstorm", ""]
    lines.append(
        f"Trace `{Path(tr['path']).name}`: {tr['requests']} reads per client "
        f"({tr['read_bytes'] / MIB:.1f} MiB, {tr['chunks']} distinct 64 KiB chunks = "
        f"{tr['chunk_bytes'] / MIB:.1f} MiB), recorded boot {tr['duration_s']:.1f} s, "
        f"export {meta['image_bytes']} bytes; think time "
        f"{'kept' if meta['think_scale'] else 'dropped (--no-think)'}. "
        f"Image: {meta['image']}.")
    lines.append(f"Network: {meta['network']}.")
    if meta.get("network_fallback"):
        lines.append(f"**Namespaces unavailable ({meta['network_fallback']}): loopback, "
                     "no shaping.**")
    host = meta["host"]
    lines.append(f"Host: {host.get('cpus')} CPUs ({host.get('cpu', '?')}), kernel "
                 f"{host.get('kernel', '?')}; clients are Python asyncio (nbd.aio) in one "
                 "process on the same machine.")
    versions = [f"{n}: {v['version']}" for n, v in meta["servers"].items() if "version" in v]
    lines.append("Servers: " + "; ".join(versions) + ".")
    seen = list(dict.fromkeys(r["server_version"] for r in doc["runs"]
                              if r.get("server_version")))
    if len(seen) > 1 or any(v.endswith("+dirty") for v in seen):
        lines.append("**icbd-cache's code changed during the benchmark or had uncommitted "
                     "changes** (shared checkout): " + "; ".join(seen) + ".")
    if meta.get("interrupted"):
        lines.append("**Interrupted**: partial results.")
    reps = max((int(r.get("reps", 1)) for r in rows), default=1)
    if reps > 1:
        lines.append(f"**{reps} repetitions per cell**: every figure is the median over "
                     "repetitions of the run's own figure; in brackets the lowest and highest "
                     "per-repetition median. Per-client tables and plots: the first "
                     "repetition.")
    spread_head = " (min-max)" if reps > 1 else ""
    lines += ["", f"| scenario | server | I/O wait s median{spread_head} | p95 | max "
              f"| replay s median{spread_head} | p95 "
              "| max | lat ms p50 | p95 | max | WAN MiB | upstream MiB | CPU s | peak RSS MiB "
              f"| vs alone | vs {CACHE_BASELINE} | other CPU % | clients ok |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        label = Scenario(r["mode"], r["n_clients"]).label
        if r.get("io_wait_s_median") is None:
            lines.append(f"| {label} | {r['server']} | FAILED: "
                         f"{(r['error'] or '').splitlines()[0][:120] if r['error'] else '-'} "
                         + "|" * 17)
            continue
        wan = r["wan_down"] if r["wan_down"] is not None else r["relay_down"]
        wait, rep_s = f"{r['io_wait_s_median']:.2f}", f"{r['replay_s_median']:.1f}"
        if r.get("io_wait_s_median_spread"):
            lo, hi = r["io_wait_s_median_spread"]
            wait += f" ({lo:.2f}-{hi:.2f})"
        if r.get("replay_s_median_spread"):
            lo, hi = r["replay_s_median_spread"]
            rep_s += f" ({lo:.1f}-{hi:.1f})"
        lines.append(
            f"| {label} | {r['server']} | {wait} | {r['io_wait_s_p95']:.2f} "
            f"| {r['io_wait_s_max']:.2f} | {rep_s} | {r['replay_s_p95']:.1f} "
            f"| {r['replay_s_max']:.1f} | {r['lat_p50_ms']:.2f} | {r['lat_p95_ms']:.1f} "
            f"| {r['lat_max_ms']:.0f} | {_mib(wan)} | {_mib(r['upstream_read_bytes'])} "
            f"| {_f(r['server_cpu_s'], '.1f')} | {_mib(r['peak_rss'])} | {_x(r['vs_alone'])} "
            f"| {_x(r['vs_cache'])} | {_f(r['other_cpu_pct'], '.0f')} "
            f"| {r['complete_clients']}/{r.get('clients_total', r['n_clients'])} |")
    lines += ["", "I/O wait: sum of a client's read latencies; replay: its first read sent to "
              "its last reply; lat: per-client p50/p95 (median over clients) and the largest "
              "of all. WAN MiB: received by the site over the WAN during the replay (veth, "
              "headers included; relay payload on loopback); upstream MiB: read from the "
              "upstream (its log). CPU: the server's user+system during the replay. vs alone: "
              "median I/O wait / the same server's with one client alone; vs "
              f"{CACHE_BASELINE}: / {CACHE_BASELINE}'s in the same scenario. other CPU: "
              "machine CPU busy % used neither by the bench's processes nor in soft "
              "interrupts (other work on a shared machine, steal included). "
              "clients ok: replayed every read with the right bytes (over all "
              "repetitions).", ""]
    lines += ratio_lines(rows)
    lags = [r["lag_s_median"] for r in rows if r.get("lag_s_median") is not None]
    cpus = [r["host_cpu_pct"] for r in rows if r.get("host_cpu_pct") is not None]
    other = [r["other_cpu_pct"] for r in rows if r.get("other_cpu_pct") is not None]
    soft = [r["softirq_pct"] for r in rows if r.get("softirq_pct") is not None]
    if lags and cpus and other and soft:
        lines.append(f"Client-side lateness (median per client, summed over its reads): "
                     f"{min(lags):.2f} to {max(lags):.2f} s. Machine CPU busy during replays "
                     f"{min(cpus):.0f} to {max(cpus):.0f} %; soft interrupts {min(soft):.0f} "
                     f"to {max(soft):.0f} %; other work {min(other):.0f} to {max(other):.0f} %.")
    lines.append("")
    lines += per_client_tables(doc)
    return "\n".join(lines) + "\n"


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The headline ratios as markdown bullet lines."""
    out: list[str] = []
    for r in rows:
        if r["scenario"] != "alone" and r.get("vs_alone") is not None:
            label = Scenario(r["mode"], r["n_clients"]).label
            out.append(f"- {r['server']}: median I/O wait {label} / 1 alone = "
                       f"{r['vs_alone']:.2f}x")
    for r in rows:
        if r["server"] == "icbd-cold" and r.get("vs_cache") is not None:
            label = Scenario(r["mode"], r["n_clients"]).label
            out.append(f"- {label}: median I/O wait icbd-cold / {CACHE_BASELINE} = "
                       f"{r['vs_cache']:.2f}x")
    return [*out, ""] if out else []


def per_client_tables(doc: dict[str, Any], limit: int = 30) -> list[str]:
    """For each scenario with at most ``limit`` clients: I/O wait / replay time per client
    and server."""
    out: list[str] = []
    runs: list[dict[str, Any]] = doc["runs"]
    for key in dict.fromkeys(r["scenario"] for r in runs):
        rs = [r for r in runs if r["scenario"] == key and r["clients"]
              and not r.get("rep", 0)]
        if not rs or rs[0]["n_clients"] > limit:
            continue
        label = Scenario(rs[0]["mode"], rs[0]["n_clients"]).label
        out += [f"### {label}: I/O wait / replay time per client (s)", "",
                "| client | " + " | ".join(r["server"] for r in rs) + " |",
                "|--:|" + "--:|" * len(rs)]
        for i in range(rs[0]["n_clients"]):
            cells = []
            for r in rs:
                c = r["clients"][i] if i < len(r["clients"]) else None
                cells.append("-" if c is None else
                             f"{c['io_wait_s']:.2f} / {c['replay_s']:.1f}"
                             + (" !" if c["error"] or c["mismatches"] else ""))
            out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot_clients(doc: dict[str, Any], path: Path, limit: int = 30) -> bool:
    """Per-client I/O wait and replay time as bars, one row of panels per scenario with at
    most ``limit`` clients, servers side by side. Returns False when there is nothing to
    draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in doc["runs"] if r["clients"] and r["n_clients"] <= limit
            and not r.get("rep", 0)]
    keys = list(dict.fromkeys(r["scenario"] for r in runs))
    if not keys:
        return False
    fig = Figure(figsize=(13, 3.2 * len(keys) + 1), layout="constrained")
    FigureCanvasAgg(fig)
    names = list(dict.fromkeys(r["server"] for r in runs))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for row, key in enumerate(keys):
        rs = [r for r in runs if r["scenario"] == key]
        label = Scenario(rs[0]["mode"], rs[0]["n_clients"]).label
        for col, (metric, title) in enumerate((("io_wait_s", "I/O wait (s)"),
                                               ("replay_s", "replay time (s)"))):
            ax = fig.add_subplot(len(keys), 2, row * 2 + col + 1)
            for g, r in enumerate(rs):
                vals = [c[metric] for c in r["clients"]]
                width = 0.8 / max(1, len(vals))
                xs = [g - 0.4 + width * (i + 0.5) for i in range(len(vals))]
                ax.bar(xs, vals, width * 0.85, color=colors[r["server"]],
                       label=r["server"] if row == 0 and col == 0 else None)
            ax.set_xticks(range(len(rs)), [r["server"] for r in rs], fontsize=8)
            ax.set_ylabel(title, fontsize=8)
            ax.set_title(f"{label}: {title}, one bar per client", fontsize=9)
    fig.suptitle(f"icbd-bench bootstorm: {doc['meta']['network_short']}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def plot_sweep(doc: dict[str, Any], path: Path) -> bool:
    """Median (and p95, dashed) I/O wait and replay time against the client count, one line
    per server. Returns False with fewer than three client counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in doc["rows"] if r.get("io_wait_s_median") is not None
            and (r["mode"] == "simultaneous" or r["n_clients"] == 1)]
    counts = sorted({r["n_clients"] for r in rows})
    if len(counts) < 3:
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for col, (metric, title) in enumerate((("io_wait_s", "I/O wait per client (s)"),
                                           ("replay_s", "replay time per client (s)"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for i, name in enumerate(dict.fromkeys(r["server"] for r in rows)):
            rs = sorted((r for r in rows if r["server"] == name), key=lambda r: r["n_clients"])
            xs = [r["n_clients"] for r in rs]
            ax.plot(xs, [r[f"{metric}_median"] for r in rs], "o-", color=f"C{i}", label=name)
            ax.plot(xs, [r[f"{metric}_p95"] for r in rs], "--", color=f"C{i}", alpha=0.5)
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("clients booting at once")
        ax.set_ylabel(title)
        ax.set_title(f"median (solid) and p95 (dashed) {title}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5,
               fontsize=8)
    fig.suptitle(f"icbd-bench bootstorm sweep: {doc['meta']['network_short']}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# --------------------------------------------------------------------------- the benchmark


def run(s: Settings) -> int:
    """Run the benchmark described by ``s``; write JSON, markdown and PNGs; return the exit
    status."""
    try:
        trace = replay.load_trace(s.trace).head(s.requests)
    except (OSError, replay.TraceError) as e:
        print(f"bootstorm: {e}", file=sys.stderr)
        return 2
    binaries, missing = find_binaries(s.servers)
    for name, why in missing.items():
        print(f"bootstorm: skipping {name}: {why}")
    names = [n for n in s.servers if n in binaries]
    if not names:
        print("bootstorm: no server to run", file=sys.stderr)
        return 2
    if s.image is not None:
        if not s.image.is_file():
            print(f"bootstorm: no such image file: {s.image}", file=sys.stderr)
            return 2
        size = s.image.stat().st_size
        if size < trace.end:
            print(f"bootstorm: {s.image} has {size} bytes; the trace reads up to {trace.end}",
                  file=sys.stderr)
            return 2
        if trace.export_size is not None and size != trace.export_size:
            print(f"bootstorm: note: {s.image} has {size} bytes, the trace was recorded on "
                  f"{trace.export_size}")
    else:
        size = trace.export_size or -(-trace.end // MIB) * MIB

    log_dir = s.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs_total = len(s.scenarios) * len(names) * s.reps
    progress = StormProgress(runs_total)
    records: list[RunRecord] = []
    meta: dict[str, Any] = {}
    interrupted = False
    old = signal.signal(signal.SIGTERM, sigterm_handler(os.getpid()))
    net: netlab.Network | None = None
    try:
        try:
            net, fallback = netlab.make_network(s.net, s.shaping)
        except netlab.LabError as e:
            print(f"bootstorm: cannot make network namespaces: {e}", file=sys.stderr)
            return 2
        if fallback:
            progress.note(f"bootstorm: network namespaces unavailable ({fallback}): running on "
                          "loopback with no rate shaping")
        progress.note(f"bootstorm: {net.describe()}")
        with tempfile.TemporaryDirectory(prefix="icbd-bootstorm-", dir=s.tmpdir) as tmp:
            work = Path(tmp)
            if s.image is not None:
                image = s.image.resolve()
            else:
                image = work / "img.raw"
                progress.note(f"bootstorm: writing a sparse {size / MIB:.0f} MiB image with "
                              f"{sum(e - b for b, e in trace.ranges()) / MIB:.1f} MiB of random "
                              f"data where the trace reads, to {image}")
                make_trace_image(trace, image, size)
            ctx = Context(s, net, image, size, trace, binaries, work, log_dir, progress)
            meta.update(_meta(s, ctx, names, missing, fallback))
            for sc in s.scenarios:
                for rep in range(s.reps):
                    # each repetition's icbd-cold starts from an empty store of its own
                    store = work / (f"store-{sc.key}" + (f"-r{rep + 1}" if rep else ""))
                    for name in names:
                        if name == "icbd-warm" and not (store / "data.mdb").exists():
                            progress.note(f"bootstorm: priming the icbd-warm store for "
                                          f"{sc.label} with one unmeasured client")
                            prime = run_one(ctx, Scenario("simultaneous", 1), "icbd-cold",
                                            store, f"{sc.key}-prime"
                                            + (f"-r{rep + 1}" if rep else ""))
                            if prime.error:
                                progress.note(f"bootstorm: priming failed: {prime.error}")
                        rec = run_one(ctx, sc, name, store if name.startswith("icbd") else None,
                                      rep=rep)
                        records.append(rec)
                        progress.finished(rec)
    except KeyboardInterrupt:
        progress.note("bootstorm: interrupted; writing what was measured")
        if not records:
            return 130
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old)
        if net is not None:
            net.close()

    if not meta:
        return 2
    meta["interrupted"] = interrupted
    meta["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs = [asdict(r) for r in records]
    rows = summarize(runs, len(trace), trace.read_bytes)
    doc = {"meta": meta, "rows": rows, "runs": runs}
    (s.out / "bootstorm.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = markdown(doc)
    (s.out / "bootstorm.md").write_text(table)
    written = [s.out / "bootstorm.json", s.out / "bootstorm.md"]
    if plot_clients(doc, s.out / "bootstorm-clients.png"):
        written.append(s.out / "bootstorm-clients.png")
    if plot_sweep(doc, s.out / "bootstorm-sweep.png"):
        written.append(s.out / "bootstorm-sweep.png")
    print()
    print(table, end="")
    print(f"\nbootstorm: wrote {', '.join(map(str, written))}, logs in {log_dir}")
    if interrupted:
        return 130
    bad = [r for r in rows if r["error"] or r.get("complete_clients") != r["clients_total"]]
    if bad:
        print(f"bootstorm: {len(bad)} of {len(rows)} runs had failures (see the logs)",
              file=sys.stderr)
        return 1
    return 0


def _meta(s: Settings, ctx: Context, names: list[str], missing: dict[str, str],
          fallback: str | None) -> dict[str, Any]:
    """Everything needed to read and repeat the results: settings, versions, command lines."""
    net, trace = ctx.net, ctx.trace
    srv: dict[str, Any] = {}
    for n in names:
        b = ctx.binaries[n]
        up = (net.upstream_host, 0) if n in UPSTREAM_SERVERS else None
        argv = server_argv(n, b, ctx.image, net.site_host, 0, up, Path("STORE"), s.icbd_args)
        srv[n] = {"binary": b, "version": servers.tool_version(b),
                  "cmd": shlex.join(argv).replace(":0", ":PORT").replace("port=0", "port=PORT")}
    for n, why in missing.items():
        srv[n] = {"skipped": why}
    chunks = trace.chunks(CHUNK_SIZE)
    wan_rate, lan_rate = net.rates
    short = (f"WAN {netlab.fmt_rate(wan_rate)} + {net.shaping.wan_delay * 1000:g} ms, LAN "
             f"{netlab.fmt_rate(lan_rate)} ({net.kind}), "
             f"{'think time' if s.think_scale else 'no think time'}")
    return {
        "benchmark": "icbd-bench bootstorm",
        "driver": "trace",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "trace": {"path": str(s.trace), "requests": len(trace), "read_bytes": trace.read_bytes,
                  "chunks": len(chunks),
                  "chunk_bytes": expected_upstream_bytes(trace, ctx.size),
                  "duration_s": trace.duration_s, "export_size": trace.export_size},
        "image": str(s.image) if s.image else "generated (sparse, random data where the "
                                              "trace reads)",
        "image_bytes": ctx.size,
        "think_scale": s.think_scale,
        "wait_idle_pct": s.wait_idle, "wait_idle_max_s": s.wait_idle_max,
        "scenarios": [asdict(sc) | {"key": sc.key} for sc in s.scenarios],
        "network": net.describe(),
        "network_short": short,
        "network_fallback": fallback,
        "net_kind": net.kind,
        "wan_rate_bps": wan_rate, "wan_delay_s": net.shaping.wan_delay,
        "lan_rate_bps": lan_rate,
        "servers": srv,
        "host": host_info(),
    }


def main(args: argparse.Namespace) -> int:
    """Entry point of ``icbd-bench bootstorm`` given parsed arguments; returns the exit
    status."""
    if args.requests is not None and args.requests < 1:
        print("bootstorm: --requests must be at least 1", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("bootstorm: --reps must be at least 1", file=sys.stderr)
        return 2
    if args.driver == "vm":
        from bench import vmdriver

        return vmdriver.run(resolve(args))
    return run(resolve(args))
