"""Store format versioning (issue 16): a store records its format; a store from before strong
digests (format 1) is refused by every command, naming ``icbd-cache store upgrade``, and once
upgraded serves the same bytes; a store from a newer release is refused too.

The old store is made the way the previous release left one (tests/oldstore.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, free_port, make_image, require, sha256_file, start_server, trusted
from oldstore import make_old, set_format

from icbdcache.store import Store
from icbdcache.store.storeformat import FORMAT, StoreFormatError

ICBD = str(BIN / "icbd-cache")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ICBD, *trusted(args)], capture_output=True, text=True, timeout=300,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


def nbd_sha256(port: int, export: str) -> str:
    import hashlib

    p = subprocess.Popen(["nbdcopy", f"nbd://127.0.0.1:{port}/{export}", "-"],
                         stdout=subprocess.PIPE)
    h = hashlib.sha256()
    assert p.stdout is not None
    while block := p.stdout.read(1 << 20):
        h.update(block)
    assert p.wait(300) == 0
    return h.hexdigest()


def test_new_store_records_its_format(tmp_path: Path) -> None:
    st = Store(tmp_path / "s")
    assert st.format == FORMAT
    st.close()
    st = Store(tmp_path / "s", readonly=True)
    assert st.format == FORMAT
    st.close()


def test_old_store_is_refused_naming_the_upgrade_then_upgraded_serves_the_same_bytes(
        tmp_path: Path) -> None:
    require("nbdcopy")
    img = make_image(tmp_path / "lab.img", 6 << 20, seed=31)
    store = tmp_path / "store"
    run("import", str(img), "--imi", "lab", "--version", "1", "--copy", "--store", str(store),
        "-q")
    before = json.loads(run("ls", "--json", "--store", str(store)).stdout)
    make_old(store)
    command = f"icbd-cache store upgrade --store {store}"
    for args in (["ls"], ["stats"], ["verify"], ["pin", "lab@1"], ["warm", "lab", "--all"]):
        p = run(*args, "--store", str(store), check=False)
        assert p.returncode == 2, args
        assert "format 1" in p.stderr and command in p.stderr, (args, p.stderr)
    port = free_port()
    p = subprocess.run([ICBD, "serve", "--store", str(store), "--listen", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode != 0 and command in p.stderr
    with pytest.raises(StoreFormatError) as e:
        Store(store, readonly=True)
    assert e.value.found == 1

    out = run("store", "upgrade", "--store", str(store)).stdout
    assert "from format 1 to 2" in out and "1 versions" in out
    assert "nothing to do" in run("store", "upgrade", "--store", str(store)).stdout
    after = json.loads(run("ls", "--json", "--store", str(store)).stdout)
    assert [(r["imi"], r["version"], r["held"]) for r in after] == \
        [(r["imi"], r["version"], r["held"]) for r in before]
    st = Store(store, readonly=True)
    try:
        strong = st.strong_map("lab@1")
        assert strong is not None and len(strong) == 96 * 32
        meta = st.version("lab@1")
        assert meta is not None and meta.strong is not None
    finally:
        st.close()
    srv = start_server(tmp_path, "--store", str(store))
    try:
        assert nbd_sha256(srv.port, "lab") == sha256_file(img)
    finally:
        srv.stop()


def test_store_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store(store).close()
    set_format(store, str(FORMAT + 1).encode())
    p = run("ls", "--store", str(store), check=False)
    assert p.returncode == 2 and f"format {FORMAT + 1}" in p.stderr and "newer" in p.stderr
    p = run("store", "upgrade", "--store", str(store), check=False)
    assert p.returncode == 2 and "newer" in p.stderr
