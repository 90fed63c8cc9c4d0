"""Boot profiles: which chunks a version's clients read during their first minutes.

A profile is the list of chunk indexes first read by the clients of a version during the
``window`` seconds after each connected, in first-read order (at most ``limit`` chunks). It is
kept in the store (``profiles`` database) and drives the readahead layer
(:mod:`icbdcache.layers.readahead`) and ``icbd-cache warm``. This module only records and
answers; it never fetches.
"""

from __future__ import annotations

import time

from icbdcache.store import Store


class BootProfile:
    """The profile of version ``key`` in ``store`` (loaded at once). ``window``: seconds of a
    client's life that are recorded; ``ahead``: chunks one readahead step covers;
    ``instance``: the creation of the version opened (``VersionMeta.instance``): once the
    store's version of that name is another one (replaced), this profile is not saved."""

    def __init__(self, store: Store, key: str, *, window: float = 120.0, ahead: int = 16,
                 limit: int = 1 << 16, instance: str | None = None) -> None:
        self.store = store
        self.key = key
        self.instance = instance
        self.window = window
        self.ahead = ahead
        self.limit = limit
        self.order: list[int] = store.profile(key)
        self.position = {idx: n for n, idx in enumerate(self.order)}
        #: Chunks whose read starts the next readahead step (the middle of the last window).
        self.marks: set[int] = set()
        #: Monotonic time until which reads are recorded (0: not recording).
        self.recording_until = 0.0
        self.dirty = False

    def client_started(self, now: float) -> None:
        """A client connected at ``now`` (monotonic seconds): record its first minutes."""
        self.recording_until = max(self.recording_until, now + self.window)

    def record(self, first: int, last: int) -> None:
        """Chunks ``first..last`` were read: add the new ones to the profile."""
        if time.monotonic() > self.recording_until:
            self.recording_until = 0.0
            return
        pos = self.position
        for i in range(first, last + 1):
            if i not in pos and len(self.order) < self.limit:
                pos[i] = len(self.order)
                self.order.append(i)
                self.dirty = True

    def step(self, last: int) -> list[int]:
        """The chunks to read ahead after chunk ``last`` was read (the next ``ahead`` of the
        profile; empty if ``last`` is not in it); marks the middle of that window."""
        self.marks.discard(last)
        pos = self.position.get(last)
        if pos is None:
            return []
        window = self.order[pos + 1 : pos + 1 + self.ahead]
        if len(window) > 1:
            self.marks.add(window[len(window) // 2])
        return window

    def save(self) -> None:
        """Write the profile to the store if it changed. Raises StoreError."""
        if self.dirty:
            self.dirty = False
            self.store.put_profile(self.key, list(self.order), self.instance)
