"""Chunks and their digests: the store's unit, addressed by content.

A chunk is a fixed-size piece of an iMI version (``CHUNK_SIZE`` bytes; the last chunk of an
image may be shorter). Its key is the xxh3-128 digest of its bytes, 16 bytes big-endian as
xxhash returns them (``xxh3_128_digest``). All-zero chunks are never stored: a chunk map marks
them with :data:`ZERO`, and a map entry not known yet is :data:`UNKNOWN`.

xxh3 is a fast cache key, not a defence: anyone can make two chunks with one xxh3 digest. So
each version also has a **strong map** beside its chunk map: per chunk index the BLAKE3-256
digest of the chunk (:func:`strong_digest`, :data:`STRONG_SIZE` bytes; :data:`STRONG_ZERO`
for an all-zero chunk, :data:`STRONG_UNKNOWN` where it is not known). Every chunk that enters
a store from anywhere but the admin's own ``import``/``publish`` is checked against it
(docs/replication.md, 'TRUST'). BLAKE3 was chosen by measurement: about 0.17 s per GiB of
64 KiB chunks on one core here, SHA-256 1.26 s, xxh3 0.02 s (``icbd-bench digests``).

A test hook, ``ICBD_TEST_FAST_DIGEST_PREFIX=N`` in the environment, makes the fast digest
hash only the first N bytes of a chunk, so that tests can forge chunks whose fast digest
collides (the strong check must refuse them). Never set it anywhere else.
"""

from __future__ import annotations

import os

import blake3
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

#: Length of a strong (BLAKE3-256) digest in bytes.
STRONG_SIZE = 32
#: Strong map entry of an all-zero chunk.
STRONG_ZERO = bytes(STRONG_SIZE)
#: Strong map entry not known (a version whose chunks were never described by a manifest).
STRONG_UNKNOWN = b"\xff" * STRONG_SIZE

_ZEROS = bytes(1 << 20)

#: Test hook (see the module docstring): bytes of a chunk the fast digest covers, or 0 (all).
_FAST_PREFIX = int(os.environ.get("ICBD_TEST_FAST_DIGEST_PREFIX", "0") or 0)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's key: xxh3-128 of its bytes, or :data:`ZERO` for an all-zero chunk."""
    if is_zero(data):
        return ZERO
    d = xxhash.xxh3_128_digest(data if not _FAST_PREFIX else memoryview(data)[:_FAST_PREFIX])
    return d if d not in (ZERO, UNKNOWN) else d[:-1] + bytes([d[-1] ^ 1])


def strong_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's strong digest: BLAKE3-256 of its bytes (:data:`STRONG_SIZE` bytes), or
    :data:`STRONG_ZERO` for an all-zero chunk. Releases the GIL on large inputs."""
    if is_zero(data):
        return STRONG_ZERO
    d: bytes = blake3.blake3(data).digest()
    return d if d not in (STRONG_ZERO, STRONG_UNKNOWN) else d[:-1] + bytes([d[-1] ^ 1])


def strong_hex(data: bytes | bytearray | memoryview) -> str:
    """BLAKE3-256 of ``data`` (any length, a whole map too), 64 lower-case hex digits."""
    out: str = blake3.blake3(bytes(data)).hexdigest()
    return out


def strong_at(strong_map: bytes | bytearray | None, index: int) -> bytes:
    """Entry ``index`` of a strong map (STRONG_UNKNOWN when there is no map or no entry)."""
    if strong_map is None:
        return STRONG_UNKNOWN
    e = bytes(strong_map[index * STRONG_SIZE : (index + 1) * STRONG_SIZE])
    return e if len(e) == STRONG_SIZE else STRONG_UNKNOWN


def map_digest(chunk_map: bytes | bytearray) -> str:
    """A version's manifest digest: the xxh3-128 of its whole chunk map, 32 lower-case hex
    digits (what ``GET /v1/manifest`` serves and the registry records)."""
    return xxhash.xxh3_128_hexdigest(bytes(chunk_map))


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero: compared with memcmp (``bytes.startswith``) against 1 MiB
    of zeros a slice at a time, no allocation. (A memoryview comparison goes byte by byte:
    a chunk that starts with many zero bytes cost ~1 ns a byte that way.)"""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    n = len(view)
    step = len(_ZEROS)
    if n <= step:
        return _ZEROS.startswith(view)
    return all(_ZEROS.startswith(view[pos : pos + step]) for pos in range(0, n, step))


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
