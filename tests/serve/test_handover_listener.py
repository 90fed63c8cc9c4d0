"""The hand-over listener of a running server (:class:`icbdcache.handover.Listener`): a
probe never makes it busy, and while a hand-over is under way a probe and a second
successor's hello get a refusal as the answer to their first frame (a successor once found
the socket closed: ``sending hello: Broken pipe`` when its hello came while the talk of its
own probe was still ending)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from icbdcache import handover


class Giver:
    """A server with nothing to hand over; the hand-over waits for the successor's ready."""

    def __init__(self) -> None:
        self.resumed = 0

    def refusal(self) -> str | None:
        return None

    def stop_accepting(self) -> list[tuple[str, int]]:
        return []

    async def resume_accepting(self, listeners: list[tuple[str, int]]) -> None:
        self.resumed += 1

    async def stop_services(self) -> None:
        pass

    async def start_services(self) -> None:
        pass

    def live(self) -> list[Any]:
        return []

    async def quiesce(self, conn: Any, deadline: float) -> handover.Outgoing | None:
        return None

    def sent(self, conn: Any) -> None:
        pass

    def resume(self, conn: Any) -> None:
        pass

    def finished(self) -> None:
        pass


def _talk(path: str, first: dict[str, Any], pause: float = 0.0) -> dict[str, Any]:
    """Connect, wait ``pause`` seconds, send ``first``, return the answer (blocking)."""
    chan = handover.connect(path)
    assert chan is not None
    try:
        time.sleep(pause)
        chan.send(first)
        msg, fds, _ = chan.recv()
        assert not fds
        return msg
    finally:
        chan.close()


def test_a_hello_right_after_a_probe_starts_the_hand_over(tmp_path: Path) -> None:
    path = str(tmp_path / "handover.sock")

    async def main() -> None:
        listener = handover.Listener(path, Giver(), grace=1.0, workers=2)
        listener.start()
        try:
            for _ in range(20):
                probe = await asyncio.to_thread(_talk, path, {"op": "probe"})
                assert probe == {"op": "probe", "workers": 2}
                hello = await asyncio.to_thread(_talk, path, {"op": "hello", "pid": 1})
                assert hello["op"] == "listeners"  # then the successor goes: rolled back
                for _ in range(200):
                    if not listener._busy:
                        break
                    await asyncio.sleep(0.01)
        finally:
            listener.close(unlink=True)

    asyncio.run(main())


def test_probe_and_second_successor_during_a_hand_over_get_answers(tmp_path: Path) -> None:
    path = str(tmp_path / "handover.sock")
    giver = Giver()

    async def main() -> None:
        listener = handover.Listener(path, giver, grace=1.0, workers=3)
        listener.start()
        try:
            first = handover.connect(path)
            assert first is not None
            await asyncio.to_thread(first.send, {"op": "hello", "pid": 1})
            msg, _, _ = await asyncio.to_thread(first.recv)
            assert msg["op"] == "listeners"  # the hand-over is under way, waiting for ready
            # a probe is refused meanwhile: a successor must not start beside this server
            probe = await asyncio.to_thread(_talk, path, {"op": "probe"})
            assert probe == {"op": "refuse", "reason": "a hand-over is under way"}
            # a hello that comes a while after its connection: the listener must wait for it
            second = await asyncio.to_thread(_talk, path, {"op": "hello", "pid": 2}, 0.3)
            assert second == {"op": "refuse", "reason": "a hand-over is under way"}
            first.close()  # the successor goes away: the hand-over rolls back
            for _ in range(200):
                if giver.resumed:
                    break
                await asyncio.sleep(0.01)
            assert giver.resumed == 1
            again = await asyncio.to_thread(_talk, path, {"op": "probe"})
            assert again == {"op": "probe", "workers": 3}
        finally:
            listener.close(unlink=True)

    asyncio.run(main())
