"""The expert cache of the MoE paging executor (experts.py): at most `capacity` entries keyed by
(layer, expert), evicted by a policy.

- `lru`: least recently used goes first (the baseline);
- `lfu`: LFU with dynamic aging (LFU-DA): priority = the cache's age + uses, counted across evictions;
  the age rises to each evicted priority, so experts popular long ago do not stay forever.
"""

from __future__ import annotations

import collections
import heapq

POLICIES = ("lru", "lfu")


class LRUPolicy:
    def __init__(self):
        self.order: collections.OrderedDict = collections.OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key) -> None:
        self.order.pop(key, None)

    def victim(self, protected) -> object | None:
        return next((k for k in self.order if k not in protected), None)


class LFUPolicy:
    """Least frequently used with dynamic aging (LFU-DA): an expert's priority is the cache's age plus
    how often it has been used (counted across evictions), the lowest goes first, and the age rises to
    each evicted priority, so experts popular long ago do not stay forever. Ties: least recently used."""

    def __init__(self):
        self.count: dict = {}  # uses of every expert seen, cached or not
        self.priority: dict = {}  # cached experts only
        self.age = 0.0
        self.clock = 0
        self.heap: list = []

    def touch(self, key) -> None:
        self.clock += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.priority[key] = (self.age + self.count[key], self.clock)
        heapq.heappush(self.heap, (*self.priority[key], key))
        if len(self.heap) > 4 * len(self.priority) + 64:
            self.heap = [(*p, k) for k, p in self.priority.items()]
            heapq.heapify(self.heap)

    def remove(self, key) -> None:
        p = self.priority.pop(key, None)
        if p is not None:
            self.age = max(self.age, p[0])

    def victim(self, protected) -> object | None:
        held, found = [], None
        while self.heap:
            pri, t, k = item = heapq.heappop(self.heap)
            if self.priority.get(k) != (pri, t):
                continue  # stale entry
            held.append(item)
            if k not in protected:
                found = k
                break
        for h in held:
            heapq.heappush(self.heap, h)
        return found


def make_policy(name: str):
    return LRUPolicy() if name == "lru" else LFUPolicy()


class ExpertCache:
    """At most `capacity` expert sessions, evicted by `policy`; keys are (layer, expert)."""

    def __init__(self, capacity: int, policy: str):
        self.capacity = capacity
        self.policy = make_policy(policy)
        self.entries: dict = {}

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key):
        e = self.entries.get(key)
        if e is not None:
            self.policy.touch(key)
        return e

    def put(self, key, entry, protected=frozenset()) -> list:
        """Insert (counted as a use); returns the evicted keys."""
        evicted = []
        while len(self.entries) >= self.capacity and key not in self.entries:
            v = self.policy.victim(protected | {key})
            if v is None:
                break
            self.entries.pop(v, None)
            self.policy.remove(v)
            evicted.append(v)
        if len(self.entries) < self.capacity or key in self.entries:
            self.entries[key] = entry
            self.policy.touch(key)
        return evicted
