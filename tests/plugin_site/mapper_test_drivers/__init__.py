"""Drivers for hardware that misbehaves, shipped the way a third party ships a driver: this package
plus a `mapper.drivers` entry point in ../mapper_test_drivers-1.0.dist-info (tests/plugin_drivers.py
puts it on sys.path for the tests that use it).

Each is the simulated driver with one fault of a real bus, set per device in `spec.protocol.configData`:

- `slow`: every read takes `read_s` (a sensor that answers late); blocking, so the device loop calls
  it in a worker thread and gives up after `timeout_s`. Every write takes `write_s`, and creates the
  file `writing` (if set) when it begins. With `hang_until`, a read hangs until that file exists
  (a bus stuck for good, released by the test at its end).
- `failing`: no read is ever answered; health() counts the timeouts, as a bus driver would.
- `gated`: a bus that is slow to open and to close. open() creates the file `opening`, then waits
  until the file `open_when` exists; close() creates the file `closing`, waits until `close_when` exists and appends
  `<device> yes` (it did) or `<device> no` (not within the wait) to `close_log`. Waits are bounded
  by `wait_s`; the device loop gives up on a call after `wait_s` + 5 s, or `timeout_s` if set. The bus
  is exclusive: open() while it is open fails, as a second claim of a GPIO line does (`opens` counts them).
- `panicking`: every read raises `BusPanic`, a BaseException that is no Exception (as some bindings
  raise, or a library calling sys.exit); `in_thread: true` makes it a blocking driver.
- `forgetful`: its `count` is a setting the sensor forgets when opened (an oversampling register
  back at its reset value, 1), and `boot_value` says nothing (None), as its author first wrote it.
  `restore: true` makes `restore_desired` say yes for `count`. `writes` lists the values written to it.
  A value in `refuse` is one the sensor does not have: its write raises WriteError(retryable=False)
  and is counted in `refused`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.simulated import SimulatedConfig, SimulatedDriver
from devices.errors import DriverError, ReadError, WriteError

POLL_S = 0.01


class SlowConfig(SimulatedConfig):
    read_s: float = Field(default=0.0, ge=0)
    write_s: float = Field(default=0.0, ge=0)
    writing: str | None = None
    hang_until: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)


class SlowDriver(SimulatedDriver):
    protocol = "slow"
    Config = SlowConfig
    blocking = True

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.timeout_s = self.config.timeout_s

    def read(self, prop: PropertyDefinition) -> Any:
        time.sleep(self.config.read_s)  # the bus takes this long to answer
        if self.config.hang_until is not None:
            _wait_for_file(self.config.hang_until, float("inf"))
        return super().read(prop)

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        if self.config.writing is not None:
            Path(self.config.writing).touch()
        time.sleep(self.config.write_s)  # ... and to take a write
        super().write(prop, value)


class FailingDriver(SimulatedDriver):
    protocol = "failing"

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.timeouts = 0

    def read(self, prop: PropertyDefinition) -> Any:
        self.timeouts += 1
        raise ReadError("bus did not answer", retryable=True)

    def health(self) -> str:
        return f"bus timeouts {self.timeouts}"


class GatedConfig(SimulatedConfig):
    opening: str | None = None
    open_when: str | None = None
    closing: str | None = None
    close_when: str | None = None
    close_log: str | None = None
    wait_s: float = Field(default=10.0, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)


def _wait_for_file(path: str, limit_s: float) -> bool:
    """Whether `path` exists, waiting up to `limit_s` for it (the bus polled until it is ready)."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


class GatedDriver(SimulatedDriver):
    protocol = "gated"
    Config = GatedConfig
    blocking = True  # open() waits on the bus: the device loop calls it in a worker thread

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        # By default the loop does not give up before the bus does.
        self.timeout_s = self.config.timeout_s or self.config.wait_s + 5.0
        self.opens = 0

    def open(self) -> None:
        c = self.config
        if self.opened:
            raise DriverError(f"{self.device.id}: the bus is busy (already open)")
        self.opens += 1
        if c.opening:
            Path(c.opening).touch()
        if c.open_when and not _wait_for_file(c.open_when, c.wait_s):
            raise DriverError(f"{self.device.id}: the bus did not come up within {c.wait_s:g} s")
        super().open()

    def close(self) -> None:
        c = self.config
        if c.closing:
            Path(c.closing).touch()
        if c.close_when:
            there = _wait_for_file(c.close_when, c.wait_s)
            if c.close_log:
                with open(c.close_log, "a", encoding="utf-8") as log:
                    log.write(f"{self.device.id.name} {'yes' if there else 'no'}\n")
        super().close()


class BusPanic(BaseException):
    """What a binding raises that is no Exception (not an error a driver is expected to raise)."""


class PanickingConfig(SimulatedConfig):
    in_thread: bool = False
    reading: str | None = None    # touched when a read begins
    panic_when: str | None = None  # a read waits for this file before it raises


class PanickingDriver(SimulatedDriver):
    protocol = "panicking"
    Config = PanickingConfig

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.blocking = self.config.in_thread
        self.panics = 0

    def read(self, prop: PropertyDefinition) -> Any:
        c = self.config
        if c.reading:
            Path(c.reading).touch()
        if c.panic_when:
            _wait_for_file(c.panic_when, 10.0)
        self.panics += 1
        raise BusPanic("the bus binding gave up")


class ForgetfulConfig(SimulatedConfig):
    restore: bool = False
    refuse: list[int] = []


class ForgetfulDriver(SimulatedDriver):
    protocol = "forgetful"
    Config = ForgetfulConfig
    SETTING = "count"
    RESET = 1

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.setting = self.RESET
        self.writes: list[Any] = []
        self.refused: list[Any] = []

    def open(self) -> None:
        super().open()
        self.setting = self.RESET  # what the register holds after the sensor is opened

    def read(self, prop: PropertyDefinition) -> Any:
        if prop.name != self.SETTING:
            return super().read(prop)
        if self._failing():
            raise ReadError(f"{self.device.id}: the sensor is not responding", retryable=True)
        return self.setting

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        if prop.name != self.SETTING:
            return super().write(prop, value)
        if self._broken:
            raise WriteError(f"{self.device.id}: the sensor is not responding")
        if value in self.config.refuse:
            self.refused.append(value)
            raise WriteError(f"{self.device.id}: the sensor has no setting {value}", retryable=False)
        self.setting = value
        self.writes.append(value)
        return None

    def restore_desired(self, prop: PropertyDefinition) -> bool:
        return self.config.restore and prop.name == self.SETTING
