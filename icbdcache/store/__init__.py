"""The node's block store: content-addressed chunks, chunk maps per iMI version, metadata,
in one LMDB environment (:mod:`icbdcache.store.lmdbstore`), written by one batched writer
(:mod:`icbdcache.store.writer`)."""

from icbdcache.store.chunks import CHUNK_SIZE, UNKNOWN, ZERO, digest
from icbdcache.store.lmdbstore import (
    ChunkGet,
    ChunkMismatch,
    RecordGet,
    RecordPut,
    Store,
    StoreError,
    VersionMeta,
    split_key,
    version_key,
)
from icbdcache.store.writer import BatchWriter

__all__ = [
    "CHUNK_SIZE", "UNKNOWN", "ZERO", "BatchWriter", "ChunkGet", "ChunkMismatch", "RecordGet",
    "RecordPut", "Store", "StoreError", "VersionMeta", "digest", "split_key", "version_key",
]
