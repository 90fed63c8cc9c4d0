"""A server that starts fills its hot set from the boot profiles of every iMI's latest
version (``Node.fill_hot_set``): its first client's reads of those chunks are hot-set hits,
not LMDB reads."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, free_port, libnbd_script, make_image, require, start_server, wait_port
from scrape import samples, scrape

ICBD = str(BIN / "icbd-cache")
CHUNK = 64 << 10
#: Chunks the boot reads (not a run; none in make_image's holes, every fourth MiB).
BOOT = [*range(0, 48, 2), *range(64, 112, 3)]


def _read_chunks(uri: str, cwd: Path, img: Path) -> None:
    """Read 4 KiB at the start of each BOOT chunk through libnbd, one at a time, checked
    against the image (``/usr/bin/python3 -I -m nbd``: STYLE.md 'The nbd name')."""
    script = (
        f"data = open({str(img)!r}, 'rb').read()\n"
        f"ok = [h.pread(4096, i * {CHUNK}) == data[i * {CHUNK}:i * {CHUNK} + 4096]"
        f" for i in {BOOT!r}]\n"
        "print(sum(ok))\n")
    out = libnbd_script(uri, script, cwd)
    assert out.split() == [str(len(BOOT))], out


def _hits(mport: int) -> dict[str, float]:
    m = samples(scrape(mport))
    return {t: m.get(f'icbd_chunk_hits_total{{tier="{t}"}}', 0.0)
            for t in ("hot", "queued", "lmdb")}


@pytest.mark.parametrize("hot_size", ["64M", "0"])
def test_a_restarted_server_serves_the_boot_profile_from_memory(tmp_path: Path,
                                                                hot_size: str) -> None:
    """The first server records the boot profile (BOOT) as a client boots; the next one,
    started on the same store, answers the same reads from the hot set at once (hot hits
    = reads, no LMDB read). With ``--hot-size 0`` (no memory tier) it fills nothing."""
    require("promtool")
    img = make_image(tmp_path / "lab.img", 8 << 20, seed=7)
    store = tmp_path / "store"
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(store),
                    "--copy"], check=True, capture_output=True, timeout=120)
    args = ["--store", str(store), "--workers", "1", "--hot-size", hot_size]
    first = start_server(tmp_path, *args)
    try:
        _read_chunks(first.uri("lab"), tmp_path, img)
    finally:
        assert first.stop() == 0  # the profile is saved as it stops
    mport = free_port()
    second = start_server(tmp_path, *args, "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_port("127.0.0.1", mport)
        time.sleep(0.5)  # the fill runs in the background as the server starts
        assert _hits(mport) == {"hot": 0, "queued": 0, "lmdb": 0}  # it read nothing yet
        _read_chunks(second.uri("lab"), tmp_path, img)
        hits = _hits(mport)
    finally:
        second.stop()
    zero_chunks = sum(1 for i in BOOT if not any(img.read_bytes()[i * CHUNK:(i + 1) * CHUNK]))
    assert zero_chunks == 0  # every BOOT chunk has data (make_image leaves holes elsewhere)
    if hot_size == "0":
        assert hits == {"hot": 0, "queued": 0, "lmdb": len(BOOT)}
    else:
        assert hits == {"hot": len(BOOT), "queued": 0, "lmdb": 0}
