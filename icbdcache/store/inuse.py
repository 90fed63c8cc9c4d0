"""A serving process's record of the clients that run each version (``inuse/PID`` in the
store's records; :mod:`icbdcache.store.owners` says what the record holds and how every other
process reads it).

The server notes each connection that starts and ends (:meth:`InUseTracker.attach`,
:meth:`InUseTracker.detach`, on the event loop; no I/O); :meth:`InUseTracker.snapshot` makes
the record and :meth:`InUseTracker.write` stores it (in a worker thread: a write transaction
may wait for another process's). The node does both at most once a second while something
changed, and once a minute anyway. At shutdown the record stays, its clients marked
disconnected now: a workstation that reconnects to the next server process within the linger
still runs its version.

A client is its address; its MAC is looked up in the host's ARP table (``/proc/net/arp``,
IPv4 neighbours on the same link) when it first connects, and left empty where unknown.
"""

from __future__ import annotations

import time

from icbdcache.store.lmdbstore import Store
from icbdcache.store.owners import IN_USE_LINGER, INUSE_PREFIX, ClientUse, Owner, use_record

#: Seconds a MAC looked up (or not found) is remembered.
MAC_TTL = 60.0


def arp_mac(address: str, table: str = "/proc/net/arp") -> str:
    """The MAC of IPv4 ``address`` in the host's ARP table, or ``""`` if unknown."""
    try:
        with open(table) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        # IP address, HW type, Flags, HW address, Mask, Device; flags 0x0: incomplete
        if len(parts) >= 4 and parts[0] == address and parts[2] != "0x0":
            mac = parts[3].lower()
            return "" if mac == "00:00:00:00:00:00" else mac
    return ""


class InUseTracker:
    """The clients of this process per version, for ``store``'s record ``inuse/PID``."""

    def __init__(self, store: Store, *, linger: float = IN_USE_LINGER) -> None:
        self.store = store
        self.linger = linger
        self.owner = Owner.me()
        self.key = f"{INUSE_PREFIX}{self.owner.pid}"
        self._uses: dict[tuple[str, str], ClientUse] = {}
        self._macs: dict[str, tuple[float, str]] = {}
        self.dirty = False
        self._written = False

    def _mac(self, address: str) -> str:
        now = time.monotonic()
        hit = self._macs.get(address)
        if hit is None or now - hit[0] > MAC_TTL:
            hit = self._macs[address] = (now, arp_mac(address))
        return hit[1]

    def attach(self, key: str, instance: str, address: str) -> None:
        """A connection of the client at ``address`` to version ``key`` started."""
        now = time.time()
        use = self._uses.get((key, address))
        if use is None:
            use = self._uses[(key, address)] = ClientUse(
                key, address, mac=self._mac(address), instance=instance, first=now)
        use.connections += 1
        use.last = now
        self.dirty = True

    def detach(self, key: str, address: str) -> None:
        """A connection of the client at ``address`` to version ``key`` ended."""
        use = self._uses.get((key, address))
        if use is not None:
            use.connections = max(0, use.connections - 1)
            use.last = time.time()
            self.dirty = True

    def clients(self) -> dict[str, list[ClientUse]]:
        """The clients of this process that run each version now."""
        now = time.time()
        out: dict[str, list[ClientUse]] = {}
        for use in self._uses.values():
            if use.running(now, self.linger):
                out.setdefault(use.version, []).append(use)
        return out

    def runs(self, key: str, address: str) -> bool:
        """Whether the client at ``address`` runs version ``key``: by this process's count,
        or by another serving process's record (one that ran before a restart)."""
        use = self._uses.get((key, address))
        if use is not None and use.running(time.time(), self.linger):
            return True
        return any(c.address == address for c in self.store.in_use().get(key, []))

    def snapshot(self, closing: bool = False) -> bytes | None:
        """The record to write now (None when there is nothing to say: no client ever, and
        no record written yet). Clients that no longer run anything are dropped; ``closing``
        marks every client disconnected now. Clears :attr:`dirty`."""
        now = time.time()
        for k, use in list(self._uses.items()):
            if closing and use.connections:
                use.connections, use.last = 0, now
            elif use.connections:
                use.last = now
            elif not use.running(now, self.linger):
                del self._uses[k]
        self.dirty = False
        if not self._uses and not self._written:
            return None
        return use_record(self.owner, self._uses.values(), now)

    def write(self, record: bytes | None) -> None:
        """Store ``record`` (from :meth:`snapshot`) as ``inuse/PID``. Raises StoreError."""
        if record is None:
            return
        self.store.put_record(self.key, record)
        self._written = True
