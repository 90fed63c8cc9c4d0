"""Smoke test of ``icbd-bench serve --quick --store``: every server answers every workload.

Tiny image and sub-second runs; it checks counts and the files written, never timings. Every
server runs, icbd-cache in its three forms (a file export, a warm store, a cold store faulting
from an upstream) next to nbdkit and qemu-nbd: a server the benchmark skipped or that failed a
run fails the test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import BIN, require

from bench.serve import WORKLOAD_NAMES
from bench.servers import STORE_SERVERS

#: Named with --servers; --store adds STORE_SERVERS after them.
NAMED = ("icbd", "nbdkit", "qemu-nbd")
SERVERS = (*NAMED, *STORE_SERVERS)


def test_serve_quick_covers_every_server_and_workload(tmp_path: Path) -> None:
    require("fio", "nbdkit", "qemu-nbd", "nbdcopy", "nbdinfo")
    assert set(STORE_SERVERS) == {"icbd-store", "icbd-cold"}
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "serve", "--quick", "--image-size", "8M", "--runtime", "0.5",
         "--idle-sample", "0.05", "--servers", ",".join(NAMED), "--store", "--out", str(out),
         "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    doc = json.loads((out / "serve.json").read_text())
    meta = doc["meta"]
    assert meta["order"] == list(SERVERS)
    assert set(meta["servers"]) == set(SERVERS)
    skipped = {n: s["skipped"] for n, s in meta["servers"].items() if "skipped" in s}
    assert skipped == {}, skipped
    assert "--store" in meta["servers"]["icbd-store"]["cmd"]
    assert "nbd://127.0.0.1:" in meta["servers"]["icbd-cold"]["cmd"]
    rows = {(r["workload"], r["server"]): r for r in doc["rows"]}
    assert set(rows) == {(w, s) for w in WORKLOAD_NAMES for s in SERVERS}
    for key, row in rows.items():
        assert row["ok"] == 1 and row["failed"] == 0, key
        assert row["iops"] > 0 and row["mib_s"] > 0, key
        assert row["ratio"]["iops"] is not None, key
    assert all(r["requests"] > 0 and r["error"] is None for r in doc["runs"])
    assert len(doc["runs"]) == len(WORKLOAD_NAMES) * len(SERVERS)
    assert all(rows[(w, "nbdkit")]["ratio"]["iops"] == 1.0 for w in WORKLOAD_NAMES)
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "serve.md").read_text()
    for name in SERVERS:
        assert f"| rand-4k-qd1 | {name} |" in table, name
    # icbd-store's warm-up ran each workload over 8 connections at least (a worker each, by
    # the kernel's hash of their ports), 15 for the 15-connection ones
    warm = {w: json.loads((out / "logs" / f"fio-icbd-store-{w}-1-warmup.json").read_text())
            ["jobs"][0]["job options"]["numjobs"] for w in ("rand-4k-qd1", "rand-4k-qd1-x15")}
    assert warm == {"rand-4k-qd1": "8", "rand-4k-qd1-x15": "15"}
    assert "| workload | server |" in result.stdout


def test_serve_twins_run_with_their_own_arguments(tmp_path: Path) -> None:
    """``--baseline-args`` without ``--baseline-bin``: each icbd server gets a ``-base`` twin
    of this build started with the twin's arguments (here two workers against one), both
    measured in the same repetitions."""
    require("fio", "nbdkit", "nbdcopy", "nbdinfo")
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "serve", "--quick", "--image-size", "8M", "--runtime", "0.5",
         "--idle-sample", "0.05", "--servers", "icbd-store,nbdkit", "--workloads",
         "rand-4k-qd1-x15", "--icbd-args=--workers 2", "--baseline-args=--workers 1",
         "--out", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((out / "serve.json").read_text())
    meta = doc["meta"]
    assert meta["order"] == ["icbd-store", "icbd-store-base", "nbdkit"]
    assert "--workers 2" in meta["servers"]["icbd-store"]["cmd"]
    assert "--workers 1" in meta["servers"]["icbd-store-base"]["cmd"]
    assert "--workers 2" not in meta["servers"]["icbd-store-base"]["cmd"]
    assert meta["servers"]["icbd-store"]["binary"] == meta["servers"]["icbd-store-base"]["binary"]
    runs = [r for r in doc["runs"] if r["error"] is None and r["requests"] > 0]
    assert sorted(r["server"] for r in runs) == ["icbd-store", "icbd-store-base", "nbdkit"]
    assert all(r["client_cpu_pct"] > 0 for r in runs)  # fio's own CPU, from its rusage
    by = {r["server"]: r for r in runs}
    ratio = by["icbd-store"]["iops"] / by["icbd-store-base"]["iops"]
    table = (out / "serve.md").read_text()
    assert f"| rand-4k-qd1-x15 | icbd-store | {ratio:.2f}x | {ratio:.2f}x | {ratio:.2f}x | 1 |" \
        in table
