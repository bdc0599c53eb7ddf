"""The devices and models edgecore gave us, as received, and what they validate into.

A device with the namespace/name of a local YAML device is not validated at all: the local
device wins, and the edgecore one stays in the catalog with that as its problem (`shadowed`),
so edgecore cannot replace an operator's device (its model, writability, ranges, pins).
Each other device is validated on its own (with its model), so one bad device never blocks the
others; a device whose model has not arrived yet waits in the catalog and starts when it
does. Then one claims pass (GPIO pins and other exclusive resources) runs over the local
YAML devices and all valid edgecore devices in a fixed order: local devices first, then
edgecore devices that ran after the previous build with the same spec, then those that ran
with another spec (updated), then the rest, each group sorted by namespace/name. So a running
device is never displaced by a newcomer, by its own update or by an update of another device; a device that loses stays in the catalog (edgecore still
counts it as ours) with the conflict as its problem, and starts once the resource is free. The catalog persists to a JSON file so a restarted mapper keeps running the last known
devices while edgecore is unreachable; the file names the devices that ran (`admitted`), so after
a restart the devices that held a resource keep it (a file without the field: all rank alike).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.definitions import DeviceDefinition
from devices.errors import Problem
from devices.loader import LoadResult, PushTopics, check_claims, load_objects
from mapper.dmi import api_pb2 as pb
from mapper.dmi.convert import ConversionError, dedupe_models, device_document, model_document
from twin.store import write_private

log = logging.getLogger("mapper.dmi")

Key = tuple[str, str]  # (namespace, name)
STATE_VERSION = 1


def device_key(device: pb.Device) -> Key:
    return (device.namespace or "default", device.name)


def model_key(model: pb.DeviceModel) -> Key:
    return (model.namespace or "default", model.name)


def model_of(device: pb.Device) -> Key:
    return (device.namespace or "default", device.spec.deviceModelReference)


def check(device: pb.Device) -> None:
    """What the catalog needs of a device before it keeps it: a valid id, and a message that
    can be saved (an `Any` of an unknown type or with malformed bytes cannot). ConversionError
    otherwise. Whether it is a valid device is for build() to say."""
    namespace, name = device_key(device)
    try:
        DeviceId(namespace, name)
    except ValueError as exc:
        # Nor is it announced `offline` as the devices kept but not run are: a topic is built from a valid id only.
        raise ConversionError(f"dmi:Device {namespace[:80]}/{name[:80]}: {exc}; not kept, and it gets no MQTT "
                              "topic (not even `offline` on its availability): rename the Device") from None
    try:
        json_format.MessageToDict(device)
    except Exception as exc:  # noqa: BLE001 - protobuf raises TypeError, DecodeError, ...
        raise ConversionError(f"dmi:Device {namespace}/{name}: cannot be kept ({exc})") from None


def check_model(model: pb.DeviceModel) -> None:
    """A model's namespace and name are checked as a device's are; ConversionError otherwise."""
    namespace, name = model_key(model)
    try:
        DeviceId(namespace, name)
    except ValueError as exc:
        raise ConversionError(f"dmi:DeviceModel {namespace[:80]}/{name[:80]}: {exc}") from None


@dataclass
class Catalog:
    protocol: str
    # The mapper's own topic tree, which no pushMethod.mqtt.topic may name (set from the config).
    push_topics: PushTopics = field(default_factory=PushTopics)
    devices: dict[Key, pb.Device] = field(default_factory=dict)
    models: dict[Key, pb.DeviceModel] = field(default_factory=dict)
    # Why a device is not running: waiting for its model, or invalid (the loader's message).
    problems: dict[Key, str] = field(default_factory=dict)
    # Devices left out because another device holds a resource they claim (a subset of problems).
    conflicts: set[Key] = field(default_factory=set)
    # Devices left out because a local YAML device has their namespace/name (a subset of
    # problems): key -> where the local device is defined (file:line). The local device wins.
    shadowed: dict[Key, str] = field(default_factory=dict)
    # The devices that validated and won their claims in the last build, as they were then.
    _admitted: dict[Key, pb.Device] = field(default_factory=dict)
    # Models edgecore removed while a device here still refers to them: edgecore removes a model
    # before the last device using it (RemoveDeviceModel, then RemoveDevice), and the Go framework
    # runs that device on until its own removal. Each is dropped once no device refers to it.
    _removed_models: set[Key] = field(default_factory=set)

    def replace(self, devices: list[pb.Device], models: list[pb.DeviceModel]) -> None:
        """Adopt a MapperRegister reply: exactly these devices and (deduplicated) models. A device
        or model that cannot be kept (see `check`, `check_model`) is left out and logged: one bad
        device must not stop the others (or, in edgecore's reply, every start)."""
        self.models = {}
        for key, model in dedupe_models(models).items():
            try:
                check_model(model)
            except ConversionError as exc:
                log.error("model from edgecore left out: %s", exc)
                continue
            self.models[key] = model
        self._removed_models = set()
        self.devices = {}
        for device in devices:
            try:
                check(device)
            except ConversionError as exc:
                log.error("device from edgecore left out: %s", exc)
                continue
            self.devices[device_key(device)] = device

    def put_device(self, device: pb.Device) -> bool:
        """Add or replace a device; False when an identical one is already there. Raises
        ConversionError (INVALID_ARGUMENT) for a device that cannot be kept, before storing it."""
        check(device)
        key = device_key(device)
        if self.devices.get(key) == device:
            return False
        self.devices[key] = device
        self._drop_removed_models()  # it may have left a removed model for another
        return True

    def remove_device(self, key: Key) -> pb.Device | None:
        """Forget a device (None if unknown), and a removed model only it still referred to."""
        device = self.devices.pop(key, None)
        self._drop_removed_models()
        return device

    def remove_model(self, key: Key) -> pb.DeviceModel | None:
        """Forget a model; None when the running devices see no change: it was not there, or a
        device still refers to it and keeps it until that device is removed or no longer does."""
        if key not in self.models:
            return None
        if any(model_of(device) == key for device in self.devices.values()):
            self._removed_models.add(key)
            return None
        return self.models.pop(key)

    def _drop_removed_models(self) -> None:
        if not self._removed_models:
            return
        used = {model_of(device) for device in self.devices.values()}
        for key in [key for key in self._removed_models if key not in used]:
            self._removed_models.discard(key)
            self.models.pop(key, None)

    def put_model(self, model: pb.DeviceModel) -> bool:
        """Add or replace a model; False when an identical one is already there. Raises
        ConversionError (INVALID_ARGUMENT) for a model whose id is not valid, before storing it."""
        check_model(model)
        key = model_key(model)
        self._removed_models.discard(key)  # created again: no longer removed
        if self.models.get(key) == model:
            return False
        self.models[key] = model
        return True

    def build(self, local: LoadResult | None = None) -> LoadResult:
        """Validate every device with its model, exactly as YAML files are validated, then
        leave out devices that claim a resource already held (by a `local` YAML device or an
        edgecore device earlier in the fixed order, see the module doc)."""
        result = LoadResult()
        local = local or LoadResult()
        self.problems = {}
        self.conflicts = set()
        before, self.shadowed = self.shadowed, {}
        for key, device in sorted(self.devices.items()):
            mine = local.devices.get(DeviceId(*key))
            if mine is not None:
                # The operator's local YAML device keeps its name: an edgecore device of that
                # namespace/name must not replace its model, writability, ranges or driver config.
                self.shadowed[key] = mine.source
                self.problems[key] = (
                    f"dmi:Device {key[0]}/{key[1]}: a local device of this namespace/name is defined in "
                    f"{mine.source}, and the local device wins; device {key[0]}/{key[1]} from edgecore is "
                    "kept but not started (it starts if the local device is removed): rename one of them")
                if before.get(key) != mine.source:  # logged once, not at every change of the catalog
                    log.error("device %s/%s from edgecore is %s: %s", key[0], key[1],
                              "stopped" if key in self._admitted else "not started", self.problems[key])
                continue
            model = self.models.get(model_of(device))
            if model is None:
                self.problems[key] = f"waiting for DeviceModel {model_of(device)[0]}/{model_of(device)[1]}"
                continue
            try:
                one = load_objects([
                    (f"dmi:DeviceModel {model_key(model)[0]}/{model.name}", model_document(model, self.protocol)),
                    (f"dmi:Device {key[0]}/{key[1]}", device_document(device)),
                ], push_topics=self.push_topics)
            except (DefinitionError, ConversionError) as exc:
                self.problems[key] = str(exc)
                log.error("device %s/%s from edgecore is invalid: %s", key[0], key[1], exc)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever else a hostile message causes: this device only
                self.problems[key] = f"dmi:Device {key[0]}/{key[1]}: cannot be converted ({type(exc).__name__}: {exc})"
                log.exception("device %s/%s from edgecore cannot be converted", key[0], key[1])
                continue
            result.devices.update(one.devices)
            result.models.update(one.models)
            result.warnings.extend(one.warnings)
            result.unrunnable.update(one.unrunnable)
        for device_id, problem in result.unrunnable.items():  # no driver for its protocol here
            self.problems[(device_id.namespace, device_id.name)] = str(problem)
        self._check_claims(result, local)
        self._admitted = {
            key: device for key, device in self.devices.items() if DeviceId(*key) in result.devices
        }
        return result

    def _check_claims(self, result: LoadResult, local: LoadResult) -> None:
        def runnable(loaded: LoadResult, ids: list[DeviceId]) -> list[DeviceDefinition]:
            return [loaded.devices[i] for i in ids if i not in loaded.unrunnable]

        def rank(device_id: DeviceId) -> tuple[int, DeviceId]:
            key = (device_id.namespace, device_id.name)
            admitted = self._admitted.get(key)
            # Ran last time with this spec; ran last time (an update: it keeps what it holds over
            # devices waiting for it); the rest.
            return (0 if admitted == self.devices[key] else 1 if admitted is not None else 2, device_id)

        # Every local device, also one whose namespace/name an edgecore device has (that one is
        # shadowed, not in `result`): the local device keeps its claims.
        order = [
            *runnable(local, sorted(local.devices)),
            *runnable(result, sorted(result.devices, key=rank)),
        ]

        def where(definition: DeviceDefinition, path: str) -> str:
            if result.devices.get(definition.id) is definition:
                return f"from edgecore, {path}"
            return f"{definition.source}, {path}"

        for conflict in check_claims(order, where=where):
            if conflict.device not in result.devices:
                continue  # a local device: the YAML loader has reported its own clashes
            key = (conflict.device.namespace, conflict.device.name)
            if key in self.conflicts:
                continue  # one message per device: its first conflict
            del result.devices[conflict.device]
            self.conflicts.add(key)
            self.problems[key] = str(Problem(
                f"dmi:Device {key[0]}/{key[1]}", None, conflict.field,
                f"{conflict.message}; device {key[0]}/{key[1]} is kept and starts when that device "
                "is removed or no longer claims it",
            ))
            log.error("device %s/%s from edgecore is not started: %s", key[0], key[1], self.problems[key])

    def device_ids(self) -> set[DeviceId]:
        return {DeviceId(ns, name) for ns, name in self.devices}

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        data = {
            "version": STATE_VERSION,
            "protocol": self.protocol,
            "models": [json_format.MessageToDict(m) for _, m in sorted(self.models.items())],
            "devices": [json_format.MessageToDict(d) for _, d in sorted(self.devices.items())],
            # Ran after the last build (with the spec saved above): they rank first after a restart.
            "admitted": [list(key) for key in sorted(self._admitted) if key in self.devices],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner only (not the umask's 0644): a device's protocol configData may carry credentials.
        write_private(path, json.dumps(data, indent=1, sort_keys=True))

    def restore(self, path: Path) -> bool:
        """Load the last saved state; False (and a warning) when there is none or it is unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            if data.get("protocol") != self.protocol:  # kubeedge.protocol changed: not our devices now
                raise ValueError(f"it holds the devices of protocol {data.get('protocol')!r}, "
                                 f"and this mapper's is {self.protocol!r}")
            models = [json_format.ParseDict(m, pb.DeviceModel()) for m in data["models"]]
            devices = [json_format.ParseDict(d, pb.Device()) for d in data["devices"]]
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, json_format.ParseError) as exc:
            log.warning("ignoring the saved KubeEdge state %s: %s", path, exc)
            return False
        self.replace(devices, models)
        self._admitted = {}
        admitted = data.get("admitted")  # None: a file saved before the field existed
        if admitted is not None:
            try:
                keys = [(ns, name) for ns, name in admitted if isinstance(ns, str) and isinstance(name, str)]
            except (TypeError, ValueError) as exc:
                log.warning("ignoring the devices that ran before in the saved KubeEdge state %s: %s", path, exc)
                keys = []
            self._admitted = {key: self.devices[key] for key in keys if key in self.devices}
        return True
