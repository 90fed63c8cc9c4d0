"""HTTP for iPXE: the boot tree over aiohttp (GET and HEAD, ranges, sendfile).

aiohttp runs in the same event loop as the TFTP server (and, with ``serve --pxe``, the NBD
server): no thread, kernels and initrds leave by ``sendfile`` through ``FileResponse``, which
also answers ``Range`` and conditional requests. Configs (``boot.ipxe``, ``ipxe/*``) are
refreshed from the store before they are served, so a version published a second ago is
already the default. One ``key=value`` log line per request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from icbdcache.access import AllowList
from icbdcache.log import Throttled, kv
from pxe.tftp import TftpError, clean_path
from pxe.tree import BootTree, DataEntry, is_config

log = logging.getLogger("pxe.http")

Refresher = Callable[[], Awaitable[None]]


class HttpCounters:
    """What the HTTP server answered: ``requests`` by status code, ``bytes`` of 200 answers
    (configs and files), and the ``allow`` list of client networks (replace it to change it;
    refused clients get 403, logged at most once a second)."""

    def __init__(self, allow: AllowList | None = None) -> None:
        self.requests: dict[int, int] = {}
        self.bytes = 0
        self.allow = allow or AllowList()
        self.refusals = Throttled(log, 1.0, logging.INFO)


def make_app(tree: BootTree, refresh: Refresher, counters: HttpCounters | None = None,
             metrics: Any = None) -> web.Application:
    """The aiohttp application serving ``tree``; ``refresh`` brings it up to date;
    ``counters`` count the answers; ``metrics``: a prometheus_client registry served at
    ``/metrics`` (then no file of the tree can be named ``metrics``)."""
    c = counters or HttpCounters()

    async def handle(request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        raw = request.match_info.get("path", "")
        status = 200
        size = 0
        if not c.allow.allows(request.remote or ""):
            c.requests[403] = c.requests.get(403, 0) + 1
            c.refusals.warning(kv(event="refused", peer=request.remote or "-",
                                  path="/" + raw, reason="not in --allow", allow=str(c.allow)))
            raise web.HTTPForbidden()
        try:
            try:
                path = clean_path(raw)
            except TftpError:
                status = 404 if not raw.strip("/") else 403
                raise (web.HTTPNotFound() if status == 404 else web.HTTPForbidden()) from None
            if is_config(path):
                await refresh()
            entry = tree.lookup(path)
            if entry is None:
                status = 404
                raise web.HTTPNotFound()
            if isinstance(entry, DataEntry):
                size = len(entry.data)
                return web.Response(body=entry.data, content_type=entry.content_type.split(";")[0],
                                    charset="utf-8", headers={"Cache-Control": "no-store"})
            size = entry.size
            return web.FileResponse(entry.path, headers={
                "Content-Type": "application/octet-stream",
                "Cache-Control": "max-age=86400, immutable"})
        finally:
            c.requests[status] = c.requests.get(status, 0) + 1
            if status == 200:
                c.bytes += size
            log.info(kv(event="http", peer=request.remote or "-", method=request.method,
                        path="/" + raw, status=status, bytes=size if status == 200 else 0,
                        ms=f"{(time.monotonic() - t0) * 1000:.1f}"))

    app = web.Application()
    if metrics is not None:
        from icbdcache.metrics import metrics_response

        async def scrape(request: web.Request) -> web.StreamResponse:
            if not c.allow.allows(request.remote or ""):
                raise web.HTTPForbidden()
            return await metrics_response(metrics)

        app.router.add_get("/metrics", scrape)
    app.router.add_get("/{path:.*}", handle)  # HEAD included
    return app


class HttpServer:
    """The boot tree on ``host``:``port`` (port 0: any; see :attr:`port`)."""

    def __init__(self, tree: BootTree, refresh: Refresher, host: str = "0.0.0.0",
                 port: int = 8080, *, counters: HttpCounters | None = None,
                 metrics: Any = None) -> None:
        self.counters = counters or HttpCounters()
        self.app = make_app(tree, refresh, self.counters, metrics)
        self.host = host
        self.port = port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Start listening; raises OSError (address in use, ...)."""
        # shutdown_timeout: a download in flight (a slow initrd) delays a SIGTERM this long
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            where = f"HTTP port {self.port}/tcp on {self.host}"
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"{where} is in use (another web server, a second pxe "
                                       "serve?)") from None
            raise OSError(e.errno, f"{where}: {e.strerror or e}") from None
        self.runner = runner
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info(kv(event="http_listening", address=f"{host}:{self.port}"))

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            try:
                await asyncio.wait_for(runner.cleanup(), 10)
            except TimeoutError:
                log.warning(kv(event="http_close", result="timeout"))
