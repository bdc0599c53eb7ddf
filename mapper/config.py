"""The mapper's config file: YAML, validated once with pydantic, passed down typed.

Environment variables override the file: `MAPPER_<SECTION>__<KEY>` (double underscore
between levels), for example `MAPPER_TWIN__PATH=/tmp/twin.db` or `MAPPER_NODE=pi-1`.
Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import ipaddress
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from devices import ids
from devices.errors import DefinitionError, FieldError, Problem, error_loc
from devices.extras import install_extra
from devices.loader import (LoadResult, PushTopics, by_file, describe, device_file_problem, field_name, load,
                            read_documents, validation_problems)
from eventbus.settings import HomeAssistantSettings, MqttSettings
from mapper.dmi.settings import ApiSettings, KubeEdgeSettings
from mapper.inference.settings import InferenceSettings, importable, local_maps, missing_ml_packages

ENV_PREFIX = "MAPPER_"
# The config's fingerprint (MapperConfig.fingerprint): hex digits of its sha256, and the keys whose
# values are never in it (only whether they are set): a secret, or what names one Pi (the client id,
# unique by design). A `..._file` or `..._env` key names where a secret is, not the secret.
FINGERPRINT_HEX = 16
_UNHASHED_KEY = re.compile(r"password|token|secret|client_id|key$", re.IGNORECASE)


def _node(value: str) -> str:
    if not ids.is_name(value):
        raise ValueError(f"{value!r} is not a valid node name ({ids.NAME_RULE})")
    return value


NodeName = Annotated[str, AfterValidator(_node)]


def default_node() -> str:
    """The host's name (its first label, lower-cased), as edgecore names its node by default, so
    the Pis of a fleet that leave `node` out still publish under topics of their own (a fixed
    default put them all under one, mixing their readings on the cloud broker); `edge-node` when
    the host name is not a valid node name."""
    name = socket.gethostname().split(".")[0].lower()
    return name if ids.is_name(name) else "edge-node"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TwinSettings(_Section):
    path: Path = Path("mapper-twin.db")
    # FULL: a committed reading survives power loss. NORMAL: survives a crash of the process only.
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    history_rows: int = Field(default=200_000, ge=100)
    history_age_s: int = Field(default=7 * 86_400, ge=60)
    # Group commit (mapper/recorder.py): at once while the mapper is not busy; when busy, a batch is
    # committed when it holds batch_max readings or is batch_delay_ms old.
    batch_max: int = Field(default=500, ge=1)
    batch_delay_ms: int = Field(default=20, ge=0)
    # SD-card wear: readings wait up to this long for company before their commit (each commit is
    # an fsync and a few WAL pages, ~100 MiB/hour for 20 properties at 1 Hz when every tick commits).
    # 0: commit at once. Readings waiting are in memory only: a power cut loses up to this much.
    commit_interval_ms: int = Field(default=0, ge=0, le=60_000)
    # Readings waiting in memory for a commit while the twin cannot be written (full disk, read-only,
    # locked): beyond this many the oldest are dropped and counted. ~200 bytes each: ~20 MB.
    waiting_max_readings: int = Field(default=100_000, ge=100)
    outbox_max_rows: int = Field(default=200_000, ge=100)
    outbox_max_bytes: int = Field(default=128 * 1024 * 1024, ge=65_536)
    # How long a write waits for another process's lock on the twin (a backup, a CLI command)
    # before it fails and is retried (readings kept in memory, device states once a second).
    busy_timeout_ms: int = Field(default=30_000, ge=0)


class DeviceLoopSettings(_Section):
    # After this many failed reads in a row a device is `unhealthy`.
    failure_threshold: int = Field(default=3, ge=1)
    # Retry backoff for an unhealthy device, capped.
    max_backoff_s: float = Field(default=30.0, gt=0)
    # How often the running mapper looks for desired values set by other processes (`mapper twin set`).
    desired_poll_ms: int = Field(default=1000, ge=10)
    # An on-demand read (REST GET, DMI GetDevice) within this long of the property's last reading
    # (any: the collect loop's, a change's, another on-demand one) is answered with that reading:
    # the device is not read again and no history row is added. 0: every one reads the device.
    on_demand_min_interval_s: float = Field(default=1.0, ge=0)


class SystemdSettings(_Section):
    """`systemd:` — what the service tells systemd (docs/raspberry-pi.md)."""

    # How often the STATUS= line (devices, readings, outbox) is recomputed.
    status_every_s: float = Field(default=5.0, gt=0)
    # The watchdog pings stop while the twin thread has had work waiting this long without finishing
    # any (mapper.systemd). Above the 30 s a twin call may wait for another process's lock.
    twin_stall_s: float = Field(default=60.0, gt=0)


# metrics.listen with a port only: this machine's loopback (the endpoint has no authentication).
METRICS_LOOPBACK = "127.0.0.1"


def parse_listen(value: str) -> tuple[str, int]:
    """(address, port) of metrics.listen: `PORT` or `:PORT` (loopback), `ADDRESS:PORT` with an IP
    address or `localhost`, `[IPv6]:PORT`. A host name is refused: it may resolve to any address,
    and an endpoint without authentication listens beyond loopback only where its address is written."""
    text = value.strip()
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError(f"{value!r}: write an IPv6 address as [ADDRESS]:PORT, e.g. [::1]:9108")
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = "", text
        elif ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:9108")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535 (e.g. 9108, or 127.0.0.1:9108)")
    if host == "" or host.lower() == "localhost":
        return METRICS_LOOPBACK, int(port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r}: {host!r} is not an IP address. The metrics endpoint has no authentication: write the"
            f" address it listens on, a port alone for this machine only ({METRICS_LOOPBACK}:{port}), or an"
            f" address the network reaches (the Pi's LAN address, or 0.0.0.0 for every interface) where the"
            " Prometheus server is on another machine") from None
    return host, int(port)


class MetricsSettings(_Section):
    """`metrics:` — Prometheus metrics on /metrics and a health check on /healthz (mapper/metrics.py),
    plain HTTP without authentication: on loopback unless an address is written. Needs the `metrics`
    extra (prometheus-client), imported only when this section is there."""

    # `PORT` or `:PORT`: 127.0.0.1. `ADDRESS:PORT`: that IP address (0.0.0.0: every interface).
    listen: str = f"{METRICS_LOOPBACK}:9108"

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            parse_listen(value)
        return value

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address[0]).is_loopback

    def exposure_warnings(self, source: str) -> list[str]:
        """A warning when it listens beyond loopback: anyone who reaches the Pi may read it."""
        if self.loopback:
            return []
        host, port = self.address
        return [f"warning: {source}: metrics.listen: {self.listen!r} is not loopback: anyone who can reach this"
                f" machine on port {port} reads the metrics (device names, states, counts: no authentication);"
                " allow only the Prometheus server there (a firewall), or listen on 127.0.0.1"]


class MapperConfig(_Section):
    node: NodeName = Field(default_factory=default_node)
    mode: Literal["standalone", "kubeedge"] = "standalone"
    devices: list[Path] = []
    twin: TwinSettings = TwinSettings()
    loop: DeviceLoopSettings = DeviceLoopSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Load OpenSSL although the broker connection uses no TLS (for a plugin that needs it): without
    # TLS `mapper run` keeps it out, ~4.5 MiB (mapper/openssl.py). As MAPPER_LOAD_OPENSSL=1 in the
    # environment it also keeps hashlib on OpenSSL.
    load_openssl: bool = False
    # Later sections (mqtt, inference, kubeedge) are added by the modules that own them.
    mqtt: MqttSettings | None = None
    # Early-exit inference pipelines (mapper/inference; docs/inference.md); a bare list means `pipelines:`.
    inference: InferenceSettings | None = None
    # Required in `mode: kubeedge`; `devices` may then be empty (edgecore supplies them).
    kubeedge: KubeEdgeSettings | None = None
    systemd: SystemdSettings | None = None
    api: ApiSettings | None = None
    # Prometheus metrics and /healthz on a local HTTP port (mapper/metrics.py); absent: none.
    metrics: MetricsSettings | None = None
    # Home Assistant MQTT discovery (eventbus/homeassistant.py); needs `mqtt:`.
    homeassistant: HomeAssistantSettings | None = None
    # Where each `devices` entry was named (config file, line, `devices[i]`), for load_devices().
    _devices_named_at: dict[Path, tuple[str, int | None, str]] = PrivateAttr(default_factory=dict)
    # The file it was read from: (label, its document, the settings the environment set), for pipeline_at().
    _read_from: tuple[str, Any, dict[tuple[str, ...], str]] | None = PrivateAttr(default=None)

    def pipeline_at(self, index: int, field: str = "") -> tuple[str, int | None, str]:
        """(file, line, field name) of `inference.pipelines[index]` (its `field`, such as `model` or
        `actions[1]`; the pipeline's own line when the field is not written), for a problem found
        once the devices and the models are known. `inference:` may be the bare list of pipelines."""
        parts: list[str | int] = [index]
        for part in field.replace("]", "").split(".") if field else ():
            name, _, i = part.partition("[")
            parts += [name, int(i)] if i else [name]
        label, doc, applied = self._read_from or ("config", None, {})
        bare = doc is not None and isinstance(doc.data.get("inference"), list)
        path = ("inference", *parts) if bare else ("inference", "pipelines", *parts)
        name = field_name(("inference", "pipelines", *parts))
        for key, variable in applied.items():
            if tuple(path[: len(key)]) == key:
                return f"environment variable {variable}", None, name
        return label, doc.line_of(path) if doc is not None else None, name

    def load_devices(self, *, node_known: bool = True) -> LoadResult:
        """The device files, loaded and validated (DefinitionError); an entry that does not exist
        is reported where the config names it. A device whose nodeName is another node than
        `node` is not runnable here (LoadResult.unrunnable); not `node_known` (the config's node is
        refused), nodeName is not compared with it."""
        if not self.devices:
            return LoadResult()
        try:
            return load(self.devices, named_at=self._devices_named_at, push_topics=self.push_topics(),
                        node=self.node if node_known else None, node_chosen=self.node_chosen)
        except DefinitionError as exc:
            raise with_map_problems(exc, self.inference or InferenceSettings()) from None

    @property
    def node_chosen(self) -> bool:
        """Whether `node` was given (in the file or as MAPPER_NODE), not left to the host name."""
        return "node" in self.model_fields_set

    def fingerprint_document(self) -> bytes:
        """What `fingerprint` hashes: the validated config with its defaults, as canonical JSON (sorted
        keys), without `node` (each Pi has its own: the fingerprint compares configs across a fleet)
        and with only whether each secret-like text is set (_UNHASHED_KEY), never the text."""
        def scrub(value: Any, key: str = "") -> Any:
            if isinstance(value, dict):
                return {k: scrub(v, k) for k, v in value.items()}
            if isinstance(value, list):
                return [scrub(v, key) for v in value]
            if isinstance(value, str) and _UNHASHED_KEY.search(key) and not key.endswith(("_file", "_env")):
                return "(set)"
            return value
        return orjson.dumps(scrub(self.model_dump(mode="json", exclude={"node"})), option=orjson.OPT_SORT_KEYS)

    def fingerprint(self) -> str:
        """A short sha256 of the effective config (fingerprint_document): Pis that show the same one
        run the same settings. On the node's health topic (eventbus/health.py)."""
        return hashlib.sha256(self.fingerprint_document()).hexdigest()[:FINGERPRINT_HEX]

    def push_topics(self) -> PushTopics:
        """The mapper's own topic tree, which no device's pushMethod.mqtt.topic may name."""
        return PushTopics(self.mqtt.topic_prefix if self.mqtt is not None else "mapper", self.node)

    def check_installed(self, source: str) -> None:
        """What the config asks for and this install cannot do, as a config error at start."""
        if self.inference is not None and self.inference.pipelines and (missing := missing_ml_packages()):
            raise ValueError(f"{source}: inference.pipelines: need {' and '.join(missing)}, not installed here: "
                             f"install the `ml` extra ({install_extra('ml')}), or remove the `inference:` section")
        if self.metrics is not None and not importable("prometheus_client"):
            raise ValueError(f"{source}: metrics: needs prometheus-client, not installed here: install the `metrics`"
                             f" extra ({install_extra('metrics')}), or remove the `metrics:` section")
        if self.mode == "kubeedge":
            if missing := [m for m in ("grpc", "google.protobuf") if not importable(m)]:
                raise ValueError(f"{source}: mode: kubeedge: needs {' and '.join(missing)}, not installed here: "
                                 f"install the `kubeedge` extra (grpcio, protobuf: {install_extra('kubeedge')})")
            try:  # the generated stubs check the grpcio and protobuf they run on, and refuse older ones
                importlib.import_module("mapper.dmi.api_pb2_grpc")
            except Exception as exc:  # noqa: BLE001 - VersionError, RuntimeError, ImportError: all one answer
                raise ValueError(f"{source}: mode: kubeedge: the installed grpcio/protobuf cannot load the DMI "
                                 f"stubs ({type(exc).__name__}: {exc}); upgrade them to the `kubeedge` extra's "
                                 f"versions: pip install --upgrade grpcio protobuf") from None

    @model_validator(mode="after")
    def _kubeedge_section(self) -> MapperConfig:
        if self.mode == "kubeedge" and self.kubeedge is None:
            raise FieldError(("mode",), "kubeedge needs a `kubeedge:` section with at least `name` and `protocol`")
        return self

    @model_validator(mode="after")
    def _homeassistant_section(self) -> MapperConfig:
        ha = self.homeassistant
        if ha is None or not ha.discovery:
            return self
        if self.mqtt is None:
            raise FieldError(("homeassistant", "discovery"), "needs an `mqtt:` section: the discovery messages go to"
                                                             " the broker Home Assistant reads")
        if ha.prefix == self.mqtt.topic_prefix:
            raise FieldError(("homeassistant", "prefix"), f"{ha.prefix!r} is mqtt.topic_prefix, the mapper's own"
                                                          " topics: give Home Assistant's discovery prefix"
                                                          " (default homeassistant)")
        return self


def _field_type(parts: list[str]) -> tuple[Any, bool]:
    """The annotation of the config field at `parts` (Optional unwrapped; None if unknown), and
    whether the field may be None."""
    model: Any = MapperConfig
    annotation: Any = None
    optional = False
    for part in parts:
        fields = getattr(model, "model_fields", None)
        field = fields.get(part) if isinstance(fields, dict) else None
        if field is None:
            return None, False
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
            annotation)
        if optional and len(args) == 1:
            annotation = args[0]
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        model = annotation
    return annotation, optional


def _env_value(parts: list[str], raw: str) -> Any:
    """A string or path setting takes the text as it is (`MAPPER_NODE=0042` stays "0042"), except
    `null` or `~` for one that may be unset; anything else is read as YAML (`true`, `5`, `[a, b]`)."""
    annotation, optional = _field_type(parts)
    textual = annotation in (str, Path) or (
        typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation)))
    if textual and optional and raw in ("null", "~"):
        return None
    if not raw or textual:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Overrides from the environment; returns which setting each variable set."""
    applied: dict[tuple[str, ...], str] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        if not all(parts) or parts[0] not in MapperConfig.model_fields:
            continue  # not a config setting (MAPPER_HOME, say, set for something else): not ours to refuse
        target = data
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                target[part] = nxt
            target = nxt
        target[parts[-1]] = _env_value(parts, raw)
        applied[tuple(parts)] = key
    return applied


def _known_fields(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """The fields of the config section holding the unknown field at `loc` (empty if not found)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: its model is the list's
            continue
        field = model.model_fields.get(part)
        model = _section_model(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X | None`, `list[X]`, `Annotated[X, ...]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _section_model(arg)) is not None:
            return found
    return None


# Unknown keys a newcomer writes for a setting that is deliberately given another way.
_NOT_IN_THE_CONFIG = {
    "password": "a password is not taken in the config (it would be in every copy and backup of this file):"
                " write it to a file only the user it runs as can read (chmod 600) and name that file in"
                " mqtt.password_file, or name an environment variable holding it in mqtt.password_env",
}


def explain_unknown_fields(exc: ValidationError, problems: list[Problem], root: type[BaseModel]) -> list[Problem]:
    """`problems` (validation_problems of `exc`, one per error) with each unknown field said as the
    device files say it: the field meant, or how the setting is given (`mqtt.password`). Shared by
    every config whose root model is `root`: the mapper's, the cloud worker's."""
    problems = list(problems)
    for i, error in enumerate(exc.errors(include_url=False)):
        if error["type"] == "extra_forbidden" and (known := _known_fields(error_loc(error), root)):
            problems[i] = dataclasses.replace(problems[i], message=_unknown_field(error_loc(error)[-1], known))
    return problems


def _unknown_field(key: object, known: list[str]) -> str:
    """As the device files say it: the field meant, or what there is."""
    if str(key) in _NOT_IN_THE_CONFIG and "password_file" in known:
        return _NOT_IN_THE_CONFIG[str(key)]
    close = difflib.get_close_matches(str(key), known, n=1) or [k for k in known if k.lower() == str(key).lower()][:1]
    return f"unknown field, did you mean {close[0]}?" if close else f"unknown field (known here: {', '.join(sorted(known))})"


def _env_problems(exc: ValidationError, applied: dict[tuple[str, ...], str]) -> dict[int, Problem]:
    """Problems in a value the environment set name its variable, not a line of the file."""
    found = {}
    for i, error in enumerate(exc.errors(include_url=False)):
        where = error_loc(error)
        loc = tuple(str(x) for x in where)
        for path, variable in applied.items():
            if loc[: len(path)] == path:
                found[i] = Problem(f"environment variable {variable}", None, field_name(where),
                                   describe(error))
                break
    return found


def _absolute(base: Path, value: Path) -> Path:
    return value if value.is_absolute() else (base / value)


# Keys of a cloud worker's config (mapper.inference.worker) that the mapper's config never has.
WORKER_CONFIG_KEYS = ("models", "models_dir", "group", "worker_id")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> MapperConfig:
    """Read and validate a config file; raises DefinitionError (FILE:LINE: FIELD: PROBLEM)."""
    path = Path(path)
    label = str(path)
    problems: list[Problem] = []
    if not path.exists():
        raise DefinitionError([Problem(label, None, "", "config file not found")])
    docs = list(read_documents(path, label, problems))
    if problems:
        raise DefinitionError(problems)
    if (device_file := device_file_problem(docs)) is not None:
        raise DefinitionError([device_file])
    if len(docs) != 1 or not isinstance(docs[0].data, dict):
        raise DefinitionError([Problem(label, 1, "", "the config file must hold one YAML mapping")])
    doc = docs[0]
    if worker_keys := [k for k in doc.data if k in WORKER_CONFIG_KEYS]:
        # A cloud worker's config given to the mapper: one line saying so, not "models: did you mean mode?".
        raise DefinitionError([Problem(
            label, doc.line_of((worker_keys[0],)), worker_keys[0],
            f"this looks like a cloud worker config ({', '.join(worker_keys)}: `mapper cloud-worker --config` reads"
            " it), not a mapper config: the mapper's holds node, devices, twin, mqtt ... (README, Config file)")])
    data = dict(doc.data)
    applied = _apply_env(data, os.environ if env is None else env)
    try:
        config = MapperConfig.model_validate(data)
    except ValidationError as exc:
        from_env = _env_problems(exc, applied)
        problems = [from_env.get(i, p) for i, p in enumerate(validation_problems(exc, doc))]
        problems = explain_unknown_fields(exc, problems, MapperConfig)
        raise _with_device_problems(problems, _without_bad_sections(data, exc), path, doc, applied) from None
    base = path.parent
    twin = config.twin.model_copy(update={"path": _absolute(base, config.twin.path)})
    if (why := _twin_path_problem(twin.path)) is not None:
        variable = applied.get(("twin", "path"))
        where = (f"environment variable {variable}", None) if variable else (label, doc.line_of(("twin", "path")))
        raise _with_device_problems([Problem(*where, "twin.path", why)], config, path, doc, applied)
    return _resolved(config, path, doc, applied, twin)


def with_map_problems(exc: DefinitionError, settings: InferenceSettings | None) -> DefinitionError:
    """`exc` with the mistakes in the own keys of the anomalyDetection maps of the devices that did
    load (an unknown key, no `model`): those need no other file, and were found only once every
    other file's mistakes were fixed. (What needs the models or the other devices is for the start.)"""
    if not isinstance(exc.result, LoadResult) or not (found := local_maps(settings, exc.result.devices)[1]):
        return exc
    return DefinitionError(by_file([*exc.problems, *found]), exc.warnings, exc.result)


def _without_bad_sections(data: dict[str, Any], exc: ValidationError) -> MapperConfig | None:
    """The config with its refused settings left at their defaults (None when it still does not
    validate, or when `devices` itself is refused): what names the device files, so that their
    problems are listed with the config's, not found only once the config's are fixed. A refused key
    alone is left out, not its whole section (a misspelt key in `inference:` left out its
    `from_devices: false`, and the devices' maps were checked though the mapper does not read them);
    the section, when the key is missing or inside a list."""
    data = copy.deepcopy(data)
    for _ in range(64):
        locs = [error_loc(error) for error in exc.errors(include_url=False)]
        if not locs or any(not loc or loc[0] == "devices" for loc in locs):
            return None
        if not all([_drop_setting(data, loc) for loc in locs]):
            return None
        try:
            return MapperConfig.model_validate(data)
        except ValidationError as again:
            exc = again
    return None


def _drop_setting(data: dict[str, Any], loc: tuple[str | int, ...]) -> bool:
    """Leave out the setting at `loc` (through mappings only: a list's item leaves out the key holding
    the list; a missing key, the mapping that lacks it). Whether anything was left out."""
    keys: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        keys.append(part)
    chain: list[tuple[dict[str, Any], str]] = []  # (mapping, its key on the way to loc)
    mapping: Any = data
    for key in keys:
        if not isinstance(mapping, dict):
            break
        if key not in mapping:
            if not chain:
                return False
            break
        chain.append((mapping, key))
        mapping = mapping[key]
    if not chain:
        return False
    if len(chain) < len(keys) and not isinstance(mapping, dict):
        pass  # (loc goes on below a value that is not a mapping: that value goes)
    elif len(chain) < len(keys):
        chain.pop()  # (its key is missing: the mapping lacking it goes)
        if not chain:
            return False
    holder, key = chain[-1]
    del holder[key]
    return True


def _with_device_problems(problems: list[Problem], config: MapperConfig | None, path: Path, doc: Any,
                          applied: dict[tuple[str, ...], str]) -> DefinitionError:
    """The config's own problems, then those of the device files it names (each file's, then those
    between files), as `mapper run` would find them once the config's were fixed: every mistake is
    listed in one run, not one stage at a time. The config's settings that are refused are taken at
    their defaults for the devices' checks (a device's nodeName against `node`, say)."""
    if config is None or not config.devices:
        return DefinitionError(problems)
    try:
        # (A refused node is not the host name's default: a device's nodeName is not compared with either.)
        _resolved(config, path, doc, applied, config.twin).load_devices(
            node_known=not any(problem.field == "node" for problem in problems))
    except DefinitionError as exc:
        return DefinitionError([*problems, *exc.problems], exc.warnings)
    return DefinitionError(problems)


def _resolved(config: MapperConfig, path: Path, doc: Any, applied: dict[tuple[str, ...], str],
              twin: TwinSettings) -> MapperConfig:
    """The validated config with its paths relative to the config file's directory, remembering
    where each setting was written."""
    label = str(path)
    base = path.parent
    update: dict[str, Any] = {"devices": [_absolute(base, d) for d in config.devices], "twin": twin}
    if config.mqtt is not None:
        update["mqtt"] = config.mqtt.relative_to(base)
    if config.inference is not None:
        update["inference"] = _absolute_inference(base, config.inference)
    if config.api is not None:
        update["api"] = config.api.relative_to(base)
    if config.kubeedge is not None and config.kubeedge.state_file is not None:
        update["kubeedge"] = config.kubeedge.model_copy(
            update={"state_file": _absolute(base, config.kubeedge.state_file)})
    final = config.model_copy(update=update)
    variable = applied.get(("devices",))
    final._read_from = (label, doc, applied)
    final._devices_named_at = {
        entry: (f"environment variable {variable}", None, f"devices[{i}]") if variable
        else (label, doc.line_of(("devices", i)), f"devices[{i}]")
        for i, entry in enumerate(final.devices)}
    return final


def _twin_path_problem(path: Path) -> str | None:
    """Why the twin cannot be at `path` whoever runs the mapper (a directory there, or a file where a
    directory of it must be); None if it can. Permissions are left to the opening, as whoever runs it."""
    try:
        if path.is_dir():
            return f"{path} is a directory: name the twin file in it (e.g. {path / 'twin.db'})"
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a directory, so the twin {path} cannot be created"
                return None
    except OSError:  # a directory this user cannot search: the opening says so
        return None
    return None


def _absolute_inference(base: Path, inference: InferenceSettings) -> InferenceSettings:
    """models_dir and model paths (not bare model names) are relative to the config file."""
    pipelines = [p.model_copy(update={"model": str(_absolute(base, Path(p.model)))}) if "/" in p.model else p
                 for p in inference.pipelines]
    changes: dict[str, Any] = {"pipelines": pipelines}
    if inference.models_dir is not None:
        changes["models_dir"] = _absolute(base, inference.models_dir)
    return inference.model_copy(update=changes)
