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

