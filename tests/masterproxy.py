"""An HTTP proxy between a replica (or a site) and a master, for tests that need to hold,
corrupt or forge what crosses: :class:`MasterProxy`."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from conftest import free_port


class MasterProxy:
    """An HTTP proxy (aiohttp, its own thread and loop) between a replica and a master.

    ``corrupt_once``: flip one byte of the first chunk's payload in the first plain chunk
    stream. ``hold_digests``: hold chunk requests of at least this many digests until
    :attr:`release` is set (the replica's pull batches; faults ask for fewer)."""

    def __init__(self, target_port: int, *, corrupt_once: bool = False,
                 hold_digests: int | None = None) -> None:
        self.target = f"http://127.0.0.1:{target_port}"
        self.port = free_port()
        self.corrupt_once = corrupt_once
        self.hold_digests = hold_digests
        self.release = threading.Event()
        self.corrupted = 0
        self.held = 0
        self.small_requests = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        body = await request.read()
        if request.path == "/v1/chunks":
            if self.hold_digests is not None and len(body) >= self.hold_digests * 16:
                self.held += 1
                while not self.release.is_set():
                    await asyncio.sleep(0.05)
            elif self.hold_digests is not None:
                self.small_requests += 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type")}
        try:
            async with self._session.request(request.method, self.target + request.path_qs,
                                             data=body or None, headers=headers) as r:
                data = await r.read()
                out = {k: v for k, v in r.headers.items()
                       if k.lower().startswith("x-icbd") or k.lower() == "content-type"}
                status = r.status
        except aiohttp.ClientError:
            return web.Response(status=502, text='{"error": "proxy: master unreachable"}')
        if (self.corrupt_once and not self.corrupted and request.path == "/v1/chunks"
                and "X-Icbd-Encoding" not in out and len(data) > 200):
            buf = bytearray(data)
            buf[20 + 100] ^= 0xFF  # inside the payload of the first frame
            data = bytes(buf)
            self.corrupted += 1
        return web.Response(status=status, body=data, headers=out)

    def close(self) -> None:
        self.release.set()

        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
