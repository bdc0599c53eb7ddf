"""Inference configuration: the mapper config's `inference:` section and, as an alternative
source for the same settings, a device property's KubeEdge v1.23 `pushMethod.anomalyDetection`
flat `data` map (see docs/inference.md for both, with every key).

Pure pydantic: importing this module needs neither numpy nor onnxruntime.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from devices import ids
from devices.definitions import MapAt
from devices.errors import Problem
from devices.ids import DeviceId


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishAction(_Base):
    """Publish every decision like telemetry on `<prefix>/<node>/<ns>/<pipeline>/decision`."""

    type: Literal["publish"] = "publish"
    # Publish only when the label differs from the previous decision's (final answers that
    # replace a provisional one are always published).
    only_changes: bool = False


class SetDesiredAction(_Base):
    """Closed loop: set a desired value on a (writable) property of another device."""

    type: Literal["set_desired"]
    device: str
    property: str
    value: Any
    # Labels that set `value` (default: every class but the model's first, e.g. all but `normal`).
    when: list[str] | None = None
    # Set for any other label (default: leave the property alone).
    otherwise: Any = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        DeviceId.parse(value)
        return value


class AlertAction(_Base):
    """A warning log line and a message on `<prefix>/<node>/<ns>/<pipeline>/alert`."""

    type: Literal["alert"]
    when: list[str] | None = None


Action = Annotated[PublishAction | SetDesiredAction | AlertAction, Field(discriminator="type")]


class PipelineSettings(_Base):
    # The device whose readings are windowed: `namespace/name` or `name` (namespace default).
    device: str
    # The derived device the decisions belong to (default `<device>-<model dir with - for _>`).
    name: str | None = None
    # A model directory: a name under `inference.models_dir`, or a path.
    model: str
    # Device properties fed to the model, in the model's order (default: model.json's names).
    properties: list[str] | None = None
    # Window length in steps: must equal the model's (default: model.json's window_length).
    window: int | None = Field(default=None, ge=1)
    stride: int = Field(default=1, ge=1)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)   # default: model.json's
    score: Literal["max_prob", "entropy"] | None = None              # default: model.json's
    audit_share: float = Field(default=0.0, ge=0.0, le=1.0)
    audit_seed: int | None = None
    # After this long without a result, the edge answer stands, marked provisional.
    deadline_s: float = Field(default=5.0, ge=0.0)
    # Pending requests are sent again this often until a result comes or they expire.
    resend_s: float = Field(default=30.0, gt=0.0)
    # Results for requests older than this are refused as late, and the request is dropped.
    result_max_age_s: float = Field(default=600.0, gt=0.0)
    # A step more than this after the previous one restarts the window (default: 3 collect cycles).
    max_gap_s: float | None = Field(default=None, gt=0.0)
    # Take at most one step per this many seconds (subsampling to the model's cadence).
    min_step_s: float = Field(default=0.0, ge=0.0)
    encoding: Literal["int8", "float16"] = "int8"
    actions: list[Action] = [PublishAction()]
    # From the anomalyDetection map of a Device edgecore sent (from_anomaly_detection confined=True):
    # its set_desired targets must be edgecore's devices too, checked again when a value is set.
    # Not a field (no config can set it); part of the equality, so a change rebuilds the pipeline.
    _confined: bool = PrivateAttr(default=False)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        DeviceId.parse(value)
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else ids.check_name(value)

    @property
    def device_id(self) -> DeviceId:
        return DeviceId.parse(self.device)

    @property
    def confined(self) -> bool:
        return self._confined

    def pipeline_id(self, model_dir: Path) -> DeviceId:
        device = self.device_id
        name = self.name or f"{device.name}-{model_dir.name.replace('_', '-').lower()}"
        return DeviceId(device.namespace, ids.check_name(name))


class InferenceSettings(_Base):
    # Where model names are looked up (default: the shipped `models/` package directory).
    models_dir: Path | None = None
    pipelines: list[PipelineSettings] = []
    # Also build pipelines from devices' `pushMethod.anomalyDetection` data maps.
    from_devices: bool = True
    # At most this many requests wait for a result; beyond, the oldest is given up.
    max_pending: int = Field(default=10_000, ge=1)
    # Decisions kept in the twin per pipeline (older rows are pruned).
    keep_decisions: int = Field(default=100_000, ge=10)
    # The counters are logged as one INFO line this often (only when they changed) and at
    # shutdown; 0: only at shutdown.
    log_counters_s: float = Field(default=60.0, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _list(cls, data: Any) -> Any:
        # `inference:` may be just the list of pipelines.
        return {"pipelines": data} if isinstance(data, list) else data

    def resolve_model(self, model: str) -> Path:
        path = Path(model)
        if path.is_absolute() or "/" in model:
            return path
        return (self.models_dir or default_models_dir()) / model


def default_models_dir() -> Path:
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path("models")


# -- KubeEdge pushMethod.anomalyDetection ---------------------------------------------------

# Flat data-map key -> PipelineSettings field. Values arrive as strings or numbers (edgecore
# turns every YAML number into a float32 FloatValue), never as maps or lists.
ANOMALY_KEYS = {
    "model": "model", "name": "name", "properties": "properties", "window": "window", "stride": "stride",
    "threshold": "threshold", "score": "score", "auditShare": "audit_share", "auditSeed": "audit_seed",
    "deadlineS": "deadline_s", "resendS": "resend_s", "resultMaxAgeS": "result_max_age_s",
    "maxGapS": "max_gap_s", "minStepS": "min_step_s", "encoding": "encoding",
}
_INTS = {"window", "stride", "audit_seed"}
ACTION_KEYS = ("publish", "onlyChanges", "alert", "alertOn", "setDevice", "setProperty", "setValue", "setOn",
               "setOtherwise")


def _csv(value: Any) -> list[str]:
    """A list written as "a, b" (edgecore's maps hold strings only) or, in a local file, as a YAML list."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(part).strip() for part in parts if str(part).strip()]


def _int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# A model a device's map may name: a directory directly under models_dir, no path.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class AnomalyError(ValueError):
    """A mistake in a property's anomalyDetection map; `key`: the data-map key at fault (None: the
    map as a whole, such as a missing `model`), for an error at that key's line of a device file."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# PipelineSettings field -> the data-map key that sets it; an action's fields -> theirs.
_KEY_OF = {field: key for key, field in ANOMALY_KEYS.items()}
_ACTION_KEY_OF = {"publish": {"only_changes": "onlyChanges", "": "publish"}, "alert": {"when": "alertOn", "": "alert"},
                  "set_desired": {"device": "setDevice", "property": "setProperty", "value": "setValue",
                                  "when": "setOn", "otherwise": "setOtherwise", "": "setDevice"}}


def anomaly_key(field: str, settings: PipelineSettings | None = None) -> str | None:
    """The data-map key that sets the pipeline setting `field` (`threshold`, `actions[1]`, `actions.1.when`
    ...; PipelineError.field, a pydantic error's location) of settings made by from_anomaly_detection;
    None: no key (the device itself, a default)."""
    parts = field.replace("[", ".").replace("]", "").split(".")
    if parts[0] == "actions" and len(parts) > 1 and parts[1].isdigit():
        kind = None
        if settings is not None and int(parts[1]) < len(settings.actions):
            kind = settings.actions[int(parts[1])].type
        keys = _ACTION_KEY_OF.get(kind or "", {})
        return keys.get(parts[2] if len(parts) > 2 else "", keys.get(""))
    return _KEY_OF.get(parts[0])


def _close(key: str) -> str:
    close = difflib.get_close_matches(key, [*ANOMALY_KEYS, *ACTION_KEYS], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def from_anomaly_detection(device: DeviceId, prop: str, data: dict[str, Any], *,
                           confined: bool = True) -> PipelineSettings:
    """PipelineSettings from a property's `pushMethod.anomalyDetection.data` (flat map).

    `confined`: the map of a Device edgecore sent (`mode: kubeedge`) is written by anyone allowed
    to create Devices in its namespace, not by the node's operator: its `setDevice` is confined to
    the device's own namespace (a bare name is looked up there) and its `model` to a name under
    models_dir (no path). The settings are marked `confined`: their target must also be a device
    edgecore sent, not one of the operator's local devices (checked against the definitions by
    collect_settings, and again when a value is set). The operator's own device files
    (confined=False) and the mapper config's `inference:` section have none of these limits (a
    bare name there means `default/`).

    Raises AnomalyError (a ValueError) naming the bad key (its `key`).
    """
    unknown = sorted(map(str, set(data) - set(ANOMALY_KEYS) - set(ACTION_KEYS)))
    if unknown:
        raise AnomalyError(f"anomalyDetection: unknown key(s) {', '.join(k + _close(k) for k in unknown)}; "
                           f"known: {', '.join([*ANOMALY_KEYS, *ACTION_KEYS])}", unknown[0])
    fields: dict[str, Any] = {"device": str(device)}
    for key, field in ANOMALY_KEYS.items():
        if key in data and data[key] is not None and data[key] != "":
            value = data[key]
            if field == "properties":
                value = _csv(value)
            elif field in _INTS:
                value = _int(value)
            elif field in ("model", "name", "score", "encoding"):
                value = str(value)
            fields[field] = value
    if "model" not in fields:
        raise AnomalyError(f"anomalyDetection on {device}/{prop}: `model` is required: add `model: <name>`, a model "
                           "directory under inference.models_dir (like sensor_faults)")
    model = fields["model"]
    if confined and (not _MODEL_NAME.fullmatch(model) or model == ".."):
        raise AnomalyError(f"anomalyDetection: model {model!r}: a device's map names a model directory under "
                           f"inference.models_dir (like sensor_faults), not a path; paths only in the mapper config",
                           "model")
    actions: list[dict[str, Any]] = []
    if _bool(data.get("publish", True)):
        actions.append({"type": "publish", "only_changes": _bool(data.get("onlyChanges", False))})
    if _bool(data.get("alert", False)) or "alertOn" in data:
        actions.append({"type": "alert", "when": _csv(data["alertOn"]) if "alertOn" in data else None})
    if "setDevice" in data or "setProperty" in data:
        if "setDevice" not in data or "setProperty" not in data or "setValue" not in data:
            given = [k for k in ("setDevice", "setProperty", "setValue") if k in data]
            lacking = [k for k in ("setDevice", "setProperty", "setValue") if k not in data]
            raise AnomalyError(f"anomalyDetection: setDevice, setProperty and setValue go together: add "
                               f"{' and '.join(lacking)}, or remove {' and '.join(given)}", given[0])
        try:
            target = DeviceId.parse(str(data["setDevice"]),
                                    default_namespace=device.namespace if confined else "default")
        except ValueError as exc:
            raise AnomalyError(f"anomalyDetection: setDevice: {exc}", "setDevice") from None
        if confined and target.namespace != device.namespace:
            raise AnomalyError(f"anomalyDetection: setDevice {data['setDevice']!s}: a device's map may only set "
                               f"devices of its own namespace ({device.namespace}), not of {target.namespace}",
                               "setDevice")
        actions.append({"type": "set_desired", "device": str(target), "property": str(data["setProperty"]),
                        "value": data["setValue"], "when": _csv(data["setOn"]) if "setOn" in data else None,
                        "otherwise": data.get("setOtherwise")})
    fields["actions"] = actions
    try:
        settings = PipelineSettings.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        key = anomaly_key(loc, None) if not loc.startswith("actions") else _action_key(error["loc"], actions)
        what = key or loc
        shown_value = f" {data[key]!r}" if key in data else ""
        raise AnomalyError(f"anomalyDetection: {what}{shown_value}: {error['msg']}", key) from None
    settings._confined = confined
    return settings


def _action_key(loc: tuple[Any, ...], actions: list[dict[str, Any]]) -> str | None:
    """The data-map key of a pydantic error in `actions` (loc: actions, index, type, field)."""
    if len(loc) < 2 or not isinstance(loc[1], int) or loc[1] >= len(actions):
        return None
    keys = _ACTION_KEY_OF.get(actions[loc[1]]["type"], {})
    field = next((str(part) for part in loc[2:] if str(part) in keys), "")
    return keys.get(field, keys.get(""))


@dataclass(frozen=True, slots=True)
class LocalMap:
    """The anomalyDetection map of a property of a device file (the operator's own), where it is written,
    and the settings it makes (None: it has a mistake, among the problems)."""

    device: DeviceId
    prop: str
    at: MapAt
    settings: PipelineSettings | None


def local_maps(settings: InferenceSettings | None, definitions: dict[DeviceId, Any]
               ) -> tuple[list[LocalMap], list[Problem]]:
    """The anomalyDetection maps of the devices of local files (not edgecore's: a cloud object must not stop
    the node's mapper; their mistakes are logged and the pipeline left out), with a problem at its file, line
    and key for each map whose own keys are wrong (an unknown key, no `model`, setDevice without setProperty).
    What needs the models and the other devices is checked by the inference extension's config_problems.
    None of them when `inference.from_devices` is false (the maps are not read)."""
    found: list[LocalMap] = []
    problems: list[Problem] = []
    if settings is not None and not settings.from_devices:
        return found, problems
    for device_id, definition in definitions.items():
        if definition.origin != "local":
            continue
        for prop in definition.properties:
            data = prop.anomaly_detection
            if not data:
                continue
            data = data["data"] if isinstance(data.get("data"), dict) else data
            at = prop.anomaly_at or _map_at_source(definition.source, prop.name)
            try:
                made: PipelineSettings | None = from_anomaly_detection(device_id, prop.name, data, confined=False)
            except AnomalyError as exc:
                made = None
                problems.append(Problem(*at.at(exc.key), f"{device_id}/{prop.name}: {_strip(str(exc))}"))
            found.append(LocalMap(device_id, prop.name, at, made))
    return found, problems


def _strip(message: str) -> str:
    """A from_anomaly_detection message without its leading `anomalyDetection: ` (the field names it)."""
    return re.sub(r"^anomalyDetection(?: on \S+)?: ", "", message)


def _map_at_source(source: str, prop: str) -> MapAt:
    """Where a map is when the loader did not record it: the device's document (`file:line`)."""
    file, _, line = source.rpartition(":")
    if not file or not line.isdigit():
        return MapAt(source, None, f"{prop}.pushMethod.anomalyDetection")
    return MapAt(file, int(line), f"{prop}.pushMethod.anomalyDetection")


def missing_ml_packages() -> list[str]:
    """What inference needs and this install lacks (a laptop with the core install only)."""
    return [name for name in ("numpy", "onnxruntime") if not importable(name)]


def importable(name: str) -> bool:
    """Whether `name` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
        return False
