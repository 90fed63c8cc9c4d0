"""The registry interface shared by the master, the admin API and both backends (which
import it; it imports none of them: :mod:`.factory` opens one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class RegistryError(Exception):
    """The registry cannot do what was asked: unknown site or version, backend unreachable."""


class SiteTokenExists(RegistryError):
    """The site already has a token (replace it explicitly, or forget the site)."""


@dataclass
class VersionRecord:
    """One published iMI version as the registry knows it. ``size`` and ``chunk_size`` in
    bytes; ``manifest``: hex xxh3-128 of the chunk map; ``distinct_bytes``: bytes of its
    distinct non-zero chunks (what a full replication moves before compression);
    ``published``: seconds since the epoch; ``retired``: no longer offered to replicas."""

    imi: str
    version: str
    size: int
    chunk_size: int
    manifest: str
    distinct_bytes: int = 0
    published: float = 0.0
    retired: bool = False
    master: str = ""  # URL of the master that holds its chunks

    @property
    def key(self) -> str:
        return f"{self.imi}@{self.version}"


@dataclass
class SiteRecord:
    """One site (a replica). ``last_seen``: seconds since the epoch of its last keep-alive;
    ``up``: a keep-alive arrived within the registry's ``down_after`` seconds; ``report``: the
    replica's last keep-alive body (versions held, bytes behind, state, errors; see
    docs/replication.md, 'Keep-alive'); ``token_created``: seconds since the epoch when its
    registry token was made, 0.0 if it has none."""

    name: str
    address: str = ""
    subscriptions: list[str] = field(default_factory=list)
    last_seen: float = 0.0
    up: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    token_created: float = 0.0


class Registry(ABC):
    """The registry. Every method may raise RegistryError. ``down_after``: seconds without a
    keep-alive after which a site is shown down."""

    down_after: float = 30.0

    # ------------------------------------------------------------------ catalog
    @abstractmethod
    async def publish(self, record: VersionRecord) -> None:
        """Add a version (replacing nothing: publishing an existing IMI@VERSION with another
        manifest raises RegistryError). Advances the generation."""

    @abstractmethod
    async def retire(self, imi: str, version: str) -> None:
        """Mark a version retired. Raises RegistryError if unknown. Advances the generation."""

    @abstractmethod
    async def unretire(self, imi: str, version: str) -> None:
        """Offer a retired version again (no-op if it is not retired). Raises RegistryError if
        unknown. Advances the generation."""

    @abstractmethod
    async def versions(self, imi: str | None = None) -> list[VersionRecord]:
        """Published versions (retired ones included), oldest first, of one iMI or all."""

    @abstractmethod
    async def generation(self) -> int:
        """A number that grows whenever the catalog or any subscription changes."""

    @abstractmethod
    async def wait_change(self, since: int, timeout: float) -> int:
        """Return the generation as soon as it is greater than ``since``, or after
        ``timeout`` seconds (then it may equal ``since``)."""

    # ------------------------------------------------------------------ sites
    @abstractmethod
    async def register(self, site: str, address: str) -> SiteRecord:
        """Create or update a site (its NBD address for the admin's view)."""

    @abstractmethod
    async def keepalive(self, site: str, report: dict[str, Any]) -> SiteRecord:
        """Record a keep-alive of ``site`` now (registering it if new). Returns its record."""

    @abstractmethod
    async def subscribe(self, site: str, imi: str) -> None:
        """Subscribe ``site`` to ``imi`` (creating the site if new). Advances the generation."""

    @abstractmethod
    async def unsubscribe(self, site: str, imi: str) -> None:
        """Drop a subscription (no error if absent). Advances the generation."""

    @abstractmethod
    async def forget(self, site: str) -> bool:
        """Remove ``site``: its record, subscriptions, keep-alives and token, in one step (its
        token stops working at once; a site that sends a keep-alive again is created anew,
        if its credentials still let it in). Returns whether it was known. Advances the
        generation if it was."""

    # ------------------------------------------------------------------ site tokens
    @abstractmethod
    async def set_site_token(self, site: str, digest: str, created: float, *,
                             replace: bool = False) -> bool:
        """Give ``site`` a token, kept as ``digest`` (the token's SHA-256, hex: the token
        itself is never stored), made at ``created`` (seconds since the epoch); the site is
        created if new. Returns whether an earlier token was replaced (it stops working).
        Raises SiteTokenExists if the site has a token and ``replace`` is false. Does not
        advance the generation."""

    @abstractmethod
    async def token_site(self, digest: str) -> str | None:
        """The site whose token has SHA-256 ``digest`` (hex), or None (unknown, replaced or
        revoked)."""

    @abstractmethod
    async def sites(self) -> list[SiteRecord]:
        """Every site, by name, with ``up`` computed from ``down_after``."""

    async def site(self, name: str) -> SiteRecord | None:
        for s in await self.sites():
            if s.name == name:
                return s
        return None

    async def close(self) -> None:
        """Release connections (no-op by default)."""

