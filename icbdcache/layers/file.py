"""The bottom of a file export: a raw image file, read-only, mapped into memory.

Notes on the design
-------------------
* Reads return memoryviews of the mapping: no copy on the hit path, and the kernel's page
  cache is the only cache.
* The file must not shrink while it is served (an access to a page past the new end is a
  SIGBUS): serve snapshots, not files that are being written.
* CACHE is ``madvise(MADV_WILLNEED)``; ``base:allocation`` comes from SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from icbdcache.layers.base import HOLE, Buffer, Layer


class FileLayer(Layer):
    """A raw image file at ``path``. Raises OSError if it cannot be opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(None)
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.size = st.st_size
        #: What identifies these bytes: another file, or this one changed, has another.
        self.fingerprint = f"file ino={st.st_ino} size={st.st_size} mtime_ns={st.st_mtime_ns}"
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

    def can_cache(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return True  # read-only: every connection sees the same bytes

    def can_extents(self) -> bool:
        return True

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
