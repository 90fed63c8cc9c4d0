"""Chunks and their digests: the store's unit, addressed by content.

A chunk is a fixed-size piece of an iMI version (``CHUNK_SIZE`` bytes; the last chunk of an
image may be shorter). Its key is the xxh3-128 digest of its bytes, 16 bytes big-endian as
xxhash returns them (``xxh3_128_digest``). All-zero chunks are never stored: a chunk map marks
them with :data:`ZERO`, and a map entry not known yet is :data:`UNKNOWN`.
"""

from __future__ import annotations

import xxhash

#: Default chunk size in bytes (see docs/store.md for the measurement behind it).
CHUNK_SIZE = 64 * 1024
#: Length of a digest in bytes.
DIGEST_SIZE = 16
#: Map entry of a chunk that is all zeros (never stored, never fetched).
ZERO = bytes(DIGEST_SIZE)
#: Map entry of a chunk whose digest is not known yet (a version faulted from a plain NBD
#: upstream learns its map as it reads).
UNKNOWN = b"\xff" * DIGEST_SIZE

_ZEROS = bytes(1 << 20)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's key: xxh3-128 of its bytes, or :data:`ZERO` for an all-zero chunk."""
    if is_zero(data):
        return ZERO
    d = xxhash.xxh3_128_digest(data)
    return d if d not in (ZERO, UNKNOWN) else d[:-1] + bytes([d[-1] ^ 1])


def map_digest(chunk_map: bytes | bytearray) -> str:
    """A version's manifest digest: the xxh3-128 of its whole chunk map, 32 lower-case hex
    digits (what ``GET /v1/manifest`` serves and the registry records)."""
    return xxhash.xxh3_128_hexdigest(bytes(chunk_map))


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero (compared in 1 MiB slices, no allocation per byte)."""
    view = memoryview(data)
    n = len(view)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        if view[pos : pos + k] != _ZEROS[:k]:
            return False
        pos += k
    return True


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Number of chunks of an image of ``size`` bytes."""
    return (size + chunk_size - 1) // chunk_size


def chunk_span(index: int, size: int, chunk_size: int = CHUNK_SIZE) -> tuple[int, int]:
    """(offset, length) in bytes of chunk ``index`` of an image of ``size`` bytes."""
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


def distinct_chunks(chunk_map: bytes | bytearray, size: int,
                    chunk_size: int = CHUNK_SIZE) -> dict[bytes, int]:
    """The distinct non-zero, known digests of a chunk map (DIGEST_SIZE bytes per index) of
    an image of ``size`` bytes -> the length in bytes of their chunk (the last may be
    short)."""
    out: dict[bytes, int] = {}
    for off in range(0, len(chunk_map), DIGEST_SIZE):
        d = bytes(chunk_map[off : off + DIGEST_SIZE])
        if d != ZERO and d != UNKNOWN and d not in out:
            out[d] = min(chunk_size, size - (off // DIGEST_SIZE) * chunk_size)
    return out
