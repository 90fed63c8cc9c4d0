"""The store's concurrency model, piece by piece (docs/store.md, 'CONCURRENCY'): a map another
process grew is followed, names are reserved before a copy and made in one transaction,
pending and in-use versions are kept from eviction, a crashed owner's records are reclaimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from icbdcache.store import (
    Store,
    StoreError,
    StoreFull,
    VersionBusy,
    VersionExists,
    VersionInUse,
    VersionMeta,
    digest,
)
from icbdcache.store.chunks import UNKNOWN, map_digest
from icbdcache.store.gate import TxnGate
from icbdcache.store.inuse import InUseTracker, arp_mac
from icbdcache.store.owners import INUSE_PREFIX, ClientUse, Owner, read_uses, use_record

CS = 64 * 1024


def chunks(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    """``n`` distinct non-zero chunks of CS bytes: (digest, bytes)."""
    out = []
    for i in range(n):
        data = (seed * 1000 + i).to_bytes(4, "big") * (CS // 4)
        out.append((digest(data), data))
    return out


def meta_of(items: list[tuple[bytes, bytes]], imi: str = "lab", version: str = "1",
            sources: list[str] | None = None) -> tuple[VersionMeta, bytes]:
    chunk_map = b"".join(d for d, _ in items)
    return VersionMeta(imi, version, len(items) * CS, CS, sources or []), chunk_map


def child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child process running ``code`` (it imports icbdcache from this checkout)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------ the map grown elsewhere


def test_a_map_another_process_grew_is_followed(tmp_path: Path) -> None:
    """A process mapped the store at 2 MiB; another grows the file to 12 MiB. Reads (one-off
    and the read path's per-request transaction) and writes go on: the store re-maps, never
    reports MDB_MAP_RESIZED, and a transaction open in another thread meanwhile keeps valid
    buffers (the re-map waits for it)."""
    path = tmp_path / "s"
    mine = Store(path, map_size=2 << 20)
    first = chunks(4, 1)
    mine.write_batch(first)
    p = child("""
        import sys
        from icbdcache.store import Store, digest
        s = Store(sys.argv[1], map_size=64 << 20)
        items = []
        for i in range(160):
            data = (2000 + i).to_bytes(4, "big") * 16384
            items.append((digest(data), data))
        s.write_batch(items)
        s.close()
    """, str(path))
    assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    assert (path / "data.mdb").stat().st_size > 8 << 20

    seen: list[bytes] = []
    started = threading.Event()

    def slow(get: object) -> None:  # holds a read transaction across the re-map
        assert callable(get)
        buf = get(first[0][0])
        started.set()
        time.sleep(0.3)
        seen.append(bytes(buf))

    t = threading.Thread(target=lambda: mine.with_chunks(slow))
    t.start()
    assert started.wait(10)
    other = chunks(160, 2)
    try:
        assert mine.get_chunk(other[150][0]) == other[150][1]  # this begin re-maps
        t.join(10)
        assert seen == [first[0][1]]
        txn = mine.begin_chunks()
        try:
            assert bytes(txn.get(other[3][0])) == other[3][1]
        finally:
            txn.abort()
        mine.write_batch(chunks(2, 3))
        assert mine.stats()["chunks"] == 4 + 160 + 2
    finally:
        mine.close()


def test_gate_lets_a_remap_wait_for_open_transactions() -> None:
    gate = TxnGate()
    order: list[str] = []
    gate.enter()
    done = threading.Event()

    def remap() -> None:
        assert gate.exclusive(lambda: order.append("remap"))
        done.set()

    t = threading.Thread(target=remap)
    t.start()
    time.sleep(0.1)
    assert not done.is_set()  # waits for the open transaction
    order.append("leave")
    gate.leave()
    t.join(5)
    assert order == ["leave", "remap"] and gate.active == 0
    gate.enter()  # a thread holding a transaction never sees none open: it gives up
    assert not gate.exclusive(lambda: order.append("never"), timeout=0.2)
    gate.leave()
    assert order == ["leave", "remap"]


# ------------------------------------------------------------------ names


def test_a_name_has_one_maker_until_its_process_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store(path).close()
    p = child("""
        import sys, time
        from icbdcache.store import Store
        s = Store(sys.argv[1])
        print(s.reserve_version("lab", "7"), flush=True)
        time.sleep(60)
    """, str(path))
    assert p.stdout is not None and p.stdout.readline().strip() == "7"
    store = Store(path)
    try:
        with pytest.raises(VersionBusy, match=f"process {p.pid}"):
            store.reserve_version("lab", "7")
        # a default name skips it: the next number
        assert store.reserve_version("lab") == "8"
        rows = {x.key: x for x in store.pending_versions()}
        assert rows["lab@7"].alive and rows["lab@7"].owner.pid == p.pid
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not store.pending_versions()[0].alive
        assert store.reserve_version("lab", "7") == "7"  # reclaimed
        assert {x.key for x in store.pending_versions()} == {"lab@7", "lab@8"}
        assert all(x.owner.pid == os.getpid() for x in store.pending_versions())
    finally:
        store.close()


def test_commit_makes_the_version_in_one_step(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        items = chunks(3, 1)
        meta, chunk_map = meta_of(items)
        with pytest.raises(StoreError, match="reservation"):
            store.commit_version(meta, chunk_map)  # never reserved
        assert store.reserve_version("lab", "1", pinned=True) == "1"
        assert store.version("lab@1") is None and store.latest("lab") is None
        with pytest.raises(StoreError, match="3 of its chunks are not in the store"):
            store.commit_version(meta, chunk_map, copied=True)
        store.write_batch(items, protect="lab@1")
        meta.manifest = map_digest(chunk_map)
        made = store.commit_version(meta, chunk_map, copied=True)
        assert made.instance and store.version("lab@1") == made
        assert store.latest("lab") == "1" and store.pending_versions() == []
        with pytest.raises(VersionExists):
            store.reserve_version("lab", "1")
        # replaced: a new instance, the old boot profile gone
        store.put_profile("lab@1", [0, 1])
        assert store.reserve_version("lab", "1", force=True) == "1"
        again = store.commit_version(meta, chunk_map, force=True)
        assert again.instance != made.instance and store.profile("lab@1") == []
    finally:
        store.close()


# ------------------------------------------------------------------ eviction, fit


def test_chunks_of_a_pending_version_are_never_evicted(tmp_path: Path) -> None:
    """A copy in progress (chunks noted under its pending record) next to writes that evict
    down to the bound: the copy's chunks all stay; once the copy is abandoned they are cache
    like any other. (The eviction of another process reads the same records: see the
    process tests in test_shared_store.py.)"""
    store = Store(tmp_path / "s", size_limit=8 * CS)
    try:
        store.reserve_version("lab", "1")
        mine = chunks(6, 1)
        store.write_batch(mine, protect="lab@1")
        store.write_batch(chunks(6, 2))  # 12 chunks > 8: evicts, but none of mine
        assert all(store.has_chunk(d) for d, _ in mine)
        assert store.held <= 8 * CS
        assert store.pending_versions()[0].chunks == 6
        store.abandon_version("lab@1")
        store.write_batch(chunks(6, 3))
        assert not all(store.has_chunk(d) for d, _ in mine)
    finally:
        store.close()


def test_a_version_that_cannot_fit_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", size_limit=10 * CS)
    try:
        pinned = chunks(6, 1)
        store.reserve_version("base", "1", pinned=True)
        store.write_batch(pinned, protect="base@1")
        m, cm = meta_of(pinned, "base", "1")
        m.pinned = True
        store.commit_version(m, cm, copied=True, bound=store.bound)
        store.reserve_version("lab", "1")
        fit = store.fit_check("lab@1")
        assert fit is not None and fit.kept == 6 * CS
        big = chunks(5, 2)
        for d, data in big[:4]:
            fit(d, len(data))
        with pytest.raises(StoreFull, match="store full: lab@1 needs more than"):
            fit(*[(d, len(x)) for d, x in big][4])
        # at commit the same check, in the transaction (the copied chunks are held: nothing
        # could be evicted for them)
        store.write_batch(big, protect="lab@1")
        assert store.held == 11 * CS
        meta, chunk_map = meta_of(big)
        with pytest.raises(StoreFull, match="needs 327680 bytes of chunks beside 393216"):
            store.commit_version(meta, chunk_map, copied=True, bound=10 * CS)
        store.abandon_version("lab@1")
        assert [m.key for m in store.versions()] == ["base@1"]
        assert store.pending_versions() == []
        store.set_bound(4 * CS)  # the bound recorded by a server ...
        assert store.bound == 10 * CS  # ... but this process's own bound wins
    finally:
        store.close()
    ro = Store(tmp_path / "s", readonly=True)
    try:
        assert ro.bound == 4 * CS  # a process without its own bound takes the recorded one
    finally:
        ro.close()


def _use(store: Store, key: str, address: str, *, connections: int = 1,
         last: float | None = None, owner: Owner | None = None, updated: float | None = None,
         record: str | None = None) -> None:
    now = time.time()
    use = ClientUse(key, address, connections=connections, first=now,
                    last=now if last is None else last)
    owner = owner or Owner.me()
    store.put_record(record or f"{INUSE_PREFIX}{owner.pid}",
                     use_record(owner, [use], now if updated is None else updated))


def test_versions_clients_run_without_a_source_stay(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"x")
    store = Store(tmp_path / "s", size_limit=4 * CS)
    try:
        solo, sourced = chunks(3, 1), chunks(3, 2)
        for (imi, items, srcs) in (("solo", solo, []), ("file", sourced, [str(img)])):
            m, cm = meta_of(items, imi, "1", srcs)
            store.put_version(m, cm)
        store.write_batch(solo + sourced)  # 6 > 4: evicted down to 3.6, nothing protected
        store.write_batch(solo)  # back
        _use(store, "solo@1", "10.0.0.5")
        _use(store, "file@1", "10.0.0.6", record=f"{INUSE_PREFIX}1")  # pid 1 lives
        store.write_batch(sourced)
        store.write_batch(chunks(3, 3))
        assert all(store.has_chunk(d) for d, _ in solo)  # no source: kept for its client
        assert not all(store.has_chunk(d) for d, _ in sourced)  # faulted again if read
        uses = store.in_use()
        assert [c.address for c in uses["solo@1"]] == ["10.0.0.5"]
        with pytest.raises(VersionInUse, match=r"10\.0\.0\.5"):
            store.reserve_version("solo", "1", force=True)
        with pytest.raises(VersionInUse):
            store.delete_version("solo@1", in_use_ok=False)
        assert store.reserve_version("solo", "1", force=True, in_use_ok=True) == "1"
    finally:
        store.close()


def test_clients_of_a_dead_server_run_for_the_linger_only(tmp_path: Path) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    gone = Owner(p.pid, 12345)
    now = time.time()
    raw = [("inuse/a", use_record(gone, [ClientUse("lab@1", "10.0.0.5", connections=1,
                                                   last=now - 1000)], now - 10)),
           ("inuse/b", use_record(gone, [ClientUse("lab@2", "10.0.0.6", connections=1,
                                                   last=now - 1000)], now - 1000)),
           ("inuse/c", use_record(Owner.me(), [ClientUse("lab@3", "10.0.0.7", connections=0,
                                                         last=now - 1000)], now)),
           ("inuse/d", b"not json")]
    uses = read_uses(raw, now)
    assert set(uses) == {"lab@1"}  # connected 10 s ago; the others' last use is too old
    store = Store(tmp_path / "s")
    try:
        for key, value in raw:
            store.put_record(key, value)
        assert store.reclaim() == ([], 2)  # b (gone, stale) and d (malformed)
        assert [k for k, _ in store.records(INUSE_PREFIX)] == ["inuse/a", "inuse/c"]
    finally:
        store.close()


def test_the_tracker_records_clients_and_a_restart_keeps_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        t = InUseTracker(store)
        assert t.snapshot() is None  # never a client: nothing written
        t.attach("lab@1", "i1", "10.0.0.5")
        t.attach("lab@1", "i1", "10.0.0.5")
        t.detach("lab@1", "10.0.0.5")
        t.write(t.snapshot())
        (c,) = store.in_use()["lab@1"]
        assert (c.address, c.connections, c.instance) == ("10.0.0.5", 1, "i1")
        t.write(t.snapshot(closing=True))  # shutdown: disconnected now, still running
        later = InUseTracker(store)  # the next server process
        assert later.runs("lab@1", "10.0.0.5") and not later.runs("lab@1", "10.0.0.6")
        rec = json.loads(store.record(t.key) or b"{}")
        assert rec["clients"][0]["connections"] == 0
    finally:
        store.close()
    arp = tmp_path / "arp"
    arp.write_text("IP address       HW type     Flags       HW address            Mask     "
                   "Device\n10.0.0.5         0x1         0x2         52:54:00:AB:CD:EF     *"
                   "        eth0\n10.0.0.6         0x1         0x0         00:00:00:00:00:00"
                   "     *        eth0\n")
    assert arp_mac("10.0.0.5", str(arp)) == "52:54:00:ab:cd:ef"
    assert arp_mac("10.0.0.6", str(arp)) == "" and arp_mac("10.0.0.7", str(arp)) == ""


# ------------------------------------------------------------------ one transaction each


def test_updates_change_only_what_they_say(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        items = chunks(2, 1)
        m, cm = meta_of(items)
        store.put_version(m, cm)
        inst = store.version("lab@1").instance  # type: ignore[union-attr]
        pinned = store.set_pinned("lab@1", True)
        assert pinned.pinned and pinned.instance == inst
        assert bytes(store.chunk_map("lab@1")) == cm
        with pytest.raises(StoreError, match="unknown version"):
            store.set_pinned("lab@9", True)
        # learned entries fill UNKNOWN slots only (never a replacement's known entries)
        um, _ = meta_of(items, "up", "1")
        store.put_version(um)
        store.write_batch(map_updates=[("up@1", 0, items[0][0]), ("lab@1", 0, items[1][0])])
        assert bytes(store.chunk_map("up@1")) == items[0][0] + UNKNOWN
        assert bytes(store.chunk_map("lab@1")) == cm
        up = store.version("up@1")
        assert up is not None
        assert store.map_entry("up@1", 0, up.instance) == items[0][0]
        assert store.map_entry("up@1", 0, "another instance") == UNKNOWN
        # create-if-absent
        made = store.create_version(VersionMeta("new", "1", CS, CS))
        assert store.create_version(VersionMeta("new", "1", CS, CS), exists_ok=True) == made
        with pytest.raises(VersionExists):
            store.create_version(VersionMeta("new", "1", CS, CS))
        assert store.identity and len(store.identity) == 32
    finally:
        store.close()


def test_store_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("rel")
    try:
        assert store.path == str(tmp_path / "rel")
    finally:
        store.close()
