"""The PXE service: the boot tree of a store over TFTP and HTTP, kept up to date.

``icbd-cache pxe serve`` runs it alone; inside ``icbd-cache serve`` (``serve --pxe``) it runs
in the server's event loop as a service of the store's node (:class:`PxeNodeService`):
:class:`PxeService` only needs a running loop and a Store.

Refreshing: the tree is refreshed before each config request (a cheap LMDB read when nothing
changed) and every ``refresh_interval`` seconds in the background, so boot files of a newly
published version are extracted before the first workstation asks for them. Extraction runs
in a worker thread and never blocks transfers in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from icbdcache import activation
from icbdcache.access import AllowList
from icbdcache.log import kv
from icbdcache.store import Store, VersionMeta
from pxe.http import HttpCounters, HttpServer
from pxe.render import BootSettings
from pxe.tftp import MAX_BLKSIZE, Reader, TftpServer
from pxe.tree import BootTree, is_config

if TYPE_CHECKING:
    from icbdcache.node import Node

log = logging.getLogger("pxe.service")


@dataclass
class PxeConfig:
    """Settings of the PXE service. Ports: None = that server is off, 0 = any free port.
    Times in seconds, sizes in bytes."""

    store: str
    settings: BootSettings
    listen: str = "0.0.0.0"
    tftp_port: int | None = 69
    http_port: int | None = 8080
    syslinux_dir: str | None = None
    refresh_interval: float = 10.0
    tftp_timeout: float = 1.0
    tftp_retries: int = 5
    tftp_max_blksize: int = MAX_BLKSIZE
    #: Client networks answered (empty: any).
    allow: list[str] = field(default_factory=list)


class PxeService:
    """TFTP and HTTP servers over one :class:`BootTree`."""

    def __init__(self, config: PxeConfig, store: Store | None = None) -> None:
        self.config = config
        self._own_store = store is None
        self.store = store or Store(config.store)
        self.tree = BootTree(self.store, config.settings, config.syslinux_dir)
        self.tftp: TftpServer | None = None
        self.http: HttpServer | None = None
        self.http_counters = HttpCounters(AllowList(config.allow))
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._thread: asyncio.Future[bool] | None = None  # a refresh running in a thread

    async def refresh(self) -> None:
        """Bring the tree up to date; extraction (seconds) runs in a thread."""
        if not self.tree.stale() and not self.tree.retry_due():
            return
        async with self._refresh_lock:
            await self._in_thread(False)

    async def _in_thread(self, force: bool) -> None:
        # shielded: a cancelled caller (shutdown) leaves the thread running, and close()
        # waits for it before the store is closed under it
        self._thread = asyncio.ensure_future(asyncio.to_thread(self.tree.refresh, force))
        await asyncio.shield(self._thread)

    async def open(self, path: str) -> Reader:
        """The TFTP server's opener: a path of the tree, configs refreshed first."""
        if is_config(path):
            await self.refresh()
        entry = self.tree.lookup(path)
        if entry is None:
            raise FileNotFoundError(path)
        return entry.open()

    async def start(self) -> None:
        """Prepare the tree, then listen. Raises OSError (port in use, port 69 not root)."""
        async with self._refresh_lock:
            await self._in_thread(True)
        c = self.config
        try:
            if c.tftp_port is not None:
                self.tftp = TftpServer(self.open, c.listen, c.tftp_port, timeout=c.tftp_timeout,
                                       retries=c.tftp_retries, max_blksize=c.tftp_max_blksize,
                                       allow=AllowList(c.allow))
                await self.tftp.start()
            if c.http_port is not None:
                from icbdcache.metrics import new_registry

                self.http = HttpServer(self.tree, self.refresh, c.listen, c.http_port,
                                       counters=self.http_counters,
                                       metrics=new_registry(*self.collectors()))
                await self.http.start()
        except OSError:
            await self.close()
            raise
        self._task = asyncio.get_running_loop().create_task(self._refresher())
        log.info(kv(event="pxe_ready", tftp=self.tftp.port if self.tftp else "off",
                    http=self.http.port if self.http else "off",
                    nbd=f"{c.settings.nbd_host}:{c.settings.nbd_port}",
                    default=self.tree.default_key() or "-",
                    reconnect=(f"{c.settings.reconnect:g}s" if self.tree.reconnect_initrd
                               else f"off ({self.tree.reconnect_problem})")))

    def collectors(self) -> list[Any]:
        """The metrics collector of the TFTP and HTTP servers (:class:`PxeCollector`)."""
        return [PxeCollector(self)]

    async def reload(self, settings: BootSettings, allow: list[str]) -> None:
        """New boot settings (pins, menus, templates) and client networks, while serving
        (SIGHUP): the configs are rendered again at once. Raises ConfigError."""
        settings.check()
        from pxe.render import render_configs

        render_configs(self.tree.entries, settings)  # a broken template changes nothing
        self.config.settings = settings
        self.config.allow = list(allow)
        self.tree.settings = settings
        if self.tftp is not None:
            self.tftp.allow = AllowList(allow)
        self.http_counters.allow = AllowList(allow)
        async with self._refresh_lock:
            await self._in_thread(True)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # a broken version must not stop the service
                log.exception("refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.tftp is not None:
            await self.tftp.close()
            self.tftp = None
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self._thread is not None and not self._thread.done():
            with contextlib.suppress(Exception):
                await self._thread  # an extraction in flight still uses the store
        if self._own_store:
            self.store.close()
            self._own_store = False


class PxeCollector:
    """Metrics of a :class:`PxeService`: TFTP transfers, bytes, files not found and refused
    clients; HTTP requests by status and bytes; versions in the menus."""

    def __init__(self, service: PxeService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from icbdcache.metrics import counter, gauge

        svc = self.service
        t = svc.tftp.stats if svc.tftp is not None else {}
        yield counter("pxe_tftp_transfers", "TFTP transfers ended, by result",
                      labels=["result"], samples=[(["ok"], t.get("ok", 0)),
                                                  (["failed"], t.get("failed", 0))])
        yield counter("pxe_tftp_bytes", "Bytes of files sent whole over TFTP",
                      t.get("bytes", 0))
        yield counter("pxe_tftp_not_found", "TFTP requests for a file the tree lacks",
                      t.get("not_found", 0))
        yield counter("pxe_tftp_refused", "TFTP requests of clients outside --allow",
                      t.get("refused", 0))
        yield counter("pxe_tftp_retransmits", "TFTP packets sent again",
                      t.get("retransmits", 0))
        h = svc.http_counters
        yield counter("pxe_http_requests", "HTTP requests, by status", labels=["status"],
                      samples=[([str(k)], v) for k, v in sorted(h.requests.items())])
        yield counter("pxe_http_bytes", "Bytes of HTTP answers with status 200", h.bytes)
        yield gauge("pxe_versions", "Versions with boot files in the boot tree",
                    len(svc.tree.entries))


class PxeNodeService:
    """``serve --pxe``: :class:`PxeService` over the node's own store, started with the node
    (a :class:`~icbdcache.node.NodeService`) and closed before the store is."""

    def __init__(self, config: PxeConfig) -> None:
        self.config = config
        self.service: PxeService | None = None

    def open_source(self, spec: str, meta: VersionMeta, timeout: float) -> None:
        return None  # boot files only; no chunk sources

    async def start(self, node: Node) -> None:
        """Listen on the TFTP and HTTP ports. Raises OSError (a port in use, port 69 as a
        user without CAP_NET_BIND_SERVICE)."""
        self.service = PxeService(self.config, node.store)
        await self.service.start()

    def collectors(self) -> list[Any]:
        """The PXE servers' metrics (once started)."""
        return [PxeCollector(self.service)] if self.service is not None else []

    def reload(self, settings: BootSettings, allow: list[str]) -> None:
        """SIGHUP of ``serve --pxe``: new boot settings and client networks, applied in the
        running loop."""
        if self.service is not None:
            task = asyncio.ensure_future(self.service.reload(settings, allow))
            task.add_done_callback(_log_reload)

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None


def _log_reload(task: asyncio.Future[None]) -> None:
    if task.cancelled():
        return
    e = task.exception()
    if e is not None:
        log.error(kv(event="reload", result="refused, settings unchanged", error=e))
    else:
        log.info(kv(event="reload", result="boot configs rendered again"))


#: ``pxe serve``'s SIGHUP: the new (settings, allow), or raises ValueError/OSError.
Reloader = Callable[[], tuple[BootSettings, list[str]]]


async def _serve(config: PxeConfig, ready: asyncio.Event | None = None,
                 reload: Reloader | None = None) -> None:
    service = PxeService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def hup() -> None:
        if reload is None:
            log.info(kv(event="reload", result="nothing to reload"))
            return
        try:
            settings, allow = reload()
        except (ValueError, OSError) as e:
            log.error(kv(event="reload", result="refused, settings unchanged", error=e))
            return
        task = asyncio.ensure_future(service.reload(settings, allow))
        task.add_done_callback(_log_reload)

    loop.add_signal_handler(signal.SIGHUP, hup)
    watchdog = activation.Watchdog()
    try:
        await service.start()
        activation.ready("serving boot files")
        watchdog.start()
        if ready is not None:
            ready.set()
        await stop.wait()
        activation.stopping()
        log.info(kv(event="pxe_stopping"))
    finally:
        watchdog.stop()
        await service.close()


def run(config: PxeConfig, reload: Reloader | None = None) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP calls ``reload`` and applies what it returns.
    Returns the exit status; raises OSError or StoreError when it cannot start."""
    from icbdcache.loop import finish_loop, new_event_loop

    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(config, reload=reload))
    finally:
        finish_loop(loop)
    return 0
