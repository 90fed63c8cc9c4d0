"""The command line as a newcomer meets it: ``icbd-cache serve --config``, startup checks of
``--cow-dir`` and TLS files, and the store commands (import, pin, verify, ls, stats); ``demo``
is in test_demo.py.

Most tests call :func:`icbdcache.cli.main` in-process and look at its exit status and what it
printed; ``serve`` tests replace ``icbdcache.server.run`` so that the merged settings can be
inspected without serving. A few run the installed CLI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import BIN, REPO, Server, free_port, make_image, require, wait_port

from icbdcache import server as server_mod
from icbdcache.cli import COMMANDS, build_parser, main
from icbdcache.commands.options import Command
from icbdcache.commands.serve import SERVE
from icbdcache.server import ServeConfig
from icbdcache.store import Store
from icbdcache.store.chunks import CHUNK_SIZE

MiB = 1 << 20


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: (exit status, stdout, stderr). argparse's own exits count too."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return make_image(tmp_path / "small.img", 4 * MiB)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServeConfig]:
    """The ServeConfig that ``serve`` would run with, instead of running it."""
    seen: list[ServeConfig] = []

    def fake_run(cfg: ServeConfig, *, services: Sequence[object] = (), reload: object = None
                 ) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr(server_mod, "run", fake_run)
    return seen


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- serve --config

def test_config_keys_are_the_long_options(tmp_path: Path, small: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          captured: list[ServeConfig]) -> None:
    conf = write(tmp_path / "serve.toml", f'''
export = "lab={small}"            # one string: a one-element list
listen = ["127.0.0.1:10999"]
hot_size = "64M"
store_size = 1073741824
max_connections = 7
grace = 2
tls_required = false
''')
    rc, _, err = run_cli(capsys, "serve", "--config", str(conf))
    assert rc == 0, err
    cfg = captured[0]
    assert [e.name for e in cfg.exports] == ["lab"]
    assert cfg.listen == [("127.0.0.1", 10999)]
    assert cfg.hot_bytes == 64 * MiB
    assert cfg.store_size == 1 << 30
    assert cfg.max_connections == 7
    assert cfg.grace == 2.0


def test_config_exports_spelling_and_flags_replace_lists(
        tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str],
        captured: list[ServeConfig]) -> None:
    conf = write(tmp_path / "serve.toml",
                 f'exports = ["a={small}", "b={small}"]\nlisten = ["127.0.0.1:1"]\n')
    rc, _, err = run_cli(capsys, "serve", "--config", str(conf), "--export", f"c={small}",
                         "--listen", "127.0.0.1:2", "--hot-size", "32M")
    assert rc == 0, err
    cfg = captured[0]
    assert [e.name for e in cfg.exports] == ["c"]  # replaced, not extended
    assert cfg.listen == [("127.0.0.1", 2)]
    assert cfg.hot_bytes == 32 * MiB


@pytest.mark.parametrize(("setting", "message"), [
    ('max_connections = "many"', "setting 'max_connections' must be an integer, got 'many'"),
    ("max_connections = 1.5", "setting 'max_connections' must be an integer, got 1.5"),
    ("max_connections = true", "setting 'max_connections' must be an integer, got True"),
    ('grace = "soon"', "setting 'grace' must be a number, got 'soon'"),
    ('tls_required = "yes"', "setting 'tls_required' must be true or false, got 'yes'"),
    ('hot_size = "12Q"', "setting 'hot_size' must be a size"),
    ("store_size = -1", "setting 'store_size' must be a size"),
    ("listen = 10809", "setting 'listen' must be a list of strings, got 10809"),
    ("listen = [10809]", "setting 'listen' must be a list of strings, got [10809]"),
    ("cow_dir = 5", "setting 'cow_dir' must be a string, got 5"),
    ("hot_bytes = 1\nhot_size = 2", "'hot_bytes' and 'hot_size' are the same setting"),
    ("bogus = 1", "unknown settings bogus (known: listen, unix, export"),
    ("verbose = 2", "-v/-q are command-line options only"),
    ('listen = ["x:99999"]', "bad port"),
])
def test_config_values_are_checked(tmp_path: Path, small: Path, setting: str, message: str,
                                   capsys: pytest.CaptureFixture[str],
                                   captured: list[ServeConfig]) -> None:
    conf = write(tmp_path / "serve.toml", f'export = ["lab={small}"]\n{setting}\n')
    rc, _, err = run_cli(capsys, "serve", "--config", str(conf))
    assert rc == 2
    assert f"{conf}: " in err and message in err, err
    assert "Traceback" not in err
    assert not captured


def test_config_syntax_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            captured: list[ServeConfig]) -> None:
    conf = write(tmp_path / "serve.toml", 'export = ["lab=/x"\n')
    rc, _, err = run_cli(capsys, "serve", "--config", str(conf))
    assert rc == 2
    assert f"{conf}: not a valid TOML file" in err
    rc, _, err = run_cli(capsys, "serve", "--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "missing.toml" in err and "No such file" in err


def test_config_file_serves_with_the_installed_cli(tmp_path: Path, small: Path) -> None:
    require("nbdinfo")
    port = free_port()
    conf = write(tmp_path / "serve.toml",
                 f'export = "lab={small}"\nlisten = "127.0.0.1:{port}"\nhot_size = "64M"\n')
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "icbd-cache"), "serve", "--config", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, "127.0.0.1", port, log)
    try:
        wait_port("127.0.0.1", port)
        info = subprocess.run(["nbdinfo", "--size", srv.uri("lab")], capture_output=True,
                              text=True, check=True)
        assert int(info.stdout) == 4 * MiB
    finally:
        assert srv.stop() == 0, srv.log_text()


# ---------------------------------------------------------------------- serve startup checks

def test_cow_dir_missing_or_not_a_directory(tmp_path: Path, small: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            captured: list[ServeConfig]) -> None:
    rc, _, err = run_cli(capsys, "serve", "--export", f"s={small},cow",
                         "--cow-dir", str(tmp_path / "nope"))
    assert rc == 2 and f"--cow-dir {tmp_path / 'nope'}: no such directory" in err
    rc, _, err = run_cli(capsys, "serve", "--export", f"s={small},cow", "--cow-dir", str(small))
    assert rc == 2 and "not a directory" in err
    assert not captured


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_cow_dir_not_writable(tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str],
                              captured: list[ServeConfig]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    rc, _, err = run_cli(capsys, "serve", "--export", f"s={small},cow", "--cow-dir", str(ro))
    assert rc == 2 and f"--cow-dir {ro}: cannot create overlay files there" in err


def test_cow_dir_good(tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str],
                      captured: list[ServeConfig]) -> None:
    rc, _, err = run_cli(capsys, "serve", "--export", f"s={small},cow", "--cow-dir",
                         str(tmp_path))
    assert rc == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("icbd-cow")] == []


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    one, two = ca.issue_cert("localhost"), ca.issue_cert("other")
    files = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem",
             "other_key": tmp_path / "other-key.pem", "junk": tmp_path / "junk.pem",
             "encrypted": tmp_path / "enc-key.pem"}
    one.cert_chain_pems[0].write_to_path(str(files["cert"]))
    one.private_key_pem.write_to_path(str(files["key"]))
    two.private_key_pem.write_to_path(str(files["other_key"]))
    files["junk"].write_text("not a certificate\n")
    files["encrypted"].write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                                  "-----END ENCRYPTED PRIVATE KEY-----\n")
    return files


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("cert", "other_key", "--tls-key {other_key} does not match the certificate in "
                          "--tls-cert {cert}"),
    ("junk", "key", "--tls-cert {junk}: not a PEM certificate"),
    ("key", "cert", "--tls-cert {key}: not a PEM certificate"),
    ("cert", "junk", "--tls-key {junk}: not a PEM private key"),
    ("cert", "encrypted", "--tls-key {encrypted}: the key is encrypted"),
])
def test_tls_files_named(pems: dict[str, Path], small: Path, cert: str, key: str, message: str,
                         capsys: pytest.CaptureFixture[str],
                         captured: list[ServeConfig]) -> None:
    rc, _, err = run_cli(capsys, "serve", "--export", f"lab={small}", "--tls-cert",
                         str(pems[cert]), "--tls-key", str(pems[key]))
    assert rc == 2
    assert message.format(**{k: str(v) for k, v in pems.items()}) in err, err
    assert not captured


def test_tls_good_pair(pems: dict[str, Path], small: Path, capsys: pytest.CaptureFixture[str],
                       captured: list[ServeConfig]) -> None:
    rc, _, err = run_cli(capsys, "serve", "--export", f"lab={small}", "--tls-cert",
                         str(pems["cert"]), "--tls-key", str(pems["key"]))
    assert rc == 0, err


# ---------------------------------------------------------------------- import

def test_import_refuses_bad_names(tmp_path: Path, small: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    for args, bad in ((["--imi", "lab@7"], "'@'"), (["--imi", "a/b"], "'/'"),
                      (["--imi", "my lab"], "whitespace"),
                      (["--imi", "lab", "--version", "7@x"], "'@'"),
                      (["--imi", "lab", "--version", "7 8"], "whitespace"),
                      (["--imi", "lab", "--version", "a/b"], "'/'")):
        rc, _, err = run_cli(capsys, "import", str(small), "--store", str(store), *args)
        assert rc == 2 and f"may not contain {bad}" in err, (args, err)
    assert not store.exists()  # refused before the store is created


def test_import_refuses_bad_sources(tmp_path: Path, small: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    for src in ("http://master/lab", "nbd:///lab", str(tmp_path / "gone.img")):
        rc, _, err = run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store,
                             "--source", src)
        assert rc == 2 and f"--source {src!r}" in err, err
    rc, _, err = run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store,
                         "--source", "nbd://master:10809/lab@1", "--source", str(small), "-q")
    assert rc == 0, err


def test_import_empty_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    rc, _, err = run_cli(capsys, "import", str(empty), "--imi", "lab", "--store",
                         str(tmp_path / "store"))
    assert rc == 2 and "empty image" in err


def test_import_summary_counts_bytes_added(tmp_path: Path, small: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    nonzero = 3 * MiB  # make_image: every fourth MiB is a hole
    rc, out, _ = run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store, "--copy")
    assert rc == 0
    assert f"imported lab@1: {4 * MiB} bytes" in out
    assert f"{nonzero} bytes added to the store, 0 already there (dedup)" in out
    rc, out, _ = run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store, "--copy")
    assert rc == 0
    assert f"imported lab@2: {4 * MiB} bytes" in out
    assert f"0 bytes added to the store, {nonzero} already there (dedup)" in out
    rc, out, err = run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store, "-q")
    assert (rc, out, err) == (0, "", "")


# ---------------------------------------------------------------------- pin

def test_pin_says_which_version(tmp_path: Path, small: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    for _ in range(2):
        assert run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store,
                       "-q")[0] == 0
    rc, out, _ = run_cli(capsys, "pin", "lab", "--store", store)
    assert (rc, out.strip()) == (0, "pinned lab@2")
    rc, out, _ = run_cli(capsys, "pin", "lab@1", "--store", store)
    assert (rc, out.strip()) == (0, "pinned lab@1")
    rc, out, _ = run_cli(capsys, "pin", "lab@2", "--unpin", "--store", store)
    assert (rc, out.strip()) == (0, "unpinned lab@2")
    s = Store(store, readonly=True)
    try:
        assert [(m.key, m.pinned) for m in sorted(s.versions(), key=lambda m: m.key)] == [
            ("lab@1", True), ("lab@2", False)]
    finally:
        s.close()
    rc, _, err = run_cli(capsys, "pin", "lab@9", "--store", store)
    assert rc == 2 and "unknown version lab@9" in err
    rc, _, err = run_cli(capsys, "pin", "lab", "--store", str(tmp_path / "nostore"))
    assert rc == 2 and "no store at" in err
    assert not (tmp_path / "nostore").exists()


# ---------------------------------------------------------------------- verify --repair

def test_verify_repair_reports_and_warns(tmp_path: Path, small: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    assert run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store, "--copy",
                   "-q")[0] == 0  # lab@1: chunks in the store, no source
    assert run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store,
                   "-q")[0] == 0  # lab@2: same chunks, the file is its source
    s = Store(store)
    try:
        d = bytes(s.chunk_map("lab@1")[:16])
        with s.env.begin(write=True) as txn:
            txn.put(d, b"rotten" * 100, db=s.db["chunks"])
    finally:
        s.close()

    rc, out, _ = run_cli(capsys, "verify", "--store", store)
    assert rc == 1 and out.startswith("DAMAGED") and "1 bad" in out
    rc, out, err = run_cli(capsys, "verify", "--repair", "--store", store)
    # the store is consistent again, but lab@1 cannot be read in full: exit 1, naming it
    assert rc == 1, out + err
    held = 3 * MiB - CHUNK_SIZE
    assert f"repaired: deleted 1 bad chunks; held counter fixed ({3 * MiB} -> {held}" in out
    assert "UNREADABLE lab@1: misses 65536 bytes" in out and "no source" in out
    assert "lab@2" not in out  # its file can still fault the chunk in
    rc, out, _ = run_cli(capsys, "verify", "--store", store)
    assert rc == 1 and out.startswith("OK") and f"held {held} bytes (recorded {held})" in out
    assert "UNREADABLE lab@1" in out and "1 version(s) cannot be read in full" in out
    # imported again, it reads in full: verify is content
    assert run_cli(capsys, "import", str(small), "--imi", "lab", "--version", "1", "--force",
                   "--copy", "-q", "--store", store)[0] == 0
    rc, out, _ = run_cli(capsys, "verify", "--store", store)
    assert rc == 0 and "UNREADABLE" not in out, out


# ---------------------------------------------------------------------- ls, stats, help

def test_stats_prints_every_counter(tmp_path: Path, small: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    assert run_cli(capsys, "import", str(small), "--imi", "lab", "--store", store, "-q")[0] == 0
    rc, out, _ = run_cli(capsys, "stats", "--store", store)
    assert rc == 0
    shown = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    for k in ("hits", "misses", "coalesced", "faults", "fault_errors", "corrupt_chunks",
              "prefetched", "evicted_bytes", "held_bytes", "chunks"):
        assert shown[k] == 0, k


@pytest.mark.parametrize(("command", "words"), [
    ("ls", ["List every version", "--json", "a JSON list"]),
    ("stats", ["every 5 s", "shows 0", "one JSON object"]),
    ("pin", ["unpin instead", "IMI for its latest"]),
    ("verify", ["exit status", "--repair"]),
])
def test_help_texts(command: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for w in words:
        assert w in flat, (command, w)


#: The pages that document the commands (each command's table names its page).
DOC_PAGES = ("serve.md", "store.md", "pxe.md", "replication.md", "replica.md")

#: Options of other programs that the pages name, by page.
FOREIGN_OPTIONS: dict[str, set[str]] = {
    "pxe.md": {"--variant", "--image-opts"},
    "serve.md": {"--image-opts"},
}


def flags_in(text: str) -> set[str]:
    """The long options a text names (``--pxe-NAME``, a placeholder, is none)."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w-])", text))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_option_is_in_its_doc_page(command: Command) -> None:
    text = (REPO / "docs" / command.doc).read_text()
    missing = sorted(set(command.long_options()) - flags_in(text))
    assert not missing, f"icbd-cache {command.name}: {missing} not in docs/{command.doc}"


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_option_the_docs_name_exists(page: str) -> None:
    known = {f for c in COMMANDS for f in c.long_options()} | {
        "--help", "--version", "--verbose", "--quiet"}
    named = flags_in((REPO / "docs" / page).read_text())
    unknown = sorted(named - known - FOREIGN_OPTIONS.get(page, set()))
    assert not unknown, f"docs/{page} names options no command has: {unknown}"
    assert named & known, f"docs/{page} names no icbd-cache option at all"


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name (``pxe serve``: pxe's subcommands, and those of
    ``bundle`` and ``store``)."""
    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                return dict(a.choices)
        return {}

    out: dict[str, argparse.ArgumentParser] = {}
    for name, p in subparsers(build_parser()).items():
        if name in ("pxe", "bundle", "store"):
            out.update({f"{name} {n}": q for n, q in subparsers(p).items()})
        else:
            out[name] = p
    return out


def test_every_command_has_a_table_and_a_page() -> None:
    assert set(command_parsers()) == {c.name for c in COMMANDS}
    assert {c.doc for c in COMMANDS} <= set(DOC_PAGES)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_parser_is_the_table_and_help_has_an_example(
        command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    p = command_parsers()[command.name]
    flags = {s for a in p._actions for s in a.option_strings if s.startswith("--")}
    assert flags - {"--help", "--verbose", "--quiet"} == set(command.long_options())
    rc, out, _ = run_cli(capsys, *command.name.split(), "--help")
    assert rc == 0
    assert "example" in out
    assert flags <= flags_in(out)


def test_serve_doc_links_store_and_pxe() -> None:
    text = (REPO / "docs" / "serve.md").read_text()
    links = set(re.findall(r"\]\(([\w.-]+\.md)\)", text))
    assert {"store.md", "pxe.md", "replica.md"} <= links
    for link in links:
        assert (REPO / "docs" / link).is_file(), link
    assert "`--trace FILE`" in text


def test_installed_cli_is_on_the_venv_path() -> None:
    exe = shutil.which("icbd-cache", path=str(BIN))
    assert exe is not None
    r = subprocess.run([exe, "pin", "--help"], capture_output=True, text=True, check=True)
    assert "usage: icbd-cache pin" in r.stdout


def test_serve_doc_config_example_loads(tmp_path: Path) -> None:
    text = (REPO / "docs" / "serve.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S)
    assert example is not None
    conf = write(tmp_path / "serve.toml", example.group(1))
    settings = SERVE.load_config(str(conf))
    assert settings["hot_bytes"] == 256 * MiB and settings["store_size"] == 50 << 30
    assert [(e.name, e.cow) for e in settings["exports"]] == [("lab", False), ("scratch", True)]
    assert settings["listen"] == [("0.0.0.0", 10809)]
