"""An nbdkit upstream whose log filter tells which byte ranges it was asked for.

Tests of the cache count what crossed from the upstream with :meth:`Upstream.reads`; the
``upstream`` fixture (conftest.py) starts as many as a test needs and kills them at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from conftest import free_port, wait_port

_READ = re.compile(r"(?:^|\s)Read id=\d+ offset=0x([0-9a-fA-F]+) count=0x([0-9a-fA-F]+)")


class Upstream:
    """``nbdkit -r -f -p PORT -i 127.0.0.1 --filter=log [FILTERS] file IMAGE logfile=LOG``.

    The log filter writes one ``Read id=N offset=0x.. count=0x.. ...`` line when a read
    starts and one ``...Read id=N return=..`` line when it ends; only the first kind is counted.
    The log is appended to across restarts (same port, same log).
    """

    def __init__(self, image: Path, log: Path, *, filters: Sequence[str] = (),
                 params: Sequence[str] = (), options: Sequence[str] = ()) -> None:
        self.image = image
        self.log = log
        self.filters = filters
        self.params = params
        self.options = options
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> Upstream:
        cmd = ["nbdkit", "-r", "-f", "--exit-with-parent", "-p", str(self.port),
               "-i", "127.0.0.1", *self.options, "--filter=log",
               *(f"--filter={f}" for f in self.filters),
               "file", str(self.image), f"logfile={self.log}", "logappend=true", *self.params]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(15)
        self.proc = None

    def reads(self) -> list[tuple[int, int]]:
        """(offset, count) of every read request the upstream was asked for."""
        if not self.log.exists():
            return []
        text = self.log.read_text(errors="replace")
        return [(int(o, 16), int(c, 16)) for o, c in _READ.findall(text)]

    def read_bytes(self) -> int:
        return sum(c for _, c in self.reads())

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every connection the upstream accepted has ended (so that requests a
        killed client left queued are logged before the log is counted)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if text.count(" Connect export=") == text.count(" Disconnect transactions="):
                return
            assert time.monotonic() < deadline, f"upstream connections never ended:\n{text}"
            time.sleep(0.05)
