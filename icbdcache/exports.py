"""Exports: what ``icbd-cache serve`` offers by name, and the stack each connection talks to.

An export name may carry options after ``?`` (``lab?boot=ID``); the catalog resolves the bare
name once per NBD_OPT_GO/INFO and its answer (:class:`Resolved`) travels with the export's
:class:`~nbd.events.ExportInfo` into transmission, so a connection is attached to exactly the
export whose size and flags it was told (a name such as ``lab``, the latest version, may point
elsewhere a moment later). The transmission flags are built from the stack's ``can_*``
answers (:func:`~icbdcache.layers.base.transmission_flags`).

Each connection asks through its own :class:`PeerCatalog`, which adds the client's address to
the question: a version the master retired is kept at the site only for the clients that run
it, and the node answers for them alone. An export of a store version tells the node when a
connection of a client starts and ends (who runs which version, docs/store.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl

from icbdcache.access import AllowList, parse_cidr
from icbdcache.layers.base import Client, Layer, transmission_flags
from icbdcache.layers.cowdir import CowDir
from icbdcache.layers.file import FileLayer
from icbdcache.layers.overlay import OverlayLayer, OverlayLost, Overlays
from icbdcache.log import kv
from nbd.errors import ExportUnavailable
from nbd.events import ExportInfo

log = logging.getLogger("icbdcache.exports")


@dataclass(frozen=True)
class ExportSpec:
    """One ``--export NAME=PATH[,cow][,allow=CIDR][,tls-name=NAME]...`` argument:
    ``allow``, the networks whose clients may use it (none: every client ``--allow`` lets in);
    ``tls_names``, the certificate names (subject CN or subjectAltName) of the clients that
    may use it (none: any client; some: only clients with a verified certificate carrying one
    of them, ``serve --tls-ca``)."""

    name: str
    path: str
    cow: bool = False
    allow: tuple[str, ...] = ()
    tls_names: tuple[str, ...] = ()

    @property
    def is_upstream(self) -> bool:
        """An ``nbd://`` URI: a version faulted from an NBD upstream into the store."""
        return "://" in self.path

    @classmethod
    def parse(cls, text: str) -> ExportSpec:
        """Parse ``NAME=PATH[,cow][,allow=CIDR][,tls-name=NAME]...`` (``allow=`` and
        ``tls-name=`` repeatable). Raises ValueError with a message for the user."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--export wants NAME=PATH[,cow][,allow=CIDR], got {text!r}")
        if "?" in name or len(name.encode()) > 4096:
            raise ValueError(f"export name {name!r} may not contain '?' or exceed 4096 bytes")
        if "://" in rest:
            return cls(name, rest)  # an upstream URI may contain commas; no options
        path, _, opts = rest.partition(",")
        cow = False
        allow: list[str] = []
        names: list[str] = []
        for opt in filter(None, opts.split(",")):
            if opt == "cow":
                cow = True
            elif opt.startswith("allow="):
                allow.append(parse_cidr(opt.removeprefix("allow=")))
            elif opt.startswith("tls-name="):
                tls_name = opt.removeprefix("tls-name=")
                if not tls_name:
                    raise ValueError(f"empty tls-name= in {text!r}")
                names.append(tls_name)
            else:
                raise ValueError(f"unknown export option {opt!r} in {text!r} (known: cow, "
                                 "allow=CIDR, tls-name=NAME)")
        return cls(name, path, cow, tuple(allow), tuple(names))


class Export:
    """A served export: ``stack`` (its top layer, shared by every connection; for a writable
    export the :class:`~icbdcache.layers.overlay.OverlayLayer`) and ``owned``, the layers this
    export made and closes (a version's own layers belong to the node). ``attach(address)``
    and ``detach(address)``, when given, are told of each connection that starts and ends."""

    def __init__(self, name: str, stack: Layer, *, description: str,
                 owned: Sequence[Layer] = (), identity: str = "") -> None:
        self.name = name
        self.stack = stack
        #: what identifies the bytes below any overlay (a file's inode, size and mtime; a
        #: version's key, size and creation time): another export of the same name with
        #: another identity serves other bytes (a server hand-over checks it)
        self.identity = identity or name
        self.size = stack.size
        self.description = description
        self.owned = list(owned)
        self.overlays = stack if isinstance(stack, OverlayLayer) else None
        #: Clients allowed to use this export (``allow=`` of ``--export``; empty: any).
        self.allow = AllowList()
        #: Certificate names that may use this export (``tls-name=``; empty: any client).
        self.tls_names: frozenset[str] = frozenset()
        self.attach: Callable[[str], None] | None = None
        self.detach: Callable[[str], None] | None = None
        #: connections to this export now
        self.connections = 0
        #: told when the last connection ends (set by the catalog on an export it retired)
        self.on_unused: Callable[[Export], None] | None = None

    @classmethod
    def of_layer(cls, name: str, base: Layer, *, overlays: Overlays | None = None,
                 base_id: str = "", what: str = "") -> Export:
        """``base`` as an export, under a copy-on-write overlay per client if ``overlays``
        (where the overlays live: the server's ``--cow-dir``) is given; ``base_id`` identifies
        the bytes of ``base`` (an overlay made over other bytes is never reused); ``what``
        starts the description (NBD_INFO_DESCRIPTION)."""
        owned: list[Layer] = []
        stack = base
        if overlays is not None:
            stack = OverlayLayer(base, overlays, name, base_id or name)
            owned.append(stack)
        mode = "copy-on-write per client" if overlays is not None else "read-only"
        text = f"{what}, " if what else ""
        return cls(name, stack, description=f"{text}{_human(base.size)}, {mode}", owned=owned,
                   identity=base_id or name)

    @classmethod
    def from_file(cls, spec: ExportSpec, *, overlays: Overlays | None = None) -> Export:
        """An export of a raw image file, copy-on-write in ``overlays`` if ``spec.cow``
        (ValueError without them). Raises OSError if the file cannot be opened."""
        if spec.cow and overlays is None:
            raise ValueError(f"export {spec.name}: copy-on-write needs a --cow-dir")
        base = FileLayer(spec.path)
        export = cls.of_layer(spec.name, base, overlays=overlays if spec.cow else None,
                              base_id=base.fingerprint)
        export.owned.append(base)
        export.allow = AllowList(spec.allow)
        export.tls_names = frozenset(spec.tls_names)
        return export

    @property
    def writable(self) -> bool:
        return self.stack.can_write()

    def info(self, handle: object = None) -> ExportInfo:
        """What a client is told of this export; flags from the stack's ``can_*``."""
        return ExportInfo(name=self.name, size=self.size, flags=transmission_flags(self.stack),
                          description=self.description, handle=handle)

    def check(self, client: Client) -> None:
        """Raise OverlayLost if ``client`` would be refused (its overlay is gone)."""
        if self.overlays is not None:
            self.overlays.check(client)

    def connect(self, client: Client) -> Layer:
        """The layer a new connection of ``client`` talks to. Raises OSError (no overlay;
        OverlayLost: refused until the client boots anew)."""
        view = self.stack.connect(client)
        self.connections += 1
        if self.attach is not None:
            self.attach(client.identity)
        return view

    def disconnect(self, client: Client, view: Layer) -> None:
        """A connection of ``client`` that talked to ``view`` closed."""
        self.stack.disconnect(client, view)
        self.connections = max(0, self.connections - 1)
        if self.detach is not None:
            self.detach(client.identity)
        if self.connections == 0 and self.on_unused is not None:
            self.on_unused(self)

    def close(self) -> None:
        for layer in self.owned:
            layer.close()


@dataclass(frozen=True)
class Resolved:
    """The catalog's answer for a requested name: the export, and the options after ``?``."""

    export: Export
    options: dict[str, str] = field(default_factory=dict)


def split_name(requested: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME?k=v&k2=v2`` into the bare name and its options."""
    name, _, query = requested.partition("?")
    return name, dict(parse_qsl(query, keep_blank_values=True))


class OpenedVersion(Protocol):
    """A store version opened by the node: its key (``IMI@VERSION``), its stack's top, and
    what it is told of its clients' connections."""

    @property
    def key(self) -> str: ...

    @property
    def top(self) -> Layer: ...

    def attach(self, address: str) -> None: ...

    def detach(self, address: str) -> None: ...

    @property
    def fingerprint(self) -> str:
        """What identifies the version's bytes (a version made anew under the same key has
        another)."""
        ...


class VersionSource(Protocol):
    """Versions in a store (:class:`icbdcache.node.Node`), exported by name on demand; a
    ``client`` (address) asking may be refused a version kept only for others."""

    def resolve(self, name: str, client: str | None = None) -> OpenedVersion | None: ...

    def exports(self) -> list[tuple[str, str]]: ...


class Catalog:
    """Exports by name, answering the NBD state machine's questions (nbd.server.ExportCatalog).

    Fixed exports (``--export``) come first; other names are looked up in ``versions`` (the
    store: ``IMI@VERSION``, or ``IMI`` for its latest version, resolved when a client asks,
    so a client keeps the version it opened). The empty name is the default export:
    ``default`` if given (a fixed export, a version or an iMI), else the first fixed export.
    ``cowdir`` holds every writable export's overlays; with ``versions_cow`` the versions are
    writable through it too. Raises ValueError if ``default`` names nothing, or for
    ``versions_cow`` without ``cowdir``.
    """

    def __init__(self, exports: Sequence[Export], default: str | None = None,
                 versions: VersionSource | None = None, *, versions_cow: bool = False,
                 cowdir: CowDir | None = None) -> None:
        if versions_cow and cowdir is None:
            raise ValueError("writable store versions need a --cow-dir")
        self.by_name = {e.name: e for e in exports}
        self.versions = versions
        self.versions_cow = versions_cow
        self.cowdir = cowdir
        #: Exports of opened versions by key, with the stack top they were made over.
        self._version_exports: dict[str, tuple[Layer, Export]] = {}
        #: Exports of versions reopened since, while their connections still use them (each
        #: goes with its last connection).
        self._retired: list[Export] = []
        if default is not None and default not in self.by_name and (
                versions is None or versions.resolve(default) is None):
            raise ValueError(f"--default-export {default!r} is not an export")
        self.default = default if default is not None else (exports[0].name if exports else None)

    def resolve(self, requested: str, client: str | None = None) -> Resolved | None:
        """The export ``requested`` names (options after ``?`` split off), or None;
        ``client``: the address of the client asking (None: not a client's question)."""
        name, options = split_name(requested)
        if not name and self.default is not None:
            name = self.default
        export = self.by_name.get(name)
        if export is None and self.versions is not None and name:
            try:
                opened = self.versions.resolve(name, client)
            except Exception:  # a damaged version must not break option haggling for others
                log.exception(kv(export=name, error="cannot open version"))
                return None
            if opened is not None:
                export = self._version_export(opened)
        return Resolved(export, options) if export is not None else None

    def _version_export(self, opened: OpenedVersion) -> Export:
        top = opened.top
        cached = self._version_exports.get(opened.key)
        if cached is not None and cached[0] is top:
            return cached[1]
        export = Export.of_layer(opened.key, top,
                                 overlays=self.cowdir if self.versions_cow else None,
                                 base_id=opened.fingerprint, what="iMI version")
        export.attach, export.detach = opened.attach, opened.detach
        self._version_exports[opened.key] = (top, export)
        if cached is not None:
            old = cached[1]
            if old.connections:  # still used by its connections: goes with the last
                old.on_unused = self._drop_retired
                self._retired.append(old)
            else:
                old.close()
        return export

    def _drop_retired(self, export: Export) -> None:
        """The last connection of a retired version's export ended: close and forget it
        (without it every replaced version's export stayed, with its stack, for good)."""
        if export in self._retired:
            self._retired.remove(export)
            export.on_unused = None
            export.close()

    def lookup(self, name: str, client: str | None = None) -> ExportInfo | None:
        """What the client at address ``client`` (None: anyone) is told of export ``name``.
        Raises ExportUnavailable when that client is refused (its overlay is gone)."""
        found = self.resolve(name, client)
        if found is None:
            return None
        if client is not None:
            try:
                found.export.check(Client(client, found.options, time.monotonic()))
            except OverlayLost as e:
                log.warning(kv(export=found.export.name, client=client, refused=e))
                raise ExportUnavailable(str(e)) from None
        return found.export.info(handle=found)

    def for_peer(self, address: Callable[[], str],
                 refused: Callable[[str, str], None] | None = None, *,
                 identity: Callable[[], str] | None = None,
                 names: Callable[[], frozenset[str]] | None = None) -> PeerCatalog:
        """The catalog as one connection asks it: ``address()`` is its client's address;
        ``refused(export name, why)`` is told of each export its ``allow=`` or ``tls-name=``
        list keeps from it (``why``: which list, and why); ``identity()`` the client identity
        its overlays belong to (default: the address); ``names()`` the names of its verified
        TLS certificate (default: none)."""
        return PeerCatalog(self, address, refused, identity=identity, names=names)

    def exports(self) -> Sequence[tuple[str, str]]:
        fixed = [(e.name, e.description) for e in self.by_name.values()]
        return fixed + (self.versions.exports() if self.versions is not None else [])

    def all(self) -> list[Export]:
        """Every export made so far: fixed ones and opened versions."""
        return [*self.by_name.values(), *(e for _, e in self._version_exports.values()),
                *self._retired]

    def expire(self, now: float) -> int:
        """Expire every overlay (and forget every tombstone) idle beyond the linger, of any
        export, opened in this run or not (``now``: monotonic seconds); how many."""
        return self.cowdir.expire(now) if self.cowdir is not None else 0

    def close(self) -> None:
        """Close every export, then the overlays (synced, so a restart finds them whole)."""
        for e in self.all():
            e.close()
        if self.cowdir is not None:
            self.cowdir.close()


class PeerCatalog:
    """One connection's view of a :class:`Catalog` (nbd.server.ExportCatalog): its questions
    carry the client's address (``address()``, known once the connection is made). An export
    whose ``allow=`` list leaves that address out is unknown to it (not listed, and
    NBD_OPT_GO answers ERR_UNKNOWN) and reported to ``refused(export name)``; a Unix-socket
    client (``unix:...``) is local and sees every export but those with a ``tls-name=`` list,
    which only a client whose verified certificate carries one of the names sees."""

    def __init__(self, catalog: Catalog, address: Callable[[], str],
                 refused: Callable[[str, str], None] | None = None, *,
                 identity: Callable[[], str] | None = None,
                 names: Callable[[], frozenset[str]] | None = None) -> None:
        self.catalog = catalog
        self.address = address
        self.refused = refused
        self.identity = identity or address
        self.names = names or frozenset

    def _allowed(self, export: Export) -> bool:
        return self._refusal(export) is None

    def _refusal(self, export: Export) -> str | None:
        """Why ``export`` is hidden from this client (None: it is not)."""
        if export.tls_names and not export.tls_names & self.names():
            return ("no verified certificate names one of the export's tls-name= names"
                    if not self.names() else
                    f"the certificate's names are not in the tls-name= list of export "
                    f"{export.name}")
        addr = self.address()
        if not export.allow or addr.startswith("unix:") or export.allow.allows(addr):
            return None
        return f"{self.identity()} is not in the allow= list of export {export.name}"

    def lookup(self, name: str) -> ExportInfo | None:
        info = self.catalog.lookup(name, self.identity())
        handle = info.handle if info is not None else None
        if isinstance(handle, Resolved):
            why = self._refusal(handle.export)
            if why is not None:
                if self.refused is not None:
                    self.refused(handle.export.name, why)
                return None
        return info

    def exports(self) -> Sequence[tuple[str, str]]:
        by_name = self.catalog.by_name
        return [(n, d) for n, d in self.catalog.exports()
                if n not in by_name or self._allowed(by_name[n])]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
