"""Offline bundles (issue 16): ``icbd-cache bundle create`` at a master's store, ``bundle
import`` at a site, real processes; the imported version is served and read whole with
nbdcopy. A bundle altered anywhere (a chunk, the manifest, the statement) imports nothing."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_KEY_PUB, make_image, require, sha256_file
from test_replica import Procs, ls, publish, run, served_sha256, stats

from icbdcache.replication.bundle import MAGIC
from icbdcache.replication.signing import generate


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


def pair(tmp: Path) -> tuple[Path, Path]:
    """v1 (8 MiB of random data with holes) and v2: v1 with 1 MiB rewritten."""
    v1 = make_image(tmp / "v1.img", 8 << 20, seed=21)
    v2 = tmp / "v2.img"
    data = bytearray(v1.read_bytes())
    data[2 << 20 : 3 << 20] = make_image(tmp / "x.img", 1 << 20, seed=22).read_bytes()
    v2.write_bytes(bytes(data))
    return v1, v2


def layout(path: Path) -> dict[str, int]:
    """Offsets in a bundle file: header, maps, boot files, first frame."""
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    (n,) = struct.unpack(">I", raw[8:12])
    h = json.loads(raw[12 : 12 + n])
    chunks = -(-h["size"] // h["chunk_size"])
    maps = 12 + n
    frames = maps + chunks * 48 + (h["kernel"] or 0) + (h["initrd"] or 0)
    return {"header": 12, "header_len": n, "maps": maps, "strong": maps + chunks * 16,
            "frames": frames}


def flip(path: Path, offset: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out = path.with_name(path.name + f".flip{offset}")
    out.write_bytes(bytes(data))
    return out


def imported_nothing(store: Path) -> None:
    if not (store / "data.mdb").exists():
        return
    assert ls(store) == {}
    s = stats(store)
    assert s["chunks"] == 0 and s["held_bytes"] == 0


def test_untouched_bundle_imports_and_serves_the_right_bytes(tmp_path: Path,
                                                             procs: Procs) -> None:
    require("nbdcopy")
    v1, v2 = pair(tmp_path)
    mstore, site = tmp_path / "master", tmp_path / "site"
    publish(mstore, v1, version="1")
    publish(mstore, v2, version="2")
    full, delta = tmp_path / "lab-1.bundle", tmp_path / "lab-2.delta"
    out = run("bundle", "create", "lab@1", "--store", str(mstore), "--out", str(full)).stdout
    assert "signed by key" in out
    run("bundle", "create", "lab@2", "--since", "lab@1", "--store", str(mstore),
        "--out", str(delta))
    assert delta.stat().st_size < full.stat().st_size / 4  # 1 MiB changed of about 6

    # the delta alone cannot make lab@2: refused, naming the version it needs
    p = run("bundle", "import", str(delta), "--store", str(site), check=False)
    assert p.returncode == 1 and "import lab@1 first" in p.stderr
    imported_nothing(site)

    out = run("bundle", "import", str(full), "--store", str(site)).stdout
    assert "imported lab@1" in out
    row = ls(site)["lab@1"]
    assert row["pinned"] and row["latest"] and row["held"] == row["needed"]
    assert served_sha256(procs, site, "lab") == sha256_file(v1)

    run("bundle", "import", str(delta), "--store", str(site))
    assert ls(site)["lab@2"]["latest"]
    assert served_sha256(procs, site, "lab@2") == sha256_file(v2)
    assert served_sha256(procs, site, "lab@1") == sha256_file(v1)
    assert run("verify", "--store", str(site)).returncode == 0
    # again: nothing to do
    assert "already held" in run("bundle", "import", str(full), "--store", str(site)).stdout


def test_tampered_bundle_imports_nothing(tmp_path: Path) -> None:
    v1, _ = pair(tmp_path)
    mstore = tmp_path / "master"
    publish(mstore, v1, version="1")
    b = tmp_path / "lab-1.bundle"
    run("bundle", "create", "lab@1", "--store", str(mstore), "--out", str(b))
    at = layout(b)
    raw = b.read_bytes()
    statement_at = raw.index(b'"key_id')  # inside the statement text, in the header
    cases = {
        "a chunk's bytes": (at["frames"] + 20 + 5000, "does not match its digests"),
        "the chunk map": (at["maps"] + 3 * 16 + 2, "does not describe it"),
        "the strong map": (at["strong"] + 5 * 32 + 7, "does not describe it"),
        "the statement": (statement_at + 12, "refused"),
        "the last chunk": (len(raw) - 20 - 100, "does not match its digests"),
    }
    for what, (offset, why) in cases.items():
        site = tmp_path / f"site-{offset}"
        p = run("bundle", "import", str(flip(b, offset)), "--store", str(site), check=False)
        assert p.returncode == 1, what
        assert why in p.stderr and "nothing was imported" in p.stderr, (what, p.stderr)
        imported_nothing(site)
    # cut short
    short = tmp_path / "short.bundle"
    short.write_bytes(raw[:-30])
    p = run("bundle", "import", str(short), "--store", str(tmp_path / "site-short"),
            check=False)
    assert p.returncode == 1 and "cut short" in p.stderr
    imported_nothing(tmp_path / "site-short")


def test_bundle_signed_by_an_untrusted_key_is_refused(tmp_path: Path) -> None:
    v1, _ = pair(tmp_path)
    mstore = tmp_path / "master"
    publish(mstore, v1, version="1")
    b = tmp_path / "lab-1.bundle"
    run("bundle", "create", "lab@1", "--store", str(mstore), "--out", str(b))
    other = tmp_path / "other.key"
    kid = generate(str(other))
    site = tmp_path / "site"
    p = run("bundle", "import", str(b), "--store", str(site), "--trust-key", f"{other}.pub",
            check=False)
    assert p.returncode == 1 and "does not trust" in p.stderr and kid in p.stderr
    imported_nothing(site)
    p = run("bundle", "import", str(b), "--store", str(site), "--trust-key",
            str(TEST_KEY_PUB), "--revoked-key", str(TEST_KEY_PUB), check=False)
    assert p.returncode == 1 and "revoked" in p.stderr
    imported_nothing(site)
