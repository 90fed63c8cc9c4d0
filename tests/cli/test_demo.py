"""``icbd-cache demo``: README's first command shows a site cache faulting from its master.

The demo is run as a user runs it (the installed CLI, real master, site and nbdcopy processes),
with ``--keep``; the counts it prints are checked against the ``icbd-cache stats --json``
snapshots it leaves, and against the image, cut into 64 KiB chunks here with sha256 (not the
store's digest). Never times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, require

from icbdcache.cli import main
from icbdcache.commands.demo import Pass, verdict
from icbdcache.commands.demostack import PassCounts, from_master, mib

CHUNK = 64 << 10
MiB = 1 << 20

#: A row of the demo's table: pass, clients, wall, master->site, faults, coalesced, hits by
#: tier (hot set, queue, LMDB).
ROW = re.compile(r"^(cold|warm) +(\d+) +[\d.]+ s +(\d+(?:\.\d)? (?:B|KiB|MiB)) +(\d+) +(\d+) "
                 r"+(\d+) +(\d+) +(\d+)$")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: (exit status, stdout, stderr); argparse's own exits count too."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def distinct_chunks(path: Path) -> dict[bytes, int]:
    """The image's distinct non-zero 64 KiB chunks: sha256 -> length."""
    out: dict[bytes, int] = {}
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            if any(data):
                out[hashlib.sha256(data).digest()] = len(data)
    return out


def run_demo(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run ``icbd-cache demo --keep ARGS`` (its image cache under ``tmp_path``); returns its
    output and the directory it kept (removed when the test ends, by the fixture below)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run([str(BIN / "icbd-cache"), "demo", "--keep", *args], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    out = p.stdout
    kept = re.search(r"^kept +(\S+): ", out, re.M)
    assert kept, out + p.stderr
    where = Path(kept.group(1))
    (tmp_path / "kept").write_text(str(where))
    assert p.returncode == 0, out + p.stderr
    return out, where


@pytest.fixture(autouse=True)
def _remove_kept(tmp_path: Path) -> Any:
    yield
    kept = tmp_path / "kept"
    if kept.exists():
        shutil.rmtree(kept.read_text(), ignore_errors=True)


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def check_demo(out: str, kept: Path, image: Path, clients: int) -> None:
    """Every count the demo printed is the stats snapshots' and the image's."""
    chunks = distinct_chunks(image)
    want_bytes = sum(chunks.values())
    cold_stats = load(kept / "stats-cold.json")
    warm_stats = load(kept / "stats-warm.json")
    master_stats = load(kept / "stats-master.json")
    diffs = {"cold": PassCounts.between({}, cold_stats),
             "warm": PassCounts.between(cold_stats, warm_stats)}
    rows = {m.group(1): m for line in out.splitlines() if (m := ROW.match(line))}
    assert set(rows) == {"cold", "warm"}, out
    for name, row in rows.items():
        c = diffs[name]
        assert int(row.group(2)) == clients
        assert row.group(3) == mib(c.from_master), (name, out)
        assert [int(row.group(i)) for i in range(4, 9)] == \
            [c.faults, c.coalesced, c.hits_hot, c.hits_queued, c.hits_lmdb], (name, out)
        assert c.hits_hot + c.hits_queued + c.hits_lmdb == c.hits  # the tiers are the hits
        assert re.search(rf"^{name} +{clients} x nbdcopy nbd://127\.0\.0\.1:\d+/demo@1 at "
                         rf"once: {clients}/{clients} copies with the image's sha256", out, re.M)
    cold, warm = diffs["cold"], diffs["warm"]
    # cold: each distinct non-zero chunk crossed once, all faulted (no background pull)
    assert cold.from_master == want_bytes
    assert cold.faults == len(chunks)
    assert int(cold_stats.get("replica_chunk_bytes", 0)) == 0
    assert f"each of the {len(chunks)} distinct non-zero chunks crossed once " \
           f"({want_bytes} bytes)" in out
    # warm: nothing crossed, every read a hit
    assert warm.from_master == 0 and from_master(warm_stats) == want_bytes
    assert warm.faults == 0 and warm.misses == 0 and warm.hits > 0
    # the master's own count, from the other end
    assert int(master_stats["master_chunks_sent"]) == len(chunks)
    assert f"its own count agrees: {len(chunks)} chunks sent" in out
    assert out.rstrip().splitlines()[-2] == "demo: OK"
    assert "icbdcache.cli" not in out  # commands shown as a user types them


def test_demo_readme_command(tmp_path: Path) -> None:
    """README's ``icbd-cache demo``: the built image, 15 clients, cold then warm."""
    require("nbdinfo", "nbdcopy")
    if not (shutil.which("mkfs.ext4") or os.path.exists("/sbin/mkfs.ext4")):
        pytest.skip("mkfs.ext4 is not installed (Debian package e2fsprogs; scripts/setup)")
    out, kept = run_demo(tmp_path)
    image = next((tmp_path / "cache" / "icbd-cache").glob("demo-*.ext4"))
    assert re.search(r"^master +icbd-cache keygen --out (\S+)/master\.key$", out, re.M), out
    assert re.search(r"^master +icbd-cache publish \S+ --imi demo --store \S+ --signing-key "
                     r"\S+/master\.key$", out, re.M), out
    assert re.search(r"^site +icbd-cache serve --store \S+ --create-store --listen "
                     r"127\.0\.0\.1:\d+ --master http://127\.0\.0\.1:\d+ --site demo-site "
                     r"--subscribe demo --on-demand --trust-key \S+/master\.key\.pub$",
                     out, re.M), out
    assert re.search(r"published demo@1: .* signed by key [0-9a-f]{16}", out), out
    check_demo(out, kept, image, 15)
    assert {p.name for p in kept.iterdir()} >= {"master", "site", "master.log", "site.log",
                                                "stats-cold.json", "stats-warm.json",
                                                "stats-master.json"}


def test_demo_counts_repeats_and_zeros_once(tmp_path: Path) -> None:
    """An image with zero chunks, a chunk repeated many times and a short last chunk: the
    cold pass brings each distinct non-zero chunk once, whatever repeats."""
    require("nbdinfo", "nbdcopy")
    import random

    rng = random.Random(18)
    same = rng.randbytes(CHUNK)
    parts = [rng.randbytes(CHUNK) for _ in range(40)] + [same] * 30 + [bytes(CHUNK)] * 20 + \
        [rng.randbytes(CHUNK) for _ in range(10)] + [same] * 5 + [rng.randbytes(CHUNK // 3)]
    image = tmp_path / "img.raw"
    image.write_bytes(b"".join(parts))
    chunks = distinct_chunks(image)
    assert len(chunks) == 52  # 40 + 1 + 10 + the short last one
    out, kept = run_demo(tmp_path, "--image", str(image), "--clients", "4")
    check_demo(out, kept, image, 4)


def test_verdict_fails_when_a_count_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    def counts(from_master: int) -> PassCounts:
        return PassCounts(from_master, 3, 0, 3, 5, 5, 0, 0)

    right = [Pass("cold", 2, 1.0, 2, counts(3 * CHUNK)), Pass("warm", 2, 1.0, 2, counts(0))]
    assert verdict(right, 3 * CHUNK, 3, 3) == 0
    assert capsys.readouterr().out.endswith("demo: OK\n")
    for passes, sent, why in (
            ([Pass("cold", 2, 1.0, 2, counts(4 * CHUNK)), right[1]], 3,
             f"cold pass: {4 * CHUNK} bytes from the master, not the image's {3 * CHUNK}"),
            ([right[0], Pass("warm", 2, 1.0, 2, counts(CHUNK))], 3,
             f"warm pass: {CHUNK} bytes from the master, not 0"),
            ([right[0], Pass("warm", 2, 1.0, 1, counts(0))], 3,
             "warm pass: 1 of 2 copies differ from the image"),
            (right, 4, "the master counts 4 chunks sent, not the image's 3")):
        assert verdict(passes, 3 * CHUNK, 3, sent) == 1
        out = capsys.readouterr().out
        assert f"demo: FAILED: {why}" in out, out
        assert "demo: OK" not in out


def test_demo_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "demo", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    assert "publishes a small ext4 disk image" in flat.lower()
    assert "--on-demand" in flat and "cold" in flat and "warm" in flat
    assert "(default 128M)" in flat and "(default 15, at most 100)" in flat
    assert "icbd-cache demo --boot" in flat
    for flag in ("--size", "--image", "--clients", "--keep", "--boot"):
        assert re.search(rf"^  {flag}\b", out, re.M), flag


def test_demo_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "demo", "--image", str(tmp_path / "none.img"))
    assert rc == 2 and f"--image {tmp_path / 'none.img'}: no such file" in err
    assert "Traceback" not in err
    rc, _, err = run_cli(capsys, "demo", "--size", "12Q")
    assert rc == 2
    assert "--size '12Q' is not a size" in err and "K, M or G" in err
    for n in ("0", "101"):
        rc, _, err = run_cli(capsys, "demo", "--clients", n)
        assert rc == 2 and f"--clients {n}: 1 to 100" in err, err
