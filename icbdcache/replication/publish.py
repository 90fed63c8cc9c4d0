"""Publishing: a raw image file becomes a version of the master's store and of the registry
(docs/replication.md, 'Publishing').

The name is reserved in the store first (a pending version, docs/store.md 'CONCURRENCY': two
publishes of one name cannot both go on; without ``--version`` each gets its own number).
The file is read once, start to end. Its chunk map is built as ``import`` builds one
(:func:`icbdcache.store.digest` per 64 KiB chunk); its non-zero chunks are copied into the store
through the batched writer (all-zero chunks are never stored, so blocks trimmed before the
snapshot cost nothing), protected from eviction as they land; the version is made pinned and
the iMI's latest in one transaction that checks the store's bound can keep it; its kernel and
initrd are kept as ``import`` keeps them; only then is it recorded in the registry, which is
what makes it visible to replicas; the name stays reserved until then, so no other publish
takes it for an interrupted one and replaces it. If the registry refuses it (another master
published that name with another image), the version is taken out of the store again. A
published version never changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from icbdcache.log import kv
from icbdcache.replication.registry.base import Registry, VersionRecord
from icbdcache.replication.signing import make_statement
from icbdcache.replication.wire import manifest_digest
from icbdcache.store import (
    BatchWriter,
    Store,
    StoreError,
    VersionBusy,
    VersionExists,
    VersionInUse,
    VersionMeta,
    bootfiles,
    version_key,
)
from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE, distinct_chunks
from icbdcache.store.index import index_image

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def _read_into_store(store: Store, path: str, size: int, key: str,
                     progress: Callable[[int], object] | None
                     ) -> tuple[bytearray, bytearray, int]:
    """Index ``path`` into the store, its chunks protected by the pending version ``key``:
    (chunk map, strong map, bytes added to the store). Raises OSError, StoreFull as soon as
    the version cannot fit, PublishError when the file ends early or a write fails."""
    held_before = store.held
    fit = store.fit_check(key)
    writer = BatchWriter(store, protect=key)
    strong = bytearray()
    try:
        chunk_map = index_image(path, size, writer, progress=progress, label=key, check=fit,
                                strong=strong)
    except EOFError as e:
        raise PublishError(str(e)) from e
    finally:
        writer.close()
    if writer.errors:
        raise PublishError(f"{writer.errors} write batches to the store failed (see the log)")
    return chunk_map, strong, max(0, store.held - held_before)


def _withdraw(store: Store, stored: VersionMeta) -> None:
    """Take ``stored`` out of the store again (the registry did not take it), if the store
    still holds that instance of it."""
    cur = store.version(stored.key)
    if cur is not None and cur.instance == stored.instance:
        store.delete_version(stored.key)
        log.warning(kv(event="withdrawn", version=stored.key,
                       why="the registry did not take it"))


def sign_version(store: Store, key: str, signing_key: Ed25519PrivateKey) -> VersionMeta:
    """Sign version ``key`` of ``store`` (its chunk map, strong map and boot files as held)
    with ``signing_key`` and record the statement and signature with it; returns the version.
    Raises StoreError if it is unknown or has no strong map, OSError if a boot file cannot be
    read."""
    meta = store.version(key)
    strong = store.strong_map(key)
    if meta is None or strong is None:
        raise StoreError(f"{key}: no such version with a strong map (upgrade the store, or "
                         "publish it again)")
    chunk_map = bytes(store.chunk_map(key))
    kept = bootfiles.kept(store, meta)
    kernel_sha = bootfiles.file_sha256(kept.kernel) if kept is not None else None
    initrd_sha = bootfiles.file_sha256(kept.initrd) if kept is not None else None
    text, signature = make_statement(meta.imi, meta.version, meta.size, meta.chunk_size,
                                     chunk_map, strong, manifest_digest(chunk_map), kernel_sha,
                                     initrd_sha, signing_key)
    instance = meta.instance

    def change(m: VersionMeta) -> None:
        if m.instance != instance or m.strong != meta.strong:
            raise StoreError(f"{key} changed while being signed")
        m.statement, m.signature = text, signature

    return store.update_version(key, change)


async def publish(store: Store, registry: Registry, path: str, imi: str,
                  version: str | None = None, *, master_url: str = "",
                  kernel: str | None = None, initrd: str | None = None,
                  progress: Callable[[int], object] | None = None,
                  keep_boot: Callable[[VersionMeta, str], None] | None = None,
                  signing_key: Ed25519PrivateKey | None = None) -> Published:
    """Publish the raw image ``path`` as ``IMI@VERSION`` (``version`` None: the next number
    free in the store, its pending versions and the registry). ``signing_key``: sign its
    manifest (:func:`sign_version`, after its boot files are kept) before it is recorded in
    the registry.
    ``kernel``/``initrd``: boot files to keep with it (absolute paths recorded; copied by
    ``keep_boot(meta, image)``, which is also what extracts them from an ext4 image);
    ``progress(n)``: called with the bytes read after each chunk; ``master_url`` goes into the
    record. Raises PublishError if the version exists in the registry or is being published
    by another process, the file is empty or ends early; StoreFull if the store's bound cannot
    keep it; OSError if it cannot be read; RegistryError/StoreError from the backends (nothing
    is left in the store then).

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
    published = {r.version for r in await registry.versions(imi)}
    if version is not None and version in published:
        raise PublishError(f"{version_key(imi, version)} is already published (a published "
                           "version never changes; publish a new version)")
    # unpublished in the store (a publish interrupted before its last step): replaced
    replace = version is not None and store.version(version_key(imi, version)) is not None
    try:
        version = store.reserve_version(imi, version, pinned=True, force=replace,
                                        taken=tuple(published))
    except (VersionExists, VersionBusy, VersionInUse) as e:
        raise PublishError(str(e)) from e
    key = version_key(imi, version)
    try:
        # the name is ours now; a publish that held it before (a pending record is kept until
        # its registry record is written) may have recorded it meanwhile
        if version in {r.version for r in await registry.versions(imi)}:
            raise PublishError(f"{key} is already published (a published version never "
                               "changes; publish a new version)")
        chunk_map, strong, added = await asyncio.to_thread(_read_into_store, store, path, size,
                                                           key, progress)
        meta = VersionMeta(imi, version, size, CHUNK_SIZE, [], pinned=True,
                           created=time.time(),
                           kernel=os.path.abspath(kernel) if kernel else None,
                           initrd=os.path.abspath(initrd) if initrd else None,
                           manifest=manifest_digest(chunk_map))
        stored = store.commit_version(meta, bytes(chunk_map), latest=True, force=replace,
                                      copied=True, bound=store.bound,
                                      strong_map=bytes(strong), hold=True)
        try:
            if keep_boot is not None:
                await asyncio.to_thread(keep_boot, stored, path)
            if signing_key is not None:
                stored = await asyncio.to_thread(sign_version, store, key, signing_key)
            record = VersionRecord(imi, version, size, CHUNK_SIZE, manifest_digest(chunk_map),
                                   distinct_bytes(chunk_map, size), time.time(), False,
                                   master_url)
            await registry.publish(record)
        except BaseException:
            _withdraw(store, stored)
            raise
    finally:
        # after the registry step: until then no other publish takes the version for an
        # interrupted one (docs/store.md 'CONCURRENCY')
        store.abandon_version(key)
    log.debug(kv(event="published", version=key, size=size, distinct_bytes=record.distinct_bytes,
                added=added, manifest=record.manifest))
    return Published(record, len(chunk_map) // DIGEST_SIZE, added, time.monotonic() - t0)
