"""Page-aligned buffers counted against the budget."""

from __future__ import annotations

import threading

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
