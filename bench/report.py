"""Summaries of benchmark runs: medians, paired ratios, a markdown table and a PNG plot.

Runs are plain dicts (the JSON form), so that a saved ``serve.json`` can be summarized again
without rerunning anything. Medians are taken over the successful repetitions; a ratio to the
baseline is the median over repetitions of ``value(server, rep) / value(baseline, rep)``, taken
only where both runs of a pair succeeded.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Metrics summarized per workload and server (all medians over repetitions).
#: Units: iops requests/s, mib_s MiB/s, p50_us/p99_us (clat) and lat_p50_us/lat_p99_us (total)
#: µs, cpu_us_per_req µs, cpu_s and duration_s seconds, idle_cpu_pct percent, load1 runnable
#: tasks, client_cpu_pct the client's CPU time over its wall time (percent of one core).
METRICS: tuple[str, ...] = ("iops", "mib_s", "p50_us", "p99_us", "lat_p50_us", "lat_p99_us",
                            "cpu_us_per_req", "cpu_s", "duration_s", "idle_cpu_pct", "load1",
                            "client_cpu_pct")

#: Suffix of a server run again with another build or other arguments (bench.servers).
TWIN_SUFFIX = "-base"

#: Metrics that also get a paired ratio to the baseline.
RATIO_METRICS: tuple[str, ...] = ("iops", "mib_s", "p50_us", "p99_us", "lat_p50_us",
                                  "lat_p99_us", "cpu_us_per_req")


def _median(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: Sequence[dict[str, Any]], workloads: Sequence[str], servers: Sequence[str],
              baseline: str) -> list[dict[str, Any]]:
    """One row per (workload, server): medians of :data:`METRICS` and paired ratios.

    Each row has ``workload``, ``server``, ``ok`` and ``failed`` (run counts), every metric of
    :data:`METRICS` (None without a successful run), and ``ratio``: metric → median of
    per-repetition ratios to ``baseline`` (None where no pair exists).
    """
    by_key: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    failed: dict[tuple[str, str], int] = {}
    for r in runs:
        key = (r["workload"], r["server"])
        if r.get("error"):
            failed[key] = failed.get(key, 0) + 1
        else:
            by_key.setdefault(key, {})[int(r["rep"])] = r
    rows: list[dict[str, Any]] = []
    for w in workloads:
        base = by_key.get((w, baseline), {})
        for s in servers:
            ok = by_key.get((w, s), {})
            row: dict[str, Any] = {"workload": w, "server": s, "ok": len(ok),
                                   "failed": failed.get((w, s), 0)}
            for m in METRICS:
                row[m] = _median(r.get(m) for r in ok.values())
            ratio: dict[str, float | None] = {}
            for m in RATIO_METRICS:
                pairs = []
                for rep, r in ok.items():
                    b = base.get(rep)
                    if b is None or r.get(m) is None or not b.get(m):
                        continue
                    pairs.append(float(r[m]) / float(b[m]))
                ratio[m] = _median(pairs)
            row["ratio"] = ratio
            rows.append(row)
    return rows


def twins(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each server against its ``-base`` twin, per workload: ``iops`` ratios of the paired
    repetitions (server / twin), their ``median``, ``low`` and ``high``. The spread of the
    ratios is the run's noise for that pair."""
    ok = {(r["workload"], r["server"], int(r["rep"])): r for r in runs
          if not r.get("error") and r.get("iops")}
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for (w, s, _rep) in ok:
        if s.endswith(TWIN_SUFFIX) or (w, s) in seen:
            continue
        seen.add((w, s))
        ratios = [float(r["iops"]) / float(ok[(w, s + TWIN_SUFFIX, rep)]["iops"])
                  for (w2, s2, rep), r in sorted(ok.items())
                  if w2 == w and s2 == s and (w, s + TWIN_SUFFIX, rep) in ok]
        if ratios:
            out.append({"workload": w, "server": s, "twin": s + TWIN_SUFFIX, "iops": ratios,
                        "median": statistics.median(ratios), "low": min(ratios),
                        "high": max(ratios)})
    return out


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    """The results document (``meta``, ``rows``) as a markdown report: a header and one table."""
    meta = doc.get("meta", {})
    base = meta.get("baseline", "nbdkit")
    rows: list[dict[str, Any]] = doc["rows"]
    lines = ["# icbd-bench serve", ""]
    if meta:
        host = meta.get("host", {})
        lines.append(
            f"Image {meta.get('image_bytes', 0) / (1 << 20):.0f} MiB (page-cached), "
            f"fio runs of {meta.get('runtime_s')} s, {meta.get('reps')} paired reps, "
            f"order {' '.join(meta.get('order', []))}; host: {host.get('cpus')} CPUs "
            f"({host.get('cpu', '?')}), kernel {host.get('kernel', '?')}.")
        versions = [v["version"] if "version" in v else f"{n} skipped: {v.get('skipped')}"
                    for n, v in meta.get("servers", {}).items()]
        if versions:
            lines.append("Servers: " + "; ".join(versions) + ".")
        if meta.get("interrupted"):
            lines.append("**Interrupted**: partial results.")
        lines.append("")
    lines += [
        f"| workload | server | IOPS | MiB/s | clat p50 µs | clat p99 µs | lat p50 µs "
        f"| lat p99 µs | CPU µs/req | IOPS vs {base} | CPU/req vs {base} | idle CPU % "
        f"| client CPU % | runs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        ratio = r.get("ratio", {})
        runs = f"{r['ok']}/{r['ok'] + r['failed']}"
        lines.append(
            f"| {r['workload']} | {r['server']} | {_num(r['iops'], ',.0f')} "
            f"| {_num(r['mib_s'], ',.1f')} | {_num(r['p50_us'], ',.0f')} "
            f"| {_num(r['p99_us'], ',.0f')} | {_num(r['lat_p50_us'], ',.0f')} "
            f"| {_num(r['lat_p99_us'], ',.0f')} | {_num(r['cpu_us_per_req'], ',.1f')} "
            f"| {_ratio(ratio.get('iops'))} | {_ratio(ratio.get('cpu_us_per_req'))} "
            f"| {_num(r['idle_cpu_pct'], '.0f')} | {_num(r.get('client_cpu_pct'), '.0f')} "
            f"| {runs} |")
    lines.append("")
    lines.append("Medians over repetitions; ratios are medians of per-repetition ratios "
                 "(IOPS: higher is better; CPU/req: lower is better). clat: fio completion "
                 "latency; lat: total latency (submission + completion; with the nbd engine a "
                 "reply often arrives during submission, so clat alone understates it). "
                 "CPU: the server's user+system time, children included, in 10 ms ticks; "
                 "client CPU: the client's user+system time over its wall time (100 = one "
                 "core).")
    copies = [r for r in rows if r["workload"] == "nbdcopy" and r["duration_s"] is not None]
    if copies:
        lines.append("nbdcopy: whole image to null: with 256 KiB requests, repeated for the run "
                     "time (IOPS = requests/s); seconds per copy: "
                     + ", ".join(f"{r['server']} {r['duration_s']:.2f}" for r in copies) + ".")
    loads = [r["load1"] for r in rows if r["load1"] is not None]
    if loads:
        lines.append(f"Background: idle CPU sampled before each run (column above); 1-min load "
                     f"average {min(loads):.2f} to {max(loads):.2f} (includes earlier runs).")
    pairs = twins(doc.get("runs", []))
    if pairs:
        lines += ["", f"Each server against its `{TWIN_SUFFIX}` twin (another build or other "
                  "arguments, run right after it): IOPS ratios of the paired repetitions, "
                  "median and spread (the spread is the run's noise for that pair).", "",
                  "| workload | server | IOPS / twin (median) | lowest | highest | pairs |",
                  "|---|---|--:|--:|--:|--:|"]
        for p in pairs:
            lines.append(f"| {p['workload']} | {p['server']} | {p['median']:.2f}x "
                         f"| {p['low']:.2f}x | {p['high']:.2f}x | {len(p['iops'])} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Draw bars of IOPS and CPU-per-request ratios to the baseline, per workload, as a PNG;
    without the baseline, each server's IOPS against its ``-base`` twin (:func:`plot_twins`).

    Returns False (and writes nothing) when no ratio exists, e.g. the baseline did not run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = doc.get("meta", {})
    base = meta.get("baseline", "nbdkit")
    rows: list[dict[str, Any]] = doc["rows"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    lookup = {(r["workload"], r["server"]): r for r in rows}
    if not any(v is not None for r in rows for v in r.get("ratio", {}).values()):
        return plot_twins(doc, path)

    fig = Figure(figsize=(max(8.0, 1.3 * len(workloads) + 2), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = ((fig.add_subplot(2, 1, 1), "iops", f"IOPS / {base} (higher is better)"),
              (fig.add_subplot(2, 1, 2), "cpu_us_per_req",
               f"server CPU per request / {base} (lower is better)"))
    width = 0.8 / max(1, len(servers))
    for ax, metric, title in panels:
        for i, s in enumerate(servers):
            xs, ys = [], []
            for j, w in enumerate(workloads):
                v = lookup.get((w, s), {}).get("ratio", {}).get(metric)
                if v is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(v)
            bars = ax.bar(xs, ys, width, label=s)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ratio")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    fig.legend(*panels[0][0].get_legend_handles_labels(), loc="outside lower center",
               fontsize=8, ncols=len(servers))
    mib = meta.get("image_bytes", 0) / (1 << 20)
    fig.suptitle(f"icbd-bench serve: {mib:.0f} MiB page-cached image, {meta.get('runtime_s')} s "
                 f"runs, median of {meta.get('reps')} paired reps", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def plot_twins(doc: dict[str, Any], path: Path) -> bool:
    """Bars of each server's IOPS over its ``-base`` twin's (:func:`twins`), per workload,
    the median of the paired repetitions with a line from the lowest to the highest, as a
    PNG. Returns False (and writes nothing) when no server has a twin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = twins(doc.get("runs", []))
    if not pairs:
        return False
    meta = doc.get("meta", {})
    workloads = list(dict.fromkeys(p["workload"] for p in pairs))
    servers = list(dict.fromkeys(p["server"] for p in pairs))
    lookup = {(p["workload"], p["server"]): p for p in pairs}
    fig = Figure(figsize=(max(8.0, 1.3 * len(workloads) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(servers))
    for i, s in enumerate(servers):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            p = lookup.get((w, s))
            if p is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(p["median"])
                lo.append(p["median"] - p["low"])
                hi.append(p["high"] - p["median"])
        bars = ax.bar(xs, ys, width, label=f"{s} / {s}{TWIN_SUFFIX}", yerr=[lo, hi],
                      capsize=2)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("IOPS ratio (higher: this build faster)")
    ax.margins(y=0.15)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=len(servers))
    mib = meta.get("image_bytes", 0) / (1 << 20)
    fig.suptitle(f"icbd-bench serve: each server against its twin, {mib:.0f} MiB image, "
                 f"{meta.get('runtime_s')} s runs, median and range of {meta.get('reps')} "
                 "paired reps", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True
