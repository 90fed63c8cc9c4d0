"""A serving process freezes what its imports made (icbdcache/heap.py): every worker
logs how many objects its collector's full passes no longer walk."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import start_server


def test_every_worker_freezes_its_startup_objects(tmp_path: Path, image: Path) -> None:
    srv = start_server(tmp_path, "--export", f"disk={image}", "--workers", "2")
    try:
        frozen = [int(n) for n in re.findall(r"serving=yes startup_s=[0-9.]+ gc_frozen=(\d+)",
                                             srv.log_text())]
        assert len(frozen) == 2, srv.log_text()[-2000:]
        # the imports' modules, classes and functions: about 51,000 here
        assert all(n > 10_000 for n in frozen), frozen
    finally:
        assert srv.stop() == 0
