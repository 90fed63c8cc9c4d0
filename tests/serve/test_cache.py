"""The cache end to end: a real ``icbd-cache serve --store`` process, real clients (nbdcopy,
the project's nbd.aio), real upstreams (nbdkit with its log filter, or a small in-process NBD
server that corrupts replies), and the store commands (import, stats, ls, verify, warm).

Every test asserts bytes and counts, never times: what the upstream served is measured from the
nbdkit log filter's ``Read`` lines, what the store holds from ``icbd-cache stats --json`` and
``icbd-cache ls --json``. Counters are flushed to the store every ~5 s and at shutdown, so tests
read them after stopping the server with SIGTERM.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BIN,
    Server,
    make_image,
    require,
    require_holes,
    sha256_file,
)
from readers import hash_outputs, nbdcopy_procs
from upstreams import Upstream

from nbd import aio
from nbd.constants import Cmd, Errno, TransmissionFlag
from nbd.errors import RemoteProtocolError, RequestError
from nbd.events import ExportInfo, Request
from nbd.server import ServerConnection

MiB = 1 << 20
CHUNK = 64 * 1024  # the store's chunk size
BATCH = 16 * MiB  # most bytes of one write batch of the store's writer
ServerFactory = Callable[..., Server]
ICBD = str(BIN / "icbd-cache")


# ------------------------------------------------------------------ images and their chunks


@dataclass(frozen=True)
class Image:
    """A raw test image, its sha256 and its 64 KiB chunks as the store sees them."""

    path: Path
    sha: str
    size: int
    #: Per chunk index: a key of the chunk's bytes, or None for an all-zero chunk.
    keys: tuple[bytes | None, ...]
    #: Length in bytes of each chunk (the last may be short).
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, path: Path) -> Image:
        keys: list[bytes | None] = []
        lengths: list[int] = []
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                zero = data.count(0) == len(data)
                keys.append(None if zero else hashlib.blake2b(data, digest_size=16).digest())
                lengths.append(len(data))
        return cls(path, sha256_file(path), os.path.getsize(path), tuple(keys), tuple(lengths))

    def distinct(self) -> dict[bytes, int]:
        """Distinct non-zero chunks: key -> length in bytes."""
        return {k: n for k, n in zip(self.keys, self.lengths, strict=True) if k is not None}

    @property
    def nonzero_bytes(self) -> int:
        """Bytes of the distinct non-zero chunks: what a cold cache fetches, once each."""
        return sum(self.distinct().values())

    def nonzero_bytes_of(self, indexes: set[int]) -> int:
        return sum(self.lengths[i] for i in indexes if self.keys[i] is not None)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def image(tmp: Path, name: str, size: int, seed: int) -> Image:
    return Image.of(make_image(tmp / name, size, seed=seed))



def chunks_of(ranges: Sequence[tuple[int, int]]) -> set[int]:
    """Chunk indexes covered by (offset, length) byte ranges."""
    return {i for off, n in ranges for i in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


@pytest.fixture(scope="module")
def img64(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """64 MiB less 1000 bytes: random data, every fourth MiB a hole (so the last chunk is
    short and all zeros)."""
    return image(tmp_path_factory.mktemp("img64"), "img64.img", 64 * MiB - 1000, seed=11)


@pytest.fixture(scope="module")
def img32(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """32 MiB and 12345 bytes: random data, every fourth MiB a hole (the last chunk is short,
    with data)."""
    return image(tmp_path_factory.mktemp("img32"), "img32.img", 32 * MiB + 12345, seed=12)


# ------------------------------------------------------------------ commands and clients


def run(cmd: Sequence[str], *, timeout: float = 60, ok: Sequence[int] = (0,),
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output unless its exit status is in ``ok``."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       check=False)
    assert p.returncode in ok, (
        f"{' '.join(cmd)} -> exit {p.returncode}\nstdout: {p.stdout[-3000:]}\n"
        f"stderr: {p.stderr[-3000:]}"
    )
    return p


def icbd(*args: str, ok: Sequence[int] = (0,), timeout: float = 60,
         ) -> subprocess.CompletedProcess[str]:
    return run([ICBD, *args], ok=ok, timeout=timeout)


def stats(store: Path) -> dict[str, int]:
    return dict(json.loads(icbd("stats", "--store", str(store), "--json").stdout))


def ls(store: Path) -> dict[str, dict[str, Any]]:
    """``icbd-cache ls --json`` by ``IMI@VERSION``."""
    rows = json.loads(icbd("ls", "--store", str(store), "--json").stdout)
    return {f"{r['imi']}@{r['version']}": r for r in rows}


def verify(store: Path) -> str:
    return icbd("verify", "--store", str(store)).stdout


def copies_match(uris: Sequence[str], img: Image) -> None:
    """Every ``nbdcopy`` of ``uris`` (run at once) reads exactly ``img``."""
    results = hash_outputs(nbdcopy_procs(uris))
    bad = [i for i, r in enumerate(results) if r != (img.sha, img.size)]
    assert not bad, f"copies {bad} differ from {img.path.name}"


def store_args(store: Path, *more: str) -> tuple[str, ...]:
    return ("--store", str(store), "--create-store", *more)


# ------------------------------------------------------------------ a corrupting upstream


class _Catalog:
    def __init__(self, info: ExportInfo) -> None:
        self.info = info

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info

    def exports(self) -> list[tuple[str, str]]:
        return [(self.info.name, self.info.description)]


class FlippingUpstream:
    """An NBD server (the project's sans-IO :class:`ServerConnection` on asyncio, in a thread)
    that serves ``data`` read-only, but flips one byte of the first reply for each offset.

    ``flipped``: replies corrupted; ``reads``: read requests answered.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.info = ExportInfo("", len(data),
                               TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)
        self.seen: set[int] = set()
        self.flipped = 0
        self.reads = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="flipping-upstream", daemon=True)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def __enter__(self) -> FlippingUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the flipping upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        writers: set[asyncio.StreamWriter] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                await self._serve(reader, writer)
            finally:
                writers.discard(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        async with server:
            await self._stop.wait()
            for w in list(writers):
                w.transport.abort()

    def _answer(self, conn: ServerConnection, req: Request) -> None:
        if req.command != Cmd.READ:
            conn.reply_error(req, Errno.EINVAL, "read-only test upstream")
            return
        data = bytearray(self.data[req.offset : req.offset + req.length])
        if req.offset not in self.seen:
            self.seen.add(req.offset)
            data[len(data) // 2] ^= 0x01
            self.flipped += 1
        self.reads += 1
        conn.reply_read(req, [bytes(data)])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(_Catalog(self.info))
        writer.writelines(conn.data_to_send())
        try:
            while not conn.closed:
                for ev in conn.receive_data(await reader.read(1 << 16)):
                    if isinstance(ev, Request):
                        self._answer(conn, ev)
                writer.writelines(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, RemoteProtocolError):
            pass
        finally:
            writer.close()


# ------------------------------------------------------------------ 1. single-flight cold fill


def test_fifteen_cold_readers_fetch_each_chunk_once(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img64: Image,
    tmp_path: Path,
) -> None:
    """15 nbdcopy readers of a version only upstream: all read the image, and the upstream
    served each distinct non-zero chunk exactly once (holes learned from block status)."""
    require("nbdcopy")
    require_holes(img64.path)
    up = upstream(img64.path)
    srv = server_factory(*store_args(tmp_path / "store", "--export", f"lab@1={up.uri}"))
    copies_match([srv.uri("lab@1")] * 15, img64)
    reads = up.reads()
    offsets = [o for o, _ in reads]
    assert len(offsets) == len(set(offsets)), "an offset was read from the upstream twice"
    assert sum(c for _, c in reads) == img64.nonzero_bytes
    assert srv.stop() == 0
    s = stats(tmp_path / "store")
    assert s[f"bytes_from:{up.uri}"] == img64.nonzero_bytes
    assert s["held_bytes"] == img64.nonzero_bytes
    assert s["chunks"] == len(img64.distinct())
    # Counters flushed at shutdown: one fault per chunk, however many readers missed it.
    assert s["faults"] == len(img64.distinct())
    # a fault is a reader's miss or a readahead (a miss right after a present chunk)
    assert s["misses"] + s.get("prefetched", 0) >= s["faults"] and s["hits"] > 0
    assert s.get("fault_errors", 0) == 0


def test_sequential_misses_fault_the_next_chunks_ahead(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    tmp_path: Path,
) -> None:
    """A first boot has no boot profile: a miss right after a present chunk (a reader going
    forward) faults the next ``--readahead`` chunks too, so they cross the WAN in one round
    trip; a lone miss (random access) faults only itself; ``--readahead 0`` turns it off."""
    up = upstream(img32.path)
    start = 16 * CHUNK  # MiB 1: data (MiB 0, 4, 8, ... are holes)
    far = 13 * MiB + 5 * CHUNK
    for ahead, store in ((4, tmp_path / "s4"), (0, tmp_path / "s0")):
        # one worker: each read below is a connection of its own, and which chunks were
        # read (the sequential signal) is each worker's (a connection's reads reach one)
        srv = server_factory(*store_args(store, "--export", f"lab@1={up.uri}",
                                         "--readahead", str(ahead), "--workers", "1"))
        before = len(up.reads())

        async def main(port: int = srv.port) -> None:
            # chunk 16 (a lone miss), then chunk 17: a sequential miss
            assert await _read(port, "lab@1", start, 4096) == img32.read(start, 4096)
            assert await _read(port, "lab@1", start + CHUNK, 4096) == img32.read(start + CHUNK,
                                                                                 4096)
            assert await _read(port, "lab@1", far, 4096) == img32.read(far, 4096)

        asyncio.run(main())
        assert srv.stop() == 0
        up.wait_idle()
        fetched = {o // CHUNK for o, _ in up.reads()[before:]}
        want = {16, 17, far // CHUNK} | set(range(18, 18 + ahead))
        assert fetched == want, (ahead, sorted(fetched))
        assert stats(store).get("prefetched", 0) == ahead
        assert verify(store).startswith("OK")


# ------------------------------------------------------------------ 2. warm passes, restart


def test_warm_passes_and_a_restart_read_nothing_upstream(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    tmp_path: Path,
) -> None:
    """After one cold pass, more passes read nothing upstream, also after a restart of the
    server on the same store (the learned map and the chunks are on disk)."""
    require("nbdcopy")
    store = tmp_path / "store"
    up = upstream(img32.path)
    args = store_args(store, "--export", f"lab@1={up.uri}")
    srv = server_factory(*args)
    copies_match([srv.uri("lab@1")], img32)
    cold = up.read_bytes()
    assert cold >= img32.nonzero_bytes
    copies_match([srv.uri("lab@1"), srv.uri("lab")], img32)
    assert up.read_bytes() == cold, "a warm pass read from the upstream"
    assert srv.stop() == 0  # SIGTERM: counters, map and chunks committed
    # The same store, a new process.
    srv = server_factory(*args)
    copies_match([srv.uri("lab@1"), srv.uri("lab")], img32)
    assert up.read_bytes() == cold, "a pass after the restart read from the upstream"
    assert srv.stop() == 0
    assert stats(store)[f"bytes_from:{up.uri}"] == cold
    assert verify(store).startswith("OK")


# ------------------------------------------------------------------ 3. kill -9 mid fill


def test_kill_9_during_a_cold_fill_leaves_a_consistent_store(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    tmp_path: Path,
) -> None:
    """SIGKILL while 4 readers fill the cache from a slow upstream: ``verify`` passes, and
    after a restart the readers get the image while the upstream serves exactly the chunks the
    store did not keep."""
    require("nbdcopy")
    require_holes(img32.path)
    store = tmp_path / "store"
    # One worker thread per connection and 50 ms per read: the fill takes seconds.
    up = upstream(img32.path, filters=["delay"], params=["delay-read=50ms"],
                  options=["--threads", "1"])
    args = store_args(store, "--export", f"lab@1={up.uri}")
    srv = server_factory(*args)
    procs = [subprocess.Popen(["nbdcopy", srv.uri("lab@1"), "null:"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(4)]
    try:
        for _ in range(300):  # until some chunks are committed (chunks is live, not flushed)
            if stats(store)["chunks"] >= 32:
                break
            assert all(p.poll() is None for p in procs), "the readers finished before the kill"
        else:
            pytest.fail("no chunk was committed")
        srv.stop(signal.SIGKILL)
    finally:
        for p in procs:
            p.wait(30)
    out = verify(store)
    assert out.startswith("OK"), out
    kept = stats(store)
    assert 0 < kept["held_bytes"] < img32.nonzero_bytes, kept
    up.wait_idle()
    before = up.read_bytes()
    srv = server_factory(*args)
    copies_match([srv.uri("lab@1")] * 4, img32)
    assert up.read_bytes() - before == img32.nonzero_bytes - kept["held_bytes"]
    assert srv.stop() == 0
    assert verify(store).startswith("OK")
    assert stats(store)["held_bytes"] == img32.nonzero_bytes


# ------------------------------------------------------------------ 4. corruption on the wire


def test_a_chunk_corrupted_on_the_wire_is_refused_and_fetched_again(
    server_factory: ServerFactory, tmp_path: Path,
) -> None:
    """An upstream that corrupts the first reply for each offset (the map, known from the
    import, gives every chunk's digest): the cache refuses the bytes, fetches again, and serves
    only intact data; a digest at three places is fetched once."""
    require("nbdcopy")
    path = make_image(tmp_path / "lab.img", 16 * MiB, seed=21)
    with open(path, "r+b") as f:  # chunk 1's bytes at chunks 40 and 41 too
        f.seek(CHUNK)
        dup = f.read(CHUNK)
        for i in (40, 41):
            f.seek(i * CHUNK)
            f.write(dup)
    img = Image.of(path)
    assert len(img.distinct()) == sum(k is not None for k in img.keys) - 2
    data = img.path.read_bytes()
    store = tmp_path / "store"
    with FlippingUpstream(data) as flip:
        icbd("import", str(img.path), "--imi", "lab", "--version", "1", "--store", str(store),
             "--source", flip.uri)
        img.path.unlink()  # the snapshot file (the first source) is gone: faults go upstream
        srv = server_factory(*store_args(store))
        results = hash_outputs(nbdcopy_procs([srv.uri("lab@1"), srv.uri("lab")]))
        assert results == [(img.sha, img.size)] * 2
        assert srv.stop() == 0
        chunks = len(img.distinct())
        # Each chunk came once corrupted (refused), then intact.
        assert flip.flipped == chunks
        assert flip.reads == 2 * chunks
    s = stats(store)
    assert s["corrupt_chunks"] == chunks
    assert s["faults"] == chunks and s.get("fault_errors", 0) == 0
    assert s[f"bytes_from:{flip.uri}"] == img.nonzero_bytes
    assert s["held_bytes"] == img.nonzero_bytes
    assert verify(store).startswith("OK")


# ------------------------------------------------------------------ 5. upstream gone mid-boot


async def _read(port: int, export: str, offset: int, length: int) -> bytes:
    client = await aio.connect("127.0.0.1", port, export, timeout=10)
    try:
        return await client.pread(offset, length)
    finally:
        await client.close()


def test_upstream_killed_mid_boot(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    tmp_path: Path,
) -> None:
    """Held ranges keep reading right with the upstream gone; ranges not held fail with EIO
    (only those requests: the connection and the server go on); once the upstream is back the
    same read succeeds."""
    up = upstream(img32.path)
    srv = server_factory("--store", str(tmp_path / "store"), "--create-store", "--export",
                         f"lab@1={up.uri}", "--fault-timeout", "2", "--source-timeout", "1")
    held = (0, 2 * MiB)
    cold = (8 * MiB + 4096, 128 * 1024)  # MiB 8 is data, never read before the kill
    assert img32.nonzero_bytes_of(chunks_of([cold])) > 0

    async def main() -> None:
        client = await aio.connect("127.0.0.1", srv.port, "lab@1", timeout=10)
        try:
            assert await client.pread(*held) == img32.read(*held)
            up.stop()
            assert await client.pread(*held) == img32.read(*held)
            with pytest.raises(RequestError) as err:
                await client.pread(*cold)
            assert err.value.error == Errno.EIO
            # The connection goes on: held bytes again, partly held reads fail whole.
            assert await client.pread(1000, 5000) == img32.read(1000, 5000)
            with pytest.raises(RequestError) as err:
                await client.pread(held[1] - 4096, 8192)
            assert err.value.error == Errno.EIO
        finally:
            await client.close()
        # A new connection is served too.
        assert await _read(srv.port, "lab", *held) == img32.read(*held)
        up.start()  # same port
        for _ in range(20):  # the source backs off after failures (at most 5 s)
            try:
                got = await _read(srv.port, "lab@1", *cold)
                break
            except RequestError as e:
                assert e.error == Errno.EIO
                await asyncio.sleep(0.5)
        else:
            pytest.fail("the read never succeeded after the upstream came back")
        assert got == img32.read(*cold)

    asyncio.run(main())
    assert srv.proc.poll() is None, "the server exited"
    assert srv.stop() == 0
    assert stats(tmp_path / "store")["fault_errors"] >= 2


# ------------------------------------------------------------------ 6. versions share chunks


def derive(src: Image, dest: Path, fraction: float, seed: int) -> tuple[Image, set[int]]:
    """A copy of ``src`` with ``fraction`` of its non-zero chunks rewritten with new random
    bytes; returns it and the rewritten chunk indexes."""
    rng = random.Random(seed)
    shutil.copyfile(src.path, dest)
    data_chunks = [i for i, k in enumerate(src.keys) if k is not None]
    changed = set(rng.sample(data_chunks, round(len(data_chunks) * fraction)))
    with open(dest, "r+b") as f:
        for i in changed:
            f.seek(i * CHUNK)
            f.write(rng.randbytes(src.lengths[i]))
    return Image.of(dest), changed


def test_versions_sharing_chunks_share_the_store(
    server_factory: ServerFactory, img32: Image, tmp_path: Path,
) -> None:
    require("nbdcopy")
    v2, changed = derive(img32, tmp_path / "v2.img", 0.10, seed=5)
    assert changed and v2.sha != img32.sha
    store = tmp_path / "store"
    for v, img in (("1", img32), ("2", v2)):
        icbd("import", str(img.path), "--imi", "lab", "--version", v, "--store", str(store),
             "--copy")
    union = {**img32.distinct(), **v2.distinct()}
    held = stats(store)["held_bytes"]
    assert held == sum(union.values())
    assert 1.05 * img32.nonzero_bytes <= held <= 1.15 * img32.nonzero_bytes
    rows = ls(store)
    assert rows["lab@1"]["held"] == rows["lab@1"]["needed"] == img32.nonzero_bytes
    assert rows["lab@2"]["held"] == rows["lab@2"]["needed"] == v2.nonzero_bytes
    assert rows["lab@2"]["latest"] and not rows["lab@1"]["latest"]
    srv = server_factory(*store_args(store))
    results = hash_outputs(nbdcopy_procs([srv.uri("lab@1"), srv.uri("lab@2"), srv.uri("lab")]))
    assert results == [(img32.sha, img32.size)] + [(v2.sha, v2.size)] * 2


# ------------------------------------------------------------------ 7. bounded store


def test_store_size_bound_keeps_the_pinned_version(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    img64: Image, tmp_path: Path,
) -> None:
    """v1 (24 MiB of data, pinned) + v2 (48 MiB, faulted from an upstream) in a 32 MiB store:
    held stays within the bound (plus one write batch), v1 stays whole and reads right."""
    require("nbdcopy")
    store = tmp_path / "store"
    bound = 32 * MiB
    assert img32.nonzero_bytes + img64.nonzero_bytes > bound + BATCH
    icbd("import", str(img32.path), "--imi", "lab", "--version", "1", "--store", str(store),
         "--copy", "--pin")
    up = upstream(img64.path)
    srv = server_factory(*store_args(store, "--store-size", str(bound),
                                     "--export", f"lab@2={up.uri}"))
    copies_match([srv.uri("lab@2")], img64)
    assert srv.stop() == 0
    s = stats(store)
    assert s["held_bytes"] <= bound + BATCH, s
    assert s["evicted_bytes"] > 0, s
    assert s[f"bytes_from:{up.uri}"] >= img64.nonzero_bytes
    rows = ls(store)
    assert rows["lab@1"]["pinned"]
    assert rows["lab@1"]["held"] == rows["lab@1"]["needed"] == img32.nonzero_bytes
    assert rows["lab@2"]["held"] < rows["lab@2"]["needed"]
    assert verify(store).startswith("OK")
    # v1 has no source: it reads right only because every chunk is still held.
    srv = server_factory(*store_args(store, "--store-size", str(bound)))
    copies_match([srv.uri("lab@1")], img32)


# ------------------------------------------------------------------ 8. warm


def test_warm_faults_in_the_boot_profile_then_everything(
    server_factory: ServerFactory, tmp_path: Path,
) -> None:
    """A client's first reads become the version's boot profile; after its chunks are evicted,
    ``warm`` brings back exactly them, and ``warm --all`` every chunk."""
    img = image(tmp_path, "lab.img", 32 * MiB, seed=31)
    store = tmp_path / "store"
    icbd("import", str(img.path), "--imi", "lab", "--version", "1", "--store", str(store))
    boot = [(0, MiB), (5 * MiB + 1000, 200 * 1024), (3 * MiB - CHUNK, 2 * CHUNK),
            (20 * MiB, CHUNK), (31 * MiB + 7, 100)]
    profile = chunks_of(boot)
    want = img.nonzero_bytes_of(profile)
    assert 0 < want < img.nonzero_bytes
    assert any(img.keys[i] is None for i in profile)  # a hole too: in the profile, not held
    # no sequential readahead: the boot pass holds exactly what it read (the profile)
    srv = server_factory(*store_args(store, "--readahead", "0"))

    async def boot_pass() -> None:
        client = await aio.connect("127.0.0.1", srv.port, "lab@1", timeout=10)
        try:
            for off, n in boot:
                assert await client.pread(off, n) == img.read(off, n)
        finally:
            await client.close()

    asyncio.run(boot_pass())
    assert srv.stop() == 0  # the profile and the chunks are saved at shutdown
    assert ls(store)["lab@1"]["held"] == want
    # Evict them: another iMI copied into the store with a bound just above its own size
    # (one that cannot fit is refused); the boot pass's chunks are the coldest, and lab@1
    # has its file to fault them from again, so nothing keeps them.
    filler = image(tmp_path, "filler.img", 16 * MiB, seed=32)
    icbd("import", str(filler.path), "--imi", "filler", "--store", str(store), "--copy",
         "--store-size", str(filler.nonzero_bytes + CHUNK))
    assert ls(store)["lab@1"]["held"] == 0
    out = icbd("warm", "lab@1", "--store", str(store)).stdout
    assert f"warmed lab@1: {len(profile)} chunks, 0 failed" in out, out
    assert ls(store)["lab@1"]["held"] == want
    out = icbd("warm", "lab", "--all", "--store", str(store)).stdout
    assert f"warmed lab@1: {len(img.keys)} chunks, 0 failed" in out, out
    row = ls(store)["lab@1"]
    assert row["held"] == row["needed"] == img.nonzero_bytes
    assert verify(store).startswith("OK")


def test_warm_all_while_the_server_runs_spares_the_upstream(
    server_factory: ServerFactory, upstream: Callable[..., Upstream], img32: Image,
    tmp_path: Path,
) -> None:
    """``warm --all`` in its own process, next to a running server, of a version faulted from
    an upstream: the clients' pass afterwards reads nothing more upstream (the server learns
    the chunk map that warm learned)."""
    require("nbdcopy")
    store = tmp_path / "store"
    up = upstream(img32.path)
    srv = server_factory(*store_args(store, "--export", f"lab@1={up.uri}"))
    out = icbd("warm", "lab@1", "--all", "--store", str(store)).stdout
    assert f"warmed lab@1: {len(img32.keys)} chunks, 0 failed" in out, out
    warmed = up.read_bytes()
    assert warmed >= img32.nonzero_bytes
    row = ls(store)["lab@1"]
    assert row["held"] == row["needed"] == img32.nonzero_bytes
    copies_match([srv.uri("lab@1")], img32)
    assert up.read_bytes() == warmed, "the server fetched warmed chunks again"
