"""The PXE boot path: rendered configs, boot-file extraction, TFTP and HTTP serving, and real
workstations (QEMU under TCG) booting through PXELINUX and iPXE into a root served by
``icbd-cache serve --store``.

Fast tests build a tiny ext4 "iMI" with ``mkfs.ext4 -d`` (a fake kernel and a 30 MiB random
initrd) and run ``icbd-cache pxe serve`` as a process. The ``guest`` tests boot the Debian test
iMI of ``scripts/build-test-imi`` (built once, cached in ``~/.cache/icbd-cache/imi``; needs root,
debootstrap and the Debian mirror) with the e1000 NIC's iPXE ROM and QEMU user networking, where
the host's 127.0.0.1 is 10.0.2.2: PXELINUX comes over our TFTP (``bootfile=tftp://10.0.2.2:P/
pxelinux.0``; PXELINUX keeps that server and port for its config and the kernel), iPXE gets
``boot.ipxe`` and the kernel over our HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, REPO, Server, free_port, require, sha256_file, start_server, wait_port

from bench.vm import GUEST_APPEND, LINGER_RX, MARKER_RX, Unavailable, Vm, boot_vm, build_test_imi
from pxe.render import (
    BootEntry,
    BootSettings,
    ConfigError,
    Pin,
    load_pins,
    nbdroot,
    normalize_mac,
    render_configs,
)
from pxe.tftp import BytesReader, Op, ReadTransfer, Request, parse_request

ICBD = str(BIN / "icbd-cache")
MIB = 1 << 20

# ------------------------------------------------------------------------------------ helpers


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def make_ext4(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None,
              size_mib: int = 64) -> Path:
    """An ext4 image holding ``files`` (path -> bytes) and ``links`` (path -> target)."""
    require("mkfs.ext4")
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    for name, data in files.items():
        p = tree / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for name, target in (links or {}).items():
        p = tree / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
    run(shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4", "-q", "-F", "-d", str(tree),
        str(path), f"{size_mib}M")
    shutil.rmtree(tree)
    return path


def import_version(store: Path, image: Path, imi: str, *extra: str) -> str:
    out = run(ICBD, "import", str(image), "--imi", imi, "--store", str(store), *extra).stdout
    m = re.search(r"imported (\S+):", out)
    assert m, out
    return m.group(1)


@dataclass
class Pxe:
    """A running ``icbd-cache pxe serve``."""

    proc: subprocess.Popen[bytes]
    tftp_port: int
    http_port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{path}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.url(path), headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return bytes(r.read())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_pxe(tmp: Path, store: Path, *args: str, nbd_host: str = "127.0.0.1",
              nbd_port: int = 10809) -> Pxe:
    tftp, http = free_udp_port(), free_port()
    log = tmp / f"pxe-{http}.log"
    cmd = [ICBD, "pxe", "serve", "--store", str(store), "--listen", "127.0.0.1",
           "--tftp-port", str(tftp), "--http-port", str(http), "--nbd-host", nbd_host,
           "--nbd-port", str(nbd_port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    pxe = Pxe(proc, tftp, http, log)
    try:
        wait_port("127.0.0.1", http, 60)
    except TimeoutError:
        pxe.stop()
        raise RuntimeError(f"pxe serve did not start:\n{pxe.log_text()}") from None
    return pxe


# --------------------------------------------------------------------------- a tiny fake iMI

KVER_OLD, KVER = "6.1.0-9-amd64", "6.1.0-10-amd64"


@dataclass
class FakeImi:
    image: Path
    kernel: bytes
    initrd: bytes


@pytest.fixture(scope="module")
def fake_imi(tmp_path_factory: pytest.TempPathFactory) -> FakeImi:
    """An ext4 image with two kernels; ``/vmlinuz`` and ``/initrd.img`` point at the newer,
    whose initrd is 30 MiB of random bytes (the big TFTP file)."""
    rng = random.Random(7)
    kernel, initrd = rng.randbytes(3 * MIB + 123), rng.randbytes(30 * MIB)
    d = tmp_path_factory.mktemp("fakeimi")
    image = make_ext4(d / "imi.ext4", {
        f"boot/vmlinuz-{KVER}": kernel,
        f"boot/initrd.img-{KVER}": initrd,
        f"boot/vmlinuz-{KVER_OLD}": b"old kernel",
        f"boot/initrd.img-{KVER_OLD}": b"old initrd",
        "etc/icbd-release": b"fake 1\n",
    }, {"vmlinuz": f"boot/vmlinuz-{KVER}", "initrd.img": f"/boot/initrd.img-{KVER}"})
    return FakeImi(image, kernel, initrd)


@pytest.fixture(scope="module")
def fake_site(fake_imi: FakeImi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pxe]:
    """``pxe serve`` over a store with lab@1 (fake_imi); short TFTP timeouts."""
    tmp = tmp_path_factory.mktemp("fakesite")
    store = tmp / "store"
    import_version(store, fake_imi.image, "lab")
    pxe = start_pxe(tmp, store, "--tftp-timeout", "0.5", "--tftp-retries", "3",
                    "--menu-timeout", "2", nbd_host="10.0.0.1", nbd_port=10809)
    yield pxe
    pxe.stop()


# ------------------------------------------------------------------------------------ render

MAC_A, MAC_B, MAC_C = "52:54:00:aa:00:01", "52-54-00-AA-00-02", "525400aa0003"


def _entries() -> list[BootEntry]:
    return [
        BootEntry("lab", "6", "boot/lab@6/vmlinuz", "boot/lab@6/initrd.img", False, 1.0),
        BootEntry("lab", "7", "boot/lab@7/vmlinuz", "boot/lab@7/initrd.img", True, 2.0),
        BootEntry("exam", "3", "boot/exam@3/vmlinuz", "boot/exam@3/initrd.img", True, 3.0),
    ]


def _settings(**kw: object) -> BootSettings:
    base: dict[str, object] = {"nbd_host": "192.168.10.5", "nbd_port": 10809,
                               "default_imi": "lab", "menu_timeout": 5}
    s = BootSettings(**{**base, **kw})  # type: ignore[arg-type]
    s.check()
    return s


def test_render_pxelinux_menu_and_pins() -> None:
    pins = [Pin(normalize_mac(MAC_A), "lab@6"),
            Pin(normalize_mac(MAC_B), "exam", ip="10.1.0.9::10.1.0.1:255.255.0.0:ws9::off",
                append="icbd.linger=5"),
            Pin(normalize_mac(MAC_C), "lab@99")]  # no such version: that machine gets the menu
    files = render_configs(_entries(), _settings(pins=pins, serial="0 115200"))
    default = files["pxelinux.cfg/default"]
    assert "UI menu.c32" in default and "TIMEOUT 50" in default and "SERIAL 0 115200" in default
    assert "DEFAULT lab@7" in default
    labels = re.findall(r"^LABEL (\S+)", default, re.M)
    assert labels == ["lab@7", "exam@3"], "the latest version of each iMI, default iMI first"
    assert re.search(r"MENU LABEL lab 7 \(latest\)\n  MENU DEFAULT", default)
    block = default.split("LABEL lab@7")[1].split("LABEL exam@3")[0]
    assert "KERNEL boot/lab@7/vmlinuz" in block and "INITRD boot/lab@7/initrd.img" in block
    assert ("APPEND root=/dev/nbd0 nbdroot=192.168.10.5:10809/lab@7 ro icbd.overlay=tmpfs"
            in block)
    assert "IPAPPEND 1" in block and "ip=" not in block

    a = files["pxelinux.cfg/01-52-54-00-aa-00-01"]
    assert "DEFAULT lab@6" in a and "TIMEOUT 0" in a and "UI " not in a
    assert "nbdroot=192.168.10.5:10809/lab@6 " in a and "IPAPPEND 1" in a
    b = files["pxelinux.cfg/01-52-54-00-aa-00-02"]
    assert "nbdroot=192.168.10.5:10809/exam@3 " in b, "pinned to an iMI: its latest version"
    assert "ip=10.1.0.9::10.1.0.1:255.255.0.0:ws9::off icbd.linger=5" in b
    assert "IPAPPEND" not in b, "a static ip= replaces the PXE lease"
    assert not any("aa-00-03" in p for p in files), "a pin to a missing version is left out"


def test_render_ipxe_menu_and_pins() -> None:
    pins = [Pin(normalize_mac(MAC_A), "lab@6")]
    files = render_configs(_entries(), _settings(pins=pins, versions=2))
    menu = files["boot.ipxe"]
    assert menu.startswith("#!ipxe\n")
    assert "chain --autofree ipxe/${net0/mac:hexhyp}.ipxe || goto menu" in menu
    items = re.findall(r"^item (e\d+) (.*)$", menu, re.M)
    assert [t for _, t in items] == ["lab 7 (latest)", "lab 6", "exam 3 (latest)"]
    assert "choose --default e0 --timeout 5000 target || goto e0" in menu
    kernel = re.search(r"^:e0\n.*\nkernel (.*)$", menu, re.M)
    assert kernel, menu
    assert kernel.group(1).startswith("boot/lab@7/vmlinuz initrd=initrd.img root=/dev/nbd0 "
                                      "nbdroot=192.168.10.5:10809/lab@7 ro icbd.overlay=tmpfs "
                                      "ip=${ip}::${gateway}:${netmask}")
    assert "initrd --name initrd.img boot/lab@7/initrd.img" in menu
    pinned = files["ipxe/52-54-00-aa-00-01.ipxe"]
    assert "kernel ../boot/lab@6/vmlinuz " in pinned
    assert "nbdroot=192.168.10.5:10809/lab@6" in pinned
    assert "menu" not in pinned.replace("# icbd-cache boot menu", "")
    # no pins: no chain; an absolute base when asked; no menu with a zero timeout
    plain = render_configs(_entries(), _settings(http_base="http://boot.lab:8080",
                                                 menu_timeout=0, ip="dhcp"))
    assert "chain" not in plain["boot.ipxe"] and "choose" not in plain["boot.ipxe"]
    assert "kernel http://boot.lab:8080/boot/lab@7/vmlinuz " in plain["boot.ipxe"]
    assert " ip=dhcp" in plain["boot.ipxe"] and "IPAPPEND" not in plain["pxelinux.cfg/default"]
    assert "UI menu.c32" not in plain["pxelinux.cfg/default"]


def test_render_details() -> None:
    assert nbdroot("fd00::5", 10809, "lab@7") == "[fd00::5]:10809/lab@7"
    assert normalize_mac("AA-BB-CC-DD-EE-FF") == normalize_mac("aabbccddeeff") == \
        "aa:bb:cc:dd:ee:ff"
    with pytest.raises(ConfigError):
        normalize_mac("aa:bb:cc")
    with pytest.raises(ConfigError):
        BootSettings(nbd_host="h", ip="static").check()
    empty = render_configs([], _settings())
    assert "LOCALBOOT" in empty["pxelinux.cfg/default"]
    assert "no iMI" in empty["boot.ipxe"]
    none = render_configs(_entries(), _settings(overlay="none"))
    assert "nbdroot=192.168.10.5:10809/lab@7 rw icbd.overlay=none" in none["boot.ipxe"]


def test_load_pins(tmp_path: Path) -> None:
    toml = tmp_path / "pins.toml"
    toml.write_text(f'[[pin]]\nmac = "{MAC_B}"\nboot = "lab@7"\n\n'
                    f'[[pin]]\nmac = "{MAC_C}"\nboot = "exam"\nip = "10.0.0.9::10.0.0.1:'
                    '255.255.255.0::eth0:off"\n')
    pins = load_pins(toml)
    assert [(p.mac, p.boot) for p in pins] == [("52:54:00:aa:00:02", "lab@7"),
                                                ("52:54:00:aa:00:03", "exam")]
    assert pins[1].ip == "10.0.0.9::10.0.0.1:255.255.255.0::eth0:off"
    js = tmp_path / "pins.json"
    js.write_text(json.dumps([{"mac": MAC_A, "boot": "lab", "append": "quiet"}]))
    assert load_pins(js) == [Pin("52:54:00:aa:00:01", "lab", None, "quiet")]
    for bad in ('[[pin]]\nmac = "x"\nboot = "lab"\n', '[[pin]]\nmac = "52:54:00:aa:00:01"\n',
                f'[[pin]]\nmac = "{MAC_A}"\nboot = "lab 7"\n',
                f'[[pin]]\nmac = "{MAC_A}"\nboot = "a"\n[[pin]]\nmac = "{MAC_A}"\nboot = "b"\n'):
        toml.write_text(bad)
        with pytest.raises(ConfigError):
            load_pins(toml)


# --------------------------------------------------------------------------- boot files


def test_extract_kernel_and_initrd(fake_imi: FakeImi, tmp_path: Path) -> None:
    """/vmlinuz and /initrd.img are followed inside the image (relative and absolute links);
    the files land in STORE/boot/IMI@VERSION and their paths in the version's metadata, at
    import already; ``pxe extract`` finds them kept."""
    store = tmp_path / "store"
    out = run(ICBD, "import", str(fake_imi.image), "--imi", "lab", "--store", str(store)).stdout
    key = "lab@1"
    d = store / "boot" / key
    assert f"boot files {d}/: vmlinuz {len(fake_imi.kernel)} bytes" in out, out
    assert f"(extracted /boot/vmlinuz-{KVER} /boot/initrd.img-{KVER})" in out
    assert (d / "vmlinuz").read_bytes() == fake_imi.kernel
    assert (d / "initrd.img").read_bytes() == fake_imi.initrd
    out = run(ICBD, "pxe", "extract", "--store", str(store)).stdout
    assert f"{key}: kernel" in out
    ls = json.loads(run(ICBD, "ls", "--store", str(store), "--json").stdout)
    assert ls and ls[0]["version"] == "1"
    from icbdcache.store import Store

    s = Store(store, readonly=True)
    try:
        meta = s.version(key)
        assert meta is not None
        # recorded relative to the store: any process finds them (docs/store.md)
        assert (meta.kernel, meta.initrd) == (f"boot/{key}/vmlinuz", f"boot/{key}/initrd.img")
    finally:
        s.close()


def test_extract_newest_without_links_and_from_chunks(tmp_path: Path) -> None:
    """No /vmlinuz: the newest /boot/vmlinuz-* by version (10 > 9). A version imported with
    --copy whose file is gone is assembled from the store's chunks."""
    img = make_ext4(tmp_path / "nolinks.ext4", {
        f"boot/vmlinuz-{KVER_OLD}": b"old kernel", f"boot/initrd.img-{KVER_OLD}": b"old initrd",
        f"boot/vmlinuz-{KVER}": b"new kernel", f"boot/initrd.img-{KVER}": b"new initrd",
    }, size_mib=16)
    store = tmp_path / "store"
    key = import_version(store, img, "nolinks", "--copy")  # extracted from the file, at once
    (store / "boot" / key / "vmlinuz").unlink()
    img.unlink()
    run(ICBD, "pxe", "extract", key, "--store", str(store), "--force")
    assert (store / "boot" / key / "vmlinuz").read_bytes() == b"new kernel"
    assert (store / "boot" / key / "initrd.img").read_bytes() == b"new initrd"
    assert not list((store / "boot").glob(".*.img")), "the assembled image is removed"


def test_import_with_given_kernel_and_initrd(tmp_path: Path) -> None:
    """import --kernel/--initrd: the files are copied next to the store at import (the
    originals may go), for images debugfs cannot read. Without them, a raw image imports
    quietly and an ext4 image without a kernel with a warning: never a failed import."""
    img = tmp_path / "raw.img"
    img.write_bytes(os.urandom(MIB))
    k, i = tmp_path / "k", tmp_path / "i"
    k.write_bytes(b"given kernel")
    i.write_bytes(b"given initrd")
    store = tmp_path / "store"
    key = import_version(store, img, "raw", "--kernel", str(k), "--initrd", str(i))
    k.unlink()
    i.unlink()
    assert (store / "boot" / key / "vmlinuz").read_bytes() == b"given kernel"
    assert (store / "boot" / key / "initrd.img").read_bytes() == b"given initrd"
    assert f"{key}: kernel" in run(ICBD, "pxe", "extract", "--store", str(store)).stdout
    p = run(ICBD, "import", str(img), "--imi", "raw", "--store", str(store))
    assert re.search(r"imported raw@2:", p.stdout), p.stdout  # the summary, without boot files
    assert "boot files" not in p.stdout and "warning" not in p.stderr, "not ext4: no attempt"
    assert not (store / "boot" / "raw@2").exists()
    bad = "raw@2"
    p = run(ICBD, "pxe", "extract", bad, "--store", str(store), check=False)
    assert p.returncode == 1 and "not an ext2/3/4 image" in p.stderr
    nokernel = make_ext4(tmp_path / "nokernel.ext4", {"etc/hostname": b"x\n"}, size_mib=8)
    p = run(ICBD, "import", str(nokernel), "--imi", "data", "--store", str(store))
    assert "warning: data@1: no kernel and initrd kept for PXE" in p.stderr
    assert "no /vmlinuz" in p.stderr and not (store / "boot" / "data@1" / "vmlinuz").exists()
    p = run(ICBD, "import", str(img), "--imi", "raw", "--store", str(store), "--kernel", str(img))
    assert "--kernel and --initrd go together" in p.stderr


def test_render_cli_writes_the_tree(fake_imi: FakeImi, tmp_path: Path) -> None:
    store = tmp_path / "store"
    key = import_version(store, fake_imi.image, "lab")
    pins = tmp_path / "pins.toml"
    pins.write_text(f'[[pin]]\nmac = "{MAC_A}"\nboot = "lab"\n')
    out = tmp_path / "tftproot"
    args = [ICBD, "pxe", "render", "--store", str(store), "--out", str(out),
            "--nbd-host", "10.9.8.7", "--nbd-port", "10810"]
    run(*args, "--pins", str(pins))
    assert (out / f"boot/{key}/initrd.img").read_bytes() == fake_imi.initrd
    assert "nbdroot=10.9.8.7:10810/lab@1" in (out / "pxelinux.cfg/default").read_text()
    assert "nbdroot=10.9.8.7:10810/lab@1" in (out / "boot.ipxe").read_text()
    assert (out / "pxelinux.cfg/01-52-54-00-aa-00-01").is_file()
    assert (out / "ipxe/52-54-00-aa-00-01.ipxe").is_file()
    pxelinux = Path("/usr/lib/PXELINUX/pxelinux.0").is_file()
    if pxelinux:
        for name in ("pxelinux.0", "ldlinux.c32", "menu.c32", "libutil.c32", "libcom32.c32"):
            assert (out / name).stat().st_size > 0, name
    run(*args)  # the pin is gone: so are its files
    assert not (out / "pxelinux.cfg/01-52-54-00-aa-00-01").exists()
    assert not (out / "ipxe/52-54-00-aa-00-01.ipxe").exists()
    if not pxelinux:  # all else was checked; say what was not
        pytest.skip("PXELINUX is not installed (packages pxelinux, syslinux-common): its files "
                    "in the tree were not checked")


# ------------------------------------------------------------------------------------- TFTP


def test_tftp_transfer_sansio_wraps_block_numbers() -> None:
    """A file of more than 65535 blocks: block numbers wrap to 0, every byte arrives once."""
    data = random.Random(3).randbytes(70000 * 8 + 5)
    req = parse_request(b"\0\x01f\0octet\0blksize\x008\0tsize\x000\0timeout\x003\0")
    assert req == Request(Op.RRQ, "f", "octet", {"blksize": "8", "tsize": "0", "timeout": "3"})
    x = ReadTransfer(req, BytesReader(data))
    pkt = x.start()
    assert pkt == b"\0\x06blksize\x008\0tsize\x00" + str(len(data)).encode() + b"\0timeout\x003\0"
    got = bytearray()
    ack = 0
    while not x.done:
        reply = x.receive(struct.pack("!HH", 4, ack))
        if reply is None:
            break
        op, block = struct.unpack_from("!HH", reply)
        assert op == 3 and block == (len(got) // 8 + 1) & 0xFFFF
        assert x.receive(struct.pack("!HH", 4, (block - 1) & 0xFFFF)) is None, "duplicate ACK"
        got += reply[4:]
        ack = block
    assert x.done and x.result == "ok" and bytes(got) == data
    assert x.expire() is None


def test_tftp_big_file_blksize_1468_and_512(fake_site: Pxe, fake_imi: FakeImi,
                                            tmp_path: Path) -> None:
    """The 30 MiB initrd with blksize 1468 (curl) and with RFC 1350's 512 (tftp-hpa, which
    negotiates no option at all)."""
    require("curl")
    want = hashlib.sha256(fake_imi.initrd).hexdigest()
    url = f"tftp://127.0.0.1:{fake_site.tftp_port}/boot/lab@1/initrd.img"
    t0 = time.monotonic()
    run("curl", "-sS", "--tftp-blksize", "1468", "-o", str(tmp_path / "a"), url)
    t_1468 = time.monotonic() - t0
    assert sha256_file(tmp_path / "a") == want
    require("tftp")
    t0 = time.monotonic()
    run("tftp", "-m", "binary", "127.0.0.1", str(fake_site.tftp_port), "-c", "get",
        "boot/lab@1/initrd.img", str(tmp_path / "b"))
    t_512 = time.monotonic() - t0
    assert sha256_file(tmp_path / "b") == want
    log = fake_site.log_text()
    assert re.search(r"event=tftp_sent .*file=boot/lab@1/initrd.img bytes=31457280 blksize=1468",
                     log)
    assert re.search(r"event=tftp_sent .*file=boot/lab@1/initrd.img bytes=31457280 blksize=512",
                     log)
    print(f"30 MiB over TFTP: blksize 1468 {t_1468:.2f} s, blksize 512 {t_512:.2f} s")


def _rrq(name: str, **opts: str) -> bytes:
    parts = [name, "octet"] + [x for kv in opts.items() for x in kv]
    return b"\0\x01" + b"".join(p.encode() + b"\0" for p in parts)


def test_tftp_options_errors_and_refusals(fake_site: Pxe, fake_imi: FakeImi) -> None:
    addr = ("127.0.0.1", fake_site.tftp_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        # OACK with tsize (the file's size), blksize and timeout as asked
        s.sendto(_rrq("boot/lab@1/vmlinuz", tsize="0", blksize="1024", timeout="2",
                      windowsize="8"), addr)
        pkt, srv = s.recvfrom(2048)
        assert srv[1] != fake_site.tftp_port, "a transfer answers from its own port"
        assert pkt[:2] == b"\0\x06"
        opts = pkt[2:].split(b"\0")
        got = dict(zip(opts[0::2], opts[1::2], strict=False))
        assert got == {b"tsize": str(len(fake_imi.kernel)).encode(), b"blksize": b"1024",
                       b"timeout": b"2"}, "windowsize is not granted"
        s.sendto(b"\0\x05\0\x08probe only\0", srv)  # a PXE ROM's size probe ends like this
        # outside the root, a missing file, a write request: ERROR packets
        for req, code in ((_rrq("../../etc/passwd"), 2), (_rrq("/boot/../../etc/passwd"), 2),
                          (_rrq("no/such/file"), 1),
                          (b"\0\x02x\0octet\0", 2)):
            s.sendto(req, addr)
            pkt, _ = s.recvfrom(2048)
            op, err = struct.unpack_from("!HH", pkt)
            assert (op, err) == (5, code), (req, pkt)
        # a stray ACK to the well-known port is ignored (no reply)
        s.sendto(b"\0\x04\0\x01", addr)
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recvfrom(2048)


def test_tftp_stalled_client_does_not_stall_others(fake_site: Pxe, fake_imi: FakeImi,
                                                   tmp_path: Path) -> None:
    """A client that stops acknowledging gets its packet again every timeout, is given up
    after the retries, and meanwhile a second client's 30 MiB transfer runs at full speed."""
    require("curl")
    addr = ("127.0.0.1", fake_site.tftp_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(_rrq("boot/lab@1/initrd.img"), addr)
        first, _ = s.recvfrom(2048)
        assert first[:4] == b"\0\x03\0\x01"
        t0 = time.monotonic()
        run("curl", "-sS", "--tftp-blksize", "1468", "-o", str(tmp_path / "c"),
            f"tftp://127.0.0.1:{fake_site.tftp_port}/boot/lab@1/initrd.img", timeout=60)
        elapsed = time.monotonic() - t0
        assert sha256_file(tmp_path / "c") == hashlib.sha256(fake_imi.initrd).hexdigest()
        assert elapsed < 20
        # the stalled transfer: DATA 1 again (timeout 0.5 s, 3 retries), then nothing
        again = []
        s.settimeout(1.5)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                pkt, _ = s.recvfrom(2048)
            except TimeoutError:
                break
            again.append(pkt)
    assert again and all(p == first for p in again) and len(again) <= 3
    deadline = time.monotonic() + 5
    while "result=timeout" not in fake_site.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r"event=tftp_failed .*file=boot/lab@1/initrd.img result=timeout",
                     fake_site.log_text())


# ------------------------------------------------------------------------------------- HTTP


def test_http_serves_scripts_kernel_initrd(fake_site: Pxe, fake_imi: FakeImi) -> None:
    assert fake_site.get("boot/lab@1/vmlinuz") == fake_imi.kernel
    assert hashlib.sha256(fake_site.get("boot/lab@1/initrd.img")).digest() == \
        hashlib.sha256(fake_imi.initrd).digest()
    part = fake_site.get("boot/lab@1/initrd.img", {"Range": "bytes=1000-1999"})
    assert part == fake_imi.initrd[1000:2000]
    script = fake_site.get("boot.ipxe").decode()
    assert script.startswith("#!ipxe") and "nbdroot=10.0.0.1:10809/lab@1" in script
    assert "nbdroot=10.0.0.1:10809/lab@1" in fake_site.get("pxelinux.cfg/default").decode()
    for path, status in (("nope", 404), ("boot/lab@9/vmlinuz", 404), ("..%2f..%2fetc/passwd",
                                                                      403)):
        with pytest.raises(urllib.error.HTTPError) as e:
            fake_site.get(path)
        assert e.value.code == status, path
    req = urllib.request.Request(fake_site.url("boot/lab@1/vmlinuz"), method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert int(r.headers["Content-Length"]) == len(fake_imi.kernel)


def test_new_version_is_the_default_at_once(fake_imi: FakeImi, tmp_path: Path) -> None:
    """A version imported while pxe serve runs is in the next config fetched (no waiting for
    the periodic refresh), with its own boot files; the old version's files stay."""
    store = tmp_path / "store"
    import_version(store, fake_imi.image, "lab")
    pxe = start_pxe(tmp_path, store, "--refresh", "3600")
    try:
        assert "DEFAULT lab@1" in pxe.get("pxelinux.cfg/default").decode()
        import_version(store, fake_imi.image, "lab")
        assert "DEFAULT lab@2" in pxe.get("pxelinux.cfg/default").decode()
        assert "nbdroot=127.0.0.1:10809/lab@2" in pxe.get("boot.ipxe").decode()
        assert pxe.get("boot/lab@2/vmlinuz") == fake_imi.kernel
        assert pxe.get("boot/lab@1/vmlinuz") == fake_imi.kernel
    finally:
        pxe.stop()


def test_serve_pxe_in_one_process(fake_imi: FakeImi, tmp_path: Path) -> None:
    """``serve --store --pxe``: the NBD exports, boot.ipxe over HTTP and pxelinux.0 and a
    kernel over TFTP from one process, whose boot configs name its first --listen address;
    SIGTERM stops all three."""
    require("curl", "nbdcopy")
    store = tmp_path / "store"
    key = import_version(store, fake_imi.image, "lab")
    tftp, http = free_udp_port(), free_port()
    srv = start_server(tmp_path, "--store", str(store), "--pxe", "--pxe-tftp-port", str(tftp),
                       "--pxe-http-port", str(http), "--pxe-menu-timeout", "0")
    try:
        wait_port("127.0.0.1", http, 60)
        script = run("curl", "-sSf", f"http://127.0.0.1:{http}/boot.ipxe").stdout
        assert script.startswith("#!ipxe") and f"nbdroot=127.0.0.1:{srv.port}/{key} " in script
        run("curl", "-sSf", "-o", str(tmp_path / "k"), f"tftp://127.0.0.1:{tftp}/boot/{key}/vmlinuz")
        assert (tmp_path / "k").read_bytes() == fake_imi.kernel
        pxelinux = Path("/usr/lib/PXELINUX/pxelinux.0")
        if pxelinux.is_file():  # else skipped at the end, once the rest is checked
            run("curl", "-sSf", "-o", str(tmp_path / "p"), f"tftp://127.0.0.1:{tftp}/pxelinux.0")
            assert (tmp_path / "p").read_bytes() == pxelinux.read_bytes()
        run("nbdcopy", srv.uri(key), str(tmp_path / "copy.img"))
        assert sha256_file(tmp_path / "copy.img") == sha256_file(fake_imi.image)
        assert srv.proc.poll() is None
    finally:
        rc = srv.stop()
    assert rc == 0
    log = srv.log_text()
    assert f"event=pxe_ready tftp={tftp} http={http} nbd=127.0.0.1:{srv.port}" in log
    assert re.search(rf"conn=\d+ .*export={re.escape(key)} ", log)
    assert "event=http " in log and "event=tftp_sent " in log and "shutdown=done" in log
    for port, kind in ((http, socket.SOCK_STREAM), (srv.port, socket.SOCK_STREAM)):
        with socket.socket(socket.AF_INET, kind) as s, pytest.raises(OSError):
            s.connect(("127.0.0.1", port))
    if not pxelinux.is_file():
        pytest.skip("PXELINUX is not installed (packages pxelinux, syslinux-common): "
                    "pxelinux.0 over TFTP was not checked")


def test_serve_pxe_refusals(tmp_path: Path) -> None:
    """serve --pxe needs a store and an address workstations can reach; --pxe-* options
    need --pxe."""
    store = tmp_path / "store"
    for args, words in (
            (["--export", f"a={REPO / 'README.md'}", "--pxe", "--listen", "127.0.0.1:1"],
             "--pxe needs --store"),
            (["--store", str(store), "--pxe", "--listen", "0.0.0.0:10809"],
             "give --pxe-nbd-host"),
            (["--store", str(store), "--pxe-http-port", "8080", "--listen", "127.0.0.1:1"],
             "--pxe-http-port without --pxe"),
            (["--store", str(store), "--pxe", "--listen", "127.0.0.1:1", "--pxe-tftp-port",
              "off", "--pxe-http-port", "off"], "nothing to serve")):
        p = run(ICBD, "serve", *args, check=False, timeout=30)
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr)


# ------------------------------------------------------------------------ real workstations

BOOT_TIMEOUT = 240.0


@dataclass
class Site:
    """A site: store with the test iMI as lab@1, icbd-cache serve --store, pxe serve."""

    store: Path
    imi_dir: Path
    v2_image: Path
    nbd: Server
    pxe: Pxe
    vms: list[Vm] = field(default_factory=list)

    def nbd_exports(self, since: int = 0) -> list[str]:
        """Export names of the connections the NBD server logged (from line ``since``)."""
        lines = self.nbd.log_text().splitlines()[since:]
        return [m.group(1) for ln in lines if (m := re.search(r"conn=\d+ .*export=(\S+)", ln))]

    def nbd_lines(self) -> int:
        return len(self.nbd.log_text().splitlines())


MAC_LINGER = "52:54:00:1c:bd:01"


@pytest.fixture(scope="module")
def test_imi() -> Path:
    """scripts/build-test-imi's output directory (built once, then cached)."""
    require("qemu-system-x86_64", "debootstrap", "debugfs")
    try:
        return build_test_imi()
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def site(test_imi: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not Path("/usr/lib/PXELINUX/pxelinux.0").is_file():
        pytest.skip("PXELINUX is not installed (packages pxelinux, syslinux-common)")
    tmp = tmp_path_factory.mktemp("site")
    store = tmp / "store"
    import_version(store, test_imi / "imi.ext4", "lab")
    # lab@2 differs in /etc/icbd-release only (prepared now, imported while a guest runs)
    v2 = tmp / "imi-v2.ext4"
    run("cp", "--sparse=always", "--reflink=auto", str(test_imi / "imi.ext4"), str(v2))
    rel = tmp / "release-v2"
    rel.write_text("icbd-test-imi-v2\n")
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    run(debugfs, "-w", "-R", "rm /etc/icbd-release", str(v2))
    run(debugfs, "-w", "-R", f"write {rel} /etc/icbd-release", str(v2))
    assert "icbd-test-imi-v2" in run(debugfs, "-R", "cat /etc/icbd-release", str(v2)).stdout
    nbd = start_server(tmp, "--store", str(store))
    pins = tmp / "pins.toml"
    pins.write_text(f'[[pin]]\nmac = "{MAC_LINGER}"\nboot = "lab"\nappend = "icbd.linger=25"\n')
    pxe = start_pxe(tmp, store, "--menu-timeout", "1",
                    "--serial", "0 115200", "--append", GUEST_APPEND, "--pins", str(pins),
                    nbd_host="10.0.2.2", nbd_port=nbd.port)
    s = Site(store, test_imi, v2, nbd, pxe)
    yield s
    for vm in s.vms:
        vm.stop()
    pxe.stop()
    nbd.stop()


def _boot(site: Site, name: str, bootfile: str, mac: str, tmp_path: Path) -> Vm:
    vm = boot_vm(name, bootfile, mac, tmp_path / f"{name}.console")
    site.vms.append(vm)
    return vm


@pytest.mark.guest
def test_guest_boots_through_pxelinux_over_our_tftp(site: Site, tmp_path: Path) -> None:
    """e1000 iPXE ROM -> pxelinux.0, its config, kernel and initrd over icbd-cache's TFTP ->
    Debian initramfs -> nbd-client -> root from icbd-cache serve -> multi-user."""
    since = site.nbd_lines()
    vm = _boot(site, "pxelinux", f"tftp://10.0.2.2:{site.pxe.tftp_port}/pxelinux.0",
               "52:54:00:1c:bd:10", tmp_path)
    t, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert m.group(2) == f"10.0.2.2:{site.nbd.port}/lab@1"
    assert m.group(3) == "icbd-test-imi"
    assert any(ln.startswith("PXELINUX") for _, ln in vm.lines)
    # PXELINUX loaded icbd-cache's initrd after the version's (INITRD a,b): its client attached
    assert any("icbd-nbd-client" in ln and " attached " in ln for _, ln in vm.lines)
    log = site.pxe.log_text()
    for f in ("pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default", "boot/lab@1/vmlinuz",
              "boot/lab@1/initrd.img", "icbd/reconnect.img"):
        assert re.search(rf"event=tftp_sent .*file={re.escape(f)} ", log), f
    assert set(site.nbd_exports(since)) == {"lab@1"}
    print(f"PXELINUX boot: marker after {t - vm.t0:.1f} s (guest uptime {m.group(1)} s)")
    vm.proc.wait(30)


@pytest.mark.guest
def test_guest_boots_through_ipxe_over_our_http(site: Site, tmp_path: Path) -> None:
    """e1000 iPXE ROM -> boot.ipxe, kernel and initrd over icbd-cache's HTTP -> NBD root."""
    since = site.nbd_lines()
    vm = _boot(site, "ipxe", f"http://10.0.2.2:{site.pxe.http_port}/boot.ipxe",
               "52:54:00:1c:bd:11", tmp_path)
    t, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert m.group(2) == f"10.0.2.2:{site.nbd.port}/lab@1"
    log = site.pxe.log_text()
    for f in ("boot.ipxe", "boot/lab@1/vmlinuz", "boot/lab@1/initrd.img"):
        assert re.search(rf"event=http .*method=GET path=/{re.escape(f)} status=200", log), f
    assert set(site.nbd_exports(since)) == {"lab@1"}
    print(f"iPXE boot: marker after {t - vm.t0:.1f} s (guest uptime {m.group(1)} s)")
    vm.proc.wait(30)


@pytest.mark.guest
def test_new_version_while_a_guest_runs(site: Site, tmp_path: Path) -> None:
    """Guest A (pinned to iMI lab, so its latest: lab@1) boots and lingers. lab@2 is imported
    while A runs. Guest B, booted afterwards from the menu, gets lab@2; A, re-reading its root
    after dropping its caches, still sees lab@1's bytes: its export name carries the version."""
    since = site.nbd_lines()
    a = _boot(site, "A", f"http://10.0.2.2:{site.pxe.http_port}/boot.ipxe", MAC_LINGER,
              tmp_path)
    _, ma = a.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert ma.group(2).endswith("/lab@1") and ma.group(3) == "icbd-test-imi"
    a_exports = site.nbd_exports(since)
    mark = site.nbd_lines()
    key = import_version(site.store, site.v2_image, "lab")
    imported = time.monotonic()
    assert key == "lab@2"
    b = _boot(site, "B", f"tftp://10.0.2.2:{site.pxe.tftp_port}/pxelinux.0",
              "52:54:00:1c:bd:02", tmp_path)
    t_linger, ml = a.wait_for(LINGER_RX, 90)
    assert t_linger > imported, "A must re-read its root after lab@2 was published"
    assert ml.group(1) and ml.group(2) == "icbd-test-imi", "A keeps lab@1's bytes"
    _, mb = b.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert mb.group(2) == f"10.0.2.2:{site.nbd.port}/lab@2"
    assert mb.group(3) == "icbd-test-imi-v2"
    # the NBD server's view: A's connections named lab@1, B's lab@2, nobody the bare "lab"
    assert a_exports and set(a_exports) == {"lab@1"}
    after = site.nbd_exports(mark)
    assert "lab@2" in after and set(after) <= {"lab@1", "lab@2"}
    assert "lab" not in site.nbd_exports(0)
    a.proc.wait(30)
    b.proc.wait(30)


@pytest.mark.guest
def test_guest_root_read_write_through_per_client_copy_on_write(
        test_imi: Path, tmp_path: Path) -> None:
    """The other way to share one read-only iMI: no tmpfs overlay in the workstation
    (``icbd.overlay=none``, root mounted rw) and ``serve --store-cow`` giving that client its
    own copy-on-write overlay. The guest boots, its writes reach its overlay, the store's
    version stays as it was."""
    if not Path("/usr/lib/PXELINUX/pxelinux.0").is_file():
        pytest.skip("PXELINUX is not installed (packages pxelinux, syslinux-common)")
    store = tmp_path / "store"
    import_version(store, test_imi / "imi.ext4", "lab")
    trace = tmp_path / "requests.csv"
    nbd = start_server(tmp_path, "--store", str(store), "--store-cow", "--trace", str(trace))
    pxe = start_pxe(tmp_path, store, "--menu-timeout", "1", "--overlay", "none",
                    "--serial", "0 115200", "--append", GUEST_APPEND,
                    nbd_host="10.0.2.2", nbd_port=nbd.port)
    vm = boot_vm("rw", f"http://10.0.2.2:{pxe.http_port}/boot.ipxe", "52:54:00:1c:bd:21",
                 tmp_path / "rw.console")
    try:
        _, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
        assert m.group(2) == f"10.0.2.2:{nbd.port}/lab@1"
        vm.proc.wait(30)
    finally:
        vm.stop()
        pxe.stop()
        assert nbd.stop() == 0
    log = nbd.log_text()
    assert re.search(r"export=lab@1 .*mode=cow", log), log[-2000:]
    writes = [ln for ln in trace.read_text().splitlines() if ",Write," in ln]
    assert writes, "a read-write root wrote nothing"
    assert "OK" in run(ICBD, "verify", "--store", str(store)).stdout
