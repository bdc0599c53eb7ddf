"""Clients refused for a while after repeated wrong tokens (the REST API's bearer token).

A wrong token costs the API a constant-time comparison and the client nothing, so without this a
client on the LAN could try tokens as fast as the Pi answers. Keyed by whatever the caller names a
client by (the REST API: its address).

Who can be refused, and what a guesser gets. A lockout that refuses a client without comparing
its token gives a guesser at that client's address `limit` guesses a window, and gives anyone who
shares the address the means to refuse the owner the right token: `limit` wrong tokens a window
keep the address locked out for good. Both are the same `limit`; no scheme that refuses without
comparing has the one without the other. The alternatives do not do better:

* Comparing during a lockout (a wrong token answered 429, the right one accepted) never refuses
  the owner, but every request is a guess again, answered 200 or 429: the guesser gets the full
  request rate (about 2,000 wrong tokens a second from one client thread on a 2-core x86 box,
  fewer on a Pi), and the lockout is a label.
* Slowing the wrong ones during a lockout (their answer held back d seconds) holds a connection
  each: a guesser keeping api.max_connections (16) of them busy gets 16/d guesses a second, and
  every other client, the owner included, 503: a denial again, of every address.

So the lockout keeps its refusal, and the caller does not apply it where the owner shares the
address with whoever might guess: clients with no key (`attempt(None, ...)`) are compared every
time and never locked out. The REST API passes none for this machine's addresses (loopback): a TLS
proxy on the Pi, through which every client arrives from 127.0.0.1, and every local user. There
a guesser gets the full request rate, which is hopeless against the tokens the API takes: at
least 16 characters, `openssl rand -hex 32` recommended; 16 random hex characters alone are
16^16 (1.8e19) tokens, 300 million years at 2,000 a second. The lockout is for the LAN, where a host
has its own address and a guesser gets `limit` tokens a window (a proxy on the Pi can limit its
own clients, by their addresses, which the API does not see). NAT (clients behind one router)
shares an address too: `limit` 0 turns the lockout off (every wrong token still counted).

Check, comparison and count are one step under one lock (`attempt`): at most `limit` wrong tokens
of a client are compared per window, however many of its requests are in flight at once. A
window begins at the first wrong token after the last one ended, so any `window_s` seconds see at
most 2 * limit - 1 (the last limit - 1 of one window, the first `limit` of the next). The
comparison (hmac.compare_digest of a header) takes microseconds; requests wait for each other
that long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

# Clients tracked at once: an attacker with many addresses must not grow the table without bound.
MAX_CLIENTS = 1024


class Attempt(NamedTuple):
    """What came of a token: `right`; else, with `retry_after` > 0, the client was locked out and
    nothing was compared; else it was wrong, and `locks` says whether it locked the client out."""

    right: bool
    retry_after: float = 0.0
    locks: bool = False


class AuthLockout:
    """`limit` wrong tokens of a client within `window_s` of its first lock it out until that
    window ends: `attempt` then refuses it without comparing. A fixed window from the first
    failure: a client guessing gets `limit` guesses a window, however fast it sends them.
    `limit` 0: nobody is ever locked out.

    At most `max_clients` clients are tracked: those whose window has ended are forgotten first,
    else the one whose window began first (its count starts again). Thread-safe: the REST API's
    connection threads share one."""

    def __init__(self, limit: int, window_s: float, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 0 or window_s <= 0 or max_clients < 1:
            raise ValueError(f"limit must be >= 0, max_clients >= 1 and window_s > 0, got limit={limit} "
                             f"window_s={window_s} max_clients={max_clients}")
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        # client -> [window start, failures in it]; in order of window start (a new window re-inserts),
        # so the ended windows are always at the front.
        self._clients: dict[Hashable, list[float]] = {}
        self.failures = 0  # every wrong token compared, for the log
        self.refused = 0  # tokens refused uncompared, the client locked out

    def attempt(self, client: Hashable | None, matches: Callable[[], bool]) -> Attempt:
        """Compare a token (`matches()`) unless `client` is locked out, and count it if wrong: one
        step, under the lock, so that requests in flight at once cannot all pass the check before
        any is counted. `client` None: never locked out, its wrong tokens counted in `failures` only."""
        with self._lock:
            if (left := self._locked(client)) > 0:
                self.refused += 1
                return Attempt(False, left)
            if matches():
                return Attempt(True)
            self.failures += 1
            if client is None or self.limit == 0:
                return Attempt(False)
            return Attempt(False, locks=self._failed(client))

    def locked(self, client: Hashable | None) -> float:
        """Seconds left of `client`'s lockout; 0.0 when it is not locked out."""
        with self._lock:
            return self._locked(client)

    def __len__(self) -> int:
        return len(self._clients)

    def _locked(self, client: Hashable | None) -> float:
        entry = self._clients.get(client) if client is not None and self.limit else None
        if entry is None or entry[1] < self.limit:
            return 0.0
        return max(0.0, entry[0] + self.window_s - self._clock())

    def _failed(self, client: Hashable) -> bool:
        """Count a failure of `client`; True when it is the one that locks the client out."""
        now = self._clock()
        entry = self._clients.get(client)
        if entry is None or now - entry[0] >= self.window_s:
            self._clients.pop(client, None)
            self._make_room(now)
            entry = self._clients[client] = [now, 0]
        entry[1] += 1
        return entry[1] == self.limit

    def _make_room(self, now: float) -> None:
        clients = self._clients
        while clients:
            oldest = next(iter(clients))
            if now - clients[oldest][0] < self.window_s and len(clients) < self.max_clients:
                return
            del clients[oldest]
