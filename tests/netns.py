"""A network namespace made by a test: its own loopback and an address that is not loopback,
so a process can listen "on the network" without touching the host's.

Inside the namespace a veth pair has both ends (``ADDR`` 10.219.0.1/24 and ``PEER``
10.219.0.2/24); nothing outside it changes, and every port is free in it. Commands run in it
through ``ip netns exec``; :meth:`NetNS.http` makes HTTP requests from inside it (a request to
``ADDR`` then comes from ``ADDR``, an address that is not loopback). Needs root and ``ip``;
:func:`make_netns` skips the test, saying why, when namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

#: The namespace's addresses that are not loopback (a private test range, inside it only).
ADDR, PEER = "10.219.0.1", "10.219.0.2"

_seq = itertools.count()

#: Run in the namespace by :meth:`NetNS.http`: one request per JSON line of stdin, one JSON
#: line out per request (status, body as latin-1 text).
_FETCH = r"""
import json, sys, urllib.error, urllib.request
for line in sys.stdin:
    r = json.loads(line)
    body = r["body"].encode("latin-1") if r["body"] is not None else None
    req = urllib.request.Request(r["url"], data=body, method=r["method"], headers=r["headers"])
    try:
        with urllib.request.urlopen(req, timeout=r["timeout"]) as resp:
            out = (resp.status, resp.read())
    except urllib.error.HTTPError as e:
        out = (e.code, e.read())
    except OSError as e:
        out = (0, str(e).encode())
    print(json.dumps([out[0], out[1].decode("latin-1")]), flush=True)
"""


class NetNS:
    """One namespace, deleted by :meth:`delete` (the processes started in it are the test's to
    stop first)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` as run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace to its end (output captured, not checked)."""
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=env, check=False)

    def popen(self, *cmd: str, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace, its stdout and stderr into ``log``."""
        with open(log, "wb") as out:
            return subprocess.Popen(self.argv(*cmd), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd)

    def http(self, method: str, url: str, *, token: str | None = None,
             body: bytes | dict[str, Any] | None = None,
             timeout: float = 60.0) -> tuple[int, bytes]:
        """(status, body) of one request made from inside the namespace (status 0: no
        answer, the reason as body)."""
        return self.http_many([(method, url, token, body)], timeout=timeout)[0]

    def http_many(self, requests: list[tuple[str, str, str | None, Any]],
                  timeout: float = 60.0) -> list[tuple[int, bytes]]:
        """Several requests ``(method, url, token, body)`` from one process in the
        namespace, in order."""
        lines = []
        for method, url, token, body in requests:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            if isinstance(body, dict):
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            lines.append(json.dumps({"method": method, "url": url, "headers": headers,
                                     "body": body.decode("latin-1") if body is not None
                                     else None, "timeout": timeout}))
        p = subprocess.run(self.argv(sys.executable, "-I", "-c", _FETCH),
                           input="\n".join(lines) + "\n", capture_output=True, text=True,
                           timeout=timeout * len(lines) + 30, check=True)
        out = [json.loads(x) for x in p.stdout.splitlines()]
        return [(int(s), b.encode("latin-1")) for s, b in out]

    def wait_port(self, host: str, port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 20.0) -> None:
        """Wait until something accepts TCP connections on host:port in the namespace; raise
        RuntimeError if ``proc`` exits first or nothing does within ``timeout`` seconds."""
        probe = ("import socket,sys\n"
                 "try:\n"
                 f"    socket.create_connection(({host!r}, {port}), timeout=0.5).close()\n"
                 "except OSError:\n"
                 "    sys.exit(1)\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before {host}:{port} "
                                   "accepted")
            if subprocess.run(self.argv(sys.executable, "-I", "-c", probe),
                              capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listening on {host}:{port} in {self.name} after "
                           f"{timeout} s")

    def stop_leftovers(self) -> list[int]:
        """SIGKILL every process still in the namespace (all started by the test: a script's
        background jobs it could not stop), by PID; their PIDs."""
        p = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                           text=True, check=False)
        pids = [int(x) for x in p.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def delete(self) -> None:
        """Stop what is left in the namespace (:meth:`stop_leftovers`), then delete it."""
        self.stop_leftovers()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)


def make_netns() -> NetNS:
    """A new namespace with lo up and the veth pair (:data:`ADDR`, :data:`PEER`); skips the
    calling test when that cannot be done here (not root, no ``ip``, no veth)."""
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root")
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed")
    ns = NetNS(f"icbdt-{os.getpid()}-{next(_seq)}")
    steps = [["ip", "netns", "add", ns.name],
             ["ip", "-n", ns.name, "link", "set", "lo", "up"],
             ["ip", "-n", ns.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
             ["ip", "-n", ns.name, "addr", "add", f"{ADDR}/24", "dev", "v0"],
             ["ip", "-n", ns.name, "addr", "add", f"{PEER}/24", "dev", "v1"],
             ["ip", "-n", ns.name, "link", "set", "v0", "up"],
             ["ip", "-n", ns.name, "link", "set", "v1", "up"]]
    for step in steps:
        p = subprocess.run(step, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            ns.delete()
            pytest.skip(f"cannot make a network namespace here ({' '.join(step)}: "
                        f"{p.stderr.strip()})")
    return ns
