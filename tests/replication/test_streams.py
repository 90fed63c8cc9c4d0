"""The master's chunk stream slots on their own (icbdcache/replication/streams.py): limits
per holder, the reserved slots, which waiting stream goes next, abandoned and stale streams.
The same against a real master is in test_master_abuse.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from icbdcache.replication import streams as streams_mod
from icbdcache.replication.streams import Stream, StreamReleased, StreamSlots


class Conn:
    """A stand-in connection: alive until aborted."""

    def __init__(self) -> None:
        self.open = True

    def alive(self) -> bool:
        return self.open

    def abort(self) -> None:
        self.open = False


def enter(slots: StreamSlots, party: str, limit: int = 8, site: str | None = None,
          address: str = "10.0.0.1") -> tuple[Stream | None, Conn]:
    c = Conn()
    return slots.enter(party, limit, site, address, c.alive, c.abort), c


def test_a_holder_is_refused_beyond_its_limit_after_its_abandoned_ones_go() -> None:
    slots = StreamSlots(32)
    held = [enter(slots, "addr:a", limit=3) for _ in range(3)]
    assert all(s is not None for s, _ in held)
    assert enter(slots, "addr:a", limit=3)[0] is None
    assert enter(slots, "addr:b", limit=3)[0] is not None
    held[0][1].open = False  # its client went away
    assert enter(slots, "addr:a", limit=3)[0] is not None
    assert slots.held("addr:a") == 3


def test_reserved_slots_and_fewest_first() -> None:
    async def run() -> list[str]:
        slots = StreamSlots(8)  # 6 unreserved, 2 reserved
        order: list[str] = []

        async def stream(party: str) -> Stream:
            s, _ = enter(slots, party)
            assert s is not None
            await slots.run(s)
            order.append(party)
            return s

        hog = [await stream("addr:hog") for _ in range(6)]
        waiting = asyncio.ensure_future(stream("addr:hog"))  # the 7th waits
        await asyncio.sleep(0)
        assert slots.running == 6 and not waiting.done()
        first = await stream("addr:new")  # none running: a reserved slot, before the hog
        assert slots.running == 7
        second = asyncio.ensure_future(stream("addr:new"))
        await asyncio.sleep(0)
        assert not second.done()  # it runs one already
        slots.leave(hog[0])  # 6 running: still the reserve, and "new" runs one already
        await asyncio.sleep(0)
        assert not second.done() and not waiting.done()
        slots.leave(hog[1])  # a freed slot goes to the holder running fewest
        await asyncio.sleep(0)
        assert second.done() and not waiting.done()
        slots.leave(first)
        await asyncio.sleep(0)
        assert waiting.done()
        return order

    assert asyncio.run(run()) == ["addr:hog"] * 6 + ["addr:new", "addr:new", "addr:hog"]


def test_a_released_waiting_stream_raises() -> None:
    async def run() -> None:
        slots = StreamSlots(1)
        a, _ = enter(slots, "addr:a")
        b, conn = enter(slots, "site:s", site="s")
        assert a is not None and b is not None
        await slots.run(a)
        waiting = asyncio.ensure_future(slots.run(b))
        await asyncio.sleep(0)
        slots.release(b)
        with pytest.raises(StreamReleased):
            await waiting
        assert not conn.open and slots.held("site:s") == 0

    asyncio.run(run())


def test_site_back_releases_its_stale_streams_only(monkeypatch: pytest.MonkeyPatch) -> None:
    slots = StreamSlots(32)
    token_old, c1 = enter(slots, "site:s1", site="s1", address="10.0.0.9")
    named_old, c2 = enter(slots, "addr:10.0.0.1", site="s1", address="10.0.0.1")
    other, c3 = enter(slots, "addr:10.0.0.1", site="s2", address="10.0.0.1")
    elsewhere, c4 = enter(slots, "addr:10.0.0.2", site="s1", address="10.0.0.2")
    assert slots.site_back("s1", "10.0.0.1", by_token=False) == 0  # all moved just now
    later = time.monotonic() + streams_mod.STALE_AFTER + 1
    monkeypatch.setattr(streams_mod.time, "monotonic", lambda: later)
    fresh, c5 = enter(slots, "addr:10.0.0.1", site="s1", address="10.0.0.1")  # moving
    assert slots.site_back("s1", "10.0.0.1", by_token=False) == 1
    assert not c2.open and c5.open and c3.open and c4.open and c1.open
    assert slots.site_back("s1", "10.0.0.5", by_token=True) == 1  # its token's, anywhere
    assert not c1.open and c4.open
    assert {token_old, named_old, other, elsewhere, fresh} - {None}
