"""``icbd-bench bootstorm --driver vm``: real QEMU workstations PXE-booting the test iMI.

Notes on the design:

- **Guests** (``bench/vm.py``): the Debian test iMI of ``scripts/build-test-imi``; each guest is
  one QEMU (one vCPU, ``--vm-mem`` MiB, its own MAC) whose e1000 iPXE ROM fetches ``boot.ipxe``,
  the kernel and the initrd over HTTP from ``icbd-cache pxe serve``; the initramfs attaches
  ``root=/dev/nbd0 nbdroot=HOST:PORT/lab@1`` from the server under test, read-only under a tmpfs
  overlay (``icbd.overlay=tmpfs``); at multi-user the image prints ``ICBD-BOOT-OK`` on the serial
  console and powers off. **Boot time** is the host's time from QEMU's start to that line.
  A guest without the marker within ``--vm-timeout`` counts as not booted (the run goes on).
- **Network**: the trace driver's (``bench/netlab.py``). QEMU and the PXE server run in the
  clients' place; the PXE server listens on its 127.0.0.1 (10.0.2.2 to the guests) and the
  boot configs name the server under test at the site's LAN address, which QEMU's user network
  reaches from the clients' namespace through the shaped LAN. On loopback the guests reach the
  server at 10.0.2.2.
- **Servers** are the trace driver's (:func:`bench.storm.server_argv`), started the same way,
  with the export named as the PXE config names it (``lab@1``; nbdkit serves any name). The
  upstream serves the test iMI's ``imi.ext4``. icbd-cache runs with ``--trace`` (one CSV line per
  request: the latency from a request's arrival to its reply being queued), which gives
  request counts and latency percentiles at the server; the other servers are not instrumented
  (n/a).
- **KVM** only where :func:`bench.vm.kvm_usable` says so, else TCG. Under TCG on a few cores
  the guests' boot times are bound by the emulated CPU; they compare servers only where the
  CPU is not saturated (sequential boots, one guest alone).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import netlab, servers, vm
from bench.replay import percentile
from bench.serve import Progress, host_info, warm_page_cache
from bench.storm import (
    MIB,
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

#: The iMI name the test image is imported under; the boot configs name ``lab@1``.
IMI = "lab"


@dataclass
class GuestResult:
    """One guest. Times in seconds, sizes in bytes.

    ``boot_s``: host time from QEMU's start to ``ICBD-BOOT-OK`` on its console (None: not
    booted); ``guest_uptime_s``: the guest's own uptime at the marker; ``qemu_cpu_s``: QEMU's
    user+system CPU (last sample while it ran); ``qemu_peak_rss``: its VmHWM (last sample);
    ``nbdroot``: what the guest booted, from the marker line; ``error``: why it did not boot.
    """

    name: str
    mac: str
    booted: bool = False
    boot_s: float | None = None
    guest_uptime_s: float | None = None
    nbdroot: str | None = None
    qemu_rc: int | None = None
    qemu_cpu_s: float | None = None
    qemu_peak_rss: int | None = None
    error: str | None = None


@dataclass
class VmRunRecord:
    """One storm of real guests against one server (one repetition). Times in seconds, sizes
    in bytes, latencies in milliseconds.

    ``server_*``: from icbd-cache's ``--trace`` (None for the other servers): requests of all
    kinds, reads and bytes read, NBD connections, latency percentiles; ``server_cpu_s``: the
    server's CPU during the storm; ``peak_rss``: its VmHWM at the end; ``upstream_reads`` /
    ``upstream_read_bytes``: reads the upstream served (its log filter); ``wan_down``: bytes
    the site received over the WAN veth (headers included; namespaces only); ``relay_down``:
    payload bytes through the WAN delay relay; ``qemu_cpu_s``: CPU of all the guests' QEMUs;
    ``host_cpu_pct``: machine-wide CPU busy % during the storm; ``icbd``: icbd-cache counter
    deltas."""

    scenario: str
    mode: str
    n_clients: int
    server: str
    rep: int = 0
    guests: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float | None = None
    server_cpu_s: float | None = None
    peak_rss: int | None = None
    server_requests: int | None = None
    server_reads: int | None = None
    server_read_bytes: int | None = None
    server_connections: int | None = None
    server_lat_p50_ms: float | None = None
    server_lat_p95_ms: float | None = None
    server_lat_p99_ms: float | None = None
    server_lat_max_ms: float | None = None
    upstream_reads: int | None = None
    upstream_read_bytes: int | None = None
    upstream_log: str | None = None
    wan_down: int | None = None
    relay_down: int | None = None
    qemu_cpu_s: float | None = None
    host_cpu_pct: float | None = None
    icbd: dict[str, int] | None = None
    server_version: str | None = None
    error: str | None = None


@dataclass
class VmContext:
    """Everything a run needs that does not change between runs."""

    s: Settings
    net: netlab.Network
    image: Path
    size: int
    boot_store: Path
    key: str
    binaries: dict[str, str]
    icbd: str
    work: Path
    log_dir: Path
    progress: VmProgress
    accel: list[str]
    accel_label: str

    @property
    def guest_host(self) -> str:
        """The server under test as the guests reach it."""
        return vm.HOST_FROM_GUEST if self.net.kind == "loopback" else self.net.site_host


def guest_timeout(s: Settings, sc: Scenario, accel: str) -> float:
    """Seconds from a guest's start to its marker before it counts as not booted."""
    if s.vm_timeout:
        return s.vm_timeout
    base = 120.0 if accel == "kvm" else 300.0
    if sc.mode == "sequential":
        return base
    return base * max(1, math.ceil(sc.clients / (os.cpu_count() or 1)))


def trace_stats(path: Path) -> dict[str, Any]:
    """Requests, reads, read bytes, connections and latency percentiles (ms) of an icbd-cache
    ``--trace`` CSV (``t_ms,conn,op,offset,count,lat_us``)."""
    lats: list[float] = []
    conns: set[str] = set()
    reads = read_bytes = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) != 6:
                continue
            conns.add(parts[1])
            lats.append(int(parts[5]) / 1000)
            if parts[2] == "Read":
                reads += 1
                read_bytes += int(parts[4])
    if not lats:
        return {}
    return {"server_requests": len(lats), "server_reads": reads,
            "server_read_bytes": read_bytes, "server_connections": len(conns),
            "server_lat_p50_ms": percentile(lats, 50), "server_lat_p95_ms": percentile(lats, 95),
            "server_lat_p99_ms": percentile(lats, 99), "server_lat_max_ms": max(lats)}


def wait_tcp(net: netlab.Network, role: str, host: str, port: int,
             proc: servers.RunningServer, timeout: float = 60.0) -> None:
    """Wait until ``host:port`` accepts TCP connections as seen from ``role``. Raises
    ServerError when ``proc`` exits first or after ``timeout`` seconds."""
    code = ("import socket,sys,time\n"
            "d=time.monotonic()+3\n"
            "while time.monotonic()<d:\n"
            " try:\n"
            f"  socket.create_connection(({host!r},{port}),timeout=0.5).close(); sys.exit(0)\n"
            " except OSError: time.sleep(0.1)\n"
            "sys.exit(1)\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise servers.ServerError(f"{proc.name} exited with {proc.proc.returncode}:\n"
                                      f"{proc.log_tail()}")
        if subprocess.run(net.argv(role, [sys.executable, "-c", code]), capture_output=True,
                          timeout=30, check=False).returncode == 0:
            return
    raise servers.ServerError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def import_boot_store(icbd: str, image: Path, store: Path) -> str:
    """Import ``image`` as iMI :data:`IMI` into ``store`` (kernel and initrd kept for PXE);
    return the version key (``lab@1``). Raises RuntimeError."""
    p = subprocess.run([icbd, "import", str(image), "--imi", IMI, "--store", str(store)],
                       capture_output=True, text=True, timeout=1800, check=False)
    m = re.search(r"imported (\S+):", p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"icbd-cache import failed ({p.returncode}):\n{p.stdout[-1500:]}"
                           f"\n{p.stderr[-1500:]}")
    return m.group(1)


def _sample(guests: Sequence[vm.Vm], results: Sequence[GuestResult]) -> None:
    """Record each running QEMU's CPU seconds and VmHWM (bytes)."""
    for g, r in zip(guests, results, strict=True):
        if g.proc.poll() is not None:
            continue
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(g.proc.pid).cpu_times()
            r.qemu_cpu_s = t.user + t.system
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{g.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    r.qemu_peak_rss = int(line.split()[1]) * 1024


def _settle(g: vm.Vm, r: GuestResult) -> None:
    """Fill ``r`` from the console of ``g``: the marker, or why there is none."""
    found = g.find(vm.MARKER_RX)
    if found is not None:
        t, m = found
        r.booted = True
        r.boot_s = round(t - g.t0, 3)
        with contextlib.suppress(ValueError):
            r.guest_uptime_s = float(m.group(1))
        r.nbdroot = m.group(2)
        r.error = None
    elif r.error is None:
        last = next((ln for _, ln in reversed(g.lines) if ln.strip()), "(no console output)")
        r.error = (f"QEMU exited ({g.proc.poll()}) without the marker" if g.finished()
                   else "no marker within the timeout") + f"; last line: {last[-200:]}"


def boot_guests(ctx: VmContext, sc: Scenario, bootfile: str, run_dir: Path, tag: str,
                update: Callable[[list[GuestResult], int], None]) -> list[GuestResult]:
    """Boot ``sc.clients`` guests (one after another, or all at once) from ``bootfile``; return
    one result per guest. Every QEMU is stopped by its PID before this returns."""
    timeout = guest_timeout(ctx.s, sc, ctx.accel_label)
    prefix = ctx.net.argv("clients", [])
    results: list[GuestResult] = []
    live: list[vm.Vm] = []

    def start(i: int) -> vm.Vm:
        name = f"{tag}-g{i + 1}"
        r = GuestResult(name, vm.guest_mac(i + 1))
        results.append(r)
        g = vm.boot_vm(name, bootfile, r.mac, ctx.log_dir / f"{name}.console",
                       mem_mib=ctx.s.vm_mem, accel=ctx.accel, prefix=prefix)
        live.append(g)
        return g

    def watch(batch: list[vm.Vm], rs: list[GuestResult]) -> None:
        """Until every guest of ``batch`` has its marker and exited (or its time is up)."""
        deadline = {id(g): g.t0 + timeout for g in batch}
        marked: dict[int, float] = {}
        while True:
            _sample(batch, rs)
            now = time.monotonic()
            pending = 0
            for g in batch:
                if g.finished():
                    continue
                if id(g) not in marked and g.find(vm.MARKER_RX) is not None:
                    marked[id(g)] = now  # the guest powers itself off: give it 60 s
                limit = marked[id(g)] + 60 if id(g) in marked else deadline[id(g)]
                if now > limit:
                    g.stop()
                    continue
                pending += 1
            for g, r in zip(batch, rs, strict=True):
                if g.finished() or id(g) in marked:
                    _settle(g, r)
            update(results, sc.clients)
            if not pending:
                break
            time.sleep(1.0)
        for g, r in zip(batch, rs, strict=True):
            g.stop()
            r.qemu_rc = g.proc.returncode
            _settle(g, r)

    try:
        if sc.mode == "sequential":
            for i in range(sc.clients):
                g = start(i)
                watch([g], [results[-1]])
        else:
            batch = [start(i) for i in range(sc.clients)]
            watch(batch, list(results))
    finally:
        for g in live:
            g.stop()
    return results


def run_vm_one(ctx: VmContext, sc: Scenario, name: str, rep: int, store: Path | None = None,
               tag: str | None = None) -> VmRunRecord:
    """Start the upstream (when needed), server ``name`` and a PXE server pointing at it; boot
    ``sc``'s guests; stop everything by PID. Failures of the run are recorded, not raised."""
    rec = VmRunRecord(sc.key, sc.mode, sc.clients, name, rep)
    tag = tag or f"{sc.key}-{name}-r{rep + 1}"
    run_dir = ctx.work / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    net = ctx.net
    if name in ("icbd-cold", "icbd-warm"):
        rec.server_version = icbd_code_version(ctx.binaries[name])
    trace = run_dir / "requests.csv"
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            up: Upstream | None = None
            if name in UPSTREAM_SERVERS:
                up = stack.enter_context(upstream(net, ctx.binaries["upstream"], ctx.image,
                                                  run_dir, ctx.log_dir, tag))
                rec.upstream_log = str(up.log)
            before = icbd_stats(ctx.icbd, store) if store else {}
            host, port = net.site_host, net.port("site")
            extra = list(ctx.s.icbd_args)
            if name.startswith("icbd"):
                extra += ["--trace", str(trace)]
            argv = server_argv(name, ctx.binaries[name], ctx.image, host, port,
                                         (up.host, up.port) if up else None, store, extra,
                                         export=ctx.key)
            env = {"TMPDIR": str(run_dir)} if name == "nbdkit-cache" else None
            srv = spawn(name, net.argv("site", argv), ctx.log_dir / f"{tag}.log", env, port)
            stack.callback(srv.stop)
            size = wait_ready(net, "clients", host, port, [srv], export=ctx.key)
            if size != ctx.size:
                raise servers.ServerError(f"{name} serves {size} bytes, expected {ctx.size}")
            http = net.port("clients")
            pxe_argv = [ctx.icbd, "pxe", "serve", "--store", str(ctx.boot_store),
                        "--listen", "127.0.0.1", "--http-port", str(http), "--tftp-port", "off",
                        "--nbd-host", ctx.guest_host, "--nbd-port", str(port),
                        "--menu-timeout", "0", "--append", vm.GUEST_APPEND]
            pxe = spawn("pxe", net.argv("clients", pxe_argv), ctx.log_dir / f"{tag}-pxe.log")
            stack.callback(pxe.stop)
            wait_tcp(net, "clients", "127.0.0.1", http, pxe)
            warm_page_cache(ctx.image)
            if store is not None:
                warm_store(store)
            cpu0 = srv.cpu_seconds()
            wan0 = net.wan_bytes() if up else None
            relay0 = up.relay_counts() if up else None
            times0 = psutil.cpu_times()
            t0 = time.monotonic()
            update = ctx.progress.runner(sc, name, rep, ctx.s.reps, t0)
            guests = boot_guests(ctx, sc, f"http://{vm.HOST_FROM_GUEST}:{http}/boot.ipxe",
                                 run_dir, tag, update)
            rec.wall_s = time.monotonic() - t0
            rec.host_cpu_pct, _ = cpu_busy(times0, psutil.cpu_times())
            rec.guests = [asdict(g) for g in guests]
            rec.qemu_cpu_s = sum(g.qemu_cpu_s or 0.0 for g in guests)
            rec.server_cpu_s = max(0.0, srv.cpu_seconds() - cpu0)
            rec.peak_rss = peak_rss(srv.pid)
            if not srv.alive():
                raise RuntimeError(f"{name} exited during the run:\n{srv.log_tail()}")
            if up is not None:
                wan1 = net.wan_bytes()
                if wan0 is not None and wan1 is not None:
                    rec.wan_down = wan1[0] - wan0[0]
            srv.stop()
            pxe.stop()
            for k, v in trace_stats(trace).items():
                setattr(rec, k, v)
            if up is not None:
                up.stop()
                relay1 = up.relay_counts()
                if relay0 is not None and relay1 is not None:
                    rec.relay_down = relay1.down - relay0.down
                reads = log_reads(up.log)
                rec.upstream_reads = len(reads)
                rec.upstream_read_bytes = sum(n for _, n in reads)
            if store:
                after = icbd_stats(ctx.icbd, store)
                rec.icbd = {k: v - before.get(k, 0) for k, v in after.items()
                            if v != before.get(k, 0)}
    except (servers.ServerError, RuntimeError, OSError, ValueError, KeyError,
            subprocess.TimeoutExpired) as e:
        rec.error = f"{type(e).__name__}: {e}"
    if rec.wall_s is None:
        rec.wall_s = time.monotonic() - t_start
    return rec


# --------------------------------------------------------------------------- progress


class VmProgress(Progress):
    """One live line per run (booted/failed/running guests and elapsed time): rewritten in
    place on a TTY, a log line every 15 s otherwise."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self._last = 0.0

    def runner(self, sc: Scenario, server: str, rep: int, reps: int, t0: float
               ) -> Callable[[list[GuestResult], int], None]:
        """The callback :func:`boot_guests` calls about once a second."""
        head = f"[{self.done + 1}/{self.total}] {sc.label} {server}" + (
            f" rep {rep + 1}/{reps}" if reps > 1 else "")
        if not self.tty:
            self._emit(f"{head}: started", True)
        self._last = time.monotonic()
        shown: set[str] = set()

        def update(results: list[GuestResult], n: int) -> None:
            booted = [r for r in results if r.booted]
            failed = sum(1 for r in results if r.error and not r.booted)
            times = sorted(r.boot_s for r in booted if r.boot_s is not None)
            text = (f"{head}: {len(booted)}/{n} booted, {failed} failed, "
                    f"{len(results) - len(booted) - failed} booting, "
                    f"{time.monotonic() - t0:.0f} s"
                    + (f" (boot median {statistics.median(times):.1f} s)" if times else ""))
            new = {r.name for r in results if r.booted or r.error} - shown
            if self.tty:
                self._emit(text, False)
            elif new or time.monotonic() - self._last >= 15:
                self._last = time.monotonic()
                self._emit(text, True)
            shown.update(new)
        return update

    def finished(self, rec: VmRunRecord) -> None:
        """Report a finished run."""
        self.done += 1
        head = f"[{self.done}/{self.total}] {Scenario(rec.mode, rec.n_clients).label} " \
               f"{rec.server}" + (f" rep {rec.rep + 1}" if rec.rep else "")
        if rec.error:
            lines = [ln.strip() for ln in rec.error.splitlines() if ln.strip()] or ["error"]
            self._emit(f"{head}: FAILED: {lines[0][:300]}", True)
            return
        times = [g["boot_s"] for g in rec.guests if g["booted"]]
        parts = [f"{len(times)}/{rec.n_clients} booted"]
        if times:
            parts.append(f"boot median {statistics.median(times):.1f} s max {max(times):.1f} s")
        if rec.server_lat_p50_ms is not None:
            parts.append(f"server lat p50 {rec.server_lat_p50_ms:.2f} ms "
                         f"p95 {rec.server_lat_p95_ms or 0:.1f} ms")
        if rec.upstream_read_bytes is not None:
            parts.append(f"upstream {rec.upstream_read_bytes / MIB:.1f} MiB")
        parts.append(f"server cpu {rec.server_cpu_s or 0:.1f} s")
        self._emit(f"{head}: " + ", ".join(parts), True)


# --------------------------------------------------------------------------- summary

#: Server-side figures summarized per row (median over repetitions).
_RUN_KEYS: tuple[str, ...] = (
    "server_requests", "server_reads", "server_read_bytes", "server_connections",
    "server_lat_p50_ms", "server_lat_p95_ms", "server_lat_p99_ms", "server_lat_max_ms",
    "upstream_reads", "upstream_read_bytes", "wan_down", "relay_down", "server_cpu_s",
    "peak_rss", "qemu_cpu_s", "host_cpu_pct", "wall_s")


def _median(values: Sequence[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, server) over its repetitions. Boot times (s): per repetition the
    median, p95 and max over the guests that booted; the row has the median over repetitions
    of each, and ``boot_s_median_spread`` = [lowest, highest] per-repetition median.
    ``booted``/``guests``: summed over repetitions. ``vs_alone``: median boot time / the same
    server's with one guest alone. Server-side figures: medians over repetitions."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["server"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for (scenario, server), rs in groups.items():
        first = rs[0]
        row: dict[str, Any] = {"scenario": scenario, "mode": first["mode"],
                               "n_clients": first["n_clients"], "server": server,
                               "reps": len(rs), "failed_runs": sum(1 for r in rs if r["error"]),
                               "error": next((r["error"] for r in rs if r["error"]), None)}
        per_rep: dict[str, list[float]] = {"median": [], "p95": [], "max": []}
        booted = guests = 0
        for r in rs:
            gs = r["guests"]
            guests += r["n_clients"]
            times = [float(g["boot_s"]) for g in gs if g["booted"]]
            booted += len(times)
            if times:
                per_rep["median"].append(statistics.median(times))
                per_rep["p95"].append(percentile(times, 95))
                per_rep["max"].append(max(times))
        row["booted"], row["guests"] = booted, guests
        for k, vals in per_rep.items():
            row[f"boot_s_{k}"] = statistics.median(vals) if vals else None
        meds = per_rep["median"]
        row["boot_s_median_spread"] = [min(meds), max(meds)] if meds else None
        ok = [r for r in rs if not r["error"]]
        for k in _RUN_KEYS:
            row[k] = _median([r.get(k) for r in ok])
        uptimes = [float(g["guest_uptime_s"]) for r in rs for g in r["guests"]
                   if g["booted"] and g.get("guest_uptime_s") is not None]
        row["guest_uptime_s_median"] = statistics.median(uptimes) if uptimes else None
        rows.append(row)
    alone = {r["server"]: r["boot_s_median"] for r in rows if r["scenario"] == "alone"}
    for row in rows:
        a, m = alone.get(row["server"]), row["boot_s_median"]
        row["vs_alone"] = m / a if m is not None and a else None
    return rows


def _n(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MIB:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """The vm driver's results as a markdown report."""
    meta = doc["meta"]
    rows: list[dict[str, Any]] = doc["rows"]
    host = meta["host"]
    reps = max((r["reps"] for r in rows), default=1)
    lines = ["# icbd-bench bootstorm --driver vm", "",
             f"Guests: QEMU under **{meta['accel']}** ({meta['accel_why']}), one vCPU and "
             f"{meta['vm_mem_mib']} MiB each, PXE (iPXE over HTTP from `icbd-cache pxe serve`) "
             f"into the test iMI `{meta['imi']['key']}` ({meta['imi']['bytes'] / MIB:.0f} MiB "
             f"ext4, Debian {meta['imi'].get('suite', '?')}, kernel "
             f"{meta['imi'].get('kernel_version', '?')}), root over NBD read-only under a tmpfs "
             "overlay. Boot time: host seconds from QEMU's start to `ICBD-BOOT-OK` on the "
             "serial console (multi-user reached).",
             f"Network: {meta['network']}.",
             f"Host: {host.get('cpus')} CPUs ({host.get('cpu', '?')}), "
             f"{(host.get('mem_bytes') or 0) / 2**30:.0f} GiB, kernel {host.get('kernel', '?')}."
             + (" **Under TCG the guests' boot times are bound by the emulated CPU: with more "
                "guests than cores they measure the emulator; they compare servers only where "
                "the CPU is not saturated (one guest alone, sequential boots).**"
                if meta["accel"] == "tcg" else ""),
             "Servers: " + "; ".join(f"{n}: {v['version']}" for n, v in meta["servers"].items()
                                     if "version" in v) + "."]
    if meta.get("interrupted"):
        lines.append("**Interrupted**: partial results.")
    spread_head = f" (min-max of {reps} reps)" if reps > 1 else ""
    lines += ["", f"| scenario | server | booted | boot s median{spread_head} | p95 | max "
              "| vs alone | server requests | read MiB | server lat ms p50 | p95 | p99 | max "
              "| upstream MiB | WAN MiB | server CPU s | peak RSS MiB | QEMU CPU s "
              "| machine busy % |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        label = Scenario(r["mode"], r["n_clients"]).label
        med = _n(r["boot_s_median"], ".1f")
        sp = r.get("boot_s_median_spread")
        if reps > 1 and sp:
            med += f" ({sp[0]:.1f}-{sp[1]:.1f})"
        wan = r["wan_down"] if r["wan_down"] is not None else r["relay_down"]
        req = r["server_requests"]
        lines.append(
            f"| {label} | {r['server']} | {r['booted']}/{r['guests']} | {med} "
            f"| {_n(r['boot_s_p95'], '.1f')} | {_n(r['boot_s_max'], '.1f')} "
            f"| {_n(r['vs_alone'], '.2f')}{'x' if r['vs_alone'] is not None else ''} "
            f"| {'n/a' if req is None else f'{req:.0f}'} | {_mib(r['server_read_bytes'])} "
            f"| {_n(r['server_lat_p50_ms'], '.2f')} | {_n(r['server_lat_p95_ms'], '.1f')} "
            f"| {_n(r['server_lat_p99_ms'], '.1f')} | {_n(r['server_lat_max_ms'], '.0f')} "
            f"| {_mib(r['upstream_read_bytes'])} | {_mib(wan)} | {_n(r['server_cpu_s'], '.1f')} "
            f"| {_mib(r['peak_rss'])} | {_n(r['qemu_cpu_s'], '.0f')} "
            f"| {_n(r['host_cpu_pct'], '.0f')} |"
            + (f" FAILED: {r['error'].splitlines()[0][:100]}" if r["error"] else ""))
    lines += ["", "booted: guests that printed the marker within the timeout / guests started "
              "(over all repetitions). Boot s: median, p95 and max over the guests of a run "
              "(median over repetitions). vs alone: median boot time / the same server's with "
              "one guest alone. server requests, read MiB, lat: NBD requests of all the "
              "guests as the server saw them, latency from a request's arrival to its reply "
              "(icbd-cache's --trace; n/a: server not instrumented). upstream MiB: read from "
              "the upstream over the WAN (its log filter); WAN MiB: received by the site over "
              "the WAN veth, headers included. server CPU: user+system during the storm; "
              "peak RSS: VmHWM. QEMU CPU: all guests' QEMU processes (user+system). machine "
              "busy: CPU busy % of the whole machine during the storm (other work on a shared "
              "machine included).", ""]
    for r in rows:
        if r["booted"] < r["guests"]:
            lines.append(f"- {Scenario(r['mode'], r['n_clients']).label} {r['server']}: "
                         f"{r['guests'] - r['booted']} guests did not boot (see the logs)")
    lines.append("")
    lines += per_guest_tables(doc)
    return "\n".join(lines) + "\n"


def per_guest_tables(doc: dict[str, Any]) -> list[str]:
    """Boot time per guest, one table per scenario, servers as columns (first repetition)."""
    out: list[str] = []
    runs = [r for r in doc["runs"] if r["rep"] == 0 and r["guests"]]
    for key in dict.fromkeys(r["scenario"] for r in runs):
        rs = [r for r in runs if r["scenario"] == key]
        if rs[0]["n_clients"] < 2:
            continue
        out += [f"### {Scenario(rs[0]['mode'], rs[0]['n_clients']).label}: boot time per "
                "guest (s; - = did not boot)", "",
                "| guest | " + " | ".join(r["server"] for r in rs) + " |",
                "|--:|" + "--:|" * len(rs)]
        for i in range(rs[0]["n_clients"]):
            cells = []
            for r in rs:
                g = r["guests"][i] if i < len(r["guests"]) else None
                cells.append("-" if g is None or not g["booted"] else f"{g['boot_s']:.1f}")
            out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot_guests(doc: dict[str, Any], path: Path) -> bool:
    """Boot time per guest as bars (first repetition), one panel per scenario, servers side by
    side; a guest that did not boot is a red x at the axis. Returns False with nothing to
    draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in doc["runs"] if r["rep"] == 0 and r["guests"]]
    keys = list(dict.fromkeys(r["scenario"] for r in runs))
    if not keys:
        return False
    fig = Figure(figsize=(11, 3.2 * len(keys) + 1), layout="constrained")
    FigureCanvasAgg(fig)
    names = list(dict.fromkeys(r["server"] for r in runs))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for row, key in enumerate(keys):
        rs = [r for r in runs if r["scenario"] == key]
        ax = fig.add_subplot(len(keys), 1, row + 1)
        for gi, r in enumerate(rs):
            n = len(r["guests"])
            width = 0.8 / max(1, n)
            for i, g in enumerate(r["guests"]):
                x = gi - 0.4 + width * (i + 0.5)
                if g["booted"]:
                    ax.bar(x, g["boot_s"], width * 0.85, color=colors[r["server"]])
                else:
                    ax.plot(x, 0, "x", color="red")
            done = sum(1 for g in r["guests"] if g["booted"])
            ax.annotate(f"{done}/{n} booted", (gi, 0), xytext=(0, -22),
                        textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(range(len(rs)), [r["server"] for r in rs], fontsize=8)
        ax.set_ylabel("boot time (s)", fontsize=8)
        ax.set_title(f"{Scenario(rs[0]['mode'], rs[0]['n_clients']).label}: QEMU start to "
                     "ICBD-BOOT-OK, one bar per guest", fontsize=9)
    meta = doc["meta"]
    fig.suptitle(f"icbd-bench bootstorm --driver vm: {meta['accel']} guests, "
                 f"{meta['host'].get('cpus')} CPUs, {meta['network_short']}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# --------------------------------------------------------------------------- the benchmark


def _imi_meta(imi_dir: Path, key: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"dir": str(imi_dir), "key": key,
                            "bytes": (imi_dir / "imi.ext4").stat().st_size}
    with contextlib.suppress(OSError, ValueError):
        m = json.loads((imi_dir / "manifest.json").read_text())
        meta.update({k: m[k] for k in ("suite", "kernel_version", "key") if k in m})
        meta["key"] = key
    return meta


def run(s: Settings) -> int:
    """Run the vm driver as ``s`` says; write bootstorm.json, bootstorm.md and
    bootstorm-guests.png under ``s.out``; return the exit status (0: every guest of every run
    booted, 1: some did not, 2: cannot run here, 130: interrupted)."""
    if s.accel == "kvm":
        ok, why = vm.kvm_usable()
        if not ok:
            print(f"bootstorm: --accel kvm: KVM is not usable here: {why}", file=sys.stderr)
            return 2
        accel, label = vm.accel_args(True)
    elif s.accel == "tcg":
        (accel, label), why = vm.accel_args(False), "asked for with --accel tcg"
    else:
        ok, why = vm.kvm_usable()
        accel, label = vm.accel_args(ok)
        why = why if ok else f"KVM not usable: {why}"
    try:
        imi_dir = vm.build_test_imi()
    except vm.Unavailable as e:
        print(f"bootstorm: --driver vm cannot run here: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bootstorm: {e}", file=sys.stderr)
        return 2
    binaries, missing = find_binaries(s.servers)
    for name, why_missing in missing.items():
        print(f"bootstorm: skipping {name}: {why_missing}")
    names = [n for n in s.servers if n in binaries]
    icbd = servers.find_tool("icbd-cache")
    if not names or icbd is None:
        print("bootstorm: no server to run" if icbd else "bootstorm: icbd-cache not found "
              "(the PXE server)", file=sys.stderr)
        return 2
    image = (s.image or imi_dir / "imi.ext4").resolve()
    size = image.stat().st_size
    log_dir = s.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    progress = VmProgress(len(s.scenarios) * len(names) * s.reps)
    records: list[VmRunRecord] = []
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
            progress.note(f"bootstorm: network namespaces unavailable ({fallback}): running "
                          "on loopback with no rate shaping")
        progress.note(f"bootstorm: {net.describe()}")
        progress.note(f"bootstorm: guests under {label} ({why}), {s.vm_mem} MiB each; test "
                      f"iMI {image}")
        with tempfile.TemporaryDirectory(prefix="icbd-bootstorm-vm-", dir=s.tmpdir) as tmp:
            work = Path(tmp)
            boot_store = work / "boot-store"
            key = import_boot_store(icbd, image, boot_store)
            ctx = VmContext(s, net, image, size, boot_store, key, binaries, icbd, work,
                            log_dir, progress, accel, label)
            meta.update(_meta(s, ctx, names, missing, fallback, imi_dir, why))
            for sc in s.scenarios:
                for rep in range(s.reps):
                    store = work / f"store-{sc.key}-r{rep + 1}"
                    for name in names:
                        if name == "icbd-warm" and not (store / "data.mdb").exists():
                            progress.note(f"bootstorm: priming the icbd-warm store for "
                                          f"{sc.label} with one unmeasured guest")
                            prime = run_vm_one(ctx, Scenario("simultaneous", 1), "icbd-cold",
                                               rep, store, f"{sc.key}-r{rep + 1}-prime")
                            if prime.error:
                                progress.note(f"bootstorm: priming failed: {prime.error}")
                        rec = run_vm_one(ctx, sc, name, rep,
                                         store if name.startswith("icbd") else None)
                        records.append(rec)
                        progress.finished(rec)
    except KeyboardInterrupt:
        progress.note("bootstorm: interrupted; writing what was measured")
        if not records:
            return 130
        interrupted = True
    except RuntimeError as e:
        print(f"bootstorm: {e}", file=sys.stderr)
        if not records:
            return 2
    finally:
        signal.signal(signal.SIGTERM, old)
        if net is not None:
            net.close()
    if not meta:
        return 2
    meta["interrupted"] = interrupted
    meta["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs = [asdict(r) for r in records]
    rows = summarize(runs)
    doc = {"meta": meta, "rows": rows, "runs": runs}
    (s.out / "bootstorm.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = markdown(doc)
    (s.out / "bootstorm.md").write_text(table)
    written = [s.out / "bootstorm.json", s.out / "bootstorm.md"]
    if plot_guests(doc, s.out / "bootstorm-guests.png"):
        written.append(s.out / "bootstorm-guests.png")
    print()
    print(table, end="")
    print(f"\nbootstorm: wrote {', '.join(map(str, written))}, logs in {log_dir}")
    if interrupted:
        return 130
    bad = [r for r in rows if r["error"] or r["booted"] != r["guests"]]
    if bad:
        print(f"bootstorm: {len(bad)} of {len(rows)} rows had failures (see the logs)",
              file=sys.stderr)
        return 1
    return 0


def _meta(s: Settings, ctx: VmContext, names: list[str], missing: dict[str, str],
          fallback: str | None, imi_dir: Path, accel_why: str) -> dict[str, Any]:
    """Settings, versions and command lines of a vm-driver run."""
    net = ctx.net
    srv: dict[str, Any] = {}
    for n in names:
        b = ctx.binaries[n]
        up = (net.upstream_host, 0) if n in UPSTREAM_SERVERS else None
        argv = server_argv(n, b, ctx.image, net.site_host, 0, up, Path("STORE"),
                                     s.icbd_args, export=ctx.key)
        srv[n] = {"binary": b, "version": servers.tool_version(b),
                  "cmd": shlex.join(argv).replace(":0", ":PORT").replace("port=0", "port=PORT")}
    for n, why in missing.items():
        srv[n] = {"skipped": why}
    wan_rate, lan_rate = net.rates
    short = (f"WAN {netlab.fmt_rate(wan_rate)} + {net.shaping.wan_delay * 1000:g} ms, LAN "
             f"{netlab.fmt_rate(lan_rate)} ({net.kind})")
    return {
        "benchmark": "icbd-bench bootstorm",
        "driver": "vm",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "accel": ctx.accel_label, "accel_why": accel_why, "qemu_accel_args": ctx.accel,
        "vm_mem_mib": s.vm_mem,
        "imi": _imi_meta(imi_dir, ctx.key),
        "image": str(ctx.image), "image_bytes": ctx.size,
        "reps": s.reps,
        "scenarios": [asdict(sc) | {"key": sc.key} for sc in s.scenarios],
        "guest_timeout_s": {sc.key: guest_timeout(s, sc, ctx.accel_label)
                            for sc in s.scenarios},
        "network": net.describe(), "network_short": short, "network_fallback": fallback,
        "net_kind": net.kind, "wan_rate_bps": wan_rate, "wan_delay_s": net.shaping.wan_delay,
        "lan_rate_bps": lan_rate,
        "guest_nbd_host": ctx.guest_host,
        "servers": srv,
        "host": host_info(),
    }


# --------------------------------------------------------------------------- merging runs


def merge(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results document from several vm-driver runs of the same machine (e.g. the 15
    simultaneous and the 5 sequential scenario, run one after the other): their runs
    concatenated, rows summarized again (so a storm's ``vs alone`` uses the ``1 alone`` row
    of another run), the first run's meta with every run's command line and start time."""
    if not docs:
        raise ValueError("nothing to merge")
    meta = dict(docs[0]["meta"])
    meta["merged"] = [{"argv": d["meta"].get("argv"), "started": d["meta"].get("started"),
                       "finished": d["meta"].get("finished")} for d in docs]
    servers_meta: dict[str, Any] = {}
    for d in docs:
        servers_meta.update(d["meta"].get("servers", {}))
    meta["servers"] = servers_meta
    meta["interrupted"] = any(d["meta"].get("interrupted") for d in docs)
    runs = [r for d in docs for r in d["runs"]]
    order = {"alone": 0}
    runs.sort(key=lambda r: (order.get(r["scenario"], 1), r["mode"] != "sequential",
                             r["n_clients"]))
    return {"meta": meta, "rows": summarize(runs), "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.vmdriver merge --out DIR RUN.json...``: write the merged
    bootstorm.json, bootstorm.md and bootstorm-guests.png of several vm-driver runs."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.vmdriver",
                                description="Merge the results of vm-driver runs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge bootstorm.json files of vm-driver runs")
    m.add_argument("--out", type=Path, required=True, help="directory to write")
    m.add_argument("inputs", type=Path, nargs="+", help="bootstorm.json files")
    args = p.parse_args(argv)
    doc = merge([json.loads(f.read_text()) for f in args.inputs])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bootstorm.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "bootstorm.md").write_text(markdown(doc))
    plot_guests(doc, args.out / "bootstorm-guests.png")
    print(f"wrote {args.out}/bootstorm.json, bootstorm.md, bootstorm-guests.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
