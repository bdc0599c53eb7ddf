"""The `replay` driver plays a recorded CSV series back, at its pace or one row per read."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from devices.drivers.replay import ReplayDriver
from devices.errors import DefinitionError, DriverError, ReadError
from devices.ids import DeviceId
from devices.loader import load

REPO = Path(__file__).resolve().parents[1]
OFFICE = DeviceId("default", "office-replay")


def office(tmp_path: Path, **config) -> ReplayDriver:
    text = (REPO / "devices/examples/replay/office-replay.yaml").read_text()
    for key, value in config.items():
        text = text.replace(f"      {key}: ", f"      {key}: {value}  # was ")
    (tmp_path / "office.yaml").write_text(text.replace("../data/office-room.csv",
                                                       str(REPO / "devices/examples/data/office-room.csv")))
    return ReplayDriver(load([tmp_path]).devices[OFFICE])


def test_shipped_replay_example_loads():
    """The shipped example (a relative CSV path) loads and opens from any working directory."""
    device = load([REPO / "devices/examples/replay"]).devices[OFFICE]
    driver = ReplayDriver(device)
    driver.open()
    assert 15 < float(driver.read(device.prop("temperature"))) < 30


def test_one_row_per_read_in_file_order(tmp_path):
    """speed 0 walks the file one row per read, each property on its own."""
    driver = office(tmp_path, speed=0)
    driver.open()
    rows = list(csv.DictReader((REPO / "devices/examples/data/office-room.csv").read_text().splitlines()))
    temperature = driver.device.prop("temperature")
    humidity = driver.device.prop("humidity")
    assert [driver.read(temperature) for _ in range(5)] == [r["temperature"] for r in rows[:5]]
    assert driver.read(humidity) == rows[0]["humidity"]


def test_real_time_replay_starts_at_the_first_row(tmp_path):
    """At speed 1 the first reads return the first row (the next row is 16 minutes away)."""
    driver = office(tmp_path, speed=1)
    driver.open()
    first = next(csv.DictReader((REPO / "devices/examples/data/office-room.csv").read_text().splitlines()))
    assert driver.read(driver.device.prop("co2")) == first["co2"]


def test_missing_file_and_missing_column(tmp_path):
    """A missing file fails at open with its path; an unknown column fails the read, not retryable."""
    (tmp_path / "m.csv").write_text("timestamp,a\n0,1\n")
    driver = office(tmp_path, speed=0)
    object.__setattr__(driver, "config", driver.config.model_copy(update={"file": str(tmp_path / "nope.csv")}))
    with pytest.raises(DriverError, match="nope.csv"):
        driver.open()
    driver = office(tmp_path, speed=0)
    object.__setattr__(driver, "config", driver.config.model_copy(update={"file": str(tmp_path / "m.csv")}))
    driver.open()
    with pytest.raises(ReadError, match="column 'temperature'") as info:
        driver.read(driver.device.prop("temperature"))
    assert info.value.retryable is False


def test_a_missing_relative_file_is_named_beside_the_device_file(tmp_path):
    """`file: ../data/office-room.csv` with no such file said "cannot open replay file
    ../data/office-room.csv", which reads as relative to where the command runs: it is read
    relative to the device file, and the error now names the path there."""
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "office.yaml").write_text((REPO / "devices/examples/replay/office-replay.yaml").read_text())
    with pytest.raises(DefinitionError) as info:
        load([devices])
    said = str(info.value.problems[0])
    assert f"cannot open replay file {devices / '../data/office-room.csv'}: " in said, said


SERIES = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: series-model, namespace: default}
spec:
  protocol: replay
  properties:
    - {name: v, type: STRING, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: series, namespace: default}
spec:
  deviceModelRef: {name: series-model}
  protocol:
    protocolName: replay
    configData:
      file: series.csv
      speed: 1
  properties:
    - name: v
"""
SERIES_ID = DeviceId("default", "series")


class Clock:
    """The playback clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def series(tmp_path: Path, rows: str, *, encoding: str = "utf-8") -> tuple[ReplayDriver, Clock]:
    (tmp_path / "series.yaml").write_text(SERIES)
    (tmp_path / "series.csv").write_text(rows, encoding=encoding)
    clock = Clock()
    return ReplayDriver(load([tmp_path]).devices[SERIES_ID], clock=clock), clock


@pytest.mark.parametrize(("rows", "problem"), [
    ("timestamp,v\n0,a\n,b\n", "series.csv:3: the timestamp is empty"),
    ("timestamp,v\n0,a\nnoon,b\n", "series.csv:3: timestamp 'noon' is neither epoch seconds nor an ISO 8601 time"),
    ("timestamp,v\n0,a\n10\n", "series.csv:3: the row has 1 field(s), the header has 2"),
    ("timestamp,v\n0,a\n10,b,c\n", "series.csv:3: the row has 3 field(s), the header has 2"),
    ("timestamp,v\n0,a\nnan,b\n20,c\n", "series.csv:3: timestamp 'nan' is not a finite number"),
    ("timestamp,v\n10,a\n20,b\n5,c\n",
     "series.csv:4: timestamp '5' is earlier than the row before ('20'): rows must be in time order"),
    # A column named twice: which one a property reads is a guess. It used to be refused at every
    # row with a miscount ("the row has 2 field(s), the header has 3" for a row of 3), and a row of
    # 4 fields under a header of 3 was accepted.
    ("timestamp,v,v\n0,a,b\n", "series.csv:1: the header names 'v' more than once: which column is which?"),
    ("timestamp,v,v\n0,a,b,c\n", "series.csv:1: the header names 'v' more than once: which column is which?"),
    ("timestamp,v,timestamp\n0,a,1\n",
     "series.csv:1: the header names 'timestamp' more than once: which column is which?"),
])
def test_a_bad_row_is_a_definition_error_naming_file_and_line(tmp_path, rows, problem):
    """`mapper validate` (and run, and a reload) refuses a CSV with a bad row, naming its file and
    line, at the YAML line of `file:`; it used to pass, and open() then failed for ever with a bare
    ValueError or TypeError that named neither."""
    with pytest.raises(DefinitionError) as info:
        series(tmp_path, rows)
    (message,) = [str(p) for p in info.value.problems]
    assert message == f"{tmp_path / 'series.yaml'}:17: spec.protocol.configData.file: replay file {tmp_path}/{problem}"


def test_a_file_spoilt_after_loading_fails_open_naming_file_and_line(tmp_path):
    """A CSV that goes bad after the device was loaded: open() says where, as a DriverError."""
    driver, _ = series(tmp_path, "timestamp,v\n0,a\n10,b\n")
    (tmp_path / "series.csv").write_text("timestamp,v\n0,a\n10,b\n,c\n")
    with pytest.raises(DriverError, match=r"^default/series: replay file .*series\.csv:4: the timestamp is empty$"):
        driver.open()


def test_a_byte_order_mark_before_the_header_is_fine(tmp_path):
    """A CSV saved by Excel (UTF-8 with a byte-order mark) has its `timestamp` column."""
    driver, _ = series(tmp_path, "timestamp,v\n0,a\n10,b\n", encoding="utf-8-sig")
    assert (tmp_path / "series.csv").read_bytes().startswith(b"\xef\xbb\xbftimestamp")
    driver.open()
    assert driver.read(driver.device.prop("v")) == "a"


def test_looping_plays_the_last_row_for_one_row_interval(tmp_path):
    """Rows at 0, 10 and 20 s loop every 30 s: the last row plays for 10 s like the others (it
    used to be cut off at 20 s, and `a` came back at 25 s)."""
    driver, clock = series(tmp_path, "timestamp,v\n0,a\n10,b\n20,c\n")
    driver.open()
    v = driver.device.prop("v")
    played = {}
    for t in (0, 9.9, 10, 19.9, 20, 25, 29.9, 30, 41, 55):
        clock.now = 1000.0 + t
        played[t] = driver.read(v)
    assert played == {0: "a", 9.9: "a", 10: "b", 19.9: "b", 20: "c", 25: "c", 29.9: "c", 30: "a", 41: "b", 55: "c"}


def test_times_without_a_zone_ignore_the_machines_daylight_saving(tmp_path, monkeypatch):
    """ISO times without a zone are read as UTC: on a machine in Europe/Berlin the night the clocks
    go forward (02:00-03:00 does not exist there) the rows keep their 30 min spacing. Read as
    local time, 03:00 came before 02:30 and the file was refused as out of order."""
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        if time.tzname[0] != "CET":
            pytest.skip("no time zone data for Europe/Berlin here (tzdata)")
        rows = "timestamp,v\n" + "".join(f"2024-03-31T{t},{v}\n" for t, v in
                                          (("01:30", "a"), ("02:00", "b"), ("02:30", "c"), ("03:00", "d")))
        driver, clock = series(tmp_path, rows)
        driver.open()
        v = driver.device.prop("v")
        played = []
        for minutes in (0, 30, 60, 90):
            clock.now = 1000.0 + minutes * 60
            played.append(driver.read(v))
        assert played == ["a", "b", "c", "d"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_loading_and_opening_hold_about_one_copy_of_the_csv(tmp_path):
    """The load-time check reads the CSV a line at a time and keeps nothing; the open driver holds
    the file's text and two numbers a row. Both used to build a dict of strings a row, some twenty
    times the file's size (an 11 MB CSV took 254 MiB of RSS to load and open, 54 MiB now)."""
    import gc
    import tracemalloc

    rows = "timestamp,v,humidity,co2\n" + "".join(
        f"2015-02-{4 + i // 1440:02d}T{i // 60 % 24:02d}:{i % 60:02d}:00,"
        f"{20 + i % 50 / 10},{30 + i % 7},{400 + i % 300}.5\n"
        for i in range(20_000))
    (tmp_path / "series.yaml").write_text(SERIES)
    (tmp_path / "series.csv").write_text(rows)
    size = len(rows)
    del rows
    clock = Clock()
    gc.collect()
    tracemalloc.start()
    try:
        driver = ReplayDriver(load([tmp_path]).devices[SERIES_ID], clock=clock)
        gc.collect()
        loaded, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        driver.open()
        gc.collect()
        opened, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert load_peak < size / 2, "the check held the file"
    assert opened - loaded < 2 * size, "the open driver holds more than the file and its times"
    assert open_peak - loaded < 3 * size, "opening took more than the file's bytes, its text and its times"
    v = driver.device.prop("v")
    assert driver.read(v) == "20.0"
    clock.now += 60 * 19_999 + 30  # half way through the last minute
    assert driver.read(v) == f"{20 + 19_999 % 50 / 10}"


def test_the_check_and_open_report_a_byte_that_is_not_utf8_after_a_bad_row(tmp_path):
    """The check reads the file a piece at a time, open() whole: both report what is wrong with the
    file as a whole first (a byte that is not UTF-8, far past a row out of order)."""
    rows = "timestamp,v\n0,a\n5,b\n3,c\n" + "9,d\n" * 10_000
    (tmp_path / "series.yaml").write_text(SERIES)
    (tmp_path / "series.csv").write_bytes(rows.encode() + b"\xff\n")
    with pytest.raises(DefinitionError) as info:
        load([tmp_path])
    (message,) = [str(p) for p in info.value.problems]
    assert message.endswith(f"replay file {tmp_path}/series.csv:10005: not UTF-8 text (invalid start byte)")
    driver, _ = series(tmp_path, "timestamp,v\n0,a\n")
    (tmp_path / "series.csv").write_bytes(rows.encode() + b"\xff\n")
    with pytest.raises(DriverError, match=r"series\.csv:10005: not UTF-8 text \(invalid start byte\)$"):
        driver.open()


def test_rows_are_read_back_as_written(tmp_path):
    """Quoted fields with commas and line breaks, Windows and old Mac line ends, blank lines
    between rows and text beyond ASCII: each read gives the cell as the csv module reads it."""
    rows = ('timestamp,v\r\n0,"two\r\nlines"\r\n\r\n10,"a, b"\r\n20,café\r30,"""quoted"""\n\n40,€\n')
    driver, _ = series(tmp_path, rows)
    object.__setattr__(driver, "config", driver.config.model_copy(update={"speed": 0, "loop": False}))
    driver.open()
    v = driver.device.prop("v")
    assert [driver.read(v) for _ in range(6)] == ["two\r\nlines", "a, b", "café", '"quoted"', "€", "€"]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_byte_that_is_not_utf8_is_reported_at_its_line_whatever_the_line_ends(tmp_path, end):
    """Line numbers count the line ends the csv module reads (\\n, \\r\\n, \\r): a file with old
    Mac line ends had every byte that is not UTF-8 at line 1."""
    (tmp_path / "series.yaml").write_text(SERIES)
    (tmp_path / "series.csv").write_bytes(end.join(["timestamp,v", "0,a", "5,b", "9,\xff", ""]).encode("latin-1"))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path])
    (message,) = [str(p) for p in info.value.problems]
    assert message.endswith("series.csv:4: not UTF-8 text (invalid start byte)"), message


TYPED = SERIES.replace("{name: v, type: STRING, accessMode: ReadOnly}", "{name: v, type: %s, accessMode: ReadOnly}")


def typed_series(tmp_path: Path, kind: str, rows: str, column: str | None = None) -> ReplayDriver:
    text = TYPED % kind
    if column is not None:
        text += f"      visitors: {{protocolName: replay, configData: {{column: {column}}}}}\n"
    (tmp_path / "series.yaml").write_text(text)
    (tmp_path / "series.csv").write_text(rows)
    return ReplayDriver(load([tmp_path]).devices[SERIES_ID], clock=Clock())


def test_a_property_whose_column_is_not_in_the_file_is_a_definition_error(tmp_path):
    """A property reading a column the CSV does not have used to pass `mapper validate`; then every
    read of it failed for ever ("column 'temp' not in replay file")."""
    with pytest.raises(DefinitionError) as info:
        typed_series(tmp_path, "FLOAT", "timestamp,temperature\n0,21.5\n", column="temp")
    (message,) = [str(p) for p in info.value.problems]
    assert message.startswith(f"{tmp_path / 'series.yaml'}:")
    assert "spec.properties[0].visitors: column 'temp' of property 'v' is not in replay file" in message
    assert "columns: timestamp, temperature" in message


@pytest.mark.parametrize(("kind", "rows", "problem"), [
    ("FLOAT", "timestamp,v\n0,21.5\n10,n/a\n", "series.csv:3: 'n/a' in column 'v' does not fit property 'v' (FLOAT): expected a number"),
    ("INT", "timestamp,v\n0,1\n10,2\n20,2.5\n", "series.csv:4: '2.5' in column 'v' does not fit property 'v' (INT): expected an integer"),
    ("BOOLEAN", "timestamp,v\n0,true\n10,maybe\n", "series.csv:3: 'maybe' in column 'v' does not fit property 'v' (BOOLEAN)"),
])
def test_a_cell_that_is_not_of_the_property_type_is_a_definition_error(tmp_path, kind, rows, problem):
    """A cell the property's type cannot hold used to load, and the read meeting it failed at run time,
    again at every loop of the file, counted as a device failure."""
    with pytest.raises(DefinitionError) as info:
        typed_series(tmp_path, kind, rows)
    (message,) = [str(p) for p in info.value.problems]
    assert f"spec.protocol.configData.file: replay file {tmp_path}/{problem}" in message


def test_typed_cells_that_fit_and_empty_cells_load(tmp_path):
    """Cells of the property's type load; an empty cell is still allowed (its read fails, retryable)."""
    driver = typed_series(tmp_path, "FLOAT", "timestamp,v\n0,21.5\n10,\n20,-3\n")
    driver.open()
    assert driver.read(driver.device.prop("v")) == "21.5"


def test_a_file_changed_after_loading_to_a_bad_cell_fails_open(tmp_path):
    """open() reads the file again and checks the cells as the load did."""
    driver = typed_series(tmp_path, "FLOAT", "timestamp,v\n0,21.5\n")
    (tmp_path / "series.csv").write_text("timestamp,v\n0,21.5\n10,warm\n")
    with pytest.raises(DriverError, match=r"series\.csv:3: 'warm' in column 'v' does not fit property 'v' \(FLOAT\)"):
        driver.open()


def test_a_misspelt_replay_setting_is_an_error_with_the_setting_meant(tmp_path):
    """`sped: 60` (or a visitor's `colum:`) used to be ignored: the file played at the default speed,
    the property read its name's column. Now each is an error at its line, with the setting meant."""
    text = (REPO / "devices/examples/replay/office-replay.yaml").read_text()
    text = text.replace("      speed: 60", "      sped: 60").replace("configData: {column: humidity}",
                                                                    "configData: {colum: humidity}")
    (tmp_path / "office.yaml").write_text(text.replace("../data/office-room.csv",
                                                       str(REPO / "devices/examples/data/office-room.csv")))
    lines = text.splitlines()
    sped = lines.index("      sped: 60") + 1
    colum = next(i for i, line in enumerate(lines, 1) if "colum:" in line)
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert [str(p) for p in info.value.problems] == [
        f"office.yaml:{sped}: spec.protocol.configData.sped: unknown field, did you mean speed?",
        f"office.yaml:{colum}: spec.properties[1].visitors.configData.colum: unknown field, did you mean column?",
    ]
