"""Open the registry a spec names (``embedded`` or ``etcd://...``). Kept apart from
:mod:`.base` so that the interface never imports its backends (which import it)."""

from __future__ import annotations

from icbdcache.replication.registry.base import Registry
from icbdcache.store import Store


def open_registry(spec: str | None, *, store: Store | None = None,
                  down_after: float = 30.0) -> Registry:
    """The registry ``spec`` names: None or ``embedded`` (kept in ``store``, the master's
    :class:`~icbdcache.store.Store`), or ``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]``.
    ``down_after``: seconds without a keep-alive after which a site is shown down.
    Raises ValueError on an unknown scheme or an embedded registry without a store."""
    if spec in (None, "", "embedded"):
        if store is None:
            raise ValueError("the embedded registry needs the master's store")
        from icbdcache.replication.registry.embedded import EmbeddedRegistry

        return EmbeddedRegistry(store, down_after=down_after)
    if spec.startswith("etcd://"):
        from icbdcache.replication.registry.etcd import EtcdRegistry

        return EtcdRegistry.from_uri(spec, down_after=down_after)
    raise ValueError(f"unknown registry {spec!r} (embedded or etcd://HOST:PORT)")
