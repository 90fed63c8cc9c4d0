"""The JSON of registry records, shared by both backends (:mod:`.embedded`, :mod:`.etcd`):
versions as :func:`version_to_json` writes them, sites as :func:`site_dict` shapes them (with
their token's digest: :func:`site_token`, :func:`set_token`; and the token index that finds a
site from a digest: :func:`token_json`, :func:`token_owner`), and the rule that a published
version never changes (:func:`check_republish`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from typing import Any

from icbdcache.replication.registry.base import RegistryError, SiteTokenExists, VersionRecord

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
    """A site's stored record: ``{"name", "address", "subscriptions"}``, and ``"token":
    {"sha256", "created"}`` once it has a token (:func:`set_token`)."""
    return {"name": name, "address": address, "subscriptions": list(subscriptions or [])}


def site_token(site: dict[str, Any]) -> tuple[str, float] | None:
    """(SHA-256 hex, seconds since the epoch it was made) of a stored site record's token,
    or None if it has none."""
    t = site.get("token")
    if not isinstance(t, dict) or not isinstance(t.get("sha256"), str):
        return None
    created = t.get("created")
    return t["sha256"], float(created) if isinstance(created, int | float) else 0.0


def set_token(site: dict[str, Any], digest: str, created: float, replace: bool) -> str | None:
    """Put a token (its SHA-256 hex, made at ``created``) into a stored site record; the
    digest it replaces, or None. Raises SiteTokenExists if the record has a token and
    ``replace`` is false (the record is then unchanged)."""
    old = site_token(site)
    if old is not None and not replace:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(old[1]))
        raise SiteTokenExists(f"site {site.get('name')} already has a token (made {when}); "
                              "replace it (admin site add --force: the old one stops "
                              "working) or forget the site")
    site["token"] = {"sha256": digest, "created": created}
    return old[0] if old else None


def token_json(site: str) -> bytes:
    """The value of a token's index record: ``{"site": NAME}``."""
    return json.dumps({"site": site}).encode()


def token_owner(raw: bytes | None) -> str | None:
    """The site of a token index record (:func:`token_json`), or None."""
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise RegistryError(f"malformed token record: {e}") from e
    site = d.get("site") if isinstance(d, dict) else None
    return site if isinstance(site, str) else None
