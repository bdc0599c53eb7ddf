"""Resolved device definitions: a Device merged with its DeviceModel, ready for a driver."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from devices.ids import DeviceId, shown
from devices.schema import Device, DeviceModel, PushMethodMQTT, effective_cycle_ms
from devices.values import PropertyType, Value, coerce, range_problem


@dataclass(frozen=True, slots=True)
class MapAt:
    """Where a map of a device file is written (a property's `pushMethod.anomalyDetection`): the file,
    the map's line and field name, and those of each of its keys; for problems found after loading
    (a model that does not exist), reported at their line as the loader's own are."""

    file: str
    line: int | None
    field: str
    keys: dict[str, tuple[int | None, str]] = field(default_factory=dict)

    def at(self, key: str | None = None) -> tuple[str, int | None, str]:
        """(file, line, field name) of `key` in the map; the map's own when the key is not written."""
        if key is not None and key in self.keys:
            return (self.file, *self.keys[key])
        return self.file, self.line, self.field


# The mapper's own keys in a property's `visitors.configData` (the one per-property free-form place
# that survives kubectl and edgecore, which keep flat values only there): taken out before the
# driver's Visitor reads the rest, so no driver sees them (devices.loader._report_on_change).
REPORT_DEADBAND = "reportDeadband"
REPORT_DEADBAND_PERCENT = "reportDeadbandPercent"
REPORT_MAX_INTERVAL_MS = "reportMaxIntervalMs"
REPORT_KEYS = (REPORT_DEADBAND, REPORT_DEADBAND_PERCENT, REPORT_MAX_INTERVAL_MS)
# A silent sensor's heartbeat when reportMaxIntervalMs is not given (its reportCycle if that is longer).
DEFAULT_REPORT_MAX_INTERVAL_MS = 60_000
# Calibration (devices.loader._calibration): reading = raw * valueScale + valueOffset, rounded to valueDigits.
VALUE_SCALE = "valueScale"
VALUE_OFFSET = "valueOffset"
VALUE_DIGITS = "valueDigits"
CALIBRATION_KEYS = (VALUE_SCALE, VALUE_OFFSET, VALUE_DIGITS)
# Every key of the mapper's own in a visitor's configData: none reaches the driver's Visitor.
MAPPER_KEYS = REPORT_KEYS + CALIBRATION_KEYS
# A calibrated float is rounded to this many significant digits of its larger term (raw * scale, or
# offset): float arithmetic leaves noise in the last ones (0.1 * 3 = 0.30000000000000004), and a
# desired value written through the inverse must read back as itself (twin reported == desired).
CALIBRATION_SIGNIFICANT_DIGITS = 12


@dataclass(frozen=True, slots=True)
class Deadband:
    """Report on change (opt-in per property): a reading is published when it moved by at least
    `absolute` (or `percent` of the last published value's magnitude) from the last published one,
    and at least once per `max_interval_ms` whatever it did (a heartbeat: a silent sensor is not a
    dead one). Only MQTT publishing is reduced; the twin records every reading."""

    absolute: float | None
    percent: float | None
    max_interval_ms: int

    def moved(self, last: float, value: float) -> bool:
        """Whether `value` is far enough from `last` (the last published) to be published."""
        step = abs(value - last)
        if self.absolute is not None:
            return step >= self.absolute and step > 0
        return step > 0 and step >= abs(last) * self.percent / 100

    def describe(self) -> str:
        """As `mapper validate` shows it."""
        by = f"{self.absolute:g}" if self.absolute is not None else f"{self.percent:g}%"
        return f"published on a change of {by} or more, else every {self.max_interval_ms / 1000:g} s"


@dataclass(frozen=True, slots=True)
class Calibration:
    """A numeric property's calibration (opt-in): every reading the driver returns becomes
    `raw * scale + offset` (rounded to `digits` decimals when given) before anything else sees it
    (range checks, twin, telemetry, inference); a desired value goes to the driver as
    `(value - offset) / scale`. An INT property's scale and offset are whole numbers (the loader
    refuses others), so its readings stay integers and its inverse is exact or refused."""

    scale: float | int
    offset: float | int
    digits: int | None
    integral: bool  # an INT property: integer arithmetic, no rounding

    def reading(self, raw: Any) -> Any:
        """The calibrated value of a driver's (coerced) reading."""
        value = raw * self.scale + self.offset
        if self.integral:
            return value
        largest = max(abs(raw * self.scale), abs(self.offset))
        if largest == 0 or not math.isfinite(largest):
            return value
        decimals = CALIBRATION_SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(largest))
        if self.digits is not None and self.digits < decimals:
            decimals = self.digits
        return round(value, decimals)

    def raw(self, value: Any) -> Any:
        """What the driver is given for a desired `value` (in calibrated units), or ValueError when
        no raw value reads back as it (an INT property's value between two steps of its scale)."""
        if not self.integral:
            return (value - self.offset) / self.scale
        steps, left = divmod(value - self.offset, self.scale)
        if left:
            below = steps * self.scale + self.offset
            raise ValueError(f"{value} cannot be written: the device takes whole raw values, which read as"
                             f" raw * {self.scale} + {self.offset} (the nearest are {min(below, below + self.scale)}"
                             f" and {max(below, below + self.scale)})")
        return steps

    def describe(self) -> str:
        """As `mapper validate` shows it."""
        formula = "raw" if self.scale == 1 else f"raw * {self.scale:g}"
        if self.offset:
            formula += f" {'-' if self.offset < 0 else '+'} {abs(self.offset):g}"
        rounded = f", rounded to {self.digits} decimal(s)" if self.digits is not None else ""
        return f"calibrated: {formula}{rounded}"


@dataclass(frozen=True, slots=True)
class PropertyDefinition:
    name: str
    type: PropertyType
    writable: bool
    minimum: float | None
    maximum: float | None
    unit: str
    collect_cycle_ms: int
    report_cycle_ms: int
    report_to_cloud: bool
    desired: Value | None
    # Driver visitor config after validation by the driver's Visitor model (a dict when no driver).
    visitor: Any = None
    push_mqtt: PushMethodMQTT | None = None
    anomaly_detection: dict[str, Any] | None = None
    description: str = ""
    # `desired.value` as the device's file gives it (the text `desired` was read from; None when
    # `desired` is None): what the twin compares with the last one it took up (file_desired), so
    # that only an edit of the file's own desired value applies it again, not a model change.
    desired_text: str | None = None
    # Where `anomaly_detection` is written (a device file's; None for edgecore's devices): not part
    # of the equality (moving the map down a line changes no pipeline).
    anomaly_at: MapAt | None = field(default=None, compare=False)
    # Report on change (configData reportDeadband/reportDeadbandPercent/reportMaxIntervalMs), or None:
    # published once per reportCycle as before.
    deadband: Deadband | None = None
    # Calibration (configData valueScale/valueOffset/valueDigits), or None: readings as the driver gives them.
    calibration: Calibration | None = None


@dataclass(frozen=True, slots=True)
class DeviceDefinition:
    id: DeviceId
    model_name: str
    protocol: str
    # Protocol config after validation by the driver's Config model (a dict when no driver).
    protocol_config: Any
    properties: tuple[PropertyDefinition, ...]
    source: str
    device: Device = field(repr=False, compare=False)
    model: DeviceModel = field(repr=False, compare=False)

    def prop(self, name: str) -> PropertyDefinition:
        for prop in self.properties:
            if prop.name == name:
                return prop
        raise KeyError(self._no_property(name))

    def _no_property(self, name: str) -> str:
        """The device's properties named with it: a misspelt one (`pmp`) is then seen at once."""
        names = ", ".join(sorted(p.name for p in self.properties))
        return f"device {self.id} has no property {shown(name)} (properties: {names})"

    def has_property(self, name: str) -> bool:
        return any(p.name == name for p in self.properties)

    def desired_value(self, name: str, raw: Any) -> Value:
        """`raw` as a desired value of property `name`, or ValueError saying why not: the property
        is declared and writable, the value has its type and is within its model's range. One
        check for every way a desired value comes in (MQTT, `mapper twin set`, inference actions)
        and again at the device before it is written."""
        if not self.has_property(name):
            raise ValueError(self._no_property(name))
        prop = self.prop(name)
        if not prop.writable:
            writable = sorted(p.name for p in self.properties if p.writable)
            raise ValueError(f"property {name!r} of {self.id} is ReadOnly (its DeviceModel {self.model_name}'s accessMode,"
                             " or a driver that cannot write it): it takes no desired value; "
                             + (f"the device's ReadWrite properties: {', '.join(writable)}" if writable
                                else "the device has no ReadWrite property"))
        try:
            value = coerce(prop.type, raw)
        except ValueError as exc:
            raise ValueError(f"property {name!r}: {exc}") from None
        why = range_problem(value, prop.minimum, prop.maximum)
        if why:
            raise ValueError(f"property {name!r}: {why}")
        if prop.calibration is not None:
            try:
                prop.calibration.raw(value)
            except ValueError as exc:
                raise ValueError(f"property {name!r}: {exc}") from None
        return value

    @property
    def origin(self) -> str:
        """Where the definition comes from: "edgecore" (a KubeEdge DMI Device, source "dmi:...")
        or "local" (the operator's YAML files, source "file:line")."""
        return "edgecore" if self.source.startswith("dmi:") else "local"

    @property
    def fingerprint(self) -> str:
        """Changes exactly when the device or its model changes (used to restart only what changed;
        not to decide whether a `desired:` is applied again: see TwinStore.sync_devices)."""
        docs = [self.device.model_dump(mode="json"), self.model.model_dump(mode="json")]
        try:
            blob = orjson.dumps(docs, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # an integer beyond 64 bits in a driver's configData (orjson refuses it)
            blob = json.dumps(docs, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def state_report_cycle_ms(self) -> int:
        report = self.device.spec.state_report
        return effective_cycle_ms(report.report_cycle if report else 0)


def merged_config(model_level: dict[str, Any] | None, device_level: dict[str, Any] | None) -> dict[str, Any]:
    """Model defaults overridden key by key by the device (edgecore's GetOverriddenDevice)."""
    merged = dict(model_level or {})
    merged.update(device_level or {})
    return merged
