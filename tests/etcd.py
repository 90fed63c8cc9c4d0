"""A real single-member etcd for the registry tests: started on free 127.0.0.1 ports with its
data in a temporary directory, stopped by PID.

``EtcdServer.start(dir)`` returns a running server (its client URL in ``uri``), or raises
:class:`EtcdMissing` if the etcd binary is not installed (Debian package etcd-server,
``scripts/setup`` installs it) and RuntimeError if it does not become healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ETCD_PATHS = ("/usr/bin/etcd", "/usr/local/bin/etcd")


class EtcdMissing(Exception):
    """No etcd binary on this machine."""


def etcd_binary() -> str | None:
    """The etcd executable, or None."""
    for p in ETCD_PATHS:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("etcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdServer:
    proc: subprocess.Popen[bytes]
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of its client (gRPC) listener."""
        return f"127.0.0.1:{self.client_port}"

    def uri(self, prefix: str = "/icbd") -> str:
        """``etcd://127.0.0.1:PORT/PREFIX`` for :func:`~icbdcache.replication.registry.
        open_registry`."""
        return f"etcd://{self.endpoint}/{prefix.strip('/')}"

    @classmethod
    def start(cls, directory: Path, timeout: float = 30.0) -> EtcdServer:
        directory.mkdir(parents=True, exist_ok=True)
        client, peer = _free_port(), _free_port()
        while peer == client:
            peer = _free_port()
        return cls._launch(directory, client, peer, timeout)

    def restart(self, timeout: float = 30.0) -> EtcdServer:
        """Stop it, then start it again on the same ports and data (a new object)."""
        self.stop()
        return self._launch(self.data_dir.parent, self.client_port, self.peer_port, timeout)

    @classmethod
    def _launch(cls, directory: Path, client: int, peer: int, timeout: float) -> EtcdServer:
        binary = etcd_binary()
        if binary is None:
            raise EtcdMissing("etcd is not installed (Debian package etcd-server; "
                              "scripts/setup installs it)")
        data = directory / "data"
        log_path = directory / "etcd.log"
        curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        state = "existing" if (data / "member").exists() else "new"
        cmd = [
            binary, "--name", "test", "--data-dir", str(data),
            "--listen-client-urls", curl, "--advertise-client-urls", curl,
            "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
            "--initial-cluster", f"test={purl}", "--initial-cluster-state", state,
            "--logger", "zap", "--log-level", "warn",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        server = cls(proc, client, peer, data, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{curl}/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return server
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"etcd did not become healthy on {curl}:\n{tail}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s) by its PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
