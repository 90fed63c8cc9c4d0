"""Smoke test of ``icbd-bench serve --writes``: what durability costs, measured against servers
that write for real (icbd-cache into copy-on-write overlays, nbdkit's file plugin and qemu-nbd
into copies of the image). Tiny image and sub-second runs: counts and files, never timings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import BIN, require

from bench.serve import WRITE_WORKLOAD_NAMES

SERVERS = ("icbd", "nbdkit", "qemu-nbd", "icbd-store")


def test_serve_writes_runs_every_write_workload_on_writable_servers(tmp_path: Path) -> None:
    require("fio", "nbdkit", "qemu-nbd", "nbdinfo")
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "serve", "--writes", "--quick", "--image-size", "8M",
         "--runtime", "0.5", "--idle-sample", "0.05", "--store", "--out", str(out),
         "--tmpdir", str(scratch)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((out / "serve.json").read_text())
    meta = doc["meta"]
    assert meta["order"] == list(SERVERS)  # icbd-cold serves reads only: left out
    assert ",cow" in meta["servers"]["icbd"]["write_cmd"]
    assert "--store-cow" in meta["servers"]["icbd-store"]["write_cmd"]
    assert " -r " not in meta["servers"]["nbdkit"]["write_cmd"]
    rows = {(r["workload"], r["server"]): r for r in doc["rows"]}
    assert set(rows) == {(w, s) for w in WRITE_WORKLOAD_NAMES for s in SERVERS}
    for key, row in rows.items():
        assert row["ok"] == 1 and row["failed"] == 0, key
        assert row["iops"] > 0 and row["ratio"]["iops"] is not None, key
    flush1 = json.loads(next((out / "logs").glob("fio-icbd-write-4k-flush1-1.json")).read_text())
    job = flush1["jobs"][0]
    assert job["write"]["total_ios"] > 0 and job["sync"]["total_ios"] > 0  # FLUSHes sent
    assert job["read"]["total_ios"] == 0
    assert list(scratch.glob("icbd-bench-write-*")) == []  # scratch copies removed
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
