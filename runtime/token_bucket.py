"""A token bucket over bytes: the telemetry link budget and the emulated storage read speed."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """Fills at `rate` bytes/s up to `capacity` bytes (the largest burst); `rate` None: no limit."""

    def __init__(self, rate: float | None, capacity: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = None if rate is None else float(rate)
        self.capacity, self._clock, self._sleep = capacity, clock, sleep
        self._tokens, self._t = float(capacity), clock()

    def _refill(self) -> None:
        t = self._clock()
        self._tokens = min(self.capacity, self._tokens + (t - self._t) * (self.rate or 0))
        self._t = t

    def wait_time(self, n: int) -> float:
        """Seconds until n bytes may pass (0 = now)."""
        if self.rate is None:
            return 0.0
        self._refill()
        return max(0.0, (n - self._tokens) / self.rate)

    def take(self, n: int) -> None:
        """n bytes passed (the bucket may go into debt)."""
        if self.rate is not None:
            self._refill()
            self._tokens -= n

    def pace(self, n: int) -> None:
        """Take n bytes, sleeping off any debt: at most `rate` bytes/s on average."""
        self.take(n)
        if self.rate is not None and self._tokens < 0:
            self._sleep(-self._tokens / self.rate)
