"""A token bucket shaped like edgecore's DMI limiter (golang.org/x/time/rate: 1 token/s, burst 100).

One bucket per mapper: every call to edgecore (register, twins, states) takes a token first,
so the mapper as a whole never runs into edgecore's "too many request" refusals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate_per_s} burst={burst}")
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)  # starts full, like rate.NewLimiter
        self._updated = clock()
        self._lock = asyncio.Lock()
        self.taken = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def try_take(self) -> float:
        """Take a token if one is there (returns 0.0), else the seconds until one will be."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.taken += 1
            return 0.0
        return (1.0 - self._tokens) / self.rate

    async def take(self) -> None:
        """Wait for a token; callers are served in arrival order."""
        async with self._lock:
            while (wait := self.try_take()) > 0:
                await asyncio.sleep(wait)
