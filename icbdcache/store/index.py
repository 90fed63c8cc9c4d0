"""Indexing a raw image: one pass over the file that builds its chunk map and queues its
non-zero chunks for the store (``icbd-cache import --copy`` and ``icbd-cache publish``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from icbdcache.log import kv
from icbdcache.store.chunks import CHUNK_SIZE, STRONG_ZERO, ZERO, digest, strong_digest
from icbdcache.store.writer import BatchWriter

log = logging.getLogger("icbdcache.store")


def index_image(path: str, size: int, writer: BatchWriter | None, *,
                progress: Callable[[int], object] | None = None,
                label: str = "", check: Callable[[bytes, int], object] | None = None,
                strong: bytearray | None = None) -> bytearray:
    """Read the raw image ``path`` (``size`` bytes) once, start to end, CHUNK_SIZE bytes at a
    time, and return its chunk map (DIGEST_SIZE bytes per chunk, ZERO for all-zero chunks);
    each non-zero chunk is queued in ``writer`` when one is given, after ``check(digest,
    length)`` (which may raise to stop: the store's fit check). ``progress(n)`` is called
    with the bytes of each chunk read; without it a log line says how far ``label`` is every
    10 s. ``strong``: when given, the image's strong map is appended to it (STRONG_SIZE bytes
    per chunk: BLAKE3-256, STRONG_ZERO for all-zero chunks). Raises OSError, what ``check``
    raises, or EOFError when the file ends before ``size`` bytes (it changed while being
    read: index a read-only snapshot)."""
    chunk_map = bytearray()
    last_log = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < size:
            data = f.read(min(CHUNK_SIZE, size - pos))
            if not data:
                raise EOFError(f"{path} ended at {pos} of {size} bytes (changed while read? "
                               "use a read-only snapshot)")
            d = digest(data)
            chunk_map += d
            if strong is not None:
                strong += strong_digest(data) if d != ZERO else STRONG_ZERO
            if d != ZERO:
                if check is not None:
                    check(d, len(data))
                if writer is not None:
                    writer.put(d, data)
            pos += len(data)
            if progress is not None:
                progress(len(data))
            elif time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info(kv(indexing=label or path, done=f"{100 * pos // max(size, 1)}%"))
    return chunk_map


#: The sector size NBD clients and kernels read in (bytes).
SECTOR = 512


def sector_note(size: int) -> str | None:
    """Why an image of ``size`` bytes may surprise a client (its size is not a multiple of
    512 bytes: a kernel's NBD device ends at the last whole sector, so the tail cannot be
    read through it), or None."""
    if size % SECTOR == 0:
        return None
    return (f"{size} bytes is not a multiple of {SECTOR}: a kernel's NBD device ends at "
            f"{size - size % SECTOR} bytes and cannot read the last {size % SECTOR}")
