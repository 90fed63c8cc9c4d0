"""The one exposition of ``serve --workers N`` (icbdcache/metricsmerge.py): workers' counters
and histograms add up sample by sample, gauges of the shared store do not, the earliest start
time is the server's, and the result passes promtool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import require
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from scrape import promtool_check, samples

from icbdcache.layers.stats import ReadStats
from icbdcache.metrics import ReadPathCollector, counter, gauge
from icbdcache.metricsmerge import Gatherer, WorkerExposition, merge, socket_path


class One:
    """A worker's own families, as its collectors would give them."""

    def __init__(self, requests: int, conns: int, start: float, held: int) -> None:
        self.requests, self.conns, self.start, self.held = requests, conns, start, held

    def collect(self):  # type: ignore[no-untyped-def]
        yield counter("nbd_requests", "requests", labels=["export"],
                      samples=[(["lab@1"], self.requests), (["lab@2"], 1)])
        yield gauge("nbd_connections", "conns", labels=["export"],
                    samples=[(["lab@1"], self.conns)])
        yield gauge("store_held_bytes", "held", self.held)
        yield GaugeMetricFamily("process_start_time_seconds", "start", value=self.start)


def exposition(*collectors: object) -> str:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def read_stats(hits: int, faults: int, latencies: list[float]) -> ReadStats:
    s = ReadStats()
    s.hits_lmdb = hits
    s.faults = faults
    for t in latencies:
        s.fault_latency.observe(t)
    return s


def test_counters_and_histograms_add_up_shared_gauges_do_not() -> None:
    require("promtool")
    a = exposition(One(100, 3, 1000.0, 4096),
                   ReadPathCollector(read_stats(7, 2, [0.001, 0.5])))
    b = exposition(One(40, 2, 900.0, 4096),
                   ReadPathCollector(read_stats(5, 1, [0.002])))
    text = merge([a, b]).decode()
    promtool_check(text)
    m = samples(text)
    assert m['icbd_nbd_requests_total{export="lab@1"}'] == 140
    assert m['icbd_nbd_requests_total{export="lab@2"}'] == 2
    assert m['icbd_nbd_connections{export="lab@1"}'] == 5
    assert m["icbd_store_held_bytes"] == 4096
    assert m["process_start_time_seconds"] == 900.0
    assert m['icbd_chunk_hits_total{tier="lmdb"}'] == 12
    assert m["icbd_faults_total"] == 3
    assert m["icbd_fault_duration_seconds_count"] == 3
    assert m["icbd_fault_duration_seconds_sum"] == pytest.approx(0.503)
    assert m['icbd_fault_duration_seconds_bucket{le="+Inf"}'] == 3
    assert m["icbd_workers_scraped"] == 2


def test_a_family_of_two_types_is_refused() -> None:
    a = exposition(One(1, 1, 1.0, 1))
    b = a.replace("# TYPE icbd_nbd_connections gauge", "# TYPE icbd_nbd_connections counter")
    b = b.replace("icbd_nbd_connections{", "icbd_nbd_connections_total{")
    with pytest.raises(ValueError, match="icbd_nbd_connections"):
        merge([a, b])


def test_gatherer_reads_workers_and_leaves_out_one_that_is_gone(tmp_path: Path) -> None:
    """Worker 0's gatherer with two peers: one answers over its socket, one is not there;
    the scrape adds up the one that answered and says so."""

    def registry(requests: int) -> CollectorRegistry:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(One(requests, 1, 5.0, 10))  # type: ignore[arg-type]
        return reg

    async def main() -> str:
        peer = WorkerExposition(registry(30), socket_path(str(tmp_path), 1))
        await peer.start()
        try:
            g = Gatherer(registry(12), [peer.path, socket_path(str(tmp_path), 2)])
            return (await g.exposition()).decode()
        finally:
            await peer.close()

    m = samples(asyncio.run(main()))
    assert m['icbd_nbd_requests_total{export="lab@1"}'] == 42
    assert m["icbd_workers_scraped"] == 2
    assert not (tmp_path / "worker-1.sock").exists()


def test_the_servers_counters_never_go_down_when_a_worker_is_gone_or_started_again(
        tmp_path: Path) -> None:
    """A worker answers (30 requests), then is gone (its socket closed: it is counted at its
    last answer), then comes back as a new process (another start time) that has counted 5:
    the server's counter goes 42, 42, 47 and never down; its gauges are left out while it is
    gone, and only its process's own counts come back with it."""
    require("promtool")
    path = socket_path(str(tmp_path), 1)

    def registry(requests: int, start: float) -> CollectorRegistry:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(One(requests, 1, start, 10))  # type: ignore[arg-type]
        return reg

    async def main() -> list[dict[str, float]]:
        g = Gatherer(registry(12, 5.0), [path])
        scrapes = []
        peer = WorkerExposition(registry(30, 6.0), path)
        await peer.start()
        scrapes.append((await g.exposition()).decode())
        await peer.close()  # killed: not answering
        scrapes.append((await g.exposition()).decode())
        peer = WorkerExposition(registry(5, 9.0), path)  # started again
        await peer.start()
        scrapes.append((await g.exposition()).decode())
        scrapes.append((await g.exposition()).decode())  # (carried once, not at each scrape)
        await peer.close()
        for text in scrapes:
            promtool_check(text)
        return [samples(t) for t in scrapes]

    got = asyncio.run(main())
    key = 'icbd_nbd_requests_total{export="lab@1"}'
    assert [m[key] for m in got] == [42, 42, 47, 47]
    assert [m['icbd_nbd_requests_total{export="lab@2"}'] for m in got] == [2, 2, 3, 3]
    assert [m['icbd_nbd_connections{export="lab@1"}'] for m in got] == [2, 1, 2, 2]
    assert [m["icbd_workers_scraped"] for m in got] == [2, 1, 2, 2]


def test_an_answer_of_an_older_process_and_concurrent_scrapes_count_nothing_twice(
        tmp_path: Path) -> None:
    """An answer whose process started before the one last seen (a stale answer that came
    late) counts as no answer, and two scrapes at once give the same totals as one after the
    other: the restarted worker's former counts are carried once (helper-49 found 220 for
    a true 120 when two scrapes ended in the other order)."""
    path = socket_path(str(tmp_path), 1)

    def registry(requests: int, start: float) -> CollectorRegistry:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(One(requests, 1, start, 10))  # type: ignore[arg-type]
        return reg

    async def main() -> list[float]:
        g = Gatherer(registry(0, 5.0), [path])
        out = []
        for requests, start in ((90, 10.0), (10, 20.0), (100, 10.0), (20, 20.0)):
            peer = WorkerExposition(registry(requests, start), path)
            await peer.start()
            both = await asyncio.gather(g.exposition(), g.exposition())
            await peer.close()
            got = [samples(b.decode())['icbd_nbd_requests_total{export="lab@1"}']
                   for b in both]
            assert got[0] == got[1], got
            out.append(got[0])
        return out

    # 90; restarted at 20 with 10: 100; a stale answer of the first process: still 100;
    # the new process at 20: 110
    assert asyncio.run(main()) == [90, 100, 100, 110]


def test_a_scrape_that_falls_back_to_worker_0_keeps_the_others_counts(tmp_path: Path) -> None:
    """A worker whose family has another type than worker 0's makes the scrape worker 0's
    alone (its gauges, ``icbd_workers_scraped`` 1); the others' counters are still counted, at
    their last answers (43: its answer's 31 with worker 0's 12; 12 before this fix)."""
    path = socket_path(str(tmp_path), 1)
    own = CollectorRegistry(auto_describe=False)
    own.register(One(12, 1, 5.0, 10))  # type: ignore[arg-type]

    class Clash:
        def collect(self):  # type: ignore[no-untyped-def]
            yield from One(31, 1, 6.0, 10).collect()
            yield counter("nbd_connections", "conns now a counter", 1)

    async def main() -> list[dict[str, float]]:
        g = Gatherer(own, [path])
        out = []
        for coll in (One(30, 1, 6.0, 10), Clash()):
            reg = CollectorRegistry(auto_describe=False)
            reg.register(coll)  # type: ignore[arg-type]
            peer = WorkerExposition(reg, path)
            await peer.start()
            out.append(samples((await g.exposition()).decode()))
            await peer.close()
        return out

    first, fallback = asyncio.run(main())
    key = 'icbd_nbd_requests_total{export="lab@1"}'
    assert first[key] == 42 and first["icbd_workers_scraped"] == 2
    assert fallback[key] == 43 and fallback["icbd_workers_scraped"] == 1
    assert fallback['icbd_nbd_connections{export="lab@1"}'] == 1  # worker 0's alone
