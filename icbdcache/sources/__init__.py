"""Sources: where a cache miss gets its bytes.

The interface, its two error classes and the retry policy are in :mod:`icbdcache.sources.base`
(re-exported here); the implementations are :mod:`~icbdcache.sources.snapshot` (a raw image
file), :mod:`~icbdcache.sources.nbd` (any NBD server) and :mod:`~icbdcache.sources.master` (a
master, by chunk digest); :func:`open_source` makes one from a spec string.
"""

from __future__ import annotations

from icbdcache.sources.base import (
    DEFAULT_RETRY,
    NBD_PORT,
    RetryClock,
    RetryPolicy,
    Source,
    SourceDataError,
    SourceError,
    SourceStats,
    SourceUnavailable,
)


def open_source(
    spec: str, *, size: int | None = None, timeout: float = 5.0, connections: int = 4
) -> Source:
    """Make the source that ``spec`` names; nothing is opened or connected until the first read.

    ``spec``: a path to a raw image (a snapshot file), ``nbd://HOST[:PORT]/EXPORT`` (port 10809
    by default, IPv6 hosts in brackets) or ``nbd+unix:///EXPORT?socket=PATH``. ``size``: the
    expected image size in bytes (a file or export of another size is refused); ``timeout``:
    seconds per read, retries included; ``connections``: most NBD connections kept open (NBD
    only).

    Raises ValueError on a malformed spec or an unknown scheme.
    """
    if "://" in spec:
        from icbdcache.sources.nbd import NBDSource

        return NBDSource.from_uri(spec, size=size, timeout=timeout, connections=connections)
    if not spec:
        raise ValueError("empty source spec")
    from icbdcache.sources.snapshot import SnapshotSource

    return SnapshotSource(spec, size=size, timeout=timeout)



__all__ = [
    "DEFAULT_RETRY",
    "NBD_PORT",
    "RetryClock",
    "RetryPolicy",
    "Source",
    "SourceDataError",
    "SourceError",
    "SourceStats",
    "SourceUnavailable",
    "open_source",
]
