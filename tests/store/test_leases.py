"""Fault leases between real processes (icbdcache/store/leases.py; docs/store.md, "Fault
leases"): a lease held by one process is refused to every other, whichever of the lease
files its key falls in; given back, or its holder killed, it is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icbdcache.store.leases import LEASE_DIR, LOOK_EVERY, SHARDS, FaultLeases, Grant, _place

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


# ---------------------------------------------------------------- faulting alone

FAULTER = """
import sys
from icbdcache.store.leases import FaultLeases
leases = FaultLeases(sys.argv[1])
for line in sys.stdin:
    verb, hexkey = line.split()
    key = bytes.fromhex(hexkey)
    if verb == "begin":
        print(leases.begin(key).name, flush=True)
    elif verb == "end":
        leases.end(key)
        print("ended", flush=True)
"""


class Faulter:
    """Another process that faults on a store: ``begin``/``end`` of keys on request."""

    def __init__(self, store: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAULTER, str(store)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, verb: str, key: bytes) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{verb} {key.hex()}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_a_newcomer_waits_for_the_faults_in_flight_of_a_process_alone(tmp_path: Path) -> None:
    """A process alone takes no leases; a newcomer's first fault waits (BUSY) until the faults
    the process has in flight end, and from then on every fault of both takes leases."""
    a, b = b"a" * 16, b"b" * 16
    leases = FaultLeases(str(tmp_path))
    assert leases.begin(a) is Grant.ALONE and leases.alone
    newcomer = Faulter(tmp_path)
    try:
        assert newcomer.ask("begin", b) == "BUSY"  # a key the first process is not fetching
        assert newcomer.ask("begin", b) == "BUSY"
        leases.end(a)
        assert not leases.alone
        assert newcomer.ask("begin", b) == "HELD"
        assert leases.begin(b) is Grant.BUSY  # the newcomer's lease
        assert leases.begin(a) is Grant.HELD and not leases.alone
        assert newcomer.ask("begin", a) == "BUSY"
        leases.end(a)
        assert newcomer.ask("begin", a) == "HELD"
    finally:
        newcomer.kill()
        leases.close()


def test_a_process_alone_that_sees_a_newcomer_takes_the_leases_of_its_faults(
        tmp_path: Path) -> None:
    """A process faulting alone finds the newcomer at its next look: the faults it has in
    flight take their leases and it stops faulting alone, so the newcomer goes on without
    waiting for them to end, and waits only for those very chunks."""
    a, b = b"a" * 16, b"b" * 16
    leases = FaultLeases(str(tmp_path))
    assert leases.begin(a) is Grant.ALONE
    newcomer = Faulter(tmp_path)
    try:
        assert newcomer.ask("begin", b) == "BUSY"
        time.sleep(LOOK_EVERY * 2)
        assert leases.begin(b"c" * 16) is Grant.HELD and not leases.alone
        assert newcomer.ask("begin", a) == "BUSY"  # in flight here, now under its lease
        assert newcomer.ask("begin", b) == "HELD"
        leases.end(a)  # its chunk committed: the lease is given back
        assert newcomer.ask("begin", a) == "HELD"
    finally:
        newcomer.kill()
        leases.close()


def test_a_killed_process_alone_holds_nobody_up(tmp_path: Path) -> None:
    """kill -9 of a process with faults in flight alone: the kernel drops its locks, and the
    others fault (alone, once it is gone)."""
    a = b"a" * 16
    first = Faulter(tmp_path)
    try:
        assert first.ask("begin", a) == "ALONE"
        leases = FaultLeases(str(tmp_path))
        assert leases.begin(a) is Grant.BUSY
        first.kill()
        assert leases.begin(a) is not Grant.BUSY
        leases.end(a)
        time.sleep(LOOK_EVERY * 2)  # (the next look at the others)
        assert leases.begin(a) is Grant.ALONE
        leases.close()
    finally:
        first.kill()


def test_two_processes_that_fault_never_fault_alone(tmp_path: Path) -> None:
    """Once two processes fault on a store, neither faults alone: every fault takes a
    lease, and one key's lease is the other's to wait for."""
    a = b"a" * 16
    other = Faulter(tmp_path)
    try:
        assert other.ask("begin", b"x" * 16) == "ALONE"
        other.ask("end", b"x" * 16)  # idle again: ALONE given up, still a faulter
        leases = FaultLeases(str(tmp_path))
        assert leases.begin(a) is Grant.HELD and not leases.alone
        time.sleep(LOOK_EVERY * 2)
        assert other.ask("begin", a) == "BUSY"
        leases.end(a)
        assert other.ask("begin", a) == "HELD"
        assert leases.begin(a) is Grant.BUSY
        leases.close()
    finally:
        other.kill()


LEARN = """
import sys
from icbdcache.store.leases import FaultLeases
leases = FaultLeases(sys.argv[1])
leases.watch()
leases.learned()
print(leases.learned_elsewhere())
"""


def test_map_entries_learned_by_another_process_are_counted(tmp_path: Path) -> None:
    """A process that learned map entries and exited leaves its count behind: another process
    watching since before sees it (and looks in the stored map even when faulting alone);
    its own commits of learned entries do not count as another's."""
    leases = FaultLeases(str(tmp_path))
    leases.watch()
    assert not leases.learned_elsewhere()
    leases.learned()
    leases.learned()
    assert not leases.learned_elsewhere()
    out = subprocess.run([sys.executable, "-c", LEARN, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"  # (its own count, in the other process)
    assert leases.learned_elsewhere()
    late = FaultLeases(str(tmp_path))  # watching from now on: all seen
    late.watch()
    assert not late.learned_elsewhere()
    late.close()
    leases.close()
    assert leases.learned_elsewhere()  # closed: nothing is known


def test_a_process_that_ends_its_covered_faults_last_gives_alone_up(tmp_path: Path) -> None:
    """Faults covered by leases when a newcomer came, ending after the process faulted alone
    again (the newcomer gone), give ALONE up with the last of them: an idle process never
    holds a later newcomer up (before, every fault of the next newcomer got EIO)."""
    k1, k2, k3 = b"1" * 16, b"2" * 16, b"3" * 16
    leases = FaultLeases(str(tmp_path))
    assert leases.begin(k1) is Grant.ALONE and leases.begin(k2) is Grant.ALONE
    newcomer = Faulter(tmp_path)
    try:
        assert newcomer.ask("begin", b"x" * 16) == "BUSY"
        assert not leases.look()  # k1 and k2 now under their leases
        assert newcomer.ask("begin", b"x" * 16) == "HELD"
    finally:
        newcomer.kill()
    time.sleep(LOOK_EVERY * 2)
    assert leases.begin(k3) is Grant.ALONE  # the newcomer is gone
    leases.end(k3)
    leases.end(k1)
    assert leases.in_flight and leases.alone
    leases.end(k2)
    assert not leases.in_flight and not leases.alone
    later = Faulter(tmp_path)
    try:
        assert later.ask("begin", b"y" * 16) == "HELD"  # not held up (BUSY)
    finally:
        later.kill()
        leases.close()


def test_a_stopped_process_alone_holds_a_newcomer_up_for_alone_wait_at_most(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process stopped (SIGSTOP) with faults in flight alone does not look: a newcomer
    waits ALONE_WAIT for it, then goes on with leases."""
    from icbdcache.store import leases as leases_module

    monkeypatch.setattr(leases_module, "ALONE_WAIT", 0.3)
    first = Faulter(tmp_path)
    try:
        assert first.ask("begin", b"a" * 16) == "ALONE"
        first.proc.send_signal(signal.SIGSTOP)
        leases = FaultLeases(str(tmp_path))
        assert leases.begin(b"b" * 16) is Grant.BUSY
        time.sleep(0.4)
        assert leases.begin(b"b" * 16) is Grant.HELD
        leases.close()
    finally:
        first.proc.send_signal(signal.SIGCONT)
        first.kill()


def test_a_truncated_or_garbled_active_file_is_no_crash(tmp_path: Path) -> None:
    """``active.lock`` truncated under a running process (or filled with garbage): the count
    of learned entries reads as changed (faults look in the stored map), counting again
    extends the file, and nothing dies (through a mapping, this was a SIGBUS)."""
    leases = FaultLeases(str(tmp_path))
    leases.watch()
    active = tmp_path / LEASE_DIR / "active.lock"
    active.write_bytes(b"")
    assert leases.learned_elsewhere()
    leases.learned()
    assert active.stat().st_size == 16
    active.write_bytes(os.urandom(100))
    assert leases.learned_elsewhere()
    assert leases.begin(b"a" * 16) is Grant.ALONE
    leases.end(b"a" * 16)
    leases.close()


def test_a_count_at_its_largest_wraps(tmp_path: Path) -> None:
    """A count of learned entries at 2**64 - 1 (a file tampered with) wraps to 0 on the next
    commit instead of failing it (it stopped the store's writer)."""
    leases = FaultLeases(str(tmp_path))
    leases.watch()
    active = tmp_path / LEASE_DIR / "active.lock"
    active.write_bytes(bytes(8) + b"\xff" * 8)
    leases.learned()
    assert active.read_bytes()[8:16] == bytes(8)
    leases.close()


def test_an_active_file_that_cannot_be_used_leaves_the_leases(tmp_path: Path) -> None:
    """``active.lock`` a folder: faults go on with leases (never alone) and still exclude
    each other across processes, instead of every cold read failing."""
    (tmp_path / LEASE_DIR / "active.lock").mkdir(parents=True)
    leases = FaultLeases(str(tmp_path))
    assert leases.begin(b"a" * 16) is Grant.HELD and not leases.alone
    other = Faulter(tmp_path)
    try:
        assert other.ask("begin", b"a" * 16) == "BUSY"
        assert other.ask("begin", b"b" * 16) == "HELD"
        leases.end(b"a" * 16)
        assert other.ask("begin", b"a" * 16) == "HELD"
    finally:
        other.kill()
        leases.close()
