"""Prometheus metrics: the counters a process already keeps, read when ``/metrics`` is scraped.

Nothing here counts anything: each collector reads live objects at scrape time (the node's
:class:`~icbdcache.layers.stats.ReadStats`, the connections of the NBD server, the replica's
state, the master's counters and registry, the PXE servers' counters), so the hot paths pay
nothing for metrics. A process builds one :class:`prometheus_client.CollectorRegistry` with
the collectors of what it runs (:func:`new_registry`), and serves it at ``/metrics``: ``serve
--metrics-listen HOST:PORT`` (:class:`MetricsServer`), the master's API and the PXE HTTP
server (:func:`add_route`). The names and labels are listed in docs/metrics.md.

Counters count since the process started (Prometheus handles restarts); on a fresh store they
equal what ``icbd-cache stats --json`` shows once the server has stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from icbdcache.layers.stats import Histogram, ReadStats
from icbdcache.log import kv
from icbdcache.store.standaside import StandAside

log = logging.getLogger("icbdcache.metrics")

#: The prefix of every metric of ours.
PREFIX = "icbd_"


class Collector(Protocol):
    """What a :class:`CollectorRegistry` asks at each scrape."""

    def collect(self) -> Iterable[Metric]: ...


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry with the process's CPU, memory and file descriptors (prometheus_client's
    process, platform and GC collectors) and ``collectors``."""
    reg = CollectorRegistry(auto_describe=False)
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *collectors):
        reg.register(c)
    return reg


def counter(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
            samples: Iterable[tuple[list[str], float]] = ()) -> CounterMetricFamily:
    """A counter family ``icbd_NAME_total`` with one value, or one sample per label set."""
    fam = CounterMetricFamily(PREFIX + name, doc, value=value,
                              labels=None if value is not None else list(labels))
    for label_values, v in samples:
        fam.add_metric(label_values, v)
    return fam


def gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
          samples: Iterable[tuple[list[str], float]] = ()) -> GaugeMetricFamily:
    """A gauge family ``icbd_NAME`` with one value, or one sample per label set."""
    fam = GaugeMetricFamily(PREFIX + name, doc, value=value,
                            labels=None if value is not None else list(labels))
    for label_values, v in samples:
        fam.add_metric(label_values, v)
    return fam


def histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    """``h`` as the histogram family ``icbd_NAME`` (cumulative buckets, ``+Inf`` last)."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(h.bounds, h.counts, strict=False):
        running += n
        buckets.append((repr(float(bound)), running))
    buckets.append(("+Inf", h.count))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=h.total)


# ---------------------------------------------------------------------------- the read path


class ReadPathCollector:
    """The node's read path: hits by tier, misses, faults, coalesced waits, bytes by source,
    the fault latency, and the store's size (``store_stats``: its ``stats()``, or None)."""

    def __init__(self, stats: ReadStats,
                 store_stats: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.stats = stats
        self.store_stats = store_stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield counter("chunk_hits", "Chunk reads answered from the store, by tier (hot set "
                      "in memory, the writer's queue, LMDB); stats: hits_hot, hits_queued, "
                      "hits_lmdb", labels=["tier"],
                      samples=[(["hot"], s.hits_hot), (["queued"], s.hits_queued),
                               (["lmdb"], s.hits_lmdb)])
        yield counter("chunk_misses", "Chunk reads that waited for a fault (stats: misses)",
                      s.misses)
        yield counter("faults", "Chunk fetches started from a source (stats: faults)",
                      s.faults)
        yield counter("fault_errors", "Chunk fetches that failed (stats: fault_errors)",
                      s.fault_errors)
        yield counter("faults_coalesced", "Reads that joined a fetch already in flight "
                      "(single-flight; stats: coalesced)", s.coalesced)
        yield counter("chunks_corrupt", "Fetched chunks refused by their digest", s.corrupt)
        yield counter("prefetched", "Background faults (readahead, NBD_CMD_CACHE; stats: "
                      "prefetched)", s.prefetched)
        yield counter("chunks_not_kept", "Fetched chunks served but not stored: the store's "
                      "writer was behind (stats: not_kept)", s.not_kept)
        yield counter("source_bytes", "Bytes fetched, by source (an upstream, a snapshot "
                      "file, the master; stats: bytes_from:SOURCE)", labels=["source"],
                      samples=[([k], v) for k, v in sorted(s.bytes_from.items())])
        yield histogram("fault_duration_seconds", "Time each chunk fetch took",
                        s.fault_latency)
        if self.store_stats is not None:
            try:
                st = self.store_stats()
            except Exception as e:  # a scrape must not fail for a store hiccup
                log.warning(kv(event="metrics_store", error=e))
                return
            yield gauge("store_held_bytes", "Bytes of chunks held in the store",
                        st.get("held_bytes", 0))
            yield gauge("store_chunks", "Chunks held in the store", st.get("chunks", 0))


class WriterView(Protocol):
    """What the store writer's collector reads of a
    :class:`~icbdcache.store.writer.BatchWriter`."""

    batches: int
    errors: int

    @property
    def queued_bytes(self) -> int: ...


class StoreWriterCollector:
    """The store's writer thread of this process (:class:`~icbdcache.store.writer.BatchWriter`):
    transactions committed and failed, bytes queued, and how often the event loop stood aside
    for its puts (``aside``: the store's ``stand_aside``, a
    :class:`~icbdcache.store.standaside.StandAside` once a loop runs over the store; anything
    else has no counters and yields none)."""

    def __init__(self, writer: WriterView, aside: Callable[[], object]) -> None:
        self.writer = writer
        self.aside = aside

    def collect(self) -> Iterator[Metric]:
        w = self.writer
        yield counter("store_batches", "Transactions the store's writer committed", w.batches)
        yield counter("store_batch_errors", "Transactions of the store's writer that failed "
                      "(their chunks were served, not kept; the log says why)", w.errors)
        yield gauge("store_queued_bytes", "Bytes of fetched chunks waiting for the store's "
                    "writer", w.queued_bytes)
        a = self.aside()
        if not isinstance(a, StandAside):
            return
        yield counter("store_stand_aside_batches", "Batches the writer asked the event loop "
                      "to stand aside for (awaited by another worker, or queue half full)",
                      a.asked)
        yield counter("store_stand_aside_slices", "Slices of puts the event loop stood aside "
                      "for", a.stood)
        yield counter("store_stand_aside_seconds", "Seconds the event loop stood aside for "
                      "the writer's puts (at most 20 ms each slice)", a.stood_seconds)
        yield counter("store_stand_aside_timeouts", "Slices the event loop stopped standing "
                      "aside for after 20 ms, the puts not done", a.timeouts)
        yield counter("store_stand_aside_missed", "Batches whose event loop did not come "
                      "within 20 ms: put without it, not asked again for 1 s", a.missed)


# ---------------------------------------------------------------------------- NBD server


class ConnectionView(Protocol):
    """What the server collector reads of one NBD connection."""

    @property
    def export_name(self) -> str | None: ...

    identity: str
    requests: int
    read_bytes: int
    write_bytes: int


class ServerView(Protocol):
    """What the server collector reads of the NBD server."""

    def connection_views(self) -> Iterable[ConnectionView]: ...

    #: export -> [requests, read bytes, write bytes] of closed connections.
    closed_totals: dict[str, list[int]]
    #: reason -> connections refused.
    refused: dict[str, int]

    @property
    def busy_poll_seconds(self) -> float: ...


class ServerCollector:
    """The NBD server: connections and distinct clients per export (version), requests and
    bytes by export and direction, refused connections by reason."""

    def __init__(self, server: ServerView, *, per_client: bool = False) -> None:
        self.server = server
        #: also yield :data:`~icbdcache.metricsmerge.CLIENT_PAIRS` (a worker of ``serve
        #: --workers N``: worker 0 counts distinct clients over all workers from them, and
        #: drops them from the scrape)
        self.per_client = per_client

    def collect(self) -> Iterator[Metric]:
        totals = {k: list(v) for k, v in self.server.closed_totals.items()}
        conns: dict[str, int] = {}
        clients: dict[str, set[str]] = {}
        for c in self.server.connection_views():
            name = c.export_name
            if name is None:
                continue
            conns[name] = conns.get(name, 0) + 1
            clients.setdefault(name, set()).add(c.identity)
            t = totals.setdefault(name, [0, 0, 0])
            t[0] += c.requests
            t[1] += c.read_bytes
            t[2] += c.write_bytes
        yield gauge("nbd_connections", "NBD connections in transmission, by export",
                    labels=["export"], samples=[([k], v) for k, v in sorted(conns.items())])
        yield gauge("nbd_clients", "Distinct clients (IP addresses) connected, by export",
                    labels=["export"],
                    samples=[([k], len(v)) for k, v in sorted(clients.items())])
        if self.per_client:
            yield gauge("nbd_client_pairs", "Internal (workers to worker 0): each client "
                        "connected, by export", labels=["export", "client"],
                        samples=[([k, a], 1) for k, v in sorted(clients.items())
                                 for a in sorted(v)])
        yield counter("nbd_requests", "NBD requests received, by export", labels=["export"],
                      samples=[([k], v[0]) for k, v in sorted(totals.items())])
        yield counter("nbd_bytes", "Bytes asked for by NBD requests, by export and direction",
                      labels=["export", "direction"],
                      samples=[s for k, v in sorted(totals.items())
                               for s in (([k, "read"], v[1]), ([k, "write"], v[2]))])
        yield counter("nbd_refused", "Connections refused, by reason", labels=["reason"],
                      samples=[([k], v) for k, v in sorted(self.server.refused.items())])
        yield counter("busy_poll_seconds", "Seconds the event loop polled instead of sleeping "
                      "after client requests (serve --busy-poll)",
                      self.server.busy_poll_seconds)


# ---------------------------------------------------------------------------- replica


class ReplicaCollector:
    """A replica (``icbd-cache replica``, or the one in ``serve --master``): its state, how
    far behind the master it is, each version's pull progress, what it moved.
    ``replica``: returns the :class:`~icbdcache.replication.replica.Replica` (or None)."""

    STATES = ("syncing", "idle", "cut-off", "error", "stopped")

    def __init__(self, replica: Callable[[], Any]) -> None:
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        r = self.replica()
        if r is None:
            return
        try:
            st = r.state_dict()
        except Exception as e:
            log.warning(kv(event="metrics_replica", error=e))
            return
        state = str(st.get("state"))
        states = [*self.STATES, *([state] if state not in self.STATES else [])]
        yield gauge("replica_state", "1 for the replica's current state", labels=["state"],
                    samples=[([s], 1.0 if s == state else 0.0) for s in states])
        yield gauge("replica_behind_bytes", "Bytes of the subscribed iMIs' newest versions "
                    "this site still lacks (its lag)", float(st.get("behind_bytes") or 0))
        versions = st.get("versions") or {}
        yield gauge("replica_version_held_bytes", "Bytes of each version held (pull "
                    "progress)", labels=["version"],
                    samples=[([k], float(v.get("held", 0))) for k, v in sorted(versions.items())])
        yield gauge("replica_version_need_bytes", "Bytes each version needs in all",
                    labels=["version"],
                    samples=[([k], float(v.get("need", 0))) for k, v in sorted(versions.items())])
        cut = st.get("cut_off_since")
        yield gauge("replica_cut_off_since_seconds", "When the master became unreachable "
                    "(seconds since the epoch; 0 = reachable)",
                    float(cut) if isinstance(cut, int | float) else 0.0)
        c = st.get("counters") or {}
        yield counter("replica_wire_bytes", "Bytes of chunk streams received from the master",
                      float(c.get("wire_bytes", 0)))
        yield counter("replica_chunk_bytes", "Bytes of good chunks pulled",
                      float(c.get("chunk_bytes", 0)))
        yield counter("replica_chunks", "Good chunks pulled", float(c.get("chunks", 0)))
        yield counter("replica_chunks_corrupt", "Pulled chunks refused for a bad digest",
                      float(c.get("corrupt", 0)))


# ---------------------------------------------------------------------------- HTTP


async def metrics_response(registry: CollectorRegistry,
                           before: Callable[[], Awaitable[None]] | None = None
                           ) -> web.Response:
    """The text exposition of ``registry`` (``before``: awaited first, to refresh what a
    collector reads)."""
    if before is not None:
        await before()
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                            "Cache-Control": "no-store"})


def add_route(app: web.Application, registry: CollectorRegistry,
              before: Callable[[], Awaitable[None]] | None = None) -> None:
    """``GET /metrics`` on ``app``."""

    async def handle(request: web.Request) -> web.Response:
        return await metrics_response(registry, before)

    app.router.add_get("/metrics", handle)


class MetricsServer:
    """``serve --metrics-listen HOST:PORT``: ``/metrics`` alone on its own address. ``peers``:
    the sockets of the other workers of ``serve --workers N``, added up with this one's
    (:mod:`icbdcache.metricsmerge`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 peers: Sequence[str] = ()) -> None:
        self.app = web.Application()
        if peers:
            from icbdcache.metricsmerge import Gatherer

            gatherer = Gatherer(registry, peers)

            async def handle(request: web.Request) -> web.Response:
                return web.Response(body=await gatherer.exposition(),
                                    headers={"Content-Type": CONTENT_TYPE_LATEST,
                                             "Cache-Control": "no-store"})

            self.app.router.add_get("/metrics", handle)
        else:
            add_route(self.app, registry)
        self.host, self.port = host, port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen. Raises OSError (address in use, ...)."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(e.errno, f"--metrics-listen {self.host}:{self.port}: "
                                   f"{e.strerror or e}") from None
        self.runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if self.port == 0 and sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info(kv(event="metrics_listening", address=f"{self.host}:{self.port}",
                    path="/metrics"))

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


__all__ = ["MetricsServer", "ReadPathCollector", "ReplicaCollector", "ServerCollector",
           "StoreWriterCollector",
           "add_route", "counter", "gauge", "histogram", "metrics_response", "new_registry"]
