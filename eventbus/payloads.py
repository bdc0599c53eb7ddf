"""JSON payloads of KubeEdge's twin protocol (shapes as edgecore sends them) and of our telemetry.

Builders are pure functions; parsers validate untrusted input with pydantic and raise
`BadRequest(code, reason)` that the router turns into edgecore's error reply.
"""

from __future__ import annotations

import time
import uuid
from contextlib import suppress
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from devices.definitions import DeviceDefinition
from devices.ids import shown
from devices.values import PropertyType, Value, to_twin_string
from twin.records import DeviceTwin, PropertyTwin


class BadRequest(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- incoming -------------------------------------------------------------------------------

class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class VersionIn(_In):
    # JSON integers only, as edgecore's int64 fields: lax parsing took `true` for version 1 and
    # "0" or 2.0 for numbers, which the 409 check then compared with the stored version.
    cloud: StrictInt | None = None
    edge: StrictInt | None = None


class ValueIn(_In):
    value: str | int | float | bool | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _scalar(cls, value: Any) -> Any:
        # Else pydantic's first error for a list was "value.str: Input should be a valid string".
        if isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "a list"
            raise PydanticCustomError("scalar", f"a value is a string, number, boolean or null, not {kind}")
        return value


class TwinIn(_In):
    expected: ValueIn | None = None
    # Not validated: next to `expected` it is ignored (an app sending back what twin/get gave it,
    # with a new expected value); alone it is refused (Router._twin_update), whatever it holds.
    actual: Any = None
    expected_version: VersionIn | None = None
    metadata: dict[str, Any] | None = None


class EventIn(_In):
    event_id: str = Field(default="", max_length=128)
    timestamp: int | None = None

    @field_validator("event_id", mode="before")
    @classmethod
    def _event_id(cls, value: Any) -> Any:
        # Go's encoding/json leaves a string as "" for null: edgecore answers such a request.
        return "" if value is None else value


class TwinUpdateIn(EventIn):
    twin: dict[str, TwinIn | None] = Field(max_length=256)


class StateIn(EventIn):
    state: str = Field(max_length=32)


def decode(payload: bytes, model: type[BaseModel], max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise BadRequest(400, f"payload of {len(payload)} bytes is larger than the limit of {max_bytes}")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, not_utf8(payload) or f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the payload must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        # Property names are keys of `twin`, so a location can be as long as the payload.
        where = ".".join(shown(p, 80) if isinstance(p, str) and len(p) > 80 else str(p) for p in first["loc"]) or "payload"
        # Not pydantic's "Input should be a valid dictionary or instance of ValueIn": no class names.
        message = "should be a JSON object" if first["type"] in ("model_type", "dict_type") else first["msg"]
        raise BadRequest(400, f"{where}: {message}") from None


def not_utf8(payload: bytes) -> str | None:
    """Where `payload` stops being UTF-8, or None. orjson says "str is not valid UTF-8: surrogates
    not allowed: line 1 column 1 (char 0)" for any bad byte, wherever it is."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the payload is not UTF-8 text: byte 0x{payload[exc.start]:02x} at offset {exc.start} ({exc.reason})"
    return None


# Properties whose values are text: a /set payload is taken as it is, never parsed as a JSON number.
TEXT_TYPES = frozenset({PropertyType.STRING, PropertyType.BYTES, PropertyType.STREAM})

NO_VALUE_KEY = 'the JSON object has no "value" key: send {"value": ...} (also for a text that starts with "{")'


def check_text_value(raw: Any, kind: PropertyType | None) -> None:
    """BadRequest(400) for a JSON number as the value of a text property (TEXT_TYPES): its text is
    not kept by a JSON parser (`1.10` reads as 1.1, `1E3` as 1000.0, a 23-digit integer as a float
    in exponent notation), so the property would be set to another text than the one sent."""
    if kind in TEXT_TYPES and isinstance(raw, int | float) and not isinstance(raw, bool):
        raise BadRequest(400, f"a {kind.value} value is sent as a JSON string (\"1.10\"), not as a JSON number, "
                              f"whose text is not kept (1.10 reads as 1.1)")


def set_value(payload: bytes, kind: PropertyType | None) -> Any:
    """The value a `.../<property>/set` payload carries for a property of type `kind` (None: not
    declared, left for the caller to refuse), not yet checked against the property: one parse for
    the router and `mapper twin set`, whose argument is such a payload. BadRequest(400) if none.

    - A payload that starts with "{" (after whitespace) is a JSON object carrying `value` (other
      keys are ignored), or refused: `malformed JSON: ...` with the twin protocol's limits (orjson's
      depth limit), or the object has no `value` key. Taken as text, a truncated object or a typo
      was written to a STRING property as its value.
    - For a text property (TEXT_TYPES): the text itself, stripped, or the string a JSON string
      holds (`"ON"` is ON). Text that looks like another JSON value (`1.10`, `1e3`, `true`) is the
      text: parsing it rewrote numbers (`1.10` became "1.1").
    - For other types: the JSON value (`true`, `21.5`, `"ON"`), else the text, stripped.
    A JSON list or object as the value is refused: values are scalars."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest(400, not_utf8(payload) or "payload is not UTF-8 text") from None
    if text.startswith("{"):
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(400, f"malformed JSON: {exc}") from None
        if "value" not in decoded:  # (a dict: the text starts with "{" and parsed)
            raise BadRequest(400, NO_VALUE_KEY)
        raw = decoded["value"]
        check_text_value(raw, kind)
    elif kind in TEXT_TYPES:
        raw = text
        if text.startswith('"'):
            with suppress(orjson.JSONDecodeError):  # no JSON string: the text
                decoded = orjson.loads(text)
                raw = decoded if isinstance(decoded, str) else text
    else:
        raw = text
        with suppress(orjson.JSONDecodeError):  # no JSON: the text
            raw = orjson.loads(text)
    if isinstance(raw, dict | list):
        raise BadRequest(400, "the value must be a scalar")
    return raw


def event_id_of(payload: bytes, max_bytes: int) -> str:
    """Best-effort event_id of a payload that failed validation, so the error reply can echo it.

    "" for a payload over `max_bytes`: it is refused unread, as decode() refuses it. Parsing it
    for its event_id took the whole parse that the limit exists to avoid (an 8 MB `[{},{},...]`,
    within the broker's packet limit, raised a running mapper's peak memory from 42 MB to 297 MB)."""
    if len(payload) > max_bytes:
        return ""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return ""
    value = data.get("event_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else ""


# -- outgoing: KubeEdge ----------------------------------------------------------------------

def _value(value: Value | None, ts: int | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"value": to_twin_string(value), "metadata": {"timestamp": ts or 0}}


def msg_twin(prop: PropertyTwin, *, versions: bool = False) -> dict[str, Any]:
    twin: dict[str, Any] = {"optional": False, "metadata": {"type": _twin_type(prop.type)}}
    expected = _value(prop.desired, prop.desired_ts)
    actual = _value(prop.reported, prop.reported_ts)
    if expected is not None:
        twin["expected"] = expected
    if actual is not None:
        twin["actual"] = actual
    if versions:
        twin["expected_version"] = {"cloud": 0, "edge": prop.desired_version}
        twin["actual_version"] = {"cloud": 0, "edge": prop.reported_version}
    return twin


def _twin_type(ptype: str) -> str:
    return {"INT": "int", "FLOAT": "float", "DOUBLE": "float", "BOOLEAN": "boolean"}.get(ptype, "string")


def error_reply(event_id: str, code: int, reason: str) -> dict[str, Any]:
    return {"event_id": event_id, "timestamp": now_ms(), "code": code, "reason": reason}


def update_result(event_id: str, twin: DeviceTwin, names: list[str]) -> dict[str, Any]:
    """twin/update/result: for each property set, what the update changed, as edgecore's result of an
    app's update (dealTwinCompare's sync result, versions stripped) holds it: `expected`, `optional`,
    `metadata`, not the device's `actual`, which the update did not set (twin/get has it)."""
    def changed(prop: PropertyTwin) -> dict[str, Any]:
        entry = msg_twin(prop)
        entry.pop("actual", None)
        return entry
    return {"event_id": event_id, "timestamp": now_ms(), "twin": {n: changed(twin.properties[n]) for n in names}}


def update_document(event_id: str, before: DeviceTwin | None, after: DeviceTwin, names: list[str]) -> dict[str, Any]:
    def last(name: str) -> dict[str, Any] | None:
        if before is None or name not in before.properties:
            return None
        return msg_twin(before.properties[name], versions=True)
    return {"event_id": event_id, "timestamp": now_ms(),
            "twin": {n: {"last": last(n), "current": msg_twin(after.properties[n], versions=True)} for n in names}}


def reported_document(twin: DeviceTwin, names: list[str],
                      previous: dict[str, tuple[Value | None, int | None, int]]) -> dict[str, Any]:
    """twin/update/document for an update of actual values (the device's readings): `current` is
    each property's twin now; `last`, as edgecore's for such an update, the same twin with the
    previous actual value and version (`previous`: name -> (value, ts, version)), or null for a
    property without one. Built from `current` (a copy per property, no second msg_twin)."""
    docs: dict[str, Any] = {}
    for n in names:
        current = msg_twin(twin.properties[n], versions=True)
        prev = previous.get(n)
        last = None
        if prev is not None:
            last = current.copy()
            actual = _value(prev[0], prev[1])
            if actual is None:
                last.pop("actual", None)
            else:
                last["actual"] = actual
            last["actual_version"] = {"cloud": 0, "edge": prev[2]}
        docs[n] = {"last": last, "current": current}
    return {"event_id": "", "timestamp": now_ms(), "twin": docs}


def delta(twin: DeviceTwin) -> dict[str, Any] | None:
    """edgecore publishes a delta only when some twin's expected is not "" and differs from its
    actual; it lists (under `twin` too) only the twins whose expected is not "". An empty expected
    (a STRING property asked to be "") is no delta there, so none here either."""
    wanted = {n: text for n, v in twin.delta().items() if (text := to_twin_string(v)) != ""}
    if not wanted:
        return None
    return {
        "event_id": str(uuid.uuid4()), "timestamp": now_ms(),
        "twin": {n: msg_twin(p) for n, p in twin.properties.items()
                 if p.desired is not None and to_twin_string(p.desired) != ""},
        "delta": wanted,
    }


def get_result(event_id: str, twin: DeviceTwin) -> dict[str, Any]:
    return {"event_id": event_id, "timestamp": now_ms(),
            "twin": {n: msg_twin(p) for n, p in twin.properties.items()}}


def _rfc3339(ms: int | None) -> str:
    if not ms:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _member(twin: DeviceTwin, definition: DeviceDefinition | None) -> dict[str, Any]:
    """A device as edgecore's membership messages list it (dttype.Device: `last_online` is
    `omitempty`, so a device never `ok` has none, as in state_result)."""
    member: dict[str, Any] = {
        "id": str(twin.id), "name": twin.id.name,
        "description": f"{twin.model} on {twin.protocol}" if definition is None else
                       f"{definition.model_name} on {definition.protocol}",
        "state": twin.state,
        "attributes": {"model": {"value": twin.model, "optional": False, "metadata": {"type": "string"}},
                       "protocol": {"value": twin.protocol, "optional": False, "metadata": {"type": "string"}}},
    }
    last_online = _rfc3339(twin.last_online)
    if last_online:
        member["last_online"] = last_online
    return member


def membership(event_id: str, twins: list[DeviceTwin], definitions: dict[Any, DeviceDefinition]) -> dict[str, Any]:
    return {"event_id": event_id, "timestamp": now_ms(),
            "devices": [_member(twin, definitions.get(twin.id)) for twin in twins]}


def membership_updated(added: list[tuple[DeviceTwin, DeviceDefinition | None]],
                       removed: list[tuple[DeviceTwin, DeviceDefinition | None]]) -> dict[str, Any]:
    """`$hw/events/node/<node>/membership/updated`: edgecore's MembershipUpdate, the devices a change
    of the node's device set added and removed, each as membership/get/result lists it."""
    return {"event_id": str(uuid.uuid4()), "timestamp": now_ms(),
            "added_devices": [_member(t, d) for t, d in added],
            "removed_devices": [_member(t, d) for t, d in removed]}


def state_result(name: str, state: str, last_online_ms: int | None) -> dict[str, Any]:
    """`$hw/events/device/<ns>/<name>/state/update/result` as edgecore publishes it after a device's
    state changed (dttype.BuildDeviceState: a Device of name, state and last_online, each left out
    when empty, as Go's omitempty does)."""
    device: dict[str, Any] = {"name": name, "state": state}
    last_online = _rfc3339(last_online_ms)
    if last_online:
        device["last_online"] = last_online
    return {"event_id": str(uuid.uuid4()), "timestamp": now_ms(), "device": device}


# -- outgoing: our telemetry -----------------------------------------------------------------

def telemetry(value: Value, unit: str, ts: int, quality: str = "good") -> dict[str, Any]:
    """Per-property telemetry; `seq` is added by the outbox. `ts` is the measurement time in ms."""
    body: dict[str, Any] = {"value": value, "ts": ts}
    body.update(telemetry_fields(unit, quality))
    return body


def telemetry_fields(unit: str, quality: str = "good") -> dict[str, Any]:
    """The fields of `telemetry()` after value and ts: what an OutMessage carried by its reading
    (twin.store.OutMessage.reading) holds as its body."""
    fields: dict[str, Any] = {}
    if unit:
        fields["unit"] = unit
    if quality != "good":
        fields["quality"] = quality
    return fields
