"""Issue 19: a master the network reaches hands images only to sites it knows.

Real processes in a network namespace the test makes (tests/netns.py): the master listens on
an address of that namespace that is not loopback (10.219.0.1, or the wildcard), requests come
from inside it. Checked: without site credentials the master does not start (exit 2, the ways
out named) and does with ``--insecure-open`` (warned at start and in ``admin status``); with a
token file, or with tokens from ``admin site add`` (kept hashed in the registry), a site
without its token gets 401 and nothing of the catalog (the iMI's name included) for the
catalog, a watch, a manifest or a chunk; ``admin forget`` revokes a site's token at once.
In-process checks (aiohttp test server) cover the policy's corners: loopback names, a watch
waiting when its token is revoked, the admin API's answers.

Assertions are on statuses, bytes and exit codes; waits poll a state with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from conftest import BIN, make_image, stop_process, trusted
from netns import ADDR, NetNS, make_netns

from icbdcache.replication.auth import Auth, new_token, token_digest
from icbdcache.replication.exposure import ExposureError, decide, is_loopback_listen
from icbdcache.replication.master import Master
from icbdcache.replication.publish import publish
from icbdcache.replication.registry.embedded import EmbeddedRegistry
from icbdcache.store import Store
from icbdcache.store.chunks import CHUNK_SIZE, ZERO, digest

ICBD = str(BIN / "icbd-cache")
#: A distinctive iMI name: a refused answer must not contain it.
IMI = "physics-lab"
PORT = 10810  # every port is free in the test's own namespace
BASE = f"http://{ADDR}:{PORT}"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ICBD, *trusted(args)], capture_output=True, text=True, timeout=120,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


def chunk_map(image: Path) -> tuple[bytes, dict[bytes, bytes]]:
    """(the image's chunk map, its non-zero chunks by digest)."""
    data = image.read_bytes()
    digests, chunks = [], {}
    for i in range(0, len(data), CHUNK_SIZE):
        d = digest(data[i : i + CHUNK_SIZE])
        digests.append(d)
        if d != ZERO:
            chunks[d] = data[i : i + CHUNK_SIZE]
    return b"".join(digests), chunks


class Lab:
    """A master store holding ``IMI@1`` and the processes a test starts in its namespace
    (stopped by PID, then the namespace deleted)."""

    def __init__(self, tmp: Path, ns: NetNS) -> None:
        self.tmp, self.ns = tmp, ns
        self.image = make_image(tmp / "lab-1.img", 4 << 20, seed=19)
        self.store = tmp / "master"
        run("publish", str(self.image), "--store", str(self.store), "--imi", IMI, "-q")
        self.map, self.chunks = chunk_map(self.image)
        self.procs: list[subprocess.Popen[bytes]] = []

    def master(self, *args: str, listen: str = f"0.0.0.0:{PORT}",
               host: str = ADDR) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"master-{len(self.procs)}.log"
        p = self.ns.popen(ICBD, "master", "--store", str(self.store), "--listen", listen,
                          *args, log=log)
        self.procs.append(p)
        try:
            self.ns.wait_port(host, PORT, p)
        except RuntimeError as e:
            raise AssertionError(f"master: {e}: {log.read_text()}") from None
        return p, log

    def stop(self, p: subprocess.Popen[bytes]) -> int:
        return stop_process(p, signal.SIGTERM, 20)

    def close(self) -> None:
        for p in self.procs:
            stop_process(p, signal.SIGTERM, 20)
        self.ns.delete()

    def guarded(self) -> list[tuple[str, str, Any]]:
        """(method, URL, body) of every replica-facing request that gives away images."""
        d = next(iter(self.chunks))
        return [("GET", f"{BASE}/v1/catalog", None),
                ("GET", f"{BASE}/v1/watch?since=-1&timeout=1", None),
                ("GET", f"{BASE}/v1/manifest/{IMI}/1", None),
                ("GET", f"{BASE}/v1/chunk/{d.hex()}", None),
                ("POST", f"{BASE}/v1/chunks", d),
                ("GET", f"{BASE}/v1/boot/{IMI}/1/kernel", None),
                ("POST", f"{BASE}/v1/sites/s1/register", {"subscribe": [IMI]})]

    def assert_refused(self, token: str | None, why: str) -> None:
        """Every guarded request with ``token`` gets 401 with ``why`` and nothing of the
        catalog, the manifest or a chunk."""
        answers = self.ns.http_many([(m, u, token, b) for m, u, b in self.guarded()])
        some_chunk = next(iter(self.chunks.values()))
        for (method, url, _), (status, body) in zip(self.guarded(), answers, strict=True):
            assert status == 401, (method, url, status, body[:200])
            assert why in json.loads(body)["error"], (url, body)
            assert IMI.encode() not in body and self.map[:16].hex().encode() not in body
            assert some_chunk[:64] not in body

    def assert_served(self, token: str | None) -> None:
        """With ``token`` the catalog names the iMI, the manifest is the chunk map and a
        chunk its bytes."""
        d, chunk = next(iter(self.chunks.items()))
        (s1, cat), (s2, manifest), (s3, got) = self.ns.http_many([
            ("GET", f"{BASE}/v1/catalog", token, None),
            ("GET", f"{BASE}/v1/manifest/{IMI}/1", token, None),
            ("GET", f"{BASE}/v1/chunk/{d.hex()}", token, None)])
        assert (s1, s2, s3) == (200, 200, 200), (s1, s2, s3, cat[:200])
        assert [v["imi"] for v in json.loads(cat)["versions"]] == [IMI]
        assert manifest == self.map and got == chunk


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    ns = make_netns()
    try:
        lab = Lab(tmp_path, ns)
    except BaseException:
        ns.delete()
        raise
    try:
        yield lab
    finally:
        lab.close()


# ------------------------------------------------------------------------------ real processes


def test_network_master_needs_site_credentials_or_insecure_open(lab: Lab) -> None:
    ns = lab.ns
    for listen in (f"{ADDR}:{PORT}", f"0.0.0.0:{PORT}"):
        p = ns.run(ICBD, "master", "--store", str(lab.store), "--listen", listen)
        assert p.returncode == 2, p.stderr
        assert f"refusing to listen on {listen} without site credentials" in p.stderr
        for way in ("admin site add", "--token-file", "--client-ca", "--insecure-open"):
            assert way in p.stderr, way
    assert ns.http("GET", f"{BASE}/v1/catalog", timeout=5)[0] == 0  # nothing listens
    tokens = lab.tmp / "tokens"
    tokens.write_text("s1 file-token-1\n")
    p = ns.run(ICBD, "master", "--store", str(lab.store), "--listen", f"0.0.0.0:{PORT}",
               "--insecure-open", "--token-file", str(tokens))
    assert p.returncode == 2 and "contradicts" in p.stderr, p.stderr

    # --insecure-open: it starts, serves anyone, and says so at start and in admin status
    m, log = lab.master("--insecure-open")
    lab.assert_served(None)
    assert "WARNING" in log.read_text() and "event=insecure_open" in log.read_text()
    st = json.loads(ns.run(ICBD, "admin", "--json", "status").stdout)  # 127.0.0.1 inside
    assert st["access"]["insecure_open"] is True
    assert st["access"]["sites_need_credentials"] is False
    assert st["access"]["warning"].startswith("--insecure-open: this master answers anyone")
    table = ns.run(ICBD, "admin", "status").stdout
    assert table.splitlines()[0].startswith("WARNING: --insecure-open"), table
    assert lab.stop(m) == 0

    # on the namespace's own loopback it stays open, and warns about nothing
    m, log = lab.master(listen=f"127.0.0.1:{PORT}", host="127.0.0.1")
    status, body = ns.http("GET", f"http://127.0.0.1:{PORT}/v1/catalog")
    assert status == 200 and IMI.encode() in body
    st = json.loads(ns.run(ICBD, "admin", "--json", "status").stdout)
    assert st["access"] == {**st["access"], "loopback": True, "sites_need_credentials": False,
                            "warning": None}
    assert "insecure_open" not in log.read_text() and "WARNING" not in log.read_text()
    assert lab.stop(m) == 0


def test_token_file_master_on_the_network_serves_its_sites_only(lab: Lab) -> None:
    tokens = lab.tmp / "tokens"
    tokens.write_text("s1 file-token-1\n")
    own = lab.tmp / "s1.token"
    own.write_text("file-token-1\n")
    lab.master("--token-file", str(tokens))
    lab.assert_refused(None, "hands images only to sites it knows")
    lab.assert_refused("file-token-2", "unknown or revoked token")
    lab.assert_served("file-token-1")
    replica = [ICBD, *trusted(["replica", "--master", BASE, "--site", "s1", "--subscribe", IMI,
                               "--once"])]
    p = lab.ns.run(*replica, "--store", str(lab.tmp / "r0"))
    assert p.returncode == 1 and "401" in p.stderr and "--master-token-file" in p.stderr
    p = lab.ns.run(*replica, "--store", str(lab.tmp / "r1"), "--master-token-file", str(own))
    assert p.returncode == 0, p.stderr
    [row] = json.loads(run("ls", "--json", "--store", str(lab.tmp / "r1")).stdout)
    assert (row["imi"], row["latest"], row["held"]) == (IMI, True, row["needed"])


def test_registry_site_tokens_work_at_once_and_forget_revokes_them_at_once(lab: Lab) -> None:
    ns = lab.ns
    # a token before the master's first start, written into its store's registry
    p = run("admin", "site", "add", "s1", "--store", str(lab.store))
    tok1 = p.stdout.strip()
    assert p.stdout == tok1 + "\n" and len(tok1) == 43  # the token alone on stdout
    assert "--master-token-file" in p.stderr and "admin forget s1" in p.stderr
    again = run("admin", "site", "add", "s1", "--store", str(lab.store), check=False)
    assert again.returncode == 1 and "already has a token" in again.stderr
    assert again.stdout == ""
    # kept hashed: the store holds the token's SHA-256, never the token
    data = (lab.store / "data.mdb").read_bytes()
    assert tok1.encode() not in data
    assert hashlib.sha256(tok1.encode()).hexdigest().encode() in data

    m, log = lab.master()  # no token file, no CA: the registry's tokens let it start
    assert 'sites="need credentials"' in log.read_text()
    lab.assert_refused(None, "hands images only to sites it knows")
    lab.assert_served(tok1)
    # another site's token, through the admin API of the running master: works at once
    p = ns.run(ICBD, "admin", "site", "add", "s2")
    assert p.returncode == 0, p.stderr
    tok2 = p.stdout.strip()
    lab.assert_served(tok2)
    reg = {"address": "", "subscribe": [IMI]}
    (s_other, body), (s_own, _) = ns.http_many([
        ("POST", f"{BASE}/v1/sites/s1/register", tok2, reg),
        ("POST", f"{BASE}/v1/sites/s2/register", tok2, reg)])
    assert s_other == 401 and b"not for site" in body and s_own == 200
    own = lab.tmp / "s1.token"
    own.write_text(tok1 + "\n")
    replica = [ICBD, *trusted(["replica", "--store", str(lab.tmp / "r1"), "--master", BASE,
                               "--site", "s1", "--subscribe", IMI, "--once",
                               "--master-token-file", str(own)])]
    assert ns.run(*replica).returncode == 0
    st = json.loads(ns.run(ICBD, "admin", "--json", "status").stdout)
    assert {s["name"]: bool(s["token_created"]) for s in st["sites"]} == {"s1": True,
                                                                           "s2": True}

    # forget s1: its token fails its very next request, s2's keeps working
    p = ns.run(ICBD, "admin", "forget", "s1")
    assert p.returncode == 0 and p.stdout.strip() == "forgot s1 (its token revoked)"
    lab.assert_refused(tok1, "unknown or revoked token")
    p = ns.run(*replica)
    assert p.returncode == 1 and "401" in p.stderr
    lab.assert_served(tok2)
    # a new token for s2 replaces the old one at once
    tok2b = ns.run(ICBD, "admin", "site", "add", "s2", "--force").stdout.strip()
    assert tok2b and tok2b != tok2
    lab.assert_refused(tok2, "unknown or revoked token")
    lab.assert_served(tok2b)

    # with every site forgotten, a restart on the network is refused again
    assert ns.run(ICBD, "admin", "forget", "s2").returncode == 0
    assert lab.stop(m) == 0
    p = ns.run(ICBD, "master", "--store", str(lab.store), "--listen", f"0.0.0.0:{PORT}")
    assert p.returncode == 2 and "without site credentials" in p.stderr


# ------------------------------------------------------------------------------ in-process


def test_loopback_listen_addresses() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback_listen(host), host
    for host in ("0.0.0.0", "::", "", "10.219.0.1", "192.0.2.7", "no-such-host.invalid"):
        assert not is_loopback_listen(host), host


def test_decide_who_may_start_open() -> None:
    def d(host: str, **kw: Any) -> Any:
        args = {"token_file": False, "client_ca": False, "registry_tokens": 0,
                "insecure_open": False, **kw}
        return decide(host, 10810, **args)

    assert d("127.0.0.1").open and d("127.0.0.1").warning is None
    assert not d("127.0.0.1", token_file=True).open  # credentials close a loopback master
    with pytest.raises(ExposureError, match=r"refusing to listen on 0\.0\.0\.0:10810"):
        d("0.0.0.0")
    with pytest.raises(ExposureError, match=r"refusing to listen on \[::\]:10810"):
        d("::")
    for kw in ({"token_file": True}, {"client_ca": True}, {"registry_tokens": 1}):
        a = d("0.0.0.0", **kw)
        assert not a.open and a.warning is None, kw
    a = d("0.0.0.0", insecure_open=True)
    assert a.open and a.warning is not None and "0.0.0.0:10810" in a.warning
    with pytest.raises(ExposureError, match="contradicts"):
        d("0.0.0.0", insecure_open=True, client_ca=True)


def test_registry_owner_is_bound_to_its_site() -> None:
    closed = Auth(closed=True)
    assert closed.check_replica(None, False) is not None
    assert closed.check_replica("Bearer t", False, registry_owner="a") is None
    assert closed.check_replica("Bearer t", False, "a", registry_owner="a") is None
    assert "not for site" in str(closed.check_replica("Bearer t", False, "b",
                                                      registry_owner="a"))
    # a registry site named like a token file's wildcard is no wildcard
    assert closed.check_replica("Bearer t", False, "b", registry_owner="*") is not None
    assert closed.check_replica("Bearer t", False) == "unknown or revoked token"
    both = Auth(site_tokens={"f": "a"}, closed=True)
    assert both.check_replica("Bearer f", False, "a") is None
    assert both.check_replica("Bearer r", False, "c", registry_owner="c") is None
    assert len(new_token()) == 43 and new_token() != new_token()
    assert token_digest("x") == hashlib.sha256(b"x").hexdigest()


def _in_process(tmp_path: Path, body: Any) -> None:
    """Run ``body(session, base_url, master)`` against an in-process master over a store
    holding ``IMI@1``, sites needing credentials (its registry's tokens only)."""

    async def main() -> None:
        img = make_image(tmp_path / "img", 1 << 20, seed=7)
        store = Store(tmp_path / "mstore")
        registry = EmbeddedRegistry(store)
        await publish(store, registry, str(img), IMI, "1")
        master = Master(store, registry, Auth(closed=True))
        srv = TestServer(master.app(), host="127.0.0.1")
        await srv.start_server()
        try:
            async with ClientSession() as s:
                await body(s, f"http://127.0.0.1:{srv.port}", master)
        finally:
            await srv.close()
            await registry.close()
            store.close()

    asyncio.run(main())


def test_a_watch_waiting_when_its_token_is_revoked_gets_no_catalog(tmp_path: Path) -> None:
    async def body(s: ClientSession, base: str, m: Master) -> None:
        async with s.post(f"{base}/v1/admin/site/add", json={"site": "s1"}) as r:
            assert r.status == 200
            tok = (await r.json())["token"]
        hdr = {"Authorization": f"Bearer {tok}"}
        async with s.get(f"{base}/v1/catalog", headers=hdr) as r:
            assert r.status == 200
            gen = (await r.json())["generation"]
        waiting = asyncio.Event()
        wait_change = m.registry.wait_change

        async def noted(since: int, timeout: float) -> int:
            waiting.set()
            return await wait_change(since, timeout)

        m.registry.wait_change = noted  # type: ignore[method-assign]

        async def watch() -> tuple[int, bytes]:
            async with s.get(f"{base}/v1/watch?since={gen}&timeout=60", headers=hdr) as r:
                return r.status, await r.read()

        task = asyncio.create_task(watch())
        await asyncio.wait_for(waiting.wait(), 30)  # the poll is waiting, past the check
        async with s.post(f"{base}/v1/admin/forget", json={"site": "s1"}) as r:
            assert r.status == 200
            assert await r.json() == {"forgot": "s1", "revoked": True, "token_file": False}
        status, raw = await asyncio.wait_for(task, 30)  # forget woke it: a new generation
        assert status == 401 and b"revoked" in raw and IMI.encode() not in raw

    _in_process(tmp_path, body)


def test_admin_site_add_answers(tmp_path: Path) -> None:
    async def body(s: ClientSession, base: str, m: Master) -> None:
        async def add(payload: Any) -> tuple[int, Any]:
            async with s.post(f"{base}/v1/admin/site/add", json=payload) as r:
                return r.status, await r.json()

        status, a = await add({"site": "s1"})
        assert status == 200 and a["site"] == "s1" and a["replaced"] is False
        assert a["sites_need_credentials"] is True and len(a["token"]) == 43
        assert await m.registry.token_site(token_digest(a["token"])) == "s1"
        status, e = await add({"site": "s1"})
        assert status == 409 and "already has a token" in e["error"]
        status, b = await add({"site": "s1", "replace": True})
        assert status == 200 and b["replaced"] is True
        assert await m.registry.token_site(token_digest(a["token"])) is None
        for bad in ({"site": "*"}, {"site": "a b"}, {"site": "s", "replace": "yes"}, {}):
            status, e = await add(bad)
            assert status == 400, (bad, e)
        assert [x.name for x in await m.registry.sites()] == ["s1"]
        async with s.get(f"{base}/v1/admin/status") as r:
            st = await r.json()
        assert st["access"] == {"sites_need_credentials": True, "warning": None}
        assert st["sites"][0]["token_created"] == pytest.approx(b["created"])

    _in_process(tmp_path, body)


def test_admin_site_add_offline_needs_a_store(tmp_path: Path) -> None:
    p = run("admin", "site", "add", "s1", "--store", str(tmp_path / "nope"), check=False)
    assert p.returncode == 1 and "no store there" in p.stderr and p.stdout == ""
    assert not (tmp_path / "nope").exists()
    p = run("admin", "status", "--store", str(tmp_path), check=False)
    assert p.returncode == 2 and "for 'site add' only" in p.stderr
    p = run("admin", "site", "add", "*", "--store", str(tmp_path), check=False)
    assert p.returncode == 1 and "no site name" in p.stderr


def test_status_table_shows_the_warning_first() -> None:
    from icbdcache.commands.master import status_table

    warned = status_table({"sites": [], "access": {"sites_need_credentials": False,
                                                   "warning": "--insecure-open: x"}})
    assert warned.splitlines()[0] == "WARNING: --insecure-open: x"
    assert "sites need no credentials" in warned
    quiet = status_table({"sites": [], "access": {"sites_need_credentials": True,
                                                  "warning": None}})
    assert quiet.splitlines()[0].split()[0] == "SITE" and "sites need credentials" in quiet

