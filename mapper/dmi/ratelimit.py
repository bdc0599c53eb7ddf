"""Token buckets: one shaped like edgecore's DMI limiter, and one per client of the REST API.

TokenBucket is shaped like golang.org/x/time/rate (edgecore's: 1 token/s, burst 100). One bucket
per mapper: every call to edgecore (register, twins, states) takes a token first, so the mapper as
a whole never runs into edgecore's "too many request" refusals. ClientBuckets holds one per REST
API client, so that no client can flood the twin with writes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable

# Clients given a bucket at once: an attacker with many addresses must not grow the table without bound.
MAX_CLIENTS = 1024


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


class ClientBuckets:
    """A TokenBucket (`rate_per_s`, `burst`) per client, taken from without waiting: `try_take`.

    At most `max_clients` buckets: one more forgets the least recently used, whose client starts
    again with a full bucket (the same as one left alone for burst/rate seconds). Thread-safe: the
    REST API's connection threads share one (TokenBucket.try_take alone is not)."""

    def __init__(self, rate_per_s: float, burst: int, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        TokenBucket(rate_per_s, burst)  # the same checks of rate and burst, at once
        self.rate = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[Hashable, TokenBucket] = {}  # least recently used first
        self.refused = 0

    def try_take(self, client: Hashable) -> float:
        """Take a token from `client`'s bucket (0.0), else the seconds until one will be there."""
        with self._lock:
            bucket = self._buckets.pop(client, None)
            if bucket is None:
                if len(self._buckets) >= self.max_clients:
                    del self._buckets[next(iter(self._buckets))]
                bucket = TokenBucket(self.rate, self.burst, clock=self._clock)
            self._buckets[client] = bucket
            wait = bucket.try_take()
            if wait > 0:
                self.refused += 1
            return wait

    def __len__(self) -> int:
        return len(self._buckets)
