"""Prometheus metrics under load and at a site: scraped while a recorded boot is replayed by
several clients at once (every scrape passes ``promtool``, counters never go back, and the
last one agrees with ``stats --json``, the replay's own counts and the upstream's log), and a
replica's lag and pull progress as it pulls from a master."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import BIN, free_port, make_image, require, stop_process, trusted, wait_port
from scrape import promtool_check, samples, scrape

from bench import bootstorm
from bench.replay import DEFAULT_TRACE, load_trace

ICBD = str(BIN / "icbd-cache")
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def counters_of(m: dict[str, float]) -> dict[str, float]:
    """The samples of our counters (``icbd_..._total``, histogram counts and sums)."""
    return {k: v for k, v in m.items() if k.startswith("icbd_")
            and (k.partition("{")[0].endswith(("_total", "_count", "_sum", "_bucket")))}


def test_scrapes_during_a_boot_storm_agree_with_stats(tmp_path: Path, upstream: Any) -> None:
    """5 clients replay the first 300 reads of the recorded Debian boot at once (its think
    times kept: about 3 s) against serve faulting from an nbdkit upstream into an empty
    store; /metrics is scraped all along. Every scrape passes promtool and no counter goes
    down; at the end the requests and bytes are the replay's, the source bytes the
    upstream's log, and after the stop every read-path counter equals ``stats --json``."""
    require("promtool", "nbdkit")
    requests, clients = 300, 5
    trace = load_trace(DEFAULT_TRACE)
    img = bootstorm.make_trace_image(trace.head(requests), tmp_path / "boot.img",
                                     trace.export_size)
    up = upstream(img)
    st = tmp_path / "store"
    port, mport = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ICBD, "serve", "--store", str(st), "--create-store", "--export",
             f"img={up.uri}", "--listen", f"127.0.0.1:{port}",
             "--metrics-listen", f"127.0.0.1:{mport}"], stdout=out, stderr=subprocess.STDOUT)
    scrapes: list[dict[str, float]] = []
    try:
        wait_port("127.0.0.1", port)
        wait_port("127.0.0.1", mport)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({
            "host": "127.0.0.1", "port": port, "export": "img", "trace": str(DEFAULT_TRACE),
            "clients": clients, "mode": "simultaneous", "think_scale": 1.0,
            "requests": requests, "image": str(img), "interval_s": 0.2}))
        result = tmp_path / "replay.json"
        replay = subprocess.Popen([sys.executable, "-m", "bench.replay", "run", str(spec),
                                   str(result)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.extend(replay.stdout or ()))
        reader.start()
        while replay.poll() is None:
            text = scrape(mport)
            promtool_check(text)
            scrapes.append(samples(text))
            time.sleep(0.05)
        reader.join(30)
        assert replay.returncode == 0, b"".join(out).decode()[-3000:]
        doc = json.loads(result.read_text())
        assert all(c["requests"] == requests and c["errors"] == 0 and not c["mismatches"]
                   for c in doc["clients"]), doc["clients"]

        # the connections have ended: the served counters are final
        deadline = time.monotonic() + 10
        while True:
            text = scrape(mport)
            last = samples(text)
            if last.get('icbd_nbd_connections{export="img@upstream"}', 0) == 0 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        promtool_check(text)
        scrapes.append(last)
    finally:
        code = stop_process(proc)
    assert code == 0, log.read_text()[-3000:]
    up.wait_idle()

    # during the storm: several scrapes saw it under way, and no counter ever went down
    served = 'icbd_nbd_requests_total{export="img@upstream"}'
    under_way = [s[served] for s in scrapes if 0 < s.get(served, 0) < clients * requests]
    assert len(under_way) >= 3, [s.get(served) for s in scrapes]
    for before, after in itertools.pairwise(scrapes):
        for key, value in counters_of(before).items():
            assert after.get(key, 0) >= value, (key, value, after.get(key))

    # at the end: the replay's requests and bytes, the upstream's bytes
    last = scrapes[-1]
    read_bytes = trace.head(requests).read_bytes * clients
    assert last['icbd_nbd_bytes_total{direction="read",export="img@upstream"}'] == read_bytes
    assert last[served] == clients * requests
    source = f'icbd_source_bytes_total{{source="{up.uri}"}}'
    assert last[source] == up.read_bytes() > 0
    assert last["icbd_faults_total"] == len(up.reads())
    assert last["icbd_faults_coalesced_total"] > 0  # 5 clients wanted the same chunks at once
    # the store's writer committed what was fetched; its stand-aside counters are there
    assert last["icbd_store_batches_total"] > 0
    assert last["icbd_store_batch_errors_total"] == 0
    assert "icbd_store_stand_aside_slices_total" in last  # (a process alone seldom asks)

    # after the stop: what the process persisted into the store is what the last scrape said
    stats = json.loads(subprocess.run([ICBD, "stats", "--store", str(st), "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    for metric, key in (('icbd_chunk_hits_total{tier="hot"}', "hits_hot"),
                        ('icbd_chunk_hits_total{tier="queued"}', "hits_queued"),
                        ('icbd_chunk_hits_total{tier="lmdb"}', "hits_lmdb"),
                        ("icbd_chunk_misses_total", "misses"), ("icbd_faults_total", "faults"),
                        ("icbd_faults_coalesced_total", "coalesced"),
                        ("icbd_fault_errors_total", "fault_errors"),
                        ("icbd_prefetched_total", "prefetched"),
                        (source, f"bytes_from:{up.uri}"),
                        ("icbd_store_held_bytes", "held_bytes")):
        assert last[metric] == stats.get(key, 0), (metric, last[metric], key, stats.get(key))
    assert last["icbd_fault_duration_seconds_count"] == stats["faults"]
    print(f"{len(scrapes)} scrapes, {len(under_way)} during the storm")


def wait_metrics(port: int, done: Any, timeout: float = 60.0) -> list[dict[str, float]]:
    """Scrape ``port`` (each scrape through promtool) until ``done(samples)``; every scrape."""
    seen: list[dict[str, float]] = []
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        promtool_check(text)
        seen.append(samples(text))
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.05)


def test_replica_lag_and_pull_progress(tmp_path: Path) -> None:
    """A replica with --metrics-listen pulls lab@1, then the delta of lab@2 published while it
    runs: its pull progress only grows up to what each version needs, its lag ends at 0, it
    says idle; its byte counters are the master's, which shows the site up with no lag."""
    require("promtool")
    master_store, site_store = tmp_path / "master", tmp_path / "site"
    one = make_image(tmp_path / "one.img", 16 * MiB, seed=1)
    two = make_image(tmp_path / "two.img", 16 * MiB, seed=1)
    with open(two, "r+b") as f:  # lab@2 differs from lab@1 in its first 3 MiB
        f.write(make_image(tmp_path / "new.img", 3 * MiB, seed=2).read_bytes())

    def publish(img: Path) -> None:
        subprocess.run([ICBD, *trusted(["publish", str(img), "--store", str(master_store),
                                        "--imi", "lab"])], check=True, capture_output=True,
                       timeout=120)

    publish(one)
    mport, rport = free_port(), free_port()
    logs = tmp_path / "master.log", tmp_path / "replica.log"
    with open(logs[0], "wb") as out:
        master = subprocess.Popen([ICBD, "master", "--store", str(master_store), "--listen",
                                   f"127.0.0.1:{mport}"], stdout=out, stderr=subprocess.STDOUT)
    replica = None
    try:
        wait_port("127.0.0.1", mport)
        with open(logs[1], "wb") as out:
            replica = subprocess.Popen(
                [ICBD, *trusted(["replica", "--store", str(site_store), "--master",
                                 f"http://127.0.0.1:{mport}", "--site", "site-a", "--subscribe",
                                 "lab", "--pull-batch", "8", "--pull-parallel", "1",
                                 "--metrics-listen", f"127.0.0.1:{rport}"])], stdout=out,
                stderr=subprocess.STDOUT)
        wait_port("127.0.0.1", rport)

        def complete(version: str) -> Any:
            held = f'icbd_replica_version_held_bytes{{version="{version}"}}'
            need = f'icbd_replica_version_need_bytes{{version="{version}"}}'
            return lambda m: (m.get(need, 0) > 0 and m.get(held) == m[need]
                              and m['icbd_replica_state{state="idle"}'] == 1
                              and m["icbd_replica_behind_bytes"] == 0)

        seen = wait_metrics(rport, complete("lab@1"))
        publish(two)
        seen += wait_metrics(rport, complete("lab@2"))
        for version in ("lab@1", "lab@2"):
            held = f'icbd_replica_version_held_bytes{{version="{version}"}}'
            need = f'icbd_replica_version_need_bytes{{version="{version}"}}'
            progress = [m[held] for m in seen if held in m]
            assert progress == sorted(progress), (version, progress)  # never back
            assert all(m[held] <= m[need] for m in seen if held in m)
        last = seen[-1]
        data = 12 * MiB  # every fourth MiB of the images is a hole, held by no chunk
        assert last['icbd_replica_version_need_bytes{version="lab@1"}'] == data
        assert last['icbd_replica_version_need_bytes{version="lab@2"}'] == data
        assert last["icbd_replica_cut_off_since_seconds"] == 0
        assert last["icbd_replica_chunks_corrupt_total"] == 0

        m = wait_metrics(mport, lambda m: m.get('icbd_master_site_behind_bytes'
                                               '{site="site-a"}') == 0)[-1]
        assert m['icbd_master_site_up{site="site-a"}'] == 1
        assert m['icbd_master_sites{state="up"}'] == 1
        assert m['icbd_master_versions{imi="lab"}'] == 2
        assert m["icbd_master_wire_bytes_total"] == last["icbd_replica_wire_bytes_total"] > 0
        assert m["icbd_master_chunks_sent_total"] == last["icbd_replica_chunks_total"]
        # lab@1 whole, then of lab@2 only its delta: the 3 MiB it changed
        assert last["icbd_replica_chunk_bytes_total"] == data + 3 * MiB
    finally:
        if replica is not None:
            assert stop_process(replica) == 0, logs[1].read_text()[-2000:]
        stop_process(master)
