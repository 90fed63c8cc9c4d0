"""``--cow-dir``: every client's copy-on-write overlay of one server, kept across restarts.

Notes on the design
-------------------
* One directory per server, locked (``flock`` on ``icbd-cow.lock``) while the server runs, so
  two servers never share overlays. Its default is named after the server's listen addresses
  (:func:`default_cow_dir`): a server restarted on the same addresses finds its overlays again.
* Overlays are keyed by (export name, client identity) and kept in files
  (:mod:`~icbdcache.layers.cowfile`). At start the directory is read: a live overlay on which a
  FLUSH completed is recovered, and its linger starts then; one that never had a FLUSH is
  removed (nothing of it was promised); a recovered overlay whose files are damaged, or whose
  base changed (checked when its export is opened), becomes a *tombstone*.
* A tombstone keeps a client from getting the base's bytes in place of its own: its
  connections are refused at the handshake until it boots anew. Every entry is in one of these
  states, with what a new connection of its identity (boot id ``B``, maybe none) gets:

  =========  =====================================================  =========================
  entry      when                                                   a connection gets
  =========  =====================================================  =========================
  live       made, or recovered                                     the overlay; a new ``B``
                                                                    (another than the
                                                                    overlay's) gets a fresh
                                                                    one and the old is removed
  lost       its files were damaged or missing, or its base         refused, unless ``B`` and
             changed                                                the lost boot id are both
                                                                    known and differ
  expired    a live overlay with a boot id that had no connection   refused if ``B`` is that
             for the linger                                         boot id, else a fresh one
  =========  =====================================================  =========================

  A live overlay without a boot id that had no connection for the linger is removed: its
  client boots anew (docs/serve.md). A tombstone is forgotten once its identity has made no
  attempt for the linger (a refused attempt counts), or a new boot id replaces it.
* The linger is counted on the monotonic clock from the last connection's end, or from the
  server's start for what it recovered. Times are passed in (``now``), so this is testable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from icbdcache.layers.base import Client
from icbdcache.layers.cowfile import (
    EXPIRED,
    LIVE,
    LOST,
    OverlayDamaged,
    OverlayFiles,
    OverlayMeta,
    overlay_key,
    read_meta,
    remove,
    write_tombstone,
)
from icbdcache.layers.overlay import CowOverlay, OverlayLayer, OverlayLost
from icbdcache.log import kv

log = logging.getLogger("icbdcache.overlay")

LOCK_NAME = "icbd-cow.lock"


#: The file in ``--cow-dir`` that says how many workers laid its overlays out.
LAYOUT_NAME = "icbd-cow.workers"


def _holds_overlays(path: str) -> bool:
    """Whether directory ``path`` holds overlay or tombstone records (``ov-*.meta``)."""
    try:
        return any(n.startswith("ov-") and n.endswith(".meta") for n in os.listdir(path))
    except OSError:
        return False


def write_layout(path: str, workers: int) -> None:
    """Record in ``path`` (made if missing) that ``workers`` processes keep its overlays
    (``--workers 1``: in ``path``; N > 1: worker I in ``path/worker-I``)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    tmp = os.path.join(path, f".{LAYOUT_NAME}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{workers}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, LAYOUT_NAME))


#: Seconds a server waits for the lock of a ``--cow-dir`` held by another process: one killed
#: just now (a restart after a crash, the workers of a killed server) lets go within them.
LOCK_WAIT = 5.0


def lock_soon(fd: int, wait: float = LOCK_WAIT) -> None:
    """``flock(fd, LOCK_EX)``, trying for at most ``wait`` seconds. Raises OSError (EWOULDBLOCK)
    when it is still held then."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def kept_by(path: str) -> int | None:
    """The number of workers that kept the overlays (or tombstones) ``path`` holds: None when
    it holds none, 0 when that number is unknown (no layout record)."""
    if not os.path.isdir(path):
        return None
    by_workers = [n for n in os.listdir(path)
                  if n.startswith("worker-") and _holds_overlays(os.path.join(path, n))]
    if not by_workers and not _holds_overlays(path):
        return None
    try:
        with open(os.path.join(path, LAYOUT_NAME)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 if not by_workers else 0


def check_layout(path: str, workers: int) -> None:
    """Raise ValueError when ``path`` holds overlays (or tombstones) kept by another number of
    workers than ``workers``: a client would be steered where its overlay is not, and be
    given the base's bytes in place of its own (docs/serve.md, --workers)."""
    made = kept_by(path)
    if made is None or made == workers:
        return
    was = f"--workers {made}" if made else "another --workers"
    raise ValueError(
        f"--cow-dir {path} holds overlays kept by {was}: with --workers {workers} their "
        f"clients would reach a worker without them. Start with {was}, or, to let every "
        "client boot anew on the clean image, move the directory's contents away")


def default_cow_dir(addresses: Sequence[str]) -> str:
    """The ``--cow-dir`` of a server listening on ``addresses`` (``HOST:PORT`` or a Unix
    socket path) when none is given: ``$TMPDIR/icbd-cow-UID-HASH``, the same for the same
    addresses, so a restarted server finds its clients' overlays."""
    digest = hashlib.sha256("\n".join(sorted(addresses)).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"icbd-cow-{os.getuid()}-{digest}")


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (``ext4``, ``tmpfs``, ...), from
    /proc/self/mounts; ``?`` when unknown."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class _Entry:
    """One (export, identity): a live overlay (opened when its export is, ``overlay``) or a
    tombstone (``meta.state`` lost or expired)."""

    __slots__ = ("export", "identity", "idle_since", "key", "meta", "overlay")

    def __init__(self, meta: OverlayMeta, idle_since: float) -> None:
        self.export = meta.export
        self.identity = meta.identity
        self.key = overlay_key(meta.export, meta.identity)
        self.meta = meta
        self.overlay: CowOverlay | None = None
        self.idle_since = idle_since

    @property
    def users(self) -> int:
        return self.overlay.users if self.overlay is not None else 0


class CowDir:
    """The overlays of a server in ``path`` (see the module notes).

    ``linger``: seconds an overlay (or a tombstone) outlives its identity's last connection.
    ``max_bytes``: the most one overlay may hold (0: no bound; None: a quarter of the file
    system holding ``path``, measured when opened). Call :meth:`open` before use.
    """

    def __init__(self, path: str, *, linger: float = 120.0, max_bytes: int | None = None,
                 sync_threads: int = 4) -> None:
        self.path = path
        self.linger = linger
        self.max_bytes = max_bytes
        self._threads = sync_threads
        self.pool = ThreadPoolExecutor(sync_threads, thread_name_prefix="icbd-cow-sync")
        self._pool_closed = False
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock_fd = -1

    # ------------------------------------------------------------------ start and stop

    def open(self, now: float) -> None:
        """Lock the directory (made if missing, mode 0700) and read what a previous run left
        (``now``: monotonic seconds, when recovered lingers start). Raises OSError: the
        directory cannot be made, or another server holds it."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if self._pool_closed:
            self.pool = ThreadPoolExecutor(self._threads, thread_name_prefix="icbd-cow-sync")
            self._pool_closed = False
        fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            lock_soon(fd)
        except OSError:
            os.close(fd)
            raise OSError(f"--cow-dir {self.path} is in use by another icbd-cache server") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        if self.max_bytes is None:
            st = os.statvfs(self.path)
            self.max_bytes = st.f_blocks * st.f_frsize // 4
        kind = fs_type(self.path)
        if kind in ("tmpfs", "ramfs"):
            log.warning(kv(cow_dir=self.path, fs=kind, durable="process crash only",
                           note="overlays here do not survive a reboot of this host"))
        self._recover(now)

    @staticmethod
    def check_free(path: str) -> None:
        """Raise OSError if a running server holds ``path`` (checked at startup)."""
        lock = os.path.join(path, LOCK_NAME)
        if not os.path.exists(lock):
            return
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            lock_soon(fd)
        except OSError:
            raise OSError(f"--cow-dir {path} is in use by another icbd-cache server") from None
        finally:
            os.close(fd)

    def _recover(self, now: float) -> None:
        metas: set[str] = set()
        recovered = lost = dropped = 0
        for name in sorted(os.listdir(self.path)):
            if not (name.startswith("ov-") and name.endswith(".meta")):
                continue
            key = name[3:-5]
            metas.add(key)
            try:
                meta = read_meta(os.path.join(self.path, name))
            except OverlayDamaged as err:
                # No valid slot: a crash tore the only write of an overlay never flushed (a
                # flushed one always has its previous slot whole).
                log.warning(kv(cow_dir=self.path, file=name, error=err, removed="never flushed"))
                remove(self.path, key)
                continue
            except OSError as err:
                # Whose it is cannot be known: left for a person to look at, never served.
                log.error(kv(cow_dir=self.path, file=name, error=err, kept="unread"))
                continue
            if overlay_key(meta.export, meta.identity) != key:
                log.error(kv(cow_dir=self.path, file=name, error="name does not match its "
                             "export and identity", kept="unread"))
                continue
            e = _Entry(meta, now)
            if meta.state == LIVE and not meta.flushed:
                remove(self.path, key)  # never flushed: nothing was promised
                dropped += 1
                continue
            if meta.state == LIVE:
                try:
                    OverlayFiles.open(self.path, key, meta).close()
                    recovered += 1
                except OverlayDamaged as err:
                    self._bury(e, LOST, str(err))
                    lost += 1
            self._entries[(e.export, e.identity)] = e
        for name in os.listdir(self.path):  # data or map files without a meta: leftovers
            stem, _, ext = name.rpartition(".")
            if name.startswith("ov-") and ext in ("data", "map", "tmp") and \
                    stem[3:] not in metas:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
        if recovered or lost or dropped or self._entries:
            log.info(kv(cow_dir=self.path, recovered=recovered, lost=lost,
                        never_flushed=dropped,
                        tombstones=sum(e.meta.state != LIVE for e in self._entries.values())))

    def close(self) -> None:
        """Sync every overlay (so a clean restart loses nothing), close the files, unlock.
        :meth:`open` may follow (a hand-over rolled back)."""
        self.pool.shutdown(wait=True)
        self._pool_closed = True
        for e in self._entries.values():
            if e.overlay is not None:
                try:
                    e.overlay.sync_now()
                except OSError as err:
                    log.error(kv(overlay=e.key, export=e.export, client=e.identity,
                                 error=err, at="shutdown sync"))
                e.overlay.close(now=True)
        self._entries.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ exports

    def attach(self, layer: OverlayLayer) -> None:
        """``layer`` serves export ``layer.export`` now: its recovered overlays made over the
        same base (and size) are opened, the others become tombstones."""
        for e in list(self._entries.values()):
            if e.export != layer.export or e.meta.state != LIVE:
                continue
            if e.overlay is None:
                self._open(e, layer)
            elif e.meta.base != layer.base:  # the export was made anew over other bytes
                self._bury(e, LOST, f"its base changed: made over {e.meta.base}, now "
                                    f"{layer.base}")

    def _open(self, e: _Entry, layer: OverlayLayer) -> bool:
        if e.meta.base != layer.base or e.meta.size != layer.size:
            self._bury(e, LOST, f"its base changed: made over {e.meta.base} of "
                                f"{e.meta.size} bytes, now {layer.base} of {layer.size}")
            return False
        try:
            files = OverlayFiles.open(self.path, e.key, e.meta)
        except OverlayDamaged as err:
            self._bury(e, LOST, str(err))
            return False
        try:
            state = files.load_map()
            e.overlay = CowOverlay(layer.next or layer, files, state=state,
                                   max_bytes=self.max_bytes or 0, pool=self.pool)
        except (OverlayDamaged, OSError, ValueError) as err:
            files.close()
            self._bury(e, LOST, str(err))
            return False
        log.info(kv(export=e.export, client=e.identity, overlay=e.key, recovered="yes",
                    bytes=e.overlay.allocated_bytes))
        return True

    def _bury(self, e: _Entry, state: str, reason: str) -> None:
        """Make ``e`` a tombstone (durable before its data goes)."""
        if e.overlay is not None:
            e.overlay.files.detach()
            if e.overlay.users == 0:
                e.overlay.close()
        e.overlay = None
        e.meta = dataclasses.replace(e.meta)  # no longer the detached overlay's
        e.meta.state = state
        e.meta.reason = reason
        try:
            write_tombstone(self.path, e.key, e.meta)
        except OSError as err:
            log.error(kv(overlay=e.key, export=e.export, client=e.identity, error=err,
                         at="writing its tombstone"))
        log.warning(kv(export=e.export, client=e.identity, overlay=e.key, state=state,
                       boot=e.meta.boot or "-", reason=reason))

    # ------------------------------------------------------------------ connections

    def _verdict(self, e: _Entry | None, boot: str | None, now: float) -> str:
        """What a connection with boot id ``boot`` gets from entry ``e``: ``join``,
        ``fresh`` (a new overlay, after dropping ``e``), ``expire`` (``e`` expires first,
        then ``fresh``) or ``refuse``."""
        if e is None:
            return "fresh"
        known = e.meta.boot
        if e.meta.state == LIVE:
            if boot and known and boot != known:
                return "fresh"
            stale = e.users == 0 and now - e.idle_since > self.linger
            if stale and not (known and boot == known):  # the same boot keeps what is left
                return "expire"
            return "join"
        if e.meta.state == EXPIRED:
            return "refuse" if boot == known else "fresh"
        return "fresh" if boot and known and boot != known else "refuse"

    def _refusal(self, e: _Entry, boot: str | None) -> OverlayLost:
        if e.meta.state == EXPIRED:
            why = f"expired after {self.linger:g} s without a connection"
        else:
            why = f"was lost ({e.meta.reason})"
        until = ("boot anew with a new ?boot= id" if boot else
                 f"boot anew: a new ?boot= id, or no connection for {self.linger:g} s")
        return OverlayLost(f"the copy-on-write overlay of {e.identity} on export {e.export}"
                           f"{f' (boot {e.meta.boot})' if e.meta.boot else ''} {why}; "
                           f"refused until the client boots anew ({until})")

    def check(self, layer: OverlayLayer, client: Client) -> None:
        """Raise OverlayLost if a connection of ``client`` to ``layer``'s export would be
        refused (a refused attempt restarts a tombstone's linger)."""
        e = self._entries.get((layer.export, client.identity))
        boot = client.options.get("boot") or None
        if self._verdict(e, boot, client.now) == "refuse":
            assert e is not None
            e.idle_since = client.now
            raise self._refusal(e, boot)

    def acquire(self, layer: OverlayLayer, client: Client) -> CowOverlay:
        """The overlay of a new connection of ``client`` to ``layer``'s export. Raises
        OverlayLost (refused), or OSError when a new overlay cannot be made (ENOSPC)."""
        key = (layer.export, client.identity)
        boot = client.options.get("boot") or None
        now = client.now
        e = self._entries.get(key)
        verdict = self._verdict(e, boot, now)
        if verdict == "expire":
            assert e is not None
            self._expire(e, now)
            e = self._entries.get(key)
            verdict = self._verdict(e, boot, now)
        if verdict == "refuse":
            assert e is not None
            e.idle_since = now
            raise self._refusal(e, boot)
        if verdict == "fresh":
            if e is not None:
                self._drop(e, "booted anew" if e.meta.state == LIVE else "tombstone replaced")
            e = self._create(layer, client.identity, boot, now)
        assert e is not None
        if e.overlay is None and not self._open(e, layer):
            e.idle_since = now
            raise self._refusal(e, boot)
        overlay = e.overlay
        assert overlay is not None
        if boot and e.meta.boot is None:
            overlay.files.set_boot(boot)  # adopted: written with the next sync
        overlay.users += 1
        return overlay

    def _create(self, layer: OverlayLayer, identity: str, boot: str | None,
                now: float) -> _Entry:
        meta = OverlayMeta(layer.export, identity, boot, layer.base, layer.size)
        e = _Entry(meta, now)
        files = OverlayFiles.create(self.path, e.key, meta)
        try:
            e.overlay = CowOverlay(layer.next or layer, files, max_bytes=self.max_bytes or 0,
                                   pool=self.pool)
        except (OSError, ValueError):
            files.close()
            remove(self.path, e.key)
            raise
        self._entries[(e.export, e.identity)] = e
        log.debug(kv(export=e.export, client=identity, overlay=e.key, boot=boot or "-",
                     made="yes"))
        return e

    def release(self, layer: OverlayLayer, client: Client, overlay: CowOverlay) -> None:
        """A connection of ``client`` that used ``overlay`` closed. An overlay replaced
        meanwhile (its client booted anew) is closed with its last connection."""
        overlay.users = max(0, overlay.users - 1)
        e = self._entries.get((layer.export, client.identity))
        if e is not None and e.overlay is overlay:
            if overlay.users == 0:
                e.idle_since = client.now
        elif overlay.users == 0:
            overlay.close()

    # ------------------------------------------------------------------ lifetimes

    def expire(self, now: float) -> int:
        """Expire overlays and forget tombstones idle for more than the linger (``now``:
        monotonic seconds); return how many entries changed."""
        n = 0
        for e in list(self._entries.values()):
            if e.users or now - e.idle_since <= self.linger:
                continue
            if e.overlay is not None and e.overlay.syncing:
                continue  # a FLUSH of its last connection is still being written
            if e.meta.state == LIVE:
                self._expire(e, now)
            else:
                self._drop(e, "tombstone forgotten")
            n += 1
        return n

    def _expire(self, e: _Entry, now: float) -> None:
        if e.meta.boot:
            self._bury(e, EXPIRED, f"no connection for {self.linger:g} s")
            e.idle_since = now
        else:
            self._drop(e, "expired")

    def _drop(self, e: _Entry, why: str) -> None:
        """Forget ``e`` and remove its files (an overlay still in use by connections of an
        earlier boot is closed by :meth:`release` when they end)."""
        self._entries.pop((e.export, e.identity), None)
        if e.overlay is not None:
            e.overlay.files.detach()  # its last syncs must not write over new files
            if e.overlay.users == 0:
                e.overlay.close()
        remove(self.path, e.key)
        log.debug(kv(export=e.export, client=e.identity, overlay=e.key, dropped=why))

    def __len__(self) -> int:
        return len(self._entries)

    def overlays(self) -> list[tuple[str, str, str, int]]:
        """(export, identity, state, bytes held) of every entry, for tests and logs."""
        return [(e.export, e.identity, e.meta.state,
                 e.overlay.allocated_bytes if e.overlay is not None else 0)
                for e in self._entries.values()]
