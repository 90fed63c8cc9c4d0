"""The replica's HTTP(S) client of a master's API v1 (docs/replication.md, 'HTTP API').

One :class:`MasterClient` per master: an aiohttp session (created on first use, in the running
event loop) with a TLS context that verifies the master's certificate (the system's CAs, or
``ca`` alone when given) and optionally presents a client certificate; a bearer token, when
given, goes with every request. Credentials live in this object only, never in the store.

Errors are :class:`MasterError` subclasses, chosen by what a caller should do about them:

- :class:`MasterUnreachable`: connection refused or lost, timeout, a 5xx answer, a chunk stream
  cut short. Transient: back off and try again (the site is cut off meanwhile).
- :class:`MasterAuthError`: 401/403: this replica's token or certificate is refused.
- :class:`MasterTLSError`: the master's certificate is not trusted (wrong CA, wrong name) or the
  TLS handshake failed.
- :class:`MasterNotFound`: 404 (an unknown or retired version, no boot file).
- :class:`MasterProtocolError`: an answer that does not follow the API (bad JSON, a manifest
  whose digest does not match, a malformed chunk stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from icbdcache.replication.registry.base import VersionRecord
from icbdcache.replication.wire import (
    API,
    CONTENT_TYPE,
    ENCODING_HEADER,
    MASTER_ID_HEADER,
    MAX_CHUNK,
    SHA256_HEADER,
    SITE_HEADER,
    STRONG_HEADER,
    ChunkFrame,
    ChunkStreamDecoder,
    ChunkView,
    WireError,
    bad_name,
    encode_digests,
    manifest_digest,
)
from icbdcache.store.chunks import DIGEST_SIZE, STRONG_SIZE, chunk_count, strong_hex

#: Longest chunk map a replica takes, in bytes (4 TiB in 64 KiB chunks).
MAX_MANIFEST = 1 << 30
#: Longest JSON answer (catalog, site answer) a replica takes, in bytes.
MAX_JSON = 64 << 20
#: Longest kernel or initrd a replica takes, in bytes (each is held in memory once).
MAX_BOOT_FILE = 512 << 20


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def is_name_mismatch(e: BaseException) -> bool:
    """Whether a certificate error is a certificate that verifies but names another host
    (not a CA problem)."""
    return getattr(e, "verify_code", None) in _NAME_MISMATCH


class MasterError(Exception):
    """The master could not answer as asked (see the module docstring for the subclasses)."""


class MasterUnreachable(MasterError):
    """No answer now: refused, lost, timed out, 5xx, stream cut short. Try again later."""


class MasterAuthError(MasterError):
    """The master refused this replica's credentials (HTTP 401 or 403)."""


class MasterTLSError(MasterError):
    """The master's certificate could not be verified, or TLS failed."""


class MasterNotFound(MasterError):
    """HTTP 404: no such version (or it is retired), no such boot file."""


class MasterProtocolError(MasterError):
    """An answer that does not follow the API: bad JSON, bad manifest, bad chunk stream."""


@dataclass
class Catalog:
    """``GET /v1/catalog`` and ``/v1/watch``: the generation, every published version, and the
    id of the master's store (``""`` from a master that sends none)."""

    generation: int
    versions: list[VersionRecord] = field(default_factory=list)
    master_id: str = ""


@dataclass
class Manifest:
    """A version's chunk map as served: ``size`` and ``chunk_size`` in bytes, ``digest`` the
    hex xxh3-128 of ``chunk_map`` (checked on receipt), ``master_id`` the store that served it
    (``""`` when not said); its strong map and signed statement (checked by the caller against
    what it trusts, :mod:`icbdcache.replication.signing`)."""

    imi: str
    version: str
    size: int
    chunk_size: int
    digest: str
    chunk_map: bytes
    master_id: str = ""
    #: the strong map (STRONG_SIZE bytes per chunk index, checked against X-Icbd-Strong)
    strong_map: bytes = b""
    #: the signed statement (JSON text) and hex signature, None when unsigned
    statement: str | None = None
    signature: str | None = None


@dataclass
class TransferCounters:
    """Bytes this client moved, since it was made: ``wire_bytes`` of chunk-stream bodies as
    received (compressed when zstd), ``raw_bytes`` of frames after decompression,
    ``request_bytes`` of chunk-request bodies sent, ``requests`` chunk requests made,
    ``boot_bytes`` of boot files received, ``boot_reused`` boot files the master did not send
    because this site had their bytes (304)."""

    wire_bytes: int = 0
    raw_bytes: int = 0
    request_bytes: int = 0
    requests: int = 0
    boot_bytes: int = 0
    boot_reused: int = 0


def parse_compress(text: str) -> int | None:
    """``plain`` -> None, ``zstd`` -> 3, ``zstd:LEVEL`` -> LEVEL (1..19, the master's range).
    Raises ValueError."""
    t = text.strip().lower()
    if t in ("plain", "none", ""):
        return None
    name, _, level = t.partition(":")
    if name != "zstd":
        raise ValueError(f"--compress {text!r}: give plain, zstd or zstd:LEVEL")
    if not level:
        return 3
    if not level.isdigit() or not 1 <= int(level) <= 19:
        raise ValueError(f"--compress {text!r}: the zstd level is 1 to 19")
    return int(level)


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``resp``, but no more than ``limit`` bytes of it (the rest is not read)."""
    buf = bytearray()
    while len(buf) < limit:
        piece = await resp.content.read(min(limit - len(buf), 1 << 20))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def _version_record(d: Any) -> VersionRecord:
    if not isinstance(d, dict):
        raise MasterProtocolError(f"catalog entry is not an object: {d!r}")
    try:
        rec = VersionRecord(
            imi=str(d["imi"]), version=str(d["version"]), size=int(d["size"]),
            chunk_size=int(d["chunk_size"]), manifest=str(d["manifest"]).lower(),
            distinct_bytes=int(d.get("distinct_bytes", 0)),
            published=float(d.get("published", 0.0)), retired=bool(d.get("retired", False)),
            master=str(d.get("master", "") or ""))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MasterProtocolError(f"bad catalog entry {d!r}: {e}") from e
    # names become store keys and directories (STORE/boot/IMI@VERSION): '../..' must not
    bad = bad_name(rec.imi) or bad_name(rec.version)
    if bad is not None:
        raise MasterProtocolError(f"catalog entry {rec.key[:100]!r}: bad iMI or version "
                                  f"{bad}")
    return rec


def _catalog(body: Any) -> Catalog:
    if not isinstance(body, dict) or not isinstance(body.get("versions"), list):
        raise MasterProtocolError("catalog: not an object with a versions list")
    try:
        gen = int(body["generation"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MasterProtocolError(f"catalog: bad generation: {e}") from e
    return Catalog(gen, [_version_record(v) for v in body["versions"]],
                   _master_id(body.get("master_id")))


def _master_id(value: Any) -> str:
    """A master id as received: printable text of at most 64 characters, else ``""``."""
    if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
        return ""
    return value


class MasterClient:
    """Client of one master at ``url`` (``http://HOST:PORT`` or ``https://HOST:PORT``).

    ``ca``: PEM file of the CA(s) that sign the master's certificate (https only; default: the
    system's). ``cert``/``key``: PEM client certificate and key (TLS client authentication).
    ``token``: bearer token. ``zstd_level``: ask for zstd chunk streams at this level (None:
    plain). ``timeout``: seconds for a control request, and the longest pause inside a chunk
    stream. ``site``: the site this client runs for, named in every request
    (``X-Icbd-Site``: the master lets go of the site's earlier streams when it registers).
    Raises ValueError on a bad URL, OSError/ssl.SSLError when the TLS files cannot be loaded
    (checked here, at once).
    """

    def __init__(self, url: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, token: str | None = None,
                 zstd_level: int | None = None, timeout: float = 30.0,
                 connections: int = 16, site: str | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"master URL {url!r}: give http://HOST:PORT or https://HOST:PORT")
        if u.scheme == "http" and (ca or cert):
            raise ValueError(f"master URL {url!r}: --master-ca/--master-cert need https://")
        if bool(cert) != bool(key):
            raise ValueError("--master-cert and --master-key go together")
        self.url = url.rstrip("/")
        self.ca = ca
        self.token = token
        self.zstd_level = zstd_level
        self.timeout = timeout
        self.connections = connections
        self.site = site
        self.counters = TransferCounters()
        self.has_cert = bool(cert)
        self._ssl: ssl.SSLContext | None = None
        if u.scheme == "https":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert and key:
                ctx.load_cert_chain(cert, key)
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ plumbing

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "icbd-cache-replica"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            if self.site:
                headers[SITE_HEADER] = self.site
            conn = aiohttp.TCPConnector(limit=self.connections,
                                        ssl=self._ssl if self._ssl is not None else False)
            self._session = aiohttp.ClientSession(
                connector=conn, headers=headers, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 10.0),
                                              sock_read=self.timeout))
        return self._session

    def _stream_timeout(self) -> aiohttp.ClientTimeout:
        """Bodies of any length: no total, but connecting within 10 s and no pause longer
        than ``timeout`` s."""
        return aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout, 10.0),
                                     sock_read=self.timeout)

    async def close(self) -> None:
        """Close the session and its connections. The client may be used again after."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _error(self, e: BaseException, what: str) -> MasterError:
        if isinstance(e, MasterError):
            return e
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            if is_name_mismatch(e.certificate_error):
                return MasterTLSError(
                    f"{self.url}: the master's TLS certificate is not issued for "
                    f"{e.host} (its subjectAltName must list the host of --master): "
                    f"{e.certificate_error}")
            ca = f"--master-ca {self.ca}" if self.ca else "the system's CAs"
            return MasterTLSError(f"{self.url}: the master's TLS certificate is not trusted "
                                  f"by {ca}: {e.certificate_error}")
        if isinstance(e, aiohttp.ClientSSLError | ssl.SSLError):
            return MasterTLSError(f"{self.url}: TLS failed: {e}")
        if isinstance(e, TimeoutError):
            return MasterUnreachable(f"{self.url}: {what}: timed out")
        if isinstance(e, aiohttp.ClientError | OSError):
            return MasterUnreachable(f"{self.url}: {what}: {e or type(e).__name__}")
        return MasterError(f"{self.url}: {what}: {e}")

    async def _check(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status < 300:
            return
        if resp.status < 400:  # redirects are not followed (allow_redirects=False)
            raise MasterProtocolError(
                f"{self.url}: {what}: HTTP {resp.status}, a redirect (to "
                f"{resp.headers.get('Location', '?')[:200]!r}): not followed; give the "
                "master's own URL")
        try:
            text = (await resp.read())[:2000].decode(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError):
            text = ""
        try:
            msg = str(json.loads(text).get("error", text))
        except (ValueError, AttributeError, RecursionError):
            msg = text.strip() or resp.reason or ""
        # the master's words go into logs, the state record and reports: no control character
        msg = "".join(c if c.isprintable() else "?" for c in msg.strip())
        detail = f"{self.url}: {what}: HTTP {resp.status} {msg}".rstrip()
        if resp.status in (401, 403):
            hint = ("" if self.token or self.has_cert
                    else " (none given: --master-token-file, or --master-cert and --master-key)")
            raise MasterAuthError(f"{detail}: the master refused this replica's credentials"
                                  f"{hint}")
        if resp.status == 404:
            raise MasterNotFound(detail)
        if resp.status >= 500:
            raise MasterUnreachable(detail)
        raise MasterError(detail)

    async def _json(self, method: str, path: str, body: Any = None,
                    timeout: float | None = None) -> Any:
        what = f"{method} {path}"
        try:
            async with self._get_session().request(
                    method, self.url + path, json=body,
                    timeout=aiohttp.ClientTimeout(
                        total=timeout or self.timeout,
                        sock_connect=min(self.timeout, 10.0)),
                    allow_redirects=False) as resp:
                await self._check(resp, what)
                raw = await _read_at_most(resp, MAX_JSON + 1)
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            raise self._error(e, what) from e
        if len(raw) > MAX_JSON:
            raise MasterProtocolError(f"{self.url}: {what}: an answer of more than {MAX_JSON} "
                                      "bytes (not read further)")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise MasterProtocolError(f"{self.url}: {what}: not JSON: {e}") from e

    # ------------------------------------------------------------------ API

    async def catalog(self) -> Catalog:
        """``GET /v1/catalog``. Raises MasterError."""
        return _catalog(await self._json("GET", f"{API}/catalog"))

    async def watch(self, since: int, timeout: float = 30.0) -> Catalog:
        """``GET /v1/watch``: the catalog as soon as its generation passes ``since``, else after
        ``timeout`` seconds (clamped to 1..60). Raises MasterError."""
        t = max(1, min(60, int(timeout)))
        return _catalog(await self._json("GET", f"{API}/watch?since={since}&timeout={t}",
                                         timeout=t + self.timeout))

    async def register(self, site: str, address: str, subscribe: list[str]) -> dict[str, Any]:
        """``POST /v1/sites/SITE/register``: {"subscriptions", "interval", "generation",
        "master_id", "registered"}."""
        out = await self._json("POST", f"{API}/sites/{quote(site, safe='')}/register",
                               {"address": address, "subscribe": subscribe})
        return _site_answer(out)

    async def keepalive(self, site: str, report: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/sites/SITE/keepalive`` with ``report`` (address, state, error, pulling,
        behind_bytes, versions, clients). Returns {"subscriptions", "interval", "generation",
        "master_id", "registered"} (``registered`` False: the master did not know this site
        before, register again)."""
        out = await self._json("POST", f"{API}/sites/{quote(site, safe='')}/keepalive", report)
        return _site_answer(out)

    async def manifest(self, imi: str, version: str) -> Manifest:
        """``GET /v1/manifest/IMI/VERSION?strong=1``, then ``GET /v1/signature/IMI/VERSION``,
        checked: the body is a whole chunk map for X-Icbd-Size bytes that hashes to
        X-Icbd-Manifest, followed by its strong map, which hashes to X-Icbd-Strong (a master
        of an older release sends no strong map: ``strong_map`` is then empty). The
        signature is not verified here (:class:`~icbdcache.replication.signing.Trust` does).
        Raises MasterNotFound (unknown or retired), MasterProtocolError (a check failed), other
        MasterError."""
        m = await self._manifest(imi, version)
        m.statement, m.signature = await self.signature(imi, version)
        return m

    async def signature(self, imi: str, version: str) -> tuple[str | None, str | None]:
        """``GET /v1/signature/IMI/VERSION``: (statement text, hex signature), or (None,
        None) when the master has none (404). Raises MasterProtocolError on a bad answer,
        other MasterError."""
        path = f"{API}/signature/{quote(imi, safe='')}/{quote(version, safe='')}"
        try:
            body = await self._json("GET", path)
        except MasterNotFound:
            return None, None
        if not isinstance(body, dict) or not isinstance(body.get("statement"), str) \
                or not isinstance(body.get("signature"), str):
            raise MasterProtocolError(f"{self.url}: GET {path}: not a signed statement")
        return str(body["statement"]), str(body["signature"])

    async def _manifest(self, imi: str, version: str) -> Manifest:
        path = f"{API}/manifest/{quote(imi, safe='')}/{quote(version, safe='')}?strong=1"
        what = f"GET {path}"
        try:
            async with self._get_session().get(
                    self.url + path, timeout=self._stream_timeout(),
                    allow_redirects=False) as resp:
                await self._check(resp, what)
                h = resp.headers
                try:
                    size = int(h["X-Icbd-Size"])
                    chunk_size = int(h["X-Icbd-Chunk-Size"])
                    want = h["X-Icbd-Manifest"].strip().lower()
                    # absent: a master of an older release, without strong maps (only an
                    # insecure site takes its manifests, checked by xxh3 alone)
                    want_strong = h.get(STRONG_HEADER, "").strip().lower()
                    master_id = _master_id(h.get(MASTER_ID_HEADER, ""))
                except (KeyError, ValueError) as e:
                    raise MasterProtocolError(f"{self.url}: {what}: missing or bad header "
                                              f"{e}") from e
                # checked before the body is read: a chunk no frame can carry, an empty or
                # negative size (a 'complete' version of nothing), a map too big to hold
                if size < 1 or not 1 <= chunk_size <= MAX_CHUNK:
                    raise MasterProtocolError(
                        f"{self.url}: {what}: bad size {size} or chunk size {chunk_size} "
                        f"(at least 1 byte, in chunks of 1 to {MAX_CHUNK} bytes)")
                n = chunk_count(size, chunk_size)
                length = n * (DIGEST_SIZE + (STRONG_SIZE if want_strong else 0))
                if n * DIGEST_SIZE > MAX_MANIFEST:
                    raise MasterProtocolError(
                        f"{self.url}: {what}: a chunk map of {length} bytes for size {size} "
                        f"is more than this replica takes ({MAX_MANIFEST})")
                body = await _read_at_most(resp, length + 1)  # a byte more: too long?
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            raise self._error(e, what) from e
        if len(body) != length:
            got_n = f"more than {length}" if len(body) > length else str(len(body))
            raise MasterProtocolError(f"{self.url}: {what}: {got_n} bytes of chunk map and "
                                      f"strong map for size {size} in chunks of {chunk_size}")
        fast, strong = body[: n * DIGEST_SIZE], body[n * DIGEST_SIZE :]
        got = manifest_digest(fast)
        if got != want:
            raise MasterProtocolError(f"{self.url}: {what}: manifest digest {got} differs "
                                      f"from X-Icbd-Manifest {want}")
        if want_strong and strong_hex(strong) != want_strong:
            raise MasterProtocolError(f"{self.url}: {what}: the strong map does not hash to "
                                      f"X-Icbd-Strong {want_strong[:80]}")
        return Manifest(imi, version, size, chunk_size, got, fast, master_id, strong)

    async def boot_file(self, imi: str, version: str, kind: str,
                        have: Mapping[str, Path] | None = None,
                        expect: str | None = None) -> bytes | None:
        """``GET /v1/boot/IMI/VERSION/KIND`` (``kernel`` or ``initrd``): the bytes, or None
        when the master has none. ``have``: boot files this site keeps already, by sha256
        (hex); they are named in If-None-Match, and when the master answers 304 for one of
        them its bytes come from the local file (counted in ``boot_reused``, not sent).
        Bytes received are checked against the master's sha256 header, and against
        ``expect`` (the sha256 the version's signed statement gives) when given. Raises
        MasterProtocolError for a file over MAX_BOOT_FILE bytes (not read further), a
        mismatch, or a 304 for a file not offered; other MasterError."""
        path = f"{API}/boot/{quote(imi, safe='')}/{quote(version, safe='')}/{kind}"
        what = f"GET {path}"
        headers = {"If-None-Match": ", ".join(f'"{sha}"' for sha in have)} if have else {}
        try:
            async with self._get_session().get(
                    self.url + path, timeout=self._stream_timeout(), headers=headers,
                    allow_redirects=False) as resp:
                if resp.status == 404:
                    return None
                if resp.status == 304:
                    sha = resp.headers.get("ETag", "").strip('"')
                    local = (have or {}).get(sha)
                    if expect is not None and sha != expect:
                        raise MasterProtocolError(f"{self.url}: {what}: 304 for {sha[:80]!r}, "
                                                  f"not the signed sha256 {expect}")
                    if local is None:
                        raise MasterProtocolError(f"{self.url}: {what}: 304 for a file this "
                                                  "site did not offer")
                    self.counters.boot_reused += 1
                    return await asyncio.to_thread(local.read_bytes)
                await self._check(resp, what)
                if (resp.content_length or 0) > MAX_BOOT_FILE:
                    raise MasterProtocolError(f"{self.url}: {what}: a boot file of "
                                              f"{resp.content_length} bytes (at most "
                                              f"{MAX_BOOT_FILE})")
                data = await _read_at_most(resp, MAX_BOOT_FILE + 1)
                if len(data) > MAX_BOOT_FILE:
                    raise MasterProtocolError(f"{self.url}: {what}: a boot file of more "
                                              f"than {MAX_BOOT_FILE} bytes")
                want = resp.headers.get(SHA256_HEADER)
                got = hashlib.sha256(data).hexdigest()
                if want is not None and got != want.lower():
                    raise MasterProtocolError(f"{self.url}: {what}: the bytes received do not "
                                              f"match their sha256 {want[:80]!r}")
                if expect is not None and got != expect:
                    raise MasterProtocolError(f"{self.url}: {what}: the bytes received are not "
                                              f"the ones the signed manifest names ({expect})")
                self.counters.boot_bytes += len(data)
                return data
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            raise self._error(e, what) from e

    async def chunks(self, digests: list[bytes],
                     tally: TransferCounters | None = None) -> AsyncIterator[ChunkFrame]:
        """``POST /v1/chunks``: the frames of the chunks ``digests`` (at most
        wire.MAX_BATCH), in request order, as they arrive; ``data`` None for a chunk the master
        lacks. The stream must answer exactly ``digests``, in order (else
        MasterProtocolError), but the data is NOT verified: check each chunk's digest. Raises
        MasterUnreachable when the stream is cut short, MasterProtocolError when it is
        malformed, other MasterError. ``tally``: counters of this request alone (also added
        to :attr:`counters`)."""
        async for d, data in self._chunk_stream(digests, tally, views=False):
            assert not isinstance(data, memoryview)
            yield ChunkFrame(d, data)

    async def chunk_views(self, digests: list[bytes],
                          tally: TransferCounters | None = None) -> AsyncIterator[ChunkView]:
        """As :meth:`chunks`, but a chunk that arrived inside one piece of the body is a
        read-only view into that piece (not copied; the view keeps the piece alive): for a
        caller that hashes and stores the chunks and lets them go (the replica's pull)."""
        async for d, data in self._chunk_stream(digests, tally, views=True):
            yield ChunkView(d, data)

    async def _chunk_stream(self, digests: list[bytes], tally: TransferCounters | None,
                            views: bool
                            ) -> AsyncIterator[tuple[bytes, bytes | memoryview | None]]:
        body = encode_digests(digests)
        path = f"{API}/chunks" + (f"?zstd={self.zstd_level}" if self.zstd_level else "")
        what = f"POST {API}/chunks"
        tallies = [self.counters] if tally is None else [self.counters, tally]
        for c in tallies:
            c.requests += 1
            c.request_bytes += len(body)
        try:
            async with self._get_session().post(
                    self.url + path, data=body, headers={"Content-Type": CONTENT_TYPE},
                    timeout=self._stream_timeout(), allow_redirects=False) as resp:
                await self._check(resp, what)
                try:
                    dec = ChunkStreamDecoder(resp.headers.get(ENCODING_HEADER) or None,
                                             expect=digests, views=True)
                except WireError as e:
                    raise MasterProtocolError(f"{self.url}: {what}: {e}") from e
                # iter_chunks: each piece as the connection handed it over (iter_any joins
                # the pieces buffered meanwhile into one: a copy of most of the body)
                async for data, _ in resp.content.iter_chunks():
                    for c in tallies:
                        c.wire_bytes += len(data)
                    try:
                        frames = dec.feed_views(data)
                    except WireError as e:
                        raise MasterProtocolError(f"{self.url}: {what}: {e}") from e
                    for f in frames:
                        n = 20 + (len(f.data) if f.data is not None else 0)
                        for c in tallies:
                            c.raw_bytes += n
                        # without views, a chunk is bytes of its own: it outlives the piece
                        yield f.digest, (f.data if views or not isinstance(f.data, memoryview)
                                         else bytes(f.data))
                try:
                    dec.close()
                except WireError as e:
                    raise MasterUnreachable(f"{self.url}: {what}: {e}") from e
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as e:
            raise self._error(e, what) from e


def _site_answer(out: Any) -> dict[str, Any]:
    if not isinstance(out, dict):
        raise MasterProtocolError(f"site answer is not an object: {out!r}")
    subs = out.get("subscriptions", [])
    if not isinstance(subs, list):
        raise MasterProtocolError(f"subscriptions is not a list: {subs!r}")
    try:
        interval = float(out.get("interval", 10.0))
        generation = int(out.get("generation", 0))
    except (TypeError, ValueError, OverflowError) as e:
        raise MasterProtocolError(f"bad site answer {out!r}: {e}") from e
    return {"subscriptions": [str(s) for s in subs], "interval": max(0.2, interval),
            "generation": generation, "master_id": _master_id(out.get("master_id")),
            "registered": out.get("registered") is not False}


async def sleep_backoff(delay: float) -> float:
    """Sleep ``delay`` seconds; return the next delay (doubled, at most 10 s)."""
    await asyncio.sleep(delay)
    return min(delay * 2, 10.0)


__all__ = [
    "Catalog", "Manifest", "MasterAuthError", "MasterClient", "MasterError", "MasterNotFound",
    "MasterProtocolError", "MasterTLSError", "MasterUnreachable", "TransferCounters",
    "manifest_digest", "parse_compress",
]
