"""The Linux kernel's NBD client (nbd.ko + Debian's nbd-client 3.24) against our server.

Each test boots a tiny QEMU guest under TCG (tests/guest: the host's Debian kernel and a
busybox initramfs; about 12-16 s per boot here) that attaches an export of ``icbd-cache serve``
through QEMU user networking (the host's 127.0.0.1 is 10.0.2.2 in the guest) and reports
checksums on its serial console.

``ICBD_GUEST_SERVER=nbdkit`` runs the same tests against nbdkit (``file`` plugin, ``-r`` or
``--filter=cow``) instead of our server: a control that checks the guest fixture itself.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port, require, sha256_file, wait_port
from guest import (
    COW_LENGTH,
    COW_OFFSET,
    GuestImage,
    GuestResult,
    GuestUnavailable,
    build_guest,
    cow_pattern,
    run_guest,
)

pytestmark = pytest.mark.guest

EXPORT = "disk"
CONNECTIONS = 4  # run_guest's default for the multiconn tests

# (image, cow) -> port of a server exporting the image as EXPORT on 127.0.0.1
ServeFn = Callable[[Path, bool], int]


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    require("qemu-system-x86_64")
    try:
        return build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"test guest unavailable: {e}")


@pytest.fixture
def serve(server_factory: Callable[..., object], tmp_path: Path) -> Iterator[ServeFn]:
    """Start a server for an image: ``icbd-cache serve`` (or nbdkit, see the module doc)."""
    kind = os.environ.get("ICBD_GUEST_SERVER", "icbd")
    procs: list[subprocess.Popen[bytes]] = []

    def icbd(image: Path, cow: bool) -> int:
        spec = f"{EXPORT}={image}" + (",cow" if cow else "")
        srv = server_factory("--export", spec)
        return int(srv.port)  # type: ignore[attr-defined]

    def nbdkit(image: Path, cow: bool) -> int:
        require("nbdkit")
        port = free_port()
        mode = ["--filter=cow"] if cow else ["-r"]
        log = open(tmp_path / f"nbdkit-{port}.log", "wb")  # noqa: SIM115 - owned by the process
        cmd = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", *mode, "file", str(image)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        wait_port("127.0.0.1", port)
        return port

    if kind not in ("icbd", "nbdkit"):
        raise ValueError(f"ICBD_GUEST_SERVER={kind!r}: expected icbd or nbdkit")
    yield icbd if kind == "icbd" else nbdkit
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def explain(res: GuestResult) -> str:
    """What went wrong, for assertion messages: step results and the console's end."""
    lines = [
        f"done={res.done} rc={res.returncode} timed_out={res.timed_out} "
        f"elapsed={res.elapsed_s}s errors={res.errors}"
    ]
    lines += [
        f"step {s.index} {s.test}: rc={s.rc} errors={s.errors}" for s in res.steps
    ]
    return "\n".join(lines) + "\n--- console (end) ---\n" + res.tail(40)


def boot(image: GuestImage, port: int, test: str, tmp_path: Path) -> GuestResult:
    res = run_guest(port, EXPORT, test, image=image, log_path=tmp_path / f"console-{test}.log")
    assert res.ok, explain(res)
    return res


def expected_after_cow(base: Path) -> str:
    data = bytearray(base.read_bytes())
    data[COW_OFFSET : COW_OFFSET + COW_LENGTH] = cow_pattern()
    return hashlib.sha256(data).hexdigest()


def test_checksum(guest_image: GuestImage, serve: ServeFn, image: Path, tmp_path: Path) -> None:
    """A read-only export reads back whole and exact through the kernel client."""
    res = boot(guest_image, serve(image, False), "checksum", tmp_path)
    assert res.size == image.stat().st_size, explain(res)
    assert res.sha256 == sha256_file(image), explain(res)
    assert res.tcp_conns == 1, explain(res)


def test_multiconn(guest_image: GuestImage, serve: ServeFn, image: Path, tmp_path: Path) -> None:
    """``nbd-client -C 4``: the server must advertise NBD_FLAG_CAN_MULTI_CONN; the guest reads
    one slice per CPU at once, so at least two connections carry data."""
    res = boot(guest_image, serve(image, False), "multiconn", tmp_path)
    assert res.tcp_conns == CONNECTIONS, explain(res)
    assert res.size == image.stat().st_size, explain(res)
    step = res.steps[0]
    assert len(step.parts) >= 2, explain(res)
    data = image.read_bytes()
    for off, length, digest in step.parts:
        assert digest == hashlib.sha256(data[off : off + length]).hexdigest(), (
            f"slice at {off}+{length}\n{explain(res)}"
        )
    assert res.sha256 == hashlib.sha256(data).hexdigest(), explain(res)


@pytest.mark.parametrize("test", ["cow", "cow-multiconn"])
def test_cow(
    guest_image: GuestImage, serve: ServeFn, image: Path, tmp_path: Path, test: str
) -> None:
    """A copy-on-write export keeps a client's writes across a disconnect and reconnect (and,
    with several connections, across connections) and never touches the base image."""
    base_before = sha256_file(image)
    expected = expected_after_cow(image)
    pattern = hashlib.sha256(cow_pattern()).hexdigest()
    res = boot(guest_image, serve(image, True), test, tmp_path)
    step = res.steps[0]
    assert step.pattern_sha256 == pattern, "guest and host disagree on the pattern"
    assert step.cow_readback_live == pattern, explain(res)
    assert step.cow_readback == pattern, explain(res)
    assert res.size == image.stat().st_size, explain(res)
    assert res.sha256 == expected, explain(res)
    if test == "cow-multiconn":
        assert res.tcp_conns == CONNECTIONS, explain(res)
    assert sha256_file(image) == base_before, "the base image changed"
