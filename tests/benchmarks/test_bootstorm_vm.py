"""``icbd-bench bootstorm --driver vm``: two real guests PXE-boot the test iMI at once from a
cold icbd-cache faulting from an upstream. Counts only, never timings: both guests reach
multi-user, the JSON carries the per-guest and server-side figures, and the upstream served
each chunk at most once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, require

from bench import storm
from bench.vm import Unavailable, build_test_imi


@pytest.mark.guest
def test_two_guests_boot_at_once_from_a_cold_store(tmp_path: Path) -> None:
    require("qemu-system-x86_64", "nbdkit")
    try:
        imi = build_test_imi()
    except Unavailable as e:
        pytest.skip(str(e))
    out = tmp_path / "out"
    p = subprocess.run(
        [str(BIN / "icbd-bench"), "bootstorm", "--driver", "vm", "--quick", "--clients", "2",
         "--mode", "simultaneous", "--server", "icbd-cold", "--out", str(out),
         "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "2/2 booted" in p.stdout, "the live progress line"
    doc: dict[str, Any] = json.loads((out / "bootstorm.json").read_text())
    assert doc["meta"]["driver"] == "vm" and doc["meta"]["accel"] in ("tcg", "kvm")
    [row] = doc["rows"]
    assert (row["scenario"], row["server"], row["booted"], row["guests"]) == \
        ("simultaneous-2", "icbd-cold", 2, 2)
    [run] = doc["runs"]
    assert run["error"] is None
    key = doc["meta"]["imi"]["key"]
    macs = set()
    for g in run["guests"]:
        assert g["booted"] and g["boot_s"] > 0 and g["error"] is None, g
        assert g["nbdroot"].endswith(f"/{key}"), g
        macs.add(g["mac"])
    assert len(macs) == 2, "each guest has its own MAC"
    # server-side figures from icbd-cache's --trace: both guests' connections and reads
    assert run["server_connections"] >= 2
    assert run["server_reads"] > 100 and run["server_read_bytes"] > 10 << 20
    assert run["server_lat_p50_ms"] is not None and run["server_lat_max_ms"] is not None
    assert run["server_cpu_s"] is not None and run["peak_rss"] > 0
    # the upstream served whole 64 KiB chunks, none twice, fewer bytes than the guests read
    reads = storm.log_reads(Path(run["upstream_log"]))
    chunks = [off // storm.CHUNK_SIZE for off, _ in reads]
    assert reads and len(chunks) == len(set(chunks)), "a chunk crossed the WAN twice"
    assert run["upstream_read_bytes"] == sum(n for _, n in reads)
    assert 0 < run["upstream_read_bytes"] < (imi / "imi.ext4").stat().st_size
    assert run["icbd"]["faults"] == len(chunks), "icbd-cache's count of chunks it fetched"
    md = (out / "bootstorm.md").read_text()
    assert "| 2 simultaneous | icbd-cold | 2/2 |" in md
    assert (out / "bootstorm-guests.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
