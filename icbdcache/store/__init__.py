"""The node's block store: content-addressed chunks, chunk maps per iMI version, metadata,
in one LMDB environment (:mod:`icbdcache.store.lmdbstore`), written by one batched writer
(:mod:`icbdcache.store.writer`); shared by processes as docs/store.md ('CONCURRENCY') says
(:mod:`icbdcache.store.lifecycle`, :mod:`icbdcache.store.owners`)."""

from icbdcache.store.chunks import CHUNK_SIZE, UNKNOWN, ZERO, digest
from icbdcache.store.lmdbstore import (
    ChunkGet,
    ChunkMismatch,
    Pending,
    RecordGet,
    RecordPut,
    Store,
    StoreError,
    StoreFull,
    VersionBusy,
    VersionExists,
    VersionInUse,
    VersionMeta,
    split_key,
    version_key,
)
from icbdcache.store.writer import BatchWriter

__all__ = [
    "CHUNK_SIZE", "UNKNOWN", "ZERO", "BatchWriter", "ChunkGet", "ChunkMismatch", "Pending",
    "RecordGet", "RecordPut", "Store", "StoreError", "StoreFull", "VersionBusy",
    "VersionExists", "VersionInUse", "VersionMeta", "digest", "split_key", "version_key",
]
