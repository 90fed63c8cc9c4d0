"""Publishing: a raw image file becomes a version of the master's store and of the registry
(docs/replication.md, 'Publishing').

The file is read once, start to end. Its chunk map is built as ``import`` builds one
(:func:`icbdcache.store.digest` per 64 KiB chunk); its non-zero chunks are copied into the store
through the batched writer (all-zero chunks are never stored, so blocks trimmed before the
snapshot cost nothing); the version is pinned and made the iMI's latest; its kernel and initrd
are kept as ``import`` keeps them; only then is it recorded in the registry, which is what makes
it visible to replicas. A published version never changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from icbdcache.log import kv
from icbdcache.replication.registry.base import Registry, VersionRecord
from icbdcache.replication.wire import manifest_digest
from icbdcache.store import BatchWriter, Store, VersionMeta, version_key
from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE, distinct_chunks
from icbdcache.store.index import index_image

log = logging.getLogger("icbdcache.publish")


class PublishError(Exception):
    """The version cannot be published (exists, bad name, unreadable or empty file)."""


def distinct_bytes(chunk_map: bytes | bytearray, size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Bytes of the distinct non-zero chunks of a map of an image of ``size`` bytes (what a
    full replication moves before compression)."""
    return sum(distinct_chunks(chunk_map, size, chunk_size).values())


@dataclass
class Published:
    """What :func:`publish` did: the registry's ``record``, the ``chunks`` of the map, and the
    bytes of chunks ``added`` to the store (the rest were already there)."""

    record: VersionRecord
    chunks: int
    added: int
    seconds: float


async def next_version(store: Store, registry: Registry, imi: str) -> str:
    """One more than the highest numeric version of ``imi`` in the store or the registry,
    ``"1"`` for the first."""
    names = [m.version for m in store.versions() if m.imi == imi]
    names += [r.version for r in await registry.versions(imi)]
    return str(max((int(v) for v in names if v.isdigit()), default=0) + 1)


def _read_into_store(store: Store, path: str, size: int, key: str,
                     progress: Callable[[int], object] | None) -> tuple[bytearray, int]:
    """Index ``path`` into the store: (chunk map, bytes added to the store). Raises OSError,
    PublishError when the file ends early or a write fails."""
    held_before = store.held
    writer = BatchWriter(store)
    try:
        chunk_map = index_image(path, size, writer, progress=progress, label=key)
    except EOFError as e:
        raise PublishError(str(e)) from e
    finally:
        writer.close()
    if writer.errors:
        raise PublishError(f"{writer.errors} write batches to the store failed (see the log)")
    return chunk_map, max(0, store.held - held_before)


async def publish(store: Store, registry: Registry, path: str, imi: str,
                  version: str | None = None, *, master_url: str = "",
                  kernel: str | None = None, initrd: str | None = None,
                  progress: Callable[[int], object] | None = None,
                  keep_boot: Callable[[VersionMeta, str], None] | None = None) -> Published:
    """Publish the raw image ``path`` as ``IMI@VERSION`` (``version`` None: the next number).
    ``kernel``/``initrd``: boot files to keep with it (absolute paths recorded; copied by
    ``keep_boot(meta, image)``, which is also what extracts them from an ext4 image);
    ``progress(n)``: called with the bytes read after each chunk; ``master_url`` goes into the
    record. Raises PublishError if the version exists in the registry, the file is empty or
    ends early; OSError if it cannot be read; RegistryError/StoreError from the backends.

    A version in the store but not in the registry (a publish interrupted before its last
    step) is replaced."""
    t0 = time.monotonic()
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PublishError(f"{path} is a directory, not an image")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size == 0:
        raise PublishError(f"{path}: empty image (0 bytes)")
    if version is None:
        version = await next_version(store, registry, imi)
    key = version_key(imi, version)
    if any(r.version == version for r in await registry.versions(imi)):
        raise PublishError(f"{key} is already published (a published version never changes; "
                           "publish a new version)")
    chunk_map, added = await asyncio.to_thread(_read_into_store, store, path, size, key,
                                               progress)
    meta = VersionMeta(imi, version, size, CHUNK_SIZE, [], pinned=True, created=time.time(),
                       kernel=os.path.abspath(kernel) if kernel else None,
                       initrd=os.path.abspath(initrd) if initrd else None)
    store.put_version(meta, bytes(chunk_map))
    store.set_latest(imi, version)
    if keep_boot is not None:
        await asyncio.to_thread(keep_boot, meta, path)
    record = VersionRecord(imi, version, size, CHUNK_SIZE, manifest_digest(chunk_map),
                           distinct_bytes(chunk_map, size), time.time(), False, master_url)
    await registry.publish(record)
    log.debug(kv(event="published", version=key, size=size, distinct_bytes=record.distinct_bytes,
                added=added, manifest=record.manifest))
    return Published(record, len(chunk_map) // DIGEST_SIZE, added, time.monotonic() - t0)
