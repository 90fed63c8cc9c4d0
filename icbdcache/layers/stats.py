"""Counters of the read path of one server process (chunks and bytes)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from icbdcache.store.reader import TierHits

#: Upper bounds (seconds) of the fault latency buckets.
FAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Durations (seconds) counted per bucket: ``counts[i]`` of those <= ``bounds[i]`` and
    above the bound before it, ``counts[-1]`` those above every bound; ``total`` their sum."""

    bounds: tuple[float, ...] = FAULT_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(FAULT_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class ReadStats(TierHits):
    """Since the process started: ``hits`` chunks served from the store's tiers (split by
    tier in ``hits_hot``, ``hits_queued``, ``hits_lmdb``: :class:`TierHits`), ``misses``
    chunks a read had to wait for, ``coalesced`` waits joined to a fault already running
    (single-flight), ``faults`` fetches started, ``fault_errors`` fetches that failed,
    ``corrupt`` chunks refused by their digest check, ``prefetched`` background faults
    (readahead, CACHE), ``not_kept`` fetched chunks served but not stored because the
    store's writer was behind (its queue full), ``bytes_from`` bytes fetched by source name,
    ``fault_latency`` the time each fetch took (good or not)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    faults: int = 0
    fault_errors: int = 0
    corrupt: int = 0
    prefetched: int = 0
    not_kept: int = 0
    bytes_from: dict[str, int] = field(default_factory=dict)
    fault_latency: Histogram = field(default_factory=Histogram)

    #: The plain counters persisted into the store's ``stats`` (``stats --json``).
    COUNTERS = ("hits", "misses", "coalesced", "faults", "fault_errors", "prefetched",
                "not_kept", "hits_hot", "hits_queued", "hits_lmdb")
