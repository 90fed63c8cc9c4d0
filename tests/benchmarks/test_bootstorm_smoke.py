"""Smoke tests of ``icbd-bench bootstorm``: counts only, never timings.

Both run on loopback (``--net loopback``: no namespaces, no root needed) with a truncated trace,
so they take seconds. The first checks that every client of every server replayed every read
of the trace with the right bytes; the second that icbd-cache, faulting from an empty store for
5 clients at once, fetched each chunk the trace touches from the upstream exactly once (counted
by the upstream nbdkit's log filter).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import BIN, require

from bench import bootstorm, storm
from bench.replay import DEFAULT_TRACE, load_trace


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "bootstorm", "--net", "loopback", "--out", str(out),
         "--tmpdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "bootstorm.json").read_text())
    return doc


def test_quick_every_client_replays_every_read(tmp_path: Path) -> None:
    require("nbdkit", "qemu-nbd")
    requests = 60
    names = list(storm.SERVER_NAMES)
    doc = _run(tmp_path, "--quick", "--wan", "none", "--lan", "none", "--clients", "3",
               "--requests", str(requests), "--server", ",".join(names))
    trace = load_trace(DEFAULT_TRACE).head(requests)
    runs = {(r["scenario"], r["server"]): r for r in doc["runs"]}
    assert set(runs) == {(sc, n) for sc in ("alone", "simultaneous-3") for n in names}
    for key, run in runs.items():
        assert run["error"] is None, key
        assert len(run["clients"]) == run["n_clients"], key
        for c in run["clients"]:
            assert c["requests"] == requests and c["errors"] == 0, (key, c)
            assert c["bytes"] == trace.read_bytes and c["mismatches"] == 0, (key, c)
    rows = {(r["scenario"], r["server"]) for r in doc["rows"]}
    assert rows == set(runs)
    assert all(r["complete_clients"] == r["n_clients"] for r in doc["rows"])
    assert doc["meta"]["net_kind"] == "loopback"
    out = tmp_path / "out"
    assert (out / "bootstorm-clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 simultaneous | nbdkit |" in (out / "bootstorm.md").read_text()


def test_icbd_cold_fetches_each_chunk_once(tmp_path: Path) -> None:
    """5 clients at once, no think time, 5 ms of WAN delay (the relay) so that faults overlap:
    the upstream serves every touched chunk once and nothing else."""
    require("nbdkit")
    requests = 200
    doc = _run(tmp_path, "--server", "icbd-cold", "--clients", "5", "--no-baseline",
               "--no-think", "--requests", str(requests), "--wan", "1gbit,5ms",
               "--lan", "none")
    [run] = doc["runs"]
    assert run["error"] is None and run["scenario"] == "simultaneous-5"
    assert all(c["requests"] == requests and not c["mismatches"] for c in run["clients"])
    trace = load_trace(DEFAULT_TRACE).head(requests)
    size = doc["meta"]["image_bytes"]
    chunk = storm.CHUNK_SIZE
    reads = storm.log_reads(Path(run["upstream_log"]))
    fetched = [off // chunk for off, _ in reads]
    assert all(off % chunk == 0 and n == min(chunk, size - off) for off, n in reads), reads[:5]
    assert len(fetched) == len(set(fetched)), "a chunk was fetched twice"
    assert set(fetched) == trace.chunks(chunk)
    assert run["upstream_read_bytes"] == bootstorm.expected_upstream_bytes(trace, size)
    assert run["relay_down"] >= run["upstream_read_bytes"]


def test_plan_keeps_overlaps_and_waits_for_answered_reads() -> None:
    """The replay's timing model: a read depends on the reads answered before it arrived,
    never on one still in flight."""
    from bench.replay import Trace, make_plan

    # read 0 takes 2 ms; read 1 arrives while it is in flight; read 2 after read 1's reply;
    # read 3 after everything.
    trace = Trace("t", 1 << 20, (0.0, 1.0, 1.5, 10.0), (0, 4096, 8192, 12288),
                  (4096,) * 4, (2000, 100, 100, 100))
    plan = make_plan(trace)
    assert [set(d) for d in plan.deps] == [set(), set(), {1}, {0, 2}]


def test_icbd_warm_alone_is_primed_and_fetches_nothing(tmp_path: Path) -> None:
    """``--server icbd-warm`` without icbd-cold among the servers: its store is primed by an
    unmeasured cold client first, so the measured run fetches nothing upstream."""
    require("nbdkit")
    requests = 60
    doc = _run(tmp_path, "--server", "icbd-warm", "--clients", "2", "--no-baseline",
               "--no-think", "--requests", str(requests), "--wan", "none", "--lan", "none")
    [run] = doc["runs"]
    assert run["error"] is None and run["server"] == "icbd-warm"
    trace = load_trace(DEFAULT_TRACE).head(requests)
    assert all(c["requests"] == requests and c["bytes"] == trace.read_bytes
               and not c["mismatches"] for c in run["clients"])
    assert run["upstream_read_bytes"] == 0
