"""Interoperability: NBD clients written elsewhere (libnbd's nbdinfo, nbdcopy and nbdsh, qemu-img,
qemu-io, fio's nbd engine) against a running ``icbd-cache serve`` process.

Every test asserts on bytes or checksums, and skips, naming the tool, when a client is missing.

Two client identities: copy-on-write overlays belong to the client's IP address. A connection
to 127.0.0.2 does not give a second identity on every host (Linux takes the source address from
the route, and ``local 127.0.0.0/8 ... src 127.0.0.1`` makes it 127.0.0.1), so the second
identity is the first of 127.0.0.2 and ::1 that the kernel really uses as its own source
address; the server listens on it too (a second ``--listen``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, free_port, make_image, require, require_holes, sha256_file
from readers import hash_outputs, nbdcopy_procs

MiB = 1 << 20
BIG = 256 * MiB  # test 2 wants an image of 256 MiB or more
SMALL = 64 * MiB
ServerFactory = Callable[..., Server]
NBDSH = "/usr/bin/python3"  # see STYLE.md 'The nbd name': run as ``python3 -I -m nbd``


# ------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 256 MiB image (random data, every fourth MiB a hole) and its sha256."""
    path = make_image(tmp_path_factory.mktemp("big") / "big.img", BIG, seed=7)
    return path, sha256_file(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 64 MiB image (holes at MiB 3, 7, 11, ...) and its sha256. Never written by a test."""
    path = make_image(tmp_path_factory.mktemp("small") / "small.img", SMALL, seed=3)
    return path, sha256_file(path)


def layout(size: int) -> list[tuple[int, int, int]]:
    """(offset, length, base:allocation flags) runs of a ``make_image`` image: 3 = HOLE|ZERO."""
    runs: list[tuple[int, int, int]] = []
    for off in range(0, size, MiB):
        flags = 3 if (off // MiB) % 4 == 3 else 0
        n = min(MiB, size - off)
        if runs and runs[-1][2] == flags:
            o, length, _ = runs[-1]
            runs[-1] = (o, length + n, flags)
        else:
            runs.append((off, n, flags))
    return runs



# ------------------------------------------------------------------ clients


def run(cmd: Sequence[str], *, timeout: float = 60, ok: Sequence[int] = (0,),
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client; fail with its output unless its exit status is in ``ok``."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       check=False)
    assert p.returncode in ok, (
        f"{' '.join(cmd)} -> exit {p.returncode}\nstdout: {p.stdout[-3000:]}\n"
        f"stderr: {p.stderr[-3000:]}"
    )
    return p


def nbdinfo(*args: str) -> dict[str, Any]:
    out = run(["nbdinfo", "--json", *args]).stdout
    return dict(json.loads(out))


def nbdcopy_sha(uri: str) -> str:
    return hash_outputs(nbdcopy_procs([uri]))[0][0]


def nbdcopy_bytes(uri: str, dest: Path) -> bytes:
    run(["nbdcopy", uri, str(dest)])
    return dest.read_bytes()


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    """Run qemu-io commands in one session on an NBD URI; every command must succeed
    (qemu-io exits 1 when one fails, a ``read -P`` pattern mismatch included)."""
    cmd = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        cmd += ["-c", c]
    out = run([*cmd, uri]).stdout
    assert "failed" not in out.lower(), out
    return out


def nbdsh(uri: str, script: str, cwd: Path, *, meta: bool = False) -> Any:
    """Run ``script`` in libnbd's nbdsh connected to ``uri`` (``h`` is the handle) and return
    the JSON of the variable ``result`` it sets.

    Runs as ``/usr/bin/python3 -I -m nbd`` from an empty directory, so that our own ``nbd``
    package cannot shadow libnbd's module (STYLE.md, 'The nbd name').
    """
    require("nbdsh")
    probe = subprocess.run([NBDSH, "-I", "-c", "import nbd; nbd.NBD"], capture_output=True,
                           cwd=cwd, check=False)
    if probe.returncode != 0:
        pytest.skip("libnbd's Python module (python3-libnbd) is not importable by /usr/bin/python3")
    cmd = [NBDSH, "-I", "-m", "nbd"]
    if meta:  # replayed in command-line order: the context is requested before -u connects
        cmd += ["-c", "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)"]
    cmd += ["-u", uri, "-c", "import json\nresult = None\n" + script,
            "-c", "print('RESULT=' + json.dumps(result))"]
    out = run(cmd, cwd=cwd).stdout
    line = [x for x in out.splitlines() if x.startswith("RESULT=")][-1]
    return json.loads(line.removeprefix("RESULT="))


# ------------------------------------------------------------------ identities and servers


def _own_source(addr: str) -> bool:
    """Whether a connection to ``addr`` on this host leaves from ``addr`` itself."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            if s.getsockname()[0] != addr:
                return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
    except OSError:
        return False
    return True


def second_identity() -> str:
    """A local address other than 127.0.0.1 that is its own source address; skip if none."""
    for addr in ("127.0.0.2", "::1"):
        if _own_source(addr):
            return addr
    pytest.skip("no second loopback identity (127.0.0.2 leaves from 127.0.0.1, and no ::1)")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def uri(host: str, port: int, export: str) -> str:
    """An nbd:// URI; a ``?`` inside the export name (``?boot=``) is percent-encoded so that it
    is not taken as the URI's query."""
    return f"nbd://{hostport(host, port)}/{export.replace('?', '%3F')}"


def wait_log(srv: Server, text: str, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while srv.log_text().count(text) < count:
        assert srv.proc.poll() is None, f"server exited: {srv.log_text()}"
        assert time.monotonic() < deadline, f"{text!r} x{count} not in log: {srv.log_text()}"
        time.sleep(0.05)


def two_identity_server(server_factory: ServerFactory, *args: str) -> tuple[Server, str]:
    """A server on 127.0.0.1:P and OTHER:P; returns it and OTHER."""
    other = second_identity()
    port = free_port()
    srv = server_factory(*args, "--listen", hostport(other, port), port=port)
    wait_log(srv, f"listening={hostport(other, port)}")
    return srv, other


# ------------------------------------------------------------------ 1. nbdinfo


def test_nbdinfo_reports_size_flags_block_sizes_description(
    server_factory: ServerFactory, small: tuple[Path, str], big: tuple[Path, str]
) -> None:
    require("nbdinfo")
    srv = server_factory("--export", f"lab={small[0]}", "--export", f"scratch={big[0]},cow")
    for name, size, read_only, mode in (("lab", SMALL, True, "read-only"),
                                        ("scratch", BIG, False, "copy-on-write")):
        info = nbdinfo(srv.uri(name))
        assert info["protocol"] == "newstyle-fixed"
        (e,) = info["exports"]
        assert e["export-name"] == name
        assert e["export-size"] == size
        assert e["is_read_only"] is read_only
        assert e["can_multi_conn"] is True
        assert e["can_trim"] is e["can_zero"] is e["can_flush"] is (not read_only)
        assert "base:allocation" in e["contexts"]
        lo, pref, hi = (e["block_size_minimum"], e["block_size_preferred"],
                        e["block_size_maximum"])
        assert lo >= 1 and lo & (lo - 1) == 0, lo
        assert lo <= pref <= hi and pref & (pref - 1) == 0, (lo, pref, hi)
        assert hi >= 32 * MiB, hi
        assert mode in e["description"] and "MiB" in e["description"], e["description"]


def test_nbdinfo_list_shows_every_export(
    server_factory: ServerFactory, small: tuple[Path, str], big: tuple[Path, str]
) -> None:
    require("nbdinfo")
    srv = server_factory("--export", f"lab={small[0]}", "--export", f"big={big[0]}",
                         "--export", f"scratch={small[0]},cow")
    info = nbdinfo("--list", srv.uri())
    got = {e["export-name"]: e for e in info["exports"]}
    assert set(got) == {"lab", "big", "scratch"}
    assert got["lab"]["export-size"] == SMALL and got["big"]["export-size"] == BIG
    assert got["scratch"]["is_read_only"] is False and got["lab"]["is_read_only"] is True
    assert all(e["description"] for e in got.values())


def test_default_export_is_the_empty_name(
    server_factory: ServerFactory, small: tuple[Path, str], big: tuple[Path, str]
) -> None:
    require("nbdinfo", "nbdcopy")
    srv = server_factory("--export", f"lab={small[0]}", "--export", f"big={big[0]}",
                         "--default-export", "big")
    (e,) = nbdinfo(srv.uri(""))["exports"]
    assert e["export-size"] == BIG
    assert e["export-name"] == "big"
    assert nbdcopy_sha(srv.uri("")) == big[1]
    # Without --default-export, the first export is the default.
    srv2 = server_factory("--export", f"lab={small[0]}", "--export", f"big={big[0]}")
    (e2,) = nbdinfo(srv2.uri(""))["exports"]
    assert e2["export-size"] == SMALL


# ------------------------------------------------------------------ 2., 3. nbdcopy


def test_nbdcopy_of_a_256mib_image_to_a_file(
    server_factory: ServerFactory, big: tuple[Path, str], tmp_path: Path
) -> None:
    require("nbdcopy")
    srv = server_factory("--export", f"big={big[0]}")
    out = tmp_path / "copy.img"
    run(["nbdcopy", srv.uri("big"), str(out)], timeout=120)
    assert out.stat().st_size == BIG
    assert sha256_file(out) == big[1]


def test_fifteen_nbdcopy_at_once(server_factory: ServerFactory, big: tuple[Path, str]) -> None:
    require("nbdcopy")
    srv = server_factory("--export", f"big={big[0]}")
    results = hash_outputs(nbdcopy_procs([srv.uri("big")] * 15), timeout=180)
    assert [n for _, n in results] == [BIG] * 15
    bad = [i for i, (h, _) in enumerate(results) if h != big[1]]
    assert not bad, f"copies {bad} differ from the image"


# ------------------------------------------------------------------ 4. qemu-img compare


def test_qemu_img_compare(server_factory: ServerFactory, small: tuple[Path, str],
                          tmp_path: Path) -> None:
    require("qemu-img")
    srv = server_factory("--export", f"lab={small[0]}")
    cmp = ["qemu-img", "compare", "-f", "raw", "-F", "raw"]
    same = run([*cmp, str(small[0]), srv.uri("lab")])
    assert "identical" in same.stdout
    # One changed byte in a data block, one in a hole (qemu-img reads holes by block status).
    for off in (40 * MiB + 12345, 7 * MiB + 777):
        mod = tmp_path / f"mod-{off}.img"
        shutil.copyfile(small[0], mod)
        with open(mod, "r+b") as f:
            f.seek(off)
            old = f.read(1)
            f.seek(off)
            f.write(bytes([old[0] ^ 0x5A]))
        diff = run([*cmp, str(mod), srv.uri("lab")], ok=(1,))
        # qemu-img names the 512-byte sector that differs.
        assert f"mismatch at offset {off - off % 512}!" in diff.stdout, diff.stdout
    assert sha256_file(small[0]) == small[1]


# ------------------------------------------------------------------ 5. qemu-io on ,cow

# (qemu-io command, offset, length, byte) written on the cow export: unaligned, across 4 KiB
# blocks, across a data/hole boundary (MiB 3 is a hole), zeroes, and the very last bytes.
WRITES: list[tuple[int, int, int]] = [
    (1000, 5000, 0xAB),
    (3 * MiB - 100, 300, 0xCD),
    (2 * MiB - 16384, 512 * 1024, 0x11),
    (65537, 12288, 0x00),       # write -z, unaligned
    (5 * MiB, 256 * 1024, 0x00),  # write -z, aligned
    (SMALL - 3, 3, 0xEF),
]


def _qemu_writes() -> list[str]:
    cmds = []
    for off, n, byte in WRITES:
        cmds.append(f"write -z {off} {n}" if byte == 0 else f"write -P {byte:#x} {off} {n}")
    return cmds


def _qemu_reads() -> list[str]:
    return [f"read -P {byte:#x} {off} {n}" for off, n, byte in WRITES]


def _expected_after_writes(base: Path) -> bytes:
    data = bytearray(base.read_bytes())
    for off, n, byte in WRITES:
        data[off : off + n] = bytes([byte]) * n
    return bytes(data)


def test_qemu_io_cow_writes_are_the_clients_own(
    server_factory: ServerFactory, small: tuple[Path, str]
) -> None:
    require("qemu-io", "nbdcopy")
    base, base_sha = small
    srv, other = two_identity_server(server_factory, "--export", f"rw={base},cow")
    mine = uri("127.0.0.1", srv.port, "rw")
    # Written and read back in one session ...
    qemu_io(mine, *_qemu_writes(), *_qemu_reads())
    # ... and by a second run of the same client (identity 127.0.0.1, within --cow-linger).
    qemu_io(mine, *_qemu_reads())
    expected = hashlib.sha256(_expected_after_writes(base)).hexdigest()
    assert nbdcopy_sha(mine) == expected
    # Another client reads the original image, and the base file was never written.
    theirs = uri(other, srv.port, "rw")
    assert nbdcopy_sha(theirs) == base_sha
    first = WRITES[0]
    with open(base, "rb") as f:
        f.seek(first[0])
        orig = f.read(first[1])
    assert orig != bytes([first[2]]) * first[1]
    out = run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P {first[2]:#x} {first[0]} {first[1]}",
               theirs], ok=(0, 1))
    assert "Pattern verification failed" in out.stdout, out.stdout
    assert sha256_file(base) == base_sha
    assert f"peer={other}:" in srv.log_text()


def test_cow_client_boots_anew_after_linger(
    server_factory: ServerFactory, small: tuple[Path, str]
) -> None:
    require("qemu-io", "nbdcopy")
    base, base_sha = small
    srv = server_factory("--export", f"rw={base},cow", "--cow-linger", "1")
    mine = uri("127.0.0.1", srv.port, "rw")
    qemu_io(mine, *_qemu_writes(), *_qemu_reads())
    time.sleep(2.5)  # no connection for more than --cow-linger: the next one boots anew
    assert nbdcopy_sha(mine) == base_sha
    assert sha256_file(base) == base_sha


def test_cow_new_boot_id_drops_the_old_boots_writes(
    server_factory: ServerFactory, small: tuple[Path, str]
) -> None:
    require("qemu-io", "nbdcopy")
    base, base_sha = small
    srv = server_factory("--export", f"rw={base},cow")
    boot_a = uri("127.0.0.1", srv.port, "rw?boot=A")
    qemu_io(boot_a, *_qemu_writes(), *_qemu_reads())
    qemu_io(boot_a, *_qemu_reads())  # same boot, new connection: still there
    assert 'export="rw?boot=A"' in srv.log_text()
    assert nbdcopy_sha(uri("127.0.0.1", srv.port, "rw?boot=B")) == base_sha
    # Back to A is another new boot, not a return to A's overlay.
    assert nbdcopy_sha(boot_a) == base_sha
    assert sha256_file(base) == base_sha


# ------------------------------------------------------------------ 6. fio


def _fio(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"fio-{name}.json"
    # In tmp_path: fio leaves its verify state file (*-verify.state) in the current directory.
    p = run(["fio", f"--name={name}", "--ioengine=nbd", "--output-format=json",
             f"--output={out}", "--verify_state_save=0", *args], timeout=120, cwd=tmp_path)
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0, (job, p.stderr)
    assert "verify" not in p.stderr.lower(), p.stderr
    return dict(job)


def test_fio_write_and_verify_on_a_cow_export(
    server_factory: ServerFactory, small: tuple[Path, str], tmp_path: Path
) -> None:
    require("fio")
    if "nbd" not in run(["fio", "--enghelp"]).stdout:
        pytest.skip("fio was built without the nbd engine")
    base, base_sha = small
    srv = server_factory("--export", f"rw={base},cow")
    job = _fio(tmp_path, "wv", f"--uri={srv.uri('rw')}", "--rw=randwrite", "--bs=4k",
               "--size=16m", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
               "--verify_fatal=1")
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # the verify pass read everything back
    assert sha256_file(base) == base_sha


def test_fio_randread_on_a_read_only_export(
    server_factory: ServerFactory, small: tuple[Path, str], tmp_path: Path
) -> None:
    require("fio")
    if "nbd" not in run(["fio", "--enghelp"]).stdout:
        pytest.skip("fio was built without the nbd engine")
    srv = server_factory("--export", f"lab={small[0]}")
    job = _fio(tmp_path, "rr", f"--uri={srv.uri('lab')}", "--rw=randread", "--bs=4k",
               "--size=64m", "--iodepth=16", "--runtime=2", "--time_based", "--readonly")
    assert job["read"]["io_bytes"] > 0 and job["read"]["total_ios"] > 0
    assert job["write"]["io_bytes"] == 0


# ------------------------------------------------------------------ 7. nbdsh

SCAN = """
size = h.get_size()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
extents = []
pos = 0
while pos < size:
    got = []
    def cb(ctx, off, entries, err, got=got):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0
    h.block_status(size - pos, pos, cb)
    assert got, pos
    for i in range(0, len(got), 2):
        extents.append([pos, got[i], got[i + 1]])
        pos += got[i]
one = []
def cb1(ctx, off, entries, err):
    one.extend(entries)
    return 0
h.block_status(5 * 1024 * 1024, 1024 * 1024, cb1, nbd.CMD_FLAG_REQ_ONE)
result = {"size": size, "extents": extents, "req_one": one}
"""


def merge(extents: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        else:
            out.append((off, n, flags))
    return out


def test_nbdsh_block_status_shows_the_holes(
    server_factory: ServerFactory, small: tuple[Path, str], tmp_path: Path
) -> None:
    require_holes(small[0])
    srv = server_factory("--export", f"lab={small[0]}")
    res = nbdsh(srv.uri("lab"), SCAN, tmp_path, meta=True)
    assert res["size"] == SMALL
    assert merge(res["extents"]) == layout(SMALL)
    # REQ_ONE: one extent, within the request (MiB 1 to 6: data up to MiB 3).
    assert res["req_one"] == [2 * MiB, 0]


READS = """
import hashlib
size = h.get_size()
out = []
for off, n in PAIRS:
    out.append(hashlib.sha256(h.pread(n, off)).hexdigest())
h.set_strict_mode(0)  # let the odd requests reach the server
odd = {}
for name, (n, off) in {"zero_length": (0, 4096), "zero_length_at_end": (0, size),
                       "past_end": (2, size - 1), "over_max": (64 * 2**20 + 1, 0)}.items():
    try:
        odd[name] = "ok:%d" % len(h.pread(n, off))
    except nbd.Error as e:
        odd[name] = "error:%s" % (e.errno,)
last = h.pread(1, size - 1)
whole = h.pread(64 * 2**20, 0)  # the advertised maximum block size (the whole image)
result = {"hashes": out, "odd": odd, "last": last.hex(),
          "max": hashlib.sha256(whole).hexdigest()}
"""


def test_nbdsh_unaligned_reads_and_edges(
    server_factory: ServerFactory, small: tuple[Path, str], tmp_path: Path
) -> None:
    base = small[0].read_bytes()
    rng = random.Random(11)
    pairs = [(0, 1), (1, 1), (4095, 2), (3 * MiB - 1, 2), (4 * MiB - 3, 7),
             (SMALL - 1, 1), (SMALL - 4097, 4097), (12345, 3 * MiB + 777)]
    pairs += [(o, rng.randrange(1, 300_000)) for o in
              (rng.randrange(0, SMALL - 300_000) for _ in range(40))]
    srv = server_factory("--export", f"lab={small[0]}")
    res = nbdsh(srv.uri("lab"), f"PAIRS = {pairs!r}\n{READS}", tmp_path)
    want = [hashlib.sha256(base[o : o + n]).hexdigest() for o, n in pairs]
    bad = [p for p, a, b in zip(pairs, res["hashes"], want, strict=True) if a != b]
    assert not bad, f"reads differ at (offset, length) {bad}"
    assert res["last"] == base[-1:].hex()
    assert res["max"] == hashlib.sha256(base[: 64 * MiB]).hexdigest()
    # A zero-length read is undefined in the protocol: an answer (empty or EINVAL) is fine,
    # a dropped connection is not (the reads after it worked). Out of bounds is EINVAL.
    for name in ("zero_length", "zero_length_at_end"):
        assert res["odd"][name] in ("ok:0", "error:EINVAL"), res["odd"]
    assert res["odd"]["past_end"] == "error:EINVAL", res["odd"]
    # over the 64 MiB maximum: libnbd itself refuses it (ERANGE, its own 64 MiB bound) or the
    # server does (EINVAL; the raw-byte check is tests/serve/test_bad_input.py)
    assert res["odd"]["over_max"] in ("error:EINVAL", "error:ERANGE"), res["odd"]


TRIM_ZERO = """
size = h.get_size()
assert h.can_trim() and h.can_zero() and h.can_fast_zero()
# libnbd's order of arguments: trim/zero(count, offset), pwrite(buf, offset)
h.trim(256 * 1024, 256 * 1024)                  # aligned
h.trim(10008, 2 * 1024 * 1024 + 5000)           # unaligned: only whole blocks inside go
h.zero(70001, 8 * 1024 * 1024 + 333)            # unaligned
h.zero(16 * 1024 * 1024, 4 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)
h.zero(5 * 4096, 20 * 1024 * 1024, nbd.CMD_FLAG_NO_HOLE)
h.pwrite(b"\\x77" * 10, size - 10)
h.zero(3, size - 3)
h.pwrite(b"\\x66" * 100, 24 * 1024 * 1024 + 4000)
h.trim(8192, 24 * 1024 * 1024 + 4050)           # ends inside the 100 bytes' first block
h.flush()
st = {}
for name, off, n in (("trim", 256 * 1024, 256 * 1024), ("zero", 4 * 1024 * 1024, 16 * 1024 * 1024)):
    got = []
    def cb(ctx, o, entries, err, got=got):
        got.extend(entries)
        return 0
    h.block_status(n, off, cb, nbd.CMD_FLAG_REQ_ONE)
    st[name] = got
result = {"status": st, "after_trim": h.pread(256 * 1024, 256 * 1024) == bytes(256 * 1024)}
"""

# (offset, length) ranges set to zero by TRIM_ZERO, and the unaligned trim whose bytes inside
# are unspecified (proto.md NBD_CMD_TRIM) and so left out of the comparison.
ZEROED = [(256 * 1024, 256 * 1024), (8 * MiB + 333, 70001), (4 * MiB, 16 * MiB),
          (20 * MiB, 4096 * 5), (SMALL - 3, 3)]
UNSPECIFIED = [(2 * MiB + 5000, 10008), (24 * MiB + 4050, 8192)]


def test_nbdsh_trim_and_zero_on_a_cow_export(
    server_factory: ServerFactory, small: tuple[Path, str], tmp_path: Path
) -> None:
    require("nbdcopy")
    base, base_sha = small
    srv, other = two_identity_server(server_factory, "--export", f"rw={base},cow")
    mine = uri("127.0.0.1", srv.port, "rw")
    res = nbdsh(mine, TRIM_ZERO, tmp_path, meta=True)
    # Whole trimmed or zeroed blocks of the overlay read as zeros and say so.
    assert res["after_trim"] is True
    assert res["status"]["trim"] == [256 * 1024, 3], res["status"]
    assert res["status"]["zero"] == [16 * MiB, 3], res["status"]

    expected = bytearray(base.read_bytes())
    for off, n in ZEROED:
        expected[off : off + n] = bytes(n)
    expected[SMALL - 10 : SMALL - 3] = b"\x77" * 7
    expected[24 * MiB + 4000 : 24 * MiB + 4100] = b"\x66" * 100
    got = bytearray(nbdcopy_bytes(mine, tmp_path / "mine.img"))
    assert len(got) == SMALL
    for off, n in UNSPECIFIED:
        got[off : off + n] = expected[off : off + n]
    if got != expected:
        first = next(i for i in range(SMALL) if got[i] != expected[i])
        pytest.fail(f"the overlay differs from the expected bytes first at offset {first}")
    assert nbdcopy_sha(uri(other, srv.port, "rw")) == base_sha
    assert sha256_file(base) == base_sha


# ------------------------------------------------------------------ past 4 GiB, odd size

HUGE = 5 * 1024 * MiB + 1234  # offsets past 32 bits, and a size that is no multiple of 4 KiB
G4 = 4 * 1024 * MiB
HUGE_DATA = [(G4 - 5000, MiB + 5000), (HUGE - 70000, 70000)]


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the data of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def assert_sparse_equal(a: Path, b: Path) -> None:
    """Same size and same bytes, reading only where either file has data (the rest of both
    is holes, which read as zeros)."""
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(data_ranges(a) + data_ranges(b)):
            for off in range(start, end, 4 * MiB):
                n = min(4 * MiB, end - off)
                fa.seek(off)
                fb.seek(off)
                x, y = fa.read(n), fb.read(n)
                if x != y:
                    first = next(i for i in range(n) if x[i] != y[i])
                    pytest.fail(f"{a.name} and {b.name} differ at offset {off + first}")


HUGE_SCRIPT = """
import hashlib
size = h.get_size()
reads = [hashlib.sha256(h.pread(n, off)).hexdigest() for off, n in PAIRS]
extents = []
pos = 0
while pos < size:
    got = []
    def cb(ctx, o, entries, err, got=got):
        got.extend(entries)
        return 0
    h.block_status(min(size - pos, 2**32 - 4096), pos, cb)
    for i in range(0, len(got), 2):
        extents.append([pos, got[i], got[i + 1]])
        pos += got[i]
for op, off, arg in OPS:  # libnbd's order: pwrite(buf, offset), zero/trim(count, offset)
    if op == "write":
        h.pwrite(bytes.fromhex(arg), off)
    elif op == "zero":
        h.zero(arg, off)
    else:
        h.trim(arg, off)
result = {"size": size, "reads": reads, "extents": extents}
"""


def sparse_clone(src: Path, dst: Path) -> None:
    """Copy a sparse file, writing only its data."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        fd.truncate(src.stat().st_size)
        for start, end in data_ranges(src):
            fs.seek(start)
            fd.seek(start)
            fd.write(fs.read(end - start))


def sparse_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for start, end in data_ranges(path):
            f.seek(start)
            h.update(b"%d:" % start + f.read(end - start))
    return h.hexdigest()


def test_offsets_past_4gib_and_an_odd_size(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    require("nbdinfo", "nbdcopy")
    img = tmp_path / "huge.img"
    rng = random.Random(5)
    with open(img, "wb") as f:
        f.truncate(HUGE)
        for off, n in HUGE_DATA:
            f.seek(off)
            f.write(rng.randbytes(n))
    if img.stat().st_blocks * 512 > 64 * MiB or len(data_ranges(img)) != 2:
        pytest.skip(f"the file system of {tmp_path} does not keep files sparse")
    base_digest = sparse_digest(img)
    srv = server_factory("--export", f"lab={img}", "--export", f"rw={img},cow")
    (e,) = nbdinfo(srv.uri("lab"))["exports"]
    assert e["export-size"] == HUGE

    # nbdcopy skips what block status calls holes: a wrong extent past 4 GiB shows here.
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("lab"), str(out)], timeout=120)
    assert_sparse_equal(img, out)

    pairs = [(G4 - 1, 2), (G4 - 4097, 8192), (G4 + 12345, 100_000), (HUGE - 1, 1),
             (HUGE - 4097, 4097), (HUGE - 70001, 70001), (G4 + 2 * MiB, 4096)]
    want: list[str] = []
    with open(img, "rb") as f:
        for off, n in pairs:
            f.seek(off)
            want.append(hashlib.sha256(f.read(n)).hexdigest())
    res = nbdsh(srv.uri("lab"), f"PAIRS = {pairs!r}\nOPS = []\n{HUGE_SCRIPT}", tmp_path,
                meta=True)
    assert res["size"] == HUGE
    assert res["reads"] == want
    ext = merge(res["extents"])
    assert sum(n for _, n, _ in ext) == HUGE and ext[0][0] == 0
    for off, n in HUGE_DATA:  # the data is data, and the big gaps are holes
        assert any(o <= off and off + n <= o + m and fl == 0 for o, m, fl in ext), (off, ext)
    for off, n in ((0, G4 - 8192), (G4 + 2 * MiB, HUGE - 70000 - 4096 - G4 - 2 * MiB)):
        assert any(o <= off and off + n <= o + m and fl == 3 for o, m, fl in ext), (off, ext)

    # Copy-on-write across 4 GiB and at the odd tail: unaligned writes, zeroes, and a trim to
    # the end (its whole blocks and the export's partial last block read as zeros; the bytes of
    # its partial first block are unspecified, proto.md NBD_CMD_TRIM).
    trim_start = HUGE - 20_000
    ops: list[tuple[str, int, Any]] = [
        ("write", G4 - 3, rng.randbytes(7).hex()),
        ("write", G4 + 3 * MiB + 1, rng.randbytes(5000).hex()),
        ("zero", G4 + 100, 10_000),
        ("trim", trim_start, HUGE - trim_start),
        ("write", HUGE - 10, rng.randbytes(10).hex()),
        ("zero", HUGE - 5, 3),
    ]
    nbdsh(srv.uri("rw"), f"PAIRS = []\nOPS = {ops!r}\n{HUGE_SCRIPT}", tmp_path, meta=True)
    expected = tmp_path / "expected.img"
    sparse_clone(img, expected)
    first_full = -(-trim_start // 4096) * 4096
    with open(expected, "r+b") as f:
        for op, off, arg in ops:
            f.seek(off if op != "trim" else first_full)
            if op == "write":
                f.write(bytes.fromhex(arg))
            elif op == "zero":
                f.write(bytes(arg))
            else:
                f.write(bytes(HUGE - first_full))
    got = tmp_path / "cow.img"
    run(["nbdcopy", srv.uri("rw"), str(got)], timeout=120)
    with open(got, "r+b") as fg, open(expected, "rb") as fe:  # mask the unspecified bytes
        fe.seek(trim_start)
        fg.seek(trim_start)
        fg.write(fe.read(first_full - trim_start))
    assert_sparse_equal(expected, got)
    assert sparse_digest(img) == base_digest


# ------------------------------------------------------------------ 8. Unix socket


def test_unix_socket_export(server_factory: ServerFactory, small: tuple[Path, str],
                            tmp_path: Path) -> None:
    require("nbdinfo", "nbdcopy")
    sock = tmp_path / "s.sock"
    if len(os.fsencode(sock)) > 100:
        pytest.skip(f"socket path too long for AF_UNIX: {sock}")
    srv = server_factory("--unix", str(sock), "--export", f"lab={small[0]}")
    wait_log(srv, f"listening=unix:{sock}")
    u = f"nbd+unix:///lab?socket={sock}"
    (e,) = nbdinfo(u)["exports"]
    assert e["export-size"] == SMALL and e["is_read_only"] is True
    assert nbdcopy_sha(u) == small[1]


# ------------------------------------------------------------------ 9. --workers 2


def test_two_workers_serve_six_nbdcopy_at_once(
    server_factory: ServerFactory, big: tuple[Path, str]
) -> None:
    require("nbdcopy")
    srv = server_factory("--export", f"big={big[0]}", "--workers", "2")
    wait_log(srv, f"listening=127.0.0.1:{srv.port}", count=2)
    results = hash_outputs(nbdcopy_procs([srv.uri("big")] * 6), timeout=180)
    bad = [i for i, (h, n) in enumerate(results) if h != big[1] or n != BIG]
    assert not bad, f"copies {bad} differ from the image"
    # Each worker numbers its own connections: a number logged twice means both served.
    def conn_numbers() -> list[str]:
        return [line.split("conn=")[1].split()[0] for line in srv.log_text().splitlines()
                if " export=" in line and "conn=" in line]

    # SO_REUSEPORT picks a worker by a hash of each connection's addresses, so six may all
    # land on one (1 time in 32): short nbdinfo connections until both have served (40 all
    # on one worker: 1 time in 2^39)
    require("nbdinfo")
    for _ in range(40):
        conns = conn_numbers()
        if len(conns) > len(set(conns)):
            break
        subprocess.run(["nbdinfo", srv.uri("big")], capture_output=True, timeout=30, check=True)
        wait_log(srv, " export=", count=len(conns) + 1)
    conns = conn_numbers()
    assert len(conns) > len(set(conns)), "only one worker accepted connections"
