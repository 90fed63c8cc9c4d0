"""Counters of the read path of one server process (chunks and bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from icbdcache.store.reader import TierHits


@dataclass
class ReadStats(TierHits):
    """Since the process started: ``hits`` chunks served from the store's tiers (split by
    tier in ``hits_hot``, ``hits_queued``, ``hits_lmdb``: :class:`TierHits`), ``misses``
    chunks a read had to wait for, ``coalesced`` waits joined to a fault already running
    (single-flight), ``faults`` fetches started, ``fault_errors`` fetches that failed,
    ``corrupt`` chunks refused by their digest check, ``prefetched`` background faults
    (readahead, CACHE), ``bytes_from`` bytes fetched by source name."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    faults: int = 0
    fault_errors: int = 0
    corrupt: int = 0
    prefetched: int = 0
    bytes_from: dict[str, int] = field(default_factory=dict)

    #: The plain counters persisted into the store's ``stats`` (``stats --json``).
    COUNTERS = ("hits", "misses", "coalesced", "faults", "fault_errors", "prefetched",
                "hits_hot", "hits_queued", "hits_lmdb")
