"""Smoke test of ``icbd-bench replication`` on a tiny synthetic pair: every row, byte counts
that make sense, the site's copies verified. Never timings.

The pair (``--pair DIR``): v1 is 16 MiB of random 64 KiB chunks with every fourth chunk zero;
v2 is v1 with 12 chunks rewritten (random data). Random data does not compress, so every way of
sending it moves about the same bytes: a full copy at least v2's non-zero bytes, a delta at
least the rewritten chunks and far less than a full copy.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from conftest import BIN, require

from bench.replication import KINDS, TOOLS

CHUNK = 64 * 1024
CHUNKS = 256
CHANGED = (3, 5, 17, 18, 40, 41, 42, 90, 131, 200, 201, 250)
#: No wait for an idle machine before each transfer: the other tests keep it busy, and each
#: transfer then waited its 20 s (most of these tests' time); the busy % is still recorded.
NO_IDLE_WAIT = ("--wait-idle-max", "0")


def _write_pair(d: Path) -> int:
    """v1.img and v2.img in ``d``; returns v2's non-zero bytes."""
    rng = random.Random(6)
    blocks = [bytes(CHUNK) if i % 4 == 0 else rng.randbytes(CHUNK) for i in range(CHUNKS)]
    (d / "v1.img").write_bytes(b"".join(blocks))
    for i in CHANGED:
        blocks[i] = rng.randbytes(CHUNK)
    (d / "v2.img").write_bytes(b"".join(blocks))
    return sum(len(b) for b in blocks if any(b))


def test_replication_bench_quick_pair(tmp_path: Path) -> None:
    require("rsync")
    pair = tmp_path / "pair"
    pair.mkdir()
    nonzero = _write_pair(pair)
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "replication", "--quick", "--pair", str(pair),
         "--out", str(out), "--work", str(tmp_path / "work"), *NO_IDLE_WAIT],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "replication.json").read_text())

    a = doc["analysis"]
    assert a["changed_chunks"] == len(CHANGED)
    assert a["changed_bytes"] == len(CHANGED) * CHUNK
    assert a["v2_distinct_bytes"] == nonzero
    runs = {(r["kind"], r["tool"]): r for r in doc["runs"]}
    assert set(runs) == {(k, t) for k in KINDS for t in TOOLS}
    for key, r in runs.items():
        assert not r.get("error"), (key, r.get("error"))
        assert r["verified"] is True, key
        assert r["bytes"] is not None and r["bytes"] > 0, key
        assert r["cpu_s"] >= 0 and r["wall_s"] > 0, key
        assert 0 <= r["idle_busy_pct"] <= 100 and r["idle_wait_s"] < 2, key  # one sample
    size = CHUNKS * CHUNK
    for tool in TOOLS:
        full, delta = runs[("full", tool)]["bytes"], runs[("delta", tool)]["bytes"]
        assert nonzero <= full <= 1.3 * size, (tool, full)
        assert len(CHANGED) * CHUNK <= delta < full / 2, (tool, delta, full)
    rows = {(r["kind"], r["tool"]) for r in doc["rows"]}
    assert rows == set(runs)
    assert all(r["ok"] == 1 for r in doc["rows"])
    assert (out / "replication.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "replication.md").read_text()
    assert "| delta | icbd-zstd-tls |" in md and "Targets" in md
    _check_limit(doc, nonzero)


def _check_limit(doc: dict[str, Any], nonzero: int) -> None:
    """The machine's limit: every stage measured on the sample, the limits made of the
    pair's own bytes, and a time-vs-limit for every icbd row (issue 17)."""
    lim = doc["limit"]
    assert lim is not None
    assert lim["sample_bytes"] == nonzero  # the whole of v2's distinct chunks (< the cap)
    assert set(lim["stages"]) == {"loopback", "copy", "xxh3", "blake3", "lmdb"}
    for st in lim["stages"].values():
        assert st["bytes"] == nonzero and st["seconds"] > 0 and st["mib_s"] > 0
    assert len(lim["empty_pull_s"]) == 3 and all(v > 0 for v in lim["empty_pull_s"])
    assert len(lim["start_s"]) == 3 and lim["fixed_s"] == sorted(lim["empty_pull_s"])[1]
    assert lim["full"]["new_bytes"] == nonzero
    assert lim["delta"]["new_bytes"] == len(CHANGED) * CHUNK
    for kind in KINDS:
        k = lim[kind]
        assert k["limit_serial_s"] >= k["limit_overlapped_s"] >= k["fixed_s"] > 0, k
    assert lim["full"]["stages_serial_s"] > lim["delta"]["stages_serial_s"] > 0
    for r in doc["rows"]:
        if r["tool"].startswith("icbd"):
            assert r["limit_s"] == lim[r["kind"]]["limit_serial_s"], r
            assert r["time_vs_limit"] > 0, r
        else:
            assert "time_vs_limit" not in r, r
    names = {(t["target"], t["kind"]) for t in doc["targets"]}
    assert {("time vs the machine's limit (issue 17)", k) for k in KINDS} <= names


def test_replication_bench_baseline_twins_with_tls(tmp_path: Path) -> None:
    """``--baseline-bin``: each icbd transfer has a ``-base`` twin run by the other build (here
    the same build: both sign and verify), TLS included (each build's masters have their own
    certificate and signing key), every copy verified and a paired ratio per kind."""
    require("rsync")
    pair = tmp_path / "pair"
    pair.mkdir()
    _write_pair(pair)
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "icbd-bench"), "replication", "--quick", "--pair", str(pair),
         "--tools", "icbd,icbd-tls", "--reps", "2", "--baseline-bin", str(BIN / "icbd-cache"),
         "--out", str(out), "--work", str(tmp_path / "work"), *NO_IDLE_WAIT],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "replication.json").read_text())
    tools = ("rsync", "icbd", "icbd-base", "icbd-tls", "icbd-tls-base")
    runs = [(r["rep"], r["kind"], r["tool"]) for r in doc["runs"]]
    assert sorted(runs) == sorted((rep, k, t) for rep in (0, 1) for k in KINDS for t in tools)
    for r in doc["runs"]:
        assert not r.get("error"), (r["kind"], r["tool"], r.get("error"))
        assert r["verified"] is True, (r["kind"], r["tool"])
    # ABBA: the twin runs after its tool in repetition 0, before it in repetition 1
    order = {rep: [t for (p, k, t) in runs if p == rep and k == "full"] for rep in (0, 1)}
    assert order[0].index("icbd") < order[0].index("icbd-base")
    assert order[1].index("icbd-base") < order[1].index("icbd")
    pairs = {(r["kind"], r["tool"]): r for r in doc["vs_baseline"]}
    assert set(pairs) == {(k, t) for k in KINDS for t in ("icbd", "icbd-tls")}
    for r in pairs.values():
        assert r["wall_s_vs_base"] > 0 and r["cpu_s_vs_base"] > 0, r
    assert "| full | icbd-tls |" in (out / "replication.md").read_text()


def test_run_client_wall_time_ends_when_the_client_exits(tmp_path: Path) -> None:
    """The wall time is the client's, not rounded up to the bench's next 0.5 s tick."""
    from bench.replication import run_client

    ticks: list[float] = []
    res = run_client(["sleep", "2.2"], tmp_path / "log", 30, ticks.append)
    assert res.rc == 0
    assert 2.2 <= res.wall_s < 2.45, res.wall_s  # a tick-bound wait ends at 2.5 s
    assert ticks and ticks[-1] >= 2.0


def test_warm_up_reads_every_file_and_runs_the_program_once(
        tmp_path: Path, monkeypatch: Any) -> None:
    """The warm-up before a run reads each file given and each file under a folder given (to
    the end), and runs the transfer's program once."""
    import builtins

    from bench.replication import warm_up

    (tmp_path / "store" / "sub").mkdir(parents=True)
    files = {tmp_path / "store" / "data.mdb": 9 << 20, tmp_path / "store" / "sub" / "x": 10,
             tmp_path / "v2.img": 3}
    for path, size in files.items():
        path.write_bytes(os.urandom(size))
    read: dict[str, int] = {}
    real_open = builtins.open

    class Counting:
        def __init__(self, f: Any, name: str) -> None:
            self.f, self.name = f, name

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def readinto(self, buf: bytearray) -> int:
            n = int(self.f.readinto(buf))
            read[self.name] = read.get(self.name, 0) + n
            return n

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        return Counting(real_open(path, *args, **kwargs), str(path))

    monkeypatch.setattr(builtins, "open", counting_open)
    marker = tmp_path / "ran"
    took = warm_up([tmp_path / "store", tmp_path / "v2.img"],
                   ["sh", "-c", f"echo x >> {marker}"])
    monkeypatch.undo()
    assert read == {str(p): size for p, size in files.items()}
    assert marker.read_text() == "x\n" and took >= 0
