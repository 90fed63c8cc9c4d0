"""The overlay layer: per-client copy-on-write for writable exports (``,cow``, ``--store-cow``).

Notes on the design
-------------------
* The layer below returns the same immutable bytes for every read (an iMI version never
  changes), so a block that a client has not written is read from below, always.
* The base image is never written. Each client identity gets its own overlay: a sparse data
  file of the export's size plus a state byte per 4 KiB block, both in ``--cow-dir``
  (:mod:`~icbdcache.layers.cowfile` names the files and makes them durable):

  ======  =================================================================
  state   meaning
  ======  =================================================================
  BASE    never written by this client: read from the layer below
  DATA    written: read from the overlay's data file
  ZERO    zeroed (WRITE_ZEROES, or TRIM): reads as zeros; its space is freed
  ZALLOC  zeroed with NBD_CMD_FLAG_NO_HOLE: reads as zeros, its space allocated
  ======  =================================================================

* Writes go through ``pwrite`` (a full disk is an ENOSPC reply, never a SIGBUS); reads of
  overlay data come from a read-only mapping of the same file (the page cache makes them
  coherent).
* Durability: FLUSH, and FUA on a write, are answered only when every write completed before
  them is on disk (data, then map, then meta: :meth:`~icbdcache.layers.cowfile.OverlayFiles.sync`).
  The fsyncs run in a thread, one sync per overlay at a time; a FLUSH that arrives during a
  sync waits for the next one, which covers it. A sync that fails leaves the overlay
  *failed*: every later request gets EIO until the client boots anew (after a failed fsync
  the page cache no longer says what is on disk).
* WRITE_ZEROES and TRIM punch holes in the data file, so their space is free again; NO_HOLE
  allocates its range first (``posix_fallocate``), or fails with ENOSPC before anything
  changes. A per-client bound (``max_bytes``: DATA and ZALLOC blocks) keeps one client from
  filling ``--cow-dir`` for all: a write past it fails with ENOSPC.

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

Overlays outlive the server process: :class:`~icbdcache.layers.cowdir.CowDir` finds them
again after a restart (or a crash), and refuses a client whose overlay is gone (lost files, a
changed base) until it boots anew, rather than hand it the base's bytes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
from collections.abc import Awaitable
from concurrent.futures import Executor
from typing import Protocol

from icbdcache.layers.base import HOLE, Buffer, Client, Layer, ReadResult, WriteResult
from icbdcache.layers.cowfile import BLOCK, MAP_PAGE, OverlayFiles, punch
from icbdcache.log import kv
from nbd.constants import StateFlag

log = logging.getLogger("icbdcache.overlay")

BASE, DATA, ZERO, ZALLOC = 0, 1, 2, 3
_ZERO_BLOCKS = bytes(1 << 20)


class OverlayLost(OSError):
    """A client's overlay is gone (lost files, a changed base, or it expired while the same
    boot still runs): the client is refused until it boots anew. The message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class _Writable(Layer):
    """What a copy-on-write overlay answers: every write request is carried out here, so
    writes, flushes (durable), FUA, trims and zeroes are offered whatever the layers below
    are. Every connection of a client shares its overlay in this process, and a FLUSH syncs
    the whole overlay, so CAN_MULTI_CONN holds; CACHE and block status pass to the layers
    below."""

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
    """A copy-on-write layer over ``below`` for one client identity, kept in ``files``.

    ``state``: the block states of a recovered overlay (None: a new one, every block BASE).
    ``max_bytes``: the most its DATA and ZALLOC blocks may hold (0: no bound). ``pool`` runs
    the syncs (None: the event loop's default executor).
    """

    def __init__(self, below: Layer, files: OverlayFiles, *, state: bytearray | None = None,
                 max_bytes: int = 0, pool: Executor | None = None) -> None:
        super().__init__(below)
        self.below = below
        self.files = files
        self.fd = files.data_fd
        nblocks = (self.size + BLOCK - 1) // BLOCK
        self.state = state if state is not None else bytearray(nblocks)
        if len(self.state) != nblocks:
            raise ValueError(f"{len(self.state)} block states for {nblocks} blocks")
        st = self.state
        self.touched = nblocks - st.count(BASE)  # 0 means every read goes below
        self.allocated = st.count(DATA) + st.count(ZALLOC)  # blocks holding space
        self.max_blocks = max_bytes // BLOCK if max_bytes > 0 else 0
        self.pool = pool
        self.users = 0  # connections using this overlay (kept by the CowDir)
        #: Why every request fails with EIO (a sync failed), or None.
        self.failed: str | None = None
        self.write_gen = 0  # completed write-like requests
        self.synced_gen = 0  # the write_gen the last finished sync covered
        self._dirty_pages: set[int] = set()
        self._data_dirty = False
        self._extents_dirty = False
        self._syncing: asyncio.Future[None] | None = None
        self._close_pending = False
        self._closed = False
        self._map = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ) if self.size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    @property
    def allocated_bytes(self) -> int:
        """Bytes the overlay's DATA and ZALLOC blocks hold."""
        return self.allocated * BLOCK

    @property
    def syncing(self) -> bool:
        """A sync is running in a thread."""
        return self._syncing is not None

    def _usable(self) -> None:
        if self.failed is not None:
            raise OSError(errno.EIO, f"this client's overlay failed ({self.failed}); it "
                                     "works again when the client boots anew")

    # ------------------------------------------------------------------ reads

    def pread(self, offset: int, length: int) -> ReadResult:
        if self.failed is not None:
            self._usable()
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
        n = last - first
        before_touched = n - st.count(BASE, first, last)
        before_alloc = st.count(DATA, first, last) + st.count(ZALLOC, first, last)
        st[first:last] = bytes([kind]) * n
        self.touched += (0 if kind == BASE else n) - before_touched
        self.allocated += (n if kind in (DATA, ZALLOC) else 0) - before_alloc
        self._dirty_pages.update(range(first // MAP_PAGE, (last - 1) // MAP_PAGE + 1))

    def _reserve(self, first: int, last: int) -> None:
        """Refuse (ENOSPC) to allocate blocks ``first``..``last`` past the bound."""
        if not self.max_blocks:
            return
        st = self.state
        new = (last - first) - st.count(DATA, first, last) - st.count(ZALLOC, first, last)
        if new and self.allocated + new > self.max_blocks:
            raise OSError(errno.ENOSPC, f"this client's overlay may hold at most "
                                        f"{self.max_blocks * BLOCK} bytes (--cow-max)")

    def _wrote(self, extents: bool = False) -> None:
        self.write_gen += 1
        self._data_dirty = True
        self._extents_dirty = self._extents_dirty or extents

    def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> WriteResult:
        self._usable()
        end = offset + len(data)
        first = offset // BLOCK
        last = (end - 1) // BLOCK
        self._reserve(first, last + 1)
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
            return self._pwrite_later(offset, bytes(data), waiting, fua)
        _pwrite_all(self.fd, data, offset)
        self._set(first, last + 1, DATA)
        self._wrote()
        return self._durable() if fua else None

    async def _pwrite_later(self, offset: int, data: bytes,
                            waiting: list[tuple[int, Awaitable[list[Buffer]]]],
                            fua: bool) -> None:
        """Finish a write whose partial blocks needed bytes from a faulting layer below.
        Writes that overlap it while it waits may land in either order (NBD leaves the order
        of overlapping requests in flight undefined)."""
        for block, part in waiting:
            below = b"".join(bytes(p) for p in await part)
            self._usable()
            kind = self.state[block]
            if kind == BASE:
                self._install(block, below)
            elif kind in (ZERO, ZALLOC):
                self._install(block, bytes(len(below)))
        _pwrite_all(self.fd, data, offset)
        self._set(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1, DATA)
        self._wrote()
        if fua:
            await self._flush_to(self.write_gen)

    def zero(self, offset: int, length: int, no_hole: bool = False,
             fua: bool = False) -> WriteResult:
        self._usable()
        end = offset + length
        first_full = (offset + BLOCK - 1) // BLOCK
        last_full = end // BLOCK if end != self.size else (end + BLOCK - 1) // BLOCK
        if first_full >= last_full:  # inside one block
            return self.pwrite(offset, bytes(length), fua)
        start = first_full * BLOCK
        stop = min(last_full * BLOCK, self.size)
        if no_hole:
            # Allocate first, so that NO_HOLE fails up front when the space is not there.
            self._reserve(first_full, last_full)
            os.posix_fallocate(self.fd, start, stop - start)
        else:
            punch(self.fd, start, stop - start)
        edges: list[Awaitable[None]] = []
        head = start - offset
        if head and (w := self.pwrite(offset, bytes(head))) is not None:
            edges.append(w)
        if stop < end and (w := self.pwrite(stop, bytes(end - stop))) is not None:
            edges.append(w)
        self._set(first_full, last_full, ZALLOC if no_hole else ZERO)
        self._wrote(extents=True)
        if edges or fua:
            return self._finish(edges, fua)
        return None

    async def _finish(self, edges: list[Awaitable[None]], fua: bool) -> None:
        for w in edges:
            await w
        if fua:
            await self._flush_to(self.write_gen)

    def trim(self, offset: int, length: int, fua: bool = False) -> WriteResult:
        # Trimmed contents are unspecified (NBD proto.md, NBD_CMD_TRIM): only whole blocks are
        # released, as zeros, so no byte outside the range changes.
        self._usable()
        first_full = (offset + BLOCK - 1) // BLOCK
        last_full = (offset + length) // BLOCK
        if offset + length == self.size:
            last_full = (self.size + BLOCK - 1) // BLOCK
        if first_full < last_full:
            start = first_full * BLOCK
            punch(self.fd, start, min(last_full * BLOCK, self.size) - start)
            self._set(first_full, last_full, ZERO)
            self._wrote(extents=True)
        return self._durable() if fua else None

    # ------------------------------------------------------------------ durability

    def flush(self) -> WriteResult:
        """Every write completed before this call durable: None when it already is, else an
        awaitable that completes when it is. Raises OSError (EIO) on a failed overlay."""
        self._usable()
        if self.synced_gen >= self.write_gen:
            return None
        return self._durable()

    def _durable(self) -> Awaitable[None]:
        """An awaitable that completes when every write completed so far is durable: the
        sync started now when none runs (a plain future, no task), else a wait for the
        running one and then for another."""
        if self._syncing is None:
            return self._start_sync()
        return self._flush_to(self.write_gen)

    async def _flush_to(self, target: int) -> None:
        while self.synced_gen < target:
            self._usable()
            await (self._syncing or self._start_sync())

    def _start_sync(self) -> asyncio.Future[None]:
        """Sync what was written so far in the pool; the future completes after it."""
        gen = self.write_gen
        pages = {p: bytes(self.state[p * MAP_PAGE : (p + 1) * MAP_PAGE])
                 for p in self._dirty_pages}
        self._dirty_pages = set()
        data, full = self._data_dirty, self._extents_dirty
        self._data_dirty = self._extents_dirty = False
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        work = loop.run_in_executor(self.pool, self.files.sync, data, full, pages)

        def finished(f: asyncio.Future[None]) -> None:
            self._syncing = None
            exc = f.exception()
            if exc is None:
                self.synced_gen = max(self.synced_gen, gen)
                done.set_result(None)
            else:
                self.failed = f"sync of {self.files.key} failed: {exc}"
                log.error(kv(overlay=self.files.key, export=self.files.meta.export,
                             client=self.files.meta.identity, error=exc, state="failed"))
                done.set_exception(OSError(errno.EIO, self.failed))
            if self._close_pending:
                self._close_now()

        work.add_done_callback(finished)
        self._syncing = done
        return done

    def sync_now(self) -> None:
        """Sync in this thread: at shutdown, once the sync pool is drained (a sync the event
        loop has not seen finish yet is over). Raises OSError."""
        if self.failed is not None or self._closed:
            return
        pages = {p: bytes(self.state[p * MAP_PAGE : (p + 1) * MAP_PAGE])
                 for p in self._dirty_pages}
        self._dirty_pages = set()
        gen = self.write_gen
        self.files.sync(self._data_dirty, self._extents_dirty, pages)
        self._data_dirty = self._extents_dirty = False
        self.synced_gen = gen

    # ------------------------------------------------------------------ block status

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

    def close(self, now: bool = False) -> None:
        """Close the files, after the sync in flight if any (``now``: at once, the sync pool
        being drained). The files stay on disk: the CowDir removes them when the overlay is
        dropped."""
        if self._syncing is not None and not now:
            self._close_pending = True
            return
        self._close_now()

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            self.files.close()


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Overlays(Protocol):
    """Where an :class:`OverlayLayer` gets its clients' overlays: the server's ``--cow-dir``
    (:class:`~icbdcache.layers.cowdir.CowDir`), which keeps them across restarts."""

    def attach(self, layer: OverlayLayer) -> None:
        """``layer`` serves its export now: recovered overlays of that export are checked
        against its base and opened."""

    def check(self, layer: OverlayLayer, client: Client) -> None:
        """Raise :class:`OverlayLost` if ``client`` would be refused."""

    def acquire(self, layer: OverlayLayer, client: Client) -> CowOverlay:
        """The overlay of a new connection of ``client``. Raises OverlayLost, or OSError when
        a new overlay cannot be made."""

    def release(self, layer: OverlayLayer, client: Client, overlay: CowOverlay) -> None:
        """A connection of ``client`` that used ``overlay`` ended."""


class OverlayLayer(_Writable):
    """The overlay layer of export ``export`` over ``next``: each connection talks to its
    client's :class:`CowOverlay`, which ``overlays`` makes, keeps and recovers. ``base``
    identifies the bytes below (an overlay made over other bytes is lost, never reused).
    Requests never reach this layer itself."""

    def __init__(self, next: Layer, overlays: Overlays, export: str, base: str) -> None:
        super().__init__(next)
        self.overlays = overlays
        self.export = export
        self.base = base
        overlays.attach(self)

    def check(self, client: Client) -> None:
        """Raise :class:`OverlayLost` if ``client`` would be refused (its overlay is gone)."""
        self.overlays.check(self, client)

    def connect(self, client: Client) -> Layer:
        """The client's overlay (a fresh one if it boots anew). Raises OverlayLost, or OSError
        if an overlay file cannot be made."""
        assert self.next is not None
        view = self.overlays.acquire(self, client)
        self.next.connect(client)
        return view

    def disconnect(self, client: Client, view: Layer) -> None:
        if isinstance(view, CowOverlay):
            self.overlays.release(self, client, view)
        assert self.next is not None
        self.next.disconnect(client, view)
