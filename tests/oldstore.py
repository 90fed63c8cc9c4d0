"""Stores as older releases left them, for the tests of store formats (issue 16).

A store of this release is turned into one of format 1 by taking out what format 2 brought:
the ``format`` key, the ``strong`` database and the version fields ``strong``, ``statement``
and ``signature``. ``lmdb`` is used here, in the tests: the project's code opens LMDB only in
icbdcache/store/ (tests/store/test_sealed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import lmdb


def make_old(store: Path) -> None:
    """Turn a store of this release into one of format 1."""
    env = lmdb.open(str(store), max_dbs=20, map_size=1 << 30)
    try:
        meta, versions = env.open_db(b"meta"), env.open_db(b"versions")
        strong = env.open_db(b"strong")
        with env.begin(write=True) as txn:
            txn.delete(b"format", db=meta)
            txn.drop(strong, delete=True)
            for k, v in list(txn.cursor(db=versions)):
                d = json.loads(v)
                for f in ("strong", "statement", "signature"):
                    d.pop(f, None)
                txn.put(k, json.dumps(d).encode(), db=versions)
    finally:
        env.close()


def set_format(store: Path, value: bytes) -> None:
    env = lmdb.open(str(store), max_dbs=20, map_size=1 << 30)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"format", value, db=meta)
    finally:
        env.close()
