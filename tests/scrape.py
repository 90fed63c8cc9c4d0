"""Reading a ``/metrics`` endpoint the way Prometheus would: fetch the text exposition, check
it with ``promtool check metrics`` (Debian's prometheus package), and turn its sample lines
into numbers."""

from __future__ import annotations

import subprocess
import urllib.request


def scrape(port: int, host: str = "127.0.0.1") -> str:
    """The text of ``http://HOST:PORT/metrics`` (its Content-Type must be text/plain)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample line of an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def promtool_check(text: str) -> None:
    """``promtool check metrics`` accepts ``text``, its lint findings included (AssertionError
    with promtool's output otherwise)."""
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), (
        p.returncode, p.stdout, p.stderr)
