"""The `replay` protocol: plays back a recorded CSV series, at its own pace or faster.

configData:
  file: path to a UTF-8 CSV (a byte-order mark, as Excel writes, is fine) with a `timestamp`
        column (epoch seconds or ISO 8601, finite and in time order: equal times are allowed)
        and one column per property (relative paths are resolved against the device file's
        directory, then the CWD)
  speed: 1.0 = real time, 60 = a minute per second, 0 = one row per read (as fast as read)
  loop: start again at the end (default true); otherwise the last row keeps being returned.
        When looping, the last row is held for one row interval (the file's mean spacing:
        rows at 0, 10 and 20 s play for 10 s each, and the first comes again at 30 s).
visitors.configData:
  column: the CSV column for this property (default: the property name)

The file is checked whole when the device is loaded (`mapper validate`, `mapper run`, a
reload) and again when it is opened: the first bad row is an error naming the file and line
(a timestamp that is empty, unreadable, not finite or earlier than the row before; a row with
more or fewer fields than the header). An empty property cell is allowed: a read that meets
it fails, retryable.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError, ReadError


class ReplayConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    file: str = Field(min_length=1)
    speed: float = Field(default=1.0, ge=0)
    loop: bool = True


class ReplayVisitor(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    column: str | None = None


def _timestamp(text: str) -> float:
    """Epoch seconds of a `timestamp` cell; ValueError saying what is wrong with it."""
    if not text.strip():
        raise ValueError("the timestamp is empty")
    try:
        number = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
            # A time without a zone is read as UTC, not the machine's zone: only the spacing of
            # the rows matters, and local time would put a daylight-saving jump into it.
            return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"timestamp {text!r} is neither epoch seconds nor an ISO 8601 time") from None
    if not math.isfinite(number):
        raise ValueError(f"timestamp {text!r} is not a finite number")
    return number


def read_series(path: Path) -> tuple[list[float], list[dict[str, str]]]:
    """The rows of a replay CSV and their times in seconds from the first row.

    Raises DriverError naming the file and line of the first problem.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DriverError(f"cannot open replay file {path}: {exc}") from exc
    try:
        text = data.decode("utf-8-sig")  # Excel starts its UTF-8 CSVs with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DriverError(f"replay file {path}:{line}: not UTF-8 text ({exc.reason})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    times: list[float] = []
    rows: list[dict[str, str]] = []
    try:
        header = reader.fieldnames
        if not header or "timestamp" not in header:
            raise DriverError(f"replay file {path}:1: needs a header with a 'timestamp' column"
                              f" (found: {', '.join(header or []) or 'nothing'})")
        for row in reader:
            where = f"replay file {path}:{reader.line_num}"
            fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
            if fields != len(header):
                raise DriverError(f"{where}: the row has {fields} field(s), the header has {len(header)}")
            try:
                stamp = _timestamp(row["timestamp"])
            except ValueError as exc:
                raise DriverError(f"{where}: {exc}") from None
            if times and stamp < times[-1]:
                raise DriverError(f"{where}: timestamp {row['timestamp']!r} is earlier than the row before"
                                  f" ({rows[-1]['timestamp']!r}): rows must be in time order")
            times.append(stamp)
            rows.append(row)
    except csv.Error as exc:
        raise DriverError(f"replay file {path}:{reader.reader.line_num}: not valid CSV: {exc}") from None
    if not rows:
        raise DriverError(f"replay file {path}: no rows after the header")
    return [t - times[0] for t in times], rows


def _resolve(device: DeviceDefinition, config: ReplayConfig) -> Path:
    path = Path(config.file)
    if path.is_absolute():
        return path
    source_dir = Path(device.source.rsplit(":", 1)[0]).parent
    candidate = source_dir / path
    return candidate if candidate.exists() else path


class ReplayDriver(Driver):
    protocol = "replay"
    Config = ReplayConfig
    Visitor = ReplayVisitor

    def __init__(self, device: DeviceDefinition, *, clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the playback clock (tests pass one they move)."""
        super().__init__(device)
        self.config: ReplayConfig
        self._clock = clock
        self._times: list[float] = []
        self._rows: list[dict[str, str]] = []
        self._period = 0.0  # when looping, the first row comes again after this many seconds
        self._started = 0.0
        self._cursors: dict[str, int] = {}

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        try:
            read_series(_resolve(device, device.protocol_config))
        except DriverError as exc:
            yield "spec.protocol.configData.file", str(exc)

    def open(self) -> None:
        try:
            times, rows = read_series(_resolve(self.device, self.config))
        except DriverError as exc:
            raise DriverError(f"{self.device.id}: {exc}") from None
        span = times[-1]
        # The last row is held for one row interval, as every other row is (on average).
        self._period = span + span / (len(times) - 1) if span else 0.0
        self._times, self._rows = times, rows
        self._started = self._clock()

    def _row(self, name: str) -> dict[str, str]:
        if self.config.speed == 0:
            # Each property walks the file on its own, one row per read.
            index = self._cursors.get(name, 0)
            self._cursors[name] = index + 1
        else:
            elapsed = (self._clock() - self._started) * self.config.speed
            if self.config.loop and self._period and elapsed >= self._period:
                elapsed %= self._period
            index = bisect.bisect_right(self._times, elapsed) - 1
        if index >= len(self._rows):
            index = index % len(self._rows) if self.config.loop else len(self._rows) - 1
        return self._rows[max(index, 0)]

    def read(self, prop: PropertyDefinition) -> Any:
        if not self._rows:
            raise ReadError(f"{self.device.id}: replay file not open", retryable=False)
        column = prop.visitor.column or prop.name
        row = self._row(prop.name)
        if column not in row:
            raise ReadError(f"{self.device.id}: column {column!r} not in replay file", retryable=False)
        value = row[column]
        if value in ("", None):
            raise ReadError(f"{self.device.id}: no value for {column!r} at t={row['timestamp']}", retryable=True)
        return value
