"""Sliding windows of a device's readings, one step = one good reading of every property.

Readings of different properties arrive separately (each has its own collect task). A
*step* is complete when every property of the pipeline has a good reading newer than the
previous step; it holds the latest value of each. Readings of bad quality are skipped (a
failed DHT read just delays the step).

Gap policy: when a step comes more than `max_gap_ms` after the previous one (the device was
unhealthy, the mapper was stopped, readings were bad for a while), or before it (the clock
went back), the buffer starts over, so a window never spans a gap or a jump of the clock. `min_step_ms` subsamples: a step closer than that to the
previous one is dropped (for a model trained at a slower cadence than the collect cycle).

Once the buffer holds `length` steps, every `stride`-th step yields a window: a flat list,
time-major, oldest first: [p0[t-W+1], p1[t-W+1], ..., p0[t], p1[t]].
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twin.records import GOOD, Reading


@dataclass(frozen=True, slots=True)
class Window:
    values: tuple[float, ...]
    start_ms: int
    end_ms: int


class WindowBuilder:
    def __init__(self, properties: tuple[str, ...], *, length: int, stride: int = 1,
                 max_gap_ms: int | None = None, min_step_ms: int = 0) -> None:
        if length < 1 or stride < 1:
            raise ValueError("length and stride must be >= 1")
        self.properties = properties
        self.length = length
        self.stride = stride
        self.max_gap_ms = max_gap_ms
        self.min_step_ms = min_step_ms
        self._steps: deque[tuple[int, tuple[float, ...]]] = deque(maxlen=length)
        self._current: dict[str, tuple[int, float]] = {}
        self._countdown = 1  # steps until the next window, once the buffer is full
        self._last_step_ms: int | None = None
        self.gaps = 0
        self.skipped = 0
        self.clock_back = 0  # steps older than the previous one (the clock went back): restarts too
        self.steps = 0  # live steps completed (subsampled ones too): whether the source still feeds the window

    def add(self, reading: Reading) -> Window | None:
        """Feed one reading of this device; returns a window when one is due."""
        if reading.property not in self.properties:
            return None
        if reading.quality != GOOD or isinstance(reading.value, bool) or not isinstance(reading.value, int | float):
            self.skipped += 1
            return None
        self._current[reading.property] = (reading.taken_at_ms, float(reading.value))
        if len(self._current) < len(self.properties):
            return None
        ts = max(t for t, _ in self._current.values())
        values = tuple(self._current[p][1] for p in self.properties)
        self._current.clear()
        return self._step(ts, values)

    def _step(self, ts: int, values: tuple[float, ...]) -> Window | None:
        self.steps += 1
        last = self._last_step_ms
        if last is not None and ts < last:
            # The clock went back (a Pi without a real-time clock, corrected by its time sync): a
            # window must not mix both sides, and min_step_ms must not drop every step until the
            # clock has caught up again. Starts over, like a gap.
            self.clock_back += 1
            last = None
            self.gaps += 1
            self._steps.clear()
            self._countdown = 1
        if last is not None and self.min_step_ms and ts - last < self.min_step_ms:
            return None
        if last is not None and self.max_gap_ms is not None and ts - last > self.max_gap_ms:
            self.gaps += 1
            self._steps.clear()
            self._countdown = 1
        self._last_step_ms = ts
        self._steps.append((ts, values))
        if len(self._steps) < self.length:
            return None
        if self._countdown > 1:
            self._countdown -= 1
            return None
        self._countdown = self.stride
        flat = tuple(v for _, step in self._steps for v in step)
        return Window(flat, self._steps[0][0], self._steps[-1][0])

    def seed(self, readings: list[Reading], now_ms: int) -> int:
        """Fill the buffer from earlier readings (oldest first, e.g. the twin's history after a
        restart), without yielding their windows: the next live step can then close a window at
        once instead of after `length` new steps. Not used: readings whose newest is more than
        `max_gap_ms` before `now_ms` (the first live step would start over anyway), or after it
        (the clock went back, e.g. a Pi without a real-time clock booting before its time sync).
        The gap, skip and step counters count live readings only. Returns the steps now buffered."""
        if not readings:
            return len(self._steps)
        age = now_ms - readings[-1].taken_at_ms
        if age < 0 or (self.max_gap_ms is not None and age > self.max_gap_ms):
            return len(self._steps)
        gaps, skipped, back, steps = self.gaps, self.skipped, self.clock_back, self.steps
        for reading in readings:
            self.add(reading)
        self._current.clear()  # a step the history left unfinished is not finished by live readings
        self.gaps, self.skipped, self.clock_back, self.steps = gaps, skipped, back, steps
        return len(self._steps)

    def reset(self) -> None:
        self._steps.clear()
        self._current.clear()
        self._countdown = 1
        self._last_step_ms = None
