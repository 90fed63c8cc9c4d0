"""The registry (name server): iMIs and their versions, sites and their replicas,
subscriptions and keep-alives, behind one small interface with two backends:

* :class:`~icbdcache.replication.registry.embedded.EmbeddedRegistry` (default): kept in the
  master's own LMDB store;
* :class:`~icbdcache.replication.registry.etcd.EtcdRegistry`: an etcd cluster (leases for
  keep-alive, watches for changes), so several masters and many sites share one view.

Chunk maps and chunks never live in the registry: they stay in the stores.

Modules: :mod:`.base` the interface and records, :mod:`.records` their JSON (shared by both
backends), :mod:`.factory` :func:`open_registry`; each backend imports those, never the other.
"""

from icbdcache.replication.registry.base import (
    Registry,
    RegistryError,
    SiteRecord,
    SiteTokenExists,
    VersionRecord,
)
from icbdcache.replication.registry.factory import open_registry

__all__ = ["Registry", "RegistryError", "SiteRecord", "SiteTokenExists", "VersionRecord",
           "open_registry"]
