"""Translation tables between DMI protobuf messages and our own shapes: pure functions, no I/O.

pb Device / DeviceModel -> CRD-shaped dicts, validated by `devices.loader.load_objects`
exactly like YAML files; our twin -> pb DeviceStatus with values edgecore accepts.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, wrappers_pb2
from google.protobuf.any_pb2 import Any as AnyPb

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.ids import DeviceId
from devices.schema import API_VERSION
from devices.values import TWIN_VALUE, Value, to_twin_string
from mapper.dmi import api_pb2 as pb
from mapper.logs import Throttle, held_note
from twin.records import DeviceTwin

log = logging.getLogger("mapper.dmi")

# DeviceTwin lower-cases the state and silently ignores anything else.
EDGECORE_STATES = frozenset({"ok", "online", "offline", "unknown", "unhealthy"})
_STATE_ALIASES = {"disconnected": "offline", "error": "unhealthy"}
_ACCESS_MODES = {"readwrite": "ReadWrite", "readonly": "ReadOnly"}


class ConversionError(ValueError):
    """A DMI message that cannot become a Device/DeviceModel document (names the field)."""


# -- configData: google.protobuf.Any wrappers ------------------------------------------------

_WRAPPERS: list[tuple[Any, Any]] = [
    (wrappers_pb2.StringValue, lambda v: v),
    (wrappers_pb2.Int32Value, int),
    (wrappers_pb2.Int64Value, int),
    (wrappers_pb2.BoolValue, bool),
    (wrappers_pb2.FloatValue, lambda v: _from_float32(v)),
    # Not sent by edgecore today; accepted so a future double does not drop a device.
    (wrappers_pb2.DoubleValue, lambda v: int(v) if math.isfinite(v) and v.is_integer() else v),
]


def _from_float32(value: float) -> int | float:
    """A FloatValue as the number a person wrote: 1.0 -> 1, 0.10000000149 -> 0.1.

    edgecore decodes YAML numbers through JSON and sends every one as a float32, so
    `slaveID: 1` arrives as 1.0 and `scale: 0.1` as 0.10000000149011612.
    """
    if not math.isfinite(value):
        return value
    if value.is_integer():
        return int(value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == value:
            return float(text)
    return value


def unpack_any(message: AnyPb, where: str) -> Value:
    """The scalar inside a String/Int32/Int64/Float/Bool wrapper; ConversionError otherwise."""
    for wrapper, convert in _WRAPPERS:
        if message.Is(wrapper.DESCRIPTOR):
            box = wrapper()
            try:
                message.Unpack(box)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError: bytes that are not that wrapper
                raise ConversionError(f"{where}: a malformed {message.type_url.rsplit('/', 1)[-1]} ({exc})") from None
            return convert(box.value)
    raise ConversionError(
        f"{where}: unsupported value type {message.type_url!r} "
        "(expected String, Int32, Int64, Float or Bool wrappers)"
    )


def unpack_data(data: Mapping[str, AnyPb], where: str) -> dict[str, Value]:
    return {key: unpack_any(value, f"{where}.{key}") for key, value in sorted(data.items())}


def pack_value(value: Value) -> AnyPb:
    """The Any edgecore would send for a scalar (numbers that are not ints become FloatValue)."""
    if isinstance(value, bool):
        box: Any = wrappers_pb2.BoolValue(value=value)
    elif isinstance(value, int):
        box = wrappers_pb2.Int32Value(value=value) if -(2**31) <= value < 2**31 else wrappers_pb2.Int64Value(value=value)
    elif isinstance(value, float):
        box = wrappers_pb2.FloatValue(value=value)
    elif isinstance(value, str):
        box = wrappers_pb2.StringValue(value=value)
    else:
        raise ConversionError(f"cannot pack {type(value).__name__} into configData (flat scalars only)")
    packed = AnyPb()
    packed.Pack(box)
    return packed


# -- pb -> CRD-shaped documents -------------------------------------------------------------

def model_document(model: pb.DeviceModel, protocol: str | None = None) -> dict[str, Any]:
    """A DeviceModel document from a pb.DeviceModel (`protocol` is not on the wire: ours)."""
    properties = []
    for prop in model.spec.properties:
        item: dict[str, Any] = {"name": prop.name}
        if prop.type:  # KubeEdge's CRD does not require it: "" on the wire is a type left out
            item["type"] = prop.type.upper()
        if prop.description:
            item["description"] = prop.description
        if prop.accessMode:
            item["accessMode"] = _ACCESS_MODES.get(prop.accessMode.lower(), prop.accessMode)
        for key in ("minimum", "maximum", "unit"):
            if getattr(prop, key):
                item[key] = getattr(prop, key)
        properties.append(item)
    spec: dict[str, Any] = {"properties": properties}
    if protocol:
        spec["protocol"] = protocol
    return {
        "apiVersion": API_VERSION,
        "kind": "DeviceModel",
        "metadata": {"name": model.name, "namespace": model.namespace or "default"},
        "spec": spec,
    }


def device_document(device: pb.Device) -> dict[str, Any]:
    """A Device document from a pb.Device; configData wrappers unpacked to plain scalars."""
    where = f"device {device.namespace or 'default'}/{device.name}"
    spec = device.spec
    doc_spec: dict[str, Any] = {
        "deviceModelRef": {"name": spec.deviceModelReference},
        "protocol": {
            "protocolName": spec.protocol.protocolName,
            "configData": unpack_data(spec.protocol.configData.data, f"{where} spec.protocol.configData"),
        },
        "properties": [_property_document(p, f"{where} spec.properties[{i}]") for i, p in enumerate(spec.properties)],
    }
    if spec.methods:
        doc_spec["methods"] = [
            {"name": m.name, "description": m.description, "propertyNames": list(m.propertyNames)} for m in spec.methods
        ]
    if device.HasField("status"):
        doc_spec["stateReport"] = {
            "reportToCloud": device.status.reportToCloud,
            "reportCycle": device.status.reportCycle,
        }
    return {
        "apiVersion": API_VERSION,
        "kind": "Device",
        "metadata": {"name": device.name, "namespace": device.namespace or "default"},
        "spec": doc_spec,
    }


def _property_document(prop: pb.DeviceProperty, where: str) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": prop.name,
        "collectCycle": prop.collectCycle,
        "reportCycle": prop.reportCycle,
        "reportToCloud": prop.reportToCloud,
    }
    if prop.HasField("desired") and prop.desired.value != "":
        item["desired"] = {"value": prop.desired.value, "metadata": dict(prop.desired.metadata)}
    if prop.HasField("visitors"):
        item["visitors"] = {
            "protocolName": prop.visitors.protocolName or None,
            "configData": unpack_data(prop.visitors.configData.data, f"{where}.visitors.configData"),
        }
    if prop.HasField("pushMethod"):
        item["pushMethod"] = _push_method(prop.pushMethod, where)
    return item


def _push_method(push: pb.PushMethod, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if push.HasField("mqtt"):
        m = push.mqtt
        out["mqtt"] = {"address": m.address, "topic": m.topic, "qos": m.qos, "retained": m.retained}
    if push.HasField("http"):
        h = push.http
        out["http"] = {"hostName": h.hostname, "port": h.port, "requestPath": h.requestpath, "timeout": h.timeout}
    if push.HasField("otel"):
        out["otel"] = {"endpointURL": push.otel.endpointURL}
    if push.HasField("dbMethod"):
        out["dbMethod"] = json_format.MessageToDict(push.dbMethod, preserving_proto_field_name=True)
    if push.HasField("anomalyDetection"):
        out["anomalyDetection"] = unpack_data(push.anomalyDetection.data, f"{where}.pushMethod.anomalyDetection")
    return out


def dedupe_models(models: Iterable[pb.DeviceModel]) -> dict[tuple[str, str], pb.DeviceModel]:
    """MapperRegister's modelList repeats a model once per device: keep one per namespace/name."""
    out: dict[tuple[str, str], pb.DeviceModel] = {}
    for model in models:
        out[(model.namespace or "default", model.name)] = model
    return out


# -- our twin -> pb -------------------------------------------------------------------------

def twin_value(value: Value | None) -> str:
    """The twin string for edgecore: "" for no value; ValueError when its pattern refuses it."""
    if value is None:
        return ""
    text = to_twin_string(value)
    if text and not TWIN_VALUE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} does not match edgecore's twin value pattern {TWIN_VALUE.pattern}")
    return text


class LeftOutLog:
    """The warnings of twins left out because edgecore's pattern refuses a value: one line per
    device, property and call (`what`) in `interval_s` at most, as such a value is usually refused
    at every report (a STRING sensor reading "hello world").

    Held by the object that reports (the Reporter), not by this module: two mappers in one process
    (tests) do not silence each other, and `forget` drops the devices that are gone, so a device
    removed and added again is warned about again.
    """

    def __init__(self, interval_s: float = 600.0) -> None:
        self.interval_s = interval_s
        self._throttles: dict[DeviceId, Throttle] = {}

    def warn(self, device_id: DeviceId, prop: str, what: str, side: str, exc: ValueError) -> None:
        throttle = self._throttles.get(device_id)
        if throttle is None:
            throttle = self._throttles[device_id] = Throttle(burst=1, interval_s=self.interval_s)
        held = throttle((prop, what))
        if held is not None:
            log.warning("%s: property %s left out of %s: the %s value %s%s",
                        device_id, prop, what, side, exc, held_note(held))

    def forget(self, keep: Iterable[DeviceId]) -> None:
        """Drop the entries of every device not in `keep`."""
        kept = set(keep)
        for device_id in [d for d in self._throttles if d not in kept]:
            del self._throttles[device_id]

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._throttles


# What each left-out warning says the twin was left out of.
REPORT = "the twin report to edgecore, which keeps the last value it took"
GET_DEVICE = "GetDevice's answer"


def _reportable(device: DeviceDefinition, prop: str, desired: Value | None, reported: Value | None,
                left_out: LeftOutLog, what: str) -> tuple[str, str] | None:
    """(observedDesired, reported) for edgecore, or None when its pattern refuses either (logged)."""
    values = []
    for side, value in (("desired", desired), ("reported", reported)):
        try:
            values.append(twin_value(value))
        except ValueError as exc:
            left_out.warn(device.id, prop, what, side, exc)
            return None
    return values[0], values[1]


def _meta(prop: PropertyDefinition, ts: int | None) -> dict[str, str]:
    return {"type": prop.type.twin_type, "timestamp": str(ts) if ts else ""}


def device_status(definition: DeviceDefinition, twin: DeviceTwin, left_out: LeftOutLog) -> pb.DeviceStatus:
    """All reportToCloud twins of a device, each with observedDesired and reported set (maybe "").

    A twin with a value edgecore's pattern refuses is left out (warned about in `left_out`):
    edgecore handles each twin of a report as an update of its own, so the others go through and
    that one keeps the value the cloud has. Sent as "", it would clear that value (edgecore skips
    the pattern for "")."""
    twins = []
    for prop in definition.properties:
        if not prop.report_to_cloud:
            continue
        state = twin.properties.get(prop.name)
        values = _reportable(definition, prop.name, state.desired if state else None,
                             state.reported if state else None, left_out, REPORT)
        if values is None:
            continue
        twins.append(pb.Twin(
            propertyName=prop.name,
            observedDesired=pb.TwinProperty(value=values[0], metadata=_meta(prop, state and state.desired_ts)),
            reported=pb.TwinProperty(value=values[1], metadata=_meta(prop, state and state.reported_ts)),
        ))
    report = definition.device.spec.state_report
    return pb.DeviceStatus(
        twins=twins,
        reportToCloud=bool(report and report.report_to_cloud),
        reportCycle=report.report_cycle if report else 0,
    )


def fresh_status(
    definition: DeviceDefinition, twin: DeviceTwin | None, readings: Mapping[str, tuple[Value | None, int]],
    left_out: LeftOutLog,
) -> pb.DeviceStatus:
    """GetDevice's status: every property, `reported` from `readings` (read just now) when given.

    A twin with a value edgecore's pattern refuses is left out, as in `device_status`: sent as "",
    a caller copying it into a report would clear the cloud's last good value."""
    twins = []
    for prop in definition.properties:
        state = twin.properties.get(prop.name) if twin else None
        value, ts = readings.get(prop.name, (state.reported if state else None, state.reported_ts if state else None))
        values = _reportable(definition, prop.name, state.desired if state else None, value, left_out, GET_DEVICE)
        if values is None:
            continue
        twins.append(pb.Twin(
            propertyName=prop.name,
            observedDesired=pb.TwinProperty(value=values[0], metadata=_meta(prop, state and state.desired_ts)),
            reported=pb.TwinProperty(value=values[1], metadata=_meta(prop, ts)),
        ))
    return pb.DeviceStatus(twins=twins)


def edgecore_state(state: str) -> str:
    """One of the five states edgecore accepts (others are silently dropped by it)."""
    lowered = state.lower()
    if lowered in EDGECORE_STATES:
        return lowered
    return _STATE_ALIASES.get(lowered, "unknown")
