"""icbd-cache's second initrd (pxe/initrd.py) and the boot configs that load it.

The archive is built here from pxe/initramfs/ with the host's gcc; the configs load it after
the iMI's initrd and put ``icbd.reconnect=SECONDS`` on the kernel line. Booting it is
tests/pxeboot/test_reconnect.py's job; this checks what it holds and where it is named.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, require

from pxe import initrd
from pxe.render import BootEntry, BootSettings, ConfigError, render_configs

ICBD = str(BIN / "icbd-cache")


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """path -> (mode, data) of a newc cpio archive (up to TRAILER!!!)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos: pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos: pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos: pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a PT_INTERP program header (no dynamic loader)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> initrd.Built:
    require("gcc")
    try:
        return initrd.build(tmp_path_factory.mktemp("initrd"))
    except initrd.InitrdError as e:
        pytest.skip(f"cannot build the reconnect initrd here: {e}")


def test_archive_holds_the_client_and_its_switch(built: initrd.Built) -> None:
    """Two files (and their directories): the static client, executable, and the conf.d
    snippet that sets NBDCLIENT; all root-owned, mtime 0; the archive is gzip'ed."""
    entries = parse_newc(gzip.decompress(built.path.read_bytes()))
    assert set(entries) == {"conf", "conf/conf.d", "usr", "usr/sbin", initrd.CLIENT_PATH,
                            initrd.CONF_PATH}
    mode, client = entries[initrd.CLIENT_PATH]
    assert stat.S_ISREG(mode) and mode & 0o111 and is_static_elf(client)
    mode, conf = entries[initrd.CONF_PATH]
    assert conf == initrd.CONF.read_bytes() and b"NBDCLIENT=/usr/sbin/icbd-nbd-client" in conf
    assert stat.S_ISDIR(entries["usr/sbin"][0])
    assert built.size == built.path.stat().st_size
    assert built.path.name.startswith("reconnect-")


def test_build_is_cached_and_reproducible(built: initrd.Built) -> None:
    """A second build finds the first; a forced one gives the same bytes."""
    before, mtime = built.path.read_bytes(), built.path.stat().st_mtime_ns
    again = initrd.build(built.path.parent)
    assert again.path == built.path and built.path.stat().st_mtime_ns == mtime
    forced = initrd.build(built.path.parent, force=True)
    assert forced.path.read_bytes() == before


def test_client_compiles_cleanly_and_refuses_bad_arguments(tmp_path: Path) -> None:
    """No warning with -Wall -Wextra; usage errors exit 2 before touching any device."""
    require("gcc")
    exe = tmp_path / "icbd-nbd-client"
    p = subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                        str(initrd.SOURCE)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for args, words in ((["10.0.0.1", "/dev/nbd0"], "usage"),
                        (["server.lab", "-N", "lab@1", "10809", "/dev/nbd0"],
                         "not an IP address"),
                        (["10.0.0.1", "-N", "lab@1", "/dev/sda"], "usage"),
                        (["10.0.0.1", "-N", "lab@1", "/dev/nbd0", "-X"], "unknown option")):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)


def test_configs_load_it_after_the_imi_initrd() -> None:
    e = [BootEntry("lab", "7", "boot/lab@7/vmlinuz", "boot/lab@7/initrd.img", True, 1.0)]
    s = BootSettings(nbd_host="192.168.10.5", reconnect=300, extra_initrd=initrd.TREE_PATH,
                     menu_timeout=0)
    s.check()
    files = render_configs(e, s)
    ipxe = files["boot.ipxe"]
    assert ("kernel boot/lab@7/vmlinuz initrd=initrd.img initrd=icbd.img root=/dev/nbd0 "
            "nbdroot=192.168.10.5:10809/lab@7 ro icbd.overlay=tmpfs icbd.reconnect=300 ") in ipxe
    lines = ipxe.splitlines()
    first = lines.index("initrd --name initrd.img boot/lab@7/initrd.img || goto failed")
    assert lines[first + 1] == f"initrd --name icbd.img {initrd.TREE_PATH} || goto failed"
    pxelinux = files["pxelinux.cfg/default"]
    assert f"  INITRD boot/lab@7/initrd.img,{initrd.TREE_PATH}\n" in pxelinux
    assert " icbd.reconnect=300" in pxelinux
    off = render_configs(e, BootSettings(nbd_host="192.168.10.5", reconnect=0,
                                         extra_initrd=initrd.TREE_PATH, menu_timeout=0))
    for text in off.values():
        assert "icbd.img" not in text and "reconnect" not in text
    with pytest.raises(ConfigError, match="IP address"):
        BootSettings(nbd_host="cache.lab", reconnect=600).check()
    BootSettings(nbd_host="cache.lab", reconnect=0).check()
    with pytest.raises(ConfigError):
        BootSettings(nbd_host="10.0.0.1", reconnect=-1).check()


def _store_with_boot_files(tmp: Path) -> Path:
    require("mkfs.ext4", "debugfs")
    tree = tmp / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(b"kernel")
    (tree / "boot" / "initrd.img-6.1.0-9-amd64").write_bytes(b"initrd")
    img = tmp / "imi.ext4"
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(img), "16M"], check=True)
    store = tmp / "store"
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(store)],
                   check=True, capture_output=True, timeout=120)
    return store


def test_render_writes_it_into_the_tree(tmp_path: Path) -> None:
    """pxe render: icbd/reconnect.img in the tree (the gzip'ed archive), named by both
    loaders' configs; with --reconnect 0 neither; without a compiler a warning says the
    workstations will not reconnect, and the configs boot the iMI's initrd alone."""
    require("gcc")
    store = _store_with_boot_files(tmp_path)
    base = [ICBD, "pxe", "render", "--store", str(store), "--nbd-host", "10.0.0.5"]
    out = tmp_path / "out"
    p = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    img = out / initrd.TREE_PATH
    assert gzip.decompress(img.read_bytes())[:6] == b"070701"
    assert "initrd --name icbd.img icbd/reconnect.img" in (out / "boot.ipxe").read_text()
    assert "icbd.reconnect=600" in (out / "boot.ipxe").read_text()
    off = tmp_path / "off"
    p = subprocess.run([*base, "--out", str(off), "--reconnect", "0"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and not (off / initrd.TREE_PATH).exists()
    assert "icbd" + ".img" not in (off / "boot.ipxe").read_text()
    none = tmp_path / "none"
    shutil.rmtree(store / "boot" / "icbd")
    p = subprocess.run([*base, "--out", str(none)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CC": "/nonexistent/cc"})
    assert p.returncode == 0
    assert "warning: workstations will not reconnect" in p.stderr, p.stderr
    assert "icbd.reconnect" not in (none / "boot.ipxe").read_text()
