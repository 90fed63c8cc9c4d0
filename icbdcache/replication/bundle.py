"""Offline bundles: a version's signed manifest and chunks in one file, for a site with no link
to its master or a slow one (docs/replication.md, 'OFFLINE BUNDLES').

Layout (integers big-endian)::

    magic     8 bytes  b"ICBDBDL1"
    header    u32 length, then that many bytes of JSON: {"format": 1, "imi", "version",
              "size", "chunk_size" (bytes), "since" ("IMI@U" or null), "chunks" (frames),
              "chunk_bytes", "kernel", "initrd" (lengths in bytes, or null), "statement"
              (the signed statement's text, or null), "signature" (hex, or null), "created"}
    maps      the chunk map (16 bytes per chunk index), then the strong map (32 bytes each)
    boot      the kernel's bytes, then the initrd's (when the header gives their lengths)
    frames    per chunk: digest (16) | length (u32) | bytes; then the end frame: 16 zero
              bytes | length 0 (the chunk stream frames of :mod:`~icbdcache.replication.wire`)

Nothing in the header is trusted: the statement's signature is verified under the site's keys,
the statement must describe the maps (:func:`~icbdcache.replication.signing.check_maps`), the
boot files must have the sha256s it names, and every chunk must be one of the version's, with
its xxh3 digest, its BLAKE3-256 digest and its length. :func:`import_bundle` checks the whole
file before it writes anything, then reads it again to store it (checking every chunk again):
a tampered bundle imports nothing. A bundle made ``--since IMI@U`` holds only the chunks U
lacks; importing it needs the rest in the site's store already (else it is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from icbdcache.replication.signing import SignatureError, Trust, check_maps
from icbdcache.replication.wire import MAX_CHUNK, bad_name, manifest_digest
from icbdcache.store import BatchWriter, ChunkGet, Store, StoreError, VersionMeta, bootfiles
from icbdcache.store.chunks import (
    DIGEST_SIZE,
    STRONG_SIZE,
    STRONG_UNKNOWN,
    UNKNOWN,
    ZERO,
    chunk_count,
    digest,
    strong_digest,
)

MAGIC = b"ICBDBDL1"
FORMAT = 1
#: Longest header a reader takes (bytes): the statement is well under 1 KiB.
MAX_HEADER = 1 << 20
#: Largest boot file a bundle may carry (bytes).
MAX_BOOT = 512 << 20
#: Chunks read from the store in one read transaction while a bundle is made.
SLICE = 64

_U32 = struct.Struct(">I")
_FRAME = struct.Struct(">16sI")


class BundleError(Exception):
    """A bundle cannot be made (unknown version, chunks not held) or is refused at import
    (not a bundle, tampered with, not signed by a trusted key, incomplete); nothing was
    imported."""


@dataclass
class BundleInfo:
    """What a bundle holds: its version (``key``), the chunks and their bytes, the bytes of
    the whole file, and whether it is signed (``key_id`` of the signer, None if unsigned)."""

    key: str
    chunks: int
    chunk_bytes: int
    file_bytes: int
    key_id: str | None
    since: str | None = None


def _signer(statement: str | None) -> str | None:
    if not statement:
        return None
    try:
        value = json.loads(statement).get("key_id")
    except (ValueError, AttributeError):
        return None
    return str(value) if value is not None else None


def create(store: Store, key: str, out: str | os.PathLike[str],
           since: str | None = None) -> BundleInfo:
    """Write the bundle of version ``key`` of ``store`` to ``out`` (through a temporary file
    beside it, renamed at the end): every distinct non-zero chunk of it, or with ``since``
    (another version of the store) only those that version lacks. Raises BundleError (unknown
    version, no strong map, chunks not held), OSError."""
    meta = store.version(key)
    if meta is None:
        raise BundleError(f"no version {key} in {store.path}")
    key = meta.key
    strong = store.strong_map(key)
    if strong is None:
        raise BundleError(f"{key} has no strong map (icbd-cache store upgrade, or publish "
                          "it again)")
    chunk_map = bytes(store.chunk_map(key))
    digests = list(dict.fromkeys(chunk_map[i : i + DIGEST_SIZE]
                                 for i in range(0, len(chunk_map), DIGEST_SIZE)))
    digests = [d for d in digests if d not in (ZERO, UNKNOWN)]
    since_key = None
    if since is not None:
        base = store.version(since)
        if base is None:
            raise BundleError(f"no version {since} in {store.path} (--since)")
        since_key = base.key
        have = bytes(store.chunk_map(since_key))
        held = {have[i : i + DIGEST_SIZE] for i in range(0, len(have), DIGEST_SIZE)}
        digests = [d for d in digests if d not in held]
    lengths = store.chunk_lengths(digests)
    lacking = sum(1 for n in lengths if n is None)
    if lacking:
        raise BundleError(f"{store.path} lacks {lacking} chunks of {key}: a bundle is made "
                          "from a store that holds the version whole (the master's)")
    kept = bootfiles.kept(store, meta)
    boot = [kept.kernel, kept.initrd] if kept is not None else []
    total = sum(n for n in lengths if n is not None)
    header = {"format": FORMAT, "imi": meta.imi, "version": meta.version, "size": meta.size,
              "chunk_size": meta.chunk_size, "since": since_key, "chunks": len(digests),
              "chunk_bytes": total,
              "kernel": boot[0].stat().st_size if boot else None,
              "initrd": boot[1].stat().st_size if boot else None,
              "statement": meta.statement, "signature": meta.signature,
              "created": round(time.time(), 3)}
    raw = json.dumps(header, sort_keys=True).encode()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _U32.pack(len(raw)) + raw + chunk_map + strong)
            for path in boot:
                with open(path, "rb") as src:
                    while block := src.read(1 << 20):
                        f.write(block)
            for i in range(0, len(digests), SLICE):
                part = digests[i : i + SLICE]

                def frames(get: ChunkGet, part: list[bytes] = part) -> bytes:
                    pieces = []
                    for d in part:
                        buf = get(d)
                        if buf is None:
                            raise BundleError(f"chunk {d.hex()} of {key} went from the store "
                                              "while the bundle was made")
                        pieces.append(_FRAME.pack(d, len(buf)) + bytes(buf))
                    return b"".join(pieces)

                f.write(store.with_chunks(frames))
            f.write(_FRAME.pack(ZERO, 0))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BundleInfo(key, len(digests), total, out.stat().st_size, _signer(meta.statement),
                      since_key)


# ---------------------------------------------------------------------------- reading


@dataclass
class _Bundle:
    header: dict[str, Any]
    imi: str
    version: str
    size: int
    chunk_size: int
    chunk_map: bytes
    strong_map: bytes
    kernel: bytes | None
    initrd: bytes | None

    @property
    def key(self) -> str:
        return f"{self.imi}@{self.version}"


def _exact(f: IO[bytes], n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise BundleError(f"the bundle ends inside its {what} (cut short?)")
    return data


def _read_head(f: IO[bytes]) -> _Bundle:
    """The header, maps and boot files of an open bundle (the file positioned at its
    frames). Raises BundleError."""
    if f.read(len(MAGIC)) != MAGIC:
        raise BundleError("not an icbd-cache bundle (bad magic)")
    (n,) = _U32.unpack(_exact(f, 4, "header"))
    if n > MAX_HEADER:
        raise BundleError(f"a header of {n} bytes (at most {MAX_HEADER})")
    try:
        h = json.loads(_exact(f, n, "header"))
        imi, version = str(h["imi"]), str(h["version"])
        size, chunk_size = int(h["size"]), int(h["chunk_size"])
        lens = [h.get("kernel"), h.get("initrd")]
        if h.get("format") != FORMAT:
            raise BundleError(f"bundle format {h.get('format')!r} (this release reads "
                              f"{FORMAT})")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise BundleError(f"bad bundle header: {e}") from e
    bad = bad_name(imi) or bad_name(version)
    if bad is not None:
        raise BundleError(f"bad version name in the bundle: {bad}")
    if size < 1 or not 1 <= chunk_size <= MAX_CHUNK or size > 1 << 50:
        raise BundleError(f"bad size {size} or chunk size {chunk_size}")
    chunks = chunk_count(size, chunk_size)
    chunk_map = _exact(f, chunks * DIGEST_SIZE, "chunk map")
    strong_map = _exact(f, chunks * STRONG_SIZE, "strong map")
    boot: list[bytes | None] = []
    for n_boot in lens:
        if n_boot is None:
            boot.append(None)
            continue
        if not isinstance(n_boot, int) or not 0 <= n_boot <= MAX_BOOT:
            raise BundleError(f"a boot file of {n_boot!r} bytes")
        boot.append(_exact(f, n_boot, "boot files"))
    return _Bundle(h, imi, version, size, chunk_size, chunk_map, strong_map, boot[0], boot[1])


def _frames(f: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(digest, bytes) of each frame up to the end frame. Raises BundleError on a bad frame,
    a missing end frame or bytes after it."""
    while True:
        d, n = _FRAME.unpack(_exact(f, _FRAME.size, "chunk frames"))
        if d == ZERO and n == 0:
            if f.read(1):
                raise BundleError("bytes after the end frame")
            return
        if not 1 <= n <= MAX_CHUNK:
            raise BundleError(f"a frame of {n} bytes (1 to {MAX_CHUNK})")
        yield d, _exact(f, n, "chunk frames")


def _want(b: _Bundle) -> dict[bytes, tuple[bytes, int]]:
    """Digest -> (strong digest, length) of every non-zero chunk of the bundle's version.
    Raises BundleError if the maps disagree with themselves."""
    out: dict[bytes, tuple[bytes, int]] = {}
    for i in range(chunk_count(b.size, b.chunk_size)):
        d = b.chunk_map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        if d == ZERO:
            continue
        e = b.strong_map[i * STRONG_SIZE : (i + 1) * STRONG_SIZE]
        n = min(b.chunk_size, b.size - i * b.chunk_size)
        if d == UNKNOWN or e == STRONG_UNKNOWN or out.get(d, (e, n)) != (e, n):
            raise BundleError(f"the manifest of {b.key} is not whole (chunk {i})")
        out[d] = (e, n)
    return out


def _check_chunk(b: _Bundle, want: dict[bytes, tuple[bytes, int]], d: bytes,
                 data: bytes) -> None:
    w = want.get(d)
    if w is None:
        raise BundleError(f"chunk {d.hex()} is not one of {b.key}'s")
    if len(data) != w[1] or digest(data) != d or strong_digest(data) != w[0]:
        raise BundleError(f"chunk {d.hex()} of {b.key} does not match its digests "
                          "(tampered with)")


@dataclass
class Imported:
    """What :func:`import_bundle` did: the version (``key``), chunks in the bundle, bytes
    added to the store, and the signer's key id (None: unsigned, taken insecurely)."""

    key: str
    chunks: int
    added: int
    key_id: str | None
    already: bool = False


def verify(store: Store, path: str | os.PathLike[str], trust: Trust) -> tuple[_Bundle, int]:
    """Check the whole bundle at ``path`` for ``store`` without writing anything: (its head,
    the number of chunk frames). Raises BundleError naming what is wrong (a signature refused
    names the key id), OSError."""
    with open(path, "rb") as f:
        b = _read_head(f)
        st = None
        statement, signature = b.header.get("statement"), b.header.get("signature")
        if not trust.insecure or (statement and signature and trust.keys):
            try:
                st = trust.verify(b.key, statement if isinstance(statement, str) else None,
                                  signature if isinstance(signature, str) else None)
                check_maps(st, b.key, b.size, b.chunk_size, b.chunk_map, b.strong_map)
            except SignatureError as e:
                raise BundleError(str(e)) from e
        if st is not None:
            for what, data, sha in (("kernel", b.kernel, st.kernel),
                                    ("initrd", b.initrd, st.initrd)):
                got = hashlib.sha256(data).hexdigest() if data is not None else None
                if got != sha:
                    raise BundleError(f"the {what} in the bundle is not the one the signed "
                                      "manifest names (tampered with)")
        if (b.kernel is None) != (b.initrd is None):
            raise BundleError("a bundle with a kernel and no initrd, or the reverse")
        want = _want(b)
        seen: set[bytes] = set()
        for d, data in _frames(f):
            if d in seen:
                raise BundleError(f"chunk {d.hex()} twice in the bundle")
            _check_chunk(b, want, d, data)
            seen.add(d)
    lacking = [d for d in store.missing(want) if d not in seen]
    if lacking:
        since = b.header.get("since")
        raise BundleError(
            f"{len(lacking)} chunks of {b.key} are neither in the bundle nor in this store"
            + (f" (a bundle made --since {since}: import {since} first)" if since else ""))
    return b, len(seen)


def import_bundle(store: Store, path: str | os.PathLike[str], trust: Trust,
                  progress: Callable[[int], object] | None = None) -> Imported:
    """Import the bundle at ``path`` into ``store`` as a pull would leave its version:
    pinned, complete, the iMI's latest, its boot files kept. The whole bundle is checked
    first (:func:`verify`); then, its name reserved (docs/store.md, CONCURRENCY), it is read
    again and every chunk checked again as it is stored, and the version made in one
    transaction. Raises BundleError (nothing of the version is left: chunks already written
    are cache, evicted first), StoreError, OSError."""
    b, n = verify(store, path, trust)
    key = b.key
    signer = _signer(b.header.get("statement"))
    held = store.version(key)
    if held is not None:
        if bytes(store.chunk_map(key)) == b.chunk_map:
            return Imported(key, n, 0, signer, already=True)
        raise BundleError(f"this store holds another {key} (versions never change)")
    want = _want(b)
    version = store.reserve_version(b.imi, b.version, pinned=True)
    assert version == b.version
    made = False
    added0 = store.held
    writer = BatchWriter(store, protect=key)
    try:
        with open(path, "rb") as f:
            again = _read_head(f)
            if (again.chunk_map, again.strong_map, again.kernel, again.initrd) != \
                    (b.chunk_map, b.strong_map, b.kernel, b.initrd):
                raise BundleError("the bundle changed while it was imported")
            for d, data in _frames(f):
                _check_chunk(b, want, d, data)
                writer.put(d, data)
                if progress is not None:
                    progress(len(data))
        writer.close()
        if writer.errors:
            raise StoreError(f"{writer.errors} write batches to the store failed (see the log)")
        kernel = initrd = None
        if b.kernel is not None and b.initrd is not None:
            where = bootfiles.boot_root(store.path) / bootfiles.check_key(key)
            where.mkdir(parents=True, exist_ok=True)
            for name, data in ((bootfiles.KERNEL_NAME, b.kernel),
                               (bootfiles.INITRD_NAME, b.initrd)):
                tmp = where / f".{name}.tmp"
                tmp.write_bytes(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, where / name)
            kernel = bootfiles.stored_path(key, bootfiles.KERNEL_NAME)
            initrd = bootfiles.stored_path(key, bootfiles.INITRD_NAME)
        statement, signature = b.header.get("statement"), b.header.get("signature")
        meta = VersionMeta(b.imi, b.version, b.size, b.chunk_size, [], pinned=True,
                           created=time.time(), kernel=kernel, initrd=initrd,
                           manifest=manifest_digest(b.chunk_map),
                           statement=statement if isinstance(statement, str) else None,
                           signature=signature if isinstance(signature, str) else None)
        store.commit_version(meta, b.chunk_map, latest=True, copied=True, bound=store.bound,
                             strong_map=b.strong_map)
        made = True
    except BundleError:
        raise
    except (bootfiles.BootFilesError, ValueError) as e:
        raise BundleError(str(e)) from e
    finally:
        writer.close()
        if not made:
            store.abandon_version(key)
    return Imported(key, n, max(0, store.held - added0), signer)


__all__ = ["MAGIC", "BundleError", "BundleInfo", "Imported", "create", "import_bundle",
           "verify"]
