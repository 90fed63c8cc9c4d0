"""Exports: what ``icbd-cache serve`` offers by name, and how a connection gets its stack.

An export name may carry options after ``?`` (``lab?boot=ID``); the catalog resolves the bare
name and hands the options to the connection (see :mod:`icbdcache.overlay` for ``boot``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl

from icbdcache.backend import Backend, FileBackend
from icbdcache.log import kv
from icbdcache.overlay import CowOverlay, OverlayRegistry
from nbd.constants import TransmissionFlag
from nbd.events import ExportInfo

log = logging.getLogger("icbdcache.exports")

READ_ONLY_FLAGS = (
    TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_CACHE | TransmissionFlag.CAN_MULTI_CONN
)
#: A ,cow export: every connection of one client shares its overlay in this process and
#: replies only after a write is applied, so FLUSH/FUA effects are visible across that
#: client's connections (CAN_MULTI_CONN's promise, NBD proto.md 'Transmission flags').
COW_FLAGS = (
    TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_CACHE | TransmissionFlag.CAN_MULTI_CONN
)


@dataclass(frozen=True)
class ExportSpec:
    """One ``--export NAME=PATH[,cow]`` argument."""

    name: str
    path: str
    cow: bool = False

    @property
    def is_upstream(self) -> bool:
        """An ``nbd://`` URI: a version faulted from an NBD upstream into the store."""
        return "://" in self.path

    @classmethod
    def parse(cls, text: str) -> ExportSpec:
        """Parse ``NAME=PATH[,cow]``. Raises ValueError with a message for the user."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--export wants NAME=PATH[,cow], got {text!r}")
        if "?" in name or len(name.encode()) > 4096:
            raise ValueError(f"export name {name!r} may not contain '?' or exceed 4096 bytes")
        if "://" in rest:
            return cls(name, rest)  # an upstream URI may contain commas; no options
        path, _, opts = rest.partition(",")
        cow = False
        for opt in filter(None, opts.split(",")):
            if opt == "cow":
                cow = True
            else:
                raise ValueError(f"unknown export option {opt!r} in {text!r} (known: cow)")
        return cls(name, path, cow)


class Export:
    """A served export: its base layer, and for ,cow exports the per-client overlays."""

    def __init__(self, name: str, base: Backend, *, cow: bool = False,
                 cow_dir: str | None = None, cow_linger: float = 120.0,
                 description: str | None = None) -> None:
        self.name = name
        self.base = base
        mode = "copy-on-write per client" if cow else "read-only"
        self.info = ExportInfo(
            name=name,
            size=base.size,
            flags=COW_FLAGS if cow else READ_ONLY_FLAGS,
            description=description or f"{_human(base.size)}, {mode}",
        )
        self.overlays: OverlayRegistry | None = None
        if cow:
            self.overlays = OverlayRegistry(lambda: CowOverlay(base, cow_dir), cow_linger)

    @classmethod
    def from_file(cls, spec: ExportSpec, *, cow_dir: str | None = None,
                  cow_linger: float = 120.0) -> Export:
        """An export of a raw image file. Raises OSError if it cannot be opened."""
        return cls(spec.name, FileBackend(spec.path), cow=spec.cow, cow_dir=cow_dir,
                   cow_linger=cow_linger)

    def open(self, identity: str, options: dict[str, str]) -> Backend:
        """The stack a new connection of client ``identity`` reads and writes."""
        profile = getattr(self.base, "profile", None)
        if profile is not None:
            profile.client_started(time.monotonic())
        if self.overlays is None:
            return self.base
        return self.overlays.acquire(identity, options.get("boot"), time.monotonic())

    def release(self, identity: str, backend: Backend) -> None:
        """A connection of ``identity`` that used ``backend`` (from :meth:`open`) closed."""
        if self.overlays is not None and isinstance(backend, CowOverlay):
            self.overlays.release(identity, backend, time.monotonic())

    def close(self) -> None:
        if self.overlays is not None:
            self.overlays.close()
        self.base.close()


def split_name(requested: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME?k=v&k2=v2`` into the bare name and its options."""
    name, _, query = requested.partition("?")
    return name, dict(parse_qsl(query, keep_blank_values=True))


class VersionSource(Protocol):
    """Versions in a store (icbdcache.node.Node), exported by name on demand."""

    def resolve(self, name: str) -> Backend | None: ...

    def exports(self) -> list[tuple[str, str]]: ...


class Catalog:
    """Exports by name, answering the NBD state machine's questions (nbd.server.ExportCatalog).

    Fixed exports (``--export``) come first; other names are looked up in ``versions`` (the
    store: ``IMI@VERSION``, or ``IMI`` for its latest version, resolved when a client connects,
    so a client keeps the version it opened). The empty name is the default export:
    ``default`` if given, else the first fixed export.
    """

    def __init__(self, exports: Sequence[Export], default: str | None = None,
                 versions: VersionSource | None = None, *, versions_cow: bool = False,
                 cow_dir: str | None = None, cow_linger: float = 120.0) -> None:
        self.by_name = {e.name: e for e in exports}
        self.versions = versions
        self.versions_cow = versions_cow
        self.cow_dir = cow_dir
        self.cow_linger = cow_linger
        self._version_exports: dict[int, Export] = {}
        if default is not None and default not in self.by_name and (
                versions is None or versions.resolve(default) is None):
            raise ValueError(f"--default-export {default!r} is not an export")
        self.default = default if default is not None else (exports[0].name if exports else None)

    def resolve(self, requested: str) -> tuple[Export, dict[str, str]] | None:
        name, options = split_name(requested)
        if not name and self.default is not None:
            name = self.default
        export = self.by_name.get(name)
        if export is None and self.versions is not None and name:
            try:
                backend = self.versions.resolve(name)
            except Exception:  # a damaged version must not break option haggling for others
                log.exception(kv(export=name, error="cannot open version"))
                return None
            if backend is not None:
                export = self._version_exports.get(id(backend))
                if export is None:
                    meta = getattr(backend, "meta", None)
                    mode = "copy-on-write per client" if self.versions_cow else "read-only"
                    export = Export(getattr(meta, "key", name), backend,
                                    cow=self.versions_cow, cow_dir=self.cow_dir,
                                    cow_linger=self.cow_linger,
                                    description=f"iMI version, {_human(backend.size)}, {mode}")
                    self._version_exports[id(backend)] = export
        return (export, options) if export is not None else None

    def lookup(self, name: str) -> ExportInfo | None:
        found = self.resolve(name)
        return found[0].info if found else None

    def exports(self) -> Sequence[tuple[str, str]]:
        fixed = [(e.name, e.info.description) for e in self.by_name.values()]
        return fixed + (self.versions.exports() if self.versions is not None else [])

    def close(self) -> None:
        for e in self.by_name.values():
            e.close()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
