"""Smoke test of ``icbd-bench serve --quick``: every server answers every workload.

Tiny image and sub-second runs; it checks counts and the files written, never timings. icbd is
included once ``icbd-cache serve --help`` works (until then only nbdkit and qemu-nbd run).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import BIN, require

from bench.serve import WORKLOAD_NAMES


def _icbd_serve_exists() -> bool:
    try:
        out = subprocess.run([str(BIN / "icbd-cache"), "serve", "--help"], capture_output=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def test_serve_quick_covers_every_server_and_workload(tmp_path: Path) -> None:
    require("fio", "nbdkit", "qemu-nbd", "nbdcopy", "nbdinfo")
    names = ["nbdkit", "qemu-nbd"]
    if _icbd_serve_exists():
        names.insert(0, "icbd")
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "serve", "--quick", "--image-size", "8M", "--runtime", "0.5",
         "--idle-sample", "0.05", "--servers", ",".join(names), "--out", str(out),
         "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    doc = json.loads((out / "serve.json").read_text())
    rows = {(r["workload"], r["server"]): r for r in doc["rows"]}
    assert set(rows) == {(w, s) for w in WORKLOAD_NAMES for s in names}
    for key, row in rows.items():
        assert row["ok"] == 1 and row["failed"] == 0, key
        assert row["iops"] > 0 and row["mib_s"] > 0, key
        assert row["ratio"]["iops"] is not None, key
    assert all(r["requests"] > 0 and r["error"] is None for r in doc["runs"])
    assert len(doc["runs"]) == len(WORKLOAD_NAMES) * len(names)
    assert all(rows[(w, "nbdkit")]["ratio"]["iops"] == 1.0 for w in WORKLOAD_NAMES)
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rand-4k-qd1 | nbdkit |" in (out / "serve.md").read_text()
    assert "| workload | server |" in result.stdout
