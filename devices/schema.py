"""Pydantic models of KubeEdge `devices.kubeedge.io/v1beta1` DeviceModel and Device documents.

Field names follow the CRD (camelCase in YAML). Unknown fields are kept, not rejected
(`extra="allow"`), so a file does not stop loading over one; the loader warns about each
(`devices.loader.unknown_field_warnings`): outside the free-form `configData` the KubeEdge API
server drops them (kubectl refuses them), so one is almost always a misspelling.
Everything is frozen once validated.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from devices import ids
from devices.values import PropertyType, whole_number

API_VERSION = "devices.kubeedge.io/v1beta1"


def _name(value: str) -> str:
    if not ids.is_name(value):
        raise ValueError(f"{value!r} is not a Kubernetes name ({ids.NAME_RULE})")
    return value


def _namespace(value: str) -> str:
    if not ids.is_namespace(value):
        raise ValueError(f"{value!r} is not a Kubernetes namespace ({ids.NAMESPACE_RULE})")
    return value


# Device-level topics share the shape of property topics (mapper/<node>/<ns>/<device>/<x>), and the
# device's state view (`.../state`: {"<property>": value, ..., "ts", "state", "seq"}) has fields of its own.
RESERVED_PROPERTY_NAMES = {
    "state": "the device's own topic and its state view's field",
    "availability": "the device's own topic",
    "ts": "its state view's field (the time of its newest reading)",
    "seq": "its state view's field (the message's sequence number)",
}


def _property(value: str) -> str:
    if not ids.is_property_name(value):
        raise ValueError(f"{value!r} is not a valid property name ({ids.PROPERTY_RULE})")
    if value in RESERVED_PROPERTY_NAMES:
        raise ValueError(f"{value!r} is reserved for {RESERVED_PROPERTY_NAMES[value]}: rename the property")
    return value


Name = Annotated[str, AfterValidator(_name)]
Namespace = Annotated[str, AfterValidator(_namespace)]
PropertyName = Annotated[str, AfterValidator(_property)]
# The CRD's int64 milliseconds. Strict, as the API server is: `collectCycle: true` is not 1 ms.
# A whole-number float (1000.0) is the int it is, as Kubernetes' validator takes it.
Cycle = Annotated[int, BeforeValidator(whole_number), Strict(), Field(ge=0, le=2**63 - 1)]


class _Base(BaseModel):
    # Fields of the object that the KubeEdge CRD (or Kubernetes) knows and this model does not declare.
    kubernetes_fields: ClassVar[frozenset[str]] = frozenset()
    # Fields (by their CRD name) the CRD declares as strings that a bare number is accepted for here,
    # as its text; the loader warns about each such number (KubeEdge's API server refuses it).
    numbers_as_text: ClassVar[frozenset[str]] = frozenset()
    # What a field (by its CRD name) left at its default does, for the fields where that is a
    # surprise: the unknown-field warning about a misspelling of one says it (`acessMode`).
    if_left_out: ClassVar[dict[str, str]] = {}
    # True where fields neither declares are not warned about (see LegacyStatus).
    unchecked_extra: ClassVar[bool] = False

    model_config = ConfigDict(
        frozen=True, extra="allow", alias_generator=to_camel, populate_by_name=True, strict=False
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """`configData:` with nothing after it is null: the API server drops null fields, so KubeEdge
        reads it as not given, and so do we (values inside configData are left as they are)."""
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


class ObjectMeta(_Base):
    # The rest of Kubernetes' ObjectMeta: set by the API server (or kubectl), never warned about.
    kubernetes_fields: ClassVar[frozenset[str]] = frozenset({
        "generateName", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
        "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences", "finalizers", "managedFields",
    })

    name: Name
    namespace: Namespace = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Visitors(_Base):
    protocol_name: str | None = None
    config_data: dict[str, Any] = {}


class ModelProperty(_Base):
    name: PropertyName
    description: str = ""
    type: PropertyType
    # Not declared means read-only: a device may only be written where its definition says so.
    access_mode: Literal["ReadWrite", "ReadOnly"] = "ReadOnly"
    minimum: str | None = None
    maximum: str | None = None
    unit: str = ""
    visitors: Visitors | None = None

    # Strings in the CRD that a bare number is read into here (see _bound_as_string).
    numbers_as_text: ClassVar[frozenset[str]] = frozenset({"minimum", "maximum"})
    if_left_out: ClassVar[dict[str, str]] = {
        "accessMode": "the property stays ReadOnly: writes to it are refused (/set, twin and $hw updates)"}

    @field_validator("minimum", "maximum", mode="before")
    @classmethod
    def _bound_as_string(cls, value: Any) -> Any:
        # The CRD declares these as strings, but hand-written YAML often has bare numbers: kept
        # working, but KubeEdge's API server refuses them, so the loader warns about each
        # (devices.loader.bare_number_warnings).
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("minimum", "maximum")
    @classmethod
    def _bound_is_a_number(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator each, at the bound's own line: a bad minimum no longer hides a bad maximum
        # (one model validator stopped at the first).
        _number(value, info.field_name or "bound")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ModelProperty:
        low, high = _number(self.minimum, "minimum"), _number(self.maximum, "maximum")  # (both checked above)
        if low is not None and high is not None and low > high:
            raise ValueError(f"minimum {self.minimum} is greater than maximum {self.maximum}")
        return self

    @property
    def writable(self) -> bool:
        return self.access_mode == "ReadWrite"

    @property
    def min_value(self) -> int | float | None:
        return _number(self.minimum, "minimum")

    @property
    def max_value(self) -> int | float | None:
        return _number(self.maximum, "maximum")


# A plain decimal numeral, as a person writes one: not Python's extras (`1_0`, `nan`, `inf`).
_NUMERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def _number(text: str | None, field: str) -> int | float | None:
    if text is None or text == "":
        return None
    if not _NUMERAL.fullmatch(text.strip()):
        raise ValueError(f"{field} {text!r} is not a number: write a plain decimal such as \"0\" or \"-2.5\"")
    if _INTEGER.fullmatch(text.strip()):
        # Exact: as a float, a bound beyond 2^53 was a neighbouring number (9007199254740995 read
        # as ...996, which a value above the model's maximum then passed).
        return int(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{field} {text!r} is too large")
    return value


class DeviceModelSpec(_Base):
    protocol: str | None = None
    protocol_config_data: dict[str, Any] = {}
    properties: list[ModelProperty] = []


class DeviceModel(_Base):
    api_version: Literal["devices.kubeedge.io/v1beta1"]
    kind: Literal["DeviceModel"]
    metadata: ObjectMeta
    spec: DeviceModelSpec = DeviceModelSpec()


class TwinProperty(_Base):
    numbers_as_text: ClassVar[frozenset[str]] = frozenset({"value"})

    value: str
    metadata: dict[str, str] = {}

    @field_validator("value", mode="before")
    @classmethod
    def _scalar_as_string(cls, value: Any) -> Any:
        # A bare number keeps its text (with a warning: KubeEdge's API server refuses it); a bare
        # boolean does not (`ON` is read as true), so it is refused with a hint to quote it (see describe()).
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value


class PushMethodMQTT(_Base):
    address: str = ""
    topic: str = ""
    qos: Annotated[int, BeforeValidator(whole_number), Strict()] = Field(default=0, ge=0, le=2)
    retained: StrictBool = False

    @field_validator("topic")
    @classmethod
    def _publishable(cls, value: str) -> str:
        """A topic the mapper can publish to, and that feeds nothing back into it ("" = the default topic)."""
        if not value:
            return value
        if "+" in value or "#" in value or "\0" in value:
            raise ValueError(f"topic {value!r}: no wildcards (+, #) or NUL in a topic to publish to")
        if value.startswith("$"):
            raise ValueError(f"topic {value!r}: topics starting with '$' belong to the broker and to KubeEdge's "
                             "twin protocol")
        if value.rsplit("/", 1)[-1] == "set":
            raise ValueError(f"topic {value!r}: a topic ending in /set is where desired values come in")
        if len(value.encode()) > 65_535:
            raise ValueError("topic: longer than MQTT's 65,535 bytes")
        return value


class PushMethod(_Base):
    mqtt: PushMethodMQTT | None = None
    http: dict[str, Any] | None = None
    otel: dict[str, Any] | None = None
    db_method: dict[str, Any] | None = None
    anomaly_detection: dict[str, Any] | None = None


class DeviceProperty(_Base):
    if_left_out: ClassVar[dict[str, str]] = {
        "reportToCloud": "reportToCloud stays false: the property's readings are not published to its own topic "
                         "(a pushMethod.mqtt.topic still gets them) nor in the twin reported to KubeEdge"}

    name: PropertyName
    desired: TwinProperty | None = None
    visitors: Visitors | None = None
    collect_cycle: Cycle = 0
    report_cycle: Cycle = 0
    report_to_cloud: StrictBool = False
    push_method: PushMethod | None = None


class ModelRef(_Base):
    name: Name


class ProtocolConfig(_Base):
    protocol_name: str = Field(min_length=1)
    config_data: dict[str, Any] = {}


class DeviceMethod(_Base):
    name: str
    description: str = ""
    property_names: list[str] = []


class StateReport(_Base):
    report_to_cloud: StrictBool = False
    report_cycle: Cycle = 0


class LegacyStatus(_Base):
    """A Device's `status` as KubeEdge v1.22 and earlier wrote it (still in the CRD, deprecated):
    `reportToCloud`/`reportCycle` are stateReport's older place, checked as stateReport is
    (edgecore sends them as the device's stateReport); not read here, as stateReport in a local
    file is not. The observed twins and state are edgecore's, kept as they are."""

    # What edgecore writes here is its own business: no unknown-field warnings below status.
    unchecked_extra: ClassVar[bool] = True

    report_to_cloud: StrictBool = False
    report_cycle: Cycle = 0
    twins: Any = None
    state: Any = None
    last_online_time: Any = None


class DeviceSpec(_Base):
    device_model_ref: ModelRef
    node_name: str | None = None
    protocol: ProtocolConfig
    properties: list[DeviceProperty] = []
    methods: list[DeviceMethod] = []
    state_report: StateReport | None = None


class Device(_Base):
    api_version: Literal["devices.kubeedge.io/v1beta1"]
    kind: Literal["Device"]
    metadata: ObjectMeta
    spec: DeviceSpec
    status: LegacyStatus | None = None


def effective_cycle_ms(cycle: int) -> int:
    """KubeEdge's rule: cycles are milliseconds and 0 means 1000 ms."""
    return cycle if cycle > 0 else 1000
