"""Small helpers shared by the modules that run LMDB transactions on the store
(:mod:`~icbdcache.store.lmdbstore`, :mod:`~icbdcache.store.lifecycle`)."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import lmdb

U64 = struct.Struct(">Q")

P = ParamSpec("P")
T = TypeVar("T")


class _Fails(Protocol):
    def _failed(self, e: Exception) -> Exception: ...


S = TypeVar("S", bound=_Fails)


def lmdb_errors(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """A store method that raises StoreError (the store's ``_failed``) where LMDB raised
    ``lmdb.Error``, so nothing outside this package needs ``lmdb`` (the caller's own exceptions
    pass through)."""
    @functools.wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except lmdb.Error as e:
            raise self._failed(e) from e

    return wrapper


def get_u64(txn: Any, db: Any, key: bytes) -> int:
    """The u64 big-endian value at ``key`` of ``db`` (0 if absent)."""
    raw = txn.get(key, db=db)
    return int(U64.unpack(bytes(raw))[0]) if raw is not None else 0


def held_in(txn: Any, db: Any, keys: set[bytes]) -> int:
    """Bytes of the chunks of ``keys`` held in ``db`` (the chunks), read in ``txn``."""
    held = 0
    for k in keys:
        buf = txn.get(k, db=db)
        if buf is not None:
            held += len(buf)
    return held


def scan(txn: Any, db: Any, prefix: str) -> list[tuple[str, bytes]]:
    """(key, value) of the entries of ``db`` whose key starts with ``prefix``, in key order."""
    if db is None:
        return []
    p = prefix.encode()
    out: list[tuple[str, bytes]] = []
    with txn.cursor(db=db) as cur:
        if cur.set_range(p):
            for k, v in cur:
                if not bytes(k).startswith(p):
                    break
                out.append((bytes(k).decode(), bytes(v)))
    return out


def digests_of(blob: bytes, size: int = 16) -> set[bytes]:
    """The distinct entries of a chunk map or digest list (``size`` bytes each)."""
    return {blob[i : i + size] for i in range(0, len(blob), size)}
