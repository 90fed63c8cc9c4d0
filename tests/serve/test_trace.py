"""``icbd-cache serve --trace``: every request of a real client lands in the boot-trace CSV."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from conftest import require

from bench.chunksize import load_trace


def test_trace_records_every_read(tmp_path: Path, image: Path, server_factory: Any) -> None:
    require("nbdcopy")
    trace = tmp_path / "boot.csv"
    srv = server_factory("--export", f"disk={image}", "--trace", str(trace))
    # 1 MiB requests, 4 in flight: 64 reads of a 64 MiB image
    subprocess.run(["nbdcopy", "--request-size=1048576", "--requests=4", srv.uri("disk"),
                    str(tmp_path / "copy.img")], check=True)
    assert srv.stop() == 0
    reads = load_trace(trace)
    covered = sorted((off, n) for _, off, n in reads)
    mib = 1 << 20
    # nbdcopy skips holes (block status): make_image leaves every fourth MiB a hole
    data_mib = [off for off in range(0, image.stat().st_size, mib) if (off // mib) % 4 != 3]
    assert covered == [(off, mib) for off in data_mib]
    assert (tmp_path / "copy.img").read_bytes() == image.read_bytes()
    lines = trace.read_text().splitlines()
    assert lines[0] == "# t_ms,conn,op,offset,count,lat_us"
    assert f"# export_size={image.stat().st_size}" in lines
    from bench.replay import load_trace as replay_load

    assert replay_load(trace).export_size == image.stat().st_size
