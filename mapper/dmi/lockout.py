"""Clients refused for a while after repeated failed authentications (the REST API's bearer token).

A wrong token costs the API a constant-time comparison and the client nothing, so without this a
client on the LAN could try tokens as fast as the Pi answers. Keyed by whatever the caller names a
client by (the REST API: its address, an IPv6 one's /64).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

# Clients tracked at once: an attacker with many addresses must not grow the table without bound.
MAX_CLIENTS = 1024


class AuthLockout:
    """`limit` failures of a client within `window_s` of its first lock it out until that window
    ends: `locked` then says for how long, and the caller refuses the client without looking at
    what it sent. A fixed window from the first failure: a client guessing gets `limit` guesses a
    window, however fast it sends them.

    At most `max_clients` clients are tracked: those whose window has ended are forgotten first,
    else the one whose window began first (its count starts again). Thread-safe: the REST API's
    connection threads share one."""

    def __init__(self, limit: int, window_s: float, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError(f"limit and max_clients must be >= 1 and window_s > 0, got limit={limit} "
                             f"window_s={window_s} max_clients={max_clients}")
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        # client -> [window start, failures in it]; in order of window start (a new window re-inserts),
        # so the ended windows are always at the front.
        self._clients: dict[Hashable, list[float]] = {}
        self.failures = 0  # every failure recorded, for the log

    def locked(self, client: Hashable) -> float:
        """Seconds left of `client`'s lockout; 0.0 when it is not locked out."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None or entry[1] < self.limit:
                return 0.0
            return max(0.0, entry[0] + self.window_s - self._clock())

    def failed(self, client: Hashable) -> bool:
        """Record a failure of `client`; True when it is the one that locks the client out."""
        with self._lock:
            now = self._clock()
            self.failures += 1
            entry = self._clients.get(client)
            if entry is None or now - entry[0] >= self.window_s:
                self._clients.pop(client, None)
                self._make_room(now)
                entry = self._clients[client] = [now, 0]
            entry[1] += 1
            return entry[1] == self.limit

    def __len__(self) -> int:
        return len(self._clients)

    def _make_room(self, now: float) -> None:
        clients = self._clients
        while clients:
            oldest = next(iter(clients))
            if now - clients[oldest][0] < self.window_s and len(clients) < self.max_clients:
                return
            del clients[oldest]
