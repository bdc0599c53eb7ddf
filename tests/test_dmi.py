"""KubeEdge DMI end to end: the real MapperService in kubeedge mode against a test edgecore."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from devices.ids import DeviceId
from dmi_edgecore import FakeEdgecore, device, model, packed
from mapper.config import DeviceLoopSettings, MapperConfig, TwinSettings
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
async def service_running(config: MapperConfig) -> AsyncIterator[Mapper]:
    """The mapper of `config`, in this event loop, from ready until stopped."""
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


@contextlib.asynccontextmanager
async def running_mapper(sockdir: Path, *, loop: DeviceLoopSettings | None = None,
                         **kw) -> AsyncIterator[Mapper]:  # noqa: ANN003
    config = MapperConfig(mode="kubeedge", node="test-node", twin=TwinSettings(path=sockdir / "twin.db"),
                          kubeedge=settings(sockdir, **kw), loop=loop or DeviceLoopSettings())
    async with service_running(config) as mapper:
        yield mapper


async def until(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    """Wait for a condition inside the mapper (no event to await there); bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def registered(mapper: Mapper, count: int = 1) -> None:
    """Wait until the mapper has registered `count` times (and adopted the reply)."""
    await until(lambda: mapper.ext.registrations >= count, timeout=10)


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
                                (device("other", "temp-model", {}, protocol="acme-fieldbus"), TEMP)]
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


def grpc_code(exc_info: pytest.ExceptionInfo) -> grpc.StatusCode:
    return exc_info.value.code()


# -- edgecore -> mapper ---------------------------------------------------------------------

def test_add_update_remove_devices_and_models(sockdir: Path) -> None:
    """Register is idempotent; an update restarts only that device and only on a spec change; removal frees the driver."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            await edgecore.add(room("room-b"), TEMP)
            await edgecore.add(switch("lamp", desired={"power": "true"}), SWITCH)
            # CreateDeviceModel goes edgecore -> mapper, once per model; the mapper holds and uses both models.
            assert [r.model.name for r in edgecore.mapper_calls("CreateDeviceModel")] == ["temp-model", "switch-model"]
            assert set(mapper.ext.catalog.models) == {("default", "temp-model"), ("default", "switch-model")}
            assert set(mapper.service.definitions.models) >= {("default", "temp-model"), ("default", "switch-model")}
            a, b, lamp = mapper.runner("room-a"), mapper.runner("room-b"), mapper.runner("lamp")
            assert a and b and lamp

            await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=room("room-a")))
            await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=room("room-a")))
            assert mapper.runner("room-a") is a, "an unchanged spec must not restart the device"

            await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=room("room-a", cycle_ms=80)))
            assert mapper.runner("room-a") is not a and not a.driver.opened
            assert mapper.runner("room-a").definition.prop("temperature").collect_cycle_ms == 80
            assert mapper.runner("room-b") is b and mapper.runner("lamp") is lamp

            bigger = model("temp-model", {"temperature": ("FLOAT", "ReadOnly"), "humidity": ("FLOAT", "ReadOnly"),
                                          "pressure": ("FLOAT", "ReadOnly")})
            a2 = mapper.runner("room-a")
            await edgecore.call_mapper("UpdateDeviceModel", pb.UpdateDeviceModelRequest(model=bigger))
            assert mapper.runner("room-a") is not a2 and mapper.runner("room-b") is not b
            assert mapper.runner("lamp") is lamp

            # The desired value from the spec is applied and reported as observedDesired + reported.
            await edgecore.wait_for(lambda: (s := latest_status(edgecore, "lamp")) is not None
                                    and s.reportedDevice.twins[0].observedDesired.value == "true"
                                    and s.reportedDevice.twins[0].reported.value == "true")
            reply = await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="lamp",
                                                                                deviceNamespace="default"))
            (twin,) = reply.device.status.twins
            assert (twin.propertyName, twin.reported.value, twin.reported.metadata["type"]) == ("power", "true", "boolean")
            assert reply.device.spec == switch("lamp", desired={"power": "true"}).spec

            b2 = mapper.runner("room-b")
            await edgecore.remove("room-a")  # room-b still uses the model: RemoveDevice only
            assert mapper.runner("room-a") is None and ("default", "temp-model") in mapper.ext.catalog.models
            await edgecore.remove("room-b")  # last user: RemoveDeviceModel, then RemoveDevice
            assert mapper.runner("room-b") is None and not b2.driver.opened
            assert set(mapper.ext.catalog.models) == {("default", "switch-model")}
            assert {str(d) for d in mapper.service.runners} == {"default/lamp"}

            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="room-a",
                                                                            deviceNamespace="default"))
            assert grpc_code(missing) == grpc.StatusCode.NOT_FOUND
            saved = (sockdir / "twin.db.kubeedge.json").read_text()
            assert '"lamp"' in saved and '"room-a"' not in saved
    run(scenario())


def test_a_device_runs_on_when_edgecore_removes_its_model_before_it(sockdir: Path) -> None:
    """Deleting a model's last Device, edgecore sends RemoveDeviceModel, then RemoveDevice (FACTS.md
    §2.2). The Go framework only forgets the model: the device runs until its own removal. Before,
    the mapper stopped it at RemoveDeviceModel and reported it `offline` to edgecore (twice) for a
    device that was being deleted, logging it as kept but not run; a model removed while Devices
    still use it stopped them all the same."""
    remove_model = pb.RemoveDeviceModelRequest(modelName="temp-model", modelNamespace="default")

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            call = edgecore.call_mapper
            await registered(mapper)
            await edgecore.add(room("room-b"), TEMP)
            await edgecore.wait_for(lambda: any(r.deviceName == "room-b" and r.state == "ok"
                                                for r in edgecore.of("ReportDeviceStates")))
            runner, states = mapper.runner("room-b"), len(edgecore.of("ReportDeviceStates"))
            await call("RemoveDeviceModel", remove_model)
            assert mapper.runner("room-b") is runner, "the device stopped at its model's removal"
            assert ("default", "room-b") not in mapper.ext.catalog.problems
            await call("RemoveDevice", pb.RemoveDeviceRequest(deviceName="room-b", deviceNamespace="default"))
            assert mapper.runner("room-b") is None
            assert ("default", "temp-model") not in mapper.ext.catalog.models  # gone with its last device
            assert [r.state for r in edgecore.of("ReportDeviceStates")[states:] if r.deviceName == "room-b"] == []

            # A model removed, then created again before its device goes, stays.
            await call("CreateDeviceModel", pb.CreateDeviceModelRequest(model=TEMP))
            await call("RegisterDevice", pb.RegisterDeviceRequest(device=room("room-c")))
            await call("RemoveDeviceModel", remove_model)
            await call("CreateDeviceModel", pb.CreateDeviceModelRequest(model=TEMP))
            await call("RemoveDevice", pb.RemoveDeviceRequest(deviceName="room-c", deviceNamespace="default"))
            assert ("default", "temp-model") in mapper.ext.catalog.models
            # Removed while no device uses it: dropped at once.
            await call("RemoveDeviceModel", remove_model)
            assert ("default", "temp-model") not in mapper.ext.catalog.models
    run(scenario())


def test_sighup_reload_keeps_edgecore_devices_running(sockdir: Path) -> None:
    """A reload of the local YAML in kubeedge mode adds the new local device and leaves edgecore's alone."""
    from helpers import device_yaml, write_devices
    from mapper.cli import reload_devices

    async def scenario() -> None:
        local = write_devices(sockdir / "yaml", ["yaml-one"], cycle=100)
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                mapper_with_local(sockdir, local) as (mapper, config):
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            room_a, one = mapper.runner("room-a"), mapper.runner("yaml-one")
            assert room_a is not None and one is not None

            (local / "yaml-two.yaml").write_text(device_yaml("yaml-two", cycle=100))
            assert await reload_devices(mapper.service, config)
            assert mapper.runner("room-a") is room_a, "edgecore's device must keep running untouched"
            assert mapper.runner("yaml-one") is one
            assert mapper.runner("yaml-two") is not None
            assert {str(d) for d in mapper.service.runners} == {"default/room-a", "default/yaml-one",
                                                                "default/yaml-two"}
    run(scenario())


async def refused_as_invalid(edgecore: FakeEdgecore, dev: pb.Device) -> str:
    """RegisterDevice of `dev` fails with INVALID_ARGUMENT; its details."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=dev))
    assert grpc_code(refused) == grpc.StatusCode.INVALID_ARGUMENT
    return refused.value.details()


def test_invalid_device_is_refused_with_the_field(sockdir: Path) -> None:
    """configData that fails the driver's validation is INVALID_ARGUMENT naming the field; others keep running."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(switch("lamp"), SWITCH)
            bad = device("bad", "switch-model", {"power": {"kind": "switch"}}, config={"failure_rate": 5})
            assert "spec.protocol.configData.failure_rate" in await refused_as_invalid(edgecore, bad)
            assert mapper.runner("bad") is None and mapper.runner("lamp") is not None
    run(scenario())


def test_a_device_pushing_into_another_nodes_topics_is_refused(sockdir: Path) -> None:
    """An edgecore device whose pushMethod.mqtt.topic names another node's topic (here its retained
    state) would publish fake readings for that node: INVALID_ARGUMENT naming the field, the device
    is not run. Its own telemetry topic may be named."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(switch("lamp"), SWITCH)
            bad = switch("faker")
            bad.spec.properties[0].pushMethod.mqtt.topic = "mapper/node-b/default/lamp/state"
            bad.spec.properties[0].pushMethod.mqtt.retained = True
            details = await refused_as_invalid(edgecore, bad)
            assert "spec.properties[0].pushMethod.mqtt.topic: topic 'mapper/node-b/default/lamp/state' is inside " \
                "the mapper's topic tree" in details, details
            assert mapper.runner("faker") is None and mapper.runner("lamp") is not None
            own = switch("honest")
            prop = own.spec.properties[0]
            prop.pushMethod.mqtt.topic = f"mapper/test-node/default/honest/{prop.name}"
            await edgecore.add(own, SWITCH)
            await until(lambda: mapper.runner("honest") is not None)
    run(scenario())


def test_a_warning_about_an_edgecore_device_is_logged_once(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device from edgecore with a pushMethod the mapper does not carry out (http) runs, and the
    loader's warning about it is logged, once: the warnings of edgecore's devices were collected
    and never logged (a local file's are, at start and at every reload)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            pushing = switch("pusher")
            pushing.spec.properties[0].pushMethod.http.hostname = "http://collector.example"
            pushing.spec.properties[0].pushMethod.http.port = 8080
            await edgecore.add(pushing, SWITCH)
            await until(lambda: mapper.runner("pusher") is not None)
            await edgecore.add(switch("other"), SWITCH)  # another update: nothing new to say
            await until(lambda: mapper.runner("other") is not None)
    caplog.set_level(logging.WARNING, logger="mapper.dmi")
    run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device from edgecore: ")]
    assert len(lines) == 1, lines
    assert "spec.properties[0].pushMethod.http" in lines[0] and "default/pusher" in lines[0], lines[0]


@pytest.mark.parametrize("any_value", [
    ("type.googleapis.com/google.protobuf.FloatValue", b"\xff\xff\xff"),  # a known type, malformed bytes
    ("type.googleapis.com/example.Custom", b""),                          # a type nobody knows
])
def test_a_device_protobuf_cannot_carry_is_refused_and_blocks_nothing(sockdir: Path, any_value) -> None:
    """A configData `Any` that cannot be read or saved: INVALID_ARGUMENT, the device is not kept,
    later updates of other devices still apply and the state is saved. Sent again in edgecore's
    registration reply after a restart, it is left out and the others run (the mapper used to
    refuse every later update, and then exit at every start)."""
    from google.protobuf.any_pb2 import Any as AnyPb

    bad = room("room-b")
    bad.spec.protocol.configData.data["seed"].CopyFrom(AnyPb(type_url=any_value[0], value=any_value[1]))

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                await edgecore.add(room("room-a"), TEMP)
                assert "room-b" in await refused_as_invalid(edgecore, bad)
                await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=room("room-c")))
                assert mapper.runner("room-b") is None
                assert mapper.runner("room-a") is not None and mapper.runner("room-c") is not None
                saved = mapper.ext.state_path.read_text()
                assert "room-c" in saved and "room-b" not in saved
            edgecore.devices = [(room("room-a"), TEMP), (bad, TEMP)]  # edgecore still lists it
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                assert mapper.runner("room-a") is not None and mapper.runner("room-b") is None
    run(scenario())


DHT = model("dht-model", {"temperature": ("FLOAT", "ReadOnly"), "humidity": ("FLOAT", "ReadOnly")})


def dht(name: str, pin: int) -> pb.Device:
    return device(name, "dht-model", {"temperature": {"measurement": "temperature"},
                                      "humidity": {"measurement": "humidity"}},
                  config={"sensor": "DHT11", "pin": pin}, protocol="dht", cycle_ms=3000)


def test_two_devices_on_one_pin_second_is_refused(sockdir: Path) -> None:
    """Claims are checked across edgecore's devices: the second DHT on GPIO4 is refused naming the first
    and the pin; the first keeps running; an update cannot take the pin either; freeing it starts the second."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, name="dht", protocol="dht") as mapper:
            await registered(mapper)
            # Named so that sorting alone would favour the newcomer: the running device must win anyway.
            await edgecore.add(dht("z-first", 4), DHT)
            first = mapper.runner("z-first")
            assert first is not None
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await edgecore.add(dht("a-second", 4), DHT)
            assert grpc_code(refused) == grpc.StatusCode.FAILED_PRECONDITION
            details = refused.value.details()
            assert "gpio:4" in details and "default/z-first" in details and "a-second" in details, details
            assert mapper.runner("a-second") is None
            assert mapper.runner("z-first") is first, "the device holding the pin must not restart"
            assert ("default", "a-second") in mapper.ext.catalog.problems

            # Idempotent RegisterDevice and UpdateDevice of the loser are refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=dht("a-second", 4)))
            assert grpc_code(again) == grpc.StatusCode.FAILED_PRECONDITION

            # A third device on another pin runs; moving it onto GPIO4 is refused and the holder stays.
            await edgecore.add(dht("m-third", 17), DHT)
            assert mapper.runner("m-third") is not None
            with pytest.raises(grpc.aio.AioRpcError) as moved:
                await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=dht("m-third", 4)))
            assert "gpio:4" in moved.value.details() and "default/z-first" in moved.value.details()
            assert mapper.runner("z-first") is first and mapper.runner("m-third") is None

            # The holder goes away: the kept device starts (the pin is free again).
            await edgecore.call_mapper("RemoveDevice", pb.RemoveDeviceRequest(deviceName="z-first",
                                                                              deviceNamespace="default"))
            assert mapper.runner("z-first") is None
            # Neither ran before, so namespace/name order decides: a-second gets the pin.
            assert mapper.runner("a-second") is not None and mapper.runner("m-third") is None
            assert "default/a-second" in mapper.ext.catalog.problems[("default", "m-third")]
    run(scenario())


def test_edgecore_device_cannot_take_a_pin_of_a_local_yaml_device(sockdir: Path) -> None:
    """The claims pass includes the local YAML devices, which always keep their pins."""
    from devices.loader import load_objects
    from mapper.dmi.catalog import Catalog
    from mapper.dmi.convert import device_document, model_document

    local = load_objects([("local.yaml", model_document(DHT, "dht")),
                          ("local.yaml", {**device_document(dht("yaml-dht", 4)), "metadata": {"name": "yaml-dht"}})])
    catalog = Catalog("dht")
    catalog.replace([dht("edge-dht", 4), dht("edge-other", 5)], [DHT, DHT])
    built = catalog.build(local)
    assert set(built.devices) == {DeviceId("default", "edge-other")}
    problem = catalog.problems[("default", "edge-dht")]
    assert "gpio:4 is already used by device default/yaml-dht (local.yaml" in problem, problem
    # Order is fixed: two edgecore devices on one pin, nothing running yet -> namespace/name order.
    fresh = Catalog("dht")
    fresh.replace([dht("b", 6), dht("a", 6)], [DHT, DHT])
    assert set(fresh.build().devices) == {DeviceId("default", "a")}
    assert "default/a" in fresh.problems[("default", "b")]


def test_after_a_restart_the_device_holding_a_pin_keeps_it(sockdir: Path) -> None:
    """z-first runs on GPIO4, a-second is refused for it. After a mapper restart z-first still
    holds the pin, and edgecore hears a-second is offline. (The ranking by who ran was not saved:
    after the restart namespace/name order gave a-second the pin and stopped z-first, and the
    offline state of a device not running at start was dropped, edgecore never heard it.)"""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            async with running_mapper(sockdir, name="dht", protocol="dht") as mapper:
                await registered(mapper)
                await edgecore.add(dht("z-first", 4), DHT)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await edgecore.add(dht("a-second", 4), DHT)
                assert grpc_code(refused) == grpc.StatusCode.FAILED_PRECONDITION
                assert mapper.runner("z-first") is not None and mapper.runner("a-second") is None
            before = len(edgecore.of("ReportDeviceStates"))

            def second_offline() -> bool:
                return any(r.deviceName == "a-second" and r.state == "offline"
                           for r in edgecore.of("ReportDeviceStates")[before:])

            async with running_mapper(sockdir, name="dht", protocol="dht") as mapper:
                async with asyncio.timeout(10):
                    await mapper.ext.started.wait()  # the restored devices run (edgecore not asked yet)
                assert mapper.runner("z-first") is not None and mapper.runner("a-second") is None
                await registered(mapper)
                assert mapper.runner("z-first") is not None and mapper.runner("a-second") is None
                assert "default/z-first" in mapper.ext.catalog.problems[("default", "a-second")]
                await edgecore.wait_for(second_offline)
    run(scenario())


def test_a_device_registered_after_start_and_refused_for_a_pin_is_reported_offline(sockdir: Path) -> None:
    """z-first runs on GPIO4; edgecore then registers a-second on GPIO4, refused (FAILED_PRECONDITION):
    edgecore hears it is offline, as it does of a device refused at start. (Only devices not running
    at start were reported: edgecore never heard of a device refused later, and showed whatever it
    had before.)"""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, name="dht", protocol="dht") as mapper:
            await registered(mapper)
            await edgecore.add(dht("z-first", 4), DHT)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await edgecore.add(dht("a-second", 4), DHT)
            assert grpc_code(refused) == grpc.StatusCode.FAILED_PRECONDITION

            def states_of(name: str) -> list[str]:
                return [r.state for r in edgecore.of("ReportDeviceStates") if r.deviceName == name]

            await edgecore.wait_for(lambda: "offline" in states_of("a-second"))
            assert mapper.runner("a-second") is None
    run(scenario())


def test_a_device_not_running_at_start_is_reported_offline_even_when_that_switch_failed(sockdir: Path) -> None:
    """edgecore's first reply holds an invalid device; the device switch that adopts it fails once
    (the twin locked past its timeout) and the registration is tried again. The invalid device's
    offline was left out for good after the failed switch (edgecore never heard of it); it is
    reported whatever the switch does. The lock is real: another connection holds the twin file's
    write lock (the service's busy timeout made short) until the failed adoption is logged."""
    from helpers import TwinLock

    async def scenario() -> None:
        edgecore = FakeEdgecore(sockdir / "dmi.sock")
        edgecore.devices = [(device("broken", "temp-model", {"temperature": {"kind": "temperature"}},
                                    config={"failure_rate": 7}), TEMP),
                            (room("room-a"), TEMP)]
        async with running_mapper(sockdir) as mapper:
            await mapper.service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
            with TwinLock(sockdir / "twin.db") as lock:
                lock.release_on_log("cannot adopt edgecore's MapperRegister reply")
                async with edgecore:  # edgecore's first reply comes now
                    await registered(mapper)
                    assert lock.released_by and mapper.ext.adopt_failures == 1
                    assert mapper.runner("room-a") is not None and mapper.runner("broken") is None
                    await edgecore.wait_for(lambda: any(r.deviceName == "broken" and r.state == "offline"
                                                        for r in edgecore.of("ReportDeviceStates")))
    run(scenario())


def test_a_state_file_without_the_devices_that_ran_still_loads() -> None:
    """A state file saved before it named the devices that ran (`admitted`) loads as before:
    nothing ranks first, namespace/name order decides. With the field, the device that ran wins."""
    import json

    from mapper.dmi.catalog import Catalog

    path = Path(tempfile.mkdtemp(prefix="dmi-", dir="/tmp")) / "state.json"
    try:
        ran = Catalog("dht")
        ran.replace([dht("z-first", 4)], [DHT])
        ran.build()
        ran.put_device(dht("a-second", 4))
        ran.build()
        assert ("default", "a-second") in ran.conflicts
        ran.save(path)
        saved = json.loads(path.read_text())
        assert saved["admitted"] == [["default", "z-first"]]

        restored = Catalog("dht")
        assert restored.restore(path)
        assert set(restored.build().devices) == {DeviceId("default", "z-first")}

        del saved["admitted"]
        path.write_text(json.dumps(saved))
        old = Catalog("dht")
        assert old.restore(path)
        assert set(old.devices) == {("default", "z-first"), ("default", "a-second")}
        assert set(old.build().devices) == {DeviceId("default", "a-second")}
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.mark.parametrize("interval_s", [0, 3600])
def test_get_device_reads_the_device_now(sockdir: Path, interval_s: float) -> None:
    """GetDevice reads every property from the device: a counter polled once a minute still moves per call,
    unless the property's last reading is less than loop.on_demand_min_interval_s old (the bound REST GETs
    have: the sensor's limits, and the twin's history shared by all devices, hold for edgecore's calls too);
    then that reading is the answer, and nothing is read or recorded again."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, loop=DeviceLoopSettings(on_demand_min_interval_s=interval_s)) as mapper:
            await registered(mapper)
            meter = device("meter", "count-model", {"count": {"kind": "counter"}}, cycle_ms=60_000)
            await edgecore.add(meter, model("count-model", {"count": ("INT", "ReadOnly")}))
            await edgecore.wait_for(lambda: latest_status(edgecore, "meter") is not None
                                    and latest_status(edgecore, "meter").reportedDevice.twins[0].reported.value)
            polled = int(latest_status(edgecore, "meter").reportedDevice.twins[0].reported.value)

            async def get() -> int:
                reply = await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="meter",
                                                                                    deviceNamespace="default"))
                (twin,) = reply.device.status.twins
                assert twin.propertyName == "count" and twin.reported.metadata["type"] == "int"
                return int(twin.reported.value)

            first = await get()
            second = await get()
            if interval_s:  # the collect loop's reading, less than an hour old
                assert polled == first == second, (polled, first, second)
                assert mapper.service.runners[DeviceId("default", "meter")].reads == 1
                return
            # The loop read the counter once (next read in a minute); each GetDevice reads it again.
            assert polled < first < second, (polled, first, second)
    run(scenario())


def test_a_readonly_propertys_crd_desired_value_is_not_reported_as_observed(sockdir: Path) -> None:
    """Deliberate (docs/kubeedge.md, Report): the Go framework reports a Device's desired.value as
    observedDesired whatever the access mode; here a ReadOnly property's desired value is ignored,
    so observedDesired stays "" (edgecore would otherwise publish a delta at every report), while
    a ReadWrite property's is the value taken up."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            both = model("both-model", {"count": ("INT", "ReadOnly"), "level": ("INT", "ReadWrite")})
            meter = device("meter-ro", "both-model", {"count": {"kind": "counter"}, "level": {"kind": "counter"}},
                           desired={"count": "5", "level": "7"})
            await edgecore.add(meter, both)
            await edgecore.wait_for(lambda: (status := latest_status(edgecore, "meter-ro")) is not None
                                    and all(t.reported.value for t in status.reportedDevice.twins))
            twins = {t.propertyName: t for t in latest_status(edgecore, "meter-ro").reportedDevice.twins}
            assert twins["count"].observedDesired.value == ""
            assert twins["level"].observedDesired.value == "7"
    run(scenario())


def test_models_are_per_namespace(sockdir: Path) -> None:
    """Two namespaces with a model of the same name: removing one namespace's last device removes only its model."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            lab_model = model("temp-model", {"temperature": ("FLOAT", "ReadOnly"), "humidity": ("FLOAT", "ReadOnly")},
                              namespace="lab")
            await edgecore.add(room("room-a"), TEMP)
            await edgecore.add(room("room-b", namespace="lab"), lab_model)
            assert set(mapper.ext.catalog.models) == {("default", "temp-model"), ("lab", "temp-model")}
            await edgecore.remove("room-a")  # the last user in default; lab still has its own temp-model
            removed = [(r.modelNamespace, r.modelName) for r in edgecore.mapper_calls("RemoveDeviceModel")]
            assert removed == [("default", "temp-model")]
            assert set(mapper.ext.catalog.models) == {("lab", "temp-model")}
            assert DeviceId("lab", "room-b") in mapper.service.runners and mapper.runner("room-a") is None
    run(scenario())


def test_device_before_model(sockdir: Path) -> None:
    """RegisterDevice waits for a late model; past the bound it fails but the device starts when the model comes."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, model_wait_s=2.0) as mapper:  # room for a slow machine's RPCs
            await registered(mapper)
            call = asyncio.create_task(edgecore.call_mapper("RegisterDevice",
                                                            pb.RegisterDeviceRequest(device=room("room-a"))))
            await until(lambda: ("default", "room-a") in mapper.ext.catalog.devices)
            assert mapper.runner("room-a") is None and not call.done()
            await edgecore.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=TEMP))
            await call  # OK: the model arrived in time
            assert mapper.runner("room-a") is not None

            with pytest.raises(grpc.aio.AioRpcError) as late:
                await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=switch("lamp")))
            assert grpc_code(late) == grpc.StatusCode.FAILED_PRECONDITION
            assert mapper.runner("lamp") is None
            await edgecore.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=SWITCH))
            assert mapper.runner("lamp") is not None
    run(scenario())


def test_an_update_of_a_device_whose_model_is_not_here_says_so(sockdir: Path) -> None:
    """A Device moved to this mapper's protocol reaches it as UpdateDevice (edgecore routes the
    update by the new protocol; the Device was never registered here), and its DeviceModel may
    never come (edgecore routes models by the model's own spec.protocol). The call returned OK and
    the device waited silently; it fails now as a RegisterDevice without its model does, naming
    the model, and the device still starts when the model arrives."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, model_wait_s=0.5) as mapper:
            await registered(mapper)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=switch("moved")))
            assert grpc_code(missing) == grpc.StatusCode.FAILED_PRECONDITION
            assert "DeviceModel default/switch-model not received" in missing.value.details()
            assert "default/moved is kept" in missing.value.details()
            assert mapper.runner("moved") is None
            await edgecore.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=SWITCH))
            assert mapper.runner("moved") is not None
            # An update of a running device whose model is here answers OK, at once.
            await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=switch("moved", cycle_ms=70)))
            assert mapper.runner("moved") is not None
    run(scenario())


# -- edgecore restarts and outages ----------------------------------------------------------

def test_edgecore_restart_reregisters(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new edgecore on the socket gets MapperRegister again; its reply replaces the device set."""
    monkeypatch.setattr(ext_module, "WATCH_INTERVAL_S", 0.05)

    async def scenario() -> None:
        async with running_mapper(sockdir) as mapper:
            async with FakeEdgecore(sockdir / "dmi.sock") as first:
                first.devices = [(room("room-a"), TEMP)]
                await registered(mapper)
                assert mapper.runner("room-a") is not None
            async with FakeEdgecore(sockdir / "dmi.sock") as second:
                second.devices = [(switch("lamp"), SWITCH)]
                await registered(mapper, 2)
                assert len(second.of("MapperRegister")) == 1
                assert {str(d) for d in mapper.service.runners} == {"default/lamp"}
                await second.wait_for(lambda: latest_status(second, "lamp") is not None)
    run(scenario())


def test_a_device_removed_and_created_again_is_reported_at_once(sockdir: Path) -> None:
    """A Device deleted in the cloud and created again starts with an empty twin and no state in
    edgecore. Its first reading was not reported when it equalled the last report of the removed
    device (the reporter kept that, and sent only changes): with report_interval_s 0 a constant
    never reached edgecore again, with the default 60 s not for a minute; its state likewise."""
    constant = model("k-model", {"level": ("FLOAT", "ReadOnly")})

    def level() -> pb.Device:
        return device("k", "k-model", {"level": {"kind": "constant", "value": 7.5}})

    def reports(edgecore: FakeEdgecore, method: str) -> int:
        return len([r for r in edgecore.of(method) if r.deviceName == "k"])

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(level(), constant)
            await edgecore.wait_for(lambda: reports(edgecore, "ReportDeviceStatus") and reports(edgecore, "ReportDeviceStates"))
            await edgecore.remove("k")
            statuses, states = reports(edgecore, "ReportDeviceStatus"), reports(edgecore, "ReportDeviceStates")
            await edgecore.add(level(), constant)
            await edgecore.wait_for(lambda: reports(edgecore, "ReportDeviceStatus") > statuses)
            await edgecore.wait_for(lambda: reports(edgecore, "ReportDeviceStates") > states)
            assert latest_status(edgecore, "k").reportedDevice.twins[0].reported.value == "7.5"
    run(scenario())


class EdgecoreChangingWhileItRegisters(FakeEdgecore):
    """Once armed: after building its MapperRegister reply, and before sending it, the cloud deletes
    room-a and creates room-b (edgecore calls the mapper for both on its own connections)."""

    armed = False

    async def MapperRegister(self, request, context):  # noqa: ANN001, ANN201, N802
        reply = await super().MapperRegister(request, context)
        if self.armed:
            self.armed = False
            await self.remove("room-a")
            await self.add(room("room-b"), TEMP)
        return reply


def test_calls_made_while_a_registration_is_in_flight_are_not_undone_by_its_reply(sockdir: Path) -> None:
    """edgecore's MapperRegister reply holds room-a and not room-b; it reaches the mapper after
    edgecore's RemoveDevice room-a and RegisterDevice room-b were answered. The mapper ends with
    room-b and without room-a, running and saved. (The reply replaced the catalog: room-a ran on,
    saved and reported, refused by edgecore; room-b was dropped.)"""
    async def scenario() -> None:
        async with EdgecoreChangingWhileItRegisters(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            assert mapper.runner("room-a") is not None
            edgecore.armed = True
            mapper.ext._lost.set()  # noqa: SLF001 - as when edgecore's socket is replaced: register again
            await registered(mapper, 2)
            assert len(edgecore.mapper_calls("RemoveDevice")) == 1
            assert len(edgecore.mapper_calls("RegisterDevice")) == 2
            assert set(mapper.ext.catalog.devices) == {("default", "room-b")}
            assert mapper.runner("room-a") is None and mapper.runner("room-b") is not None
            assert ("default", "temp-model") in mapper.ext.catalog.models
            from mapper.dmi.catalog import Catalog
            saved = Catalog("simulated")
            assert saved.restore(sockdir / "twin.db.kubeedge.json")
            assert set(saved.devices) == {("default", "room-b")}
    run(scenario())


def test_a_call_that_arrived_before_the_registration_is_not_replayed_over_its_reply(sockdir: Path) -> None:
    """RegisterDevice room-c reaches the mapper and waits for the DMI lock (a slow change before
    it); meanwhile edgecore deletes room-c and the mapper registers again. room-c's change runs
    during the registration, but it arrived before the request was sent: edgecore's reply (without
    room-c) is the newer word. Journaled when it ran, it was replayed over the reply and room-c
    came back (running, saved, its reports refused by edgecore)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            await mapper.ext._lock.acquire()  # noqa: SLF001 - a slow change holds the lock
            try:
                arrived = mapper.ext._arrivals  # noqa: SLF001
                late = asyncio.ensure_future(edgecore.call_mapper(
                    "RegisterDevice", pb.RegisterDeviceRequest(device=room("room-c"))))
                await until(lambda: mapper.ext._arrivals > arrived, timeout=10)  # noqa: SLF001 - room-c's call waits
                mapper.ext._lost.set()  # noqa: SLF001 - edgecore restarted (room-c deleted there): register again
                await edgecore.wait_for(lambda: len(edgecore.of("MapperRegister")) >= 2)
            finally:
                mapper.ext._lock.release()  # noqa: SLF001
            await late
            await registered(mapper, 2)
            assert set(mapper.ext.catalog.devices) == {("default", "room-a")}
            assert mapper.runner("room-c") is None and mapper.runner("room-a") is not None
    run(scenario())


def test_a_dmi_call_during_the_stop_starts_no_device_again(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """edgecore's RegisterDevice arrives while the mapper winds down, after its devices were stopped
    (the recorder's flush, the event bus's drain take a while): it was applied, and every device the
    stop had just stopped started again (drivers reopened) until the task group was cancelled. Now
    the call is refused (UNAVAILABLE: the mapper is stopping) and no device starts."""
    started_after_stop: list[str] = []
    stopped = asyncio.Event()
    real_start, real_stop = MapperService.start_device, MapperService.stop_devices

    def start_device(self, definition, tg, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if stopped.is_set():
            started_after_stop.append(str(definition.id))
        return real_start(self, definition, tg, **kwargs)

    refused: list[grpc.StatusCode] = []

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                await edgecore.add(room("room-a"), TEMP)

                async def stop_devices(self, ids):  # noqa: ANN001, ANN202
                    await real_stop(self, ids)
                    if ids and not stopped.is_set():  # the wind-down's stop of every device
                        stopped.set()
                        try:
                            await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=room("room-b")))
                        except grpc.aio.AioRpcError as exc:
                            refused.append(exc.code())

                monkeypatch.setattr(MapperService, "start_device", start_device)
                monkeypatch.setattr(MapperService, "stop_devices", stop_devices)
        assert stopped.is_set() and started_after_stop == [], started_after_stop
        assert refused == [grpc.StatusCode.UNAVAILABLE]

    run(scenario())


def test_a_stop_during_the_start_up_of_restored_devices_ends_cleanly(sockdir: Path) -> None:
    """SIGTERM right at the start of a mapper with a saved KubeEdge state: the restore's device
    switch, refused once the stop began, ended the mapper with a MapperStopping traceback (and cut
    its device stop and flush short). It now ends as any stop does."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                await edgecore.add(room("room-a"), TEMP)
        config = MapperConfig(mode="kubeedge", node="test-node", twin=TwinSettings(path=sockdir / "twin.db"),
                              kubeedge=settings(sockdir))
        stop = asyncio.Event()
        stop.set()  # before the restore had its first step
        async with asyncio.timeout(20):
            await build_service(config).run(stop)
    run(scenario())


def test_edgecore_down_at_start_keeps_last_known_devices(sockdir: Path) -> None:
    """Devices from the last registration run while edgecore is away; registering later restarts nothing unchanged."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            edgecore.devices = [(room("room-a"), TEMP)]
            await registered(mapper)
        async with running_mapper(sockdir) as mapper:
            async with asyncio.timeout(10):
                await mapper.ext.started.wait()
            kept = mapper.runner("room-a")
            assert kept is not None and mapper.ext.registrations == 0
            async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
                edgecore.devices = [(room("room-a"), TEMP), (switch("lamp"), SWITCH)]
                await registered(mapper)
                assert mapper.runner("room-a") is kept and mapper.runner("lamp") is not None
    run(scenario())


# -- reporting: rate limit, coalescing, formats ---------------------------------------------

def test_rate_limit_coalesces_without_losing_the_latest(sockdir: Path) -> None:
    """Many twin changes: calls stay within the bucket (edgecore refuses none) and the final values arrive."""
    rate, burst, n = 10.0, 5, 12
    freeze = sockdir / "freeze"

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock", rate=rate, burst=burst) as edgecore:
            edgecore.devices = [
                (device(f"c{i}", "count-model", {"count": {"kind": "counter"}}, cycle_ms=20,
                        config={"fail_while_exists": str(freeze)}),
                 model("count-model", {"count": ("INT", "ReadOnly")}))
                for i in range(n)
            ]
            async with running_mapper(sockdir, rate_per_s=rate, burst=burst) as mapper:
                await registered(mapper)
                await edgecore.wait_for(lambda: len(edgecore.of("ReportDeviceStatus")) >= 20)
                freeze.touch()  # every read fails from now on: the reported values stop changing
                await until(lambda: all(r.state == "unhealthy" for r in mapper.service.runners.values()))
                await mapper.service.recorder.flush()
                final = {}
                for i in range(n):
                    twin = await mapper.service.twin(lambda s, i=i: s.device(DeviceId("default", f"c{i}")))
                    final[f"c{i}"] = str(twin.properties["count"].reported)
                await edgecore.wait_for(lambda: all(
                    (s := latest_status(edgecore, name)) is not None and s.reportedDevice.twins[0].reported.value == v
                    for name, v in final.items()), timeout=20)
                states = {r.deviceName: r.state for r in edgecore.of("ReportDeviceStates")}
                await edgecore.wait_for(lambda: all(
                    {r.deviceName: r.state for r in edgecore.of("ReportDeviceStates")}.get(f"c{i}") == "unhealthy"
                    for i in range(n)), timeout=20)
                committed = mapper.service.recorder.committed
        # edgecore's own token bucket (GoLimiter, the rate and burst the mapper was given) refused
        # nothing: every call stayed within the bucket.
        assert edgecore.refused == []
        reports = len(edgecore.of("ReportDeviceStatus"))
        assert reports < committed / 2, f"{reports} reports for {committed} readings: not coalesced"
        assert states  # state reports went out while values were changing too
    run(scenario())


def with_state_report(dev: pb.Device, report_to_cloud: bool, cycle_ms: int) -> pb.Device:
    dev.status.CopyFrom(pb.DeviceStatus(reportToCloud=report_to_cloud, reportCycle=cycle_ms))
    return dev


def test_state_report_per_device(sockdir: Path) -> None:
    """spec.stateReport per device: reportToCloud false means no ReportDeviceStates (twins still go out);
    reportCycle (ms) re-sends an unchanged state at that device's cycle, not the global interval (here 1 h)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = [
                (with_state_report(switch("quiet"), False, 50), SWITCH),
                (with_state_report(switch("chatty"), True, 50), SWITCH),
                (with_state_report(switch("steady"), True, 0), SWITCH),  # 0: the global interval
            ]
            async with running_mapper(sockdir, report_interval_s=3600) as mapper:
                await registered(mapper)

                def states(name: str) -> list[str]:
                    return [r.state for r in edgecore.of("ReportDeviceStates") if r.deviceName == name]

                def repeats(name: str) -> int:
                    seen = states(name)
                    return sum(a == b for a, b in zip(seen, seen[1:], strict=False))

                # chatty's unchanged state is re-sent again and again at its 50 ms cycle.
                await edgecore.wait_for(lambda: repeats("chatty") >= 4, timeout=10)
                # Positive controls: quiet runs and its twins are reported; steady reports its state.
                await edgecore.wait_for(lambda: latest_status(edgecore, "quiet") is not None and states("steady"))
                assert mapper.runner("quiet") is not None
                assert states("quiet") == []
                assert repeats("steady") == 0, states("steady")  # only changes, no 50 ms or 1 s re-sends

                # An update turning quiet's stateReport on makes it report; turning chatty's off stops it.
                await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(
                    device=with_state_report(switch("quiet"), True, 50)))
                await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(
                    device=with_state_report(switch("chatty"), False, 50)))
                before = len(states("chatty"))
                await edgecore.wait_for(lambda: repeats("quiet") >= 3, timeout=10)
                assert len(states("chatty")) <= before + 1  # at most one already in flight
        assert edgecore.refused == []
    run(scenario())


# -- pure parts: configData, formats, limiter, socket, config -------------------------------

def test_config_data_any_wrappers_become_driver_config() -> None:
    """String/Int32/Int64/Float/Bool unpack; FloatValue 7.0 is the int 7 and 0.1 stays 0.1 (not float32 noise)."""
    from google.protobuf import duration_pb2, wrappers_pb2
    from google.protobuf.any_pb2 import Any as AnyPb

    from devices.loader import load_objects
    from mapper.dmi.convert import ConversionError, device_document, model_document, unpack_any

    def boxed(box) -> AnyPb:  # noqa: ANN001
        out = AnyPb()
        out.Pack(box)
        return out

    assert unpack_any(boxed(wrappers_pb2.StringValue(value="5502")), "x") == "5502"
    assert unpack_any(boxed(wrappers_pb2.Int32Value(value=-3)), "x") == -3
    assert unpack_any(boxed(wrappers_pb2.Int64Value(value=2**40)), "x") == 2**40
    assert unpack_any(boxed(wrappers_pb2.BoolValue(value=True)), "x") is True
    seven = unpack_any(boxed(wrappers_pb2.FloatValue(value=7.0)), "x")
    assert seven == 7 and type(seven) is int
    assert unpack_any(boxed(wrappers_pb2.FloatValue(value=0.1)), "x") == 0.1
    assert unpack_any(boxed(wrappers_pb2.FloatValue(value=21.5)), "x") == 21.5
    with pytest.raises(ConversionError, match="spec.protocol.configData.when"):
        unpack_any(boxed(duration_pb2.Duration(seconds=1)), "spec.protocol.configData.when")

    # Through the loader: the same validated driver config as from YAML.
    dev = device("d", "m", {"t": {"kind": "temperature", "base": 21.5, "resolution": 0.1}},
                 config={"seed": 7, "failure_rate": 0.25, "broken": False})
    result = load_objects([("m", model_document(model("m", {"t": ("float", "readonly")}))),
                           ("d", device_document(dev))])
    definition = result.devices[DeviceId("default", "d")]
    assert definition.protocol_config.seed == 7 and definition.protocol_config.failure_rate == 0.25
    visitor = definition.prop("t").visitor
    assert (visitor.kind, visitor.base, visitor.resolution) == ("temperature", 21.5, 0.1)
    assert definition.prop("t").type.value == "FLOAT" and not definition.prop("t").writable
    # pydantic's lax mode alone would also take 7.0 for an int field, but not 7.5:
    bad = device("d", "m", {"t": {"kind": "counter", "step": 7.5}})
    with pytest.raises(ValueError, match=r"visitors\.configData\.step"):
        load_objects([("m", model_document(model("m", {"t": ("INT", "ReadOnly")}))), ("d", device_document(bad))])


def test_a_model_property_without_a_type_is_refused_as_a_missing_field() -> None:
    """KubeEdge's CRD does not require a DeviceModel property's `type`, so edgecore may send "": the
    refusal says the field is missing, as for a local file (README, Device YAML), not that '' is an
    unknown value the user never wrote."""
    from devices.loader import load_objects
    from mapper.dmi.convert import model_document

    untyped = pb.DeviceModel(name="m", namespace="default", spec=pb.DeviceModelSpec(
        properties=[pb.ModelProperty(name="t", accessMode="ReadOnly")]))
    with pytest.raises(ValueError, match=r"spec\.properties\[0\]\.type: required field is missing"):
        load_objects([("dmi:DeviceModel default/m", model_document(untyped))])


def test_twin_values_match_edgecore_pattern() -> None:
    """Numbers never use exponents and read back as the same number (tiny ones were rounded to 10
    decimals: 1e-11 was "0", -1e-11 "-0"); unrepresentable strings are refused; no value is ""."""
    from mapper.dmi.convert import twin_value

    for value, text in [(1e5, "100000.0"), (1e-7, "0.0000001"), (-3, "-3"), (True, "true"), (24.5, "24.5"),
                        ("ON", "ON"), (None, ""), (1e16, "10000000000000000"),
                        (1e-11, "0.00000000001"), (-1e-11, "-0.00000000001"), (1.234e-10, "0.0000000001234"),
                        (5e-324, "0." + "0" * 323 + "5"), (12345678901234567890.0, "12345678901234567000")]:
        out = twin_value(value)
        assert out == text
        assert out == "" or TWIN_VALUE.match(out), out
        if isinstance(value, float):
            assert float(out) == value
    for bad in ("hello world", "100%", "a;b", "x" * 513, "température"):
        with pytest.raises(ValueError, match="pattern"):
            twin_value(bad)


def test_device_status_always_sets_both_sides() -> None:
    """Every reportToCloud twin has observedDesired and reported, even before the first reading."""
    from devices.loader import load_objects
    from mapper.dmi.convert import LeftOutLog, device_document, device_status, model_document
    from twin.records import DeviceTwin

    result = load_objects([("m", model_document(TEMP)), ("d", device_document(room("room-a")))])
    definition = result.devices[DeviceId("default", "room-a")]
    empty = DeviceTwin(definition.id, "temp-model", "simulated", "unknown", None, None, None, None, {})
    status = device_status(definition, empty, LeftOutLog())
    assert [t.propertyName for t in status.twins] == ["temperature", "humidity"]
    for t in status.twins:
        assert t.HasField("observedDesired") and t.HasField("reported")
        assert (t.observedDesired.value, t.reported.value) == ("", "")
    assert status.reportToCloud is True and status.reportCycle == 1000


def test_a_twin_edgecore_would_refuse_is_left_out_of_the_report_not_cleared(
        caplog: pytest.LogCaptureFixture) -> None:
    """edgecore handles each twin of a ReportDeviceStatus as an update of its own, and skips its
    value pattern for "": a reading it would refuse, sent as "", cleared the cloud's last good
    value. That twin is now left out (the others still go), with a warning naming the device, the
    property and the value, once however often it is refused again."""
    from devices.loader import load_objects
    from mapper.dmi.convert import LeftOutLog, device_document, device_status, model_document
    from twin.records import DeviceTwin, PropertyTwin

    left_out = LeftOutLog()
    labelled = model("label-model", {"label": ("STRING", "ReadOnly"), "temperature": ("FLOAT", "ReadOnly")})
    pb_device = device("label-left-out", "label-model", {"label": {"kind": "temperature"},
                                                        "temperature": {"kind": "temperature"}})
    result = load_objects([("m", model_document(labelled)), ("d", device_document(pb_device))])
    definition = result.devices[DeviceId("default", "label-left-out")]

    def prop(name: str, kind: str, reported: object) -> PropertyTwin:
        return PropertyTwin(name, kind, False, "", None, 0, None, reported, 1, 1700000000000, None, None, None)

    twin = DeviceTwin(definition.id, "label-model", "simulated", "ok", None, None, None, None,
                      {"label": prop("label", "STRING", "hello world"), "temperature": prop("temperature", "FLOAT", 21.5)})
    with caplog.at_level(logging.WARNING, logger="mapper.dmi"):
        status = device_status(definition, twin, left_out)
        again = device_status(definition, twin, left_out)
    assert [(t.propertyName, t.reported.value) for t in status.twins] == [("temperature", "21.5")]
    assert again == status
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "default/label-left-out" in line and "property label" in line and "'hello world'" in line
    assert "pattern" in line and "reported" in line
    # A desired value the pattern refuses (set over MQTT, where a STRING takes any text) likewise.
    wanted = DeviceTwin(definition.id, "label-model", "simulated", "ok", None, None, None, None,
                        {"label": replace(prop("label", "STRING", "ok"), desired="a;b"),
                         "temperature": prop("temperature", "FLOAT", 21.5)})
    assert [t.propertyName for t in device_status(definition, wanted, left_out).twins] == ["temperature"]


def test_states_only_those_edgecore_accepts() -> None:
    """Our states and the Go framework's map onto ok/online/offline/unknown/unhealthy."""
    from mapper.dmi.convert import edgecore_state

    mapped = {s: edgecore_state(s) for s in ("ok", "OK", "online", "offline", "unhealthy", "unknown",
                                              "disconnected", "error", "starting")}
    assert set(mapped.values()) <= EDGECORE_STATES
    assert mapped["OK"] == "ok" and mapped["disconnected"] == "offline" and mapped["starting"] == "unknown"


def test_token_bucket_burst_then_sustained_rate() -> None:
    """1/s with burst 100 (edgecore's limiter): 100 at once, then one per second."""
    from mapper.dmi.ratelimit import TokenBucket

    now = [0.0]
    bucket = TokenBucket(1.0, 100, clock=lambda: now[0])
    assert all(bucket.try_take() == 0.0 for _ in range(100))
    assert bucket.try_take() == pytest.approx(1.0)
    now[0] = 0.5
    assert bucket.try_take() == pytest.approx(0.5)
    now[0] = 1.0
    assert bucket.try_take() == 0.0 and bucket.try_take() > 0
    now[0] = 1000.0  # a long idle refills to the burst, not beyond
    assert sum(bucket.try_take() == 0.0 for _ in range(150)) == 100


def test_stale_socket_removed_other_files_kept(sockdir: Path) -> None:
    """A leftover socket file is removed before binding; a regular file at that path is never deleted."""
    import socket as socketlib

    from mapper.dmi.server import remove_stale_socket

    path = sockdir / "old.sock"
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.bind(str(path))
    remove_stale_socket(path)
    assert not path.exists()
    (sockdir / "file.sock").write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        remove_stale_socket(sockdir / "file.sock")
    assert (sockdir / "file.sock").exists()


def test_kubeedge_config_section() -> None:
    """mode: kubeedge needs the section; defaults follow KubeEdge's paths; devices may be empty."""
    config = MapperConfig.model_validate({"mode": "kubeedge", "kubeedge": {"name": "dht", "protocol": "dht"}})
    assert config.devices == []
    assert config.kubeedge.socket == Path("/etc/kubeedge/dht.sock")
    assert config.kubeedge.edgecore_socket == Path("/etc/kubeedge/dmi.sock")
    assert (config.kubeedge.rate_per_s, config.kubeedge.burst) == (1.0, 100)
    assert config.kubeedge.max_receive_mb == 64  # above gRPC's 4 MiB: see test_dmi_failures.py
    with pytest.raises(ValueError, match="kubeedge"):
        MapperConfig.model_validate({"mode": "kubeedge"})
    with pytest.raises(ValueError, match="absolute"):
        KubeEdgeSettings.model_validate({"name": "x", "protocol": "p", "socket": "x.sock"})
    with pytest.raises(ValueError, match="107"):
        KubeEdgeSettings.model_validate({"name": "x", "protocol": "p", "socket": "/" + "a" * 120})
    # Short enough itself, but bound first at <dir>/.dmi-XXXXXXXX/s.sock, which is not.
    with pytest.raises(ValueError, match="its directory is longer than 86 bytes"):
        KubeEdgeSettings.model_validate({"name": "x", "protocol": "p", "socket": "/" + "d" * 97 + "/dht.sock"})
    assert KubeEdgeSettings.model_validate(
        {"name": "x", "protocol": "p", "socket": "/" + "d" * 85 + "/dht.sock"}).socket.name == "dht.sock"


def test_dht_device_over_dmi_equals_yaml() -> None:
    """The deployed DHT11 Device, sent the way edgecore does (FloatValue numbers), validates to the YAML's config."""
    import yaml

    from devices.loader import load, load_objects
    from dmi_edgecore import from_crd, model_from_crd
    from mapper.dmi.convert import device_document, model_document

    path = Path(__file__).parents[1] / "deploy" / "kubeedge" / "room-sensor-dht.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    over_dmi = load_objects([("m", model_document(model_from_crd(docs["DeviceModel"]), "dht")),
                             ("d", device_document(from_crd(docs["Device"])))])
    from_yaml = load([path])
    key = DeviceId("default", "room-sensor-pi")
    dmi, ref = over_dmi.devices[key], from_yaml.devices[key]
    assert dmi.protocol_config == ref.protocol_config
    assert dmi.properties == ref.properties


def test_a_running_device_keeps_its_pin_through_its_own_update() -> None:
    """The holder of GPIO4 is updated (only its collectCycle) while another device waits for the pin:
    the holder keeps it. Two running devices where one's update reaches for the other's pin: the
    one that did not change keeps it. (An updated holder used to be ranked with the newcomers.)"""
    from mapper.dmi.catalog import Catalog

    def dht_on(name: str, pin: int, cycle_ms: int = 3000) -> pb.Device:
        return device(name, "dht-model", {"temperature": {"measurement": "temperature"},
                                          "humidity": {"measurement": "humidity"}},
                      config={"sensor": "DHT11", "pin": pin}, protocol="dht", cycle_ms=cycle_ms)

    catalog = Catalog("dht")
    catalog.put_model(DHT)
    catalog.put_device(dht_on("z-first", 4))
    assert set(catalog.build().devices) == {DeviceId("default", "z-first")}
    catalog.put_device(dht_on("a-second", 4))  # sorts first by name, but waits: the pin is held
    assert set(catalog.build().devices) == {DeviceId("default", "z-first")}
    catalog.put_device(dht_on("z-first", 4, cycle_ms=5000))  # the holder's own update
    assert set(catalog.build().devices) == {DeviceId("default", "z-first")}
    assert ("default", "a-second") in catalog.conflicts

    catalog.put_device(dht_on("b-other", 5))
    assert DeviceId("default", "b-other") in catalog.build().devices
    catalog.put_device(dht_on("z-first", 5))  # reaches for the pin b-other holds: b-other keeps it
    assert set(catalog.build().devices) == {DeviceId("default", "b-other"), DeviceId("default", "a-second")}
    assert ("default", "z-first") in catalog.conflicts


def test_a_device_for_a_protocol_without_a_driver_is_refused(sockdir: Path) -> None:
    """RegisterDevice of a device whose protocol has no driver installed here: INVALID_ARGUMENT
    naming the protocol (it used to return OK and then never run)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            other = device("other", "temp-model", {"temperature": {"kind": "temperature"}}, protocol="acme-fieldbus")
            assert "no driver installed for protocol 'acme-fieldbus'" in await refused_as_invalid(edgecore, other)
            assert mapper.runner("other") is None and mapper.runner("room-a") is not None
    run(scenario())


def test_a_report_waiting_for_its_token_is_dropped_when_its_device_is_removed(sockdir: Path) -> None:
    """A report queued behind the node's rate limit, whose device is removed meanwhile, is not
    sent once the token comes (it used to go out with the values it had queued)."""
    import time

    def about_room_a(edgecore: FakeEdgecore) -> int:
        return len([r for r in edgecore.of("ReportDeviceStatus") if r.deviceName == "room-a"]) + len(
            [r for r in edgecore.of("ReportDeviceStates") if r.deviceName == "room-a"])

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            await edgecore.wait_for(lambda: latest_status(edgecore, "room-a") is not None)
            bucket = mapper.ext.client.bucket
            now = [time.monotonic()]
            bucket._clock = lambda: now[0]  # noqa: SLF001 - time stands still for the bucket: no token comes
            bucket._tokens, bucket._updated = 0.0, now[0]  # noqa: SLF001
            waiting = asyncio.Event()
            take = bucket.take

            async def take_and_tell() -> None:
                waiting.set()
                await take()

            bucket.take = take_and_tell
            await asyncio.wait_for(waiting.wait(), 10)  # the next room-a report waits for its token
            sent = about_room_a(edgecore)
            await edgecore.remove("room-a")
            await edgecore.add(room("room-b"), TEMP)
            now[0] += 1000.0  # tokens again
            await edgecore.wait_for(lambda: latest_status(edgecore, "room-b") is not None, timeout=10)
            assert about_room_a(edgecore) == sent
    run(scenario())


def test_a_number_beyond_int64_in_config_data_runs_and_blocks_nothing(sockdir: Path) -> None:
    """edgecore sends every CRD number as a FloatValue: `seed: 100000000000000000000` arrives as
    1e20, an integral float beyond int64. The device runs and the next device still registers (its
    fingerprint raised TypeError: every later RegisterDevice/UpdateDevice failed with UNKNOWN)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(room("room-a"), TEMP)
            big = room("big")
            big.spec.protocol.configData.data["seed"].CopyFrom(packed(1e20))
            await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=big))
            await edgecore.call_mapper("RegisterDevice", pb.RegisterDeviceRequest(device=room("room-c")))
            assert mapper.runner("big").definition.protocol_config.seed > 2**64  # 1e20 as a float32 carries it
            assert mapper.runner("room-a") is not None and mapper.runner("room-c") is not None
            assert "room-c" in mapper.ext.state_path.read_text()
    run(scenario())


def test_edgecore_hears_a_running_device_stop_when_an_update_invalidates_it(sockdir: Path) -> None:
    """A model update that removes a property a running device uses stops the device: the
    UpdateDeviceModel call says so (INVALID_ARGUMENT naming the device and the property) and
    edgecore is told the device is offline (its last state stayed ok for good); restoring the
    model starts it again and reports ok. An invalid UpdateDevice is reported offline too."""
    def states(edgecore: FakeEdgecore, name: str) -> list[str]:
        return [r.state for r in edgecore.of("ReportDeviceStates") if r.deviceName == name]

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(switch("lamp"), SWITCH)
            await edgecore.add(room("room-a"), TEMP)
            await edgecore.wait_for(lambda: states(edgecore, "lamp")[-1:] == ["ok"]
                                    and states(edgecore, "room-a")[-1:] == ["ok"])
            broken = model("switch-model", {"other": ("BOOLEAN", "ReadWrite")})
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await edgecore.call_mapper("UpdateDeviceModel", pb.UpdateDeviceModelRequest(model=broken))
            assert grpc_code(refused) == grpc.StatusCode.INVALID_ARGUMENT
            assert "default/lamp" in refused.value.details() and "'power'" in refused.value.details()
            assert mapper.runner("lamp") is None
            await edgecore.wait_for(lambda: states(edgecore, "lamp")[-1:] == ["offline"])

            await edgecore.call_mapper("UpdateDeviceModel", pb.UpdateDeviceModelRequest(model=SWITCH))
            assert mapper.runner("lamp") is not None
            await edgecore.wait_for(lambda: states(edgecore, "lamp")[-1:] == ["ok"])

            bad = room("room-a")
            bad.spec.protocol.configData.data["failure_rate"].CopyFrom(packed(5))
            assert "failure_rate" in await refused_as_invalid(edgecore, bad)
            await edgecore.wait_for(lambda: states(edgecore, "room-a")[-1:] == ["offline"])
            # Removed by edgecore: not reported any more.
            await edgecore.remove("room-a")
            assert ("default", "room-a") not in mapper.ext.catalog.devices
            assert DeviceId("default", "room-a") not in mapper.ext.reporter.state_every
    run(scenario())


def test_get_device_never_reports_an_out_of_range_reading(sockdir: Path) -> None:
    """GetDevice's fresh read of a value outside the model's range is not `reported` (it was, while
    the twin and every ReportDeviceStatus kept it out): reported stays the twin's last good value."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            ranged = pb.DeviceModel(name="c-model", namespace="default", spec=pb.DeviceModelSpec(properties=[
                pb.ModelProperty(name=n, type="FLOAT", accessMode="ReadOnly", minimum="0", maximum="10")
                for n in ("hot", "fine")]))
            await edgecore.add(device("c", "c-model", {"hot": {"kind": "constant", "value": 42.0},
                                                       "fine": {"kind": "constant", "value": 5.0}}), ranged)
            reply = await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="c",
                                                                                deviceNamespace="default"))
            reported = {t.propertyName: t.reported.value for t in reply.device.status.twins}
            assert reported == {"hot": "", "fine": "5.0"}, reported
    run(scenario())


LABELLED = model("label-model", {"label": ("STRING", "ReadOnly"), "temperature": ("FLOAT", "ReadOnly")})


def labelled(name: str) -> pb.Device:
    """A device whose STRING property reads a value edgecore's twin pattern refuses (a space)."""
    return device(name, "label-model", {"label": {"kind": "constant", "value": "hello world"},
                                        "temperature": {"kind": "constant", "value": 21.5}})


def left_out_lines(caplog: pytest.LogCaptureFixture, what: str, name: str) -> list[str]:
    return [m for r in caplog.records if f"left out of {what}" in (m := r.getMessage()) and f"default/{name}:" in m]


def test_get_device_leaves_out_a_twin_edgecore_would_refuse(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """GetDevice left a value edgecore's pattern refuses as "" (with a warning at every call), where
    ReportDeviceStatus leaves that twin out: a caller copying the answer into a report cleared the
    cloud's last good value. Left out here too now, with one warning for repeated calls."""
    caplog.set_level(logging.WARNING, logger="mapper.dmi")

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(labelled("tag"), LABELLED)
            for _ in range(3):
                reply = await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="tag",
                                                                                    deviceNamespace="default"))
                twins = [(t.propertyName, t.reported.value) for t in reply.device.status.twins]
                assert twins == [("temperature", "21.5")], twins
        (line,) = left_out_lines(caplog, "GetDevice's answer", "tag")
        assert "property label" in line and "'hello world'" in line and "pattern" in line
        assert not [r for r in caplog.records if "not reported" in r.getMessage()]
    run(scenario())


def test_a_left_out_twin_is_warned_about_again_once_its_device_is_back(
        sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The left-out warnings were throttled in module state (10 min per device and property): a
    device removed by edgecore and created again was not warned about, and two mappers in one
    process (these tests) silenced each other. The mapper's reporter holds them now, and forgets
    a removed device's."""
    caplog.set_level(logging.WARNING, logger="mapper.dmi")
    report = "the twin report to edgecore"

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            await edgecore.add(labelled("tag"), LABELLED)
            await edgecore.wait_for(lambda: latest_status(edgecore, "tag"))
            assert len(left_out_lines(caplog, report, "tag")) == 1
            assert [t.propertyName for t in latest_status(edgecore, "tag").reportedDevice.twins] == ["temperature"]
            await edgecore.remove("tag")
            assert DeviceId("default", "tag") not in mapper.ext.reporter.left_out
            await edgecore.add(labelled("tag"), LABELLED)
            await until(lambda: len(left_out_lines(caplog, report, "tag")) == 2)
            first = mapper.ext.reporter.left_out

        # Another mapper in this process (a restart): its own warnings.
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            assert mapper.ext.reporter.left_out is not first
            await registered(mapper)
            await edgecore.add(labelled("tag"), LABELLED)
            # (>=: the device restored from the first one's state file may be reported before the registration too)
            await until(lambda: len(left_out_lines(caplog, report, "tag")) >= 3)
    run(scenario())


def test_refusals_of_huge_input_stay_readable(sockdir: Path) -> None:
    """A 200,000-character name, or a device with thousands of bad properties, is refused with its
    own status and a bounded message (the whole name went into the status details, past gRPC's
    16 KiB metadata limit: edgecore saw RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit')."""
    huge = "x" * 200_000

    async def refused(method: str, request: object) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as exc_info:
            await edgecore_ref[0].call_mapper(method, request)
        assert len(exc_info.value.details().encode()) <= 4096, len(exc_info.value.details())
        return exc_info.value

    edgecore_ref: list[FakeEdgecore] = []

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            edgecore_ref.append(edgecore)
            await registered(mapper)
            await edgecore.add(switch("lamp"), SWITCH)
            err = await refused("RegisterDevice", pb.RegisterDeviceRequest(device=switch(huge)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid name" in err.details()
            spaced = switch("lamp-2", namespace="N" * 200_000)
            err = await refused("RegisterDevice", pb.RegisterDeviceRequest(device=spaced))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid namespace" in err.details()
            err = await refused("GetDevice", pb.GetDeviceRequest(deviceName=huge, deviceNamespace="default"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            many = device("many", "switch-model", {f"Bad Name {i}": {"kind": "switch"} for i in range(2000)})
            err = await refused("RegisterDevice", pb.RegisterDeviceRequest(device=many))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "Bad Name 0" in err.details()
            assert mapper.runner("lamp") is not None
    run(scenario())


def test_a_model_is_validated_when_it_arrives(sockdir: Path) -> None:
    """CreateDeviceModel of a model whose name or namespace is no Kubernetes name is refused and not
    kept (it was kept and saved, and the call returned OK); a model with a bad property is
    INVALID_ARGUMENT naming the field, and kept, so its devices say what is wrong with it."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            await registered(mapper)
            for bad in (model("A/B", {"p": ("INT", "ReadOnly")}), model("x" * 200_000, {}),
                        model("ok-model", {}, namespace="Lab")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await edgecore.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=bad))
                assert grpc_code(refused) == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid" in refused.value.details() and len(refused.value.details()) < 1000
            assert mapper.ext.catalog.models == {}
            typo = model("switch-model", {"power": ("BOOL", "ReadWrite")})
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await edgecore.call_mapper("CreateDeviceModel", pb.CreateDeviceModelRequest(model=typo))
            assert grpc_code(refused) == grpc.StatusCode.INVALID_ARGUMENT
            assert "spec.properties[0].type" in refused.value.details() and "'BOOL'" in refused.value.details()
            assert "spec.properties[0].type" in await refused_as_invalid(edgecore, switch("lamp"))
            await edgecore.call_mapper("UpdateDeviceModel", pb.UpdateDeviceModelRequest(model=SWITCH))
            assert mapper.runner("lamp") is not None
            assert "A/B" not in mapper.ext.state_path.read_text()
    run(scenario())


def test_saved_devices_of_another_protocol_are_not_restored(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The state file holds the devices edgecore gave a mapper of protocol `simulated`; restarted
    with `kubeedge.protocol: dht` (edgecore away), the mapper does not run them (it did, until
    edgecore answered: devices no longer routed to it, on pins another mapper may hold)."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            edgecore.devices = [(room("room-a"), TEMP)]
            await registered(mapper)
            assert mapper.runner("room-a") is not None
        async with running_mapper(sockdir, name="dht", protocol="dht") as mapper:
            async with asyncio.timeout(10):
                await mapper.ext.started.wait()
            assert mapper.service.runners == {} and mapper.ext.catalog.devices == {}
        async with running_mapper(sockdir) as mapper:  # positive control: the same file, the same protocol
            async with asyncio.timeout(10):
                await mapper.ext.started.wait()
            assert mapper.runner("room-a") is not None
    run(scenario())
    assert "protocol 'simulated'" in caplog.text


def test_an_edgecore_restart_while_its_reply_is_adopted_is_noticed(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """edgecore restarts while the mapper is still adopting its registration reply (a slow start
    of many devices): the mapper registers with the new edgecore (it took the new socket for the
    one it had registered with, and never registered again)."""
    monkeypatch.setattr(ext_module, "WATCH_INTERVAL_S", 0.05)

    async def scenario() -> None:
        first, second = FakeEdgecore(sockdir / "dmi.sock"), FakeEdgecore(sockdir / "dmi.sock")
        second.devices = [(switch("lamp"), SWITCH)]
        try:
            async with running_mapper(sockdir) as mapper:
                adopt = mapper.ext._adopt  # noqa: SLF001

                async def restart_during_adopt(reply: pb.MapperRegisterResponse) -> None:
                    if not second.calls:  # the first edgecore's reply: it restarts meanwhile
                        await first.__aexit__(None, None, None)
                        await second.__aenter__()
                    await adopt(reply)

                mapper.ext._adopt = restart_during_adopt  # noqa: SLF001
                await first.__aenter__()  # the mapper has been retrying MapperRegister until now
                await registered(mapper, 2)
                assert len(first.of("MapperRegister")) == 1 and len(second.of("MapperRegister")) == 1
                assert mapper.runner("lamp") is not None
        finally:
            if second._server is not None:  # noqa: SLF001 - started by the restart above
                await second.__aexit__(None, None, None)
    run(scenario())


# -- a local YAML device and an edgecore device of the same namespace/name --------------------

LAMP_LOCAL = ("{name: temperature, type: FLOAT, accessMode: ReadOnly, minimum: -40, maximum: 85}",
              "{kind: temperature, base: 21.5}")
LAMP_RW = model("lamp-rw", {"temperature": ("FLOAT", "ReadWrite")})


def edge_lamp(name: str = "lamp") -> pb.Device:
    # (kind constant: it reads back what was written; a simulated `temperature` runs ReadOnly)
    return device(name, "lamp-rw", {"temperature": {"kind": "constant", "value": 30.0}}, config={"seed": 3})


@contextlib.asynccontextmanager
async def mapper_with_local(sockdir: Path, local: Path) -> AsyncIterator[tuple[Mapper, MapperConfig]]:
    config = MapperConfig(mode="kubeedge", node="test-node", devices=[local],
                          twin=TwinSettings(path=sockdir / "twin.db"), kubeedge=settings(sockdir))
    async with service_running(config) as mapper:
        yield mapper, config


@contextlib.asynccontextmanager
async def edgecore_lamp_running(sockdir: Path) -> AsyncIterator[tuple[FakeEdgecore, Mapper, MapperConfig, Path, object]]:
    """A mapper with one local YAML device (yaml-one), registered with edgecore, running edgecore's
    default/lamp (temperature ReadWrite): (edgecore, mapper, config, the local YAML directory, lamp's runner)."""
    from helpers import write_devices

    local = write_devices(sockdir / "yaml", ["yaml-one"], cycle=100)
    async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, mapper_with_local(sockdir, local) as (mapper, config):
        await registered(mapper)
        await edgecore.add(edge_lamp(), LAMP_RW)
        yield edgecore, mapper, config, local, mapper.runner("lamp")


def assert_local_lamp(mapper: Mapper, local_file: Path, name: str = "lamp") -> None:
    """The running default/<name> is the local YAML device: temperature ReadOnly, and the twin refuses a desired value."""
    definition = mapper.service.definitions.devices[DeviceId("default", name)]
    assert definition.source.startswith(f"{local_file}:"), definition.source
    assert not definition.prop("temperature").writable
    with pytest.raises(ValueError, match="ReadOnly"):
        definition.desired_value("temperature", 30)
    problem = mapper.ext.catalog.problems[("default", name)]
    assert f"{local_file}:" in problem and "local device wins" in problem, problem


def test_an_edgecore_device_cannot_replace_a_local_yaml_device_of_the_same_name(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A local default/lamp (temperature ReadOnly). edgecore sends default/lamp with a model making
    temperature ReadWrite: in its registration reply, then by RegisterDevice and UpdateDevice. The
    local device keeps running as it is defined (its model, a desired value still refused), the
    calls fail FAILED_PRECONDITION naming the local file and line, edgecore hears its lamp is
    offline and gets none of the local lamp's twins; after a mapper restart (the state file holds
    edgecore's lamp) the local lamp still wins, before and after registration. (edgecore's device
    silently replaced the local one, writability, ranges and driver config included.)"""
    from helpers import one_property_device
    from twin.store import NotWritable

    async def scenario() -> None:
        local = sockdir / "yaml"
        local.mkdir()
        lamp_file = local / "lamp.yaml"
        lamp_file.write_text(one_property_device("lamp", LAMP_LOCAL[0], LAMP_LOCAL[1], settings="collectCycle: 50"))
        lamp_id = DeviceId("default", "lamp")

        async def desired_refused(mapper: Mapper) -> None:
            with pytest.raises(NotWritable):
                await mapper.service.twin(lambda s: s.set_desired(lamp_id, "temperature", 30))

        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = [(edge_lamp(), LAMP_RW), (room("room-a"), TEMP)]
            async with mapper_with_local(sockdir, local) as (mapper, _):
                await registered(mapper)
                assert mapper.runner("room-a") is not None, "the other devices of the reply run"
                local_runner = mapper.runner("lamp")
                assert local_runner is not None
                assert_local_lamp(mapper, lamp_file)
                await desired_refused(mapper)

                for method, request in (("RegisterDevice", pb.RegisterDeviceRequest(device=edge_lamp())),
                                        ("UpdateDevice", pb.UpdateDeviceRequest(device=edge_lamp()))):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await edgecore.call_mapper(method, request)
                    assert grpc_code(refused) == grpc.StatusCode.FAILED_PRECONDITION, method
                    assert f"{lamp_file}:" in refused.value.details(), refused.value.details()
                    assert mapper.runner("lamp") is local_runner, "the local device must not restart"
                    assert_local_lamp(mapper, lamp_file)
                    await desired_refused(mapper)
                with pytest.raises(grpc.aio.AioRpcError) as get:
                    await edgecore.call_mapper("GetDevice", pb.GetDeviceRequest(deviceName="lamp",
                                                                                deviceNamespace="default"))
                assert grpc_code(get) == grpc.StatusCode.FAILED_PRECONDITION

                await edgecore.wait_for(lambda: any(r.deviceName == "lamp" and r.state == "offline"
                                                    for r in edgecore.of("ReportDeviceStates")))
                await edgecore.wait_for(lambda: latest_status(edgecore, "room-a") is not None)
                assert latest_status(edgecore, "lamp") is None, "the local lamp's twins are not edgecore's"
                assert {r.state for r in edgecore.of("ReportDeviceStates") if r.deviceName == "lamp"} == {"offline"}
                # Logged once by the catalog (each refused call is logged as a refusal besides).
                said = [r for r in caplog.records if r.name == "mapper.dmi" and "local device wins" in r.getMessage()
                        and r.getMessage().startswith("device default/lamp from edgecore is not started")]
                assert len(said) == 1, [r.getMessage() for r in said]

            # Restarted: the state file holds edgecore's lamp; the local one wins at the restore too.
            assert "lamp-rw" in (sockdir / "twin.db.kubeedge.json").read_text()
            async with mapper_with_local(sockdir, local) as (mapper, _):
                async with asyncio.timeout(10):
                    await mapper.ext.started.wait()
                assert_local_lamp(mapper, lamp_file)
                await desired_refused(mapper)
                await registered(mapper)
                assert_local_lamp(mapper, lamp_file)
                await desired_refused(mapper)
    run(scenario())


def test_a_reload_adding_a_local_device_with_a_running_edgecore_devices_name_stops_that_one(sockdir: Path) -> None:
    """edgecore's default/lamp runs; a SIGHUP reload adds a local default/lamp: the local device wins
    (as at a start with both), edgecore's stops, is kept and reported offline; removing the local
    file again starts edgecore's lamp."""
    from helpers import one_property_device
    from mapper.cli import reload_devices

    async def scenario() -> None:
        async with edgecore_lamp_running(sockdir) as (edgecore, mapper, config, local, edge_runner):
            assert edge_runner is not None and edge_runner.definition.prop("temperature").writable

            lamp_file = local / "lamp.yaml"
            lamp_file.write_text(one_property_device("lamp", LAMP_LOCAL[0], LAMP_LOCAL[1], settings="collectCycle: 50"))
            assert await reload_devices(mapper.service, config)
            assert mapper.runner("lamp") is not None and mapper.runner("lamp") is not edge_runner
            assert_local_lamp(mapper, lamp_file)
            assert ("default", "lamp") in mapper.ext.catalog.devices, "kept: edgecore still counts it as ours"
            await edgecore.wait_for(lambda: any(r.deviceName == "lamp" and r.state == "offline"
                                                for r in edgecore.of("ReportDeviceStates")))

            lamp_file.unlink()
            assert await reload_devices(mapper.service, config)
            assert mapper.runner("lamp").definition.source.startswith("dmi:")
            assert mapper.runner("lamp").definition.prop("temperature").writable
            assert ("default", "lamp") not in mapper.ext.catalog.problems
    run(scenario())


def test_a_local_device_shadowing_an_edgecore_device_keeps_its_pins() -> None:
    """The claims pass holds every local device, also one an edgecore device of the same name shadows
    (it was left out, so another edgecore device could take its pin)."""
    from devices.loader import load_objects
    from mapper.dmi.catalog import Catalog
    from mapper.dmi.convert import device_document, model_document

    local = load_objects([("local.yaml", model_document(DHT, "dht")),
                          ("local.yaml", {**device_document(dht("shared", 4)), "metadata": {"name": "shared"}})])
    catalog = Catalog("dht")
    catalog.replace([dht("shared", 5), dht("edge-x", 4)], [DHT, DHT])
    built = catalog.build(local)
    assert set(built.devices) == set()
    assert catalog.shadowed == {("default", "shared"): local.devices[DeviceId("default", "shared")].source}
    assert "local device wins" in catalog.problems[("default", "shared")]
    assert "gpio:4 is already used by device default/shared (local.yaml" in catalog.problems[("default", "edge-x")]


LAMP_LOCAL_RW = ("{name: temperature, type: FLOAT, accessMode: ReadWrite, minimum: -40, maximum: 85}",
                 "{kind: constant, value: 21.5}")


def test_a_local_device_taking_over_an_edgecore_devices_name_does_not_inherit_its_desired_values(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """edgecore's default/lamp (temperature ReadWrite) runs and gets desired 77.0 (its write fails, so
    it stays pending); a SIGHUP reload adds a local lamp.yaml with temperature ReadWrite too. The
    local device runs with no desired temperature (a new version: nothing stale is applied) and is
    never written 77; the drop is logged once. With `desired:` in the YAML, that value is the desired
    one. Removing the file again: edgecore's lamp does not inherit the operator's desired value.
    (The twin, keyed by namespace/name only, kept 77.0 and the local device applied it: whoever may
    create Devices decided what the operator's device was driven to.)"""
    from helpers import one_property_device
    from mapper.cli import reload_devices

    lamp_id = DeviceId("default", "lamp")

    async def scenario() -> None:
        async with edgecore_lamp_running(sockdir) as (edgecore, mapper, config, local, edge_runner):
            assert edge_runner is not None and edge_runner.definition.source.startswith("dmi:")
            edge_runner.driver.set_broken(True)  # its write fails: 77.0 stays pending
            _, version = await mapper.service.twin(lambda s: s.set_desired(lamp_id, "temperature", 77.0))
            mapper.service.desired_changed()
            # Handed to edgecore's lamp (whose write then fails).
            await until(lambda: "temperature" in edge_runner._desired_seen, timeout=10)  # noqa: SLF001
            twin = await mapper.service.twin(lambda s: s.device(lamp_id))
            assert twin.properties["temperature"].desired == 77.0

            written: list[object] = []
            lamp_file = local / "lamp.yaml"
            lamp_file.write_text(one_property_device("lamp", *LAMP_LOCAL_RW, settings="collectCycle: 50"))
            assert await reload_devices(mapper.service, config)
            local_runner = mapper.runner("lamp")
            assert local_runner is not None and local_runner is not edge_runner
            assert local_runner.definition.source.startswith(f"{lamp_file}:")
            assert local_runner.definition.prop("temperature").writable
            real_write = local_runner.driver.write
            local_runner.driver.write = lambda prop, value: (written.append(value), real_write(prop, value))[1]
            twin = await mapper.service.twin(lambda s: s.device(lamp_id))
            temperature = twin.properties["temperature"]
            assert temperature.desired is None
            assert temperature.desired_version > version, "a new version: nothing stale is applied"
            assert not [c for c in await mapper.service.twin(lambda s: s.pending_desired()) if c.device_id == lamp_id]
            mapper.service.desired_changed()
            await asyncio.sleep(0.5)
            assert written == []
            assert 77.0 not in [v for _, v, _ in await mapper.service.twin(
                lambda s: s.history(lamp_id, "temperature", 50))]
            said = [r.getMessage() for r in caplog.records if "desired values set for that device are dropped"
                    in r.getMessage()]
            assert len(said) == 1 and "default/lamp" in said[0] and "77.0" in said[0], said
            # Reloaded again unchanged: nothing more is dropped or logged.
            await mapper.service.twin(lambda s: s.set_desired(lamp_id, "temperature", 20.0))
            assert await reload_devices(mapper.service, config)
            assert (await mapper.service.twin(lambda s: s.device(lamp_id))).properties["temperature"].desired == 20.0
            said = [r for r in caplog.records if "desired values set for that device are dropped" in r.getMessage()]
            assert len(said) == 1

            # The other way: the local file goes, edgecore's lamp takes the name back and does not
            # inherit the operator's desired value.
            lamp_file.unlink()
            assert await reload_devices(mapper.service, config)
            assert mapper.runner("lamp").definition.source.startswith("dmi:")
            assert (await mapper.service.twin(lambda s: s.device(lamp_id))).properties["temperature"].desired is None

            # A local file with a `desired:` gives the device that value.
            lamp_file.write_text(one_property_device("lamp", *LAMP_LOCAL_RW,
                                                     settings="collectCycle: 50\ndesired: {value: '42.5'}"))
            await mapper.service.twin(lambda s: s.set_desired(lamp_id, "temperature", 66.0))
            assert await reload_devices(mapper.service, config)
            assert mapper.runner("lamp").definition.source.startswith(f"{lamp_file}:")
            assert (await mapper.service.twin(lambda s: s.device(lamp_id))).properties["temperature"].desired == 42.5
    run(scenario())
