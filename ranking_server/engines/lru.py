"""`LRU`: the one bounded least-recently-used store of the engines (shared-prefix KV and per-user context KV
in the hf engine, the reference prefixes of the one-at-a-time baseline)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Values by key within `capacity`, measured by `weigh(value)` (default 1 each: a count); a `get` hit
    or a `put` makes the key the most recent, the least recently used go first. A value heavier than the
    whole capacity is not kept. Counts hits, misses and evictions."""

    def __init__(self, capacity: float, weigh: Callable[[V], float] = lambda value: 1):
        self.capacity = capacity
        self.weigh = weigh
        self.weight = 0.0  # what the kept values weigh together
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[Hashable, tuple[V, float]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: V) -> None:
        weight = self.weigh(value)
        if key in self._items:
            self.weight -= self._items.pop(key)[1]
        if weight > self.capacity:
            return
        self._items[key] = (value, weight)
        self.weight += weight
        while self.weight > self.capacity:
            _, (_, dropped) = self._items.popitem(last=False)
            self.weight -= dropped
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items
