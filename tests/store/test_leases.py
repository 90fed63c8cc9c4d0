"""Fault leases between real processes (icbdcache/store/leases.py; docs/store.md, "Fault
leases"): a lease held by one process is refused to every other, whichever of the lease
files its key falls in; given back, or its holder killed, it is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from icbdcache.store.leases import LEASE_DIR, SHARDS, FaultLeases, _place

TAKE_ALL = """
import sys
from icbdcache.store.leases import FaultLeases
blob = open(sys.argv[2], "rb").read()
keys = [blob[i:i + 16] for i in range(0, len(blob), 16)]
leases = FaultLeases(sys.argv[1])
print(sum(leases.take(k) for k in keys))
"""

HOLD = """
import sys, time
from icbdcache.store.leases import FaultLeases
blob = open(sys.argv[2], "rb").read()
keys = [blob[i:i + 16] for i in range(0, len(blob), 16)]
leases = FaultLeases(sys.argv[1])
assert all(leases.take(k) for k in keys)
print("held", flush=True)
time.sleep(60)
"""


def taken_by_another_process(store: Path, keys_file: Path) -> int:
    out = subprocess.run([sys.executable, "-c", TAKE_ALL, str(store), str(keys_file)],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def test_a_held_lease_is_refused_to_another_process_in_every_file(tmp_path: Path) -> None:
    keys = [os.urandom(16) for _ in range(1000)]
    assert len({_place(k)[0] for k in keys}) == SHARDS  # the keys cover every file
    keys_file = tmp_path / "keys"
    keys_file.write_bytes(b"".join(keys))
    leases = FaultLeases(str(tmp_path))
    assert all(leases.take(k) for k in keys)
    assert all(leases.take(k) for k in keys[:10])  # held already by this process: True
    assert taken_by_another_process(tmp_path, keys_file) == 0
    for k in keys[:400]:
        leases.release(k)
    assert taken_by_another_process(tmp_path, keys_file) == 400
    assert len(os.listdir(tmp_path / LEASE_DIR)) == SHARDS
    leases.close()
    assert taken_by_another_process(tmp_path, keys_file) == 1000


def test_a_forked_child_is_another_owner(tmp_path: Path) -> None:
    """A child forked after the parent took leases must not share the parent's lock owner:
    with the parent's open files it would take every lease the parent holds."""
    leases = FaultLeases(str(tmp_path))
    key = b"k" * 16
    assert leases.take(key)
    pid = os.fork()
    if pid == 0:  # the same object, in the child
        code = 0 if not leases.take(key) and leases.take(b"other key 16 by") else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert leases.take(key)  # the child's exit did not take the parent's lease away
    leases.close()


def test_the_leases_of_a_killed_holder_are_free(tmp_path: Path) -> None:
    keys = [os.urandom(16) for _ in range(200)]
    keys_file = tmp_path / "keys"
    keys_file.write_bytes(b"".join(keys))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), str(keys_file)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert taken_by_another_process(tmp_path, keys_file) == 0
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert taken_by_another_process(tmp_path, keys_file) == 200
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
