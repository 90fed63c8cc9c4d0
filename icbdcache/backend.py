"""The export stack's common interface, and the raw image file at its bottom.

An export is a stack of small layers (after nbdkit's plugins and filters): each answers the
same few questions (``size``, ``read_only``) and requests (``pread``, ``pwrite``, ``zero``,
``flush``, ``cache``, ``extents``). Offsets and lengths are bytes; the NBD state machine has
already checked them against ``size``. Errors are raised as OSError with a host errno, which
the server maps to the NBD error values (NBD proto.md, 'Error values').
"""

from __future__ import annotations

import contextlib
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable

from nbd.constants import StateFlag

Buffer = bytes | bytearray | memoryview
#: What ``pread`` returns: the buffers now, or an awaitable of them (a cache miss, later).
ReadResult = list[Buffer] | Awaitable[list[Buffer]]

#: Extent flags of ``base:allocation`` for a hole that reads as zeros.
HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


class Backend(ABC):
    """One layer of an export."""

    size: int
    read_only: bool = True

    @abstractmethod
    def pread(self, offset: int, length: int) -> ReadResult:
        """Return ``length`` bytes at ``offset`` as buffers that stay valid until sent."""

    def pwrite(self, offset: int, data: Buffer) -> Awaitable[None] | None:
        """Write ``data`` at ``offset``, now (None) or when the returned awaitable completes
        (a layer that must first fault in bytes below). Raises PermissionError on a read-only
        layer."""
        raise PermissionError("read-only export")

    def zero(self, offset: int, length: int, no_hole: bool = False) -> Awaitable[None] | None:
        """Make ``length`` bytes at ``offset`` read as zeros; ``no_hole``
        (NBD_CMD_FLAG_NO_HOLE) keeps them allocated rather than a hole."""
        raise PermissionError("read-only export")

    def trim(self, offset: int, length: int) -> None:
        """Hint that the range is unused; its contents become unspecified."""
        raise PermissionError("read-only export")

    def flush(self) -> None:
        """Make completed writes durable as far as this layer promises."""

    def cache(self, offset: int, length: int) -> None:
        """Hint that the range will be read soon (NBD_CMD_CACHE)."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents from ``offset``: (length in bytes, flags) pairs that
        cover at most ``length`` bytes, at least the first byte."""
        return [(length, 0)]

    def close(self) -> None:
        """Release what the layer holds."""


class FileBackend(Backend):
    """A raw image file, read-only, mapped into memory.

    Reads return memoryviews of the mapping: no copy on the hit path, and the kernel's page
    cache is the only cache. The file must not shrink while it is served (an access to a page
    past the new end is a SIGBUS); serve snapshots, not files that are being written.

    Raises OSError if the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.read_only = True
        if self.size:
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
            self._map.madvise(mmap.MADV_RANDOM)
            self.view = memoryview(self._map)
        else:
            self._map = None
            self.view = memoryview(b"")

    def pread(self, offset: int, length: int) -> list[Buffer]:
        return [self.view[offset : offset + length]]

    def cache(self, offset: int, length: int) -> None:
        if self._map is not None:
            start = offset - offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_WILLNEED, start, offset + length - start)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return file_extents(self.fd, offset, length)

    def close(self) -> None:
        # The mapping stays until every view of it is gone; the fd can go now.
        with contextlib.suppress(OSError):
            os.close(self.fd)


def file_extents(fd: int, offset: int, length: int, limit: int = 1024) -> list[tuple[int, int]]:
    """Data and hole extents of a file with SEEK_DATA/SEEK_HOLE, from ``offset`` for at most
    ``length`` bytes and ``limit`` extents. File systems without hole reporting give one data
    extent."""
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    try:
        while pos < end and len(out) < limit:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole up to the end of the file
                data = end
            if data > pos:
                out.append((min(data, end) - pos, HOLE))
                pos = min(data, end)
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((min(hole, end) - pos, 0))
            pos = min(hole, end)
    except OSError:
        return [(length, 0)]
    return out or [(length, 0)]
