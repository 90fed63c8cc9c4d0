"""``icbd-cache warm``'s answers around the Node warm API: an unknown version exits 2, a
version without a boot profile exits 1 and says how to get one, ``--all`` warms every chunk
(a version whose file is its source: every non-zero chunk lands in the store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_image

from icbdcache.cli import main
from icbdcache.store import Store

MiB = 1 << 20


def test_warm_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make_image(tmp_path / "lab.img", 4 * MiB)
    store = str(tmp_path / "store")
    assert main(["import", str(img), "--imi", "lab", "--store", store, "-q"]) == 0
    capsys.readouterr()
    assert main(["warm", "nope@3", "--store", store]) == 2
    assert "icbd-cache warm: unknown version nope@3" in capsys.readouterr().err
    assert main(["warm", "lab", "--store", store]) == 1
    assert ("icbd-cache warm: lab@1 has no boot profile yet (boot a client once, or use "
            "--all)") in capsys.readouterr().err
    assert main(["warm", "lab", "--all", "--parallel", "3", "--store", store]) == 0
    assert "warmed lab@1: 64 chunks, 0 failed" in capsys.readouterr().out
    s = Store(store, readonly=True)
    try:
        held, need = s.held_of("lab@1")
    finally:
        s.close()
    assert held == need == 3 * MiB  # make_image: every fourth MiB is a hole
