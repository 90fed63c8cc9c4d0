"""A runtime-only install, as docs/install.md does it: ``pip install`` of this checkout into a
fresh virtualenv (no extras) brings what serve, master and replica need and nothing of the
tests or benchmarks; the three run for real from it; ``man icbd-cache`` finds its page through
PATH; icbd-bench says which extra a benchmark lacks; the man pages match the parsers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO, free_port, make_image, stop_process, trusted, wait_port


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with ``pip install REPO`` (not editable, no extras)."""
    root = tmp_path_factory.mktemp("runtime") / "venv"
    venv.create(root, with_pip=True)
    src = tmp_path_factory.mktemp("src") / "icbd-cache"
    # a copy: building in the checkout would leave build/ behind
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", ".hypothesis", "out"))
    p = subprocess.run([str(root / "bin" / "pip"), "install", "-q", str(src)],
                       capture_output=True, text=True, timeout=600, check=False)
    if p.returncode != 0 and ("Could not find a version" in p.stderr
                              or "No matching distribution" in p.stderr):
        pytest.skip(f"no package index reachable for a fresh install: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def installed(root: Path) -> set[str]:
    out = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "list",
                          "--format=freeze"], capture_output=True, text=True, check=True)
    return {line.split("==")[0].lower().replace("_", "-") for line in out.stdout.split()}


def test_runtime_install_brings_the_runtime_only(runtime: Path) -> None:
    have = installed(runtime)
    assert {"aiohttp", "lmdb", "prometheus-client", "jinja2", "uvloop"} <= have, have
    assert not have & {"pytest", "hypothesis", "matplotlib", "pyroute2", "trustme", "mypy",
                       "argparse-manpage"}, have


def test_runtime_install_runs_serve_master_and_replica(runtime: Path, tmp_path: Path) -> None:
    """serve answers a real NBD client, master answers a replica that registers and
    finishes (--once), all from the fresh virtualenv's code."""
    icbd = str(runtime / "bin" / "icbd-cache")
    env = {**os.environ, "PATH": f"{runtime / 'bin'}:/usr/bin:/bin"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(runtime / "bin" / "python"), "-c",
                            "import icbdcache; print(icbdcache.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(runtime)), where.stdout
    img = make_image(tmp_path / "x.img", 2 << 20)
    nbd, api = free_port(), free_port()
    procs = []
    try:
        with open(tmp_path / "serve.log", "wb") as out:
            procs.append(subprocess.Popen([icbd, "serve", "--export", f"x={img}", "--listen",
                                           f"127.0.0.1:{nbd}"], stdout=out, stderr=out,
                                          env=env, cwd=tmp_path))
        with open(tmp_path / "master.log", "wb") as out:
            procs.append(subprocess.Popen([icbd, "master", "--store", str(tmp_path / "m"),
                                           "--listen", f"127.0.0.1:{api}"], stdout=out,
                                          stderr=out, env=env, cwd=tmp_path))
        wait_port("127.0.0.1", nbd)
        wait_port("127.0.0.1", api)
        rep = subprocess.run([icbd, *trusted(["replica", "--store", str(tmp_path / "site"),
                                              "--master", f"http://127.0.0.1:{api}", "--site",
                                              "site-a", "--once"])],
                             capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path, check=False)
        assert rep.returncode == 0, rep.stderr
        assert "replicated nothing subscribed" in rep.stdout
        if shutil.which("nbdinfo"):
            info = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{nbd}/x"],
                                  capture_output=True, text=True, timeout=60, check=True)
            assert info.stdout.strip() == str(2 << 20)
    finally:
        codes = [stop_process(p) for p in procs]
    assert codes == [0, 0], [(tmp_path / f).read_text()[-1000:]
                             for f in ("serve.log", "master.log")]


def test_man_pages_installed_and_found_through_path(runtime: Path) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (package man-db)")
    env = {"PATH": f"{runtime / 'bin'}:/usr/bin:/bin", "MANPAGER": "cat", "COLUMNS": "100",
           "HOME": str(runtime)}
    where = subprocess.run(["man", "-w", "icbd-cache"], env=env, capture_output=True,
                           text=True, timeout=60, check=True)
    assert where.stdout.strip() == str(runtime / "share" / "man" / "man1" / "icbd-cache.1")
    page = subprocess.run(["man", "-P", "cat", "icbd-cache"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert "--metrics-listen" in page.stdout and "icbd-cache pxe serve" in page.stdout
    assert "warning" not in page.stderr, page.stderr
    bench = subprocess.run(["man", "-w", "icbd-bench"], env=env, capture_output=True,
                           text=True, timeout=60, check=True)
    assert bench.stdout.strip().endswith("man1/icbd-bench.1")
    units = runtime / "share" / "icbd-cache" / "systemd"
    assert (units / "icbd-cache-serve.service").is_file()


def test_icbd_bench_names_the_extra_a_benchmark_lacks(runtime: Path) -> None:
    p = subprocess.run([str(runtime / "bin" / "icbd-bench"), "replication"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2
    assert "needs matplotlib, pyroute2, trustme" in p.stderr
    assert "pip install 'icbd-cache[bench]'" in p.stderr
    help_text = subprocess.run([str(runtime / "bin" / "icbd-bench"), "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert "replication  matplotlib, pyroute2, trustme" in help_text


def test_man_pages_match_the_parsers() -> None:
    """man/man1/*.1 are what scripts/manpages makes of the parsers now."""
    pytest.importorskip("argparse_manpage", reason="argparse-manpage is a dev dependency "
                        "(scripts/setup installs it)")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "manpages"), "--check"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
