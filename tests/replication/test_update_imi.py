"""scripts/update-imi: v2 of the Debian test iMI made with apt (a package installed, one purged).

The test iMI comes from scripts/build-test-imi (built once, cached in ``~/.cache/icbd-cache/imi``;
needs root, debootstrap and the Debian mirror). Skips, with update-imi's reason, when it cannot
run here (exit 77: not root, no loop devices, mirror unreachable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from icbdcache.store.chunks import CHUNK_SIZE, ZERO, digest


def build_test_imi() -> Path:
    """scripts/build-test-imi's output directory (skips when it cannot be built here)."""
    if os.geteuid() != 0:
        pytest.skip("building the test iMI needs root (debootstrap)")
    if shutil.which("debootstrap") is None or shutil.which("debugfs", path=os.environ.get(
            "PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("needs debootstrap and debugfs (e2fsprogs)")
    p = subprocess.run([str(REPO / "scripts" / "build-test-imi")], capture_output=True,
                       text=True, timeout=900, check=False)
    if p.returncode == 77:
        pytest.skip(f"test iMI unavailable: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(p.stdout.strip().splitlines()[-1])


def debugfs_exists(image: Path, path: str) -> bool:
    """True if ``path`` exists in the ext4 ``image`` (read with debugfs, nothing mounted)."""
    p = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True,
                       text=True, timeout=60, check=False,
                       env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    return "Inode:" in p.stdout


def chunk_map(image: Path) -> list[bytes]:
    """The image's digests, one per 64 KiB chunk (:data:`ZERO` for all-zero chunks)."""
    out = []
    with image.open("rb") as f:
        while block := f.read(CHUNK_SIZE):
            out.append(digest(block))
    return out


def test_update_imi_install_purge(tmp_path: Path) -> None:
    imi = build_test_imi() / "imi.ext4"
    v1_size = imi.stat().st_size
    assert debugfs_exists(imi, "/usr/share/zoneinfo/Europe/Lisbon"), "tzdata not in the test iMI"
    assert not debugfs_exists(imi, "/usr/bin/less"), "less already in the test iMI"
    v2 = tmp_path / "v2.ext4"
    p = subprocess.run([str(REPO / "scripts" / "update-imi"), str(imi), str(v2),
                        "--grow", str(v1_size + (64 << 20)), "--install", "less",
                        "--purge", "tzdata"],
                       capture_output=True, text=True, timeout=900, check=False)
    if p.returncode == 77:
        pytest.skip(f"update-imi cannot run here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(v2)
    assert v2.stat().st_size == v1_size + (64 << 20)
    # nothing left mounted or attached
    assert str(v2) not in Path("/proc/self/mountinfo").read_text()
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False,
                             env={**os.environ,
                                  "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    assert str(v2) not in losetup.stdout

    assert debugfs_exists(v2, "/usr/bin/less")
    assert not debugfs_exists(v2, "/usr/share/zoneinfo/Europe/Lisbon")
    assert not debugfs_exists(v2, "/usr/share/zoneinfo")
    # the image's own apt configuration is back, the chroot's helpers are gone
    assert not debugfs_exists(v2, "/usr/sbin/policy-rc.d")
    assert debugfs_exists(imi, "/etc/resolv.conf") == debugfs_exists(v2, "/etc/resolv.conf")

    # v2 shares most of v1's chunks (an update rewrites little), nonzero ones included
    m1, m2 = chunk_map(imi), chunk_map(v2)
    held = {d for d in m1 if d != ZERO}
    data2 = [d for d in m2 if d != ZERO]
    shared = sum(1 for d in data2 if d in held)
    assert data2 and shared / len(data2) > 0.8, (shared, len(data2))
