"""``bench.report``: each server against its ``-base`` twin (ratios, spread, table, plot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def _runs() -> list[dict[str, object]]:
    iops = {("w", "icbd-store", 0): 90.0, ("w", "icbd-store-base", 0): 100.0,
            ("w", "icbd-store", 1): 120.0, ("w", "icbd-store-base", 1): 100.0,
            ("w", "icbd-store", 2): 100.0, ("w", "icbd-store-base", 2): 100.0,
            ("w", "nbdkit", 0): 50.0}
    runs: list[dict[str, object]] = [
        {"workload": w, "server": s, "rep": rep, "iops": v, "error": None}
        for (w, s, rep), v in iops.items()]
    runs.append({"workload": "w", "server": "icbd-store", "rep": 3, "iops": 1.0,
                 "error": "failed"})  # a failed run pairs with nothing
    return runs


def test_twins_pair_repetitions_and_give_their_spread(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    [p] = report.twins(_runs())
    assert (p["workload"], p["server"], p["twin"]) == ("w", "icbd-store", "icbd-store-base")
    assert p["iops"] == [0.9, 1.2, 1.0]
    assert (p["median"], p["low"], p["high"]) == (1.0, 0.9, 1.2)
    doc = {"meta": {"reps": 3, "runtime_s": 1, "image_bytes": 1 << 20},
           "rows": report.summarize(_runs(), ["w"], ["icbd-store", "icbd-store-base"],
                                    "qemu-nbd"),
           "runs": _runs()}
    assert "| w | icbd-store | 1.00x | 0.90x | 1.20x | 3 |" in report.markdown(doc)
    png = tmp_path / "twins.png"
    assert report.plot(doc, png)  # no qemu-nbd ratio: the twins are drawn instead
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
