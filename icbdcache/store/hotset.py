"""The store's memory tier: chunks kept in process memory, least recently used first out.

Measured on these machines (docs/store.md): the page cache lost 23% of a 64 MiB file left idle
for 90 s while anonymous process memory stayed resident, so the chunks a boot storm needs are
kept in the server's own memory rather than trusted to the page cache between storms.
"""

from __future__ import annotations

from collections import OrderedDict


class HotSet:
    """Chunks by digest within ``budget`` bytes (0 turns the tier off)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        #: The read path's hit, without a Python call: ``peek(key)`` is the chunk's bytes or
        #: None and changes nothing; ``used_now(key)`` makes a chunk ``peek`` found the most
        #: recently used (both are the dict's own C methods). :meth:`get` is the two together.
        self.peek = self._d.get
        self.used_now = self._d.move_to_end

    def get(self, key: bytes) -> bytes | None:
        """The chunk's bytes (now the most recently used), or None."""
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, data: bytes) -> None:
        """Admit a chunk, evicting the least recently used beyond the budget."""
        if self.budget <= 0 or key in self._d:
            return
        self._d[key] = data
        self.used += len(data)
        while self.used > self.budget and self._d:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: bytes) -> bool:
        return key in self._d
