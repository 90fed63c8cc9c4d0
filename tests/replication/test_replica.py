"""The replica half of replication (issue 6): real ``icbd-cache master``, ``publish``,
``replica`` and ``serve --master`` processes on 127.0.0.1, real NBD clients (nbdcopy), and an
HTTP proxy in the test process that alters or holds chunk streams.

Every check is on bytes and counts (sha256 of a served export, chunks and bytes received as
counted in the replica's store), never on times; waits poll a state with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BIN,
    REPO,
    TEST_KEY,
    TEST_KEY_PUB,
    free_port,
    make_image,
    require,
    sha256_file,
    stop_process,
    trusted,
    wait_port,
)
from masterproxy import MasterProxy as Proxy

from icbdcache.store.chunks import CHUNK_SIZE, ZERO, digest

ICBD = str(BIN / "icbd-cache")


# ------------------------------------------------------------------------------ helpers


def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ICBD, *trusted(args)], capture_output=True, text=True, timeout=timeout,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


def chunks_of(image: Path) -> dict[bytes, int]:
    """Distinct non-zero chunks of an image: digest -> length in bytes."""
    out: dict[bytes, int] = {}
    with image.open("rb") as f:
        while block := f.read(CHUNK_SIZE):
            d = digest(block)
            if d != ZERO:
                out[d] = len(block)
    return out


@dataclass
class Proc:
    """A long-running icbd-cache process, stopped by PID."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def spawn(tmp: Path, name: str, *args: str) -> Proc:
    log = tmp / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([ICBD, *trusted(args)], stdout=out, stderr=subprocess.STDOUT)
    return Proc(proc, log)


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def master(self, store: Path, *args: str, port: int | None = None,
               scheme: str = "http") -> Proc:
        port = port or free_port()
        p = spawn(self.tmp, f"master-{port}", "master", "--store", str(store), "--listen",
                  f"127.0.0.1:{port}", *args)
        p.port = port
        self.all.append(p)
        try:
            wait_port("127.0.0.1", port)
        except TimeoutError:
            p.stop(signal.SIGKILL)
            raise RuntimeError(f"master did not start: {p.text()}") from None
        return p

    def replica(self, name: str, *args: str) -> Proc:
        p = spawn(self.tmp, name, "replica", *args)
        self.all.append(p)
        return p

    def serve(self, *args: str) -> Proc:
        port = free_port()
        p = spawn(self.tmp, f"serve-{port}", "serve", "--listen", f"127.0.0.1:{port}", *args)
        p.port = port
        self.all.append(p)
        try:
            wait_port("127.0.0.1", port)
        except TimeoutError:
            p.stop(signal.SIGKILL)
            raise RuntimeError(f"serve did not start: {p.text()}") from None
        return p

    def stop_all(self) -> None:
        for p in self.all:
            p.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


def stats(store: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run("stats", "--json", "--store", str(store)).stdout)
    return out


def received(store: Path) -> int:
    """``replica_chunks`` of the store, read in this process (fast enough to poll)."""
    from icbdcache.store import Store, StoreError

    if not (store / "data.mdb").exists():
        return 0
    try:
        st = Store(store, readonly=True)
    except StoreError:  # being created: its databases are not there yet
        return 0
    try:
        return int(st.stats().get("replica_chunks", 0))
    finally:
        st.close()


def ls(store: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(run("ls", "--json", "--store", str(store)).stdout)
    return {f"{r['imi']}@{r['version']}": r for r in rows}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0,
             every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def complete(store: Path, key: str) -> bool:
    if not (store / "data.mdb").exists():
        return False
    r = ls(store).get(key)
    return bool(r and r["held"] == r["needed"] and r["pinned"])


def nbd_sha256(port: int, export: str) -> str:
    """sha256 of an export read whole by nbdcopy (streamed to us)."""
    p = subprocess.Popen(["nbdcopy", f"nbd://127.0.0.1:{port}/{export}", "-"],
                         stdout=subprocess.PIPE)
    h = hashlib.sha256()
    assert p.stdout is not None
    while block := p.stdout.read(1 << 20):
        h.update(block)
    assert p.wait(600) == 0, f"nbdcopy of {export} failed"
    return h.hexdigest()


def served_sha256(procs: Procs, store: Path, export: str) -> str:
    """sha256 of ``export`` as ``icbd-cache serve --store STORE`` serves it."""
    srv = procs.serve("--store", str(store))
    try:
        return nbd_sha256(srv.port, export)
    finally:
        srv.stop()


def publish(store: Path, image: Path, imi: str = "lab", version: str | None = None) -> None:
    args = ["publish", str(image), "--store", str(store), "--imi", imi, "-q"]
    if version:
        args += ["--version", version]
    run(*args)


@dataclass
class Pair:
    """Two versions of one image: v1 and v2 (files), and what v2 adds."""

    v1: Path
    v2: Path
    c1: dict[bytes, int] = field(default_factory=dict)
    c2: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.c1 = chunks_of(self.v1)
        self.c2 = chunks_of(self.v2)

    @property
    def new_in_v2(self) -> dict[bytes, int]:
        return {d: n for d, n in self.c2.items() if d not in self.c1}


def synthetic_pair(tmp: Path, size: int = 32 << 20, changed_mib: int = 4) -> Pair:
    """v1: random data with holes; v2: v1 with ``changed_mib`` MiB rewritten."""
    v1 = make_image(tmp / "v1.img", size, seed=1)
    v2 = tmp / "v2.img"
    v2.write_bytes(v1.read_bytes())
    import random

    rng = random.Random(7)
    with v2.open("r+b") as f:
        for k in range(changed_mib):
            f.seek((2 + 4 * k) * (1 << 20))  # inside random (non-hole) MiBs
            f.write(rng.randbytes(1 << 20))
    return Pair(v1, v2)


# ------------------------------------------------------------------------------ unit pieces


def test_parse_compress() -> None:
    from icbdcache.replication.client import parse_compress

    assert parse_compress("plain") is None
    assert parse_compress("zstd") == 3
    assert parse_compress("zstd:9") == 9
    for bad in ("gzip", "zstd:0", "zstd:20", "zstd:x"):
        with pytest.raises(ValueError):
            parse_compress(bad)


def test_master_source_reads_ranges_by_digest(tmp_path: Path) -> None:
    """MasterSource against a stub client: byte ranges across chunks, zero chunks never asked
    for, one request for reads of one loop turn, a bad chunk refused."""
    from icbdcache.replication.client import TransferCounters
    from icbdcache.replication.wire import ChunkFrame
    from icbdcache.sources import SourceDataError
    from icbdcache.sources.master import MasterSource

    img = make_image(tmp_path / "img", 8 << 20)
    data = img.read_bytes()
    digests = [digest(data[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE)]
    chunk_map = b"".join(digests)
    by_digest = {d: data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i, d in enumerate(digests)}

    class Stub:
        url = "http://stub:1"

        def __init__(self) -> None:
            self.requests: list[list[bytes]] = []
            self.corrupt: set[bytes] = set()

        async def chunks(self, ds: list[bytes], tally: TransferCounters | None = None) -> Any:
            self.requests.append(list(ds))
            for d in ds:
                b = by_digest[d]
                if d in self.corrupt:
                    b = b"\x01" + b[1:]
                yield ChunkFrame(d, b)

    stub = Stub()
    src = MasterSource(stub, "lab@1", chunk_map, len(data), CHUNK_SIZE)  # type: ignore[arg-type]

    async def go() -> None:
        # 3 MiB..4 MiB is a hole (make_image): a read inside it asks for nothing
        assert await src.read(3 << 20, 4096) == bytes(4096)
        assert stub.requests == []
        parts = await asyncio.gather(src.read(100, 200000), src.read(5 << 20, CHUNK_SIZE))
        assert parts[0] == data[100:200100]
        assert parts[1] == data[5 << 20 : (5 << 20) + CHUNK_SIZE]
        assert len(stub.requests) == 1  # coalesced
        stub.corrupt.add(digests[100])
        with pytest.raises(SourceDataError):
            await src.read(100 * CHUNK_SIZE, 10)
        await src.close()

    asyncio.run(go())


# ------------------------------------------------------------------------------ replication


def test_full_then_delta_synthetic(tmp_path: Path, procs: Procs) -> None:
    """Full, then delta: the delta moves exactly the chunks new in v2; zstd mode too; the
    replica's served bytes equal the images'."""
    require("nbdcopy")
    pair = synthetic_pair(tmp_path)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, pair.v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    r = run("replica", "--store", str(rstore), "--master", url, "--site", "s1",
            "--subscribe", "lab", "--once")
    assert "replicated lab@1" in r.stdout
    s = stats(rstore)
    assert s["replica_chunks"] == len(pair.c1)
    assert s["replica_chunk_bytes"] == sum(pair.c1.values())
    publish(mstore, pair.v2)
    run("replica", "--store", str(rstore), "--master", url, "--site", "s1", "--once",
        "--compress", "zstd:3")
    s2 = stats(rstore)
    new = pair.new_in_v2
    assert len(new) == 64  # 4 MiB rewritten
    assert s2["replica_chunks"] - s["replica_chunks"] == len(new)
    assert s2["replica_chunk_bytes"] - s["replica_chunk_bytes"] == sum(new.values())
    rows = ls(rstore)
    assert rows["lab@1"]["pinned"] and rows["lab@2"]["pinned"] and rows["lab@2"]["latest"]
    assert s2["replica"]["state"] == "idle" and s2["replica"]["versions"]["lab@2"]["complete"]
    assert served_sha256(procs, rstore, "lab@1") == sha256_file(pair.v1)
    assert served_sha256(procs, rstore, "lab") == sha256_file(pair.v2)


def test_once_with_an_iMI_the_master_lacks_fails(tmp_path: Path, procs: Procs) -> None:
    """``--once --subscribe`` of an iMI the master has no version of (a typo) exits 1 and
    names it; what it could pull (``lab``) is still pulled."""
    pair = synthetic_pair(tmp_path)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, pair.v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    r = run("replica", "--store", str(rstore), "--master", url, "--site", "s1",
            "--subscribe", "lab", "--subscribe", "lba", "--once", check=False)
    assert r.returncode == 1, r.stderr
    assert "the master has no version of lba" in r.stderr
    assert ls(rstore)["lab@1"]["pinned"]
    ok = run("replica", "--store", str(rstore), "--master", url, "--site", "s2",
             "--subscribe", "lab", "--once")
    assert "replicated lab@1" in ok.stdout


def _test_imi() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building the test iMI needs root (debootstrap)")
    require("debootstrap", "nbdcopy")
    p = subprocess.run([str(REPO / "scripts" / "build-test-imi")], capture_output=True,
                       text=True, timeout=900, check=False)
    if p.returncode == 77:
        pytest.skip(f"test iMI unavailable: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(p.stdout.strip().splitlines()[-1]) / "imi.ext4"


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """v1: the Debian test iMI; v2: made from it by scripts/update-imi (less installed,
    tzdata purged, fstrim)."""
    v1 = _test_imi()
    tmp = tmp_path_factory.mktemp("pair")
    v2 = tmp / "v2.ext4"
    script = REPO / "scripts" / "update-imi"
    if not script.exists():
        pytest.skip("scripts/update-imi is not there yet")
    p = subprocess.run([str(script), str(v1), str(v2), "--install", "less", "--purge",
                        "tzdata"], capture_output=True, text=True, timeout=900, check=False)
    if p.returncode == 77:
        pytest.skip(f"update-imi cannot run here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return Pair(v1, v2)


def test_full_then_delta_real_pair(real_pair: Pair, tmp_path: Path, procs: Procs) -> None:
    """The test iMI and its apt-updated v2: full replication of v1 (every non-zero chunk),
    delta of v2 (only the chunks new in v2); the exports the replica serves hash to the
    images."""
    pair = real_pair
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, pair.v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    run("replica", "--store", str(rstore), "--master", url, "--site", "s1", "--subscribe",
        "lab", "--once")
    s1 = stats(rstore)
    assert s1["replica_chunks"] == len(pair.c1)
    assert s1["replica_chunk_bytes"] == sum(pair.c1.values())
    publish(mstore, pair.v2)
    run("replica", "--store", str(rstore), "--master", url, "--site", "s1", "--once")
    s2 = stats(rstore)
    new = pair.new_in_v2
    assert 0 < len(new) < len(pair.c2)
    assert s2["replica_chunks"] - s1["replica_chunks"] == len(new)
    assert s2["replica_chunk_bytes"] - s1["replica_chunk_bytes"] == sum(new.values())
    assert s2["replica_corrupt_chunks"] == 0
    # the kernel and initrd the master kept (publish extracts them) came along, for PXE
    for key in ("lab@1", "lab@2"):
        for name in ("vmlinuz", "initrd.img"):
            theirs, ours = mstore / "boot" / key / name, rstore / "boot" / key / name
            assert theirs.is_file() and sha256_file(ours) == sha256_file(theirs)
    # v2 boots v1's kernel: the master answered 304 to the site's If-None-Match, nothing sent
    boot1 = sum((mstore / "boot" / "lab@1" / n).stat().st_size for n in ("vmlinuz", "initrd.img"))
    assert s1["replica_boot_bytes"] == boot1
    assert s2["replica_boot_bytes"] == boot1 and s2["replica_boot_reused"] == 2
    srv = procs.serve("--store", str(rstore))
    assert nbd_sha256(srv.port, "lab@1") == sha256_file(pair.v1)
    assert nbd_sha256(srv.port, "lab@2") == sha256_file(pair.v2)
    assert nbd_sha256(srv.port, "lab") == sha256_file(pair.v2)
    srv.stop()


def test_master_killed_mid_transfer(tmp_path: Path, procs: Procs) -> None:
    """serve --master: v1 complete; the master is SIGKILLed while v2 is pulled; the site keeps
    serving v1 and says cut-off; the master comes back on the same port and store; the pull
    resumes and completes, and nothing is received twice."""
    require("nbdcopy")
    v1 = make_image(tmp_path / "v1.img", 16 << 20, seed=1)
    v2 = make_image(tmp_path / "v2.img", 128 << 20, seed=2)
    c1, c2 = chunks_of(v1), chunks_of(v2)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    site = procs.serve("--store", str(rstore), "--create-store", "--master", url, "--site", "s1",
                       "--subscribe", "lab", "--pull-batch", "1", "--pull-parallel", "1")
    wait_for("lab@1 complete", lambda: complete(rstore, "lab@1"))
    publish(mstore, v2)
    wait_for("a part of lab@2", lambda: received(rstore) >= len(c1) + 100, every=0.02)
    m.kill()
    got = stats(rstore)["replica_chunks"] - len(c1)
    assert 100 <= got < len(c2), "the pull was not interrupted"
    assert not complete(rstore, "lab@2")
    state = wait_for("cut-off", lambda: (lambda r: r if r.get("state") == "cut-off" else None)(
        stats(rstore).get("replica", {})))
    assert state["cut_off_since"] is not None and state["pulling"] is None
    assert nbd_sha256(site.port, "lab@1") == sha256_file(v1)
    assert nbd_sha256(site.port, "lab") == sha256_file(v1)  # v2 is not latest before complete
    text = run("stats", "--store", str(rstore)).stdout
    assert "cut-off since" in text
    procs.master(mstore, port=m.port)
    wait_for("lab@2 complete", lambda: complete(rstore, "lab@2"), timeout=300)
    s = stats(rstore)
    assert s["replica_chunks"] == len(c1) + len(c2)  # every chunk received once
    assert s["replica_chunk_bytes"] == sum(c1.values()) + sum(c2.values())
    state = wait_for("state idle", lambda: (lambda r: r if r["state"] == "idle" else None)(
        stats(rstore)["replica"]))
    # the process's own counters (one process since the start) agree with the store's, also
    # for the transactions that committed while the master was being killed
    assert state["counters"]["chunks"] == s["replica_chunks"]
    assert state["counters"]["chunk_bytes"] == s["replica_chunk_bytes"]
    assert nbd_sha256(site.port, "lab@2") == sha256_file(v2)
    assert nbd_sha256(site.port, "lab") == sha256_file(v2)


def test_replica_killed_mid_transfer_resumes(tmp_path: Path, procs: Procs) -> None:
    """icbd-cache replica SIGKILLed in the middle of a pull: started again, it fetches only
    what it did not commit, and the store verifies."""
    v1 = make_image(tmp_path / "v1.img", 64 << 20, seed=4)
    c1 = chunks_of(v1)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    args = ["--store", str(rstore), "--master", url, "--site", "s1", "--subscribe", "lab",
            "--pull-batch", "1", "--pull-parallel", "1"]
    r = procs.replica("r1", *args)
    wait_for("a part of lab@1", lambda: received(rstore) >= 100, every=0.02)
    r.kill()
    got = stats(rstore)["replica_chunks"]
    assert 100 <= got < len(c1), "the pull was not interrupted"
    assert ls(rstore)["lab@1"]["pinned"] and not ls(rstore)["lab@1"]["latest"]
    assert "not running" in run("stats", "--store", str(rstore)).stdout
    run("replica", *args, "--once")
    s = stats(rstore)
    assert s["replica_chunks"] == len(c1)  # nothing committed before the kill came again
    assert s["replica_chunk_bytes"] == sum(c1.values())
    assert complete(rstore, "lab@1") and ls(rstore)["lab@1"]["latest"]
    assert run("verify", "--store", str(rstore)).returncode == 0


def test_chunk_altered_in_transit_is_refused_and_refetched(tmp_path: Path,
                                                          procs: Procs) -> None:
    require("nbdcopy")
    pair = synthetic_pair(tmp_path)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, pair.v1)
    m = procs.master(mstore)
    proxy = Proxy(m.port, corrupt_once=True)
    try:
        run("replica", "--store", str(rstore), "--master", proxy.url, "--site", "s1",
            "--subscribe", "lab", "--once")
    finally:
        proxy.close()
    assert proxy.corrupted == 1
    s = stats(rstore)
    assert s["replica_corrupt_chunks"] == 1
    assert s["replica_chunks"] == len(pair.c1)  # the refused one again, once, good
    assert served_sha256(procs, rstore, "lab") == sha256_file(pair.v1)
    assert run("verify", "--store", str(rstore)).returncode == 0


def test_chunk_the_master_lacks_is_reported(tmp_path: Path, procs: Procs) -> None:
    """A chunk the master answers MISSING for is asked again in later rounds, then the pull
    stops with an error that says so; the version is not made latest."""
    from icbdcache.store import Store

    v1 = make_image(tmp_path / "v1.img", 8 << 20, seed=5)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    lost = next(iter(chunks_of(v1)))
    st = Store(mstore)
    with st.env.begin(write=True, db=st.db["chunks"]) as txn:
        assert txn.delete(lost)
    st.close()
    m = procs.master(mstore)
    p = run("replica", "--store", str(rstore), "--master", f"http://127.0.0.1:{m.port}",
            "--site", "s1", "--subscribe", "lab", "--once", check=False)
    assert p.returncode == 1
    s = stats(rstore)
    from icbdcache.replication.replica import MAX_IDLE_ROUNDS

    assert s["replica_missing_frames"] == 1 + MAX_IDLE_ROUNDS  # asked again, round by round
    assert s["replica_chunks"] == len(chunks_of(v1)) - 1
    assert s["replica"]["state"] == "error" and "1 chunks not received" in s["replica"]["error"]
    assert not ls(rstore)["lab@1"]["latest"]


def test_store_full_reports_and_keeps_v1(tmp_path: Path, procs: Procs) -> None:
    require("nbdcopy")
    v1 = make_image(tmp_path / "v1.img", 16 << 20, seed=1)
    v2 = make_image(tmp_path / "v2.img", 16 << 20, seed=2)
    c1 = chunks_of(v1)
    limit = str(sum(c1.values()) + (1 << 20))  # v1 and 1 MiB
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    run("replica", "--store", str(rstore), "--store-size", limit, "--master", url, "--site",
        "s1", "--subscribe", "lab", "--once")
    publish(mstore, v2)
    p = run("replica", "--store", str(rstore), "--store-size", limit, "--master", url,
            "--site", "s1", "--once", check=False)
    assert p.returncode == 1
    r = stats(rstore)["replica"]
    assert r["state"] == "error" and "store full" in r["error"] and "lab@2" in r["error"]
    assert "store full" in run("stats", "--store", str(rstore)).stdout
    status = json.loads(run("admin", "--master", url, "--json", "status").stdout)
    site = next(s for s in status["sites"] if s["name"] == "s1")
    assert site["state"] == "error"
    rows = ls(rstore)
    assert rows["lab@1"]["latest"] and rows["lab@1"]["held"] == rows["lab@1"]["needed"]
    assert not rows["lab@2"]["latest"]
    assert served_sha256(procs, rstore, "lab") == sha256_file(v1)


def test_disk_full_reports_and_keeps_v1(tmp_path: Path, procs: Procs) -> None:
    """A replica store on a 16 MiB tmpfs (in a private mount namespace): v1 fits, v2 does
    not; the write fails, the replica says so (disk full) and v1 stays intact and served."""
    require("nbdcopy", "unshare")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    v1 = make_image(tmp_path / "v1.img", 8 << 20, seed=1)
    v2 = make_image(tmp_path / "v2.img", 32 << 20, seed=2)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    rstore.mkdir()
    publish(mstore, v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    nbd = free_port()
    script = f"""
set -u
mount -t tmpfs -o size=16m tmpfs {rstore} || exit 77
{ICBD} replica --store {rstore} --master {url} --site s1 --subscribe lab --once -q \
    --trust-key {TEST_KEY_PUB} || exit 3
{ICBD} publish {v2} --store {mstore} --imi lab -q --signing-key {TEST_KEY} || exit 4
{ICBD} replica --store {rstore} --master {url} --site s1 --once -q \
    --trust-key {TEST_KEY_PUB} 2> {tmp_path}/rc2.err
echo $? > {tmp_path}/rc2
{ICBD} stats --json --store {rstore} > {tmp_path}/stats.json
{ICBD} ls --json --store {rstore} > {tmp_path}/ls.json
{ICBD} verify --store {rstore} > {tmp_path}/verify.out; echo $? > {tmp_path}/verify.rc
{ICBD} serve --store {rstore} --listen 127.0.0.1:{nbd} 2> {tmp_path}/serve.err &
pid=$!
for i in $(seq 100); do nbdinfo nbd://127.0.0.1:{nbd}/lab >/dev/null 2>&1 && break; sleep 0.1; done
nbdcopy nbd://127.0.0.1:{nbd}/lab - | sha256sum > {tmp_path}/lab.sha
kill $pid; wait $pid
"""
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300, check=False)
    if p.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rc2").read_text().strip() == "1"
    r = json.loads((tmp_path / "stats.json").read_text())["replica"]
    assert r["state"] == "error" and "disk full" in r["error"] and "lab@2" in r["error"]
    rows = {f"{x['imi']}@{x['version']}": x for x in json.loads((tmp_path / "ls.json")
                                                                 .read_text())}
    assert rows["lab@1"]["latest"] and rows["lab@1"]["held"] == rows["lab@1"]["needed"]
    assert not rows["lab@2"]["latest"]
    assert (tmp_path / "verify.rc").read_text().strip() == "0"
    assert (tmp_path / "lab.sha").read_text().split()[0] == sha256_file(v1)
    status = json.loads(run("admin", "--master", url, "--json", "status").stdout)
    site = next(s for s in status["sites"] if s["name"] == "s1")
    assert site["state"] == "error"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme  # a dev dependency, like pytest

    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("site-a@example")
    out = {"ca": d / "ca.pem", "other_ca": d / "other.pem", "cert": d / "master.pem",
           "key": d / "master.key", "ccert": d / "client.pem", "ckey": d / "client.key"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    other.cert_pem.write_to_path(str(out["other_ca"]))
    server.cert_chain_pems[0].write_to_path(str(out["cert"]))
    server.private_key_pem.write_to_path(str(out["key"]))
    client.cert_chain_pems[0].write_to_path(str(out["ccert"]))
    client.private_key_pem.write_to_path(str(out["ckey"]))
    return out


def test_tls_ca_token_and_client_cert(tmp_path: Path, procs: Procs,
                                      pki: dict[str, Path]) -> None:
    v1 = make_image(tmp_path / "v1.img", 8 << 20, seed=1)
    mstore = tmp_path / "master"
    publish(mstore, v1)
    tokens = tmp_path / "tokens"
    tokens.write_text("s1 secret-token-1\n")
    mytoken = tmp_path / "s1.token"
    mytoken.write_text("secret-token-1\n")
    m = procs.master(mstore, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                     "--client-ca", str(pki["ca"]), "--token-file", str(tokens))
    url = f"https://127.0.0.1:{m.port}"
    base = ["replica", "--master", url, "--site", "s1", "--subscribe", "lab", "--once"]
    # the wrong CA: the master is refused
    p = run(*base, "--store", str(tmp_path / "r0"), "--master-ca", str(pki["other_ca"]),
            "--master-token-file", str(mytoken), check=False)
    assert p.returncode == 1
    assert "not trusted" in p.stderr and str(pki["other_ca"]) in p.stderr
    # no credentials: refused by the master
    p = run(*base, "--store", str(tmp_path / "r1"), "--master-ca", str(pki["ca"]), check=False)
    assert p.returncode == 1
    assert "401" in p.stderr and "refused this replica's credentials" in p.stderr
    # a token, over TLS with zstd
    r2 = tmp_path / "r2"
    run(*base, "--store", str(r2), "--master-ca", str(pki["ca"]), "--master-token-file",
        str(mytoken), "--compress", "zstd")
    assert stats(r2)["replica_chunk_bytes"] == sum(chunks_of(v1).values())
    # a client certificate
    r3 = tmp_path / "r3"
    run(*base, "--store", str(r3), "--master-ca", str(pki["ca"]), "--master-cert",
        str(pki["ccert"]), "--master-key", str(pki["ckey"]))
    assert complete(r3, "lab@1")


def test_two_replicas_admin_status_and_down(tmp_path: Path, procs: Procs) -> None:
    v1 = make_image(tmp_path / "v1.img", 8 << 20, seed=1)
    v2 = make_image(tmp_path / "v2.img", 8 << 20, seed=2)
    mstore = tmp_path / "master"
    publish(mstore, v1)
    m = procs.master(mstore, "--down-after", "3", "--keepalive-interval", "0.5")
    url = f"http://127.0.0.1:{m.port}"
    ra = procs.replica("ra", "--store", str(tmp_path / "ra"), "--master", url, "--site", "a",
                       "--subscribe", "lab", "--site-address", "10.0.0.1:10809")
    procs.replica("rb", "--store", str(tmp_path / "rb"), "--master", url, "--site", "b",
                  "--subscribe", "lab", "--site-address", "10.0.0.2:10809")

    def status() -> dict[str, Any]:
        st = json.loads(run("admin", "--master", url, "--json", "status").stdout)
        return {s["name"]: s for s in st["sites"]}

    def both_complete() -> dict[str, Any] | None:
        st = status()
        ok = all(n in st and st[n]["up"] and st[n]["versions"].get("lab@1", {}).get("complete")
                 for n in ("a", "b"))
        return st if ok else None

    st = wait_for("both sites complete", both_complete)
    assert st["a"]["address"] == "10.0.0.1:10809"
    publish(mstore, v2)

    def lag_zero() -> dict[str, Any] | None:
        st = status()
        ok = all(st[n]["lag"]["lab"]["latest"] == "lab@2" and st[n]["lag"]["lab"]["complete"]
                 and st[n]["lag"]["lab"]["behind_bytes"] == 0 for n in ("a", "b"))
        return st if ok else None

    wait_for("both sites on lab@2", lag_zero)
    table = run("admin", "--master", url, "status").stdout
    assert table.splitlines()[0].split()[0] == "SITE"
    assert {ln.split()[0] for ln in table.splitlines()[1:] if ln.strip()} >= {"a", "b"}, table
    ra.kill()
    st = wait_for("site a down", lambda: (lambda s: s if not s["a"]["up"] else None)(status()),
                  timeout=30)
    assert st["a"]["state"] == "down" and st["b"]["up"]


def test_boot_before_replication_completes(tmp_path: Path, procs: Procs) -> None:
    """serve --master: the pull is held by the proxy; a client reads the whole new version
    (faulted from the master through MasterSource) with the right bytes; then the pull
    completes."""
    require("nbdcopy")
    v1 = make_image(tmp_path / "v1.img", 64 << 20, seed=3)
    c1 = chunks_of(v1)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    m = procs.master(mstore)
    assert len(c1) == 768  # two pull batches of 384 (MasterSource asks for at most 256)
    proxy = Proxy(m.port, hold_digests=384)
    try:
        site = procs.serve("--store", str(rstore), "--create-store", "--master", proxy.url,
                           "--site", "s1", "--subscribe", "lab", "--pull-batch", "384")
        wait_for("the pull to be held", lambda: proxy.held > 0)
        assert stats(rstore).get("replica_chunks", 0) == 0
        assert nbd_sha256(site.port, "lab@1") == sha256_file(v1)
        assert proxy.small_requests > 0
        assert stats(rstore).get("replica_chunks", 0) == 0
        assert not ls(rstore)["lab@1"]["latest"]  # not before the pull completes
        proxy.release.set()
        wait_for("lab@1 complete", lambda: complete(rstore, "lab@1"))
        assert ls(rstore)["lab@1"]["latest"]
        s = stats(rstore)
        from_master = sum(v for k, v in s.items() if k.startswith("bytes_from:icbd+"))
        assert from_master > 0
        assert s["replica_chunk_bytes"] == sum(c1.values())  # the pull asked before the faults
    finally:
        proxy.close()


def test_retired_version_deleted_unless_only_complete(tmp_path: Path, procs: Procs) -> None:
    v1 = make_image(tmp_path / "v1.img", 8 << 20, seed=1)
    v2 = make_image(tmp_path / "v2.img", 8 << 20, seed=2)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, v1)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    once = ["replica", "--store", str(rstore), "--master", url, "--site", "s1", "--subscribe",
            "lab", "--once"]
    run(*once)
    run("admin", "--master", url, "retire", "lab@1")
    run(*once)
    assert "lab@1" in ls(rstore)  # the only complete version: kept
    publish(mstore, v2)
    run(*once)
    rows = ls(rstore)
    assert "lab@1" not in rows and rows["lab@2"]["latest"] and rows["lab@2"]["pinned"]


def test_cli_refusals(tmp_path: Path) -> None:
    p = run("replica", "--store", str(tmp_path / "r"), "--master", "ftp://x", "--site", "a",
            "--once", check=False)
    assert p.returncode == 2 and "http://HOST:PORT" in p.stderr
    p = run("replica", "--store", str(tmp_path / "r"), "--master", "http://127.0.0.1:1",
            "--once", check=False)
    assert p.returncode == 2 and "--site" in p.stderr
    p = run("serve", "--store", str(tmp_path / "r"), "--site", "a", check=False)
    assert p.returncode == 2 and "need --master" in p.stderr

