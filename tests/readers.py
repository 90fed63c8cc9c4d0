"""Real readers run side by side: ``nbdcopy URI -`` processes hashed as they stream."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from collections.abc import Sequence

MiB = 1 << 20


def nbdcopy_procs(uris: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start one ``nbdcopy URI -`` per URI, all at once (output on a pipe)."""
    return [subprocess.Popen(["nbdcopy", u, "-"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for u in uris]


def hash_outputs(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 120,
                 check: bool = True) -> list[tuple[str, int]]:
    """sha256 and length of each process's stdout, read concurrently; with ``check`` each
    must exit 0."""
    results: list[tuple[str, int]] = [("", 0)] * len(procs)

    def drain(i: int) -> None:
        h = hashlib.sha256()
        n = 0
        stream = procs[i].stdout
        assert stream is not None
        while chunk := stream.read(4 * MiB):
            h.update(chunk)
            n += len(chunk)
        results[i] = (h.hexdigest(), n)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(procs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = any(t.is_alive() for t in threads)
    for p in procs:
        if late:
            p.kill()
        p.wait(10)
    errors = []
    for p in procs:
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.stderr is not None:
            p.stderr.close()
        if p.stdout is not None:
            p.stdout.close()
        if p.returncode != 0:
            errors.append(f"{p.args!r} -> exit {p.returncode}: {err}")
    assert not late, "nbdcopy did not finish in time"
    if check:
        assert not errors, "\n".join(errors)
    return results
