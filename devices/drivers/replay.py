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
more or fewer fields than the header; a header that names a column twice; a cell that does not
fit the type of the property reading its column, `n/a` for a FLOAT), and so is a property whose
column is not in the file (at load). An empty property cell is allowed: a read that meets it
fails, retryable.

The check at load reads the file a piece at a time and keeps nothing. open() reads it again (so
a file changed since the load is what plays, or fails to open) and keeps it compactly: its text,
and where each row starts and its time in two arrays; a row is split into fields when it is read.
Loading and opening an 11 MB CSV took 254 MiB of RSS with a dict a row, 54 MiB so.
"""

from __future__ import annotations

import bisect
import csv
import math
import re
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError, ReadError
from devices.ids import shown
from devices.values import PropertyType, coerce

# column -> the (property name, type) of each property that reads it
Wanted = dict[str, list[tuple[str, PropertyType]]]


# Unknown keys are refused (a `sped: 60` played at the default speed without a word).
class ReplayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = Field(min_length=1)
    speed: float = Field(default=1.0, ge=0)
    loop: bool = True


class ReplayVisitor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
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


# The lines of a text as `open(..., newline="")` gives them (a line ends at \n, \r or \r\n,
# which it keeps), without io.StringIO: that holds a copy of the text four bytes a character.
_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")
_LINE_END = re.compile(rb"\r\n?|\n")


def _lines(text: str) -> Iterator[str]:
    return (match.group() for match in _LINE.finditer(text))


def _decode(path: Path, data: bytes) -> str:
    """The text of a replay file; DriverError at the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")  # Excel starts its UTF-8 CSVs with a byte-order mark
    except UnicodeDecodeError as exc:
        # Lines end at \n, \r or \r\n, as the csv module reads them (an old Mac's file has no \n).
        line = len(_LINE_END.findall(data, 0, exc.start)) + 1
        raise DriverError(f"replay file {path}:{line}: not UTF-8 text ({exc.reason})") from None


class Series:
    """A replay CSV held compactly: its text, where each row starts in it and each row's time in
    seconds from the first row (arrays of numbers, not a dict of strings a row: an 11 MB CSV
    took some 220 MiB as dicts). A row's fields are split when it is read."""

    __slots__ = ("columns", "starts", "text", "times", "timestamp")

    def __init__(self, text: str, starts: array, times: array, header: list[str]) -> None:
        self.text = text
        self.starts = starts  # row i is text[starts[i]:starts[i + 1]] (with any blank lines after it)
        self.times = times
        self.columns = {name: i for i, name in enumerate(header)}  # where each column is in a row
        self.timestamp = self.columns["timestamp"]

    def __len__(self) -> int:
        return len(self.times)

    def row(self, index: int) -> list[str]:
        return next(csv.reader(_lines(self.text[self.starts[index]:self.starts[index + 1]])))


def _scan(path: Path, lines: Iterable[str], keep: bool, wanted: Wanted | None = None) -> tuple[array, array, list[str]]:
    """Check the rows of a replay CSV: (the position of each row in the text, if `keep`, and the
    end; each row's time in seconds from the first row, if `keep`; the header). A non-empty cell
    of a column in `wanted` must fit the type of each property that reads it.

    Raises DriverError naming the file and line of the first problem.
    """
    consumed = 0

    def counted() -> Iterator[str]:
        nonlocal consumed
        for line in lines:
            consumed += len(line)
            yield line

    reader = csv.reader(counted())
    starts, times = array("q"), array("d")
    first = last = 0.0
    previous = ""
    rows = 0
    try:
        header = next(reader, None)
        if not header or "timestamp" not in header:
            raise DriverError(f"replay file {path}:1: needs a header with a 'timestamp' column"
                              f" (found: {', '.join(header or []) or 'nothing'})")
        if twice := sorted(name for name, n in Counter(header).items() if n > 1):
            raise DriverError(f"replay file {path}:1: the header names "
                              f"{', '.join(repr(n) for n in twice)} more than once: which column is which?")
        column = header.index("timestamp")
        typed = [(header.index(col), name, kind) for col, props in (wanted or {}).items() if col in header
                 for name, kind in props if kind is not PropertyType.STRING]
        start = consumed
        for row in reader:
            if not row:  # a blank line, which csv.DictReader skips
                start = consumed
                continue
            where = f"replay file {path}:{reader.line_num}"
            if len(row) != len(header):
                raise DriverError(f"{where}: the row has {len(row)} field(s), the header has {len(header)}")
            text = row[column]
            try:
                stamp = _timestamp(text)
            except ValueError as exc:
                raise DriverError(f"{where}: {exc}") from None
            if rows and stamp < last:
                raise DriverError(f"{where}: timestamp {text!r} is earlier than the row before"
                                  f" ({previous!r}): rows must be in time order")
            for i, name, kind in typed:
                if cell := row[i]:
                    try:
                        coerce(kind, cell)
                    except ValueError as exc:
                        raise DriverError(f"{where}: {shown(cell)} in column {header[i]!r} does not fit"
                                          f" property {name!r} ({kind.value}): {exc}") from None
            if not rows:
                first = stamp
            last, previous = stamp, text
            rows += 1
            if keep:
                starts.append(start)
                times.append(stamp - first)
            start = consumed
    except csv.Error as exc:
        raise DriverError(f"replay file {path}:{reader.line_num}: not valid CSV: {exc}") from None
    if not rows:
        raise DriverError(f"replay file {path}: no rows after the header")
    starts.append(consumed)
    return starts, times, header


def check_series(path: Path, wanted: Wanted | None = None) -> list[str]:
    """Check a replay CSV as `read_series` does, a line at a time: its rows are not kept. Returns its header.

    Raises DriverError naming the file and line of the first problem.
    """
    try:
        # newline="": the csv module reads line ends itself (and quoted fields may hold them).
        with open(path, encoding="utf-8-sig", newline="") as file:
            try:
                _, _, header = _scan(path, file, keep=False, wanted=wanted)
            except DriverError:
                # read_series decodes the whole file before it reads a row: a byte that is not
                # UTF-8 is the error it reports, even after a bad row.
                while file.read(1 << 16):
                    pass
                raise
    except UnicodeDecodeError:
        pass  # at which line: see below, as read_series says it
    except OSError as exc:
        raise DriverError(f"cannot open replay file {path}: {exc}") from exc
    else:
        return header
    _decode(path, _read(path))
    raise DriverError(f"replay file {path}: not UTF-8 text")  # UTF-8 now: it changed meanwhile


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DriverError(f"cannot open replay file {path}: {exc}") from exc


def read_series(path: Path, wanted: Wanted | None = None) -> Series:
    """The rows of a replay CSV and their times in seconds from the first row.

    Raises DriverError naming the file and line of the first problem.
    """
    data = _read(path)
    text = _decode(path, data)
    del data  # the text is the copy kept
    starts, times, header = _scan(path, _lines(text), keep=True, wanted=wanted)
    return Series(text, starts, times, header)


def _column(prop: PropertyDefinition) -> str:
    return getattr(prop.visitor, "column", None) or prop.name


def _wanted(device: DeviceDefinition) -> Wanted:
    wanted: Wanted = {}
    for prop in device.properties:
        wanted.setdefault(_column(prop), []).append((prop.name, prop.type))
    return wanted


def _resolve(device: DeviceDefinition, config: ReplayConfig) -> Path:
    path = Path(config.file)
    if path.is_absolute():
        return path
    source_dir = Path(device.source.rsplit(":", 1)[0]).parent
    candidate = source_dir / path
    # Beside the device file; else (a Device from edgecore has no file) the working directory's.
    # A file found in neither is named beside the device file: "../data/x.csv" alone did not say
    # that it is read relative to the device file, not to where the command runs.
    return candidate if candidate.exists() or not path.exists() else path


class ReplayDriver(Driver):
    protocol = "replay"
    Config = ReplayConfig
    Visitor = ReplayVisitor

    def __init__(self, device: DeviceDefinition, *, clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the playback clock (tests pass one they move)."""
        super().__init__(device)
        self.config: ReplayConfig
        self._clock = clock
        self._series: Series | None = None
        self._period = 0.0  # when looping, the first row comes again after this many seconds
        self._started = 0.0
        self._cursors: dict[str, int] = {}

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        path = _resolve(device, device.protocol_config)
        try:
            header = check_series(path, _wanted(device))
        except DriverError as exc:
            yield "spec.protocol.configData.file", str(exc)
            return
        for i, prop in enumerate(device.properties):
            column = _column(prop)
            if column not in header:
                yield (f"spec.properties[{i}].visitors",
                       f"column {column!r} of property {prop.name!r} is not in replay file {path}"
                       f" (columns: {', '.join(header)})")

    def open(self) -> None:
        self._series = None  # a reopen holds one copy of the file, not two
        try:
            series = read_series(_resolve(self.device, self.config), _wanted(self.device))
        except DriverError as exc:
            raise DriverError(f"{self.device.id}: {exc}") from None
        span = series.times[-1]
        # The last row is held for one row interval, as every other row is (on average).
        self._period = span + span / (len(series) - 1) if span else 0.0
        self._series = series
        self._started = self._clock()

    def _row(self, series: Series, name: str) -> list[str]:
        if self.config.speed == 0:
            # Each property walks the file on its own, one row per read.
            index = self._cursors.get(name, 0)
            self._cursors[name] = index + 1
        else:
            elapsed = (self._clock() - self._started) * self.config.speed
            if self.config.loop and self._period and elapsed >= self._period:
                elapsed %= self._period
            index = bisect.bisect_right(series.times, elapsed) - 1
        if index >= len(series):
            index = index % len(series) if self.config.loop else len(series) - 1
        return series.row(max(index, 0))

    def read(self, prop: PropertyDefinition) -> Any:
        series = self._series
        if series is None:
            raise ReadError(f"{self.device.id}: replay file not open", retryable=False)
        column = _column(prop)
        row = self._row(series, prop.name)
        if column not in series.columns:
            raise ReadError(f"{self.device.id}: column {column!r} not in replay file", retryable=False)
        value = row[series.columns[column]]
        if value == "":
            raise ReadError(f"{self.device.id}: no value for {column!r} at t={row[series.timestamp]}", retryable=True)
        return value
