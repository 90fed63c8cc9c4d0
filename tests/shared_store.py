"""Helpers for the tests of one store shared by many processes (docs/store.md, 'CONCURRENCY'):
the CLI run as a user runs it, long-running processes stopped by PID, what ``ls`` and
``verify`` say, bytes read back with ``nbdcopy`` and hashed, NBD clients from a chosen loopback
address, and an HTTP proxy that holds a replica's chunk requests (a pull caught mid-way)."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, free_port, stop_process, trusted, wait_port
from nbdraw import RawClient

from nbd.constants import Rep

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20


def run(*args: str, check: bool = True, timeout: float = 600,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``icbd-cache ARGS``; with ``check`` it must exit 0."""
    p = subprocess.run([ICBD, *trusted(args)], capture_output=True, text=True, timeout=timeout,
                       cwd=cwd)
    if check:
        assert p.returncode == 0, f"icbd-cache {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """``icbd-cache ARGS`` started (output captured), for commands run side by side."""
    return subprocess.Popen([ICBD, *trusted(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def finish(p: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return int(p.returncode), out, err


def ls_rows(store: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(run("ls", "--json", "--store", str(store)).stdout)
    return rows


def ls(store: Path) -> dict[str, dict[str, Any]]:
    """``ls --json`` by ``IMI@VERSION`` (versions only, not pending ones)."""
    return {f"{r['imi']}@{r['version']}": r for r in ls_rows(store) if not r.get("pending")}


def pending(store: Path) -> list[dict[str, Any]]:
    return [r for r in ls_rows(store) if r.get("pending")]


def verify(store: Path) -> subprocess.CompletedProcess[str]:
    return run("verify", "--store", str(store), check=False)


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


@dataclass
class Read:
    """What one ``nbdcopy URI -`` gave: its exit status, sha256 and length of its output."""

    rc: int
    sha: str
    size: int
    err: str = ""


def nbd_read(uri: str, timeout: float = 300) -> Read:
    """Read a whole export with nbdcopy, hashing it as it streams."""
    p = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h = hashlib.sha256()
    n = 0
    assert p.stdout is not None and p.stderr is not None
    deadline = time.monotonic() + timeout
    while block := p.stdout.read(4 * MiB):
        h.update(block)
        n += len(block)
        if time.monotonic() > deadline:
            p.kill()
            break
    err = p.stderr.read().decode(errors="replace")
    rc = p.wait(30)
    p.stdout.close()
    p.stderr.close()
    return Read(rc, h.hexdigest(), n, err)


@dataclass
class Proc:
    """A long-running icbd-cache process (its log in a file), stopped by PID."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def uri(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"


class Procs:
    """The long-running processes of one test: every one is stopped at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def spawn(self, name: str, *args: str, port: int = 0, cwd: Path | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([ICBD, *trusted(args)], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd)
        p = Proc(proc, log, port)
        self.all.append(p)
        if port:
            try:
                wait_port("127.0.0.1", port)
            except TimeoutError:
                p.stop(signal.SIGKILL)
                raise RuntimeError(f"{name} did not start: {p.text()}") from None
        return p

    def serve(self, *args: str, name: str = "serve") -> Proc:
        port = free_port()
        return self.spawn(f"{name}-{port}", "serve", "--listen", f"127.0.0.1:{port}", *args,
                          port=port)

    def master(self, store: Path, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        return self.spawn(f"master-{port}", "master", "--store", str(store), "--listen",
                          f"127.0.0.1:{port}", *args, port=port)

    def stop_all(self) -> None:
        for p in self.all:
            p.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0,
             every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def client_from(address: str, port: int, export: str) -> tuple[RawClient, int]:
    """An NBD client connecting from the loopback ``address`` (127.0.0.X): (client, the final
    reply to NBD_OPT_GO; Rep.ACK means it is in transmission)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    c = RawClient(port, sock=sock)
    c.handshake()
    return c, c.go(export)


def read_all(c: RawClient, size: int, step: int = 4 * MiB) -> bytes:
    """Every byte of the export ``c`` is attached to; AssertionError on a read error."""
    out = bytearray()
    for off in range(0, size, step):
        err, data = c.read(off, min(step, size - off))
        assert err == 0, f"read at {off}: error {err}"
        out += data
    return bytes(out)


ACK = Rep.ACK


@dataclass
class Loop:
    """Runs ``fn()`` again and again in a thread until :meth:`stop`; keeps its results."""

    fn: Callable[[], Any]
    results: list[Any] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.fn())
            except BaseException as e:  # kept for the test to report
                self.errors.append(e)
                return

    def stop(self, timeout: float = 600) -> list[Any]:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the loop did not end"
        if self.errors:
            raise self.errors[0]
        return self.results
