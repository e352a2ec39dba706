"""Page-aligned buffers counted against the budget, and a token bucket for emulated storage speed."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from edge_sdk.errors import MemoryBudgetError

from edge_sdk.paging_model import PAGE, page_round


class Ledger:
    """Bytes the paging executor holds; refuses to go past the budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.current = 0
        self.peak = 0
        self.items: dict[str, int] = {}
        self._lock = threading.Lock()

    def charge(self, name: str, nbytes: int) -> None:
        with self._lock:
            if self.current + nbytes > self.budget_bytes:
                raise MemoryBudgetError(f"paging would hold {self.current + nbytes:,} bytes ({name}), over the budget "
                                        f"of {self.budget_bytes:,}", hint="raise the memory budget")
            self.items[name] = self.items.get(name, 0) + nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def release(self, name: str) -> None:
        with self._lock:
            self.current -= self.items.pop(name, 0)

    def aligned(self, name: str, nbytes: int) -> np.ndarray:
        """A uint8 buffer of page_round(nbytes) bytes starting on a page boundary (what O_DIRECT needs)."""
        size = page_round(nbytes)
        self.charge(name, size)
        raw = np.empty(size + PAGE, np.uint8)
        start = (-raw.ctypes.data) % PAGE
        return raw[start:start + size]


class TokenBucket:
    """Read throttle: at most `rate` bytes/s on average, bursts up to `burst` bytes."""

    def __init__(self, rate: float, burst: int = 8 << 20, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.burst, self.clock, self.sleep = float(rate), burst, clock, sleep
        self.tokens = float(burst)
        self.last = clock()

    def take(self, n: int) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)
