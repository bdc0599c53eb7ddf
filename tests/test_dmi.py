"""KubeEdge DMI end to end: the real MapperService in kubeedge mode against a test edgecore."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from devices.ids import DeviceId
from dmi_edgecore import FakeEdgecore, device, model
from mapper.config import MapperConfig, TwinSettings
from mapper.dmi import api_pb2 as pb
from mapper.dmi import extension as ext_module
from mapper.dmi.convert import EDGECORE_STATES, TWIN_VALUE
from mapper.dmi.extension import KubeEdgeExtension
from mapper.dmi.settings import KubeEdgeSettings
from mapper.runtime import build_service
from mapper.service import MapperService

TEMP = model("temp-model", {"temperature": ("FLOAT", "ReadOnly"), "humidity": ("float", "ReadOnly")})
SWITCH = model("switch-model", {"power": ("BOOLEAN", "ReadWrite")})


def room(name: str, **kw) -> pb.Device:  # noqa: ANN003
    return device(name, "temp-model", {"temperature": {"kind": "temperature", "base": 21.5},
                                       "humidity": {"kind": "humidity", "base": 48}},
                  config={"seed": 7}, **kw)


def switch(name: str, **kw) -> pb.Device:  # noqa: ANN003
    return device(name, "switch-model", {"power": {"kind": "switch"}}, **kw)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temp dir: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dmi-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings(sockdir: Path, **kw) -> KubeEdgeSettings:  # noqa: ANN003
    values = {
        "name": "sim", "protocol": "simulated", "edgecore_socket": str(sockdir / "dmi.sock"),
        "socket": str(sockdir / "sim.sock"), "register_backoff_max_s": 0.2, "model_wait_s": 2.0,
        "report_interval_s": 0, **kw,
    }
    return KubeEdgeSettings.model_validate(values)


class Mapper:
    def __init__(self, service: MapperService) -> None:
        self.service = service
        self.ext = next(e for e in service.extensions if isinstance(e, KubeEdgeExtension))

    def runner(self, name: str):  # noqa: ANN201
        return self.service.runners.get(DeviceId("default", name))


@contextlib.asynccontextmanager
async def running_mapper(sockdir: Path, **kw) -> AsyncIterator[Mapper]:  # noqa: ANN003
    config = MapperConfig(mode="kubeedge", node="test-node", twin=TwinSettings(path=sockdir / "twin.db"),
                          kubeedge=settings(sockdir, **kw))
    service = build_service(config)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(10):
            await service.ready.wait()
        yield Mapper(service)
    finally:
        stop.set()
        await task


async def registered(mapper: Mapper, count: int = 1) -> None:
    async with asyncio.timeout(10):
        while mapper.ext.registrations < count:
            await mapper.ext.registered.wait()
            if mapper.ext.registrations < count:
                mapper.ext.registered.clear()


def run(coro) -> None:  # noqa: ANN001
    asyncio.run(coro)


def latest_status(edgecore: FakeEdgecore, name: str) -> pb.ReportDeviceStatusRequest | None:
    found = [r for r in edgecore.of("ReportDeviceStatus") if r.deviceName == name]
    return found[-1] if found else None


# -- registration ---------------------------------------------------------------------------

def test_register_without_devices(sockdir: Path) -> None:
    """MapperRegister carries withData, our protocol, our socket path as raw bytes and state ok."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            (request,) = edgecore.of("MapperRegister")
            assert request.withData is True
            info = request.mapper
            assert (info.name, info.protocol, info.state) == ("sim", "simulated", "ok")
            assert info.address == str(sockdir / "sim.sock").encode()
            mode = (sockdir / "sim.sock").stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o007 == 0
            assert mapper.service.runners == {}
    run(scenario())


def test_register_with_devices_dedupes_models(sockdir: Path) -> None:
    """The reply's parallel lists repeat a shared model; devices run, each reported in one call with all twins."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = [(room("room-a"), TEMP), (room("room-b"), TEMP), (switch("lamp"), SWITCH),
                                (device("other", "temp-model", {}, protocol="modbus"), TEMP)]
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                assert set(mapper.ext.catalog.models) == {("default", "temp-model"), ("default", "switch-model")}
                assert {str(d) for d in mapper.service.runners} == {"default/room-a", "default/room-b", "default/lamp"}
                await edgecore.wait_for(lambda: {"room-a", "room-b"} <= {
                    r.deviceName for r in edgecore.of("ReportDeviceStatus") if all(t.reported.value for t in r.reportedDevice.twins)
                })
                for request in edgecore.of("ReportDeviceStatus"):
                    twins = request.reportedDevice.twins
                    assert request.deviceNamespace == "default"
                    expected = {"room-a": {"temperature", "humidity"}, "room-b": {"temperature", "humidity"},
                                "lamp": {"power"}}[request.deviceName]
                    assert {t.propertyName for t in twins} == expected
                    for t in twins:
                        assert t.HasField("observedDesired") and t.HasField("reported")
                        for value in (t.observedDesired.value, t.reported.value):
                            assert value == "" or TWIN_VALUE.match(value), value
                await edgecore.wait_for(lambda: len(edgecore.of("ReportDeviceStates")) >= 3)
                assert {r.state for r in edgecore.of("ReportDeviceStates")} <= EDGECORE_STATES
                assert edgecore.refused == []
    run(scenario())


def test_register_refused_without_protocol() -> None:
    """Our settings refuse an empty protocol, which edgecore would reject."""
    with pytest.raises(ValueError, match="protocol"):
        KubeEdgeSettings.model_validate({"name": "x", "protocol": ""})
