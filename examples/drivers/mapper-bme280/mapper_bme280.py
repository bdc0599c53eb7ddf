"""An example third-party driver: a BME280-style I2C sensor (temperature, pressure, humidity) with
one writable setting (`oversampling`). Registered through pyproject.toml's `mapper.drivers` entry
point; the mapper's core does not change (README, Adding a driver).

The chip is simulated (`SimulatedChip`): a real driver opens its bus library there (smbus2's
`SMBus(bus)`, say, named in `lazy_modules` so it is imported only when a device opens) and reads
registers where this one asks the simulation. `stall_s` makes every read hang that long, as a bus
whose device holds the clock line low does: with `stall_s` above `timeout_s` each read fails with
`no answer within 1 s` and the device turns `unhealthy`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers import Driver
from devices.errors import ReadError, WriteError

OVERSAMPLING = (1, 2, 4, 8, 16)  # what the chip's ctrl register takes


class Bme280Config(BaseModel):
    """The device's `spec.protocol.configData`."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt key is an error at its line
    bus: int = Field(default=1, ge=0)  # /dev/i2c-1
    address: Literal[0x76, 0x77] = 0x76  # the two addresses a BME280 answers on (its SDO pin)
    # The setting open() gives the chip, at every start: a desired value set over MQTT changes it
    # until the next open (boot_value), this stays the file's.
    oversampling: Literal[1, 2, 4, 8, 16] = 1
    stall_s: float = Field(default=0.0, ge=0)  # simulation: every read hangs this long


class Bme280Visitor(BaseModel):
    """Each property's `visitors.configData`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    field: Literal["temperature", "pressure", "humidity", "oversampling"]


class SimulatedChip:
    """Stands in for the I2C bus and the chip on it."""

    def __init__(self, address: int) -> None:
        self.rng = random.Random(address)
        self.oversampling = 1  # the chip's setting after a reset

    def measure(self, field: str) -> float:
        base, noise = {"temperature": (21.0, 0.2), "pressure": (1013.25, 0.5), "humidity": (45.0, 1.0)}[field]
        return round(base + self.rng.gauss(0, noise / self.oversampling ** 0.5), 2)


class Bme280Driver(Driver):
    protocol = "bme280"
    Config = Bme280Config
    Visitor = Bme280Visitor
    blocking = True  # I2C transfers block: read/write run in a worker thread ...
    timeout_s = 1.0  # ... and a call that has not returned after 1 s fails

    def open(self) -> None:
        self.chip: SimulatedChip | None = SimulatedChip(self.config.address)  # a real driver: SMBus(self.config.bus)
        self.chip.oversampling = self.config.oversampling  # the chip resets its setting: give it the file's

    def read(self, prop: PropertyDefinition) -> Any:
        if self.chip is None:
            raise ReadError(f"{self.device.id}: the bus is closed")
        time.sleep(self.config.stall_s)
        if prop.visitor.field == "oversampling":
            return self.chip.oversampling
        return self.chip.measure(prop.visitor.field)  # a float: the mapper converts it to the property's type

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        if value not in OVERSAMPLING:  # the model's minimum/maximum cannot say "a power of two"
            raise WriteError(f"oversampling takes {', '.join(map(str, OVERSAMPLING))}, not {value}", retryable=False)
        if self.chip is None:
            raise WriteError(f"{self.device.id}: the bus is closed")  # retryable: written again later
        self.chip.oversampling = value

    @classmethod
    def can_write(cls, prop: PropertyDefinition) -> bool:
        return prop.visitor.field == "oversampling"  # a ReadWrite temperature runs as ReadOnly, with a warning

    def boot_value(self, prop: PropertyDefinition) -> Any:
        # open() sets the chip to the file's setting: the twin is told so (a desired value applied
        # before a restart is replaced by it, with a warning) rather than showing one the chip
        # no longer has.
        return self.config.oversampling if prop.visitor.field == "oversampling" else None

    def close(self) -> None:
        self.chip = None  # a real driver closes its bus; safe to call twice

    @classmethod
    def claims(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        # One chip per bus address: two devices on it are an error at the second one's `address`.
        config = device.protocol_config
        return [(f"i2c:{config.bus}:{config.address:#x}", "spec.protocol.configData.address")]
