"""The connection limits the workers of ``serve --workers N`` share
(icbdcache/sharedlimits.py): counted for the server across workers, a restarted worker's
row zeroed, and an admit lock held by a stopped process never stops another worker."""

from __future__ import annotations

import fcntl
import multiprocessing
import threading

from icbdcache.sharedlimits import SharedConnectionLimits, SharedCounts


def pair(**limits: int) -> tuple[SharedCounts, SharedConnectionLimits, SharedConnectionLimits]:
    table = SharedCounts(2, slots=256)
    # A fixed key, not the run's random one: two addresses that share a slot are counted
    # together (by design), which made the first test below fail once in about 60 runs.
    table.key = 7
    args = (limits.get("max", 8), limits.get("addr", 4), limits.get("hs", 3),
            limits.get("reserved", 0))
    return table, SharedConnectionLimits(table, 0, *args), SharedConnectionLimits(table, 1, *args)


def test_limits_hold_across_workers() -> None:
    table, w0, w1 = pair()
    used = ["10.0.0.1", *(f"10.0.1.{i}" for i in range(4)), "10.0.2.1"]
    assert len({table.slot(a) for a in used}) == len(used), "addresses share a slot"
    # one address: 3 handshakes in all, whichever worker took them
    assert [w0.admit("10.0.0.1"), w1.admit("10.0.0.1"), w0.admit("10.0.0.1")] == [None] * 3
    assert w1.admit("10.0.0.1") == "address handshake limit"
    w0.negotiated("10.0.0.1")
    assert w1.admit("10.0.0.1") is None  # 4 connections of the address in all
    w1.negotiated("10.0.0.1")
    assert w0.admit("10.0.0.1") == "address connection limit"
    # the server: 8 in all
    for i in range(4):
        assert (w0 if i % 2 else w1).admit(f"10.0.1.{i}") is None
    assert w0.admit("10.0.2.1") == "connection limit"
    w1.release("10.0.1.0", handshaking=True)
    assert w0.admit("10.0.2.1") is None


def test_a_worker_started_again_zeroes_its_row() -> None:
    table, w0, w1 = pair()
    for i in range(8):
        assert w1.admit(f"10.0.0.{i}") is None
    assert w0.admit("10.0.9.9") == "connection limit"
    # worker 1 died with its 8 connections; the one started in its place counts from 0
    SharedConnectionLimits(table, 1, 8, 4, 3, 0)
    assert w0.admit("10.0.9.9") is None


def _hold(fd: int, held: multiprocessing.synchronize.Event,
          release: multiprocessing.synchronize.Event) -> None:
    fcntl.lockf(fd, fcntl.LOCK_EX)
    held.set()
    release.wait(30)


def test_a_lock_held_by_a_stopped_worker_does_not_stop_the_others() -> None:
    """Another process holds the admit lock and does not let go (as one stopped by SIGSTOP
    would): an admit here returns (it blocked until that process went on)."""
    table, w0, _ = pair()
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(table.lock_fd, held, release))
    holder.start()
    try:
        assert held.wait(30)
        got: list[str | None] = []
        t = threading.Thread(target=lambda: got.append(w0.admit("10.0.0.1")))
        t.start()
        t.join(20)
        assert not t.is_alive() and got == [None]
    finally:
        release.set()
        holder.join(30)
