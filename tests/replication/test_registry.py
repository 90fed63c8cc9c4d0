"""The registry, one suite run against both backends: the embedded one on a store in a
temporary directory, and etcd against a real etcd started for the session (tests/etcd.py) on
127.0.0.1, each test under its own key prefix.

Waits poll with generous deadlines and assert on states and values, never on elapsed times.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import REPO, free_port
from etcd import EtcdMissing, EtcdServer

from icbdcache.replication.registry import (
    Registry,
    RegistryError,
    SiteTokenExists,
    VersionRecord,
    open_registry,
)
from icbdcache.store import Store

T = TypeVar("T")

Factory = Callable[..., Registry]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def vrec(imi: str, version: str, manifest: str = "aa" * 16, size: int = 1 << 20,
         published: float = 0.0) -> VersionRecord:
    return VersionRecord(imi=imi, version=version, size=size, chunk_size=65536,
                         manifest=manifest, distinct_bytes=size // 2, published=published,
                         master="https://master:8443")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    try:
        import aetcd  # noqa: F401
    except ImportError:
        pytest.skip("aetcd is not installed (pip install -e '.[etcd]'; scripts/setup does)")
    try:
        server = EtcdServer.start(tmp_path_factory.mktemp("etcd"))
    except EtcdMissing as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["embedded", "etcd"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Factory]:
    """``make(down_after=...)``: a new registry object over the test's shared state (two
    objects are two masters on one store or one etcd). Call it inside the event loop."""
    stores: list[Store] = []
    if backend == "embedded":
        store = Store(tmp_path / "store")
        stores.append(store)

        def factory(down_after: float = 30.0) -> Registry:
            return open_registry(None, store=store, down_after=down_after)
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        uri = server.uri(f"/t-{uuid.uuid4().hex[:12]}")

        def factory(down_after: float = 30.0) -> Registry:
            return open_registry(uri, down_after=down_after)

    yield factory
    for s in stores:
        s.close()


async def closing(*regs: Registry) -> None:
    for r in regs:
        await r.close()


# ---------------------------------------------------------------------------- catalog

def test_publish_versions_retire(make: Factory) -> None:
    async def body() -> None:
        reg = make()
        try:
            assert await reg.versions() == []
            await reg.publish(vrec("lab", "1", published=100.0))
            await reg.publish(vrec("lab", "2", manifest="bb" * 16, published=200.0))
            await reg.publish(vrec("office", "1", manifest="cc" * 16))
            await reg.publish(vrec("lab@x", "1", manifest="dd" * 16))
            lab = await reg.versions("lab")
            assert [v.key for v in lab] == ["lab@1", "lab@2"]
            assert lab[0] == vrec("lab", "1", published=100.0)
            assert [v.key for v in await reg.versions()] == [
                "lab@1", "lab@2", "office@1", "lab@x@1"]
            office = (await reg.versions("office"))[0]
            assert office.published > 0  # set at publication when not given
            assert [v.key for v in await reg.versions("none")] == []

            await reg.retire("lab", "1")
            lab = await reg.versions("lab")
            assert [(v.key, v.retired) for v in lab] == [("lab@1", True), ("lab@2", False)]
            with pytest.raises(RegistryError):
                await reg.retire("lab", "9")
        finally:
            await closing(reg)

    run(body())


def test_unretire_and_forget(make: Factory) -> None:
    """A retired version offered again, and a site forgotten (both advance the generation);
    unknown names are refused or reported, never created."""
    async def body() -> None:
        reg = make()
        try:
            await reg.publish(vrec("lab", "1"))
            await reg.retire("lab", "1")
            g = await reg.generation()
            await reg.unretire("lab", "1")
            assert [v.retired for v in await reg.versions("lab")] == [False]
            assert await reg.generation() > g
            g = await reg.generation()
            await reg.unretire("lab", "1")  # not retired: nothing changes
            assert await reg.generation() == g
            with pytest.raises(RegistryError):
                await reg.unretire("lab", "9")
            await reg.register("s1", "10.0.0.1:10809")
            await reg.subscribe("s1", "lab")
            await reg.keepalive("s1", {"state": "idle"})
            g = await reg.generation()
            assert await reg.forget("s1") is True
            assert await reg.site("s1") is None and await reg.sites() == []
            assert await reg.generation() > g
            assert await reg.forget("s1") is False
            rec = await reg.keepalive("s1", {"state": "idle"})  # it comes back: anew
            assert rec.subscriptions == []
        finally:
            await closing(reg)

    run(body())


def test_duplicate_publish_refused(make: Factory) -> None:
    async def body() -> None:
        reg = make()
        try:
            await reg.publish(vrec("lab", "1", manifest="aa" * 16))
            gen = await reg.generation()
            await reg.publish(vrec("lab", "1", manifest="aa" * 16))  # the same: no change
            assert await reg.generation() == gen
            with pytest.raises(RegistryError, match="already published"):
                await reg.publish(vrec("lab", "1", manifest="ee" * 16))
            assert [v.manifest for v in await reg.versions("lab")] == ["aa" * 16]
            assert await reg.generation() == gen
        finally:
            await closing(reg)

    run(body())


def test_concurrent_publish_one_wins(make: Factory) -> None:
    """Two masters publish the same version with different manifests at once: exactly one
    succeeds, and the registry holds its manifest."""
    async def body() -> None:
        a, b = make(), make()
        try:
            res = await asyncio.gather(
                *[r.publish(vrec("lab", "1", manifest=m * 16))
                  for r, m in ((a, "aa"), (b, "bb"), (a, "cc"), (b, "dd"))],
                return_exceptions=True)
            ok = [i for i, r in enumerate(res) if r is None]
            assert len(ok) == 1
            assert all(isinstance(r, RegistryError) for r in res if r is not None)
            winner = ["aa", "bb", "cc", "dd"][ok[0]] * 16
            assert [v.manifest for v in await b.versions("lab")] == [winner]
        finally:
            await closing(a, b)

    run(body())


def test_generation_advances(make: Factory) -> None:
    async def body() -> None:
        reg = make()
        try:
            g0 = await reg.generation()
            await reg.publish(vrec("lab", "1"))
            g1 = await reg.generation()
            assert g1 > g0
            await reg.retire("lab", "1")
            g2 = await reg.generation()
            assert g2 > g1
            await reg.register("site-a", "10.0.0.1:10809")
            await reg.keepalive("site-a", {"held": ["lab@1"]})
            await reg.keepalive("site-b", {})
            assert await reg.generation() == g2  # keep-alives and registration: no change
            await reg.subscribe("site-a", "lab")
            g3 = await reg.generation()
            assert g3 > g2
            await reg.unsubscribe("site-a", "lab")
            g4 = await reg.generation()
            assert g4 > g3
            await reg.unsubscribe("site-a", "lab")  # absent: no error
            await reg.keepalive("site-a", {"held": []})
            assert await reg.generation() == g4
        finally:
            await closing(reg)

    run(body())


# ---------------------------------------------------------------------------- wait_change

def test_wait_change_timeout_returns_same(make: Factory) -> None:
    async def body() -> None:
        reg = make()
        try:
            await reg.publish(vrec("lab", "1"))
            gen = await reg.generation()
            await reg.keepalive("site-a", {})  # not a change
            assert await reg.wait_change(gen, 0.6) == gen
            # already past: returns at once with the current generation
            assert await reg.wait_change(gen - 1, 30) == gen
        finally:
            await closing(reg)

    run(body())


def test_wait_change_wakes_on_other_task(make: Factory) -> None:
    async def body() -> None:
        reg, other = make(), make()
        try:
            gen = await reg.generation()
            waiter = asyncio.ensure_future(reg.wait_change(gen, 60))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await other.subscribe("site-a", "lab")
            new = await asyncio.wait_for(waiter, 30)  # far below the 60 s timeout
            assert new > gen
            assert new == await reg.generation()
            # and a publish by the first object, awaited by the second
            waiter = asyncio.ensure_future(other.wait_change(new, 60))
            await asyncio.sleep(0.3)
            await reg.publish(vrec("lab", "7"))
            assert await asyncio.wait_for(waiter, 30) > new
        finally:
            await closing(reg, other)

    run(body())


PUBLISH_SCRIPT = """
import asyncio, sys
from icbdcache.replication.registry import VersionRecord
from icbdcache.replication.registry.embedded import EmbeddedRegistry
from icbdcache.store import Store

async def main():
    store = Store(sys.argv[1])
    reg = EmbeddedRegistry(store)
    await reg.publish(VersionRecord(imi="lab", version="9", size=4096, chunk_size=65536,
                                    manifest="99" * 16))
    await reg.close()
    store.close()

asyncio.run(main())
"""


def test_embedded_wait_change_sees_another_process(tmp_path: Path) -> None:
    """``icbd-cache publish`` writes the master's store from another process while the
    master waits: the waiter wakes and sees the version."""
    from icbdcache.replication.registry.embedded import EmbeddedRegistry

    store = Store(tmp_path / "store")

    async def body() -> None:
        reg = EmbeddedRegistry(store, down_after=30)
        gen = await reg.generation()
        waiter = asyncio.ensure_future(reg.wait_change(gen, 120))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PUBLISH_SCRIPT, str(tmp_path / "store"), env=env)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        new = await asyncio.wait_for(waiter, 60)
        assert new > gen
        assert [v.key for v in await reg.versions("lab")] == ["lab@9"]
        await reg.close()

    try:
        run(body())
    finally:
        store.close()


def test_embedded_state_survives_reopen(tmp_path: Path) -> None:
    from icbdcache.replication.registry.embedded import EmbeddedRegistry

    async def write() -> int:
        store = Store(tmp_path / "store")
        reg = EmbeddedRegistry(store)
        await reg.publish(vrec("lab", "1"))
        await reg.subscribe("site-a", "lab")
        await reg.keepalive("site-a", {"held": ["lab@1"]})
        await reg.close()
        gen = await reg.generation()
        store.close()
        return gen

    async def read(gen: int) -> None:
        store = Store(tmp_path / "store")
        reg = EmbeddedRegistry(store)
        assert await reg.generation() == gen
        assert [v.key for v in await reg.versions()] == ["lab@1"]
        site = await reg.site("site-a")
        assert site is not None and site.subscriptions == ["lab"]
        assert site.report == {"held": ["lab@1"]} and site.last_seen > 0
        store.close()

    run(read(run(write())))


def test_embedded_keepalives_are_batched(tmp_path: Path) -> None:
    """Keep-alives of known sites do not each cost an LMDB write transaction: they are
    written together (here on close), and then another registry object sees them."""
    from icbdcache.replication.registry.embedded import EmbeddedRegistry

    store = Store(tmp_path / "store")

    async def body() -> None:
        reg = EmbeddedRegistry(store, flush_every=3600)
        names = [f"site-{i:03d}" for i in range(100)]
        for n in names:
            await reg.keepalive(n, {"round": 0})
        await reg.close()
        txn0 = store.env.info()["last_txnid"]
        for r in (1, 2, 3):
            for n in names:
                assert (await reg.keepalive(n, {"round": r})).up
        assert store.env.info()["last_txnid"] == txn0
        assert {s.report["round"] for s in await reg.sites()} == {3}  # its own view
        await reg.close()
        assert store.env.info()["last_txnid"] == txn0 + 1
        other = EmbeddedRegistry(store)
        sites = await other.sites()
        assert len(sites) == 100 and all(s.up and s.report == {"round": 3} for s in sites)

    try:
        run(body())
    finally:
        store.close()


# ---------------------------------------------------------------------------- sites

def test_register_keepalive_subscriptions(make: Factory) -> None:
    async def body() -> None:
        reg = make()
        try:
            rec = await reg.register("site-a", "10.0.0.1:10809")
            assert (rec.name, rec.address, rec.subscriptions) == ("site-a", "10.0.0.1:10809", [])
            assert await reg.site("nowhere") is None
            await reg.subscribe("site-a", "lab")
            await reg.subscribe("site-a", "office")
            await reg.subscribe("site-a", "lab")  # twice: once
            before = time.time()
            rec = await reg.keepalive("site-a", {"held": ["lab@1"], "behind_bytes": 42})
            assert rec.up and rec.last_seen >= before - 1
            assert rec.subscriptions == ["lab", "office"]
            assert rec.address == "10.0.0.1:10809"
            # registering again keeps the subscriptions
            await reg.register("site-a", "10.0.0.2:10809")
            site = await reg.site("site-a")
            assert site is not None
            assert site.address == "10.0.0.2:10809"
            assert site.subscriptions == ["lab", "office"]
            assert site.report == {"held": ["lab@1"], "behind_bytes": 42}
            assert site.up
            await reg.unsubscribe("site-a", "lab")
            await reg.unsubscribe("site-z", "lab")  # unknown site: no error
            # a keep-alive from a new site registers it; subscribing creates one too
            rec = await reg.keepalive("site-b", {"state": "idle"})
            assert rec.up and rec.subscriptions == [] and rec.address == ""
            await reg.subscribe("site-c", "lab")
            sites = {s.name: s for s in await reg.sites()}
            assert sorted(sites) == ["site-a", "site-b", "site-c"]
            assert sites["site-a"].subscriptions == ["office"]
            assert sites["site-b"].up and sites["site-b"].report == {"state": "idle"}
            assert not sites["site-c"].up and sites["site-c"].last_seen == 0
        finally:
            await closing(reg)

    run(body())


def test_silent_site_goes_down(make: Factory) -> None:
    down_after = 2.0

    async def body() -> None:
        reg = make(down_after=down_after)
        try:
            await reg.register("quiet", "10.0.0.1:10809")
            await reg.keepalive("quiet", {"held": ["lab@1"]})
            await reg.keepalive("chatty", {})
            site = await reg.site("quiet")
            assert site is not None and site.up
            last_seen = site.last_seen
            deadline = time.monotonic() + 30
            view = {}
            while time.monotonic() < deadline:
                await reg.keepalive("chatty", {})
                view = {s.name: s for s in await reg.sites()}
                if not view["quiet"].up:
                    break
                await asyncio.sleep(0.25)
            quiet = view["quiet"]
            assert not quiet.up, "a site silent for 30 s is still shown up"
            # in the same view, the site that kept sending is up
            assert view["chatty"].up
            # still listed, with its last keep-alive and report, so status can show the age
            assert quiet.last_seen == pytest.approx(last_seen)
            assert quiet.report == {"held": ["lab@1"]}
            assert quiet.address == "10.0.0.1:10809"
            assert time.time() - quiet.last_seen > down_after
            # a new keep-alive brings it back
            assert (await reg.keepalive("quiet", {})).up
            back = await reg.site("quiet")
            assert back is not None and back.up
        finally:
            await closing(reg)

    run(body())


def test_hundreds_of_sites(make: Factory) -> None:
    n = 300

    async def body() -> None:
        reg = make()
        try:
            gen = await reg.generation()
            names = [f"site-{i:03d}" for i in range(n)]

            async def one(name: str) -> None:
                await reg.keepalive(name, {"held": ["lab@1"], "behind_bytes": 0})

            for i in range(0, n, 50):
                await asyncio.gather(*(one(x) for x in names[i:i + 50]))
            await reg.subscribe(names[7], "lab")
            for name in names[:10]:  # a second round for some
                await one(name)
            sites = await reg.sites()
            assert [s.name for s in sites] == names
            assert all(s.up for s in sites)
            assert sites[7].subscriptions == ["lab"]
            assert await reg.generation() > gen
        finally:
            await closing(reg)

    run(body())


def test_two_masters_share_one_view(make: Factory) -> None:
    async def body() -> None:
        a, b = make(down_after=30), make(down_after=30)
        try:
            await a.publish(vrec("lab", "1"))
            await b.publish(vrec("lab", "2", manifest="bb" * 16))
            for r in (a, b):
                assert [v.key for v in await r.versions("lab")] == ["lab@1", "lab@2"]
            with pytest.raises(RegistryError):
                await b.publish(vrec("lab", "1", manifest="ff" * 16))
            await a.register("site-a", "10.0.0.1:10809")
            await a.keepalive("site-a", {"via": "a"})
            await b.keepalive("site-b", {"via": "b"})
            await b.subscribe("site-a", "lab")
            assert await a.generation() == await b.generation()
            for r in (a, b):
                sites = {s.name: s for s in await r.sites()}
                assert sorted(sites) == ["site-a", "site-b"]
                assert sites["site-a"].subscriptions == ["lab"]
                assert sites["site-a"].address == "10.0.0.1:10809"
                assert sites["site-b"].up
            # a site that moves to the other master stays up there
            await b.keepalive("site-a", {"via": "b"})
            site = await a.site("site-a")
            assert site is not None and site.up
            await b.retire("lab", "1")
            assert [v.retired for v in await a.versions("lab")] == [True, False]
        finally:
            await closing(a, b)

    run(body())


# ---------------------------------------------------------------------------- site tokens

def test_site_tokens_bound_replaced_and_revoked(make: Factory) -> None:
    """A site token (its digest) finds its site on every registry object at once (two
    masters); a second one is refused unless replacing, which retires the first; keep-alives,
    registrations and subscriptions keep it; forget removes it with the site, and a site that
    comes back has none."""
    async def body() -> None:
        a, b = make(), make()
        try:
            assert await a.token_site("00" * 32) is None
            assert await a.set_site_token("s1", "aa" * 32, 1000.0) is False
            assert await b.token_site("aa" * 32) == "s1"  # the other master agrees
            s1 = await b.site("s1")
            assert s1 is not None and s1.token_created == 1000.0 and s1.subscriptions == []
            with pytest.raises(SiteTokenExists, match="already has a token"):
                await b.set_site_token("s1", "bb" * 32, 2000.0)
            assert await a.token_site("bb" * 32) is None
            await b.register("s1", "10.0.0.1:10809")
            await a.subscribe("s1", "lab")
            await b.keepalive("s1", {"state": "idle"})
            await a.set_site_token("s2", "cc" * 32, 1500.0)
            assert await b.set_site_token("s1", "bb" * 32, 2000.0, replace=True) is True
            assert await a.token_site("aa" * 32) is None
            assert await a.token_site("bb" * 32) == "s1"
            sites = {s.name: s for s in await a.sites()}
            assert sites["s1"].token_created == 2000.0 and sites["s1"].subscriptions == ["lab"]
            assert sites["s1"].address == "10.0.0.1:10809"
            assert sites["s2"].token_created == 1500.0
            g = await a.generation()
            assert await b.forget("s1") is True
            assert await a.token_site("bb" * 32) is None  # revoked for every master at once
            assert await a.token_site("cc" * 32) == "s2"
            assert await a.generation() > g
            rec = await a.keepalive("s1", {"state": "idle"})  # it comes back: without one
            assert rec.token_created == 0.0
            assert await a.token_site("bb" * 32) is None
        finally:
            await closing(a, b)

    run(body())


def test_site_tokens_concurrent_adds_leave_one(make: Factory) -> None:
    """Two masters giving one site a token at once: one wins, the other is refused (or, when
    replacing, the index keeps exactly the token the record names)."""
    async def body() -> None:
        a, b = make(), make()
        try:
            got = await asyncio.gather(a.set_site_token("s", "11" * 32, 1.0),
                                       b.set_site_token("s", "22" * 32, 2.0),
                                       return_exceptions=True)
            assert sorted(type(x).__name__ for x in got) == ["SiteTokenExists", "bool"], got
            owners = [await a.token_site(d * 32) for d in ("11", "22")]
            assert sorted(map(str, owners)) == ["None", "s"]
            for i in range(5):
                await asyncio.gather(a.set_site_token("s", f"{i}a" * 32, 3.0, replace=True),
                                     b.set_site_token("s", f"{i}b" * 32, 4.0, replace=True))
            rec = await a.site("s")
            assert rec is not None
            live = [d for i in range(5) for d in (f"{i}a" * 32, f"{i}b" * 32)
                    if await b.token_site(d) == "s"]
            assert len(live) == 1  # the one the record holds; every other one revoked
        finally:
            await closing(a, b)

    run(body())


# ---------------------------------------------------------------------------- etcd only

def test_etcd_unreachable_raises(etcd_server: EtcdServer) -> None:
    port = free_port()

    async def body() -> None:
        reg = open_registry(f"etcd://127.0.0.1:{port}", down_after=5)
        try:
            with pytest.raises(RegistryError, match="unreachable"):
                await reg.versions()
            with pytest.raises(RegistryError, match="unreachable"):
                await reg.wait_change(0, 1)
        finally:
            await reg.close()

    run(body())


def test_etcd_second_endpoint_used(etcd_server: EtcdServer) -> None:
    """With two endpoints of which the first is down, the registry uses the second."""
    port = free_port()

    async def body() -> None:
        prefix = f"t-{uuid.uuid4().hex[:12]}"
        reg = open_registry(f"etcd://127.0.0.1:{port},{etcd_server.endpoint}/{prefix}")
        try:
            await reg.publish(vrec("lab", "1"))
            assert [v.key for v in await reg.versions()] == ["lab@1"]
        finally:
            await reg.close()

    run(body())


def test_etcd_uri_parsing() -> None:
    pytest.importorskip("aetcd", reason="aetcd is not installed (scripts/setup installs it)")
    from icbdcache.replication.registry.etcd import EtcdRegistry

    r = EtcdRegistry.from_uri("etcd://10.0.0.1:2379,10.0.0.2:2380/sites/eu", down_after=7)
    assert r.endpoints == [("10.0.0.1", 2379), ("10.0.0.2", 2380)]
    assert r.prefix == "/sites/eu/"
    assert r.down_after == 7
    r = EtcdRegistry.from_uri("etcd://etcd.local")
    assert r.endpoints == [("etcd.local", 2379)] and r.prefix == "/icbd/"
    for bad in ("etcd://", "etcd://h:notaport", "http://h:1"):
        with pytest.raises(ValueError):
            EtcdRegistry.from_uri(bad)


def test_open_registry_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_registry(None)
    with pytest.raises(ValueError):
        open_registry("zookeeper://h:1")
    store = Store(tmp_path / "store")
    try:
        assert type(open_registry("embedded", store=store)).__name__ == "EmbeddedRegistry"
    finally:
        store.close()


def test_etcd_alive_key_expires(etcd_server: EtcdServer) -> None:
    """A silent site's liveness key, under its lease, vanishes from etcd."""
    async def body() -> None:
        from icbdcache.replication.registry.etcd import EtcdRegistry

        reg = EtcdRegistry.from_uri(etcd_server.uri(f"/t-{uuid.uuid4().hex[:12]}"),
                                    down_after=1.0)
        try:
            await reg.keepalive("quiet", {})
            key = reg._alive + b"quiet"
            assert await reg._get(key) is not None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and await reg._get(key) is not None:
                await asyncio.sleep(0.25)
            assert await reg._get(key) is None, "the alive key outlived its lease by 30 s"
            site = await reg.site("quiet")
            assert site is not None and not site.up and site.last_seen > 0
            # the next keep-alive takes a new lease
            assert (await reg.keepalive("quiet", {})).up
            assert await reg._get(key) is not None
        finally:
            await reg.close()

    run(body())


def test_etcd_lost_and_back(tmp_path: Path) -> None:
    """etcd stops while a master waits for a change: the wait and every call raise
    RegistryError saying it is unreachable; once etcd is back (same data) the same registry
    object works again and the state is intact."""
    pytest.importorskip("aetcd", reason="aetcd is not installed (scripts/setup installs it)")
    try:
        server = EtcdServer.start(tmp_path / "etcd")
    except EtcdMissing as e:
        pytest.skip(str(e))

    async def body() -> None:
        nonlocal server
        reg = open_registry(server.uri(), down_after=30)
        try:
            await reg.publish(vrec("lab", "1"))
            gen = await reg.generation()
            waiter = asyncio.ensure_future(reg.wait_change(gen, 60))
            await asyncio.sleep(0.5)
            server.stop()
            with pytest.raises(RegistryError, match="unreachable"):
                await asyncio.wait_for(waiter, 30)
            with pytest.raises(RegistryError, match="unreachable"):
                await reg.keepalive("site-a", {})
            with pytest.raises(RegistryError, match="unreachable"):
                await reg.versions()
            server = server.restart()
            deadline = time.monotonic() + 30
            while True:
                try:
                    versions = await reg.versions()
                    break
                except RegistryError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
            assert [v.key for v in versions] == ["lab@1"]
            assert await reg.generation() == gen
            waiter = asyncio.ensure_future(reg.wait_change(gen, 60))
            await asyncio.sleep(0.3)
            await reg.subscribe("site-a", "lab")
            assert await asyncio.wait_for(waiter, 30) > gen
            assert (await reg.keepalive("site-a", {})).up
        finally:
            await reg.close()

    try:
        run(body())
    finally:
        server.stop()


def test_etcd_under_uvloop(etcd_server: EtcdServer) -> None:
    """The master runs on uvloop: aetcd's gRPC calls and watches work there too."""
    import uvloop

    uri = etcd_server.uri(f"/t-{uuid.uuid4().hex[:12]}")

    async def body() -> None:
        a, b = open_registry(uri), open_registry(uri)
        try:
            gen = await a.generation()
            waiter = asyncio.ensure_future(a.wait_change(gen, 60))
            await asyncio.sleep(0.3)
            await b.publish(vrec("lab", "1"))
            assert await asyncio.wait_for(waiter, 30) > gen
            assert (await a.keepalive("site-a", {})).up
            assert [s.name for s in await b.sites()] == ["site-a"]
        finally:
            await closing(a, b)

    uvloop.run(body())
