"""Logging set-up: one line per event, `LEVEL logger: message`, readable in `journalctl -u mapper`.

Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority (`<3>` for an
error, sd-daemon(3)), so `journalctl -u mapper -p warning` shows warnings and worse; the
journal adds its own timestamps, so ours are left out there.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Hashable

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """Prefixes each record with `<N>`, its syslog priority, for journald."""

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITY[level]}>{super().format(record)}"


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class Throttle:
    """At most `burst` log lines per key in each `interval_s`.

    Refused input (a malformed payload, an unknown device) is logged one line each, and a
    client sending thousands a second must not turn the log, on a Pi an SD card, into its
    echo; the counters keep every refusal. Keys must come from a fixed set (a reason, a
    message kind), never from the input. Call it per line: None means hold the line back,
    a number means log it, noting that many lines of the same key held back before it.
    """

    def __init__(self, burst: int = 10, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._windows: dict[Hashable, list[float]] = {}  # key -> [window start, lines let through, held back]

    def __call__(self, key: Hashable) -> int | None:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            held = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            return held
        if window[1] < self.burst:
            window[1] += 1
            held, window[2] = int(window[2]), 0
            return held
        window[2] += 1
        return None

    def reset(self, key: Hashable) -> None:
        """Forget `key`'s window: its next line is let through at once (a new episode starts)."""
        self._windows.pop(key, None)


def held_note(held: int) -> str:
    """The suffix of a line let through after `held` of its kind were not logged."""
    return f" ({held} more like this not logged)" if held else ""



# While a connection stays away with the same cause, a line says so at most this often (Outage): a
# line per reconnect attempt was ~2,900 a day, written to the Pi's SD card.
OUTAGE_NOTE_S = 300.0


def utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_s))


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


class Outage:
    """The log of a connection retried while its peer is away (the MQTT broker, edgecore).

    The outage's first failure and each change of its cause are told at WARNING (or by the
    caller's own ERROR line: told()); the same cause again is not (DEBUG), except a note at
    most every `note_s` that the outage still lasts, since when and after how many attempts;
    the connection, when it comes, is told once with how long it was down (back()).
    """

    FIRST, STILL = "first", "still"

    def __init__(self, note_s: float = OUTAGE_NOTE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.note_s = note_s
        self._clock = clock
        self.since: float | None = None  # wall clock (time.time) of the outage's first failure
        self.attempts = 0                # attempts failed since then
        self._told: str | None = None    # the cause last told at WARNING or above; None: none this outage
        self._told_at = 0.0

    def down(self) -> None:
        """The connection is away (lost, or an attempt failed): the outage starts unless it has."""
        if self.since is None:
            self.since = time.time()

    def failed(self) -> None:
        """An attempt to connect failed (a connection that was made and lost is not one)."""
        self.down()
        self.attempts += 1

    def tell(self, cause: str) -> str | None:
        """How to log a failure with `cause`. FIRST: in full at WARNING (the outage's first failure,
        or its cause changed); STILL: a WARNING that it still lasts (note()); None: at DEBUG."""
        self.down()
        now = self._clock()
        if cause != self._told:
            verdict: str | None = self.FIRST
        elif now - self._told_at >= self.note_s:
            verdict = self.STILL
        else:
            return None
        self._told, self._told_at = cause, now
        return verdict

    def told(self, cause: str) -> None:
        """`cause` was logged at WARNING or above by the caller's own line."""
        self._told, self._told_at = cause, self._clock()

    def note(self) -> str:
        """`still ... since <UTC time>`'s words: `since 2026-11-30 21:24:08Z`."""
        return f"since {utc(self.since or time.time())}"

    def back(self) -> str | None:
        """Connected: the outage is over. Its words for the INFO line (`after 5 min down (since
        <UTC time>; 12 failed attempts)`), None when there was none; the next one is told from its
        start."""
        since, attempts = self.since, self.attempts
        self.since, self.attempts, self._told = None, 0, None
        if since is None:
            return None
        return f"after {duration(max(0.0, time.time() - since))} down (since {utc(since)}; {attempts} failed attempts)"
