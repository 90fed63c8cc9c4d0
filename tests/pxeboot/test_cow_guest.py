"""A real workstation whose root is writable through ``serve --store-cow``: the kernel's NBD
client in a QEMU guest (the Debian test iMI, ``icbd.overlay=none``), booted three times as the
same client (same MAC; through QEMU's user network every guest connects from 127.0.0.1).

What the guest writes without being asked: systemd commits a fresh /etc/machine-id (empty in
the image) to the read-write root at its first boot, and every mount of the ext4 root counts
in its superblock's mount count; its power-off syncs the file system (NBD FLUSH). The host reads
the client's overlay back over NBD as that same client and looks at both with e2fsprogs.

Documented (docs/serve.md, the promises): a client that boots again within ``--cow-linger``
without a boot id (Debian's initramfs sends none) is the same boot and keeps its overlay, also
across a kill -9 of the server between its boots (what it flushed is on disk); one that comes
back after the linger boots anew from the base image (here the linger of a server started
again meanwhile with a shorter one: the test does not wait a minute for it).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require, start_server
from test_pxe import BOOT_TIMEOUT, import_version, start_pxe, test_imi  # noqa: F401

from bench.vm import GUEST_APPEND, MARKER_RX, boot_vm

LINGER = 60
#: The linger of the server the third boot meets (seconds).
SHORT = 3
MAC = "52:54:00:1c:bd:31"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed (e2fsprogs)")
    return found


def root_of(image: Path) -> tuple[str, int]:
    """(/etc/machine-id, ext4 mount count) of an ext4 image."""
    mid = subprocess.run([_tool("debugfs"), "-R", "cat /etc/machine-id", str(image)],
                         capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run([_tool("dumpe2fs"), "-h", str(image)], capture_output=True,
                          text=True, check=True).stdout
    m = re.search(r"^Mount count:\s+(\d+)", head, re.M)
    assert m, head
    return mid, int(m.group(1))


def root_as_the_client_sees_it(port: int, dest: Path) -> tuple[str, int]:
    """:func:`root_of` lab@1 as client 127.0.0.1 sees it now (read over NBD)."""
    require("nbdcopy")
    dest.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/lab@1", str(dest)], check=True,
                   timeout=300)
    return root_of(dest)


def boot_once(tmp: Path, name: str, pxe_http: int, nbd_port: int) -> None:
    vm = boot_vm(name, f"http://10.0.2.2:{pxe_http}/boot.ipxe", MAC, tmp / f"{name}.console")
    try:
        _, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
        assert m.group(2) == f"10.0.2.2:{nbd_port}/lab@1"
        vm.proc.wait(60)  # it powers itself off after the marker
    finally:
        vm.stop()


@pytest.mark.guest
def test_a_workstation_keeps_its_root_within_the_linger_and_boots_anew_after(
        test_imi: Path, tmp_path: Path) -> None:  # noqa: F811
    if not Path("/usr/lib/PXELINUX/pxelinux.0").is_file():
        pytest.skip("PXELINUX is not installed (packages pxelinux, syslinux-common)")
    store = tmp_path / "store"
    import_version(store, test_imi / "imi.ext4", "lab")
    base_id, base_count = root_of(test_imi / "imi.ext4")
    assert base_id == ""  # the image leaves the machine id to each boot
    cow = tmp_path / "cow"
    cow.mkdir()
    args = ("--store", str(store), "--store-cow", "--cow-dir", str(cow),
            "--cow-linger", str(LINGER))
    nbd = start_server(tmp_path, *args)
    pxe = start_pxe(tmp_path, store, "--menu-timeout", "1", "--overlay", "none",
                    "--serial", "0 115200", "--append", GUEST_APPEND,
                    nbd_host="10.0.2.2", nbd_port=nbd.port)
    copy = tmp_path / "root.img"
    try:
        boot_once(tmp_path, "first", pxe.http_port, nbd.port)
        first_id, first_count = root_as_the_client_sees_it(nbd.port, copy)
        assert re.fullmatch(r"[0-9a-f]{32}", first_id), first_id  # committed by the guest
        assert first_count == base_count + 1
        # The server dies between two boots; a new one finds the overlay in --cow-dir.
        assert nbd.stop(signal.SIGKILL) == -signal.SIGKILL
        nbd = start_server(tmp_path, *args, port=nbd.port)
        assert "recovered=1" in nbd.log_text()

        boot_once(tmp_path, "again", pxe.http_port, nbd.port)  # within the linger
        again_id, again_count = root_as_the_client_sees_it(nbd.port, copy)
        assert again_id == first_id  # the same root: the overlay was kept
        assert again_count == first_count + 1

        # No connection for longer than the linger: the server starts again with a linger
        # of SHORT s (an overlay recovered at the start is idle from then), so the test
        # waits seconds for it, not the minute the two boots above need.
        assert nbd.stop() == 0
        nbd = start_server(tmp_path, *args[:-1], str(SHORT), port=nbd.port)
        assert "recovered=1" in nbd.log_text()
        time.sleep(SHORT + 2)
        boot_once(tmp_path, "anew", pxe.http_port, nbd.port)
        anew_id, anew_count = root_as_the_client_sees_it(nbd.port, copy)
        assert re.fullmatch(r"[0-9a-f]{32}", anew_id) and anew_id != first_id
        assert anew_count == base_count + 1  # from the base image again: its first mount
        # the kept overlay is gone, a new one (in COW_DIR/worker-I with workers)
        assert len(list(cow.rglob("ov-*.data"))) == 1
    finally:
        pxe.stop()
        nbd.stop()
