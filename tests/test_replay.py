"""The `replay` driver plays a recorded CSV series back, at its pace or one row per read."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from devices.drivers.replay import ReplayDriver
from devices.errors import DriverError, ReadError
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
