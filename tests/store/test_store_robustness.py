"""A broken version or a dead upstream costs only that version, never the whole server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import BIN, free_port, make_image, require, sha256_file

from icbdcache.store import Store


def _icbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "icbd-cache"), *args], capture_output=True, text=True,
                          check=True)


def test_bad_source_and_dead_upstream_cost_only_their_version(
        tmp_path: Path, server_factory: Any) -> None:
    require("nbdinfo", "nbdcopy")
    img = make_image(tmp_path / "good.img", 8 << 20)
    store = tmp_path / "store"
    _icbd("import", str(img), "--imi", "good", "--store", str(store))
    other = make_image(tmp_path / "other.img", 8 << 20, seed=2)  # no chunk in common
    _icbd("import", str(other), "--imi", "bad", "--store", str(store))
    # A source spec no build of this project can open (written behind the CLI's back).
    s = Store(store)
    meta = s.version("bad@1")
    assert meta is not None
    meta.sources = ["gopher://nowhere/x"]
    s.put_version(meta)
    s.close()
    dead = f"nbd://127.0.0.1:{free_port()}/"  # nothing listens there
    srv = server_factory("--store", str(store), "--export", f"gone@1={dead}")
    listed = json.loads(subprocess.run(["nbdinfo", "--list", "--json", srv.uri()],
                                       capture_output=True, text=True, check=True).stdout)
    names = {e["export-name"] for e in listed["exports"]}
    assert {"good@1", "bad@1"} <= names and "gone@1" not in names
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", srv.uri("good"), str(out)], check=True)
    assert sha256_file(out) == sha256_file(img)
    # the version without a usable source answers reads with an error, the server stays up
    failed = subprocess.run(["nbdcopy", srv.uri("bad@1"), str(tmp_path / "bad.img")],
                            capture_output=True, text=True)
    assert failed.returncode != 0
    subprocess.run(["nbdcopy", srv.uri("good@1"), str(out)], check=True)
    assert sha256_file(out) == sha256_file(img)
    log = srv.log_text()
    assert "gopher" in log and "gone@1" in log
