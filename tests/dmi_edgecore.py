"""A test edgecore: DeviceManagerService on a unix socket, recording every call (both ways).

It behaves as edgecore's dmiserver does where the mapper can tell: one rate limiter for
all three RPCs (calls over it are refused with edgecore's message), MapperRegister refused
without a protocol, the reply's model list parallel to its device list, ReportDeviceStatus
refused without twins. It calls back into the mapper the way edgecore's dmiclient does: a
fresh connection per call, a 10 s deadline, no retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2
from google.protobuf.any_pb2 import Any as AnyPb

from mapper.dmi import api_pb2 as pb
from mapper.dmi import api_pb2_grpc as pb_grpc


class GoLimiter:
    """golang.org/x/time/rate.Limiter.Allow(): a bucket of `burst` tokens refilled at `rate`/s."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(frozen=True)
class Call:
    at: float
    method: str
    request: Any


def packed(value: Any) -> AnyPb:
    """configData as edgecore sends it: numbers as FloatValue (they went through JSON)."""
    if isinstance(value, bool):
        box: Any = wrappers_pb2.BoolValue(value=value)
    elif isinstance(value, int | float):
        box = wrappers_pb2.FloatValue(value=value)
    else:
        box = wrappers_pb2.StringValue(value=value)
    out = AnyPb()
    out.Pack(box)
    return out


def model(name: str, props: dict[str, tuple[str, str]], namespace: str = "default") -> pb.DeviceModel:
    """props: name -> (TYPE, accessMode)."""
    return pb.DeviceModel(name=name, namespace=namespace, spec=pb.DeviceModelSpec(properties=[
        pb.ModelProperty(name=n, type=t, accessMode=a) for n, (t, a) in props.items()
    ]))


def device(
    name: str, model_name: str, props: dict[str, dict[str, Any]], *, config: dict[str, Any] | None = None,
    protocol: str = "simulated", cycle_ms: int = 50, desired: dict[str, str] | None = None,
    namespace: str = "default",
) -> pb.Device:
    """props: name -> visitor configData."""
    desired = desired or {}
    return pb.Device(
        name=name, namespace=namespace,
        spec=pb.DeviceSpec(
            deviceModelReference=model_name,
            protocol=pb.ProtocolConfig(protocolName=protocol, configData=pb.CustomizedValue(
                data={k: packed(v) for k, v in (config or {}).items()})),
            properties=[
                pb.DeviceProperty(
                    name=n, collectCycle=cycle_ms, reportCycle=cycle_ms, reportToCloud=True,
                    desired=pb.TwinProperty(value=desired.get(n, "")),
                    visitors=pb.VisitorConfig(protocolName=protocol, configData=pb.CustomizedValue(
                        data={k: packed(v) for k, v in visitor.items()})),
                )
                for n, visitor in props.items()
            ],
        ),
        status=pb.DeviceStatus(reportToCloud=True, reportCycle=1000),
    )


class FakeEdgecore(pb_grpc.DeviceManagerServiceServicer):
    def __init__(self, socket: Path, *, rate: float = 1.0, burst: int = 100) -> None:
        self.socket = socket
        self.limiter = GoLimiter(rate, burst)
        self.calls: list[Call] = []
        self.refused: list[Call] = []
        # edgecore -> mapper calls (DeviceMapperService), recorded before they are made.
        self.sent: list[Call] = []
        self.devices: list[tuple[pb.Device, pb.DeviceModel]] = []
        self.mapper_address: str | None = None
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> FakeEdgecore:
        self._server = grpc.aio.server()
        pb_grpc.add_DeviceManagerServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{self.socket}")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.stop(None)
        self.socket.unlink(missing_ok=True)

    async def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext, who: str) -> None:
        call = Call(time.monotonic(), method, request)
        if not self.limiter.allow():
            self.refused.append(call)
            await context.abort(grpc.StatusCode.UNKNOWN, f"fail to {method} because of too many request: {who}")
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until predicate() is truthy, re-checked on every call edgecore receives."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)
        return predicate()

    def of(self, method: str) -> list[Any]:
        """Requests the mapper made to us (DeviceManagerService)."""
        return [c.request for c in self.calls if c.method == method]

    def mapper_calls(self, method: str) -> list[Any]:
        """Requests we made to the mapper (DeviceMapperService)."""
        return [c.request for c in self.sent if c.method == method]

    # -- DeviceManagerService --------------------------------------------------------------

    async def MapperRegister(self, request, context):  # noqa: ANN001, ANN201, N802
        if not request.mapper.protocol:
            await context.abort(grpc.StatusCode.UNKNOWN, "fail to register mapper because of protocol is nil")
        await self._record("MapperRegister", request, context, request.mapper.name)
        self.mapper_address = request.mapper.address.decode()
        if not request.withData:
            return pb.MapperRegisterResponse()
        mine = [(d, m) for d, m in self.devices if d.spec.protocol.protocolName == request.mapper.protocol]
        return pb.MapperRegisterResponse(deviceList=[d for d, _ in mine], modelList=[m for _, m in mine])

    async def ReportDeviceStatus(self, request, context):  # noqa: ANN001, ANN201, N802
        if not request.HasField("reportedDevice") or not request.reportedDevice.twins:
            await context.abort(grpc.StatusCode.UNKNOWN, "reportedDevice or its twins are empty")
        await self._record("ReportDeviceStatus", request, context, request.deviceName)
        return pb.ReportDeviceStatusResponse()

    async def ReportDeviceStates(self, request, context):  # noqa: ANN001, ANN201, N802
        if not request.deviceName or not request.state:
            await context.abort(grpc.StatusCode.UNKNOWN, "deviceName and state are required")
        await self._record("ReportDeviceStates", request, context, request.deviceName)
        return pb.ReportDeviceStatesResponse()

    # -- edgecore -> mapper ----------------------------------------------------------------

    async def call_mapper(self, method: str, request: Any) -> Any:
        assert self.mapper_address, "the mapper has not registered"
        self.sent.append(Call(time.monotonic(), method, request))
        async with grpc.aio.insecure_channel(f"unix:{self.mapper_address}") as channel:
            stub = pb_grpc.DeviceMapperServiceStub(channel)
            return await getattr(stub, method)(request, timeout=10)

    async def add(self, dev: pb.Device, mod: pb.DeviceModel) -> None:
        """A Device created in the cloud: CreateDeviceModel (first user of the model), RegisterDevice."""
        if not any(m.name == mod.name and m.namespace == mod.namespace for _, m in self.devices):
            await self.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=mod))
        self.devices.append((dev, mod))
        await self.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=dev))

    async def remove(self, name: str, namespace: str = "default") -> None:
        """A Device deleted: RemoveDeviceModel when it was the model's last user, then RemoveDevice."""
        gone = [(d, m) for d, m in self.devices if d.name == name and d.namespace == namespace]
        self.devices = [(d, m) for d, m in self.devices if (d.name, d.namespace) != (name, namespace)]
        for _, mod in gone:
            if not any((m.namespace, m.name) == (mod.namespace, mod.name) for _, m in self.devices):
                await self.call_mapper("RemoveDeviceModel", pb.RemoveDeviceModelRequest(
                    modelName=mod.name, modelNamespace=mod.namespace))
        await self.call_mapper("RemoveDevice", pb.RemoveDeviceRequest(deviceName=name, deviceNamespace=namespace))


def from_crd(doc: dict[str, Any]) -> pb.Device:
    """A Device CRD as edgecore's ConvertDevice sends it (every number a FloatValue)."""
    spec = doc["spec"]
    protocol = spec["protocol"]
    return pb.Device(
        name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace", "default"),
        spec=pb.DeviceSpec(
            deviceModelReference=spec["deviceModelRef"]["name"],
            protocol=pb.ProtocolConfig(protocolName=protocol["protocolName"], configData=pb.CustomizedValue(
                data={k: packed(v) for k, v in protocol.get("configData", {}).items()})),
            properties=[
                pb.DeviceProperty(
                    name=p["name"], collectCycle=p.get("collectCycle", 0), reportCycle=p.get("reportCycle", 0),
                    reportToCloud=p.get("reportToCloud", False),
                    visitors=pb.VisitorConfig(protocolName=p["visitors"].get("protocolName", ""),
                                              configData=pb.CustomizedValue(data={
                                                  k: packed(v) for k, v in p["visitors"].get("configData", {}).items()})),
                )
                for p in spec.get("properties", [])
            ],
        ),
        status=pb.DeviceStatus(**{k: v for k, v in spec.get("stateReport", {}).items()}),
    )


def model_from_crd(doc: dict[str, Any]) -> pb.DeviceModel:
    return pb.DeviceModel(name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace", "default"),
                          spec=pb.DeviceModelSpec(properties=[
                              pb.ModelProperty(**{k: str(v) for k, v in p.items() if k != "visitors"})
                              for p in doc["spec"].get("properties", [])]))
