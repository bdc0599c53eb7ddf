"""The `simulated` protocol: devices that behave like real ones, for laptops, demos and tests.

Each property's `visitors.configData.kind` picks a behaviour:

- `temperature` / `humidity`: a DHT11-like signal: a slow daily swing, a random-walk drift,
  measurement noise, quantised to the sensor's resolution.
- `switch`: a writable on/off whose read-back follows its writes (optionally after `lag_ms`).
- `counter`: counts up by `step` on every read.
- `constant`: always `value`.

`configData.failure_rate` (0-1) makes that share of reads fail the way a DHT11 does
("Checksum did not validate"), so retry and health logic can be exercised.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import ReadError, WriteError


class SimulatedConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    seed: int | None = None
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Every read fails (a device unplugged).
    broken: bool = False
    # The first N reads fail, then the device recovers (exercises unhealthy -> ok).
    fail_first: int = Field(default=0, ge=0)
    # Reads fail while this file exists: lets a person or a test unplug the device at run time.
    fail_while_exists: str | None = None


class SimulatedVisitor(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    kind: Literal["temperature", "humidity", "switch", "counter", "constant"] = "constant"
    base: float = 21.0
    amplitude: float = 3.0
    period_s: float = Field(default=86_400.0, gt=0)
    noise: float = Field(default=0.2, ge=0)
    drift: float = Field(default=0.01, ge=0)
    resolution: float = Field(default=0.1, gt=0)
    step: int = 1
    start: int = 0
    value: Any = 0
    lag_ms: int = Field(default=0, ge=0)


class SimulatedDriver(Driver):
    protocol = "simulated"
    Config = SimulatedConfig
    Visitor = SimulatedVisitor

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.config: SimulatedConfig
        self._rng = random.Random(self.config.seed)
        self._walk: dict[str, float] = {}
        self._counters: dict[str, int] = {}
        self._switch: dict[str, tuple[Any, Any, float]] = {}  # name -> (old, new, time applied)
        self._broken = self.config.broken
        self._to_fail = self.config.fail_first
        self._values: dict[str, Any] = {}
        self.opened = False

    def open(self) -> None:
        self.opened = True
        for prop in self.device.properties:
            visitor: SimulatedVisitor = prop.visitor
            if visitor.kind == "switch":
                self._switch[prop.name] = (False, False, 0.0)
            elif visitor.kind == "counter":
                self._counters[prop.name] = visitor.start

    def set_broken(self, broken: bool) -> None:
        self._broken = broken

    def _failing(self) -> bool:
        if self._broken:
            return True
        if self._to_fail > 0:
            self._to_fail -= 1
            return True
        path = self.config.fail_while_exists
        return bool(path) and os.path.exists(path)

    def read(self, prop: PropertyDefinition) -> Any:
        if self._failing():
            raise ReadError(f"{self.device.id}: simulated device is not responding", retryable=True)
        if self.config.failure_rate and self._rng.random() < self.config.failure_rate:
            raise ReadError("Checksum did not validate. Try again.", retryable=True)
        visitor: SimulatedVisitor = prop.visitor
        if visitor.kind in ("temperature", "humidity"):
            return self._signal(prop.name, visitor)
        if visitor.kind == "counter":
            value = self._counters.get(prop.name, visitor.start)
            self._counters[prop.name] = value + visitor.step
            return value
        if visitor.kind == "switch":
            old, new, applied = self._switch.get(prop.name, (False, False, 0.0))
            return new if time.monotonic() - applied >= visitor.lag_ms / 1000 else old
        return self._values.get(prop.name, visitor.value)

    def _signal(self, name: str, v: SimulatedVisitor) -> float:
        walk = self._walk.get(name, 0.0) + self._rng.gauss(0, v.drift)
        walk = max(-v.amplitude, min(v.amplitude, walk))
        self._walk[name] = walk
        daily = v.amplitude * math.sin(2 * math.pi * (time.time() % v.period_s) / v.period_s)
        raw = v.base + daily + walk + self._rng.gauss(0, v.noise)
        return round(round(raw / v.resolution) * v.resolution, 6)

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        visitor: SimulatedVisitor = prop.visitor
        if self._broken:
            raise WriteError(f"{self.device.id}: simulated device is not responding")
        if visitor.kind == "switch":
            _, current, applied = self._switch.get(prop.name, (False, False, 0.0))
            self._switch[prop.name] = (current, value, time.monotonic())
        elif visitor.kind == "counter":
            self._counters[prop.name] = int(value)
        else:
            self._values[prop.name] = value

    def close(self) -> None:
        self.opened = False

    def health(self) -> str:
        return "not responding" if self._broken else "ok"
