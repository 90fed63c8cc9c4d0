"""Hostile chunk streams (``icbd-bench abuse streams``, bench/adversary.py) against a real
``icbd-cache master`` while a real replica (``icbd-cache replica --once``) pulls a version
(issue 14). Adversaries run from addresses of 127.0.0.0/8 other than the replica's 127.0.0.1,
unless they play the replica's own earlier life.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from adversaries import Adversary, adversaries, throttled_counts
from conftest import BIN, free_port, stop_process, trusted, wait_port

from icbdcache.replication.streams import STALE_AFTER
from icbdcache.store.chunks import CHUNK_SIZE

CLI = str(BIN / "icbd-cache")
#: Seconds the log throttle needs to write what it held back (one interval, and a margin).
THROTTLE_FLUSH = 1.5
#: Seconds after which streams that stopped moving count as abandoned when their site
#: registers (streams.STALE_AFTER, and a margin).
STALE = STALE_AFTER + 1.0
__all__ = ["adversaries"]  # the fixture


@dataclass
class Master:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 12 MiB image of distinct random chunks (a stream of 4096 of its digests repeated is
    256 MiB: long enough to stall)."""
    import random

    path = tmp_path / "lab.img"
    path.write_bytes(random.Random(7).randbytes(12 * (1 << 20)))
    return path


@pytest.fixture
def master(tmp_path: Path, image: Path) -> Iterator[Callable[..., Master]]:
    """``master(*args)``: ``icbd-cache master`` over a store where ``image`` is lab@1."""
    store = tmp_path / "mstore"
    subprocess.run([CLI, *trusted(["publish", str(image), "--store", str(store), "--imi",
                                   "lab"])], check=True, capture_output=True, timeout=120)
    started: list[Master] = []

    def start(*args: str) -> Master:
        port = free_port()
        log = tmp_path / f"master-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([CLI, "master", "--store", str(store), "--listen",
                                     f"127.0.0.1:{port}", *args],
                                    stdout=out, stderr=subprocess.STDOUT)
        m = Master(proc, f"http://127.0.0.1:{port}", port, log)
        started.append(m)
        wait_port("127.0.0.1", port)
        return m

    yield start
    for m in started:
        stop_process(m.proc)


def replicate(m: Master, store: Path, *args: str, site: str = "s1",
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *trusted(["replica", "--store", str(store), "--master", m.url,
                                          "--site", site, "--subscribe", "lab", "--once",
                                          *args])],
                          capture_output=True, text=True, timeout=timeout)


def check_replicated(store: Path, image: Path) -> None:
    """Every chunk of ``image`` is in ``store`` (counted) and verifies against its digest."""
    distinct = {image.read_bytes()[i : i + CHUNK_SIZE]
                for i in range(0, image.stat().st_size, CHUNK_SIZE)}
    out = subprocess.run([CLI, "stats", "--store", str(store), "--json"], check=True,
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["replica_chunks"] == len(distinct)
    subprocess.run([CLI, "verify", "--store", str(store)], check=True, capture_output=True,
                   timeout=120)


def register(m: Master, site: str, source: str, token: str | None = None) -> int:
    """POST /v1/sites/SITE/register from ``source`` (a site coming back); the status."""
    import socket

    body = json.dumps({"address": "", "subscribe": []}).encode()
    head = [f"POST /v1/sites/{site}/register HTTP/1.1", "Host: x", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    with socket.create_connection(("127.0.0.1", m.port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    return int(raw.split(b" ", 2)[1])


def test_stalled_streams_do_not_starve_a_replica(
        master: Callable[..., Master], adversaries: Callable[..., Adversary],
        image: Path, tmp_path: Path) -> None:
    """Three addresses each open 10 chunk streams of 4096 digests and never read them (no
    token file: the default). Each address holds at most --address-streams (8; the other 2
    get 429), 12 of them run (the unreserved slots; 4 are kept for holders with none
    running), the rest wait; a replica from a fourth address pulls the whole version
    meanwhile through the reserved slots, and the stalled streams are cut once they fall
    behind --stream-min-rate after --stream-stall (the kernel's buffers count as read)."""
    m = master("--max-streams", "16", "--address-streams", "8", "--stream-stall", "2",
               "--stream-min-rate", "1M")
    adv = adversaries("streams", "--url", m.url, "--streams", "30", "--at", "read",
                      "--sources", "127.0.0.2+3", "--hold", "20")
    held = adv.holding()
    assert held["status"].get("429") == 6 and held["reached"] == 24, held
    assert held["waiting"] == 24 - 12, held
    site = tmp_path / "site"
    t0 = time.monotonic()
    r = replicate(m, site)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    check_replicated(site, image)
    print(f"replica pulled 12 MiB in {took:.1f} s beside 24 stalled streams")
    done = adv.done()
    assert done["alive"] == 0 and done["closed"] == 24, done  # cut, every one
    time.sleep(THROTTLE_FLUSH)
    log = m.log_text()
    assert throttled_counts(log, "why").get("stream limit") == 6, log[-2000:]
    assert log.count("event=chunks_cut") <= 20 + 2  # one line a second at most


def test_slow_readers_are_cut_and_readers_are_not(
        master: Callable[..., Master], adversaries: Callable[..., Adversary]) -> None:
    """Streams read at 2 KiB/s are cut (the deadline counts bytes read, and what the kernel
    holds for the client, up to a few MiB here, counts as read); streams read at 4 MiB/s,
    above --stream-min-rate, are not; a body that never finishes has its connection reset."""
    m = master("--stream-stall", "2", "--stream-min-rate", "1M")
    slow = adversaries("streams", "--url", m.url, "--streams", "3", "--at", "slow",
                       "--rate", "2K", "--sources", "127.0.0.2", "--hold", "14")
    ok = adversaries("streams", "--url", m.url, "--streams", "3", "--at", "slow",
                     "--rate", "4M", "--sources", "127.0.0.3", "--hold", "14")
    body = adversaries("streams", "--url", m.url, "--streams", "2", "--at", "body",
                       "--sources", "127.0.0.4", "--hold", "5")
    assert slow.holding()["reached"] == 3 and ok.holding()["reached"] == 3
    assert body.holding()["reached"] == 2
    s, o, b = slow.done(), ok.done(), body.done()
    assert s["alive"] == 0 and s["closed"] == 3, s
    assert o["alive"] == 3 and o["bytes_read"] > 3 * 20 * (1 << 20), o
    assert b["alive"] == 0, b  # reset
    time.sleep(THROTTLE_FLUSH)
    assert throttled_counts(m.log_text(), "why").get("no body in 2 s") == 2


def test_a_sites_abandoned_streams_are_released_when_it_comes_back(
        master: Callable[..., Master], adversaries: Callable[..., Adversary],
        image: Path, tmp_path: Path) -> None:
    """A replica's earlier life left 16 streams open from its address, naming its site (a
    replica that hung, or whose link went down): on main they counted against it and it got
    429 for every stream. Its registration now lets them go (they have not moved for
    streams.STALE_AFTER seconds), and it pulls the version; another site's streams from the
    same address stay."""
    m = master()
    old = adversaries("streams", "--url", m.url, "--streams", "14", "--at", "read",
                      "--site", "s1", "--sources", "127.0.0.1", "--hold", "30")
    other = adversaries("streams", "--url", m.url, "--streams", "2", "--at", "read",
                        "--site", "s2", "--sources", "127.0.0.1", "--hold", "30")
    assert old.holding()["reached"] == 14 and other.holding()["reached"] == 2
    time.sleep(STALE)  # they stopped moving: the earlier life is over
    site = tmp_path / "site"
    r = replicate(m, site, "--pull-parallel", "3")
    assert r.returncode == 0, r.stderr
    check_replicated(site, image)
    assert "event=site_back site=s1 streams_released=14" in m.log_text()
    o = old.stop()
    assert o["alive"] == 0, o
    assert other.stop()["alive"] == 2


def test_with_tokens_a_site_is_limited_and_released_by_its_token(
        master: Callable[..., Master], adversaries: Callable[..., Adversary],
        tmp_path: Path) -> None:
    """With a token file, streams count per site (whatever address they come from): a site's
    ninth is refused (429) while another site is served; the site registering releases its
    streams, and its new ones are accepted."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s1 tok-one\ns2 tok-two\n")
    m = master("--token-file", str(tokens))
    a = adversaries("streams", "--url", m.url, "--streams", "10", "--at", "read",
                    "--token", "tok-one", "--sources", "127.0.0.2+2", "--hold", "30")
    h = a.holding()
    assert h["reached"] == 8 and h["status"].get("429") == 2, h
    b = adversaries("streams", "--url", m.url, "--streams", "3", "--at", "read",
                    "--token", "tok-two", "--sources", "127.0.0.2", "--hold", "30")
    assert b.holding()["reached"] == 3
    time.sleep(STALE)
    assert register(m, "s1", "127.0.0.5", token="tok-one") == 200
    assert "event=site_back site=s1 streams_released=8" in m.log_text()
    again = adversaries("streams", "--url", m.url, "--streams", "8", "--at", "read",
                        "--token", "tok-one", "--sources", "127.0.0.6", "--hold", "1")
    assert again.holding()["reached"] == 8
    assert a.stop()["alive"] == 0
    assert b.stop()["alive"] == 3
    again.stop()


def test_the_adversary_runs_from_the_command_line(master: Callable[..., Master]) -> None:
    """``icbd-bench abuse streams`` with other numbers prints its holding and done lines."""
    m = master()
    p = subprocess.run([str(BIN / "icbd-bench"), "abuse", "streams", "--url", m.url,
                        "--streams", "2", "--digests", "16", "--at", "slow", "--rate", "64K",
                        "--hold", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [x["event"] for x in lines] == ["holding", "done"]
    assert lines[1]["reached"] == 2 and lines[1]["status"] == {"200": 2}
