"""One store, many processes, across a master and its sites (issue 11 cases 3, 5 and 10): real
``publish``, ``master``, ``serve --master`` and ``admin`` processes, bytes read back from the
site with nbdcopy or a raw NBD client from a chosen loopback address."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import xxhash
from conftest import free_port, make_image, require
from masterproxy import MasterProxy
from shared_store import (
    ACK,
    Procs,
    client_from,
    file_sha,
    finish,
    ls,
    ls_rows,
    nbd_read,
    procs,
    read_all,
    run,
    start,
    wait_for,
)

from icbdcache.replication.client import Catalog, MasterClient
from icbdcache.replication.registry.base import VersionRecord
from icbdcache.replication.replica import Replica, ReplicaConfig
from icbdcache.replication.signing import Trust
from icbdcache.store import Store, VersionMeta, digest
from icbdcache.store.chunks import strong_digest

__all__ = ["procs"]  # the fixture, used by name

MiB = 1 << 20
CS = 64 * 1024


def chunk_map_of(img: Path) -> bytes:
    out = bytearray()
    with open(img, "rb") as f:
        while block := f.read(CS):
            out += digest(block)
    return bytes(out)


def map_digest(chunk_map: bytes) -> str:
    """A manifest digest, computed here (xxh3-128 of the chunk map, docs/replication.md)."""
    return xxhash.xxh3_128_hexdigest(chunk_map)


def get(url: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of ``url``; an HTTP error fails with the master's reason."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"GET {url}: {e.code} {e.read()[:500]!r}") from e


def status(url: str) -> dict[str, dict[str, Any]]:
    st = json.loads(run("admin", "--master", url, "--json", "status").stdout)
    return {s["name"]: s for s in st["sites"]}


def held_map(store: Path, key: str) -> bytes:
    """The chunk map of ``key`` in ``store`` (read in this process)."""
    s = Store(store, readonly=True)
    try:
        return bytes(s.chunk_map(key))
    finally:
        s.close()


def complete(store: Path, key: str) -> bool:
    """Whether ``key`` is held whole in ``store`` (False while the store is being made)."""
    out = run("ls", "--json", "--store", str(store), check=False)
    if out.returncode != 0:
        return False
    r = {f"{r['imi']}@{r['version']}": r for r in json.loads(out.stdout)}.get(key)
    return bool(r and not r.get("pending") and r["held"] == r["needed"])


# ------------------------------------------------------------------ 3


def test_3_two_publishes_of_one_iMI_keep_registry_and_store_in_step(
        tmp_path: Path, procs: Procs) -> None:
    """``publish A & publish B`` of one iMI: one exited "already published" but its chunk map
    overwrote the winner's, so the registry's manifest differed from what the master served
    and every replica failed. Now both get their own number, and with one ``--version`` one
    is refused without touching the other; every manifest the master serves is the
    registry's, and a replica reads the winner's bytes."""
    require("nbdcopy")
    mstore = tmp_path / "M"
    a = make_image(tmp_path / "a.img", 128 * MiB, seed=31)
    b = make_image(tmp_path / "b.img", 128 * MiB, seed=32)
    run("publish", str(make_image(tmp_path / "s.img", MiB)), "--imi", "seed", "--store",
        str(mstore), "-q")
    pa = start("publish", str(a), "--imi", "lab", "--store", str(mstore))
    pb = start("publish", str(b), "--imi", "lab", "--store", str(mstore))
    ra, rb = finish(pa), finish(pb)
    assert ra[0] == rb[0] == 0, (ra, rb)
    names = {ra[1].split(":")[0].split()[-1]: a, rb[1].split(":")[0].split()[-1]: b}
    assert set(names) == {"lab@1", "lab@2"}, names
    pa = start("publish", str(a), "--imi", "lab", "--version", "5", "--store", str(mstore))
    pb = start("publish", str(b), "--imi", "lab", "--version", "5", "--store", str(mstore))
    ra, rb = finish(pa), finish(pb)
    assert sorted([ra[0], rb[0]]) == [0, 2], (ra, rb)
    winner, loser = (a, rb) if ra[0] == 0 else (b, ra)
    # refused at whichever step the race met the winner: its pending version, its version
    # in the store, or its registry record
    assert "lab@5" in loser[2] and any(
        why in loser[2] for why in ("being made", "exists", "already published")), loser
    names["lab@5"] = winner
    m = procs.master(mstore)
    url = f"http://127.0.0.1:{m.port}"
    cat = json.loads(get(f"{url}/v1/catalog")[0])
    records = {f"{r['imi']}@{r['version']}": r for r in cat["versions"]}
    assert set(records) == {"seed@1", "lab@1", "lab@2", "lab@5"}
    for key, img in names.items():
        body, headers = get(f"{url}/v1/manifest/lab/{key.split('@')[1]}")
        want = map_digest(chunk_map_of(img))
        assert body == chunk_map_of(img)
        assert headers["X-Icbd-Manifest"] == records[key]["manifest"] == want, key
        assert headers["X-Icbd-Master-Id"] == cat["master_id"] != ""
    rstore = tmp_path / "R"
    run("replica", "--store", str(rstore), "--master", url, "--site", "s", "--subscribe",
        "lab", "--once", "-q")
    site = procs.serve("--store", str(rstore))
    r = nbd_read(site.uri("lab@5"))
    assert (r.rc, r.sha) == (0, file_sha(winner))


def test_3_a_publish_between_store_and_registry_keeps_its_name(tmp_path: Path) -> None:
    """A ``publish --version 5`` whose version is in the store but not yet in the registry:
    a second ``publish --version 5`` took it for an interrupted publish and replaced it, and
    whichever lost at the registry took the version out of the store, so the registry named
    ``lab@5`` and no store held it (seen in CI). Now the second is refused while the first
    holds the name, and registry and store agree on the first's bytes."""
    from icbdcache.replication.publish import publish
    from icbdcache.replication.registry.embedded import EmbeddedRegistry

    mstore = tmp_path / "M"
    a = make_image(tmp_path / "a.img", 4 * MiB, seed=41)
    b = make_image(tmp_path / "b.img", 4 * MiB, seed=42)
    seen: list[tuple[int, str, str]] = []

    class Held(EmbeddedRegistry):
        async def publish(self, record: VersionRecord) -> None:
            # between the store's commit and the registry: a second process tries the name
            seen.append(finish(start("publish", str(b), "--imi", "lab", "--version", "5",
                                     "--store", str(mstore))))
            await super().publish(record)

    async def main() -> None:
        store = Store(mstore)
        registry = Held(store)
        try:
            await publish(store, registry, str(a), "lab", "5")
        finally:
            await registry.close()
            store.close()

    async def recorded() -> list[tuple[str, str]]:
        store = Store(mstore)
        registry = EmbeddedRegistry(store)
        try:
            return [(r.version, r.manifest) for r in await registry.versions("lab")]
        finally:
            await registry.close()
            store.close()

    asyncio.run(main())
    assert asyncio.run(recorded()) == [("5", map_digest(chunk_map_of(a)))]
    [(rc, _out, err)] = seen
    assert rc == 2 and "lab@5 is being made by process" in err, (rc, err)
    store = Store(mstore)
    try:
        meta = store.version("lab@5")
        assert meta is not None and bytes(store.chunk_map("lab@5")) == chunk_map_of(a)
        assert not store.pending_versions()
    finally:
        store.close()
    rows = {f"{r['imi']}@{r['version']}": r for r in ls_rows(mstore)}
    assert set(rows) == {"lab@5"} and rows["lab@5"]["manifest"] == map_digest(chunk_map_of(a))


# ------------------------------------------------------------------ 5


def test_5_a_site_keeps_its_versions_when_its_master_changes(
        tmp_path: Path, procs: Procs) -> None:
    """A site mid-pull of lab@1 when its master is restarted on the same URL with another
    store holding another lab@1 (and a lab@2): it adopted the new manifest and served the
    old version's first chunks then EIO, and it never asked for lab@2 (it took the empty
    subscription list of the keep-alive answer). Now it keeps lab@1's map (refused, loudly),
    registers again with its own subscriptions, pulls lab@2, and never serves B's bytes as
    lab@1."""
    require("nbdcopy")
    m1store, m2store, rstore = tmp_path / "M1", tmp_path / "M2", tmp_path / "R"
    a = make_image(tmp_path / "a.img", 32 * MiB, seed=51)
    b = make_image(tmp_path / "b.img", 32 * MiB, seed=52)
    b2 = make_image(tmp_path / "b2.img", 32 * MiB, seed=53)
    run("publish", str(a), "--imi", "lab", "--store", str(m1store), "-q")
    run("publish", str(b), "--imi", "lab", "--store", str(m2store), "-q")
    run("publish", str(b2), "--imi", "lab", "--store", str(m2store), "-q")
    port = free_port()
    m1 = procs.master(m1store, "--keepalive-interval", "1", port=port)
    proxy = MasterProxy(port, hold_digests=32)
    try:
        replica = procs.spawn("replica", "replica", "--store", str(rstore), "--master",
                              proxy.url, "--site", "s1", "--subscribe", "lab", "--pull-batch",
                              "64")
        wait_for("the pull held mid-way", lambda: proxy.held > 0, timeout=60)
        site = procs.serve("--store", str(rstore))
        a_map = chunk_map_of(a)
        assert held_map(rstore, "lab@1") == a_map and not complete(rstore, "lab@1")
        assert m1.stop() == 0
        procs.master(m2store, "--keepalive-interval", "1", port=port)
        proxy.release.set()
        wait_for("lab@2 complete at the site", lambda: complete(rstore, "lab@2"), timeout=90)

        def registered_again() -> bool:
            s = status(f"http://127.0.0.1:{port}").get("s1")
            return bool(s and s["subscriptions"] == ["lab"])

        wait_for("the site registered again with its subscriptions", registered_again,
                 timeout=30)
        assert held_map(rstore, "lab@1") == a_map
        r1 = nbd_read(site.uri("lab@1"))
        assert r1.sha != file_sha(b) and (r1.rc != 0 or r1.sha == file_sha(a)), r1
        for name in ("lab@2", "lab"):
            r = nbd_read(site.uri(name))
            assert (r.rc, r.sha) == (0, file_sha(b2)), name
        assert ls(rstore)["lab@1"]["manifest"] == map_digest(a_map)
        stats = json.loads(run("stats", "--json", "--store", str(rstore)).stdout)
        assert "lab@1" in stats["replica"]["conflicts"]
        assert "manifest of lab@1 changed" in (stats["replica"]["error"] or "")
        log = replica.text()
        assert "master_event=changed" in log and "conflict=lab@1" in log
    finally:
        proxy.close()


# ------------------------------------------------------------------ 10


def test_10_retire_while_workstations_run_the_version(tmp_path: Path, procs: Procs) -> None:
    """``admin retire lab@3`` while a workstation ran lab@3: its reconnection got "No such
    export" and nothing told the admin who ran it. Now ``admin status`` names it, ``retire``
    is refused unless --force, the site keeps lab@3 for that workstation (reconnecting
    included) and refuses it to others, ``unretire`` brings it back, ``forget`` makes the
    site register again."""
    mstore, rstore = tmp_path / "M", tmp_path / "R"
    a = make_image(tmp_path / "a.img", 8 * MiB, seed=101)
    b = make_image(tmp_path / "b.img", 8 * MiB, seed=102)
    run("publish", str(a), "--imi", "lab", "--version", "3", "--store", str(mstore), "-q")
    m = procs.master(mstore, "--keepalive-interval", "1")
    url = f"http://127.0.0.1:{m.port}"
    # the site as two processes on one store: the replica, and the server that reads what
    # it pulled (its clients reach the master through the replica's keep-alive)
    procs.spawn("replica", "replica", "--store", str(rstore), "--master", url, "--site", "s1",
                "--subscribe", "lab")
    wait_for("lab@3 at the site", lambda: complete(rstore, "lab@3"))
    site = procs.serve("--store", str(rstore))
    ws, rep = client_from("127.0.0.2", site.port, "lab@3")
    try:
        assert rep == ACK and ws.read(0, CS) == (0, a.read_bytes()[:CS])
        run("publish", str(b), "--imi", "lab", "--version", "4", "--store", str(mstore), "-q")
        wait_for("lab@4 at the site", lambda: complete(rstore, "lab@4"))

        def reported() -> bool:
            clients = (status(url)["s1"].get("clients") or {}).get("lab@3") or []
            return any(c["address"] == "127.0.0.2" for c in clients)

        wait_for("the workstation in admin status", reported, timeout=30)
        table = run("admin", "--master", url, "status").stdout
        assert "s1: lab@3 runs on 127.0.0.2" in table, table
        p = run("admin", "--master", url, "retire", "lab@3", check=False)
        assert p.returncode == 1 and "409" in p.stderr and "127.0.0.2" in p.stderr, p.stderr
        listing = json.loads(run("admin", "--master", url, "--json", "ls").stdout)
        assert [v["retired"] for v in listing["imis"]["lab"]["versions"]] == [False, False]
        out = run("admin", "--master", url, "retire", "lab@3", "--force").stdout
        assert out.startswith("retired lab@3 (kept at s1"), out
        wait_for("lab@3 kept, marked retired", lambda: ls(rstore)["lab@3"]["retired"],
                 timeout=60)
        assert read_all(ws, 8 * MiB) == a.read_bytes()  # the connected workstation
    finally:
        ws.close()
    again, rep = client_from("127.0.0.2", site.port, "lab@3")  # it reconnects
    try:
        assert rep == ACK and read_all(again, 8 * MiB) == a.read_bytes()
    finally:
        again.close()
    other, rep = client_from("127.0.0.3", site.port, "lab@3")  # a machine booting anew
    other.close()
    assert rep != ACK
    run("admin", "--master", url, "unretire", "lab@3")
    wait_for("lab@3 offered again", lambda: not ls(rstore)["lab@3"]["retired"], timeout=60)
    other, rep = client_from("127.0.0.3", site.port, "lab@3")
    other.close()
    assert rep == ACK
    assert run("admin", "--master", url, "forget", "s1").stdout.strip() == "forgot s1"
    wait_for("the site back, with its subscriptions",
             lambda: (status(url).get("s1") or {}).get("subscriptions") == ["lab"], timeout=30)
    p = run("admin", "--master", url, "forget", "nosuch", check=False)
    assert p.returncode == 1 and "404" in p.stderr


def test_10_a_retired_version_goes_once_no_client_runs_it(tmp_path: Path) -> None:
    """The site's side of a retirement, in one process: a retired version a client ran
    10 s ago is kept (marked retired); once its last use is older than the linger it is
    deleted at the next sync."""
    from icbdcache.store.owners import ClientUse, Owner, use_record

    store = Store(tmp_path / "R")
    client = MasterClient("http://127.0.0.1:1", timeout=2)
    try:
        records = []
        for v, seed in (("3", 1), ("4", 2)):
            data = bytes([seed]) * CS
            cm = digest(data)
            store.write_batch([(cm, data)])
            meta = VersionMeta("lab", v, CS, CS, [f"icbd+http://127.0.0.1:1/lab@{v}"],
                               pinned=True, manifest=map_digest(cm))
            store.create_version(meta, cm, strong_map=strong_digest(data))
            records.append(VersionRecord("lab", v, CS, CS, map_digest(cm), CS))
        store.set_latest("lab", "4")
        records[0].retired = True
        cat = Catalog(7, records, "id")
        # held with their strong maps; nothing to check against a master that is not there
        replica = Replica(store, client, ReplicaConfig("s1", subscribe=["lab"],
                                                       trust=Trust(insecure=True)))

        def used(last: float) -> None:
            store.put_record("inuse/1", use_record(Owner(1), [ClientUse(
                "lab@3", "10.0.0.5", connections=0, last=last)]))

        async def main() -> None:
            try:
                used(time.time() - 10)
                await replica.sync(cat)
                meta = store.version("lab@3")
                assert meta is not None and meta.retired and store.latest("lab") == "4"
                assert replica.state_dict()["clients"]["lab@3"][0]["address"] == "10.0.0.5"
                used(time.time() - 1000)
                await replica.sync(cat)
                assert store.version("lab@3") is None and store.version("lab@4") is not None
            finally:
                await client.close()

        asyncio.run(main())
    finally:
        store.close()
