"""Server CPU per 4 KiB READ: the warm store's hit path against the raw-file export.

Run it as ``python -m bench.hitpath`` from a checkout whose venv has icbd-cache installed.

Notes on the design
-------------------
* One generated image (random bytes, so no chunk is all zeros and none deduplicates) served two
  ways by the same build: ``icbd-store`` (``serve --store`` on a store holding the image whole,
  read twice by nbdcopy before the measurement so the hot set is as a boot storm leaves it) and
  ``icbd`` (``serve --export img=FILE``). Servers are started through :mod:`bench.servers`,
  fresh for every run, stopped by PID.
* The figure is CPU, not wall time, so a loaded machine changes it little: the server's user +
  system CPU seconds (from /proc, clock ticks) before and after a time-based fio run (nbd
  engine, 4 KiB random reads), divided by the requests fio completed. Each thread's share is
  read from ``/proc/PID/task`` too, so the event loop's CPU is told apart from the store
  writer's thread.
* Runs alternate (store, file, store, file, ...) within each repetition, and the median and
  spread over repetitions are printed, with the load average before each run.
* ``--baseline-bin PATH`` adds ``icbd-store-base``: the same store served by another build
  (e.g. main's ``.venv/bin/icbd-cache``), run right after ``icbd-store``, for a before/after
  in one run.
* ``--py-spy DIR`` records a py-spy profile (``--format raw``, collapsed stacks) of the server
  during the last repetition's runs, when py-spy is installed (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import servers

MIB = 1 << 20
KINDS = ("icbd-store", "icbd")


@dataclass
class Run:
    """One measured run: ``cpu_us_per_req`` server CPU µs per request (all threads),
    ``loop_us_per_req`` the main thread's, ``iops`` fio's, ``load1`` before the run."""

    server: str
    iodepth: int
    rep: int
    requests: int
    iops: float
    cpu_us_per_req: float
    loop_us_per_req: float
    threads: dict[str, float]
    load1: float


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, keyed ``NAME/TID``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    base = Path(f"/proc/{pid}/task")
    for task in base.iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def make_image(path: Path, size: int) -> None:
    """A file of ``size`` random bytes at ``path`` (kept when it exists with that size)."""
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n


def fio_run(uri: str, iodepth: int, runtime: float, out: Path) -> tuple[int, float]:
    """(requests, IOPS) of one time-based 4 KiB random-read fio run against ``uri``."""
    cmd = ["fio", "--name=hit", "--ioengine=nbd", f"--uri={uri}", "--readonly",
           "--rw=randread", "--bs=4k", f"--iodepth={iodepth}", "--time_based",
           f"--runtime={round(runtime * 1000)}ms", "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=runtime + 60)
    rd = json.loads(out.read_text())["jobs"][0]["read"]
    return int(rd["total_ios"]), float(rd["iops"])


def one_run(kind: str, binary: str, image: Path, work: Path, iodepth: int, rep: int,
            runtime: float, extra: list[str], spy: Path | None) -> Run:
    """Start ``kind`` (``-base``: the baseline build), warm it, measure one fio run, stop it."""
    with servers.running(kind, binary, image, work, extra=extra) as srv:
        if servers.kind(kind) == "icbd-store":
            for _ in range(2):
                subprocess.run(["nbdcopy", "--request-size=262144", srv.uri, "null:"],
                               check=True, capture_output=True, timeout=300)
        spy_proc = None
        if spy is not None:
            spy.mkdir(parents=True, exist_ok=True)
            spy_proc = subprocess.Popen(
                ["py-spy", "record", "--pid", str(srv.pid), "--format", "raw", "--rate", "250",
                 "--duration", str(int(runtime)), "--output",
                 str(spy / f"{kind}-qd{iodepth}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        load1 = os.getloadavg()[0]
        t0 = thread_cpu(srv.pid)
        reqs, iops = fio_run(srv.uri, iodepth, runtime, work / "fio.json")
        t1 = thread_cpu(srv.pid)
        if spy_proc is not None:
            spy_proc.wait(timeout=runtime + 30)
    threads = {k: t1[k] - t0.get(k, 0.0) for k in t1}
    total = sum(threads.values())
    main = threads.get(next((k for k in threads if k.endswith(f"/{srv.pid}")), ""), 0.0)
    return Run(kind, iodepth, rep, reqs, iops, total * 1e6 / max(reqs, 1),
               main * 1e6 / max(reqs, 1), {k: round(v, 3) for k, v in threads.items() if v},
               load1)


def summary(runs: list[Run]) -> str:
    """Median and range of CPU µs per request by (server, iodepth)."""
    lines = []
    keys = sorted({(r.iodepth, r.server) for r in runs})
    for qd, kind in keys:
        rs = [r for r in runs if r.server == kind and r.iodepth == qd]
        cpu = [r.cpu_us_per_req for r in rs]
        loop = [r.loop_us_per_req for r in rs]
        iops = [r.iops for r in rs]
        load = statistics.median(r.load1 for r in rs)
        lines.append(
            f"qd{qd:<3} {kind:<11} cpu/req {statistics.median(cpu):6.1f} us "
            f"[{min(cpu):.1f}-{max(cpu):.1f}]  loop thread {statistics.median(loop):6.1f} us  "
            f"iops {statistics.median(iops):8.0f}  load1 {load:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hitpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--iodepth", default="1,32", help="comma-separated iodepths")
    p.add_argument("--servers", default=",".join(KINDS))
    p.add_argument("--icbd-args", default="", help="extra 'serve' arguments (both servers)")
    p.add_argument("--workdir", type=Path, help="image, store and logs (default: a temp dir)")
    p.add_argument("--baseline-bin", help="another icbd-cache build: adds icbd-store-base")
    p.add_argument("--py-spy", type=Path, metavar="DIR", help="py-spy profiles of the last rep")
    p.add_argument("--json", type=Path, help="write every run as JSON here")
    a = p.parse_args(argv)
    binary = str(Path(sys.executable).with_name("icbd-cache"))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="hitpath-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / f"img-{a.size}M.raw"
    make_image(image, a.size * MIB)
    servers.warm_store(binary, image)
    extra = a.icbd_args.split()
    runs: list[Run] = []
    kinds = a.servers.split(",")
    if a.baseline_bin:
        kinds.insert(kinds.index("icbd-store") + 1 if "icbd-store" in kinds else 0,
                     "icbd-store-base")
    spy = a.py_spy if a.py_spy and shutil.which("py-spy") else None
    for qd in (int(x) for x in a.iodepth.split(",")):
        for rep in range(a.reps):
            for kind in kinds:
                b = a.baseline_bin if kind.endswith("-base") else binary
                r = one_run(kind, b, image, work, qd, rep, a.runtime, extra,
                            spy if rep == a.reps - 1 else None)
                runs.append(r)
                print(f"rep {rep} qd{qd} {kind:<11} {r.cpu_us_per_req:6.1f} us/req "
                      f"(loop {r.loop_us_per_req:.1f}) iops {r.iops:.0f} load1 {r.load1:.2f} "
                      f"threads {r.threads}", flush=True)
    print(summary(runs))
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
