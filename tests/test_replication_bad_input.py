"""Replication under bad input: a master fed malformed, oversized or hostile requests, and a
replica pointed at a fake, malicious master written here with aiohttp (127.0.0.1 only).

The rules checked: the master answers a clear 4xx and keeps serving; the replica refuses bad
data with a clear error, keeps its store consistent (``icbd-cache verify``) and never writes
outside it. Assertions are on statuses, bytes and counts, never on times.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from conftest import BIN
from yarl import URL

from icbdcache.replication.auth import Auth
from icbdcache.replication.master import Master
from icbdcache.replication.publish import publish
from icbdcache.replication.registry.embedded import EmbeddedRegistry
from icbdcache.store import Store
from icbdcache.store.chunks import CHUNK_SIZE

ICBD = str(BIN / "icbd-cache")


# ------------------------------------------------------------------------------ master side


class Probe(Protocol):
    """``probe(method, path, **request_kw)`` -> (status, JSON body, or bytes if not JSON)."""

    def __call__(self, method: str, path: str, **kw: Any) -> Awaitable[tuple[int, Any]]: ...


def with_master(tmp_path: Path, body: Callable[[Probe, Master], Awaitable[None]],
                auth: Auth | None = None) -> None:
    """Run ``body(probe, master)`` against an in-process master over a store holding
    ``lab@1``; ``probe(method, path, **kw)`` returns (status, JSON body or bytes). After
    ``body``, the master must still serve its catalog."""

    async def main() -> None:
        img = tmp_path / "img"
        img.write_bytes(os.urandom(3 * CHUNK_SIZE + 100))
        store = Store(tmp_path / "mstore")
        registry = EmbeddedRegistry(store)
        await publish(store, registry, str(img), "lab", "1")
        master = Master(store, registry, auth)
        srv = TestServer(master.app(), host="127.0.0.1")
        await srv.start_server()
        base = f"http://127.0.0.1:{srv.port}"
        try:
            async with ClientSession() as s:

                async def probe(method: str, path: str, **kw: Any) -> tuple[int, Any]:
                    async with s.request(method, URL(base + path, encoded=True), **kw) as r:
                        raw = await r.read()
                        try:
                            return r.status, json.loads(raw)
                        except ValueError:
                            return r.status, raw

                await body(probe, master)
                status, cat = await probe("GET", "/v1/catalog")
                assert status == 200 and [v["version"] for v in cat["versions"]] == ["1"]
        finally:
            await srv.close()
            await registry.close()
            store.close()

    asyncio.run(main())


def test_master_zstd_level_garbage_is_400(tmp_path: Path) -> None:
    """``?zstd=`` that str.isdigit() accepts but int() does not (a superscript digit, more
    digits than int() converts) was a 500; it is a 400 like any other bad level."""

    async def body(probe: Probe, m: Master) -> None:
        d = b"\x01" * 16
        for level in ("%C2%B2", "%D9%A3", "0" * 5000 + "3", "-1", "20", "0", "abc", "", "3%00"):
            status, answer = await probe("POST", f"/v1/chunks?zstd={level}", data=d)
            assert status == 400, (level[:20], status, answer)
            assert "zstd level" in answer["error"]
        status, raw = await probe("POST", "/v1/chunks?zstd=03", data=d)
        assert status == 200 and raw[:16] != b"{"

    with_master(tmp_path, body)


def test_master_deeply_nested_json_is_400(tmp_path: Path) -> None:
    """A body of 100000 '[' (or nested objects) made json.loads raise RecursionError, which
    the handlers did not expect: a 500. It is a 400 on every JSON endpoint."""

    async def body(probe: Probe, m: Master) -> None:
        for nested in ("[" * 100000, '{"a":' * 100000):
            for path in ("/v1/sites/s1/register", "/v1/sites/s1/keepalive",
                         "/v1/admin/subscribe", "/v1/admin/unsubscribe", "/v1/admin/retire"):
                status, answer = await probe("POST", path, data=nested.encode())
                assert status == 400, (path, status, answer)
                assert "JSON" in answer["error"]

    with_master(tmp_path, body)


def test_master_refuses_overlong_and_control_names(tmp_path: Path) -> None:
    """A 600-character site name overflowed LMDB's key size in the registry: a 503 'registry'
    error (which tells a replica the master is down); a NUL or other control character in a
    site or iMI name was accepted and stored. Both are a 400 now, and nothing is stored."""

    async def body(probe: Probe, m: Master) -> None:
        long = "s" * 600
        for site in (long, "a%00b", "a%1Bb", "a%7Fb"):
            for what in ("register", "keepalive"):
                status, answer = await probe("POST", f"/v1/sites/{site}/{what}", json={})
                assert status == 400, (site[:10], what, status, answer)
        for sub in (["x" * 600], ["a\x00b"], ["ok", "\n"]):
            status, answer = await probe("POST", "/v1/sites/good/register",
                                         json={"subscribe": sub})
            assert status == 400, (sub, status, answer)
        for site, imi in ((long, "lab"), ("s2", "x" * 600), ("a\x00", "lab"), ("s2", "l\x01")):
            status, answer = await probe("POST", "/v1/admin/subscribe",
                                         json={"site": site, "imi": imi})
            assert status == 400, (site[:10], imi[:10], status, answer)
        assert [s.name for s in await m.registry.sites()] == []
        status, answer = await probe("POST", "/v1/sites/good/register", json={"subscribe": ["lab"]})
        assert status == 200 and answer["subscriptions"] == ["lab"]

    with_master(tmp_path, body)
