"""The `simulated` protocol: devices that behave like real ones, for laptops, demos and tests.

Each property's `visitors.configData.kind` picks a behaviour:

- `temperature` / `humidity`: a DHT11-like signal: a slow daily swing, a random-walk drift,
  measurement noise, quantised to the sensor's resolution.
- `switch`: a writable on/off whose read-back follows its writes (optionally after `lag_ms`).
- `counter`: counts up by `step` on every read.
- `constant`: always `value` (0 by default). The default kind: a visitor with neither a kind nor a
  `value` is a warning at load (config_warnings), as it most likely misses its kind.
- `clock`: the wall-clock time of the read in Unix seconds (a FLOAT property): a latency probe.
  (`temperature`, `humidity` and `clock` read what they generate: a ReadWrite one runs as ReadOnly.)
  A subscriber subtracts it from its own receive time to get the reading's exact age, where
  the payload's `ts` (whole milliseconds) would add up to 1 ms of rounding.

`configData.failure_rate` (0-1) makes that share of reads fail the way a DHT11 does
("Checksum did not validate"), so retry and health logic can be exercised.

`configData.faults_rate`, `faults_seed` and `faults_kinds` (a comma-separated string) inject the
sensor faults of `models/faults.py` (spike, stuck, drift, noise) into the temperature/humidity
pair. They are flat keys because edgecore refuses a nested configData value (a device with one
never reaches the mapper under KubeEdge); the nested form `faults: {rate, seed, kinds}` still
works in local files. At each temperature read
with no fault running, a new fault event starts with probability `rate`; the humidity read
that follows returns the humidity of the same (faulty) step. `fault_log` keeps what started.
"""

from __future__ import annotations

import math
import os
import random
import time
import typing
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import FieldError, ReadError, WriteError


class FaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rate: float = Field(default=0.05, ge=0.0, le=1.0)
    seed: int | None = None
    kinds: list[Literal["spike", "stuck", "drift", "noise"]] = ["spike", "stuck", "drift", "noise"]


# Unknown keys are refused (extra="forbid"), as the loader reports them at their line with the
# field they are close to: allowed, `sed: 3` or `knd: switch` silently left the default in place.
class SimulatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int | None = None
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Every read fails (a device unplugged).
    broken: bool = False
    # The first N reads fail, then the device recovers (exercises unhealthy -> ok).
    fail_first: int = Field(default=0, ge=0)
    # Reads fail while this file exists: lets a person or a test unplug the device at run time.
    fail_while_exists: str | None = None
    # Inject labelled sensor faults (models/faults.py) into temperature + humidity.
    faults: FaultSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat_faults(cls, data: Any) -> Any:
        """`faults_rate`, `faults_seed`, `faults_kinds` ("spike,stuck") are `faults: {rate, seed, kinds}`:
        the form that travels through edgecore, which refuses a nested configData value."""
        if not isinstance(data, dict):
            return data
        flat = {key: data[key] for key in _FLAT_FAULTS if key in data}
        if not flat:
            return data
        if data.get("faults") is not None:
            raise FieldError((next(iter(flat)),), f"faults and {', '.join(flat)} both given: give the faults "
                                                  "one way (the flat keys travel through edgecore)")
        settings = {key.removeprefix("faults_"): value for key, value in flat.items()}
        kinds = settings.get("kinds")
        if isinstance(kinds, str):
            settings["kinds"] = [kind.strip() for kind in kinds.split(",") if kind.strip()]
        try:
            faults = FaultSettings.model_validate(settings)
        except ValidationError as exc:  # at the flat key the file has, not at faults.rate
            error = exc.errors(include_url=False)[0]
            key = f"faults_{error['loc'][0]}"
            raise FieldError((key,), f"{key} {data[key]!r}: {error['msg']}") from None
        return {**{k: v for k, v in data.items() if k not in flat}, "faults": faults}


_FLAT_FAULTS = ("faults_rate", "faults_seed", "faults_kinds")


Kind = Literal["temperature", "humidity", "switch", "counter", "constant", "clock"]


class SimulatedVisitor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Left out: a constant (its `value`, 0 by default), with a warning unless `value` is given (config_warnings).
    kind: Kind = "constant"
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

    @classmethod
    def config_warnings(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """A property whose visitor names no `kind` (nor a `value`): it reads the constant 0, most likely
        not what was meant (a visitor with a `base:` and no kind reads 0, its base unread)."""
        for i, prop in enumerate(device.properties):
            visitor = prop.visitor
            if not isinstance(visitor, SimulatedVisitor) or {"kind", "value"} & visitor.model_fields_set:
                continue
            yield (f"spec.properties[{i}].visitors.configData.kind",  # (left out: the loader gives the nearest line)
                   f"not given, so property {prop.name!r} reads the constant 0 (kind: constant, value: 0); set the"
                   f" kind meant: {', '.join(typing.get_args(Kind))}")

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
        faults = self.config.faults
        self._fault_rng = random.Random(faults.seed if faults else None)
        self._fault = None  # models.faults.FaultState while an event runs
        self._last_pair: tuple[float, float] | None = None
        self._held_humidity: dict[str, float] = {}
        self.fault_log: list[tuple[str, int]] = []  # (kind, length) of every event started

    def open(self) -> None:
        self.opened = True
        for prop in self.device.properties:
            visitor: SimulatedVisitor = prop.visitor
            if visitor.kind == "switch":
                self._switch[prop.name] = (False, False, 0.0)
            elif visitor.kind == "counter":
                self._counters[prop.name] = visitor.start

    def boot_value(self, prop: PropertyDefinition) -> Any:
        """A switch opens off and a writable constant at its `value`, whatever was written before
        (a restart or a reload that changed the device): said to the device loop, which makes it
        the desired value, as for a GPIO relay's initial state, so the twin shows no stale delta."""
        visitor: SimulatedVisitor = prop.visitor
        if visitor.kind == "switch":
            return False
        if visitor.kind == "constant":
            from devices.values import coerce

            try:
                return coerce(prop.type, visitor.value)
            except ValueError:  # a constant its property's type refuses: its readings say so
                return None
        return None

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
            if self.config.faults is not None:
                return self._faulty(prop, visitor)
            return self._signal(prop.name, visitor)
        if visitor.kind == "counter":
            value = self._counters.get(prop.name, visitor.start)
            self._counters[prop.name] = value + visitor.step
            return value
        if visitor.kind == "clock":
            return time.time()
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

    def _faulty(self, prop: PropertyDefinition, v: SimulatedVisitor) -> float:
        """One step of the (temperature, humidity) pair through the fault model."""
        if v.kind == "humidity" and prop.name in self._held_humidity:
            return self._held_humidity.pop(prop.name)
        humidity = next((p for p in self.device.properties if p.visitor.kind == "humidity"), None)
        temperature = next((p for p in self.device.properties if p.visitor.kind == "temperature"), None)
        t = self._signal(temperature.name, temperature.visitor) if temperature else 0.0
        h = self._signal(humidity.name, humidity.visitor) if humidity else 0.0
        from models import faults as fault_model

        settings = self.config.faults
        assert settings is not None
        if (self._fault is None or self._fault.done) and self._fault_rng.random() < settings.rate:
            kind = self._fault_rng.choice(settings.kinds)
            self._fault = fault_model.FaultState(kind, self._fault_rng, last=self._last_pair)
            self.fault_log.append((kind, self._fault.length))
        if self._fault is not None and not self._fault.done:
            ft, fh = self._fault.apply(t, h)
        else:
            ft, fh = t, h
            self._last_pair = (t, h)
        ft = round(round(ft / temperature.visitor.resolution) * temperature.visitor.resolution, 6) if temperature else ft
        fh = round(round(fh / humidity.visitor.resolution) * humidity.visitor.resolution, 6) if humidity else fh
        if v.kind == "temperature":
            if humidity is not None:
                self._held_humidity[humidity.name] = fh
            return ft
        return fh

    # What a read returns regardless of what was written: a desired value for one of these would
    # be taken, "written", and never read back, a delta for ever.
    _GENERATED = frozenset({"temperature", "humidity", "clock"})

    @classmethod
    def can_write(cls, prop: PropertyDefinition) -> bool:
        visitor = getattr(prop, "visitor", None)
        return not (isinstance(visitor, SimulatedVisitor) and visitor.kind in cls._GENERATED)

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
