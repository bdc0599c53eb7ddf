"""The committed DMI stubs match mapper/dmi/api.proto, and the proto matches KubeEdge's wire format."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the stubs")

from mapper.dmi import api_pb2, generate  # noqa: E402

COMMITTED = Path(generate.__file__).parent


def _serialized_file(path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto embedded in a generated *_pb2.py, read without importing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            blob = ast.literal_eval(node.args[0])
            return descriptor_pb2.FileDescriptorProto.FromString(blob)
    raise AssertionError(f"{path}: no AddSerializedFile(...) call found")


def _method_paths(path: Path) -> set[str]:
    return set(re.findall(r"'(/v1beta1\.\w+/\w+)'", path.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pb2, grpc_py = generate.generate(tmp_path_factory.mktemp("dmi-gen"))
    return pb2, grpc_py


def test_committed_descriptor_matches_proto(regenerated: tuple[Path, Path]) -> None:
    """api_pb2.py carries exactly the descriptor protoc builds from api.proto today."""
    fresh = _serialized_file(regenerated[0])
    committed = _serialized_file(COMMITTED / "api_pb2.py")
    assert committed == fresh, "api_pb2.py is stale: run `python -m mapper.dmi.generate`"


def test_committed_grpc_stubs_match_proto(regenerated: tuple[Path, Path]) -> None:
    """api_pb2_grpc.py serves the same methods and imports api_pb2 package-relative."""
    committed = COMMITTED / "api_pb2_grpc.py"
    assert _method_paths(committed) == _method_paths(regenerated[1])
    assert "from mapper.dmi import api_pb2" in committed.read_text(encoding="utf-8")


def test_services_and_methods() -> None:
    """Package v1beta1 with edgecore's three RPCs and the mapper's seven."""
    file = api_pb2.DESCRIPTOR
    assert file.package == "v1beta1"
    methods = {s.name: [m.name for m in s.methods] for s in file.services_by_name.values()}
    assert methods == {
        "DeviceManagerService": ["MapperRegister", "ReportDeviceStatus", "ReportDeviceStates"],
        "DeviceMapperService": [
            "RegisterDevice", "RemoveDevice", "UpdateDevice", "CreateDeviceModel",
            "RemoveDeviceModel", "UpdateDeviceModel", "GetDevice",
        ],
    }


# Field numbers as listed in ../shared/kubeedge/FACTS.md §1.3 (a sample covering every message shape).
WIRE = {
    "MapperInfo": {"name": 1, "version": 2, "api_version": 3, "protocol": 4, "address": 5, "state": 6},
    "Device": {"name": 1, "spec": 2, "status": 3, "namespace": 4},
    "DeviceModel": {"name": 1, "spec": 2, "namespace": 3},
    "DeviceProperty": {"name": 1, "desired": 2, "visitors": 3, "reportCycle": 4, "collectCycle": 5,
                       "reportToCloud": 6, "pushMethod": 7},
    "PushMethod": {"http": 1, "mqtt": 2, "dbMethod": 3, "otel": 4, "anomalyDetection": 5},
    "DeviceStatus": {"twins": 1, "reportToCloud": 2, "reportCycle": 3},
    "Twin": {"propertyName": 1, "observedDesired": 2, "reported": 3},
    "ReportDeviceStatusRequest": {"deviceName": 1, "reportedDevice": 2, "deviceNamespace": 3},
    "ReportDeviceStatesRequest": {"deviceName": 1, "deviceNamespace": 2, "state": 3},
    "RemoveDeviceModelRequest": {"modelName": 1, "modelNamespace": 2},
    "RedisClientConfig": {"addr": 1, "db": 2, "poolsize": 3, "minIdleConns": 4},
    "DeviceCommand": {"name": 1, "url": 2, "method": 3, "status_code": 4, "parameters": 5, "response": 6},
}


@pytest.mark.parametrize("message", sorted(WIRE))
def test_field_numbers(message: str) -> None:
    """Field names and numbers are KubeEdge's (proto3 wire compatibility)."""
    fields = api_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert {name: f.number for name, f in fields.items()} == WIRE[message]


def test_every_message_declared() -> None:
    """All messages of FACTS §1.3 exist, including v1.23's AnomalyDetection."""
    expected = {
        "MapperRegisterRequest", "MapperRegisterResponse", "MapperInfo", "DeviceModel", "DeviceModelSpec",
        "ModelProperty", "DeviceCommand", "Device", "DeviceSpec", "DeviceMethod", "DeviceProperty",
        "ProtocolConfig", "VisitorConfig", "CustomizedValue", "PushMethod", "PushMethodHTTP", "PushMethodMQTT",
        "PushMethodOTEL", "DBMethod", "DBMethodInfluxdb2", "Influxdb2ClientConfig", "Influxdb2DataConfig",
        "DBMethodRedis", "RedisClientConfig", "DBMethodTDEngine", "TDEngineClientConfig", "DBMethodMySQL",
        "MySQLClientConfig", "DBMethodOTEL", "OTELExporterConfig", "AnomalyDetection", "DeviceStatus", "Twin",
        "TwinProperty", "RegisterDeviceRequest", "RegisterDeviceResponse", "CreateDeviceModelRequest",
        "CreateDeviceModelResponse", "RemoveDeviceRequest", "RemoveDeviceResponse", "RemoveDeviceModelRequest",
        "RemoveDeviceModelResponse", "UpdateDeviceRequest", "UpdateDeviceResponse", "UpdateDeviceModelRequest",
        "UpdateDeviceModelResponse", "GetDeviceRequest", "GetDeviceResponse", "ReportDeviceStatusRequest",
        "ReportDeviceStatusResponse", "ReportDeviceStatesRequest", "ReportDeviceStatesResponse",
    }
    assert set(api_pb2.DESCRIPTOR.message_types_by_name) == expected
