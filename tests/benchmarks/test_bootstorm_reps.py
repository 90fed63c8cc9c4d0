"""``icbd-bench bootstorm --reps N``: how repetitions are summarized (pure functions, no
servers): medians over repetitions, their spread, counts summed, ratios paired by
repetition; and the vm driver's rows (booted counts, boot-time medians, server figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import bootstorm, vmdriver


def _client(io_wait: float, requests: int = 10, nbytes: int = 4096 * 10,
            mismatches: int = 0) -> dict[str, Any]:
    return {"io_wait_s": io_wait, "replay_s": 10 * io_wait, "io_busy_s": io_wait,
            "lat_p50_ms": 1.0, "lat_p95_ms": 2.0, "lat_max_ms": 3.0, "lag_s": 0.0,
            "requests": requests, "bytes": nbytes, "mismatches": mismatches, "errors": 0,
            "error": None}


def _run(scenario: str, server: str, rep: int, waits: list[float], **kw: Any
         ) -> dict[str, Any]:
    n = len(waits)
    mode = "simultaneous"
    run = {"scenario": scenario, "mode": mode, "n_clients": n, "server": server, "rep": rep,
           "clients": [_client(w) for w in waits], "error": None,
           "upstream_read_bytes": kw.get("up", 100)}
    return run


def test_trace_reps_are_medians_with_spread_and_paired_ratios() -> None:
    runs = []
    # three repetitions of "1 alone" and "3 simultaneous" on two servers
    alone = {"icbd-cold": [1.0, 2.0, 4.0], "nbdkit-cache": [2.0, 2.0, 2.0]}
    storm = {"icbd-cold": [[1.0, 1.2, 5.0], [2.0, 2.2, 2.4], [4.0, 4.4, 4.8]],
             "nbdkit-cache": [[3.0, 3.0, 3.0], [4.0, 4.0, 4.0], [9.0, 9.0, 9.0]]}
    for rep in range(3):
        for server in ("icbd-cold", "nbdkit-cache"):
            runs.append(_run("alone", server, rep, [alone[server][rep]], up=100 * (rep + 1)))
            runs.append(_run("simultaneous-3", server, rep, storm[server][rep]))
    rows = {(r["scenario"], r["server"]): r for r in bootstorm.summarize(runs, 10, 40960)}
    assert len(rows) == 4, "one row per (scenario, server), whatever the repetitions"
    cold = rows[("simultaneous-3", "icbd-cold")]
    # per-repetition medians 1.2, 2.2, 4.4 -> median 2.2, spread [1.2, 4.4]
    assert cold["reps"] == 3 and cold["clients_total"] == 9
    assert cold["io_wait_s_median"] == 2.2
    assert cold["io_wait_s_median_spread"] == [1.2, 4.4]
    assert cold["io_wait_s_max"] == 4.8  # per-repetition maxima 5.0, 2.4, 4.8
    assert cold["complete_clients"] == 9 and cold["requests"] == 90
    # vs alone is paired by repetition: 1.2/1, 2.2/2, 4.4/4 -> median 1.1
    assert abs(cold["vs_alone"] - 1.1) < 1e-9
    # vs nbdkit-cache, paired: 1.2/3, 2.2/4, 4.4/9 -> median 4.4/9
    assert abs(cold["vs_cache"] - 4.4 / 9) < 1e-9
    a = rows[("alone", "icbd-cold")]
    assert a["upstream_read_bytes"] == 200 and a["io_wait_s_median_spread"] == [1.0, 4.0]


def test_trace_one_rep_rows_are_the_run() -> None:
    runs = [_run("alone", "nbdkit", 0, [1.5]), _run("simultaneous-2", "nbdkit", 0, [2.0, 4.0])]
    runs[1]["clients"][1]["mismatches"] = 1
    rows = bootstorm.summarize(runs, 10, 40960)
    assert [r["reps"] for r in rows] == [1, 1]
    storm = rows[1]
    assert storm["io_wait_s_median"] == 3.0 and storm["io_wait_s_median_spread"] is None
    assert storm["complete_clients"] == 1 and storm["clients_total"] == 2
    assert storm["vs_alone"] == 2.0
    text = bootstorm.markdown({"meta": _trace_meta(), "rows": rows, "runs": runs})
    assert "| 2 simultaneous | nbdkit | 3.00 |" in text and "| 1/2 |" in text


def _trace_meta() -> dict[str, Any]:
    return {"trace": {"path": "t.csv", "requests": 10, "read_bytes": 40960, "chunks": 1,
                      "chunk_bytes": 65536, "duration_s": 1.0},
            "image_bytes": 1 << 20, "think_scale": 1.0, "image": "generated",
            "network": "loopback", "host": {"cpus": 2}, "servers": {}}


def _guest(i: int, boot_s: float | None) -> dict[str, Any]:
    return {"name": f"g{i}", "mac": f"m{i}", "booted": boot_s is not None, "boot_s": boot_s,
            "guest_uptime_s": None if boot_s is None else boot_s - 5, "nbdroot": None,
            "qemu_rc": 0, "qemu_cpu_s": 1.0, "qemu_peak_rss": 1, "error": None}


def test_vm_rows_count_booted_guests_and_take_medians_over_reps() -> None:
    def run(scenario: str, n: int, rep: int, times: list[float | None],
            reqs: int | None) -> dict[str, Any]:
        return {"scenario": scenario, "mode": "simultaneous", "n_clients": n,
                "server": "icbd-cold", "rep": rep,
                "guests": [_guest(i, t) for i, t in enumerate(times)], "error": None,
                "server_requests": reqs, "upstream_read_bytes": 1000}

    runs = [run("alone", 1, 0, [40.0], 900), run("alone", 1, 1, [50.0], 1100),
            run("simultaneous-3", 3, 0, [100.0, 110.0, None], 2000),
            run("simultaneous-3", 3, 1, [80.0, 90.0, 95.0], None)]
    rows = {r["scenario"]: r for r in vmdriver.summarize(runs)}
    storm = rows["simultaneous-3"]
    assert (storm["booted"], storm["guests"]) == (5, 6)
    # per-repetition medians 105 and 90
    assert storm["boot_s_median"] == 97.5 and storm["boot_s_median_spread"] == [90.0, 105.0]
    assert storm["server_requests"] == 2000  # the repetition without the figure is left out
    assert rows["alone"]["boot_s_median"] == 45.0 and rows["alone"]["server_requests"] == 1000
    assert storm["vs_alone"] == 97.5 / 45.0


def test_vm_server_figures_from_icbd_trace(tmp_path: Path) -> None:
    trace = tmp_path / "requests.csv"
    trace.write_text("# t_ms,conn,op,offset,count,lat_us\n# export_size=1048576\n"
                     "# conn=1 export=lab@1\n0.000,1,Read,0,4096,100\n1.0,1,Read,4096,65536,300\n"
                     "2.0,2,Read,0,4096,200\n3.0,2,Flush,0,0,1000\n")
    st = vmdriver.trace_stats(trace)
    assert st["server_requests"] == 4 and st["server_reads"] == 3
    assert st["server_read_bytes"] == 4096 + 65536 + 4096 and st["server_connections"] == 2
    assert st["server_lat_p50_ms"] == 0.25 and st["server_lat_max_ms"] == 1.0
    assert vmdriver.trace_stats(tmp_path / "missing.csv") == {}
