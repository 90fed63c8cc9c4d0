"""The embedded registry: kept in the master's own LMDB store, in its ``records`` database.

Records (UTF-8 keys, JSON values unless said otherwise):

=========================  ===========================================================
key                        value
=========================  ===========================================================
``reg/gen``                the generation, ASCII decimal
``reg/version/IMI@V``      a :class:`VersionRecord` plus ``seq`` (publication order)
``reg/site/NAME``          ``{"name", "address", "subscriptions"}``, and ``"token":
                           {"sha256", "created"}`` once the site has a token
``reg/seen/NAME``          ``{"last_seen", "report"}`` (keep-alives; never moves ``gen``)
``reg/token/SHA256``       ``{"site"}``: the index from a token's digest to its site,
                           written and removed with the site's record
=========================  ===========================================================

Every change of the catalog or of a subscription writes its record and ``reg/gen`` in one
LMDB write transaction, so another process on the same store (``icbd-cache publish`` while the
master runs) sees both or neither; LMDB serialises writers across processes, which makes the
"publish only if new" check atomic. :meth:`EmbeddedRegistry.wait_change` polls ``reg/gen``
(one read transaction every ``poll`` seconds), which is how it learns of another process's
writes.

Keep-alives are frequent (every few seconds from each of hundreds of sites) and each LMDB write
transaction is synced to disk, so they are kept in memory and written together in one
transaction at most every ``flush_every`` seconds (checked on each keep-alive, each poll of
:meth:`~EmbeddedRegistry.wait_change` and each :meth:`~EmbeddedRegistry.sites`; written on
:meth:`~EmbeddedRegistry.close`): this object's own view always includes them, another
process's may lag (an LMDB write transaction is synced: about 2.5 ms here, so one per
keep-alive of hundreds of sites would hold the event loop for a good part of each second).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
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
from icbdcache.store import RecordGet, RecordPut, Store, StoreError

T = TypeVar("T")

GEN_KEY = "reg/gen"
VERSION_PREFIX = "reg/version/"
SITE_PREFIX = "reg/site/"
SEEN_PREFIX = "reg/seen/"
TOKEN_PREFIX = "reg/token/"

def _store_failed(store: Store, e: Exception) -> str:
    """The RegistryError text of a failure of ``store`` (a StoreError names the store)."""
    return f"registry {e}" if isinstance(e, StoreError) else f"registry store {store.path}: {e}"


def _loads(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"malformed registry record: {e}") from e
    if not isinstance(d, dict):
        raise RegistryError("malformed registry record: not an object")
    return d


class EmbeddedRegistry(Registry):
    """The registry in ``store`` (an open :class:`~icbdcache.store.Store`, read-write).

    ``down_after``: seconds without a keep-alive after which a site is shown down;
    ``poll``: seconds between two reads of the generation in :meth:`wait_change`;
    ``flush_every``: seconds keep-alives may wait in memory before they are written.
    Store failures raise RegistryError."""

    def __init__(self, store: Store, down_after: float = 30.0, *, poll: float = 0.25,
                 flush_every: float = 1.0) -> None:
        self.store = store
        self.down_after = down_after
        self.poll = poll
        self.flush_every = flush_every
        # keep-alives not yet written: site -> (last_seen, report)
        self._pending: dict[str, tuple[float, dict[str, Any]]] = {}
        self._known_sites: set[str] = set()
        self._last_flush = 0.0

    # ------------------------------------------------------------------ storage

    def _write(self, fn: Callable[[RecordGet, RecordPut], T]) -> T:
        """Run ``fn(get, put)`` as one write transaction of the store's records
        (:meth:`~icbdcache.store.Store.update_records`: the check and the write together);
        what ``fn`` returns. Raises RegistryError (fn's own, or for a store failure)."""
        try:
            return self.store.update_records(fn)
        except RegistryError:
            raise
        except Exception as e:
            raise RegistryError(_store_failed(self.store, e)) from e

    def _read(self, key: str) -> bytes | None:
        try:
            return self.store.record(key)
        except Exception as e:
            raise RegistryError(_store_failed(self.store, e)) from e

    def _scan(self, prefix: str) -> list[tuple[str, bytes]]:
        try:
            return self.store.records(prefix)
        except Exception as e:
            raise RegistryError(_store_failed(self.store, e)) from e

    @staticmethod
    def _bump(get: RecordGet, put: RecordPut) -> int:
        raw = get(GEN_KEY)
        gen = int(raw) + 1 if raw else 1
        put(GEN_KEY, str(gen).encode())
        return gen

    def _gen_now(self) -> int:
        raw = self._read(GEN_KEY)
        return int(raw) if raw else 0

    # ------------------------------------------------------------------ catalog

    async def publish(self, record: VersionRecord) -> None:
        """Add ``record`` (its ``published`` set to now if 0). Publishing the same version
        again with the same manifest changes nothing; with another one raises RegistryError.
        Advances the generation."""
        rec = replace(record, published=record.published or time.time())
        key = VERSION_PREFIX + rec.key

        def fn(get: RecordGet, put: RecordPut) -> None:
            old = get(key)
            if old is not None:
                check_republish(version_from_json(old), rec)
                return
            gen = self._bump(get, put)
            put(key, version_to_json(rec, seq=gen))

        self._write(fn)

    async def retire(self, imi: str, version: str) -> None:
        """Mark ``IMI@VERSION`` retired (no-op if it already is). Raises RegistryError if
        unknown. Advances the generation."""
        self._set_retired(imi, version, True)

    async def unretire(self, imi: str, version: str) -> None:
        """Offer ``IMI@VERSION`` again (no-op if it is not retired). Raises RegistryError if
        unknown. Advances the generation."""
        self._set_retired(imi, version, False)

    def _set_retired(self, imi: str, version: str, retired: bool) -> None:
        key = f"{VERSION_PREFIX}{imi}@{version}"

        def fn(get: RecordGet, put: RecordPut) -> None:
            raw = get(key)
            if raw is None:
                raise RegistryError(f"unknown version {imi}@{version}")
            d = _loads(raw)
            if bool(d.get("retired")) == retired:
                return
            d["retired"] = retired
            self._bump(get, put)
            put(key, json.dumps(d, sort_keys=True).encode())

        self._write(fn)

    async def versions(self, imi: str | None = None) -> list[VersionRecord]:
        """Published versions (retired included), in publication order, of ``imi`` or all."""
        prefix = VERSION_PREFIX + (f"{imi}@" if imi is not None else "")
        rows = []
        for _, raw in self._scan(prefix):
            seq = int(_loads(raw).get("seq", 0))
            rec = version_from_json(raw)
            if imi is None or rec.imi == imi:
                rows.append((seq, rec.published, rec.key, rec))
        rows.sort(key=lambda r: r[:3])
        return [r[3] for r in rows]

    async def generation(self) -> int:
        """The generation: 0 on a fresh store, +1 on each catalog or subscription change."""
        return self._gen_now()

    async def wait_change(self, since: int, timeout: float) -> int:
        """Poll the stored generation every ``poll`` seconds; return it as soon as it
        exceeds ``since``, else after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            self._maybe_flush()
            gen = self._gen_now()
            left = deadline - loop.time()
            if gen > since or left <= 0:
                return gen
            await asyncio.sleep(min(self.poll, left))

    # ------------------------------------------------------------------ sites

    def _site_record(self, name: str, site: dict[str, Any] | None = None) -> SiteRecord:
        if site is None:
            site = _loads(self._read(SITE_PREFIX + name))
        pending = self._pending.get(name)
        if pending is not None:
            last_seen, report = pending
        else:
            seen = _loads(self._read(SEEN_PREFIX + name))
            last_seen, report = float(seen.get("last_seen", 0.0)), dict(seen.get("report", {}))
        return self._make(name, site, last_seen, report)

    def _make(self, name: str, site: dict[str, Any], last_seen: float,
              report: dict[str, Any]) -> SiteRecord:
        up = last_seen > 0 and time.time() - last_seen <= self.down_after
        token = site_token(site)
        return SiteRecord(name=name, address=str(site.get("address", "")),
                          subscriptions=list(site.get("subscriptions", [])),
                          last_seen=last_seen, up=up, report=report,
                          token_created=token[1] if token else 0.0)

    def _update_site(self, name: str, change: Any, bump: bool) -> dict[str, Any]:
        """Read-modify-write ``reg/site/NAME`` in one transaction: ``change(site dict) ->
        bool`` (whether it changed); the generation advances if ``bump`` and it changed."""
        out: dict[str, Any] = {}

        def fn(get: RecordGet, put: RecordPut) -> None:
            key = SITE_PREFIX + name
            raw = get(key)
            site = _loads(raw) if raw is not None else site_dict(name)
            changed = change(site) or raw is None
            if changed:
                if bump:
                    self._bump(get, put)
                put(key, json.dumps(site, sort_keys=True).encode())
            out.update(site)

        self._write(fn)
        self._known_sites.add(name)
        return out

    async def register(self, site: str, address: str) -> SiteRecord:
        """Create ``site`` or set its address. Does not advance the generation."""
        def change(d: dict[str, Any]) -> bool:
            old = d.get("address")
            d["address"] = address
            return old != address

        return self._site_record(site, self._update_site(site, change, bump=False))

    async def keepalive(self, site: str, report: dict[str, Any]) -> SiteRecord:
        """Record a keep-alive of ``site`` now (in memory, written within ``flush_every``
        seconds; a new site is created at once). Does not advance the generation."""
        now = time.time()
        if site not in self._known_sites:
            d = self._update_site(site, lambda _d: False, bump=False)
        else:
            d = _loads(self._read(SITE_PREFIX + site))
        self._pending[site] = (now, dict(report))
        self._maybe_flush()
        return self._make(site, d, now, dict(report))

    def _maybe_flush(self) -> None:
        if self._pending and time.time() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the keep-alives held in memory (one transaction)."""
        pending, self._pending = self._pending, {}
        self._last_flush = time.time()
        if not pending:
            return

        def fn(get: RecordGet, put: RecordPut) -> None:
            for name, (last_seen, report) in pending.items():
                put(SEEN_PREFIX + name,
                    json.dumps({"last_seen": last_seen, "report": report}).encode())

        try:
            self._write(fn)
        except RegistryError:
            for name, value in pending.items():
                self._pending.setdefault(name, value)
            raise

    async def subscribe(self, site: str, imi: str) -> None:
        """Subscribe ``site`` to ``imi`` (creating the site). Advances the generation."""
        def change(d: dict[str, Any]) -> bool:
            subs = list(d.get("subscriptions", []))
            if imi in subs:
                return False
            d["subscriptions"] = [*subs, imi]
            return True

        self._update_site(site, change, bump=True)

    async def unsubscribe(self, site: str, imi: str) -> None:
        """Drop ``site``'s subscription to ``imi`` (no error if absent; an unknown site is
        not created). Advances the generation if it was subscribed."""
        if self._read(SITE_PREFIX + site) is None:
            return

        def change(d: dict[str, Any]) -> bool:
            subs = list(d.get("subscriptions", []))
            if imi not in subs:
                return False
            d["subscriptions"] = [s for s in subs if s != imi]
            return True

        self._update_site(site, change, bump=True)

    async def forget(self, site: str) -> bool:
        """Remove ``site`` (its record, keep-alives and token) in one transaction; whether it
        was known. Advances the generation if it was."""
        self._pending.pop(site, None)
        self._known_sites.discard(site)

        def fn(get: RecordGet, put: RecordPut) -> bool:
            raw = get(SITE_PREFIX + site)
            if raw is None:
                put(SEEN_PREFIX + site, None)
                return False
            token = site_token(_loads(raw))
            if token is not None:
                put(TOKEN_PREFIX + token[0], None)
            put(SITE_PREFIX + site, None)
            put(SEEN_PREFIX + site, None)
            self._bump(get, put)
            return True

        try:
            return bool(self.store.update_records(fn))
        except Exception as e:
            raise RegistryError(_store_failed(self.store, e)) from e

    async def set_site_token(self, site: str, digest: str, created: float, *,
                             replace: bool = False) -> bool:
        """Give ``site`` the token of SHA-256 ``digest`` (the site record and the token index
        in one transaction; the site is created if new). Whether an earlier token was
        replaced. Raises SiteTokenExists unless ``replace``. Does not advance the
        generation."""
        def fn(get: RecordGet, put: RecordPut) -> bool:
            key = SITE_PREFIX + site
            raw = get(key)
            d = _loads(raw) if raw is not None else site_dict(site)
            old = set_token(d, digest, created, replace)
            if old is not None:
                put(TOKEN_PREFIX + old, None)
            put(key, json.dumps(d, sort_keys=True).encode())
            put(TOKEN_PREFIX + digest, token_json(site))
            return old is not None

        replaced = self._write(fn)
        self._known_sites.add(site)
        return replaced

    async def token_site(self, digest: str) -> str | None:
        """The site of the token of SHA-256 ``digest``, or None (one read transaction)."""
        return token_owner(self._read(TOKEN_PREFIX + digest))

    async def sites(self) -> list[SiteRecord]:
        """Every site, by name; ``up`` if its last keep-alive is at most ``down_after``
        seconds old."""
        self._maybe_flush()
        seen = {k[len(SEEN_PREFIX):]: _loads(v) for k, v in self._scan(SEEN_PREFIX)}
        out = []
        for key, raw in self._scan(SITE_PREFIX):
            name = key[len(SITE_PREFIX):]
            if name in self._pending:
                last_seen, report = self._pending[name]
            else:
                s = seen.get(name, {})
                last_seen, report = float(s.get("last_seen", 0.0)), dict(s.get("report", {}))
            out.append(self._make(name, _loads(raw), last_seen, report))
        return out

    async def site(self, name: str) -> SiteRecord | None:
        """One site, or None if unknown."""
        raw = self._read(SITE_PREFIX + name)
        return self._site_record(name, _loads(raw)) if raw is not None else None

    async def close(self) -> None:
        """Write pending keep-alives (the store stays open: it is the caller's)."""
        self.flush()
