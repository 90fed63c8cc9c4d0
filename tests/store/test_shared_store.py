"""One store, many processes (issue 11, docs/store.md 'CONCURRENCY'): the numbered cases of
the issue that live on one store (1, 2, 4, 6, 7, 8, 9), each with real processes and the bytes
read back with nbdcopy or a raw NBD client and compared whole. Cases 3, 5 and 10 (a master and
its sites) are in tests/replication/test_shared_master.py; the stress test is
test_shared_stress.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import make_image, require
from shared_store import (
    ACK,
    Loop,
    Procs,
    client_from,
    file_sha,
    finish,
    ls,
    nbd_read,
    pending,
    procs,
    read_all,
    run,
    start,
    verify,
    wait_for,
)

from icbdcache.store import Store

__all__ = ["procs"]  # the fixture, used by name

MiB = 1 << 20
CS = 64 * 1024


def data_bytes(size: int) -> int:
    """Non-zero bytes of a make_image image of ``size`` bytes (every fourth MiB a hole)."""
    return sum(min(MiB, size - off) for off in range(0, size, MiB) if (off // MiB) % 4 != 3)


# ------------------------------------------------------------------ 1


def test_1_a_pinned_copy_next_to_an_evicting_server_is_kept_whole(
        tmp_path: Path, procs: Procs) -> None:
    """``import --copy --pin`` while ``serve --store-size`` faults (and evicts for) another
    version: the pin used to be written after the copy, and the server's eviction took the
    new chunks meanwhile (86-97 % held, no source, EIO, verify OK). Now the chunks are
    protected from the first batch: the version is whole, reads right, and verify agrees.
    (The other version is bigger than the bound, the new one nearly as big as the bound:
    every pass faults and evicts, and the new chunks soon are the coldest.)"""
    require("nbdcopy")
    store = tmp_path / "S"
    other = make_image(tmp_path / "other.img", 256 * MiB, seed=11)
    lab = make_image(tmp_path / "lab.img", 176 * MiB, seed=12)
    run("import", str(other), "--imi", "other", "--store", str(store), "-q")
    # no memory tier: the readers' passes fault what the store evicted, and evict again
    srv = procs.serve("--store", str(store), "--store-size", "150M", "--hot-size", "0")
    other_sha = file_sha(other)
    readers = Loop(lambda: nbd_read(srv.uri("other@1")))
    wait_for("a first pass of other@1", lambda: readers.results, timeout=120)
    p = run("import", str(lab), "--imi", "lab", "--copy", "--pin", "--store", str(store),
            check=False)
    passes = len(readers.results)
    wait_for("two more passes", lambda: len(readers.results) >= passes + 2, timeout=300)
    results = readers.stop()
    assert all((r.rc, r.sha) == (0, other_sha) for r in results), [r.err for r in results]
    assert p.returncode == 0, p.stderr
    row = ls(store)["lab@1"]
    assert row["pinned"] and row["sources"] == []
    assert row["held"] == row["needed"] == data_bytes(176 * MiB), row
    v = verify(store)
    assert v.returncode == 0 and "UNREADABLE" not in v.stdout, v.stdout
    r = nbd_read(srv.uri("lab@1"))
    assert (r.rc, r.sha, r.size) == (0, file_sha(lab), 176 * MiB)
    assert "evicted_bytes" in run("stats", "--store", str(store)).stdout


def test_1_a_pinned_copy_that_cannot_fit_is_refused_whole(tmp_path: Path) -> None:
    """Without a server: ``import --copy --pin --store-size 32M`` of a 64 MiB image "succeeded"
    with 51 % held. It now exits 2, says the store is full, and leaves no version and no
    pending record; the same import in a store that can hold it succeeds whole."""
    store = tmp_path / "S"
    img = make_image(tmp_path / "lab.img", 64 * MiB, seed=13)
    p = run("import", str(img), "--imi", "lab", "--copy", "--pin", "--store", str(store),
            "--store-size", "32M", check=False)
    assert p.returncode == 2 and "store full" in p.stderr and "nothing was made" in p.stderr
    assert ls(store) == {} and pending(store) == []
    assert verify(store).returncode == 0
    run("import", str(img), "--imi", "lab", "--copy", "--pin", "--store", str(store),
        "--store-size", "64M")
    row = ls(store)["lab@1"]
    assert row["held"] == row["needed"] == data_bytes(64 * MiB)


# ------------------------------------------------------------------ 2


def test_2_two_imports_of_one_name_cannot_both_succeed(tmp_path: Path, procs: Procs) -> None:
    """``import A --version 7 & import B --version 7`` both printed "imported lab@7" and the
    store held B. Now exactly one succeeds and the store holds its image; without
    ``--version`` the two get two numbers, each with its own bytes."""
    require("nbdcopy")
    store = tmp_path / "S"
    a = make_image(tmp_path / "a.img", 192 * MiB, seed=21)
    b = make_image(tmp_path / "b.img", 192 * MiB, seed=22)
    run("import", str(make_image(tmp_path / "seed.img", MiB)), "--imi", "seed", "--store",
        str(store), "-q")
    pa = start("import", str(a), "--imi", "lab", "--version", "7", "--store", str(store))
    pb = start("import", str(b), "--imi", "lab", "--version", "7", "--store", str(store))
    ra, rb = finish(pa), finish(pb)
    assert sorted([ra[0], rb[0]]) == [0, 2], (ra, rb)
    winner, loser = (a, rb) if ra[0] == 0 else (b, ra)
    assert "lab@7 is being made by process" in loser[2] or "lab@7 exists" in loser[2], loser
    pa = start("import", str(a), "--imi", "dflt", "--store", str(store))
    pb = start("import", str(b), "--imi", "dflt", "--store", str(store))
    ra, rb = finish(pa), finish(pb)
    assert ra[0] == rb[0] == 0, (ra, rb)
    made = {ra[1].split(":")[0]: a, rb[1].split(":")[0]: b}
    assert set(made) == {"imported dflt@1", "imported dflt@2"}, made
    assert pending(store) == []
    srv = procs.serve("--store", str(store))
    assert nbd_read(srv.uri("lab@7")).sha == file_sha(winner)
    for line, img in made.items():
        assert nbd_read(srv.uri(line.split()[-1])).sha == file_sha(img)


def test_2_a_killed_import_leaves_a_name_the_next_one_takes(tmp_path: Path) -> None:
    """An import killed mid-copy leaves its pending record: ``ls`` and ``verify`` show it
    (its process gone: reclaimable), no version appears, the next import of the name takes it
    over, and ``verify --repair`` drops what is left."""
    store = tmp_path / "S"
    img = make_image(tmp_path / "big.img", 512 * MiB, seed=23)

    def copying() -> bool:
        """A pending version with chunks copied (the store may not be made yet)."""
        out = run("ls", "--json", "--store", str(store), check=False)
        return out.returncode == 0 and any(r.get("pending") and r["chunks"] > 0
                                           for r in json.loads(out.stdout))

    p = start("import", str(img), "--imi", "lab", "--version", "3", "--copy", "--store",
              str(store))
    wait_for("a copy under way", copying, timeout=120, every=0.05)
    p.kill()
    p.wait()
    (row,) = pending(store)
    assert (row["imi"], row["version"], row["pid"], row["alive"]) == ("lab", "3", p.pid, False)
    assert "lab@3" not in ls(store)
    assert "pending lab@3: its process is gone: reclaimable" in run(
        "ls", "--store", str(store)).stdout
    v = verify(store)
    assert "pending lab@3: its process is gone" in v.stdout and v.returncode == 0, v.stdout
    small = make_image(tmp_path / "small.img", 4 * MiB, seed=24)
    run("import", str(small), "--imi", "lab", "--version", "3", "--store", str(store), "-q")
    assert pending(store) == [] and ls(store)["lab@3"]["size"] == 4 * MiB
    p = start("import", str(img), "--imi", "lab", "--version", "4", "--copy", "--store",
              str(store))
    wait_for("a copy under way", copying, timeout=120, every=0.05)
    p.kill()
    p.wait()
    out = run("verify", "--repair", "--store", str(store)).stdout
    assert "reclaimed: 1 pending versions of processes that are gone (lab@4)" in out, out
    assert pending(store) == []


# ------------------------------------------------------------------ 4


FLIPPER = """
    import sys, time
    from icbdcache.store import Store
    s = Store(sys.argv[1])
    n = 0
    while True:
        s.set_latest("lab", ("big", "small")[n % 2])
        n += 1
        time.sleep(0.002)
"""


def test_4_a_bare_name_is_resolved_once_per_connection(tmp_path: Path, procs: Procs) -> None:
    """Clients open ``lab`` while its latest moves between a 64 MiB and a 3 MiB version many
    times a second: every client reads the bytes of the size it was told (the name used to be
    resolved again when transmission started: EIO, BadValsizeError)."""
    require("nbdcopy")
    store = tmp_path / "S"
    big = make_image(tmp_path / "big.img", 64 * MiB, seed=41)
    small = make_image(tmp_path / "small.img", 3 * MiB, seed=42)
    for img, v in ((big, "big"), (small, "small")):
        run("import", str(img), "--imi", "lab", "--version", v, "--copy", "--store",
            str(store), "-q")
    srv = procs.serve("--store", str(store))
    images = {64 * MiB: big.read_bytes(), 3 * MiB: small.read_bytes()}
    shas = {(file_sha(big), 64 * MiB), (file_sha(small), 3 * MiB)}
    flipper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FLIPPER), str(store)])
    try:
        def probe() -> int:
            c, rep = client_from("127.0.0.1", srv.port, "lab")
            try:
                assert rep == ACK
                want = images[c.size]
                for off in (0, c.size - CS, c.size // 2):
                    err, got = c.read(off, CS)
                    assert err == 0 and got == want[off : off + CS], (c.size, off, err)
                return c.size
            finally:
                c.close()

        probes = [Loop(probe) for _ in range(3)]
        copies = Loop(lambda: nbd_read(srv.uri("lab")))
        time.sleep(12)
        sizes = [s for p in probes for s in p.stop()]
        reads = copies.stop()
    finally:
        flipper.kill()
        flipper.wait()
    assert len(sizes) > 200 and set(sizes) == set(images), (len(sizes), set(sizes))
    assert reads and all(r.rc == 0 and (r.sha, r.size) in shas for r in reads), reads
    log = srv.text()
    assert "BadValsize" not in log and "internal error" not in log


# ------------------------------------------------------------------ 6


def test_6_a_replaced_version_reaches_new_clients_and_spares_open_ones(
        tmp_path: Path, procs: Procs) -> None:
    """``import --force`` while ``serve`` runs: new clients kept the old bytes until a
    restart. Now it is refused while a client runs the version (naming it), and with
    --force-in-use new clients get the new bytes at once while the open connection keeps
    reading the old ones, whole. One worker: the "replaced=" line is logged by the worker
    that opened the old version, which new connections may otherwise never reach."""
    require("nbdcopy")
    store = tmp_path / "S"
    a = make_image(tmp_path / "a.img", 16 * MiB, seed=61)
    b = make_image(tmp_path / "b.img", 16 * MiB, seed=62)
    run("import", str(a), "--imi", "lab", "--version", "1", "--store", str(store), "-q")
    srv = procs.serve("--store", str(store), "--workers", "1")
    old, rep = client_from("127.0.0.1", srv.port, "lab@1")
    try:
        assert rep == ACK
        assert old.read(0, CS) == (0, a.read_bytes()[:CS])
        wait_for("the client in the store's records",
                 lambda: ls(store)["lab@1"].get("clients"), timeout=30)
        p = run("import", str(b), "--imi", "lab", "--version", "1", "--force", "--store",
                str(store), check=False)
        assert p.returncode == 2 and "in use by 1 client(s): 127.0.0.1" in p.stderr, p.stderr
        run("import", str(b), "--imi", "lab", "--version", "1", "--force", "--force-in-use",
            "--store", str(store), "-q")
        for name in ("lab@1", "lab"):
            r = nbd_read(srv.uri(name))
            assert (r.rc, r.sha) == (0, file_sha(b)), name
        assert read_all(old, 16 * MiB) == a.read_bytes()
        assert "released=" not in srv.text()  # kept while the old client reads
    finally:
        old.close()
    assert "replaced=" in srv.text()
    # the old stack goes with its last client (a worker kept every one for good)
    wait_for("the replaced stack released", lambda: "released=" in srv.text(), timeout=30)


# ------------------------------------------------------------------ 7


def test_7_a_server_follows_a_store_other_processes_grow(tmp_path: Path, procs: Procs) -> None:
    """Four ``import --copy`` into a store while ``serve --store-size 300M`` runs grow the file
    past the server's map (1 GiB): it raised MapResizedError and lost every export until
    restarted. Now it maps the file again and goes on: the clients reading through it all
    read right, and the new versions are served without a restart."""
    require("nbdcopy")
    store = tmp_path / "S"
    other = make_image(tmp_path / "other.img", 64 * MiB, seed=71)
    run("import", str(other), "--imi", "other", "--store", str(store), "-q")
    srv = procs.serve("--store", str(store), "--store-size", "300M")
    other_sha = file_sha(other)
    readers = Loop(lambda: nbd_read(srv.uri("other@1")))
    imgs = [make_image(tmp_path / f"i{n}.img", 400 * MiB, seed=72 + n) for n in range(4)]
    ps = [start("import", str(img), "--imi", f"lab{n}", "--copy", "--pin", "--store-size",
                "4G", "--store", str(store), "-q") for n, img in enumerate(imgs)]
    outs = [finish(p) for p in ps]
    assert all(o[0] == 0 for o in outs), outs
    assert (store / "data.mdb").stat().st_size > 1 << 30  # past the server's map
    passes = len(readers.results)
    wait_for("two passes after the imports", lambda: len(readers.results) >= passes + 2,
             timeout=300)
    results = readers.stop()
    assert results and all((r.rc, r.sha) == (0, other_sha) for r in results), \
        [r.err for r in results if r.rc]
    for n, img in enumerate(imgs[:2]):
        r = nbd_read(srv.uri(f"lab{n}@1"))
        assert (r.rc, r.sha) == (0, file_sha(img)), r.err
    assert srv.proc.poll() is None
    log = srv.text()
    assert "MapResized" not in log and "MDB_MAP_RESIZED" not in log, log[-3000:]


# ------------------------------------------------------------------ 8


def test_8_boot_files_of_a_relative_store_are_found_from_anywhere(tmp_path: Path) -> None:
    """``import --store relstore`` recorded ``relstore/boot/...``: from another directory
    ``pxe render`` rendered 0 versions (and ``serve --pxe`` an empty menu). Paths inside the
    store are now relative to the store."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    img = make_image(here / "lab.img", 4 * MiB, seed=81)
    (here / "k").write_bytes(b"kernel bytes " * 1000)
    (here / "i").write_bytes(b"initrd bytes " * 3000)
    run("import", "lab.img", "--imi", "lab", "--store", "relstore", "--kernel", "k",
        "--initrd", "i", "-q", cwd=here)
    (here / "k").unlink()
    (here / "i").unlink()
    p = run("pxe", "render", "--store", "../here/relstore", "--out", "out", "--nbd-host",
            "10.0.0.1", cwd=there, check=False)
    assert p.returncode == 0 and "1 versions" in p.stdout, p.stdout + p.stderr
    assert (there / "out/boot/lab@1/vmlinuz").read_bytes() == b"kernel bytes " * 1000
    assert (there / "out/boot/lab@1/initrd.img").read_bytes() == b"initrd bytes " * 3000
    s = Store(here / "relstore", readonly=True)
    try:
        meta = s.version("lab@1")
        assert meta is not None and meta.kernel == "boot/lab@1/vmlinuz"
        assert meta.sources == [str(img)]
    finally:
        s.close()
    # a store made by an older release recorded STORE-relative paths of its importer's
    # directory: read as the store's own copy
    s = Store(here / "relstore")
    try:
        def old_style(m: object) -> None:
            m.kernel, m.initrd = "relstore/boot/lab@1/vmlinuz", "relstore/boot/lab@1/initrd.img"  # type: ignore[attr-defined]

        s.update_version("lab@1", old_style)
    finally:
        s.close()
    p = run("pxe", "render", "--store", str(here / "relstore"), "--out", "out2",
            "--nbd-host", "10.0.0.1", cwd=there, check=False)
    assert p.returncode == 0 and "1 versions" in p.stdout, p.stdout + p.stderr


# ------------------------------------------------------------------ 9


def test_9_serve_refuses_a_store_that_is_not_there(tmp_path: Path, procs: Procs) -> None:
    """``serve --store`` on a mistyped path made an empty store and served nothing. Now it
    refuses (exit 2, naming the path and --create-store) and creates nothing."""
    typo = tmp_path / "stroe"
    p = subprocess.run([str(Path(sys.executable).parent / "icbd-cache"), "serve", "--store",
                        str(typo), "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and str(typo) in p.stderr and "--create-store" in p.stderr
    assert not os.path.exists(typo)
    srv = procs.serve("--store", str(typo), "--create-store")
    assert srv.proc.poll() is None and (typo / "data.mdb").exists()
