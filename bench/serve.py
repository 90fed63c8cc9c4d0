"""``icbd-bench serve``: fio's nbd engine and nbdcopy against icbd-cache, nbdkit and qemu-nbd.

Notes on the design:

- All servers serve the same raw image, which is read in full right before every run so that it
  is in the page cache (these machines page out memory left idle for about a minute). The
  benchmark measures the server's request path, not the disk.
- Runs are paired: for each workload and each repetition the servers run back to back in the same
  order (A B C A B C ...). A ratio to nbdkit is taken within each repetition and the median of
  those ratios is reported, so slow drifts of the machine cancel out.
- Each server is started fresh for every run and stopped by PID right after it. Its CPU time
  (user + system, its descendants included) is read just before and just after the client runs,
  giving CPU microseconds per request.
- Before each run the background is sampled while nothing of ours runs: CPU busy percent over
  ``--idle-sample`` seconds, and the 1-minute load average (which still includes earlier runs).
  On a shared machine ``--wait-idle PCT`` waits (bounded) for the others to quiet down first;
  the image is warmed after that wait, right before the client starts.
- fio runs are time-based. nbdcopy copies the whole image to ``null:``, again and again until
  ``--runtime`` seconds have passed (at least once), and each copy is timed; a single copy of a
  page-cached 1 GiB image takes well under a second, too short to measure alone.
- CPU times come from /proc in clock ticks (10 ms), so short runs have coarse CPU figures.
- Write workloads (``--writes``) measure what durability costs: random writes, some with a
  FLUSH after every N writes (fio ``--fsync=N``), against servers that write for real: icbd-cache
  into a per-client copy-on-write overlay in a fresh ``--cow-dir``, nbdkit's file plugin and
  qemu-nbd into a fresh copy of the image (copied and fsynced before the server starts), all
  in ``--tmpdir``. Each server answers a FLUSH with fsyncs of what it wrote (icbd-cache: the
  overlay's data, its block map, and the first time its meta and directory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import report, servers

MIB = 1 << 20

#: nbdcopy's request size, passed explicitly so that the request count is known (bytes).
NBDCOPY_REQUEST_SIZE = 256 * 1024
#: Connections at least of icbd-store's warm-up run of a workload (``--store-warmup``): each
#: reaches a worker chosen by the kernel's hash of its ports, and with 8 a worker of two is
#: missed once in 128 runs.
WARMUP_JOBS = 8


@dataclass(frozen=True)
class Workload:
    """One client workload: a fio job (``kind == "fio"``) or a whole-image nbdcopy."""

    name: str
    kind: str
    description: str
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    numjobs: int = 1
    #: A FLUSH after every this many writes (fio ``--fsync``); 0: none.
    fsync: int = 0

    @property
    def writes(self) -> bool:
        """The workload writes (the server must serve the image writable)."""
        return "write" in self.rw


WORKLOADS: tuple[Workload, ...] = (
    Workload("rand-4k-qd1", "fio", "4 KiB random read, iodepth 1", "randread", 4096, 1),
    Workload("rand-4k-qd32", "fio", "4 KiB random read, iodepth 32", "randread", 4096, 32),
    Workload("rand-64k-qd8", "fio", "64 KiB random read, iodepth 8", "randread", 65536, 8),
    Workload("seq-1m-qd4", "fio", "1 MiB sequential read, iodepth 4", "read", MIB, 4),
    Workload("rand-4k-qd1-x15", "fio", "15 connections of 4 KiB random read, iodepth 1",
             "randread", 4096, 1, 15),
    Workload("rand-64k-qd2-x15", "fio", "15 connections of 64 KiB random read, iodepth 2",
             "randread", 65536, 2, 15),
    Workload("nbdcopy", "nbdcopy", "nbdcopy of the whole image to null:, timed per copy "
             "(repeated for --runtime)"),
)

WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)

#: What durability costs (``--writes``): random writes without and with FLUSHes.
WRITE_WORKLOADS: tuple[Workload, ...] = (
    Workload("write-4k-qd8", "fio", "4 KiB random write, iodepth 8, no FLUSH", "randwrite",
             4096, 8),
    Workload("write-4k-flush1", "fio", "4 KiB random write, iodepth 1, a FLUSH after every "
             "write", "randwrite", 4096, 1, fsync=1),
    Workload("write-64k-flush16", "fio", "64 KiB random write, iodepth 4, a FLUSH after every "
             "16 writes", "randwrite", 65536, 4, fsync=16),
)

WRITE_WORKLOAD_NAMES = tuple(w.name for w in WRITE_WORKLOADS)
ALL_WORKLOADS = WORKLOADS + WRITE_WORKLOADS


@dataclass
class RunResult:
    """The outcome of one client run against one server.

    Units: ``iops`` requests/s, ``mib_s`` MiB/s, ``p50_us``/``p99_us`` completion latency (fio
    clat) in µs, ``lat_p50_us``/``lat_p99_us`` total latency (submission + completion) in µs,
    ``duration_s`` and ``cpu_s`` seconds, ``cpu_us_per_req`` server CPU µs per request,
    ``idle_cpu_pct`` machine-wide CPU busy % while idle before the run, ``load1`` the 1-minute
    load average then, ``idle_wait_s`` seconds waited for ``--wait-idle``, ``warm_s`` seconds
    spent reading the image into the page cache, ``client_cpu_pct`` the client's CPU time over
    its wall time (percent of one core). For nbdcopy, ``copies`` whole-image copies ran back to
    back and ``duration_s`` is the mean seconds per copy.
    """

    workload: str
    server: str
    rep: int
    iops: float | None = None
    mib_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    lat_p50_us: float | None = None
    lat_p99_us: float | None = None
    requests: int | None = None
    duration_s: float | None = None
    cpu_s: float | None = None
    cpu_us_per_req: float | None = None
    idle_cpu_pct: float | None = None
    load1: float | None = None
    warm_s: float | None = None
    idle_wait_s: float | None = None
    copies: int | None = None
    client_cpu_pct: float | None = None
    error: str | None = None


# --------------------------------------------------------------------------- options


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary suffix: ``64M``, ``1G``, ``512K``, ``4096``."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'}; choose from {','.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


EPILOG = """\
examples:
  icbd-bench serve                                 # 1 GiB image, 10 s runs, 3 reps, all servers
  icbd-bench serve --quick --servers nbdkit,qemu-nbd
  icbd-bench serve --workloads rand-4k-qd1,nbdcopy --reps 5 --out out/bench/serve-a
  icbd-bench serve --image /srv/lab.img --icbd-args='--workers 2' --wait-idle 20
  icbd-bench serve --writes --image-size 256M --reps 3 --out out/bench/writes

workloads:
""" + "\n".join(f"  {w.name:<18} {w.description}" for w in WORKLOADS) + """

write workloads (--writes, or by name; scratch files in --tmpdir):
""" + "\n".join(f"  {w.name:<18} {w.description}" for w in WRITE_WORKLOADS) + """

Each run starts the server fresh on a free 127.0.0.1 port, samples the idle background (waiting
for --wait-idle if given), reads the image into the page cache, runs the client and reads the
server's CPU time. The servers run in
the same order within each repetition; ratios to nbdkit are medians of per-repetition ratios.
Writes serve.json, serve.md, serve.png and logs/ under --out. Exit status: 0 when every run
succeeded, 1 when some run failed, 2 when the benchmark could not run at all.
"""


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="fio (nbd engine) and nbdcopy against icbd-cache, nbdkit and qemu-nbd",
        description="Measure NBD serving from a page-cached raw image: IOPS, MiB/s, latency "
                    "and server CPU per request, paired against nbdkit and qemu-nbd.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=_name_list(servers.SERVER_NAMES),
                   default=list(servers.DEFAULT_SERVERS),
                   help="comma-separated servers, in run order (default: %(default)s)")
    p.add_argument("--workloads", type=_name_list(tuple(w.name for w in ALL_WORKLOADS)),
                   help="comma-separated workloads (default: every read workload, see below)")
    p.add_argument("--writes", action="store_true",
                   help="run the write workloads (what FLUSH costs) instead of the reads; "
                        "icbd-cold, which serves reads only, is left out")
    p.add_argument("--image", type=Path, help="serve this raw file instead of a generated one")
    p.add_argument("--image-size", type=parse_size,
                   help="size of the generated image, e.g. 256M (default 1G; --quick 64M)")
    p.add_argument("--runtime", type=_positive_float,
                   help="seconds per fio run (default 10; --quick 2)")
    p.add_argument("--store-warmup", type=float, metavar="SECONDS",
                   help="icbd-store: before each measured fio run, run the same workload "
                        f"this long unmeasured over {WARMUP_JOBS} connections at least, so the "
                        "hot set of every worker holds what the workload reads (default 2; "
                        "--quick 0.5; 0: only the two nbdcopy passes)")
    p.add_argument("--reps", type=int, help="repetitions per workload, >= 3 for a real "
                   "measurement (default 3; --quick 1)")
    p.add_argument("--idle-sample", type=_positive_float,
                   help="seconds of idle CPU sampling before each run (default 0.5; --quick 0.2)")
    p.add_argument("--wait-idle", type=float, metavar="PCT",
                   help="before each run, wait until the machine's CPU busy %% is at most PCT "
                        "(for shared machines; default: do not wait)")
    p.add_argument("--wait-idle-max", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="give up waiting for --wait-idle after this long (default %(default)s)")
    p.add_argument("--store", action="store_true",
                   help="add icbd-store (warm LMDB store) and icbd-cold (empty store faulting "
                        "from an nbdkit upstream on loopback) to the servers")
    p.add_argument("--quick", action="store_true",
                   help="a fast sanity run: 64 MiB image, 2 s runs, 1 rep (flags given win)")
    p.add_argument("--baseline-bin", type=Path, metavar="PATH",
                   help="another build of icbd-cache (e.g. the previous commit installed in a "
                        "venv of its own) measured in the same run: each icbd server gets a "
                        "'-base' twin run right after it")
    p.add_argument("--baseline-args", metavar="ARGS",
                   help="arguments for the '-base' twins instead of --icbd-args, one "
                        "shell-quoted string; without --baseline-bin the twins run this build, "
                        "e.g. --icbd-args='--workers 2' --baseline-args='--workers 1' pairs "
                        "two workers with one")
    p.add_argument("--icbd-args", default="",
                   help="extra arguments for 'icbd-cache serve', one shell-quoted string; "
                        "write it as --icbd-args='--flag value'")
    p.add_argument("--out", type=Path,
                   help="output directory (default out/bench/serve-YYYYmmdd-HHMMSS)")
    p.add_argument("--json", type=Path, help="JSON results file (default OUT/serve.json)")
    p.add_argument("--plot", type=Path, help="PNG plot file (default OUT/serve.png)")
    p.add_argument("--tmpdir", type=Path,
                   help="where the generated image and the write workloads' scratch copies "
                        "and cow dirs go (default: the system temp dir)")
    p.set_defaults(func=main)


@dataclass(frozen=True)
class Settings:
    """Resolved options (``--quick`` applied). Sizes in bytes, times in seconds."""

    servers: list[str]
    workloads: list[Workload]
    image: Path | None
    image_size: int
    runtime: float
    reps: int
    idle_sample: float
    wait_idle: float | None
    wait_idle_max: float
    icbd_args: list[str]
    out: Path
    json_path: Path
    plot_path: Path
    tmpdir: Path | None
    baseline_bin: str | None = None
    #: the ``-base`` twins' extra arguments (None: ``icbd_args``)
    baseline_args: list[str] | None = None
    #: seconds of the workload itself, unmeasured, before a warm store's measured run
    store_warmup: float = 2.0

    def extra_args(self, name: str) -> list[str]:
        """Extra ``icbd-cache serve`` arguments of server ``name`` (none for other servers)."""
        if not name.startswith("icbd"):
            return []
        if name != servers.kind(name) and self.baseline_args is not None:
            return self.baseline_args
        return self.icbd_args


def _with_twins(names: list[str], twins: bool) -> list[str]:
    """``names`` with each icbd server's ``-base`` twin right after it when ``twins``."""
    if not twins:
        return names
    out: list[str] = []
    for n in names:
        out.append(n)
        if n.startswith("icbd") and not n.endswith(servers.BASE_SUFFIX):
            out.append(servers.base_twin(n))
    return out


def resolve(args: argparse.Namespace) -> Settings:
    """Turn parsed arguments into :class:`Settings`, applying ``--quick`` defaults."""
    quick = bool(args.quick)
    out = args.out or Path("out/bench") / dt.datetime.now().strftime("serve-%Y%m%d-%H%M%S")
    default = WRITE_WORKLOAD_NAMES if args.writes else WORKLOAD_NAMES
    chosen = set(args.workloads or default)
    workloads = [w for w in ALL_WORKLOADS if w.name in chosen]
    names = list(args.servers) + [
        n for n in (servers.STORE_SERVERS if args.store else ()) if n not in args.servers]
    if workloads and all(w.writes for w in workloads):
        names = [n for n in names if servers.kind(n) not in servers.READ_ONLY_SERVERS]
    return Settings(
        servers=_with_twins(names, bool(args.baseline_bin or args.baseline_args is not None)),
        workloads=workloads,
        image=args.image,
        image_size=args.image_size or (64 * MIB if quick else 1 << 30),
        runtime=args.runtime or (2.0 if quick else 10.0),
        reps=args.reps or (1 if quick else 3),
        idle_sample=args.idle_sample or (0.2 if quick else 0.5),
        wait_idle=args.wait_idle,
        wait_idle_max=args.wait_idle_max,
        icbd_args=shlex.split(args.icbd_args),
        out=out,
        json_path=args.json or out / "serve.json",
        plot_path=args.plot or out / "serve.png",
        tmpdir=args.tmpdir,
        baseline_bin=str(args.baseline_bin.resolve()) if args.baseline_bin else None,
        baseline_args=(None if args.baseline_args is None
                       else shlex.split(args.baseline_args)),
        store_warmup=(args.store_warmup if args.store_warmup is not None
                      else (0.5 if quick else 2.0)),
    )


# --------------------------------------------------------------------------- building blocks


def make_image(path: Path, size: int, seed: int = 1) -> Path:
    """Write ``size`` bytes of pseudo-random data to ``path``, every block allocated (no holes).

    Random data defeats compression and zero detection anywhere on the path.
    """
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MIB, left)
            f.write(rng.randbytes(n))
            left -= n
    return path


def warm_page_cache(path: Path) -> float:
    """Read ``path`` in full so that it is in the page cache; return the seconds it took."""
    t0 = time.monotonic()
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        while os.readv(fd, [view]) > 0:
            pass
    finally:
        os.close(fd)
    return time.monotonic() - t0


def sample_background(seconds: float) -> tuple[float, float]:
    """Machine-wide CPU busy percent over ``seconds``, and the 1-minute load average now."""
    psutil.cpu_percent(None)
    pct = float(psutil.cpu_percent(interval=seconds))
    return pct, os.getloadavg()[0]


def wait_for_idle(sample: float, below: float | None, max_wait: float
                  ) -> tuple[float, float, float]:
    """Sample the background until CPU busy % is at most ``below`` or ``max_wait`` s have passed.

    With ``below`` None this is one sample. Returns (CPU busy %, 1-minute load, seconds waited).
    """
    t0 = time.monotonic()
    while True:
        pct, load = sample_background(sample)
        waited = time.monotonic() - t0
        if below is None or pct <= below or waited >= max_wait:
            return pct, load, waited


def fio_command(fio: str, w: Workload, uri: str, runtime: float, output: Path) -> list[str]:
    """The fio argv for workload ``w`` against ``uri``: time-based, ``runtime`` seconds.

    Each of the ``numjobs`` jobs opens its own NBD connection; results are grouped. A write
    workload with ``fsync`` sends a FLUSH after every ``fsync`` writes.
    """
    mode = ([f"--fsync={w.fsync}"] if w.fsync else []) if w.writes else ["--readonly"]
    return [fio, "--name=" + w.name, "--ioengine=nbd", f"--uri={uri}", *mode,
            f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", f"--numjobs={w.numjobs}",
            "--group_reporting", "--time_based", f"--runtime={round(runtime * 1000)}ms",
            "--lat_percentiles=1",
            "--output-format=json", f"--output={output}"]


def nbdcopy_command(nbdcopy: str, uri: str) -> list[str]:
    """The nbdcopy argv copying the whole export at ``uri`` to ``null:``."""
    return [nbdcopy, f"--request-size={NBDCOPY_REQUEST_SIZE}", uri, "null:"]


def parse_fio(doc: dict[str, Any], writes: bool = False) -> dict[str, float | int | None]:
    """Read IOPS, MiB/s, latency percentiles (µs), request count and runtime (s) from fio's JSON
    (of the writes with ``writes``, else of the reads; FLUSHes are not counted as requests).

    ``p50_us``/``p99_us`` are completion latency (clat); ``lat_p50_us``/``lat_p99_us`` are total
    latency (submission + completion). With the nbd engine a reply often arrives while fio is
    still submitting, so clat alone can be far below the real per-request time.
    """
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio wrote no jobs")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    rd = job["write" if writes else "read"]
    def us(kind: str, key: str) -> float | None:
        v = (rd.get(kind, {}).get("percentile") or {}).get(key)
        return None if v is None else float(v) / 1000.0

    return {"iops": float(rd["iops"]), "mib_s": float(rd["bw_bytes"]) / MIB,
            "p50_us": us("clat_ns", "50.000000"), "p99_us": us("clat_ns", "99.000000"),
            "lat_p50_us": us("lat_ns", "50.000000"), "lat_p99_us": us("lat_ns", "99.000000"),
            "requests": int(rd["total_ios"]), "duration_s": float(rd["runtime"]) / 1000.0}


def run_client(cmd: list[str], log: Path, timeout: float,
               cpu: list[float] | None = None) -> float:
    """Run a client to completion, output appended to ``log``; return its wall time (s) and
    append its CPU time (s, user + system, its children included) to ``cpu`` when given.

    The client gets its own process group, killed by its PID on timeout or interrupt. Raises
    RuntimeError when it fails.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        elapsed = time.monotonic() - t0
    if cpu is not None:  # only this client was reaped meanwhile (servers are reaped at stop)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if rc != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {rc}:\n{tail}")
    return elapsed


# --------------------------------------------------------------------------- progress


class Progress:
    """One progress line per run: rewritten in place on a TTY, a log line otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stdout.isatty()

    def _emit(self, text: str, final: bool) -> None:
        if self.tty:
            end = "\n" if final else ""
            sys.stdout.write(f"\r\x1b[K{text}{end}")
        else:
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            sys.stdout.write(f"{stamp} {text}\n")
        sys.stdout.flush()

    def start(self, w: str, server: str, rep: int, reps: int) -> None:
        """Announce a run (TTY only: a log would only repeat it)."""
        if self.tty:
            self._emit(f"[{self.done + 1}/{self.total}] {w} {server} rep {rep + 1}/{reps} ...",
                       False)

    def finish(self, r: RunResult, reps: int) -> None:
        """Report a finished run."""
        self.done += 1
        head = f"[{self.done}/{self.total}] {r.workload:<16} {r.server:<8} rep {r.rep + 1}/{reps}"
        if r.error:
            lines = [ln.strip() for ln in r.error.splitlines() if ln.strip()] or ["error"]
            why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            self._emit(f"{head} FAILED: {why[:300]}", True)
            return
        parts = [f"{r.iops or 0:>9,.0f} IOPS", f"{r.mib_s or 0:8.1f} MiB/s"]
        if r.lat_p50_us is not None and r.lat_p99_us is not None:
            parts.append(f"lat p50 {r.lat_p50_us:.0f} µs p99 {r.lat_p99_us:.0f} µs")
        if r.cpu_us_per_req is not None:
            parts.append(f"cpu {r.cpu_us_per_req:.1f} µs/req")
        if r.copies is not None and r.duration_s is not None:
            parts.append(f"{r.copies} copies of {r.duration_s:.2f} s")
        parts.append(f"idle cpu {r.idle_cpu_pct or 0:.0f}%")
        if r.idle_wait_s is not None and r.idle_wait_s >= 1:
            parts.append(f"(waited {r.idle_wait_s:.0f} s)")
        self._emit(f"{head} " + "  ".join(parts), self.done == self.total)

    def note(self, text: str) -> None:
        """Print a message on a line of its own."""
        if self.tty and self.done < self.total:
            sys.stdout.write("\r\x1b[K")
        print(text, flush=True)


# --------------------------------------------------------------------------- the benchmark


def scratch_for(name: str, image: Path, parent: Path | None) -> Path:
    """A fresh scratch directory for a write run of server ``name`` in ``parent``: a copy of
    ``image`` (fsynced, so its writeback does not fall into the run) for nbdkit and qemu-nbd,
    an empty ``cow`` directory for icbd-cache."""
    scratch = Path(tempfile.mkdtemp(prefix="icbd-bench-write-", dir=parent))
    if servers.kind(name).startswith("icbd"):
        (scratch / "cow").mkdir()
        return scratch
    copy = servers.scratch_image(scratch)
    with open(image, "rb") as src, open(copy, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 * MIB)
        dst.flush()
        os.fsync(dst.fileno())
    return scratch


def run_one(w: Workload, name: str, binary: str, rep: int, s: Settings, image: Path,
            tools: dict[str, str], log_dir: Path) -> RunResult:
    """Start server ``name``, sample the idle machine, warm the image, run ``w``, stop it."""
    r = RunResult(w.name, name, rep)
    tag = f"{w.name}-{rep + 1}"
    client_log = log_dir / f"client-{name}-{tag}.log"
    scratch: Path | None = None
    try:
        extra = s.extra_args(name)
        if w.writes:
            if servers.kind(name) in servers.READ_ONLY_SERVERS:
                raise ValueError(f"{name} serves reads only")
            scratch = scratch_for(name, image, s.tmpdir)
        with servers.running(name, binary, image, log_dir, extra,
                             tag, scratch=scratch) as srv:
            r.idle_cpu_pct, r.load1, r.idle_wait_s = wait_for_idle(
                s.idle_sample, s.wait_idle, s.wait_idle_max)
            r.warm_s = warm_page_cache(image)
            if servers.kind(name) == "icbd-store":
                # "Warm store": the server's own hot set filled as a boot storm would leave it
                # (a chunk enters it on its second read), not just LMDB's pages.
                if "nbdcopy" in tools:
                    for _ in range(2):
                        run_client(nbdcopy_command(tools["nbdcopy"], srv.uri), client_log,
                                   timeout=600)
                if w.kind == "fio" and not w.writes and s.store_warmup > 0:
                    # and as this workload leaves it, in every worker: the kernel hands each
                    # connection to a worker by a hash of its ports, so the measured one may
                    # reach a worker nbdcopy's did not; the workload's own reads, over
                    # WARMUP_JOBS connections at least, admit what it reads in each
                    # (unmeasured: before cpu0, another fio output)
                    warm_json = log_dir / f"fio-{name}-{tag}-warmup.json"
                    warm = replace(w, numjobs=max(w.numjobs, WARMUP_JOBS))
                    run_client(fio_command(tools["fio"], warm, srv.uri, s.store_warmup,
                                           warm_json), client_log,
                               timeout=s.store_warmup + 120)
            cpu0 = srv.cpu_seconds()
            if w.kind == "fio":
                fio_json = log_dir / f"fio-{name}-{tag}.json"
                cmd = fio_command(tools["fio"], w, srv.uri, s.runtime, fio_json)
                client_cpu: list[float] = []
                wall = run_client(cmd, client_log, timeout=s.runtime + 120, cpu=client_cpu)
                r.client_cpu_pct = 100.0 * client_cpu[0] / wall
                cpu1 = srv.cpu_seconds()
                m = parse_fio(json.loads(fio_json.read_text()), w.writes)
                r.iops, r.mib_s = m["iops"], m["mib_s"]
                r.p50_us, r.p99_us = m["p50_us"], m["p99_us"]
                r.lat_p50_us, r.lat_p99_us = m["lat_p50_us"], m["lat_p99_us"]
                r.requests = int(m["requests"] or 0)
                r.duration_s = m["duration_s"]
            else:
                size = image.stat().st_size
                cmd = nbdcopy_command(tools["nbdcopy"], srv.uri)
                total, r.copies = 0.0, 0
                client_cpu = []
                while r.copies == 0 or total < s.runtime:
                    total += run_client(cmd, client_log, timeout=600, cpu=client_cpu)
                    r.copies += 1
                r.client_cpu_pct = 100.0 * sum(client_cpu) / total
                cpu1 = srv.cpu_seconds()
                r.duration_s = total / r.copies
                r.requests = math.ceil(size / NBDCOPY_REQUEST_SIZE) * r.copies
                r.iops = r.requests / total
                r.mib_s = size * r.copies / MIB / total
            if not srv.alive():
                raise RuntimeError(f"{name} exited during the run:\n{srv.log_tail()}")
            r.cpu_s = max(0.0, cpu1 - cpu0)
            if r.requests:
                r.cpu_us_per_req = r.cpu_s * 1e6 / r.requests
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return r


@contextlib.contextmanager
def _image(s: Settings, progress: Progress) -> Iterator[Path]:
    if s.image is not None:
        yield s.image
        return
    with tempfile.TemporaryDirectory(prefix="icbd-bench-", dir=s.tmpdir) as tmp:
        path = Path(tmp) / "img.raw"
        progress.note(f"serve: writing a {s.image_size / MIB:.0f} MiB random image to {path}")
        yield make_image(path, s.image_size)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def host_info() -> dict[str, Any]:
    """What machine ran the benchmark: kernel, CPU model, cores, memory (bytes)."""
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"hostname": platform.node(), "kernel": platform.release(), "cpu": model,
            "cpus": os.cpu_count(), "mem_bytes": psutil.virtual_memory().total,
            "python": platform.python_version()}


def run(s: Settings) -> int:
    """Run the benchmark described by ``s``; write JSON, markdown and PNG; return exit status."""
    fio, nbdcopy = servers.find_tool("fio"), servers.find_tool("nbdcopy")
    tools: dict[str, str] = {}
    if any(w.kind == "fio" for w in s.workloads):
        if fio is None:
            print(f"serve: {servers.missing_message('fio')}", file=sys.stderr)
            return 2
        if subprocess.run([fio, "--enghelp=nbd"], capture_output=True, check=False).returncode:
            print("serve: this fio has no nbd engine (Debian's fio package has it)",
                  file=sys.stderr)
            return 2
        tools["fio"] = fio
    workloads = list(s.workloads)
    if nbdcopy is not None:  # the nbdcopy workload, and icbd-store's warm-up passes
        tools["nbdcopy"] = nbdcopy
    elif any(w.kind == "nbdcopy" for w in workloads):
        print(f"serve: skipping the nbdcopy workload: {servers.missing_message('nbdcopy')}")
        workloads = [w for w in workloads if w.kind != "nbdcopy"]
    binaries: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in s.servers:
        b = servers.server_binary(name, s.baseline_bin or servers.find_tool("icbd-cache"))
        if b is None:
            msg = servers.missing_message(servers.binary_name(name))
            if name == "icbd":
                print(f"serve: icbd is required: {msg}; "
                      "use --servers nbdkit,qemu-nbd to leave it out", file=sys.stderr)
                return 2
            print(f"serve: skipping {name}: {msg}")
            skipped[name] = msg
        else:
            binaries[name] = b
    names = [n for n in s.servers if n in binaries]
    if not names or not workloads:
        print("serve: nothing to run", file=sys.stderr)
        return 2
    if s.image is not None and not s.image.is_file():
        print(f"serve: no such image file: {s.image}", file=sys.stderr)
        return 2

    log_dir = s.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(workloads) * s.reps * len(names))
    results: list[RunResult] = []
    meta: dict[str, Any] = {}
    started = dt.datetime.now(dt.UTC)
    interrupted = False
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        with _image(s, progress) as image:
            size = image.stat().st_size
            meta.update(_meta(s, image, size, names, binaries, skipped, tools, workloads,
                              started))
            for w in workloads:
                for rep in range(s.reps):
                    for name in names:
                        progress.start(w.name, name, rep, s.reps)
                        r = run_one(w, name, binaries[name], rep, s, image, tools, log_dir)
                        results.append(r)
                        progress.finish(r, s.reps)
    except KeyboardInterrupt:
        progress.note("serve: interrupted; writing what was measured")
        if not results:
            return 130
        meta["interrupted"] = interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old)

    meta["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rows = report.summarize([asdict(r) for r in results], [w.name for w in workloads], names,
                            servers.BASELINE)
    doc = {"meta": meta, "rows": rows, "runs": [asdict(r) for r in results]}
    s.json_path.parent.mkdir(parents=True, exist_ok=True)
    s.json_path.write_text(json.dumps(doc, indent=2) + "\n")
    table = report.markdown(doc)
    (s.out / "serve.md").write_text(table)
    plotted = report.plot(doc, s.plot_path)
    print()
    print(table, end="")
    print(f"\nserve: wrote {s.json_path}" + (f", {s.plot_path}" if plotted else "")
          + f", {s.out / 'serve.md'}, logs in {log_dir}")
    failed = [r for r in results if r.error]
    if interrupted:
        return 130
    if failed:
        print(f"serve: {len(failed)} of {len(results)} runs failed (see the logs)",
              file=sys.stderr)
        return 1
    return 0


def _meta(s: Settings, image: Path, size: int, names: list[str], binaries: dict[str, str],
          skipped: dict[str, str], tools: dict[str, str], workloads: list[Workload],
          started: dt.datetime) -> dict[str, Any]:
    """Everything needed to read and repeat the results: settings, versions, command lines."""
    port = 10809
    uri = f"nbd://127.0.0.1:{port}/{servers.EXPORT}"
    srv: dict[str, Any] = {}
    writes = any(w.writes for w in workloads)
    for n in names:
        extra = s.extra_args(n)
        cmd = servers.server_command(n, binaries[n], image, port, extra)
        srv[n] = {"binary": binaries[n], "version": servers.tool_version(binaries[n]),
                  "cmd": shlex.join(cmd).replace(str(port), "PORT")}
        if writes and servers.kind(n) not in servers.READ_ONLY_SERVERS:
            wcmd = servers.server_command(n, binaries[n], image, port, extra,
                                          scratch=Path("SCRATCH"))
            srv[n]["write_cmd"] = shlex.join(wcmd).replace(str(port), "PORT")
    for n, why in skipped.items():
        srv[n] = {"skipped": why}
    clients: dict[str, Any] = {}
    for w in workloads:
        if w.kind == "fio":
            cmd = fio_command(tools["fio"], w, uri, s.runtime, Path("OUT.json"))
        else:
            cmd = nbdcopy_command(tools["nbdcopy"], uri)
        clients[w.name] = {"description": w.description,
                           "cmd": shlex.join(cmd).replace(str(port), "PORT")}
    return {
        "benchmark": "icbd-bench serve",
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv,
        "image": str(image) if s.image else "(generated, random data)",
        "image_bytes": size,
        "scratch_fs": (_fs_of(s.tmpdir or Path(tempfile.gettempdir())) if writes else None),
        "runtime_s": s.runtime,
        "reps": s.reps,
        "idle_sample_s": s.idle_sample,
        "wait_idle_pct": s.wait_idle,
        "wait_idle_max_s": s.wait_idle_max,
        "order": names,
        "baseline": servers.BASELINE,
        "servers": srv,
        "workloads": clients,
        "tools": {k: {"binary": v, "version": servers.tool_version(v)} for k, v in tools.items()},
        "host": host_info(),
    }


def _fs_of(path: Path) -> str:
    """The file system type holding ``path`` (where write runs put their scratch files)."""
    from icbdcache.layers.cowdir import fs_type

    return fs_type(str(path))


def main(args: argparse.Namespace) -> int:
    """Entry point of ``icbd-bench serve`` given parsed arguments; returns the exit status."""
    s = resolve(args)
    if s.reps < 1:
        print("serve: --reps must be at least 1", file=sys.stderr)
        return 2
    return run(s)
