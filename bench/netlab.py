"""The network of ``icbd-bench bootstorm``: three shaped network namespaces, or loopback.

Notes on the design:

- Layout (:class:`NetnsLab`)::

      upstream ns                 site ns                      clients ns
      nbdkit file IMG  ──WAN──  10.201.1.2 | servers on  ──LAN──  10.201.2.2
      (+ delay relay)  10.201.1.1          | 10.201.2.1           replay clients

  Two veth pairs, private addresses that exist only inside the namespaces this module creates
  (traffic never leaves them; nothing is routed between the WAN and the LAN: clients only talk
  to the site, the site to the upstream). Namespace and veth names carry the bench's PID, so
  several benches can run at once.
- Rate: a ``tbf`` qdisc on each end of a link (both directions), burst at least 128 KiB so a
  GSO super-packet of the veth always fits, queue bounded at 50 ms.
- Delay: this kernel has no ``netem`` (checked: only tbf, htb, pfifo, bfifo), so the WAN's
  one-way delay is added by a TCP relay in the upstream namespace in front of the upstream
  server (``python -m bench.netlab relay``): every byte it forwards, either way, leaves
  ``delay`` seconds after it arrived, in order. A request therefore costs one round trip of
  2 x delay plus its transfer at the tbf rate, as over a real WAN; what is not modelled is TCP's
  own reaction to a long round trip (the relay's TCP connections see the veth's short one), so
  large windows are not needed to fill the link. The relay also counts the payload bytes it
  forwards each way.
- Without CAP_NET_ADMIN (or with ``--net loopback``) everything runs on 127.0.0.1
  (:class:`Loopback`): no rate shaping; the relay still adds the WAN delay when one is asked.
- Processes are put in a namespace with ``ip netns exec NS argv`` (it execs, so the PID we get
  is the server's own). Namespaces are removed (with their veths) by :meth:`NetnsLab.close`,
  which callers run in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icbdcache.commands import demostack

#: Where each role runs.
ROLES: tuple[str, ...] = ("upstream", "site", "clients")

#: Private /30 networks used inside the namespaces: WAN upstream end, WAN site end, LAN site
#: end, LAN clients end.
WAN_UPSTREAM, WAN_SITE = "10.201.1.1", "10.201.1.2"
LAN_SITE, LAN_CLIENTS = "10.201.2.1", "10.201.2.2"

#: Smallest tbf bucket, bytes: a 64 KiB GSO packet plus headers must fit.
MIN_BURST = 128 * 1024
#: Longest a packet may wait in a tbf queue (the queue's bound), seconds.
TBF_LATENCY_S = 0.05


class LabError(RuntimeError):
    """The namespaces could not be set up (no CAP_NET_ADMIN, no pyroute2, a kernel without
    veth or tbf...)."""


def parse_rate(text: str) -> int:
    """``100mbit``, ``1gbit``, ``500kbit``, ``100M`` (bits) or a number of bits/s -> bits/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|bps|b)?(/s)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a rate: {text!r} (e.g. 100mbit, 1gbit)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2)]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value


def parse_delay(text: str) -> float:
    """``10ms``, ``0.01s``, ``250us`` or a bare number of milliseconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|us|µs)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a delay: {text!r} (e.g. 10ms)")
    unit = {"ms": 1e-3, None: 1e-3, "s": 1.0, "us": 1e-6, "µs": 1e-6}[m.group(2)]
    return float(m.group(1)) * unit


def fmt_rate(bps: int | None) -> str:
    """A rate in bits/s for people: ``100 Mbit/s``; ``unshaped`` for None."""
    if bps is None:
        return "unshaped"
    for div, unit in ((10**9, "Gbit/s"), (10**6, "Mbit/s"), (10**3, "kbit/s")):
        if bps >= div:
            return f"{bps / div:g} {unit}"
    return f"{bps} bit/s"


@dataclass(frozen=True)
class Shaping:
    """What the links should look like: rates in bits/s (None: unshaped), one-way WAN delay
    in seconds."""

    wan_rate: int | None
    wan_delay: float
    lan_rate: int | None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (:func:`demostack.free_port`)."""
    return demostack.free_port(host=host)


class Network:
    """Where the bench's processes run and which addresses they use.

    ``upstream_host``: the address the upstream (or its delay relay) listens on and the site
    connects to; ``upstream_local``: where the upstream server listens when a relay sits in
    front of it; ``site_host``: where the servers under test listen and clients connect.
    """

    kind = "loopback"
    upstream_host = "127.0.0.1"
    upstream_local = "127.0.0.1"
    site_host = "127.0.0.1"

    def __init__(self, shaping: Shaping) -> None:
        self.shaping = shaping

    def argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` made to run in ``role``'s place (one of :data:`ROLES`)."""
        return list(cmd)

    def port(self, role: str) -> int:
        """A free TCP port for a listener in ``role``'s place."""
        return free_port()

    def wan_bytes(self) -> tuple[int, int] | None:
        """Bytes (to the site, from the site) that crossed the WAN link so far, headers
        included (None when there is no such link)."""
        return None

    @property
    def rates(self) -> tuple[int | None, int | None]:
        """The (WAN, LAN) rates in force, bits/s (None: unshaped)."""
        return None, None

    def describe(self) -> str:
        """One line for the report."""
        d = self.shaping.wan_delay
        delay = f"WAN delay {d * 1000:g} ms each way (relay)" if d else "no WAN delay"
        return f"loopback (127.0.0.1): no namespaces, no rate shaping; {delay}"

    def close(self) -> None:
        """Undo whatever was set up. Safe to call twice."""


class Loopback(Network):
    """Everything on 127.0.0.1 in the bench's own network namespace."""


class NetnsLab(Network):
    """Three namespaces joined by shaped veth pairs (see the module notes). Build with
    :meth:`create`; :meth:`close` removes everything."""

    kind = "netns"
    upstream_host = WAN_UPSTREAM
    site_host = LAN_SITE

    def __init__(self, shaping: Shaping, tag: str) -> None:
        super().__init__(shaping)
        self.tag = tag
        self.ns = {role: f"icbdbs{tag}-{role[:4]}" for role in ROLES}
        self.veth = {"wan_up": f"ib{tag}wu", "wan_site": f"ib{tag}ws",
                     "lan_site": f"ib{tag}ls", "lan_cli": f"ib{tag}lc"}
        self._created: list[str] = []
        self._ports = {role: 20000 for role in ROLES}
        self._owner = os.getpid()
        self._ip = shutil.which("ip") or "/usr/sbin/ip"

    @classmethod
    def create(cls, shaping: Shaping, tag: str | None = None) -> NetnsLab:
        """Make the namespaces, veths, addresses and qdiscs. Raises LabError (having removed
        whatever it made)."""
        lab = cls(shaping, tag or str(os.getpid()))
        try:
            lab._build()
        except Exception as e:
            lab.close()
            raise LabError(f"{type(e).__name__}: {e}") from e
        return lab

    def _build(self) -> None:
        from pyroute2 import IPRoute, NetNS, config, netns

        # pyroute2 forks a helper to work inside a namespace and stops it with SIGTERM: let
        # the helper die of it rather than run the caller's SIGTERM handler.
        config.disable_mp_signal = True

        for role in ROLES:
            netns.create(self.ns[role])
            self._created.append(self.ns[role])
        s = self.shaping
        # veth end -> (namespace role, address, egress rate in bits/s)
        ends = {"wan_up": ("upstream", WAN_UPSTREAM, s.wan_rate),
                "wan_site": ("site", WAN_SITE, s.wan_rate),
                "lan_site": ("site", LAN_SITE, s.lan_rate),
                "lan_cli": ("clients", LAN_CLIENTS, s.lan_rate)}
        with IPRoute() as ipr:
            for a, b in (("wan_up", "wan_site"), ("lan_site", "lan_cli")):
                ipr.link("add", ifname=self.veth[a], kind="veth", peer=self.veth[b])
                for end in (a, b):
                    idx = ipr.link_lookup(ifname=self.veth[end])[0]
                    ipr.link("set", index=idx, net_ns_fd=self.ns[ends[end][0]])
        for end, (role, addr, rate) in ends.items():
            with NetNS(self.ns[role]) as ns:
                idx = ns.link_lookup(ifname=self.veth[end])[0]
                ns.addr("add", index=idx, address=addr, prefixlen=30)
                ns.link("set", index=idx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                if rate is not None:
                    burst = max(MIN_BURST, rate // 8 // 250)
                    ns.tc("add", "tbf", idx, handle="1:", rate=f"{rate}bit", burst=burst,
                          latency=f"{int(TBF_LATENCY_S * 1000)}ms")

    def argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        """``ip netns exec NS cmd...`` for the namespace of ``role``."""
        return [self._ip, "netns", "exec", self.ns[role], *cmd]

    def port(self, role: str) -> int:
        """Ports in a fresh namespace are all free; a new one per listener all the same, so
        that no listener waits on the TIME_WAIT sockets of the one before."""
        self._ports[role] += 1
        return self._ports[role]

    def wan_bytes(self) -> tuple[int, int] | None:
        """Bytes received and sent by the site's end of the WAN veth (its IFLA_STATS64)."""
        from pyroute2 import NetNS, config

        config.disable_mp_signal = True
        with NetNS(self.ns["site"]) as ns:
            idx = ns.link_lookup(ifname=self.veth["wan_site"])[0]
            stats = ns.get_links(idx)[0].get_attr("IFLA_STATS64")
        return int(stats["rx_bytes"]), int(stats["tx_bytes"])

    @property
    def rates(self) -> tuple[int | None, int | None]:
        return self.shaping.wan_rate, self.shaping.lan_rate

    def describe(self) -> str:
        s = self.shaping
        return (f"network namespaces: upstream --WAN {fmt_rate(s.wan_rate)}, "
                f"{s.wan_delay * 1000:g} ms each way-- site --LAN {fmt_rate(s.lan_rate)}-- "
                f"clients (tbf rate on each veth end, delay by a TCP relay: no netem here)")

    def close(self) -> None:
        """Remove the namespaces (their veths go with them); only in the process that made
        them, never in a forked copy of it."""
        if not self._created or os.getpid() != self._owner:
            return
        try:
            from pyroute2 import netns
        except ImportError:
            return
        for name in reversed(self._created):
            with contextlib.suppress(Exception):
                netns.remove(name)
        self._created.clear()


def make_network(kind: str, shaping: Shaping) -> tuple[Network, str | None]:
    """The network for ``--net kind`` (``auto``, ``netns`` or ``loopback``) and, when ``auto``
    had to fall back to loopback, why. Raises LabError for ``netns`` that cannot be made."""
    if kind == "loopback":
        return Loopback(shaping), None
    wants_shaping = shaping.wan_rate is not None or shaping.lan_rate is not None
    if kind == "auto" and not wants_shaping:
        return Loopback(shaping), None
    try:
        return NetnsLab.create(shaping), None
    except LabError as e:
        if kind == "netns":
            raise
        return Loopback(shaping), str(e)


# --------------------------------------------------------------------------- the delay relay


@dataclass
class RelayStats:
    """Payload bytes forwarded: ``down`` upstream -> site, ``up`` site -> upstream;
    ``connections`` accepted."""

    down: int = 0
    up: int = 0
    connections: int = 0


#: Bytes a relay direction may hold before it stops reading (back-pressure).
RELAY_BUFFER = 4 << 20


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                stats: RelayStats, direction: str) -> None:
    """Forward ``reader`` to ``writer``, each piece ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    held = 0
    room = asyncio.Event()
    room.set()

    async def send() -> None:
        nonlocal held
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            held -= len(data)
            if held < RELAY_BUFFER // 2:
                room.set()
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = loop.create_task(send())
    try:
        while True:
            await room.wait()
            data = await reader.read(256 * 1024)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
            setattr(stats, direction, getattr(stats, direction) + len(data))
            held += len(data)
            if held > RELAY_BUFFER:
                room.clear()
        await sender
    finally:
        sender.cancel()


async def relay(listen: tuple[str, int], target: tuple[str, int], delay: float,
                stats_path: Path | None, interval: float = 0.1) -> None:
    """Accept on ``listen``, forward each connection to ``target`` with ``delay`` seconds
    added each way; write :class:`RelayStats` as JSON to ``stats_path`` every ``interval``
    seconds and on exit. Runs until cancelled."""
    stats = RelayStats()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            ur, uw = await asyncio.open_connection(*target, limit=1 << 20)
        except OSError:
            cw.close()
            return
        loop = asyncio.get_running_loop()
        pipes = [loop.create_task(_pipe(cr, uw, delay, stats, "up")),
                 loop.create_task(_pipe(ur, cw, delay, stats, "down"))]
        try:
            done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() for t in done):
                for t in pending:
                    t.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            for t in pipes:
                t.cancel()
            for w in (cw, uw):
                w.close()

    def dump() -> None:
        if stats_path is not None:
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(vars(stats)))
            tmp.replace(stats_path)

    server = await asyncio.start_server(handle, *listen, limit=1 << 20)
    try:
        while True:
            dump()
            await asyncio.sleep(interval)
    finally:
        server.close()
        dump()


def read_relay_stats(path: Path) -> RelayStats:
    """The counters a relay wrote (zeros if it has not written yet)."""
    try:
        return RelayStats(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return RelayStats()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.netlab relay --listen H:P --connect H:P --delay S [--stats F]``."""
    p = argparse.ArgumentParser(prog="python -m bench.netlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="TCP relay adding a one-way delay in each direction")
    r.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    r.add_argument("--connect", type=_hostport, required=True, metavar="HOST:PORT")
    r.add_argument("--delay", type=float, required=True, metavar="SECONDS",
                   help="added to each direction")
    r.add_argument("--stats", type=Path, help="write byte counters here (JSON)")
    args = p.parse_args(argv)
    from bench.replay import new_event_loop

    loop = new_event_loop()
    task = loop.create_task(relay(args.listen, args.connect, args.delay, args.stats))

    def stop(*_: Any) -> None:
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)
    loop.close()
    return 0


def wait_file(path: Path, timeout: float) -> bool:
    """True once ``path`` exists (polled every 20 ms for up to ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return False


if __name__ == "__main__":
    sys.exit(main())
