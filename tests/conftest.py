"""Shared fixtures: free ports, test images, and a running ``icbd-cache serve``.

Servers are started as real processes through the installed CLI, the way a user runs them, and
stopped by PID at the end of the test.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# One signing key pair for the whole session: every test master signs with it (publish
# --signing-key) and every test site trusts it (--trust-key), through trusted(); the tests of
# trust itself make their own keys.
_KEY_DIR = Path(tempfile.mkdtemp(prefix="icbd-test-key-"))
atexit.register(shutil.rmtree, _KEY_DIR, True)
TEST_KEY = _KEY_DIR / "master.key"
TEST_KEY_PUB = _KEY_DIR / "master.key.pub"


def _make_test_key() -> None:
    from icbdcache.replication.signing import generate

    generate(str(TEST_KEY))


_make_test_key()

_TRUST_OPTIONS = ("--trust-key", "--insecure-no-signature")


def trusted(args: Sequence[str]) -> list[str]:
    """An icbd-cache command line with the session's key added where a command needs one:
    ``publish`` signs with it, ``replica``, ``serve --master`` and ``bundle import`` trust it
    (unless the line says what to trust itself, or names a --config file, which may)."""
    out = list(args)
    if not out:
        return out
    given = any(a.split("=")[0] in _TRUST_OPTIONS for a in out) or "--config" in out
    if out[0] == "publish" and "--signing-key" not in out:
        out += ["--signing-key", str(TEST_KEY)]
    elif not given and (out[0] == "replica" or (out[0] == "serve" and "--master" in out)
                        or out[:2] == ["bundle", "import"]):
        out += ["--trust-key", str(TEST_KEY_PUB)]
    return out
BIN = Path(sys.executable).parent


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> int:
    """Send ``sig`` to a process this test started, wait ``timeout`` seconds, then SIGKILL;
    its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def kill_server(proc: subprocess.Popen[bytes], log: str, timeout: float = 15.0) -> None:
    """SIGKILL a ``serve`` this test started, and wait until it and its workers (the PIDs
    its ``log`` names: ``workers=N pids=A,B``) are gone: they die with it, a moment after
    (PR_SET_PDEATHSIG), and hold the port and --cow-dir until then."""
    import re

    import psutil

    m = re.search(r"workers=\d+ pids=([\d,]+)", log)
    pids = [int(p) for p in m.group(1).split(",")] if m else []
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)


#: Ports handed out by :func:`free_port` in this process (never handed out twice).
_given_ports: set[int] = set()


def _port_range() -> tuple[int, int]:
    """The slice of ports below the kernel's ephemeral range that :func:`free_port` draws
    from: 20000 up to the ephemeral range's start, split between pytest-xdist workers."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            top = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        top = 32768
    lo = 20000
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    width = max(64, (top - lo) // max(1, workers))
    return lo + n * width, min(top, lo + (n + 1) * width)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now. Drawn at random below the kernel's
    ephemeral range (no other process's outgoing connection takes it before the test's
    server binds it, as happens with a port the kernel picks), from this xdist worker's own
    slice (:func:`_port_range`), never the same twice in one run."""
    import random

    lo, hi = _port_range()
    for _ in range(200):
        port = random.randrange(lo, hi)
        if port in _given_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    with socket.socket() as s:  # the slice is busy: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on host:port; raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def require(*tools: str) -> None:
    """Skip the calling test, naming the missing tool, unless every tool is on PATH."""
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (scripts/setup installs it)")


def libnbd_script(uri: str, script: str, cwd: Path, timeout: float = 120) -> str:
    """Run ``script`` in libnbd's nbdsh connected to ``uri`` (``h`` is the handle) and return
    what it printed; skip the calling test when libnbd's Python module is missing. Runs as
    ``/usr/bin/python3 -I -m nbd`` from ``cwd`` (a directory of the test's), so that our own
    ``nbd`` package cannot shadow libnbd's (STYLE.md, 'The nbd name'). Raises
    CalledProcessError when the script fails."""
    probe = subprocess.run(["/usr/bin/python3", "-I", "-c", "import nbd; nbd.NBD"],
                           capture_output=True, cwd=cwd, check=False)
    if probe.returncode != 0:
        pytest.skip("libnbd's Python module (python3-libnbd) is not importable by "
                    "/usr/bin/python3")
    out = subprocess.run(["/usr/bin/python3", "-I", "-m", "nbd", "-u", uri, "-c", script],
                         capture_output=True, text=True, timeout=timeout, check=True, cwd=cwd)
    return out.stdout


def require_holes(path: Path) -> None:
    """Skip unless the file system reports the holes of an image from :func:`make_image`
    (its fourth MiB is a hole): block status, and the zero chunks the cache learns from it,
    depend on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        ok = os.lseek(fd, 3 * (1 << 20), os.SEEK_HOLE) == 3 * (1 << 20)
        ok = ok and os.lseek(fd, 3 * (1 << 20), os.SEEK_DATA) == 4 * (1 << 20)
    except OSError:
        ok = False
    finally:
        os.close(fd)
    if not ok:
        pytest.skip(f"the file system of {path.parent} does not report holes")


def make_image(path: Path, size: int, seed: int = 1) -> Path:
    """Write a raw test image of ``size`` bytes: pseudo-random data with zero holes.

    Every 1 MiB block is random except every fourth, which stays a hole (sparse), so that
    checksums catch misplaced bytes and block status has holes to report.
    """
    import random

    rng = random.Random(seed)
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, mib):
            if (off // mib) % 4 == 3:
                continue
            f.seek(off)
            f.write(rng.randbytes(min(mib, size - off)))
    return path


@dataclass
class Server:
    """A running ``icbd-cache serve`` process."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    args: list[str] = field(default_factory=list)

    def uri(self, export: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{export}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop it with ``sig``; its exit status. SIGKILL also waits for its workers."""
        if sig == signal.SIGKILL and self.proc.poll() is None:
            kill_server(self.proc, self.log_text(), timeout)
            return int(self.proc.returncode)
        return stop_process(self.proc, sig, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 listen: bool = True, prefix: tuple[str, ...] = ()) -> Server:
    """Start ``icbd-cache serve ARGS --listen host:port`` (after ``prefix``, a command such
    as ``taskset -c 0``) and wait until it accepts."""
    port = port or free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [*prefix, str(BIN / "icbd-cache"), "serve", *args]
    if listen:
        cmd += ["--listen", f"{host}:{port}"]
    # TMPDIR: the default --cow-dir of writable exports goes with the test's own files.
    env = {**os.environ, "TMPDIR": str(tmp)}
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(proc, host, port, log, cmd)
    try:
        wait_port(host, port)
        wait_serving(srv)
    except TimeoutError:
        srv.stop(signal.SIGKILL)
        raise RuntimeError(f"server did not start: {srv.log_text()}") from None
    return srv


def wait_serving(srv: Server, timeout: float = 20.0) -> None:
    """Until every process of ``srv`` logged that it serves (with workers the port accepts
    before they do: its copy-on-write sockets are the parent's). Raises TimeoutError."""
    import re

    deadline = time.monotonic() + timeout
    while True:
        text = srv.log_text()
        m = re.search(r'"?workers"?[=:] ?(\d+)', text)
        want = int(m.group(1)) if m else 1
        if len(re.findall(r'event"?[=:] ?"?serving', text)) >= want:
            return
        if srv.proc.poll() is not None or time.monotonic() >= deadline:
            raise TimeoutError(f"not serving: {text[-2000:]}")
        time.sleep(0.02)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB raw test image with random data and holes."""
    return make_image(tmp_path / "disk.img", 64 << 20)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Call with serve arguments; every server started is stopped at teardown."""
    started: list[Server] = []

    def factory(*args: str, **kw: object) -> Server:
        srv = start_server(tmp_path, *args, **kw)  # type: ignore[arg-type]
        started.append(srv)
        return srv

    yield factory
    for s in started:
        s.stop()


os.environ.setdefault("LIBNBD_DEBUG", "0")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Any]:
    """``upstream(image, **kw)`` starts an nbdkit upstream with its log filter
    (:class:`upstreams.Upstream`); every one started is killed at teardown."""
    from upstreams import Upstream

    require("nbdkit")
    started: list[Upstream] = []

    def factory(img: Path, **kw: Any) -> Upstream:
        up = Upstream(img, tmp_path / f"nbdkit-{len(started)}.log", **kw).start()
        started.append(up)
        return up

    yield factory
    for up in started:
        up.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (``-n 2 --dist loadgroup``, pyproject's addopts), the tests that
    boot QEMU guests run one after another on one worker: each guest takes a core of TCG,
    and two at once on a 2-core machine would slow both past their timeouts."""
    for item in items:
        if item.get_closest_marker("guest") is not None:
            item.add_marker(pytest.mark.xdist_group("guest"))
