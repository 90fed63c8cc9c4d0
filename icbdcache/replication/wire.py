"""The replication wire format, sans-IO: bytes in, frames out (docs/replication.md, 'Wire').

Control messages are JSON over HTTP; two bodies are binary:

* **manifest** (``GET /v1/manifest/IMI/VERSION``): a version's chunk map, 16 bytes per chunk
  index (xxh3-128 digests, :data:`~icbdcache.store.chunks.ZERO` for all-zero chunks). Its
  xxh3-128 (hex) is the version's ``manifest`` field in the catalog, so a replica can check it.
  With ``?strong=1`` the strong map follows the chunk map (32 bytes per chunk index: the
  BLAKE3-256 of each chunk); ``GET /v1/signature/IMI/VERSION`` is the signed statement that
  binds both (:mod:`icbdcache.replication.signing`).
* **chunk stream** (``POST /v1/chunks``, request body: up to :data:`MAX_BATCH` digests
  concatenated): one frame per digest asked for, in order, then an end frame::

      frame := digest (16 bytes) | length (u32, big-endian) | data (length bytes)
      length = MISSING (0xFFFFFFFF): the sender does not hold that chunk (no data follows)
      end   := ZERO digest | length 0

  With ``X-Icbd-Encoding: zstd`` the whole frame sequence is one zstd stream (one compressor
  context per response), flushed at frame boundaries so a receiver decodes as bytes arrive.
  A stream without its end frame was cut short.

The receiver checks every chunk against its digest before it keeps it (the store does too):
:class:`ChunkStreamDecoder` reports frames; it does not trust them.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE, ZERO, map_digest

#: Path prefix of every endpoint of the replication API.
API = "/v1"
#: Most digests one chunk request may ask for (64 KiB of request body).
MAX_BATCH = 4096
#: Largest chunk a frame may carry, in bytes.
MAX_CHUNK = 4 * CHUNK_SIZE
#: Bytes a zstd chunk stream is decompressed by, at most, before its frames are checked.
ZSTD_PIECE = 1 << 17
#: Length value of a frame whose chunk the sender does not hold.
MISSING = 0xFFFFFFFF
#: Header naming the encoding of a chunk stream (``zstd``; absent: plain).
ENCODING_HEADER = "X-Icbd-Encoding"
#: Content type of chunk streams and manifests.
CONTENT_TYPE = "application/x-icbd-chunks"

#: Longest site, iMI or version name, in UTF-8 bytes (registry and store keys hold names, and
#: an LMDB key is at most 511 bytes).
MAX_NAME = 200

_HEAD = struct.Struct(">16sI")


def bad_name(name: str) -> str | None:
    """Why ``name`` cannot be a site, iMI or version name, or None. Names become paths of the
    API, registry and store keys and directories (``STORE/boot/IMI@VERSION``): no ``@``,
    ``/``, ``?``, whitespace or control character, at most MAX_NAME bytes."""
    if not name:
        return "empty name"
    shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return f"name {shown} is longer than {MAX_NAME} bytes"
    if any(c in "@/?" or c.isspace() or not c.isprintable() for c in name):
        return f"name {shown} may not contain '@', '/', '?', whitespace or control characters"
    return None


#: Response header of a boot file: the sha256 (hex) of its bytes, also its ETag; a replica
#: names the boot files it already has in If-None-Match and gets 304 for one of them.
SHA256_HEADER = "X-Icbd-Sha256"
#: Request header naming the site a replica runs for (its chunk streams are let go when that
#: site registers again; with tokens that name sites, the token says it instead).
SITE_HEADER = "X-Icbd-Site"


def etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header value, without quotes or ``W/``
    (RFC 9110, 'If-None-Match')."""
    out = set()
    for part in header.split(","):
        tag = part.strip().removeprefix("W/").strip('"')
        if tag:
            out.add(tag)
    return out


#: Header of a manifest answer naming the master's store (its ``master_id``).
MASTER_ID_HEADER = "X-Icbd-Master-Id"
#: Header of a manifest answer with ``?strong=1``: the hex BLAKE3-256 of its strong map.
STRONG_HEADER = "X-Icbd-Strong"

#: A version's ``manifest``: the xxh3-128 of its whole chunk map (the body of
#: ``GET /v1/manifest``), 32 lower-case hex digits (the store's own definition).
manifest_digest = map_digest


class WireError(Exception):
    """A body that does not follow the wire format (bad length, cut short, bad zstd)."""


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """One frame of a chunk stream: ``data`` is None when the sender lacks the chunk."""

    digest: bytes
    data: bytes | None


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A frame of a chunk stream as :meth:`ChunkStreamDecoder.feed_views` gives it: ``data``
    is a read-only view into the bytes received when the chunk lies inside one piece of
    them (not copied: the view keeps that piece alive), bytes when it spans pieces (joined
    once), None when the sender lacks the chunk."""

    digest: bytes
    data: bytes | memoryview | None


def encode_digests(digests: list[bytes]) -> bytes:
    """The body of a chunk request. Raises WireError on more than MAX_BATCH digests or a
    digest that is not 16 bytes."""
    if len(digests) > MAX_BATCH:
        raise WireError(f"{len(digests)} digests in one request (at most {MAX_BATCH})")
    if any(len(d) != DIGEST_SIZE for d in digests):
        raise WireError("a digest is not 16 bytes")
    return b"".join(digests)


def parse_digests(body: bytes) -> list[bytes]:
    """The digests of a chunk request body. Raises WireError if the body is not a whole
    number of 16-byte digests, is empty, or asks for more than MAX_BATCH."""
    if not body or len(body) % DIGEST_SIZE:
        raise WireError(f"request body of {len(body)} bytes is not a list of 16-byte digests")
    n = len(body) // DIGEST_SIZE
    if n > MAX_BATCH:
        raise WireError(f"{n} digests in one request (at most {MAX_BATCH})")
    return [body[i : i + DIGEST_SIZE] for i in range(0, len(body), DIGEST_SIZE)]


#: Bytes of a frame header (digest and length), and so of a MISSING frame and the end frame.
HEADER_SIZE = _HEAD.size


def frame_header(digest: bytes, length: int | None) -> bytes:
    """The header of a frame carrying ``length`` bytes of chunk ``digest`` (None: MISSING)."""
    return _HEAD.pack(digest, MISSING if length is None else length)


def plain_stream_size(lengths: list[int | None]) -> int:
    """Bytes of a whole plain chunk stream whose frames carry ``lengths`` (None: MISSING),
    end frame included: its Content-Length."""
    return sum(HEADER_SIZE + (n or 0) for n in lengths) + HEADER_SIZE


class ChunkStreamEncoder:
    """Sender side of a chunk stream. ``level``: zstd level, or None for a plain stream.
    Each method returns the bytes to send next (possibly empty while zstd buffers)."""

    def __init__(self, level: int | None = None) -> None:
        self._z = (zstandard.ZstdCompressor(level=level).compressobj()
                   if level is not None else None)
        self.plain = level is None
        self.raw_bytes = 0  # frame bytes before compression

    def _out(self, raw: bytes, flush: bool) -> bytes:
        self.raw_bytes += len(raw)
        if self._z is None:
            return raw
        out = self._z.compress(raw)
        if flush:
            out += self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return out

    def frame(self, digest: bytes, data: bytes | memoryview | None, *,
              flush: bool = True) -> bytes:
        """A frame for ``digest``: its ``data``, or MISSING when None. ``flush``: end a zstd
        block here (set False to let several frames share one block)."""
        if data is None:
            return self._out(_HEAD.pack(digest, MISSING), flush)
        return self._out(_HEAD.pack(digest, len(data)) + data, flush)

    def end(self) -> bytes:
        """The end frame (and the end of the zstd stream)."""
        out = self._out(_HEAD.pack(ZERO, 0), False)
        if self._z is not None:
            out += self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        return out


class _Sink:
    """The output of a zstd stream writer, handed to a function as it is decompressed."""

    def __init__(self, fn: Callable[[bytes], None]) -> None:
        self._fn = fn

    def write(self, data: bytes) -> int:
        self._fn(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class ChunkStreamDecoder:
    """Receiver side of a chunk stream. ``encoding``: None or ``"zstd"`` (the
    ENCODING_HEADER value). ``expect``: the digests asked for; then the stream must answer
    exactly those, in order (a frame for another digest, a frame too many or an end frame too
    early is an error: a sender cannot push chunks nobody asked for, nor stream forever).
    Feed it bytes as they arrive; it returns whole frames (:meth:`feed`: each chunk as bytes
    of its own; with ``views``, :meth:`feed_views`: a chunk inside one piece received is a
    view into it, not a copy). Raises WireError on an unknown encoding, bad zstd data, a frame
    longer than MAX_CHUNK, bytes after the end frame, or a frame ``expect`` does not allow."""

    def __init__(self, encoding: str | None = None,
                 expect: Sequence[bytes] | None = None, *, views: bool = False) -> None:
        if encoding not in (None, "", "plain", "zstd"):
            raise WireError(f"unknown chunk stream encoding {encoding!r}")
        # zstd: decompressed ZSTD_PIECE bytes at a time into _parse (a stream writer), so a
        # few bytes that expand to gigabytes are looked at, and refused, piece by piece
        self._z = (zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], _Sink(self._parse)), write_size=ZSTD_PIECE, write_return_read=True)
            if encoding == "zstd" else None)
        #: whole frames not yet returned: (digest, data), data None for MISSING
        self._frames: list[tuple[bytes, bytes | memoryview | None]] = []
        self._views = views
        #: bytes received and not yet taken into frames: whole pieces as received (the
        #: first from ``_off`` on), ``_held`` bytes in all
        self._pieces: deque[bytes] = deque()
        self._off = 0
        self._held = 0
        #: the header of the frame whose data is awaited (digest, length), or None
        self._head: tuple[bytes, int] | None = None
        self._expect = expect
        self._n = 0  # frames seen
        self.finished = False
        self.wire_bytes = 0  # bytes fed, as received

    def _check(self, d: bytes) -> None:
        """Count a frame for ``d``; raise WireError unless it is the next one asked for."""
        want = self._expect
        if want is not None:
            if self._n >= len(want):
                raise WireError(f"frame {self._n + 1} for {d.hex()}: only {len(want)} "
                                "digests were asked for")
            if d != want[self._n]:
                raise WireError(f"frame {self._n + 1} is for {d.hex()}, not the digest asked "
                                f"for ({want[self._n].hex()})")
        self._n += 1

    def feed(self, data: bytes) -> list[ChunkFrame]:
        """The frames completed by ``data``, each chunk bytes of its own (a decoder made
        without ``views``). Raises WireError."""
        if self._views:
            raise TypeError("a decoder made with views=True gives its frames by feed_views")
        out: list[ChunkFrame] = []
        for d, v in self._feed(data):
            assert not isinstance(v, memoryview)  # views=False: _take_data copies
            out.append(ChunkFrame(d, v))
        return out

    def feed_views(self, data: bytes) -> list[ChunkView]:
        """The frames completed by ``data`` (a decoder made with ``views``): a chunk inside
        one piece received is a view into that piece. Raises WireError."""
        if not self._views:
            raise TypeError("feed_views needs a decoder made with views=True")
        return [ChunkView(d, v) for d, v in self._feed(data)]

    def _feed(self, data: bytes) -> list[tuple[bytes, bytes | memoryview | None]]:
        self.wire_bytes += len(data)
        if self._z is not None:
            try:
                self._z.write(data)
            except zstandard.ZstdError as e:
                raise WireError(f"bad zstd data in chunk stream: {e}") from e
        else:
            self._parse(data)
        frames, self._frames = self._frames, []
        return frames

    def _take_data(self, n: int) -> bytes | memoryview:
        """The next ``n`` bytes, a chunk's: with ``views``, a view into the first piece when
        they lie inside it (no copy), else as :meth:`_take`."""
        if self._views:
            first = self._pieces[0]
            off = self._off
            if len(first) - off >= n:
                self._held -= n
                if len(first) - off == n:
                    self._pieces.popleft()
                    self._off = 0
                else:
                    self._off = off + n
                return memoryview(first)[off : off + n]  # bytes: a read-only view
        return self._take(n)

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes of the pieces held (at least ``n`` are): a piece itself when
        it is exactly those bytes, else one copy (a slice of one piece, or the slices of
        several joined once)."""
        pieces = self._pieces
        first = pieces[0]
        off = self._off
        left = len(first) - off
        self._held -= n
        if left > n:
            self._off = off + n
            return bytes(memoryview(first)[off : off + n])
        if left == n:
            pieces.popleft()
            self._off = 0
            return first if off == 0 and type(first) is bytes else bytes(memoryview(first)[off:])
        parts: list[bytes | memoryview] = [memoryview(first)[off:] if off else first]
        pieces.popleft()
        self._off = 0
        need = n - left
        while need:
            nxt = pieces[0]
            if len(nxt) <= need:
                parts.append(nxt)
                pieces.popleft()
                need -= len(nxt)
            else:
                parts.append(memoryview(nxt)[:need])
                self._off = need
                need = 0
        return b"".join(parts)

    def _parse(self, data: bytes) -> None:
        """Add the whole frames of the bytes received so far to ``_frames``. Each chunk is
        copied at most once, from the pieces received into its frame (a chunk that is a whole
        piece is not copied at all); the pieces of an unfinished frame are kept, not copied,
        until it is complete."""
        if self.finished:
            if data:
                raise WireError("bytes after the end frame")
            return
        if data:
            self._pieces.append(data)
            self._held += len(data)
        frames = self._frames
        head = _HEAD.size
        while True:
            if self._head is None:
                if self._held < head:
                    return
                digest, length = _HEAD.unpack(self._take(head))
                if length == MISSING:
                    self._check(digest)
                    frames.append((digest, None))
                    continue
                if digest == ZERO and length == 0:
                    self.finished = True
                    if self._held:
                        raise WireError("bytes after the end frame")
                    if self._expect is not None and self._n != len(self._expect):
                        raise WireError(f"end frame after {self._n} frames of the "
                                        f"{len(self._expect)} digests asked for")
                    return
                if length > MAX_CHUNK or length == 0:
                    raise WireError(f"frame of {length} bytes (1 to {MAX_CHUNK} allowed)")
                self._check(digest)
                self._head = (digest, length)
            digest, length = self._head
            if self._held < length:
                return
            self._head = None
            frames.append((digest, self._take_data(length)))

    def close(self) -> None:
        """The body ended. Raises WireError if the end frame was not seen."""
        if not self.finished:
            raise WireError("chunk stream cut short (no end frame)")
