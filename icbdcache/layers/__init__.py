"""The read path as a stack of layers, after nbdkit's plugins and filters.

An export is a stack; each layer holds ``next`` and passes through what it does not define
(:mod:`icbdcache.layers.base`). From the top:

===========  ===============================  ================================================
layer        module                           job
===========  ===============================  ================================================
overlay      :mod:`~.overlay`                 per-client copy-on-write (``,cow``,
                                              ``--store-cow``); one overlay per client, kept
                                              in ``--cow-dir`` (:mod:`~.cowdir`: recovery,
                                              lingers, tombstones; :mod:`~.cowfile`: the
                                              files and their fsync order)
readahead    :mod:`~.readahead`               sequential and boot-profile readahead, as
                                              ``next.cache()`` hints only
fault        :mod:`~.fault`                   single-flight fetch of missing chunks from the
                                              sources, digest check, storing
version      :mod:`~.version`                 a version's chunk map over the store; hits only
file         :mod:`~.file`                    a raw image file (``--export NAME=FILE``)
===========  ===============================  ================================================

A store export is ``[overlay ->] readahead -> fault -> version``, reading the store through
its tiers (:mod:`icbdcache.store.reader`: hot set, writer queue, LMDB); a file export is
``[overlay ->] file``. docs/architecture.md draws the stack and a read through it.
"""

from icbdcache.layers.base import HOLE, Buffer, Client, Layer, ReadResult, transmission_flags

__all__ = ["HOLE", "Buffer", "Client", "Layer", "ReadResult", "transmission_flags"]
