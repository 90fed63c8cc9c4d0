"""The demos' master and site: real ``icbd-cache`` processes on 127.0.0.1.

``icbd-cache demo`` and ``icbd-cache demo --boot`` both run the main job the same way: an image
published on a master (``icbd-cache publish``, ``icbd-cache master``), signed with a key made
in the demo's directory (``icbd-cache keygen``), and a site (``icbd-cache serve --master URL
--site demo-site --subscribe IMI --on-demand --trust-key KEY.pub``) whose store starts empty
and faults every chunk its clients read from the master, each checked against the signed
manifest's strong digests. This module starts and
stops those processes (each with its log file in the demo's directory), prints each command
as a user would type it, and reads the store counters ``icbd-cache stats --json`` shows.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The site's name at the master.
SITE = "demo-site"


def say(tag: str, text: str) -> None:
    """One line of a demo's output: a tag column, then the text."""
    print(f"{tag:7} {text}", flush=True)


def mib(n: int) -> str:
    """``n`` bytes, short: ``0 B``, ``512 KiB``, ``3.9 MiB``."""
    if n == 0:
        return "0 B"
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def cli(*args: str) -> list[str]:
    """``icbd-cache ARGS`` as this interpreter's module (no PATH needed)."""
    return [sys.executable, "-m", "icbdcache.cli", *args]


def shown(args: list[str]) -> str:
    """``args`` as the command line a user would type (``icbd-cache ...``)."""
    return shlex.join(["icbd-cache", *args])


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port of 127.0.0.1 free now (TCP, or UDP with ``SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoError(Exception):
    """A step of a demo failed; the message says which, with the tail of its log."""


class Proc:
    """A started ``icbd-cache`` process whose output goes to ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(cli(*args), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)

    def tail(self, lines: int = 12) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_port(self, port: int, what: str, timeout: float = 60.0) -> None:
        """Wait until 127.0.0.1:``port`` accepts connections. Raises DemoError if the
        process exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise DemoError(f"{what} exited at start (status {self.popen.returncode}):\n"
                                f"{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise DemoError(f"{what} did not listen on 127.0.0.1:{port} in {timeout:.0f} s:\n"
                        f"{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait (a server writes its counters to its store as it stops);
        SIGKILL after ``timeout`` seconds. Returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


#: The demo's signing key, made in its temporary directory (beside the stores).
KEY_NAME = "master.key"


def signing_key(tmp: Path) -> Path:
    """The master's signing key in ``tmp``, made with ``icbd-cache keygen`` (prints the
    command) the first time. Raises DemoError if it cannot be made."""
    key = tmp / KEY_NAME
    if not key.exists():
        args = ["keygen", "--out", str(key)]
        say("master", shown(args))
        p = subprocess.run(cli(*args), capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise DemoError(f"keygen failed (exit {p.returncode}): {p.stderr.strip()}")
    return key


def publish(image: Path, store: Path, imi: str) -> str:
    """``icbd-cache publish IMAGE --imi IMI --store STORE --signing-key KEY`` (prints the
    command), signed with the demo's key beside STORE (:func:`signing_key`); returns what it
    printed. Raises DemoError if it fails."""
    args = ["publish", str(image), "--imi", imi, "--store", str(store), "--signing-key",
            str(signing_key(store.parent))]
    say("master", shown(args))
    p = subprocess.run(cli(*args), capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise DemoError(f"publish failed (exit {p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip()


def start_master(store: Path, logs: Path) -> tuple[Proc, str]:
    """``icbd-cache master`` over ``store`` on a free port of 127.0.0.1 (prints the
    command), listening when this returns. Returns it and its URL. Raises DemoError."""
    port = free_port()
    args = ["master", "--store", str(store), "--listen", f"127.0.0.1:{port}"]
    say("master", shown(args))
    proc = Proc(args, logs / "master.log")
    proc.wait_port(port, "icbd-cache master")
    return proc, f"http://127.0.0.1:{port}"


def site_args(store: Path, port: int, master_url: str, imi: str) -> list[str]:
    """The arguments of the demo's site: ``serve`` over ``store`` on 127.0.0.1:``port``,
    subscribed on demand to ``imi`` at ``master_url``, trusting the demo's key (beside
    ``store``, made by :func:`publish`)."""
    return ["serve", "--store", str(store), "--create-store", "--listen", f"127.0.0.1:{port}",
            "--master", master_url, "--site", SITE, "--subscribe", imi, "--on-demand",
            "--trust-key", f"{store.parent / KEY_NAME}.pub"]


def wait_export(uri: str, proc: Proc, timeout: float = 60.0) -> None:
    """Wait until the NBD export ``uri`` exists (``nbdinfo --size`` answers: the site has
    the version's manifest). Raises DemoError if the site exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DemoError(f"the site exited (status {proc.popen.returncode}):\n"
                            f"{proc.tail()}")
        p = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                           check=False)
        if p.returncode == 0:
            return
        last = p.stderr.strip()
        time.sleep(0.1)
    raise DemoError(f"{uri} did not appear in {timeout:.0f} s ({last}):\n{proc.tail()}")


def read_stats(store: Path) -> dict[str, Any]:
    """``icbd-cache stats --store STORE --json`` as a dict. Raises DemoError."""
    p = subprocess.run(cli("stats", "--store", str(store), "--json"), capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        raise DemoError(f"stats --store {store} failed: {p.stderr.strip()}")
    out = json.loads(p.stdout)
    if not isinstance(out, dict):
        raise DemoError(f"stats --store {store} --json: not an object")
    return out


def from_master(stats: dict[str, Any]) -> int:
    """Bytes of chunks that crossed from a master into a site's store, in its ``stats
    --json``: faulted by clients (``bytes_from:icbd+http(s)://...``) plus pulled by its
    replica (``replica_chunk_bytes``)."""
    faulted = sum(int(v) for k, v in stats.items() if k.startswith("bytes_from:icbd+"))
    return faulted + int(stats.get("replica_chunk_bytes", 0))


@dataclass
class PassCounts:
    """A site's counters over one pass (the difference of two ``stats --json`` snapshots):
    ``from_master`` bytes (:func:`from_master`), chunk ``faults`` started, ``coalesced``
    waits joined to a fault in flight, ``misses`` chunk reads that waited, ``hits`` chunk
    reads answered by the store, and those by tier: ``hits_hot`` (the hot set, memory),
    ``hits_queued`` (the writer's queue), ``hits_lmdb`` (LMDB)."""

    from_master: int
    faults: int
    coalesced: int
    misses: int
    hits: int
    hits_hot: int
    hits_queued: int
    hits_lmdb: int

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> PassCounts:
        """The counts of ``after`` minus those of ``before`` (``{}``: an empty store)."""
        def diff(name: str) -> int:
            return int(after.get(name, 0)) - int(before.get(name, 0))

        return cls(from_master(after) - from_master(before), diff("faults"),
                   diff("coalesced"), diff("misses"), diff("hits"), diff("hits_hot"),
                   diff("hits_queued"), diff("hits_lmdb"))


__all__ = ["SITE", "DemoError", "PassCounts", "Proc", "cli", "free_port", "from_master",
           "mib", "publish", "read_stats", "say", "shown", "signing_key", "site_args",
           "start_master", "wait_export"]
