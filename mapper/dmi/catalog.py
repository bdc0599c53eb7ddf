"""The devices and models edgecore gave us, as received, and what they validate into.

Each device is validated on its own (with its model), so one bad device never blocks the
others; a device whose model has not arrived yet waits in the catalog and starts when it
does. The catalog persists to a JSON file so a restarted mapper keeps running the last known
devices while edgecore is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import LoadResult, load_objects
from mapper.dmi import api_pb2 as pb
from mapper.dmi.convert import ConversionError, dedupe_models, device_document, model_document

log = logging.getLogger("mapper.dmi")

Key = tuple[str, str]  # (namespace, name)
STATE_VERSION = 1


def device_key(device: pb.Device) -> Key:
    return (device.namespace or "default", device.name)


def model_key(model: pb.DeviceModel) -> Key:
    return (model.namespace or "default", model.name)


def model_of(device: pb.Device) -> Key:
    return (device.namespace or "default", device.spec.deviceModelReference)


@dataclass
class Catalog:
    protocol: str
    devices: dict[Key, pb.Device] = field(default_factory=dict)
    models: dict[Key, pb.DeviceModel] = field(default_factory=dict)
    # Why a device is not running: waiting for its model, or invalid (the loader's message).
    problems: dict[Key, str] = field(default_factory=dict)

    def replace(self, devices: list[pb.Device], models: list[pb.DeviceModel]) -> None:
        """Adopt a MapperRegister reply: exactly these devices and (deduplicated) models."""
        self.models = dedupe_models(models)
        self.devices = {device_key(d): d for d in devices}

    def put_device(self, device: pb.Device) -> bool:
        """Add or replace a device; False when an identical one is already there."""
        key = device_key(device)
        if self.devices.get(key) == device:
            return False
        self.devices[key] = device
        return True

    def put_model(self, model: pb.DeviceModel) -> bool:
        key = model_key(model)
        if self.models.get(key) == model:
            return False
        self.models[key] = model
        return True

    def build(self) -> LoadResult:
        """Validate every device with its model, exactly as YAML files are validated."""
        result = LoadResult()
        self.problems = {}
        for key, device in sorted(self.devices.items()):
            model = self.models.get(model_of(device))
            if model is None:
                self.problems[key] = f"waiting for DeviceModel {model_of(device)[0]}/{model_of(device)[1]}"
                continue
            try:
                one = load_objects([
                    (f"dmi:DeviceModel {model_key(model)[0]}/{model.name}", model_document(model, self.protocol)),
                    (f"dmi:Device {key[0]}/{key[1]}", device_document(device)),
                ])
            except (DefinitionError, ConversionError) as exc:
                self.problems[key] = str(exc)
                log.error("device %s/%s from edgecore is invalid: %s", key[0], key[1], exc)
                continue
            result.devices.update(one.devices)
            result.models.update(one.models)
            result.warnings.extend(one.warnings)
            result.unrunnable.update(one.unrunnable)
        return result

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
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def restore(self, path: Path) -> bool:
        """Load the last saved state; False (and a warning) when there is none or it is unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            models = [json_format.ParseDict(m, pb.DeviceModel()) for m in data["models"]]
            devices = [json_format.ParseDict(d, pb.Device()) for d in data["devices"]]
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, json_format.ParseError) as exc:
            log.warning("ignoring the saved KubeEdge state %s: %s", path, exc)
            return False
        self.replace(devices, models)
        return True
