"""What the store says about versions, and its errors (no LMDB here: the records and
exceptions every caller of :class:`~icbdcache.store.lmdbstore.Store` sees)."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from icbdcache.store.chunks import CHUNK_SIZE, chunk_count
from icbdcache.store.owners import ClientUse, Owner, describe


class StoreError(Exception):
    """The store cannot do what was asked (unknown version, bad chunk, full)."""


class ChunkMismatch(StoreError):
    """A chunk's bytes do not hash to the digest it was offered under."""


class VersionExists(StoreError):
    """A version of that name exists (versions never change; ``--force`` replaces one)."""


class VersionBusy(StoreError):
    """Another live process is creating a version of that name (its pending record)."""


class VersionInUse(StoreError):
    """Clients run the version (``clients``); replacing, retiring or deleting it needs an
    explicit override."""

    def __init__(self, key: str, clients: list[ClientUse], what: str) -> None:
        super().__init__(f"{key} is in use by {len(clients)} client(s): {describe(clients)}; "
                         f"{what}")
        self.key = key
        self.clients = clients


class StoreFull(StoreError):
    """The store's bound cannot hold a version beside the versions it must keep (pinned,
    pending, in use)."""


def new_instance() -> str:
    """A random id for one creation of a version (a replaced version gets a new one)."""
    return secrets.token_hex(8)


@dataclass
class VersionMeta:
    """What the store knows of one iMI version. Sizes in bytes, times in seconds since the
    epoch. ``instance``: a random id per creation (a version replaced under the same name gets
    a new one, so a process that opened the old one notices); ``manifest``: hex xxh3-128 of the
    chunk map it was created with (import, publish, a replica's adopted manifest; None for maps
    learned as they are read); ``retired``: retired by the master and kept only for the clients
    that still run it; ``kernel``/``initrd``: boot files, paths relative to the store."""

    imi: str
    version: str
    size: int
    chunk_size: int = CHUNK_SIZE
    sources: list[str] = field(default_factory=list)
    pinned: bool = False
    created: float = 0.0
    kernel: str | None = None
    initrd: str | None = None
    instance: str = ""
    manifest: str | None = None
    retired: bool = False
    strong: str | None = None
    statement: str | None = None
    signature: str | None = None

    @property
    def key(self) -> str:
        return version_key(self.imi, self.version)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> VersionMeta:
        """A VersionMeta from :meth:`to_json` output (fields it does not know are ignored)."""
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in _META_FIELDS})


_META_FIELDS = frozenset(f.name for f in fields(VersionMeta))


def version_key(imi: str, version: str) -> str:
    """``IMI@VERSION``, the name of a version everywhere (export names too)."""
    return f"{imi}@{version}"


def split_key(key: str) -> tuple[str, str | None]:
    """``IMI@VERSION`` -> (IMI, VERSION); ``IMI`` -> (IMI, None)."""
    imi, sep, version = key.rpartition("@")
    return (imi, version) if sep else (key, None)


@dataclass
class Pending:
    """A version being created (an import or publish copying its chunks): its name, whether it
    will be pinned, its ``owner`` process and whether that still runs (``alive``; a dead
    owner's record is reclaimable), when it started, and the bytes of the chunks it protects
    from eviction so far."""

    imi: str
    version: str
    owner: Owner
    started: float
    pinned: bool
    alive: bool = True
    chunks: int = 0

    @property
    def key(self) -> str:
        return version_key(self.imi, self.version)

    def to_json(self) -> bytes:
        return json.dumps({"imi": self.imi, "version": self.version,
                           "owner": self.owner.to_json(), "started": self.started,
                           "pinned": self.pinned}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Pending:
        d: Any = json.loads(raw)
        owner = Owner.from_json(d.get("owner"))
        return cls(str(d["imi"]), str(d["version"]), owner, float(d.get("started") or 0.0),
                   bool(d.get("pinned")), alive=owner.alive())
