"""What a serving process's imports made is kept out of the cyclic garbage collector's passes
(:func:`freeze_startup`).

Notes on the design
-------------------
* CPython's collector walks every tracked object of the oldest generation in a full pass, with
  the GIL held: the event loop, and the store's writer thread, stop meanwhile. A serving
  process holds about 51,000 such objects that live as long as it does (the modules,
  classes and functions its imports made), and every full pass walked them.
* ``gc.freeze()`` moves the objects that exist into a generation no pass looks at (Python's
  ``gc`` documentation). It is called as a serving process starts, once its imports are
  done and before it opens its store and exports or a ``--handover`` socket (a successor's
  pass there once widened the moment between its connecting and its hello: a test saw its
  predecessor log a failed hand-over instead of a rolled-back one), after one full pass so
  that no garbage of the start is frozen with them.
* Measured (``gc.callbacks`` timing in a 1-worker ``serve --store`` of a 1 GiB image from a
  loopback nbdkit, 2 shared vCPUs). Before: a cold fill by 15 connections of 4 KiB reads
  made 3 full passes, the longest 62-72 ms, 125-150 ms in all; two warm-up copies of the
  image made 7, the longest 94 ms, 400 ms in all. After: 2 passes in the cold fill, the
  longest 19 and 48 ms, 26-57 ms in all; 6 in the warm-up copies, the longest 63 ms,
  144 ms in all. What the passes still walk is what the process has in flight then: the
  callbacks of the writer's queue and the tasks of the requests (10,000-55,000 objects).
* What is frozen is never collected. It is what the process started with, kept for its life;
  a catalog replaced by a SIGHUP reload is not freed if it is in a cycle (one, of a few
  hundred objects, per reload; not frozen again).
"""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """One full collection, then every object tracked now out of the collector's sight
    (``gc.freeze``); returns how many objects are frozen in all (``gc.get_freeze_count``).
    Call as a serving process starts, once its imports are done."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


__all__ = ["freeze_startup"]
