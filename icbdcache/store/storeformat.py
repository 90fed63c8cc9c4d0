"""The store's format: which layout of records a store holds, and what reads it.

A store records its format (``meta`` key ``format``, a decimal number). This release reads and
writes :data:`FORMAT`; a store without the key that already has databases was made before
formats were recorded (format 1: no strong digests); a store of a higher format was made by a
newer release. Neither is read: opening one raises :class:`StoreFormatError`, which names
what to do (``icbd-cache store upgrade`` for an older one). Formats:

=======  =====================================================================================
format   layout
=======  =====================================================================================
1        chunks, atime, maps, versions, meta, profiles, records, pending (no ``format`` key)
2        as 1, plus ``strong`` (per version, the BLAKE3-256 digest of each chunk index, 32 bytes
         each: docs/store.md) and the version fields ``strong``, ``statement``, ``signature``
=======  =====================================================================================

Upgrading 1 -> 2 (:meth:`~icbdcache.store.lmdbstore.Store.upgrade`) writes, in one write
transaction, the strong map of every version that was made here (imported or published: the
admin's own) from the chunks held (a chunk not held gets STRONG_UNKNOWN), and none for
versions replicated from a master: the replica takes the master's signed strong map on its
next sync and drops every chunk it holds that does not match it.
"""

from __future__ import annotations

from icbdcache.store.meta import StoreError

#: The format this release reads and writes.
FORMAT = 2
#: The format of a store that records none (made before formats were recorded).
UNRECORDED = 1
#: The ``meta`` key holding the format.
FORMAT_KEY = b"format"


class StoreFormatError(StoreError):
    """The store has a format this release does not read (older: upgrade it; newer: use the
    release that made it). ``found``: its format."""

    def __init__(self, message: str, found: int) -> None:
        super().__init__(message)
        self.found = found


def upgrade_command(path: str) -> str:
    """The command that upgrades the store at ``path``."""
    return f"icbd-cache store upgrade --store {path}"


def check(path: str, found: int) -> None:
    """Raise StoreFormatError unless a store of format ``found`` at ``path`` can be read."""
    if found == FORMAT:
        return
    if found < FORMAT:
        raise StoreFormatError(
            f"store {path} has format {found}, made by an older icbd-cache (this one reads "
            f"format {FORMAT}: strong chunk digests); nothing reads it until it is upgraded "
            f"in place: {upgrade_command(path)}", found)
    raise StoreFormatError(
        f"store {path} has format {found}, made by a newer icbd-cache (this one reads format "
        f"{FORMAT}); use that release", found)


def parse(raw: bytes | None, has_databases: bool) -> int | None:
    """The format recorded as ``raw`` (None: no key), with ``has_databases`` whether the
    store has any database beside ``meta``: None for a new, empty store (it gets FORMAT)."""
    if raw is None:
        return UNRECORDED if has_databases else None
    try:
        return int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return FORMAT + 1  # not a number this release writes: from a newer one, or damaged


__all__ = ["FORMAT", "FORMAT_KEY", "UNRECORDED", "StoreFormatError", "check", "parse",
           "upgrade_command"]
