"""The overlay layer: per-client copy-on-write for writable exports (``,cow``, ``--store-cow``).

Notes on the design
-------------------
* The layer below returns the same immutable bytes for every read (an iMI version never
  changes), so a block that a client has not written is read from below, always.
* The base image is never written. Each client identity gets its own overlay: a sparse,
  already-unlinked temporary file of the export's size plus a state byte per 4 KiB block:

  ======  =================================================================
  state   meaning
  ======  =================================================================
  BASE    never written by this client: read from the layer below
  DATA    written: read from the overlay file
  ZERO    zeroed (WRITE_ZEROES, or TRIM): reads as zeros, nothing stored
  ZALLOC  zeroed with NBD_CMD_FLAG_NO_HOLE: reads as zeros, reported allocated
  ======  =================================================================

* Writes go through ``pwrite`` (a full disk is an ENOSPC reply, never a SIGBUS); reads of
  overlay data come from a read-only mapping of the same file (the page cache makes them
  coherent).
* Overlays are volatile: a FLUSH is acknowledged at once, and nothing survives a restart of
  the server. That is the contract of a diskless workstation's scratch writes.

Identity and "boots anew" (see docs/serve.md)
---------------------------------------------
An overlay belongs to a client identity (the peer's IP address, or for a Unix socket the peer's
pid), not to a TCP connection: every connection from that address shares it, so the kernel's
nbd-client that reconnects (``-persist``) or opens several connections (``-C``) sees its own
writes. The overlay is dropped, and the client starts clean, when it *boots anew*, which is
decided in this order:

1. the export name carries a boot id (``NAME?boot=ID``, e.g. the workstation's
   ``/proc/sys/kernel/random/boot_id``) different from the one the overlay was made for; or
2. the identity has had no connection for ``linger`` seconds (default 120).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Awaitable, Callable

from icbdcache.layers.base import HOLE, Buffer, Client, Layer, ReadResult, WriteResult
from nbd.constants import StateFlag

BLOCK = 4096
BASE, DATA, ZERO, ZALLOC = 0, 1, 2, 3
_ZERO_BLOCKS = bytes(1 << 20)


class _Writable(Layer):
    """What a copy-on-write overlay answers: every write request is carried out here, so
    writes, flushes, trims and zeroes are offered whatever the layers below are. Reads are
    shared by every connection of a client in this process, so CAN_MULTI_CONN holds; CACHE
    and block status pass to the layers below."""

    def can_write(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return True


class CowOverlay(_Writable):
    """A copy-on-write layer over ``below`` for one client identity.

    ``directory`` holds the overlay file (created sparse and unlinked at once).
    Raises OSError if the file cannot be created.
    """

    def __init__(self, below: Layer, directory: str | None = None) -> None:
        super().__init__(below)
        self.below = below
        nblocks = (self.size + BLOCK - 1) // BLOCK
        self.state = bytearray(nblocks)
        self.touched = 0  # blocks not in BASE state; 0 means every read goes below
        self.users = 0  # connections using this overlay (kept by OverlayRegistry)
        fd, path = tempfile.mkstemp(prefix="icbd-cow-", dir=directory)
        os.unlink(path)
        self.fd = fd
        os.ftruncate(fd, self.size)
        self._map = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    # ------------------------------------------------------------------ reads

    def pread(self, offset: int, length: int) -> ReadResult:
        first = offset // BLOCK
        last = (offset + length - 1) // BLOCK + 1
        st = self.state
        if not self.touched or st.count(BASE, first, last) == last - first:
            return self.below.pread(offset, length)
        if st.count(DATA, first, last) == last - first:
            return [self.view[offset : offset + length]]
        slots: list[list[Buffer]] = []
        waiting: list[tuple[int, Awaitable[list[Buffer]]]] = []
        pos = offset
        end = offset + length
        b = first
        while pos < end:
            kind = st[b]
            run_end = b + 1
            while run_end < last and st[run_end] == kind:
                run_end += 1
            stop = min(end, run_end * BLOCK)
            n = stop - pos
            if kind == DATA:
                slots.append([self.view[pos:stop]])
            elif kind in (ZERO, ZALLOC):
                zeros: list[Buffer] = []
                while n > 0:
                    k = min(n, len(_ZERO_BLOCKS))
                    zeros.append(_ZERO_BLOCKS[:k])
                    n -= k
                slots.append(zeros)
            else:
                part = self.below.pread(pos, n)
                if isinstance(part, list):
                    slots.append(part)
                else:  # the layer below is faulting: finish this read when it has the bytes
                    waiting.append((len(slots), part))
                    slots.append([])
            pos = stop
            b = run_end
        if not waiting:
            return [buf for slot in slots for buf in slot]
        return self._pread_later(slots, waiting)

    @staticmethod
    async def _pread_later(slots: list[list[Buffer]],
                           waiting: list[tuple[int, Awaitable[list[Buffer]]]]) -> list[Buffer]:
        for slot, part in waiting:
            slots[slot] = await part
        return [buf for slot in slots for buf in slot]

    # ------------------------------------------------------------------ writes

    def _copy_up_source(self, block: int) -> bytes | Awaitable[list[Buffer]] | None:
        """What a partially written block must be filled with first: None if it is already
        overlay data, zeros, the bytes below, or an awaitable of them (a faulting layer)."""
        kind = self.state[block]
        if kind == DATA:
            return None
        start = block * BLOCK
        n = min(BLOCK, self.size - start)
        if kind in (ZERO, ZALLOC):
            return bytes(n)
        part = self.below.pread(start, n)
        if isinstance(part, list):
            return b"".join(bytes(p) for p in part)
        return part

    def _install(self, block: int, data: bytes) -> None:
        _pwrite_all(self.fd, data, block * BLOCK)
        self._set(block, block + 1, DATA)

    def _set(self, first: int, last: int, kind: int) -> None:
        st = self.state
        before = (last - first) - st.count(BASE, first, last)
        st[first:last] = bytes([kind]) * (last - first)
        after = 0 if kind == BASE else last - first
        self.touched += after - before

    def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> WriteResult:
        end = offset + len(data)
        first = offset // BLOCK
        last = (end - 1) // BLOCK
        partial = []
        if offset % BLOCK:
            partial.append(first)
        if end % BLOCK and end != self.size and last not in partial:
            partial.append(last)
        waiting: list[tuple[int, Awaitable[list[Buffer]]]] = []
        for block in partial:
            src = self._copy_up_source(block)
            if isinstance(src, bytes):
                self._install(block, src)
            elif src is not None:
                waiting.append((block, src))
        if waiting:
            return self._pwrite_later(offset, bytes(data), waiting)
        _pwrite_all(self.fd, data, offset)
        self._set(first, last + 1, DATA)
        return None

    async def _pwrite_later(self, offset: int, data: bytes,
                            waiting: list[tuple[int, Awaitable[list[Buffer]]]]) -> None:
        """Finish a write whose partial blocks needed bytes from a faulting layer below.
        Writes that overlap it while it waits may land in either order (NBD leaves the order
        of overlapping requests in flight undefined)."""
        for block, part in waiting:
            below = b"".join(bytes(p) for p in await part)
            kind = self.state[block]
            if kind == BASE:
                self._install(block, below)
            elif kind in (ZERO, ZALLOC):
                self._install(block, bytes(len(below)))
        _pwrite_all(self.fd, data, offset)
        self._set(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1, DATA)

    def zero(self, offset: int, length: int, no_hole: bool = False,
             fua: bool = False) -> WriteResult:
        end = offset + length
        first_full = (offset + BLOCK - 1) // BLOCK
        last_full = end // BLOCK if end != self.size else (end + BLOCK - 1) // BLOCK
        if first_full >= last_full:  # inside one block
            return self.pwrite(offset, bytes(length))
        edges: list[Awaitable[None]] = []
        head = first_full * BLOCK - offset
        if head and (w := self.pwrite(offset, bytes(head))) is not None:
            edges.append(w)
        tail_start = last_full * BLOCK
        if tail_start < end and (w := self.pwrite(tail_start, bytes(end - tail_start))):
            edges.append(w)
        self._set(first_full, last_full, ZALLOC if no_hole else ZERO)
        return _all(edges) if edges else None

    def trim(self, offset: int, length: int, fua: bool = False) -> WriteResult:
        # Trimmed contents are unspecified (NBD proto.md, NBD_CMD_TRIM): only whole blocks are
        # released, as zeros, so no byte outside the range changes.
        first_full = (offset + BLOCK - 1) // BLOCK
        last_full = (offset + length) // BLOCK
        if offset + length == self.size:
            last_full = (self.size + BLOCK - 1) // BLOCK
        if first_full < last_full:
            self._set(first_full, last_full, ZERO)
        return None

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        first = offset // BLOCK
        last = (offset + length - 1) // BLOCK + 1
        st = self.state
        if not self.touched or st.count(BASE, first, last) == last - first:
            return self.below.extents(offset, length)
        kind = st[first]
        run_end = first + 1
        while run_end < last and st[run_end] == kind:
            run_end += 1
        n = min(offset + length, run_end * BLOCK) - offset
        if kind == BASE:
            return self.below.extents(offset, n)
        flags = {ZERO: HOLE, ZALLOC: int(StateFlag.ZERO)}.get(kind, 0)
        return [(n, flags)]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


async def _all(waits: list[Awaitable[None]]) -> None:
    for w in waits:
        await w


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class OverlayRegistry:
    """The overlays of one export, by client identity, with their lifetimes.

    ``make`` builds a fresh overlay. ``linger`` is how long (seconds) an overlay outlives the
    last connection of its identity. Time is passed in by the caller (``now``, seconds on a
    monotonic clock), so this class is easy to test.
    """

    def __init__(self, make: Callable[[], CowOverlay], linger: float) -> None:
        self.make = make
        self.linger = linger
        self._entries: dict[str, _Entry] = {}

    def acquire(self, identity: str, boot_id: str | None, now: float) -> CowOverlay:
        """The overlay for a new connection of ``identity``; a fresh one if the client booted
        anew (another boot id, or no connection for ``linger`` seconds)."""
        e = self._entries.get(identity)
        if e is not None:
            stale = e.overlay.users == 0 and now - e.idle_since > self.linger
            rebooted = boot_id is not None and e.boot_id is not None and boot_id != e.boot_id
            if stale or rebooted:
                self._drop(identity)
                e = None
            elif boot_id is not None:
                e.boot_id = boot_id
        if e is None:
            e = _Entry(self.make(), boot_id)
            self._entries[identity] = e
        e.overlay.users += 1
        return e.overlay

    def release(self, identity: str, overlay: CowOverlay, now: float) -> None:
        """A connection of ``identity`` that used ``overlay`` closed. An overlay replaced
        meanwhile (its client rebooted) is closed with its last connection."""
        overlay.users = max(0, overlay.users - 1)
        e = self._entries.get(identity)
        if e is not None and e.overlay is overlay:
            if overlay.users == 0:
                e.idle_since = now
        elif overlay.users == 0:
            overlay.close()

    def expire(self, now: float) -> int:
        """Drop overlays idle for more than ``linger`` seconds; return how many."""
        old = [k for k, e in self._entries.items()
               if e.overlay.users == 0 and now - e.idle_since > self.linger]
        for k in old:
            self._drop(k)
        return len(old)

    def _drop(self, identity: str) -> None:
        e = self._entries.pop(identity)
        if e.overlay.users == 0:
            e.overlay.close()  # else closed by release() when its last connection ends

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        for e in self._entries.values():
            e.overlay.close()
        self._entries.clear()


class _Entry:
    __slots__ = ("boot_id", "idle_since", "overlay")

    def __init__(self, overlay: CowOverlay, boot_id: str | None) -> None:
        self.overlay = overlay
        self.boot_id = boot_id
        self.idle_since = 0.0


class OverlayLayer(_Writable):
    """The overlay layer of one export over ``next``: makes each client's
    :class:`CowOverlay` (its file in ``directory``) when a connection starts, and keeps it
    ``linger`` seconds after the client's last connection (:class:`OverlayRegistry`). Requests
    never reach this layer itself: every connection talks to its client's overlay."""

    def __init__(self, next: Layer, directory: str | None = None,
                 linger: float = 120.0) -> None:
        super().__init__(next)
        self.directory = directory
        below = next
        self.registry = OverlayRegistry(lambda: CowOverlay(below, directory), linger)

    def connect(self, client: Client) -> Layer:
        """The client's overlay (a fresh one if it boots anew). Raises OSError if an overlay
        file cannot be made."""
        assert self.next is not None
        self.next.connect(client)
        return self.registry.acquire(client.identity, client.options.get("boot"), client.now)

    def disconnect(self, client: Client, view: Layer) -> None:
        if isinstance(view, CowOverlay):
            self.registry.release(client.identity, view, client.now)
        assert self.next is not None
        self.next.disconnect(client, view)

    def expire(self, now: float) -> int:
        """Drop overlays idle for more than the linger; return how many."""
        return self.registry.expire(now)

    def close(self) -> None:
        self.registry.close()
