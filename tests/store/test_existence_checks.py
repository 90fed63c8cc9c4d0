"""Store.held_of and Store.missing find chunks by key: they ask for no chunk's value
(py-lmdb's ``get`` touches every page of the value it returns, to fault it in: 16 pages a
chunk, where LMDB alone reads its first; a check of a 1.4 GB version took 0.12 s that way,
0.06 s by key). Counted: the chunk values the store's transactions return."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from icbdcache.store import Store, VersionMeta
from icbdcache.store.chunks import ZERO, digest

CHUNK = 65536
N = 64


class _Txn:
    """A transaction that counts the values of chunk size its ``get`` returns."""

    def __init__(self, txn: Any, seen: list[int]) -> None:
        self._txn = txn
        self._seen = seen

    def __enter__(self) -> _Txn:
        self._txn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._txn.__exit__(*exc)

    def get(self, *a: Any, **kw: Any) -> Any:
        out = self._txn.get(*a, **kw)
        if out is not None and len(out) == CHUNK:
            self._seen.append(len(out))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


class _Env:
    def __init__(self, env: Any, seen: list[int]) -> None:
        self._env = env
        self._seen = seen

    def begin(self, **kw: Any) -> _Txn:
        return _Txn(self._env.begin(**kw), self._seen)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def test_held_of_and_missing_read_no_chunk(tmp_path: Path) -> None:
    rng = random.Random(11)
    chunks = [rng.randbytes(CHUNK) for _ in range(N)]
    keys = [digest(c) for c in chunks]
    store = Store(tmp_path / "s")
    try:
        store.write_batch(list(zip(keys, chunks, strict=True)), verified=True)
        store.create_version(VersionMeta("lab", "1", (N + 2) * CHUNK, CHUNK, []),
                             b"".join(keys) + ZERO + rng.randbytes(16))
        absent = [rng.randbytes(16) for _ in range(20)]
        seen: list[int] = []
        real = store.env
        store.env = _Env(real, seen)
        try:
            assert store.held_of("lab@1") == (N * CHUNK, (N + 1) * CHUNK)
            assert store.missing(keys + absent + [ZERO]) == absent
            assert store.get_chunk(keys[0]) == chunks[0]  # the counter sees a chunk read
        finally:
            store.env = real
        assert seen == [CHUNK]
    finally:
        store.close()
