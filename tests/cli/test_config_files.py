"""``--config FILE`` on every long-running command, through the installed CLI: ``serve``
(``store_cow = true``), ``master``, ``replica`` and ``pxe serve`` take their settings from a
TOML file and act on them; ``serve`` refuses --pxe/--master options from a file that lacks
the switch; the TOML examples in docs/ load.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    BIN,
    REPO,
    TEST_KEY_PUB,
    free_port,
    make_image,
    require,
    sha256_file,
    stop_process,
    trusted,
    wait_port,
)

from icbdcache import node as node_mod
from icbdcache import server as server_mod
from icbdcache.cli import COMMANDS, main
from icbdcache.server import ServeConfig

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([ICBD, *trusted(args)], capture_output=True, text=True, timeout=120,
                       check=False)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


class Procs:
    """Long-running icbd-cache processes of one test, stopped by PID at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str, port: int | None = None) -> Path:
        """Start ``icbd-cache ARGS``; wait for ``port`` when given. Returns its log file."""
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([ICBD, *trusted(args)], stdout=out, stderr=subprocess.STDOUT)
        self.started.append((proc, log))
        if port is not None:
            try:
                wait_port("127.0.0.1", port)
            except TimeoutError:
                stop_process(proc, signal.SIGKILL)
                raise RuntimeError(f"{name} did not start: {log.read_text()}") from None
        return log

    def stop_all(self) -> list[int]:
        return [stop_process(p) for p, _ in self.started]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def toml(path: Path, **settings: object) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


@pytest.fixture
def store_with_lab(tmp_path: Path) -> tuple[Path, Path]:
    """A store holding lab@1 (a 4 MiB image, copied in), and the image."""
    img = make_image(tmp_path / "lab.img", 4 * MiB)
    store = tmp_path / "store"
    run("import", str(img), "--imi", "lab", "--store", str(store), "--copy", "-q")
    return store, img


# ---------------------------------------------------------------------- serve

def test_serve_config_store_cow_makes_versions_writable(
        tmp_path: Path, store_with_lab: tuple[Path, Path], procs: Procs) -> None:
    require("nbdinfo", "nbdcopy")
    store, img = store_with_lab
    port = free_port()
    conf = toml(tmp_path / "serve.toml", store=str(store), store_cow=True,
                listen=f"127.0.0.1:{port}", cow_dir=str(tmp_path))
    procs.start("serve", "serve", "--config", str(conf), port=port)
    uri = f"nbd://127.0.0.1:{port}/lab@1"
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    (e,) = info["exports"]
    assert e["is_read_only"] is False and e["export-size"] == 4 * MiB
    patch = tmp_path / "patch.img"
    patch.write_bytes(b"\xa5" * (4 * MiB))
    subprocess.run(["nbdcopy", str(patch), uri], check=True, timeout=60)
    back = tmp_path / "back.img"
    subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=60)
    assert back.read_bytes() == patch.read_bytes()  # this client's overlay
    assert sha256_file(img) != sha256_file(back)
    # the store is untouched: a read-only server on the same store serves the image
    ro = free_port()
    procs.start("serve-ro", "serve", "--store", str(store), "--listen", f"127.0.0.1:{ro}",
                port=ro)
    plain = tmp_path / "plain.img"
    subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{ro}/lab@1", str(plain)], check=True,
                   timeout=60)
    assert sha256_file(plain) == sha256_file(img)
    assert procs.stop_all() == [0, 0]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ServeConfig, list[object]]]:
    """What ``serve`` would run (its ServeConfig and node services), instead of running it."""
    seen: list[tuple[ServeConfig, list[object]]] = []

    def fake_run(cfg: ServeConfig, *, services: Sequence[object] = (), reload: object = None
                 ) -> int:
        seen.append((cfg, list(services)))
        return 0

    monkeypatch.setattr(server_mod, "run", fake_run)
    return seen


def test_serve_master_gives_the_replica_to_run_not_to_a_global(
        tmp_path: Path, captured: list[tuple[ServeConfig, list[object]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    from icbdcache.replication.replica import ReplicaService

    conf = toml(tmp_path / "serve.toml", store=str(tmp_path / "s"), create_store=True,
                listen="127.0.0.1:10999", master="http://127.0.0.1:1", site="site-a",
                subscribe="lab", pull_parallel=2, trust_key=str(TEST_KEY_PUB))
    assert main(["serve", "--config", str(conf)]) == 0, capsys.readouterr().err
    ((cfg, services),) = captured
    assert cfg.store == str(tmp_path / "s")
    assert len(services) == 1 and isinstance(services[0], ReplicaService)
    rc = services[0].config
    assert (rc.site, rc.subscribe, rc.parallel, rc.address) == (
        "site-a", ["lab"], 2, "127.0.0.1:10999")
    assert getattr(node_mod, "DEFAULT_SERVICES", []) == []
    assert main(["serve", "--store", str(tmp_path / "s"), "--listen", "127.0.0.1:1"]) == 0
    assert captured[-1][1] == []


@pytest.mark.parametrize(("settings", "words"), [
    ({"pxe_http_port": 8080}, "--pxe-http-port without --pxe"),
    ({"site": "a", "compress": "zstd"}, "--site, --compress: the replication options need "
                                        "--master URL"),
    ({"pxe": True, "pxe_tftp_port": "off", "pxe_http_port": "off"}, "nothing to serve"),
])
def test_serve_file_options_need_their_switch(
        tmp_path: Path, settings: dict[str, object], words: str,
        captured: list[tuple[ServeConfig, list[object]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    conf = toml(tmp_path / "serve.toml", store=str(tmp_path / "s"), listen="127.0.0.1:1",
                create_store=True, **settings)
    assert main(["serve", "--config", str(conf)]) == 2
    assert words in capsys.readouterr().err
    assert not captured


def test_serve_flags_win_over_the_file(tmp_path: Path,
                                       captured: list[tuple[ServeConfig, list[object]]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    conf = toml(tmp_path / "serve.toml", export=[f"a={img}"], store_cow=False, readahead=3,
                hot_bytes=1 << 20)
    assert main(["serve", "--config", str(conf), "--store-cow", "--readahead", "0",
                 "--store", str(tmp_path / "s"), "--create-store", "--listen", "127.0.0.1:1"]
                ) == 0, capsys.readouterr().err
    ((cfg, _),) = captured
    assert (cfg.store_cow, cfg.readahead, cfg.hot_bytes) == (True, 0, 1 << 20)


# ---------------------------------------------------------------------- master, replica

def test_master_and_replica_run_from_config_files(tmp_path: Path, procs: Procs) -> None:
    img = make_image(tmp_path / "lab-1.img", 4 * MiB)
    mstore, rstore = tmp_path / "master", tmp_path / "replica"
    run("publish", str(img), "--store", str(mstore), "--imi", "lab", "-q")
    port = free_port()
    mconf = toml(tmp_path / "master.toml", store=str(mstore), listen=f"127.0.0.1:{port}",
                 down_after=42, keepalive_interval=1.5)
    procs.start("master", "master", "--config", str(mconf), port=port)
    url = f"http://127.0.0.1:{port}"
    status = json.loads(run("admin", "--master", url, "status", "--json").stdout)
    assert status["down_after"] == 42.0

    rconf = toml(tmp_path / "replica.toml", store=str(rstore), master=url, site="site-c",
                 subscribe=["lab"], once=True, compress="zstd:1", pull_batch=8,
                 trust_key=[str(TEST_KEY_PUB)])
    p = run("replica", "--config", str(rconf))
    assert "replicated lab@1" in p.stdout, p.stdout + p.stderr
    rows = {r["version"]: r for r in json.loads(run("ls", "--store", str(rstore),
                                                    "--json").stdout)}
    assert rows["1"]["held"] == rows["1"]["needed"] > 0 and rows["1"]["latest"]
    status = json.loads(run("admin", "--master", url, "status", "--json").stdout)
    assert [s["name"] for s in status["sites"]] == ["site-c"]
    # the command line wins: --site replaces the file's, and a bad value is refused
    p = run("replica", "--config", str(rconf), "--site", "bad name", check=False)
    assert p.returncode == 2 and "--site 'bad name' may not contain whitespace" in p.stderr
    bad = toml(tmp_path / "bad.toml", store=str(rstore), site="s", pull_parallel=0)
    p = run("replica", "--config", str(bad), check=False)
    assert p.returncode == 2
    assert f"{bad}: setting 'pull_parallel' must be a whole number of at least 1" in p.stderr
    p = run("replica", "--config", str(tmp_path / "missing.toml"), check=False)
    assert p.returncode == 2 and "No such file" in p.stderr
    assert procs.stop_all() == [0]


def test_master_config_names_a_bad_listen(tmp_path: Path) -> None:
    conf = toml(tmp_path / "m.toml", store=str(tmp_path / "m"), listen="127.0.0.1:99999")
    p = run("master", "--config", str(conf), check=False)
    assert p.returncode == 2 and f"{conf}: setting 'listen': bad port" in p.stderr


# ---------------------------------------------------------------------- pxe serve

def test_pxe_serve_from_a_config_file(tmp_path: Path, procs: Procs) -> None:
    img = make_image(tmp_path / "raw.img", MiB)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"a kernel")
    initrd.write_bytes(b"an initrd")
    store = tmp_path / "store"
    run("import", str(img), "--imi", "lab", "--store", str(store), "--kernel", str(kernel),
        "--initrd", str(initrd), "-q")
    http = free_port()
    conf = toml(tmp_path / "pxe.toml", store=str(store), nbd_host="10.9.8.7", nbd_port=10888,
                listen="127.0.0.1", tftp_port="off", http_port=http, title="from a file",
                append="console=ttyS0")
    procs.start("pxe", "pxe", "serve", "--config", str(conf), port=http)
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/boot.ipxe", timeout=10) as r:
        script = r.read().decode()
    assert "nbdroot=10.9.8.7:10888/lab@1" in script, script
    assert "from a file" in script and "console=ttyS0" in script
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/boot/lab@1/vmlinuz", timeout=10) as r:
        assert r.read() == b"a kernel"
    assert procs.stop_all() == [0]
    # --nbd-host is required, on the command line or in the file
    bare = toml(tmp_path / "bare.toml", store=str(store), http_port=http)
    p = run("pxe", "serve", "--config", str(bare), check=False)
    assert p.returncode == 2
    assert "--nbd-host is required (or nbd_host in --config FILE)" in p.stderr


# ---------------------------------------------------------------------- the docs' examples

@pytest.mark.parametrize(("page", "command", "marker"), [
    ("serve.md", "serve", "hot_size"),
    ("replication.md", "master", "down_after"),
    ("replica.md", "replica", "pull_parallel"),
    ("pxe.md", "pxe serve", "tftp_port"),
])
def test_doc_config_examples_load(page: str, command: str, marker: str, tmp_path: Path) -> None:
    text = (REPO / "docs" / page).read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if f"{marker} =" in b]
    assert len(blocks) == 1, page
    conf = tmp_path / "example.toml"
    conf.write_text("\n".join(line.strip() for line in blocks[0].splitlines()))
    table = next(c for c in COMMANDS if c.name == command)
    settings = table.load_config(str(conf))
    assert len(settings) >= 5, settings
    assert table.config_keys()[marker].dest in settings
