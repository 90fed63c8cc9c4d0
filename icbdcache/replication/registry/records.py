"""The JSON of registry records, shared by both backends (:mod:`.embedded`, :mod:`.etcd`):
versions as :func:`version_to_json` writes them, sites as :func:`site_dict` shapes them, and
the rule that a published version never changes (:func:`check_republish`)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from icbdcache.replication.registry.base import RegistryError, VersionRecord

_VERSION_FIELDS = frozenset(f.name for f in fields(VersionRecord))


def version_to_json(record: VersionRecord, **extra: Any) -> bytes:
    """The JSON of ``record`` (plus ``extra`` fields), as stored by both backends."""
    return json.dumps({**asdict(record), **extra}, sort_keys=True).encode()


def version_from_json(raw: bytes) -> VersionRecord:
    """A :class:`VersionRecord` from :func:`version_to_json` output (extra fields ignored).
    Raises RegistryError on a malformed record."""
    try:
        d = json.loads(raw)
        return VersionRecord(**{k: v for k, v in d.items() if k in _VERSION_FIELDS})
    except (ValueError, TypeError) as e:
        raise RegistryError(f"malformed version record: {e}") from e


def check_republish(old: VersionRecord, new: VersionRecord) -> None:
    """Raise RegistryError unless ``new`` describes the same image as the published ``old``
    (publishing the same version twice is allowed and changes nothing)."""
    if (old.manifest, old.size, old.chunk_size) != (new.manifest, new.size, new.chunk_size):
        raise RegistryError(
            f"{new.key} is already published with manifest {old.manifest} "
            f"({old.size} bytes); a version never changes: publish a new version")


def site_dict(name: str, address: str = "", subscriptions: list[str] | None = None
              ) -> dict[str, Any]:
    """A site's stored record: ``{"name", "address", "subscriptions"}``."""
    return {"name": name, "address": address, "subscriptions": list(subscriptions or [])}
