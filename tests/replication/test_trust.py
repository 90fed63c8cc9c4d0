"""Trust (issue 16): strong chunk digests and signed manifests, with real ``icbd-cache master``,
``publish``, ``replica`` and ``serve --master`` processes on 127.0.0.1.

A forged chunk needs a collision of the fast (xxh3) digest. The test hook
``ICBD_TEST_FAST_DIGEST_PREFIX=4096`` (icbdcache/store/chunks.py) makes every process's fast
digest cover only a chunk's first 4096 bytes: a proxy between master and site that changes a
byte after them hands the site a chunk of the same length whose fast digest (the frame's
digest field, which the proxy leaves as it is) matches. Only the strong (BLAKE3-256) digest of
the signed manifest can refuse it.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import free_port, make_image, require, sha256_file
from oldstore import make_old
from shared_store import ACK, client_from, read_all
from test_master import get_json
from test_replica import (
    ICBD,
    Procs,
    Proxy,
    ls,
    nbd_sha256,
    publish,
    run,
    served_sha256,
    stats,
    wait_for,
)

from icbdcache.replication.signing import generate

PREFIX = 4096
_FRAME = struct.Struct(">16sI")


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


def keys(tmp: Path, *names: str) -> dict[str, tuple[Path, Path, str]]:
    """name -> (private key file, public key file, key id), made with icbd-cache's keygen."""
    out = {}
    for n in names:
        priv = tmp / f"{n}.key"
        kid = generate(str(priv))
        out[n] = (priv, Path(f"{priv}.pub"), kid)
    return out


def plain(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """icbd-cache with exactly these arguments (no session key added)."""
    p = subprocess.run([ICBD, *args], capture_output=True, text=True, timeout=300,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


class ForgeProxy(Proxy):
    """A proxy that forges the first ``forge`` distinct chunks it carries, once each: the
    frame keeps its digest and length, one byte after the first PREFIX bytes is flipped."""

    def __init__(self, target_port: int, forge: int) -> None:
        self.forge = forge
        self.forged: set[bytes] = set()
        super().__init__(target_port)

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type")}
        async with self._session.request(request.method, self.target + request.path_qs,
                                         data=body or None, headers=headers) as r:
            data = await r.read()
            out = {k: v for k, v in r.headers.items()
                   if k.lower().startswith("x-icbd") or k.lower() == "content-type"}
            status = r.status
        if request.path == "/v1/chunks" and status == 200 and "X-Icbd-Encoding" not in out:
            data = self._alter(data)
        return web.Response(status=status, body=data, headers=out)

    def _alter(self, data: bytes) -> bytes:
        buf = bytearray(data)
        pos = 0
        while pos + _FRAME.size <= len(buf):
            d, n = _FRAME.unpack_from(buf, pos)
            pos += _FRAME.size
            if n == 0xFFFFFFFF:
                continue
            if n == 0:
                break
            if n > PREFIX + 200 and d not in self.forged and len(self.forged) < self.forge:
                self.forged.add(d)
                buf[pos + PREFIX + 100] ^= 0x5A  # the tail: the hooked fast digest is blind
            pos += n
        return bytes(buf)


@pytest.fixture
def collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every icbd-cache process of the test hashes only the first PREFIX bytes of a chunk
    for its fast digest (the processes inherit the environment)."""
    monkeypatch.setenv("ICBD_TEST_FAST_DIGEST_PREFIX", str(PREFIX))


def test_forged_chunk_with_a_colliding_fast_digest_is_refused_and_refetched(
        tmp_path: Path, procs: Procs, collide: None) -> None:
    require("nbdcopy")
    img = make_image(tmp_path / "v1.img", 8 << 20, seed=11)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    publish(mstore, img)
    m = procs.master(mstore)
    proxy = ForgeProxy(m.port, forge=3)
    try:
        p = run("replica", "--store", str(rstore), "--master", proxy.url, "--site", "s1",
                "--subscribe", "lab", "--once")
    finally:
        proxy.close()
    assert len(proxy.forged) == 3
    assert "strong digest mismatch" in p.stderr
    s = stats(rstore)
    assert s["replica_corrupt_chunks"] == 3  # refused, then asked again and taken good
    assert served_sha256(procs, rstore, "lab") == sha256_file(img)


def test_forged_chunk_faulted_on_demand_is_refused_and_refetched(
        tmp_path: Path, procs: Procs, collide: None) -> None:
    """serve --master --on-demand: the chunks a client reads cross from the master as faults;
    the forged ones fail the fault layer's strong check and are fetched again."""
    require("nbdcopy")
    img = make_image(tmp_path / "v1.img", 8 << 20, seed=12)
    mstore, rstore = tmp_path / "master", tmp_path / "site"
    publish(mstore, img)
    m = procs.master(mstore)
    proxy = ForgeProxy(m.port, forge=4)
    try:
        site = procs.serve("--store", str(rstore), "--create-store", "--master", proxy.url,
                           "--site", "s1", "--subscribe", "lab", "--on-demand")
        wait_for("lab@1 adopted", lambda: "lab@1" in ls(rstore))
        assert nbd_sha256(site.port, "lab@1") == sha256_file(img)
        site.stop()
    finally:
        proxy.close()
    assert len(proxy.forged) == 4
    assert "strong digest mismatch" in site.text()
    assert stats(rstore)["corrupt_chunks"] == 4


def test_manifest_signed_by_another_key_is_refused(tmp_path: Path, procs: Procs) -> None:
    k = keys(tmp_path, "master", "other")
    img = make_image(tmp_path / "v1.img", 2 << 20, seed=13)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    plain("publish", str(img), "--store", str(mstore), "--imi", "lab", "-q",
          "--signing-key", str(k["other"][0]))
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    p = plain("replica", "--store", str(rstore), "--master", url, "--site", "s1",
              "--subscribe", "lab", "--once", "--trust-key", str(k["master"][1]), check=False)
    assert p.returncode == 1
    assert f"signed by key {k['other'][2]}, which this site does not trust" in p.stderr
    assert k["master"][2] in p.stderr  # the key it does trust, named
    assert ls(rstore) == {}  # nothing of it was taken
    assert stats(rstore).get("replica_chunks", 0) == 0


def test_a_refused_version_is_logged_as_an_error_once(tmp_path: Path,
                                                      procs: Procs) -> None:
    """A running replica meets the same refused manifest at every sync (each change of the
    master's catalog, or every watch): the ERROR is logged once, the repeats at debug level
    only (the state says it all along)."""
    k = keys(tmp_path, "master", "other")
    img = make_image(tmp_path / "v1.img", 2 << 20, seed=15)
    mstore = tmp_path / "master"
    plain("publish", str(img), "--store", str(mstore), "--imi", "lab", "-q",
          "--signing-key", str(k["other"][0]))
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    r = procs.replica("site", "-v", "--store", str(tmp_path / "site"), "--master", url,
                      "--site", "s1", "--subscribe", "lab", "--trust-key", str(k["master"][1]))

    def refusals() -> list[str]:
        return [ln for ln in r.text().splitlines()
                if "pull=lab@1" in ln and "does not trust" in ln]

    wait_for("the first refusal", lambda: len(refusals()) == 1, timeout=60)
    for n in (1, 2):  # two more catalog changes: two more syncs meet lab@1 again
        other = make_image(tmp_path / f"x{n}.img", 1 << 20, seed=20 + n)
        plain("publish", str(other), "--store", str(mstore), "--imi", f"x{n}", "-q",
              "--signing-key", str(k["master"][0]))
        wait_for(f"refusal {n + 1}", lambda n=n: len(refusals()) == n + 1, timeout=60)
    levels = [ln.split()[1] for ln in refusals()]
    assert levels == ["ERROR", "DEBUG", "DEBUG"], refusals()


def test_unsigned_manifest_needs_insecure(tmp_path: Path, procs: Procs) -> None:
    k = keys(tmp_path, "master")
    img = make_image(tmp_path / "v1.img", 2 << 20, seed=14)
    mstore = tmp_path / "master"
    plain("publish", str(img), "--store", str(mstore), "--imi", "lab", "-q")  # unsigned
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    base = ["replica", "--master", url, "--site", "s1", "--subscribe", "lab", "--once"]
    # no key at all: the site does not even start
    p = plain(*base, "--store", str(tmp_path / "r0"), check=False)
    assert p.returncode == 2 and "--insecure-no-signature" in p.stderr
    assert not (tmp_path / "r0").exists()
    # a key, and a master that signs nothing: refused
    p = plain(*base, "--store", str(tmp_path / "r1"), "--trust-key", str(k["master"][1]),
              check=False)
    assert p.returncode == 1 and "it is not signed" in p.stderr
    # knowingly insecure: taken, with a loud warning
    p = plain(*base, "--store", str(tmp_path / "r2"), "--insecure-no-signature")
    assert "WARNING: --insecure-no-signature" in p.stderr
    assert served_sha256(procs, tmp_path / "r2", "lab") == sha256_file(img)


class Rotation:
    """A key rotation's setting: keys "old" and "new", images v1 and v2 (2 MiB, seeds
    ``seed`` and ``seed + 1``), a master store with v1 published as lab@1 under the old key,
    a master serving it, and ``replica(store, *args)``: a ``--once`` pull into
    ``tmp/store`` (site ``store``); ``both``: the arguments that trust both keys."""

    def __init__(self, tmp: Path, procs: Procs, seed: int) -> None:
        self.tmp = tmp
        self.keys = keys(tmp, "old", "new")
        self.v1 = make_image(tmp / "v1.img", 2 << 20, seed=seed)
        self.v2 = make_image(tmp / "v2.img", 2 << 20, seed=seed + 1)
        self.mstore = tmp / "master"
        plain("publish", str(self.v1), "--store", str(self.mstore), "--imi", "lab",
              "--version", "1", "-q", "--signing-key", str(self.keys["old"][0]))
        self.master = procs.master(self.mstore)
        self.url = f"http://127.0.0.1:{self.master.port}"
        self.both = ["--trust-key", str(self.keys["old"][1]),
                     "--trust-key", str(self.keys["new"][1])]

    def replica(self, store: str, *extra: str, check: bool = True) -> Any:
        return plain("replica", "--store", str(self.tmp / store), "--master", self.url,
                     "--site", store, "--subscribe", "lab", "--once", *extra, check=check)


def test_rotated_key_works_and_revoked_key_is_refused(tmp_path: Path, procs: Procs) -> None:
    """lab@1 is signed by the old key, lab@2 by the new one. A site that trusts both (the
    rotation) takes each; a site that trusts only the old key refuses lab@2; a site that
    revokes the old key refuses lab@1, naming it."""
    require("nbdcopy")
    r = Rotation(tmp_path, procs, seed=15)
    k, v1, v2, mstore, replica, both = r.keys, r.v1, r.v2, r.mstore, r.replica, r.both
    replica("rot", *both)  # lab@1 under the old key
    revoked = replica("rev", *both, "--revoked-key", str(k["old"][1]), check=False)
    assert revoked.returncode == 1
    assert f"signed by key {k['old'][2]}, which is revoked here" in revoked.stderr
    assert ls(tmp_path / "rev") == {}
    by_id = replica("rev2", *both, "--revoked-key", k["old"][2], check=False)
    assert by_id.returncode == 1 and "revoked" in by_id.stderr

    plain("publish", str(v2), "--store", str(mstore), "--imi", "lab", "--version", "2", "-q",
          "--signing-key", str(k["new"][0]))
    replica("rot", *both)  # the rotation: lab@2 under the new key, beside lab@1
    assert ls(tmp_path / "rot")["lab@2"]["latest"]
    assert served_sha256(procs, tmp_path / "rot", "lab@2") == sha256_file(v2)
    assert served_sha256(procs, tmp_path / "rot", "lab@1") == sha256_file(v1)
    only_old = replica("old-only", "--trust-key", str(k["old"][1]), check=False)
    assert only_old.returncode == 1 and k["new"][2] in only_old.stderr


def test_revoked_key_withdraws_the_versions_it_signed(tmp_path: Path, procs: Procs) -> None:
    """A site that revokes a key stops serving what that key signed at its next sync (a
    stolen key's versions may be the thief's): lab@1 (old key) is kept only for the
    workstation attached to it, refused to a machine booting anew, and lab@2 (new key) becomes
    what the site serves; a site whose only version the revoked key signed is left with
    none, and says why."""
    require("nbdcopy")
    r = Rotation(tmp_path, procs, seed=25)
    k, v1, v2, mstore, replica, both = r.keys, r.v1, r.v2, r.mstore, r.replica, r.both
    m, url = r.master, r.url
    replica("site", *both)
    replica("solo", "--trust-key", str(k["old"][1]))
    replica("solo2", "--trust-key", str(k["old"][1]))
    plain("publish", str(v2), "--store", str(mstore), "--imi", "lab", "--version", "2", "-q",
          "--signing-key", str(k["new"][0]))
    srv = procs.serve("--store", str(tmp_path / "site"))
    ws, rep = client_from("127.0.0.2", srv.port, "lab@1")
    try:
        assert rep == ACK and ws.read(0, 4096) == (0, v1.read_bytes()[:4096])
        wait_for("the workstation in the store's records",
                 lambda: ls(tmp_path / "site")["lab@1"]["clients"], timeout=30)
        p = replica("site", *both, "--revoked-key", str(k["old"][1]))
        assert f"signed_by={k['old'][2]}" in p.stderr and "withdrawn=" in p.stderr, p.stderr
        assert p.stdout.startswith("replicated lab@2:"), p.stdout  # lab@1 is not served
        held = ls(tmp_path / "site")
        assert held["lab@1"]["retired"] and held["lab@2"]["latest"], held
        # the master's view: the site holds lab@2, not the withdrawn lab@1
        [site] = [s for s in get_json(f"{url}/v1/admin/status")["sites"]
                  if s["name"] == "site"]
        assert sorted(site["versions"]) == ["lab@2"], site["versions"]
        assert site["lag"]["lab"]["complete"], site["lag"]
        assert read_all(ws, 2 << 20) == v1.read_bytes()  # the attached workstation reads on
    finally:
        ws.close()
    other, rep = client_from("127.0.0.3", srv.port, "lab@1")  # a machine booting anew
    other.close()
    assert rep != ACK
    srv.stop()
    assert served_sha256(procs, tmp_path / "site", "lab") == sha256_file(v2)
    again = replica("site", *both)  # the key trusted again: lab@1 is offered again
    assert again.returncode == 0 and not ls(tmp_path / "site")["lab@1"]["retired"]

    # the only version this site holds was signed by the key it now revokes: withdrawn all
    # the same (nothing is attached), and the newest one is refused as well (old key only)
    p = replica("solo", "--trust-key", str(k["old"][1]), "--revoked-key", k["old"][2],
                check=False)
    assert p.returncode == 1 and f"signed_by={k['old'][2]}" in p.stderr, p.stderr
    # marked at once (no new client gets it), deleted by a later pass: a client that attached
    # just before the mark must have been recorded first (replica.WITHDRAW_SETTLE)
    assert ls(tmp_path / "solo")["lab@1"]["retired"]
    again = replica("solo", "--trust-key", str(k["old"][1]), "--revoked-key", k["old"][2],
                    check=False)
    assert again.returncode == 1 and "lab@1" in ls(tmp_path / "solo")  # marked just now
    import time

    from icbdcache.replication.replica import WITHDRAW_SETTLE

    time.sleep(WITHDRAW_SETTLE)
    replica("solo", "--trust-key", str(k["old"][1]), "--revoked-key", k["old"][2],
            check=False)
    assert ls(tmp_path / "solo") == {}

    # the same with a workstation attached: kept for it (reconnecting by the iMI's name, so
    # latest stays), refused to others, and `ls` says both
    srv = procs.serve("--store", str(tmp_path / "solo2"))
    ws, rep = client_from("127.0.0.2", srv.port, "lab")
    try:
        assert rep == ACK
        wait_for("the workstation in the store's records",
                 lambda: ls(tmp_path / "solo2")["lab@1"]["clients"], timeout=30)
        p = replica("solo2", "--trust-key", str(k["old"][1]), "--revoked-key", k["old"][2],
                    check=False)
        assert p.returncode == 1 and f"signed_by={k['old'][2]}" in p.stderr, p.stderr
        row = ls(tmp_path / "solo2")["lab@1"]
        assert row["retired"] and row["latest"], row
        table = plain("ls", "--store", str(tmp_path / "solo2")).stdout
        assert "*retired" in table, table
    finally:
        ws.close()
    ws, rep = client_from("127.0.0.2", srv.port, "lab")  # it reconnects
    try:
        assert rep == ACK and read_all(ws, 2 << 20) == v1.read_bytes()
    finally:
        ws.close()
    other, rep = client_from("127.0.0.3", srv.port, "lab")
    other.close()
    assert rep != ACK
    srv.stop()

    # with the master gone: a replica withdraws at its start, before any answer
    m.stop()
    daemon = subprocess.Popen(
        [ICBD, "replica", "--store", str(tmp_path / "site"), "--master", url, "--site", "site",
         "--subscribe", "lab", *both, "--revoked-key", str(k["old"][1])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("lab@1 withdrawn without a master",
                 lambda: ls(tmp_path / "site")["lab@1"]["retired"], timeout=30)
        assert ls(tmp_path / "site")["lab@2"]["latest"]
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and f"signed_by={k['old'][2]}" in err, err


def test_revocation_reaches_every_worker_a_bundle_and_a_reload(tmp_path: Path,
                                                             procs: Procs) -> None:
    """After a review: ``serve --master --workers 2`` handed a revoked key's version to new
    machines from the workers that do not run the replica, until worker 0 had withdrawn it;
    a version taken from a bundle was never withdrawn; a workstation that attached just
    before the withdrawal had its version deleted under it; and a SIGHUP after
    ``revoked_key`` was added to the config file said no restart was needed."""
    require("nbdcopy")
    r = Rotation(tmp_path, procs, seed=35)
    k, v1 = r.keys, r.v1
    r.replica("site", *r.both)  # lab@1, signed by the old key
    r.replica("site2", *r.both)
    r.replica("site3", *r.both)
    plain("bundle", "create", "lab@1", "--store", str(r.mstore), "--out",
          str(tmp_path / "b1.bundle"), "-q")
    plain("bundle", "import", str(tmp_path / "b1.bundle"), "--store", str(tmp_path / "bx"),
          "--trust-key", str(k["old"][1]), "-q")
    dead = "http://127.0.0.1:9"  # no master (serve goes on without one)
    revoke = ["--trust-key", str(k["new"][1]), "--revoked-key", str(k["old"][1])]

    # every worker refuses it from its first client on (one client per source address: the
    # kernel spreads them over both workers)
    srv = procs.serve("--store", str(tmp_path / "site"), "--workers", "2", "--master", dead,
                      "--site", "site", "--subscribe", "lab", *revoke)
    refused = 0
    for i in range(2, 12):
        c, rep = client_from(f"127.0.0.{i}", srv.port, "lab@1")
        c.close()
        refused += rep != ACK
    assert refused == 10
    srv.stop()

    # the same in one worker that is not worker 0, before any replica marked anything: the
    # service of every worker tells its node what is withdrawn
    import asyncio

    from icbdcache.node import Node
    from icbdcache.replication.client import MasterClient
    from icbdcache.replication.replica import ReplicaConfig, ReplicaService
    from icbdcache.replication.signing import trust_from
    from icbdcache.store import Store

    async def second_worker() -> tuple[bool, bool, bool]:
        store = Store(tmp_path / "site2")
        client = MasterClient(dead)
        try:
            node = Node(store)
            before = node.resolve("lab@1", client="127.0.0.9") is not None
            svc = ReplicaService(client, ReplicaConfig(
                site="site2", subscribe=["lab"],
                trust=trust_from([str(k["new"][1])], [str(k["old"][1])], False)))
            await svc.for_worker(1).start(node)
            return (before, node.resolve("lab@1", client="127.0.0.9") is None,
                    node.resolve("lab@1") is not None)  # not a client's question
        finally:
            await client.close()
            store.close()

    assert asyncio.run(second_worker()) == (True, True, True)
    assert not ls(tmp_path / "site2")["lab@1"]["retired"]  # nothing marked: the node refused

    # the mark's time is the store's, so another process (a second `--once`, a restart) does
    # not delete a version marked a moment ago, before the serving processes have recorded
    # who ran it; once WITHDRAW_SETTLE has passed, it does
    from icbdcache.replication import replica as replica_mod

    def withdraw() -> tuple[bool, bool]:  # a replica process of its own, each time
        store = Store(tmp_path / "site2")
        client = MasterClient(dead)
        try:
            rep = replica_mod.Replica(store, client, ReplicaConfig(
                site="site2", subscribe=["lab"],
                trust=trust_from([str(k["new"][1])], [str(k["old"][1])], False)))
            rep.withdraw_revoked()
            meta = store.version("lab@1")
            return meta is not None, meta is not None and meta.retired
        finally:
            asyncio.run(client.close())
            store.close()

    assert withdraw() == (True, True)  # marked
    assert withdraw() == (True, True)  # another process, at once: kept
    settle = replica_mod.WITHDRAW_SETTLE
    replica_mod.WITHDRAW_SETTLE = 0.0
    try:
        assert withdraw() == (False, False)  # settled, nobody runs it: deleted
    finally:
        replica_mod.WITHDRAW_SETTLE = settle
    store = Store(tmp_path / "site2", readonly=True)
    try:
        assert store.record("withdrawn/lab@1") is None  # its mark goes with it
    finally:
        store.close()

    # a bundle's version, at a site that also has a master
    p = plain("replica", "--store", str(tmp_path / "bx"), "--master", r.url, "--site", "bx",
              "--subscribe", "lab", "--once", *revoke, check=False)
    assert f"signed_by={k['old'][2]}" in p.stderr, p.stderr
    assert ls(tmp_path / "bx")["lab@1"]["retired"]

    # a workstation that attached a moment before the replica started keeps its version
    srv = procs.serve("--store", str(tmp_path / "site3"))
    ws, rep = client_from("127.0.0.2", srv.port, "lab")
    try:
        assert rep == ACK
        plain("replica", "--store", str(tmp_path / "site3"), "--master", r.url, "--site", "site3",
              "--subscribe", "lab", "--once", *revoke, check=False)
        assert read_all(ws, 2 << 20) == v1.read_bytes()
    finally:
        ws.close()
    wait_for("the workstation in the store's records",
             lambda: ls(tmp_path / "site3")["lab@1"]["clients"], timeout=30)
    plain("replica", "--store", str(tmp_path / "site3"), "--master", r.url, "--site", "site3",
          "--subscribe", "lab", "--once", *revoke, check=False)
    assert ls(tmp_path / "site3")["lab@1"]["retired"]  # kept for it: it ran it
    ws, rep = client_from("127.0.0.2", srv.port, "lab")
    try:
        assert rep == ACK and read_all(ws, 2 << 20) == v1.read_bytes()
    finally:
        ws.close()
    srv.stop()

    # SIGHUP: the replica's settings need a restart, and the log says which
    import signal
    import time

    conf = tmp_path / "serve.toml"
    port = free_port()
    conf.write_text(f'store = "{tmp_path / "site"}"\nlisten = ["127.0.0.1:{port}"]\n'
                    f'master = "{dead}"\nsite = "site"\nsubscribe = ["lab"]\n'
                    f'trust_key = ["{k["old"][1]}"]\n')
    log = tmp_path / "reload.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--config", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for("serve listening", lambda: "listening" in log.read_text(), timeout=30)
        conf.write_text(conf.read_text() + f'revoked_key = ["{k["old"][2]}"]\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "event=reload" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "restart_needed=revoked-key" in log.read_text(), log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_revoked_key_with_insecure_is_refused_and_once_stopped_is_not_success(
        tmp_path: Path) -> None:
    """--revoked-key beside --insecure-no-signature (which checks no signature) was taken and
    ignored: now exit 2, naming both. `replica --once` stopped by SIGTERM before its pull
    completed exited 0, which means "complete": now 1."""
    import signal
    import socket
    import time

    k = keys(tmp_path, "a")
    p = plain("replica", "--store", str(tmp_path / "s"), "--master", "http://127.0.0.1:9",
              "--site", "s", "--subscribe", "lab", "--once", "--insecure-no-signature",
              "--revoked-key", str(k["a"][1]), check=False)
    assert p.returncode == 2 and "--revoked-key would have no effect" in p.stderr, p.stderr
    with socket.socket() as mute:  # a master that takes the connection and never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        proc = subprocess.Popen(
            [ICBD, "replica", "--store", str(tmp_path / "s"), "--master",
             f"http://127.0.0.1:{mute.getsockname()[1]}", "--site", "s", "--subscribe", "lab",
             "--once", "--trust-key", str(k["a"][1])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert "stopped by a signal before every subscribed version was complete" in err
    assert "replicated" not in out


def test_master_serves_the_signature_and_strong_map(tmp_path: Path, procs: Procs) -> None:
    """The wire: /v1/signature names the key and the maps; the manifest with ?strong=1 is
    the chunk map followed by 32 bytes per chunk, whose BLAKE3 the header gives."""
    import urllib.request

    from icbdcache.store.chunks import strong_hex

    k = keys(tmp_path, "master")
    img = make_image(tmp_path / "v1.img", 1 << 20, seed=17)
    mstore = tmp_path / "master"
    plain("publish", str(img), "--store", str(mstore), "--imi", "lab", "-q",
          "--signing-key", str(k["master"][0]))
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}/v1"
    with urllib.request.urlopen(f"{url}/signature/lab/1") as r:
        sig = json.loads(r.read())
        assert r.headers["Cache-Control"] == "no-store"
    st = json.loads(sig["statement"])
    assert st["key_id"] == k["master"][2] and st["imi"] == "lab" and st["version"] == "1"
    assert len(bytes.fromhex(sig["signature"])) == 64
    with urllib.request.urlopen(f"{url}/manifest/lab/1?strong=1") as r:
        body, strong_header = r.read(), r.headers["X-Icbd-Strong"]
    n = 16  # 1 MiB in 64 KiB chunks
    assert len(body) == n * (16 + 32)
    assert strong_hex(body[16 * n :]) == strong_header == st["strong"]
    assert strong_hex(body[: 16 * n]) == st["map"]


def test_replicated_version_of_an_old_store_takes_the_signed_manifest_again(
        tmp_path: Path, procs: Procs, collide: None) -> None:
    """A site store of format 1 holds a replicated version, one of whose chunks is not the
    master's (same fast digest: the test hook). After the upgrade the replica takes the
    master's signed strong map, drops that chunk, fetches it again, and the version reads
    the master's bytes."""
    require("nbdcopy")
    img = make_image(tmp_path / "lab.img", 4 << 20, seed=32)
    mstore, site = tmp_path / "master", tmp_path / "site"
    publish(mstore, img)
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    once = ["replica", "--store", str(site), "--master", url, "--site", "s1",
            "--subscribe", "lab", "--once"]
    run(*once)
    make_old(site)
    # a held chunk whose tail is not the master's: its fast digest still matches
    env = lmdb.open(str(site), max_dbs=20, map_size=1 << 30)
    try:
        chunks = env.open_db(b"chunks")
        with env.begin(write=True) as txn:
            k, v = next(iter(txn.cursor(db=chunks)))
            bad = bytearray(v)
            bad[PREFIX + 900] ^= 0xFF
            txn.put(k, bytes(bad), db=chunks)
    finally:
        env.close()
    p = run(*once, check=False)
    assert p.returncode == 2 and "store upgrade" in p.stderr
    out = run("store", "upgrade", "--store", str(site)).stdout
    assert "1 versions from a master left" in out
    p = run(*once)
    assert "signed=lab@1" in p.stderr and "dropped_chunks=1" in p.stderr
    assert served_sha256(procs, site, "lab") == sha256_file(img)
