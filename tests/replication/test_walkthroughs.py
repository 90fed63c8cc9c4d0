"""The docs' replication quick starts, pasted: docs/replica.md's one-machine walkthrough,
docs/replication.md's site credentials example and README's replication block, each run by
bash as written (paths moved into the test's directory, the host name ``master`` made the
address of a network namespace the test creates, where their fixed ports are free and a
master on ``0.0.0.0`` is reachable on an address that is not loopback).

Checked on what they print and hold: the bytes served equal the image's sha256, the site
holds each version complete, a forgotten site's token is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, REPO, make_image, require, sha256_file
from netns import ADDR, NetNS, make_netns

ICBD = str(BIN / "icbd-cache")


def block(doc: str, marker: str) -> str:
    """The first ```sh block of ``doc`` (a path under the repository) after ``marker``."""
    text = (REPO / doc).read_text()
    start = text.index(marker)
    m = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no sh block after {marker!r} in {doc}"
    return m.group(1)


def paste(ns: NetNS, script: str, cwd: Path,
          timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash in ``ns`` from ``cwd``, the venv's icbd-cache first on PATH;
    its background jobs are stopped when it ends (and by the namespace's deletion if it is
    killed)."""
    wrapped = ("trap 'exit 1' TERM INT\n"
               "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n"
               f"{script}\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("ICBD_MASTER", None)
    env.pop("ICBD_STORE", None)
    return subprocess.run(ns.argv("timeout", "-s", "TERM", str(int(timeout)), "bash", "-c",
                                  wrapped),
                          capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout + 60, check=False)


def wait_latest(store: Path, key: str, tries: int = 1500) -> str:
    """Shell lines that wait (bounded) until ``store`` has ``key`` complete and latest."""
    check = (f"import json,sys; r={{x['imi']+'@'+x['version']: x for x in "
             f"json.load(sys.stdin) if not x.get('pending')}}; v=r.get({key!r}) or {{}}; "
             "sys.exit(0 if v.get('latest') and v.get('held') == v.get('needed') else 1)")
    return (f"for i in $(seq {tries}); do icbd-cache ls --json --store {store} 2>/dev/null | "
            f"python3 -c \"{check}\" && break; sleep 0.2; done")


@pytest.fixture
def ns() -> Iterator[NetNS]:
    n = make_netns()
    try:
        yield n
    finally:
        n.delete()


def images(tmp: Path) -> tuple[Path, Path]:
    """lab-1.img, and lab-2.img: the same with its first MiB changed (a delta)."""
    one = make_image(tmp / "lab-1.img", 8 << 20, seed=5)
    two = tmp / "lab-2.img"
    data = bytearray(one.read_bytes())
    data[: 1 << 20] = make_image(tmp / "other", 1 << 20, seed=6).read_bytes()
    two.write_bytes(bytes(data))
    return one, two


def test_replica_md_one_machine_walkthrough(tmp_path: Path, ns: NetNS) -> None:
    require("nbdcopy", "nbdinfo")
    one, two = images(tmp_path)
    text = block("docs/replica.md", "Everything on one machine")
    assert "127.0.0.1:10810" in text and "--token" not in text  # loopback: no credentials
    script = text.replace("/tmp/master", str(tmp_path / "master")).replace(
        "/tmp/site-a", str(tmp_path / "site-a"))
    site = tmp_path / "site-a"
    after = "\n".join([wait_latest(site, "lab@2"), "echo lab2:",
                       "nbdcopy nbd://127.0.0.1:10809/lab - | sha256sum"])
    p = paste(ns, f"{script}\n{after}", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    first, _, rest = p.stdout.partition("lab2:")
    assert f"{sha256_file(one)}  -" in first, p.stdout + p.stderr
    assert f"{sha256_file(two)}  -" in rest, p.stdout + p.stderr
    assert re.search(r"^site-a +up ", p.stdout, re.M), p.stdout  # admin status
    assert "replica.complete" in p.stdout and "lab@2" in p.stdout  # stats


def test_replication_md_site_credentials_example(tmp_path: Path, ns: NetNS) -> None:
    images(tmp_path)
    text = block("docs/replication.md", "A master, its token made first")
    assert "admin site add site-a --store /srv/master" in text
    script = (text.replace("/srv/master", str(tmp_path / "master"))
              .replace("/srv/site-a", str(tmp_path / "site-a"))
              .replace("http://master:10810", f"http://{ADDR}:10810"))
    after = "\n".join([
        "echo site-b:",
        f"icbd-cache replica --store {tmp_path / 'b'} --master http://{ADDR}:10810 "
        "--site site-b --subscribe lab --master-token-file site-b.token "
        "--trust-key master.key.pub --once",
        "echo rc=$?"])
    p = paste(ns, f"{script}\n{after}", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    tokens = [(tmp_path / f"site-{x}.token").read_text() for x in "ab"]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}\n", t) for t in tokens), tokens
    rows = json.loads(subprocess.run([ICBD, "ls", "--json", "--store",
                                      str(tmp_path / "site-a")], capture_output=True,
                                     text=True, check=True).stdout)
    assert [(r["imi"], r["version"], r["latest"], r["held"] == r["needed"])
            for r in rows] == [("lab", "1", True, True)]
    status, _, rest = p.stdout.partition("forgot site-b (its token revoked)")
    assert re.search(r"^site-a +up ", status, re.M) and re.search(r"^site-b ", status, re.M)
    assert "sites need credentials" in status
    assert rest.strip().endswith("rc=1"), p.stdout
    assert "401 unknown or revoked token" in p.stderr, p.stderr


def test_readme_replication_block(tmp_path: Path, ns: NetNS) -> None:
    """README's block is several machines' commands: pasted in one shell, the long-running
    ones go to the background and the test waits as a reader would (for the master's port,
    then for the site's copy) before the next line."""
    require("nbdcopy", "nbdinfo")
    one, _ = images(tmp_path)
    text = block("README.md", "## Replication: a master and its sites")
    site = tmp_path / "site-a"
    text = (text.replace("/snap/lab-8.img", str(one))
            .replace("/srv/master", str(tmp_path / "master"))
            .replace("--store DIR", f"--store {site}")
            .replace("http://master:10810", f"http://{ADDR}:10810")
            .replace("lab@8", "lab@1"))  # the bundle lines: the version published here
    lines: list[str] = []
    for cmd in text.replace("\\\n", " ").splitlines():
        if cmd.startswith(("icbd-cache master ", "icbd-cache serve ")):
            lines.append(re.sub(r"\s+#.*$", "", cmd) + " &")  # before its comment
            port = 10810 if cmd.startswith("icbd-cache master") else 10809
            lines.append(f"for i in $(seq 300); do python3 -c \"import socket; socket."
                         f"create_connection(('127.0.0.1', {port}), 1)\" 2>/dev/null "
                         "&& break; sleep 0.1; done")
            if port == 10809:
                lines.append(wait_latest(site, "lab@1"))
                lines.append("nbdcopy nbd://127.0.0.1:10809/lab - | sha256sum")
        else:
            lines.append(cmd)
    p = paste(ns, "\n".join(lines), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{sha256_file(one)}  -" in p.stdout, p.stdout + p.stderr
    assert re.search(r"^site-a +up ", p.stdout, re.M), p.stdout
    assert "sites need credentials" in p.stdout
