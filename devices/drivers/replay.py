"""The `replay` protocol: plays back a recorded CSV series, at its own pace or faster.

configData:
  file: path to a CSV with a `timestamp` column (epoch seconds or ISO 8601) and one column per
        property (relative paths are resolved against the device file's directory, then the CWD)
  speed: 1.0 = real time, 60 = a minute per second, 0 = one row per read (as fast as read)
  loop: start again at the end (default true); otherwise the last row keeps being returned
visitors.configData:
  column: the CSV column for this property (default: the property name)
"""

from __future__ import annotations

import bisect
import csv
import time
from datetime import datetime
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
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


class ReplayDriver(Driver):
    protocol = "replay"
    Config = ReplayConfig
    Visitor = ReplayVisitor

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.config: ReplayConfig
        self._times: list[float] = []
        self._rows: list[dict[str, str]] = []
        self._started = 0.0
        self._cursors: dict[str, int] = {}

    def _resolve(self) -> Path:
        path = Path(self.config.file)
        if path.is_absolute():
            return path
        source_dir = Path(self.device.source.rsplit(":", 1)[0]).parent
        candidate = source_dir / path
        return candidate if candidate.exists() else path

    def open(self) -> None:
        path = self._resolve()
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except OSError as exc:
            raise DriverError(f"{self.device.id}: cannot open replay file {path}: {exc}") from exc
        if not rows or "timestamp" not in rows[0]:
            raise DriverError(f"{self.device.id}: replay file {path} needs a header with a 'timestamp' column and rows")
        first = _timestamp(rows[0]["timestamp"])
        self._times = [_timestamp(r["timestamp"]) - first for r in rows]
        self._rows = rows
        self._started = time.monotonic()

    def _row(self, name: str) -> dict[str, str]:
        if self.config.speed == 0:
            # Each property walks the file on its own, one row per read.
            index = self._cursors.get(name, 0)
            self._cursors[name] = index + 1
        else:
            elapsed = (time.monotonic() - self._started) * self.config.speed
            span = self._times[-1] or 1.0
            if self.config.loop and elapsed > span:
                elapsed %= span
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
