"""Hostile clients for tests: ``icbd-bench abuse`` (bench/adversary.py) run as processes of
their own, and what the server's log says about them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import BIN


class Adversary:
    """``icbd-bench abuse ARGS`` in its own process: :meth:`holding` waits for its
    ``holding`` line, :meth:`stop` ends it (SIGTERM) and returns its ``done`` line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(BIN / "icbd-bench"), "abuse", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []

    def _next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the adversary ended without a report: {err}")
        obj: dict[str, Any] = json.loads(line)
        self.lines.append(obj)
        return obj

    def holding(self) -> dict[str, Any]:
        while (obj := self._next())["event"] != "holding":
            pass
        return obj

    def done(self, timeout: float = 60) -> dict[str, Any]:
        """The ``done`` line of an adversary that ends by itself."""
        self.proc.wait(timeout)
        while (obj := self._next())["event"] != "done":
            pass
        return obj

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.done()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def adversaries() -> Iterator[Callable[..., Adversary]]:
    started: list[Adversary] = []

    def start(*args: str) -> Adversary:
        a = Adversary(*args)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


def throttled_counts(log: str, key: str = "refused") -> dict[str, int]:
    """Events of ``key`` (``refused``, ``closed``, ``why``) the log accounts for, per value:
    each line with the key is one, plus its ``suppressed=N`` (at the end of the line)."""
    out: dict[str, int] = {}
    value = re.compile(r"(?:^| )" + re.escape(key) + r'=(?:"((?:[^"\\]|\\.)*)"|(\S+))')
    for line in log.splitlines():
        m = value.search(line)
        if m is None:
            continue
        why = m.group(1) if m.group(1) is not None else m.group(2)
        held = re.search(r" suppressed=(\d+)$", line)
        out[why] = out.get(why, 0) + 1 + int(held.group(1) if held else 0)
    return out
