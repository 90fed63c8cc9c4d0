"""The bookkeeping behind the limits, on its own: connection counts per address and the
reserve (icbdcache/limits.py), the reply budget, log escaping and throttling
(icbdcache/log.py). The same limits against real processes are in test_abuse.py."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icbdcache.limits import RESERVE_SHARE, ConnectionLimits, ReplyBudget
from icbdcache.log import EventFormatter, Throttled, escape, kv

MiB = 1 << 20


def test_connections_per_address_and_in_the_handshake() -> None:
    lim = ConnectionLimits(100, per_address=3, per_address_handshake=2, reserved=0)
    assert lim.admit("a") is None and lim.admit("a") is None
    assert lim.admit("a") == "address handshake limit"
    lim.negotiated("a")
    assert lim.admit("a") is None  # one left the handshake
    assert lim.admit("a") == "address connection limit"
    assert lim.admit("b") is None
    lim.release("a", handshaking=True)
    lim.release("a", handshaking=False)
    assert lim.admit("a") is None
    assert lim.total == 3 and lim.by_address == {"a": 2, "b": 1}


def test_the_reserve_goes_to_addresses_holding_few() -> None:
    lim = ConnectionLimits(20, per_address=20, per_address_handshake=20, reserved=8)
    for _ in range(12):
        assert lim.admit("big") is None
    assert lim.admit("big") == "reserved for other addresses"  # 12 = 20 - 8
    for i in range(RESERVE_SHARE):
        assert lim.admit("small") is None, i
    assert lim.admit("small") == "reserved for other addresses"
    for _ in range(4):
        assert lim.admit("other") is None
    assert lim.admit("another") == "connection limit"
    lim.adopt("big")  # carried on from a predecessor: never refused
    assert lim.total == 21


def test_reserved_is_at_most_half() -> None:
    assert ConnectionLimits(7, 64, 16, 64).reserved == 3


def test_reply_budget_per_connection_address_and_server() -> None:
    b = ReplyBudget(total=100 * MiB, per_connection=10 * MiB, per_address=30 * MiB)
    assert b.fits(0, "a", 64 * MiB)  # a connection holding nothing takes one, whatever size
    b.charge("a", 8 * MiB)
    assert not b.fits(8 * MiB, "a", 4 * MiB)  # its connection's 10 MiB
    assert b.fits(0, "a", 4 * MiB)  # another connection of the same address
    b.charge("a", 20 * MiB)
    assert not b.fits(0, "a", 4 * MiB)  # the address's 30 MiB
    b.charge("b", 30 * MiB)
    b.charge("c", 17 * MiB)  # 75 MiB: the last quarter is reserved
    assert not b.fits(0, "c", 1 * MiB)  # c holds more than one connection's budget
    assert b.fits(0, "d", 10 * MiB)
    b.charge("d", 10 * MiB)
    b.charge("e", 10 * MiB)
    assert not b.fits(0, "f", 6 * MiB)  # 101 MiB: over the server's
    assert b.used == 95 * MiB


def test_reply_budget_tells_waiters_once_a_turn() -> None:
    class W:
        calls = 0

        def budget_freed(self) -> None:
            W.calls += 1

    async def run() -> int:
        b = ReplyBudget(10, 10, 10)
        w = W()
        b.charge("a", 10)
        b.wait(w)
        for _ in range(5):
            b.release("a", 2)
        await asyncio.sleep(0)
        b.done_waiting(w)
        b.charge("a", 1)
        b.release("a", 1)
        await asyncio.sleep(0)
        return W.calls

    assert asyncio.run(run()) == 1


def unescape(text: str) -> str:
    """The inverse of :func:`escape`."""
    out, i = [], 0
    simple = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        k = text[i + 1]
        if k in simple:
            out.append(simple[k])
            i += 2
        elif k == "x":
            out.append(chr(int(text[i + 2 : i + 4], 16)))
            i += 4
        else:
            assert k == "u"
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
    return "".join(out)


@given(st.text())
def test_escape_is_one_printable_line_and_reversible(text: str) -> None:
    out = escape(text)
    assert not any(c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in out)
    assert unescape(out) == text


def test_kv_escapes_every_value() -> None:
    line = kv(export="lab?x=\n2030 INFO forged=yes", error="a\x1b[2Jb", path="c:\\d")
    assert line == r'export="lab?x=\n2030 INFO forged=yes" error=a\x1b[2Jb path=c:\\d'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_both_log_formats_escape_network_values(fmt: str) -> None:
    """A name with a newline, an escape sequence, a C1 control and a line separator is one
    printable line in either format: text escapes, JSON escapes (lossless)."""
    name = "lab?x=\n2030 INFO forged=yes\x1b[2J\x85\u2028end"
    rec = logging.LogRecord("icbdcache.server", logging.INFO, __file__, 1,
                            kv(event="connect", export=name), None, None)
    out = EventFormatter(fmt).format(rec)
    assert "\n" not in out and "\x1b" not in out and "\x85" not in out
    assert "\u2028" not in out
    assert len(out.splitlines()) == 1
    if fmt == "json":  # JSON escapes, which a reader decodes back to the name
        assert json.loads(out)["export"] == name
        assert r"\u001b[2J\u0085\u2028end" in out
    else:
        want = escape(name)
        assert want == r"lab?x=\n2030 INFO forged=yes\x1b[2J\x85\u2028end"
        assert f'export="{want}"' in out


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Lines:
    h = Lines()
    lg = logging.getLogger("test.throttled")
    lg.handlers[:] = [h]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    return h


def test_throttled_one_line_an_interval_per_reason_with_counts(lines: Lines) -> None:
    async def run() -> None:
        t = Throttled(logging.getLogger("test.throttled"), interval=0.2)
        for i in range(50):
            t.warning(f"refused n={i}", "limit")
            t.warning(f"closed n={i}", "idle")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the held lines are written at the end of the interval

    asyncio.run(run())
    for what in ("refused", "closed"):
        mine = [x for x in lines.lines if x.startswith(what)]
        counted = sum(1 + int(x.rsplit("suppressed=", 1)[1]) if "suppressed=" in x else 1
                      for x in mine)
        assert counted == 50, mine
        assert 2 <= len(mine) <= 10, mine  # ~0.6 s of events in 0.2 s intervals
    assert lines.lines[-1].startswith(("refused n=49", "closed n=49"))


@given(st.lists(st.tuples(st.integers(0, 12 * MiB), st.sampled_from("abc"),
                          st.integers(1, 12 * MiB)), max_size=40))
def test_reply_budget_take_is_fits_then_charge(requests: list[tuple[int, str, int]]) -> None:
    """``take`` (the request path's one call) answers as ``fits`` and charges as ``charge``."""
    one = ReplyBudget(total=40 * MiB, per_connection=10 * MiB, per_address=25 * MiB)
    two = ReplyBudget(total=40 * MiB, per_connection=10 * MiB, per_address=25 * MiB)
    for used, address, cost in requests:
        fits = two.fits(used, address, cost)
        if fits:
            two.charge(address, cost)
        assert one.take(used, address, cost) == fits
        assert (one.used, one.by_address, one.peak) == (two.used, two.by_address, two.peak)
