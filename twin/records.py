"""Value objects that cross the twin boundary."""

from __future__ import annotations

from dataclasses import dataclass

from devices.ids import DeviceId
from devices.values import Value

GOOD = "good"
OUT_OF_RANGE = "out_of_range"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reading:
    """One measurement of one property. `quality` is good, out_of_range or error."""

    device_id: DeviceId
    property: str
    value: Value | None
    taken_at_ms: int
    quality: str = GOOD
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class PropertyTwin:
    name: str
    type: str
    writable: bool
    unit: str
    desired: Value | None
    desired_version: int
    desired_ts: int | None
    reported: Value | None
    reported_version: int
    reported_ts: int | None
    quality: str | None
    quality_detail: str | None
    apply_error: str | None

    @property
    def delta(self) -> bool:
        """A desired value is set and differs from the reported one."""
        return self.desired is not None and self.desired != self.reported


@dataclass(frozen=True, slots=True)
class AdminLock:
    """A device locked for maintenance (`mapper lock`): no value is written to it until `mapper unlock`."""

    since_ms: int
    by: str
    reason: str

    @property
    def since_text(self) -> str:
        """When it was locked, as every command shows it (`2026-12-01 11:25:56 UTC`: `mapper unlock` and
        `mapper devices` used to show `...56.643Z`, the same time another way)."""
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self.since_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def describe(self, device_id: DeviceId | str) -> str:
        why = f": {self.reason}" if self.reason else ""
        return (f"{device_id} is locked for maintenance since {self.since_text} by {self.by}{why}; nothing is written"
                f" to it until `mapper unlock {device_id}` (on the mapper's host)")


@dataclass(frozen=True, slots=True)
class DeviceTwin:
    id: DeviceId
    model: str
    protocol: str
    state: str
    state_detail: str | None
    state_ts: int | None
    last_online: int | None
    last_reading_ts: int | None
    properties: dict[str, PropertyTwin]
    lock: AdminLock | None = None

    def delta(self) -> dict[str, Value]:
        return {name: p.desired for name, p in self.properties.items() if p.delta and p.desired is not None}
