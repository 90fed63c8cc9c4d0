"""The etcd registry: one view shared by several masters and hundreds of sites.

Keys, under a prefix (default ``/icbd/``; values JSON unless said otherwise):

=========================  ==============================================================
key                        value
=========================  ==============================================================
``versions/IMI@V``         a :class:`VersionRecord`; publication order is its create revision
``sites/NAME``             ``{"name", "address", "subscriptions"}``, and ``"token":
                           {"sha256", "created"}`` once the site has a token
``tokens/SHA256``          ``{"site"}``: the index from a token's digest to its site, written
                           and removed in the transaction that changes the site's record
``seen/NAME``              ``{"last_seen", "report"}``: the last keep-alive (no lease, so a
                           down site still shows its age and last report)
``alive/NAME``             ``{"last_seen"}`` under a lease of TTL ``down_after`` seconds,
                           refreshed by each keep-alive: a silent site's key vanishes
``generation``             the name of the last changed key; its *mod revision* is the
                           generation
=========================  ==============================================================

Every catalog or subscription change is one etcd transaction that writes its record and the
``generation`` key, guarded by a compare on the record's revision (``create_revision == 0``
for a new version, so two masters publishing the same version with different manifests
cannot both win); a lost race is re-read and retried. Keep-alives never touch ``generation``.
:meth:`EtcdRegistry.wait_change` watches the ``generation`` key from the revision it read,
so no change between the read and the watch is missed.

A site is ``up`` while its ``alive/`` key exists and its last keep-alive is at most
``down_after`` seconds old (etcd expires leases on whole seconds, 2 s at least with the
default election timeout; the age check makes ``down_after`` exact, given masters whose
clocks agree). ``aetcd`` is imported on first use, so the project runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from icbdcache.replication.registry.base import (
    Registry,
    RegistryError,
    SiteRecord,
    VersionRecord,
)
from icbdcache.replication.registry.records import (
    check_republish,
    set_token,
    site_dict,
    site_token,
    token_json,
    token_owner,
    version_from_json,
    version_to_json,
)

T = TypeVar("T")
DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/icbd/"
_RETRIES = 32  # compare-and-swap attempts under contention


def _aetcd() -> Any:
    try:
        import aetcd
    except ImportError as e:
        raise RegistryError("the etcd registry needs the aetcd package: "
                            "pip install 'icbd-cache[etcd]'") from e
    return aetcd


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range of every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return b"\0"
    b[-1] += 1
    return bytes(b)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"malformed registry record in etcd: {e}") from e
    if not isinstance(d, dict):
        raise RegistryError("malformed registry record in etcd: not an object")
    return d


class EtcdRegistry(Registry):
    """The registry in etcd at ``endpoints`` ((host, port) pairs, tried in turn when one is
    unreachable) under key ``prefix`` (``/NAME/``). ``down_after``: seconds without a
    keep-alive after which a site is shown down (also its liveness lease's TTL, rounded up);
    ``rpc_timeout``: seconds one etcd request may take. Every method raises RegistryError when
    no endpoint answers."""

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str = DEFAULT_PREFIX,
                 down_after: float = 30.0, *, rpc_timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("the etcd registry needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self.down_after = down_after
        self.rpc_timeout = rpc_timeout
        self._client: Any = None
        self._current = 0
        self._leases: dict[str, int] = {}  # site -> lease id of its alive/ key
        p = self.prefix.encode()
        self._versions, self._sites = p + b"versions/", p + b"sites/"
        self._seen, self._alive = p + b"seen/", p + b"alive/"
        self._tokens = p + b"tokens/"
        self._gen = p + b"generation"

    @classmethod
    def from_uri(cls, uri: str, down_after: float = 30.0) -> EtcdRegistry:
        """An EtcdRegistry from ``etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]`` (port 2379,
        prefix ``/icbd/`` by default; IPv6 hosts in brackets). Raises ValueError if malformed.
        Connects on first use."""
        scheme = "etcd://"
        if not uri.startswith(scheme):
            raise ValueError(f"not an etcd URI: {uri!r} (etcd://HOST:PORT[,...][/PREFIX])")
        rest = uri[len(scheme):]
        hosts, _, prefix = rest.partition("/")
        endpoints: list[tuple[str, int]] = []
        for item in hosts.split(","):
            item = item.strip()
            if not item:
                continue
            if item.startswith("["):
                host, _, tail = item[1:].partition("]")
                port_s = tail[1:] if tail.startswith(":") else ""
            elif item.count(":") == 1:
                host, _, port_s = item.partition(":")
            else:
                host, port_s = item, ""
            try:
                port = int(port_s) if port_s else DEFAULT_PORT
            except ValueError:
                raise ValueError(f"bad port in etcd URI {uri!r}: {port_s!r}") from None
            if not host or not 0 < port < 65536:
                raise ValueError(f"bad endpoint in etcd URI {uri!r}: {item!r}")
            endpoints.append((host, port))
        if not endpoints:
            raise ValueError(f"no endpoint in etcd URI {uri!r}")
        return cls(endpoints, prefix or DEFAULT_PREFIX, down_after)

    # ------------------------------------------------------------------ connection

    def _endpoint(self) -> str:
        host, port = self.endpoints[self._current]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _get_client(self) -> Any:
        if self._client is None:
            aetcd = _aetcd()
            host, port = self.endpoints[self._current]
            self._client = aetcd.Client(
                host=host, port=port, timeout=self.rpc_timeout,
                options={"grpc.max_receive_message_length": 64 << 20},
            )
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn(client)`` against the current endpoint, moving on to the next one while an
        endpoint is unreachable. etcd errors become RegistryError."""
        exc = _aetcd().exceptions
        unreachable = (exc.ConnectionFailedError, exc.ConnectionTimeoutError)
        failures: list[str] = []
        for _ in range(len(self.endpoints)):
            client = self._get_client()
            try:
                return await fn(client)
            except unreachable as e:
                failures.append(f"{self._endpoint()}: {_brief(e)}")
                await self._drop_client()
                self._current = (self._current + 1) % len(self.endpoints)
            except exc.ClientError as e:
                raise RegistryError(f"etcd {self._endpoint()}: {_brief(e)}") from e
            except TimeoutError as e:
                failures.append(f"{self._endpoint()}: no answer in {self.rpc_timeout} s")
                await self._drop_client()
                self._current = (self._current + 1) % len(self.endpoints)
                if len(failures) == len(self.endpoints):
                    raise RegistryError(f"etcd unreachable ({'; '.join(failures)})") from e
        raise RegistryError(f"etcd unreachable ({'; '.join(failures)})")

    async def close(self) -> None:
        """Close the connection. Liveness leases are left to expire (a master that restarts
        does not mark every site down)."""
        await self._drop_client()

    # ------------------------------------------------------------------ helpers

    async def _get(self, key: bytes) -> Any:
        """The KeyValue at ``key`` or None."""
        async def fn(c: Any) -> Any:
            return await c.get(key)

        return await self._call(fn)

    async def _prefix(self, prefix: bytes) -> list[Any]:
        async def fn(c: Any) -> list[Any]:
            return list(await c.get_prefix(prefix))

        return await self._call(fn)

    async def _cas(self, key: bytes, change: Callable[[bytes | None], bytes | None],
                   bump: bool) -> bytes | None:
        """Read ``key``, ``change(value or None)`` -> new value (None: leave it), and write it
        (with the generation if ``bump``) only if the key was not modified meanwhile; retried
        on a lost race. Returns the value written or found."""
        for _ in range(_RETRIES):
            kv = await self._get(key)
            old = bytes(kv.value) if kv is not None else None
            new = change(old)
            if new is None:
                return old

            async def fn(c: Any, new: bytes = new, kv: Any = kv) -> bool:
                t = c.transactions
                guard = (t.mod(key) == kv.mod_revision) if kv is not None else (
                    t.create(key) == 0)
                ops = [t.put(key, new)]
                if bump:
                    ops.append(t.put(self._gen, key))
                ok, _ = await c.transaction(compare=[guard], success=ops, failure=[])
                return bool(ok)

            if await self._call(fn):
                return new
        raise RegistryError(f"etcd: {key.decode()} changed {_RETRIES} times while updating it")

    # ------------------------------------------------------------------ catalog

    async def publish(self, record: VersionRecord) -> None:
        """Add ``record`` (``published`` set to now if 0) in one transaction that succeeds
        only if the version is new; the same version again with the same manifest changes
        nothing, with another one raises RegistryError. Advances the generation."""
        rec = replace(record, published=record.published or time.time())
        key = self._versions + rec.key.encode()
        value = version_to_json(rec)

        async def fn(c: Any) -> tuple[bool, Any]:
            t = c.transactions
            ok, resp = await c.transaction(
                compare=[t.create(key) == 0],
                success=[t.put(key, value), t.put(self._gen, key)],
                failure=[t.get(key)],
            )
            return bool(ok), resp

        ok, resp = await self._call(fn)
        if not ok:
            found = resp[0] if resp else []
            if found:
                check_republish(version_from_json(bytes(found[0][0])), rec)

    async def retire(self, imi: str, version: str) -> None:
        """Mark ``IMI@VERSION`` retired (no-op if it already is). Raises RegistryError if
        unknown. Advances the generation."""
        await self._set_retired(imi, version, True)

    async def unretire(self, imi: str, version: str) -> None:
        """Offer ``IMI@VERSION`` again (no-op if it is not retired). Raises RegistryError if
        unknown. Advances the generation."""
        await self._set_retired(imi, version, False)

    async def _set_retired(self, imi: str, version: str, retired: bool) -> None:
        key = self._versions + f"{imi}@{version}".encode()

        def change(old: bytes | None) -> bytes | None:
            if old is None:
                raise RegistryError(f"unknown version {imi}@{version}")
            d = _json(old)
            if bool(d.get("retired")) == retired:
                return None
            d["retired"] = retired
            return json.dumps(d, sort_keys=True).encode()

        await self._cas(key, change, bump=True)

    async def versions(self, imi: str | None = None) -> list[VersionRecord]:
        """Published versions (retired included), in publication order, of ``imi`` or all."""
        prefix = self._versions + (f"{imi}@".encode() if imi is not None else b"")
        rows = []
        for kv in await self._prefix(prefix):
            rec = version_from_json(bytes(kv.value))
            if imi is None or rec.imi == imi:
                rows.append((kv.create_revision, rec))
        rows.sort(key=lambda r: r[0])
        return [r[1] for r in rows]

    async def _gen_rev(self) -> tuple[int, int]:
        """(generation, etcd revision of the read)."""
        async def fn(c: Any) -> tuple[int, int]:
            r = await c.get_range(self._gen, self._gen + b"\0")
            gen = max((kv.mod_revision for kv in r), default=0)
            return int(gen), int(r.header.revision)

        return await self._call(fn)

    async def generation(self) -> int:
        """The etcd revision of the last catalog or subscription change (0 if none yet)."""
        return (await self._gen_rev())[0]

    async def wait_change(self, since: int, timeout: float) -> int:
        """Return the generation once it exceeds ``since`` (an etcd watch on the generation
        key, from the revision read first), else after ``timeout`` seconds."""
        gen, rev = await self._gen_rev()
        if gen > since or timeout <= 0:
            return gen
        exc = _aetcd().exceptions

        async def fn(c: Any) -> int | None:
            try:
                ev = await c.watch_once(self._gen, timeout=timeout, start_revision=rev + 1)
            except exc.WatchTimeoutError:
                return None
            except exc.RevisionCompactedError:
                return None
            if ev is None:  # the client was closed under the watch (by another call)
                return None
            if isinstance(ev, BaseException):  # the watch stream broke
                where = self._endpoint()
                await self._drop_client()
                raise RegistryError(f"etcd unreachable ({where}: watch broke: {_brief(ev)})")
            return int(ev.kv.mod_revision)

        try:
            got = await asyncio.wait_for(self._call(fn), timeout + 2 * self.rpc_timeout)
        except TimeoutError:
            got = None
        if got is not None and got > since:
            return got
        return await self.generation()

    # ------------------------------------------------------------------ sites

    def _site(self, name: str, site: bytes | None, seen: bytes | None, alive: bool,
              now: float) -> SiteRecord:
        d = _json(site) if site is not None else {}
        s = _json(seen) if seen is not None else {}
        last_seen = float(s.get("last_seen", 0.0))
        token = site_token(d)
        return SiteRecord(
            name=name, address=str(d.get("address", "")),
            subscriptions=list(d.get("subscriptions", [])), last_seen=last_seen,
            up=alive and last_seen > 0 and now - last_seen <= self.down_after,
            report=dict(s.get("report", {})), token_created=token[1] if token else 0.0,
        )

    async def register(self, site: str, address: str) -> SiteRecord:
        """Create ``site`` or set its address. Does not advance the generation."""
        def change(old: bytes | None) -> bytes | None:
            d = _json(old) if old is not None else site_dict(site)
            if old is not None and d.get("address") == address:
                return None
            d["address"] = address
            return json.dumps(d, sort_keys=True).encode()

        await self._cas(self._sites + site.encode(), change, bump=False)
        rec = await self.site(site)
        assert rec is not None
        return rec

    async def _lease(self, c: Any, site: str) -> int:
        """The live lease of ``site``'s alive/ key, refreshed; a new one if it expired."""
        lease_id = self._leases.get(site)
        if lease_id is not None:
            reply = await c.refresh_lease(lease_id)
            if reply is not None and reply.TTL > 0:
                return lease_id
            self._leases.pop(site, None)
        lease = await c.lease(max(1, math.ceil(self.down_after)))
        self._leases[site] = int(lease.id)
        return int(lease.id)

    async def keepalive(self, site: str, report: dict[str, Any]) -> SiteRecord:
        """Record a keep-alive of ``site`` now: refresh its lease and write ``seen/`` and
        ``alive/`` in one transaction (creating the site if new). Does not advance the
        generation."""
        now = time.time()
        skey = self._sites + site.encode()
        seen = json.dumps({"last_seen": now, "report": report}).encode()
        alive = json.dumps({"last_seen": now}).encode()
        exc = _aetcd().exceptions

        async def fn(c: Any) -> bytes:
            for attempt in range(2):
                lease_id = await self._lease(c, site)
                t = c.transactions
                writes = [t.put(self._alive + site.encode(), alive, lease=lease_id),
                          t.put(self._seen + site.encode(), seen)]
                new = json.dumps(site_dict(site), sort_keys=True).encode()
                try:
                    ok, resp = await c.transaction(
                        compare=[t.create(skey) == 0],
                        success=[t.put(skey, new), *writes],
                        failure=[*writes, t.get(skey)],
                    )
                except exc.ClientError as e:
                    # the lease expired between its refresh and the write: take a new one
                    if attempt == 0 and "lease not found" in str(e):
                        self._leases.pop(site, None)
                        continue
                    raise
                if ok:
                    return new
                found = resp[-1] if resp else []
                return bytes(found[0][0]) if found else new
            raise RegistryError(f"etcd: no lease for site {site}")

        site_raw = await self._call(fn)
        return self._site(site, site_raw, seen, True, now)

    async def _subscription(self, site: str, imi: str, add: bool) -> None:
        def change(old: bytes | None) -> bytes | None:
            if old is None and not add:
                return None
            d = _json(old) if old is not None else site_dict(site)
            subs = list(d.get("subscriptions", []))
            if (imi in subs) == add and old is not None:
                return None
            d["subscriptions"] = [*subs, imi] if add and imi not in subs else [
                s for s in subs if s != imi]
            return json.dumps(d, sort_keys=True).encode()

        await self._cas(self._sites + site.encode(), change, bump=True)

    async def subscribe(self, site: str, imi: str) -> None:
        """Subscribe ``site`` to ``imi`` (creating the site). Advances the generation."""
        await self._subscription(site, imi, True)

    async def unsubscribe(self, site: str, imi: str) -> None:
        """Drop ``site``'s subscription to ``imi`` (no error if absent; an unknown site is
        not created). Advances the generation if it was subscribed."""
        await self._subscription(site, imi, False)

    async def forget(self, site: str) -> bool:
        """Remove ``site`` (its record, keep-alives, liveness key and token) in one
        transaction, guarded by the record's revision (a change in between: read again);
        whether it was known. Advances the generation if it was."""
        keys = [p + site.encode() for p in (self._sites, self._seen, self._alive)]
        for _ in range(_RETRIES):
            kv = await self._get(keys[0])
            token = site_token(_json(bytes(kv.value))) if kv is not None else None

            async def fn(c: Any, kv: Any = kv, token: Any = token) -> bool:
                t = c.transactions
                if kv is None:  # unknown: its leftovers go, unless it appeared meanwhile
                    ok, _ = await c.transaction(compare=[t.create(keys[0]) == 0],
                                                success=[t.delete(k) for k in keys[1:]],
                                                failure=[])
                    return bool(ok)
                ops = [*(t.delete(k) for k in keys), t.put(self._gen, keys[0])]
                if token is not None:
                    ops.append(t.delete(self._tokens + token[0].encode()))
                ok, _ = await c.transaction(compare=[t.mod(keys[0]) == kv.mod_revision],
                                            success=ops, failure=[])
                return bool(ok)

            if await self._call(fn):
                self._leases.pop(site, None)
                return kv is not None
        raise RegistryError(f"etcd: site {site} changed {_RETRIES} times while forgetting it")

    async def set_site_token(self, site: str, digest: str, created: float, *,
                             replace: bool = False) -> bool:
        """Give ``site`` the token of SHA-256 ``digest``: its record and the token index in
        one transaction guarded by the record's revision (the site is created if new).
        Whether an earlier token was replaced. Raises SiteTokenExists unless ``replace``.
        Does not advance the generation."""
        skey = self._sites + site.encode()
        for _ in range(_RETRIES):
            kv = await self._get(skey)
            d = _json(bytes(kv.value)) if kv is not None else site_dict(site)
            old = set_token(d, digest, created, replace)
            value = json.dumps(d, sort_keys=True).encode()

            async def fn(c: Any, kv: Any = kv, old: str | None = old,
                         value: bytes = value) -> bool:
                t = c.transactions
                guard = (t.mod(skey) == kv.mod_revision) if kv is not None else (
                    t.create(skey) == 0)
                ops = [t.put(skey, value), t.put(self._tokens + digest.encode(),
                                                 token_json(site))]
                if old is not None and old != digest:
                    ops.append(t.delete(self._tokens + old.encode()))
                ok, _ = await c.transaction(compare=[guard], success=ops, failure=[])
                return bool(ok)

            if await self._call(fn):
                return old is not None
        raise RegistryError(f"etcd: site {site} changed {_RETRIES} times while giving it a "
                            "token")

    async def token_site(self, digest: str) -> str | None:
        """The site of the token of SHA-256 ``digest``, or None (one etcd read)."""
        kv = await self._get(self._tokens + digest.encode())
        return token_owner(bytes(kv.value) if kv is not None else None)

    async def sites(self) -> list[SiteRecord]:
        """Every site, by name, read in one transaction (one consistent snapshot)."""
        async def fn(c: Any) -> list[Any]:
            t = c.transactions
            _, resp = await c.transaction(compare=[], success=[
                t.get(p, _range_end(p)) for p in (self._sites, self._seen, self._alive)],
                failure=[])
            return list(resp)

        sites_r, seen_r, alive_r = await self._call(fn)

        def by_name(rows: list[Any], prefix: bytes) -> dict[str, bytes]:
            return {bytes(g.key)[len(prefix):].decode(): bytes(v) for v, g in rows}

        sites = by_name(sites_r, self._sites)
        seen = by_name(seen_r, self._seen)
        alive = by_name(alive_r, self._alive)
        now = time.time()
        return [self._site(n, sites[n], seen.get(n), n in alive, now) for n in sorted(sites)]

    async def site(self, name: str) -> SiteRecord | None:
        """One site, or None if unknown."""
        keys = [p + name.encode() for p in (self._sites, self._seen, self._alive)]

        async def fn(c: Any) -> list[Any]:
            t = c.transactions
            _, resp = await c.transaction(compare=[], success=[t.get(k) for k in keys],
                                          failure=[])
            return list(resp)

        site_r, seen_r, alive_r = await self._call(fn)
        if not site_r:
            return None
        return self._site(name, bytes(site_r[0][0]), bytes(seen_r[0][0]) if seen_r else None,
                          bool(alive_r), time.time())


def _brief(e: BaseException) -> str:
    """One line of an error: a gRPC error's details, else its text."""
    details = getattr(e, "details", None)
    text = str(details() if callable(details) else e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
