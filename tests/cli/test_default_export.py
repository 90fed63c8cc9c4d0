"""``serve --store S --default-export NAME``: the empty export name serves a version of the
store (``lab@1``) or an iMI's latest (``lab``); a name that is neither an ``--export`` nor a
version the store resolves is refused at startup with the name and the store named."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, Server, free_port, make_image, require, sha256_file, start_server

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ICBD, *args], capture_output=True, text=True, timeout=120,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A store with lab@1 (3 MiB) and lab@2 (5 MiB, the latest), and their images."""
    one = make_image(tmp_path / "one.img", 3 * MiB, seed=1)
    two = make_image(tmp_path / "two.img", 5 * MiB, seed=2)
    store = tmp_path / "store"
    for img in (one, two):
        run("import", str(img), "--imi", "lab", "--store", str(store), "-q")
    return store, one, two


def export_size(srv: Server, name: str = "") -> int:
    info = subprocess.run(["nbdinfo", "--json", srv.uri(name)], capture_output=True, text=True,
                          check=True, timeout=60)
    (e,) = json.loads(info.stdout)["exports"]
    return int(e["export-size"])


def copy_sha(srv: Server, out: Path, name: str = "") -> str:
    subprocess.run(["nbdcopy", srv.uri(name), str(out)], check=True, timeout=60)
    return sha256_file(out)


@pytest.mark.parametrize(("default", "which"), [("lab@1", 1), ("lab", 2), ("lab@2", 2)])
def test_empty_name_serves_the_default_version(
        two_versions: tuple[Path, Path, Path], tmp_path: Path, default: str,
        which: int) -> None:
    require("nbdinfo", "nbdcopy")
    store, one, two = two_versions
    img = one if which == 1 else two
    srv = start_server(tmp_path, "--store", str(store), "--default-export", default)
    try:
        assert export_size(srv) == img.stat().st_size
        assert copy_sha(srv, tmp_path / "empty.img") == sha256_file(img)
        # the named export is the same bytes
        assert copy_sha(srv, tmp_path / "named.img", default) == sha256_file(img)
    finally:
        assert srv.stop() == 0, srv.log_text()


def test_unknown_default_export_is_refused(two_versions: tuple[Path, Path, Path],
                                           tmp_path: Path) -> None:
    store, one, _ = two_versions
    port = str(free_port())
    for name in ("lab@9", "nope"):
        p = run("serve", "--store", str(store), "--listen", f"127.0.0.1:{port}",
                "--default-export", name, check=False)
        assert p.returncode == 2, p.stderr
        assert (f"--default-export {name!r} is not an export: not an --export name, and the "
                f"store {store} has no version {name!r}") in p.stderr
    p = run("serve", "--export", f"a={one}", "--listen", f"127.0.0.1:{port}",
            "--default-export", "lab@1", check=False)
    assert p.returncode == 2
    assert "--default-export 'lab@1' is not an export: not an --export name (a store version " \
           "needs --store DIR)" in p.stderr
