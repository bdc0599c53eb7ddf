"""The `ds18b20` driver reading a DS18B20 through w1-therm's sysfs files.

Where the fake sits: the kernel's w1 devices directory is the hardware boundary. Each test
points `configData.w1_dir` at a temporary directory laid out as /sys/bus/w1/devices is
(`w1_bus_master1`, one `28-...` directory a sensor with its `w1_slave`), and writes there what
the kernel shows for each case: a good reading, a failed CRC, the power-on 85000, all zeros, the
directory gone. Everything above it (the driver, the device loop, the twin, the broker) is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from devices.drivers.base import load_driver
from devices.drivers.ds18b20 import Ds18b20Driver, W1ReadError
from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import load
from eventbus.topics import Topics
from helpers import async_wait_for, running_service, write_config
from mapper.config import load_config
from twin.store import TwinStore

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "devices/examples/pi/water-temperature-ds18b20.yaml"
EXAMPLE_ID = DeviceId("default", "water-temperature-pi")
SENSOR = "28-3c01d607e4a1"
PROBE = DeviceId("default", "water-temperature-pi")
SCRATCHPAD = "72 01 4b 46 7f ff 0e 10 57"


def w1_slave(millidegrees: int, *, crc: str = "YES", scratchpad: str = SCRATCHPAD) -> str:
    """What the kernel's w1_slave shows after one read."""
    return f"{scratchpad} : crc={scratchpad.split()[-1]} {crc}\n{scratchpad} t={millidegrees}\n"


class W1Bus:
    """A w1 devices directory as the kernel lays it out, written the way the kernel changes it:
    a file replaced whole (a reader never sees half of one)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "w1_bus_master1").mkdir(parents=True)

    def show(self, text: str, sensor: str = SENSOR, name: str = "w1_slave") -> None:
        directory = self.root / sensor
        directory.mkdir(exist_ok=True)
        staged = directory / f".{name}.new"
        staged.write_text(text)
        os.replace(staged, directory / name)

    def unplug(self, sensor: str = SENSOR) -> None:
        shutil.rmtree(self.root / sensor)


def device_file(w1_dir: Path, *, collect_ms: int = 5000, timeout_s: float = 5) -> str:
    """The shipped example pointed at `w1_dir`, read every `collect_ms`."""
    text = EXAMPLE.read_text().replace("w1_dir: /sys/bus/w1/devices", f"w1_dir: {w1_dir}")
    text = text.replace("collectCycle: 5000", f"collectCycle: {collect_ms}").replace(
        "reportCycle: 10000", f"reportCycle: {collect_ms}")
    return text.replace("timeout_s: 5 ", f"timeout_s: {timeout_s:g} ")


def definition(tmp_path: Path, w1_dir: Path, **kwargs: Any):  # noqa: ANN201
    (tmp_path / "probe.yaml").write_text(device_file(w1_dir, **kwargs))
    return load([tmp_path / "probe.yaml"], base=tmp_path).devices[PROBE]


# -- the driver against the files --------------------------------------------------------------


def test_reads_w1_slave_in_degrees(tmp_path: Path) -> None:
    bus = W1Bus(tmp_path / "w1")
    bus.show(w1_slave(23125))
    defn = definition(tmp_path, bus.root)
    driver = Ds18b20Driver(defn)
    assert driver.read(defn.prop("temperature")) == 23.125
    bus.show(w1_slave(-10062))
    assert driver.read(defn.prop("temperature")) == -10.062
    assert driver.health() == "ok" and driver.measurements == 2


def test_reads_temperature_where_there_is_no_w1_slave(tmp_path: Path) -> None:
    """A kernel offering only `temperature` (millidegrees): read there; empty is a failed read."""
    bus = W1Bus(tmp_path / "w1")
    bus.show("21500\n", name="temperature")
    defn = definition(tmp_path, bus.root)
    driver = Ds18b20Driver(defn)
    assert driver.read(defn.prop("temperature")) == 21.5
    bus.show("", name="temperature")
    with pytest.raises(W1ReadError, match="temperature read 'nothing', not millidegrees") as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "garbled" and info.value.retryable


@pytest.mark.parametrize(
    ("shown", "kind", "says"),
    [
        (w1_slave(23125, crc="NO"), "crc", "CRC check failed (crc=57 NO)"),
        (w1_slave(85000), "power_on", "85.000 C, the value a DS18B20 holds from power-on"),
        (w1_slave(0, scratchpad="00 00 00 00 00 00 00 00 00"), "no_answer", "every byte read 00"),
        (w1_slave(127937), "implausible", "127.937 C is not a possible DS18B20 reading"),
        ("ff ff ff ff ff\n", "garbled", "not a w1-therm answer"),
    ],
    ids=["crc", "power_on", "no_answer", "implausible", "garbled"],
)
def test_each_bad_read_is_a_retryable_error_of_its_kind(tmp_path: Path, shown: str, kind: str, says: str) -> None:
    bus = W1Bus(tmp_path / "w1")
    bus.show(shown)
    defn = definition(tmp_path, bus.root)
    driver = Ds18b20Driver(defn)
    with pytest.raises(W1ReadError) as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == kind and info.value.retryable
    assert says in str(info.value) and str(info.value).startswith(f"default/water-temperature-pi: {SENSOR}: ")
    assert driver.health() == f"{kind} 1 since the device was opened"
    bus.show(w1_slave(23000))
    assert driver.read(defn.prop("temperature")) == 23.0
    assert driver.health() == "ok" and driver.failures == {kind: 1}


def test_a_missing_sensor_names_those_on_the_bus_and_a_missing_bus_the_overlay(tmp_path: Path) -> None:
    bus = W1Bus(tmp_path / "w1")
    bus.show(w1_slave(20000), sensor="28-0000000000aa")
    defn = definition(tmp_path, bus.root)
    driver = Ds18b20Driver(defn)
    with pytest.raises(W1ReadError) as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "missing"
    assert "the sensor is not on the 1-wire bus (unplugged, or a loose wire)" in str(info.value)
    assert "4.7 kOhm pull-up" in str(info.value)
    assert "on the bus now: 28-0000000000aa (is sensor_id one of these?)" in str(info.value)
    (bus.root / SENSOR).mkdir()  # listed, but w1-therm is not there to give it its files
    with pytest.raises(W1ReadError, match="has neither w1_slave nor temperature: the w1-therm module is not loaded"):
        driver.read(defn.prop("temperature"))
    (bus.root / SENSOR).rmdir()
    shutil.rmtree(bus.root)
    with pytest.raises(W1ReadError) as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "no_bus"
    assert f"no 1-wire bus: {bus.root} does not exist; to enable it, add dtoverlay=w1-gpio to" \
        " /boot/firmware/config.txt" in str(info.value)
    assert driver.health() == "io 1, missing 1, no_bus 1 since the device was opened"


# -- definitions -----------------------------------------------------------------------------


def test_shipped_example_validates_and_claims_its_sensor() -> None:
    defn = load([EXAMPLE]).devices[EXAMPLE_ID]
    assert defn.protocol_config.sensor_id == SENSOR
    assert defn.protocol_config.w1_dir == Path("/sys/bus/w1/devices")
    assert list(Ds18b20Driver.claims(defn)) == [(f"w1:{SENSOR}", "spec.protocol.configData.sensor_id")]
    assert load_driver("ds18b20") is Ds18b20Driver


def test_the_cli_lists_the_driver_and_validates_the_example(tmp_path: Path) -> None:
    """`mapper drivers` shows it built in, blocking with its timeout; `mapper validate` passes the
    example and names the line of a bad sensor id."""
    def mapper(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mapper", *args], capture_output=True, text=True, timeout=60,
                              cwd=REPO)

    drivers = orjson.loads(mapper("drivers", "--json").stdout)["drivers"]
    assert {"protocol": "ds18b20", "driver": "devices.drivers.ds18b20:Ds18b20Driver", "package": None,
            "version": None, "builtin": True, "error": None, "blocking": True, "timeoutS": 5.0,
            "writes": False, "warnings": []} in drivers, drivers
    checked = mapper("validate", str(EXAMPLE))
    assert checked.returncode == 0 and checked.stdout.startswith("ok: 1 device(s), 1 model(s)"), checked
    bad = tmp_path / "probe.yaml"
    bad.write_text(EXAMPLE.read_text().replace(f"sensor_id: {SENSOR}", "sensor_id: 28-xyz"))
    refused = mapper("validate", str(bad))
    assert refused.returncode == 1, refused
    assert f"{bad}:{line_of(bad, 'sensor_id: 28-xyz')}: spec.protocol.configData.sensor_id: '28-xyz' is not a" \
        " 1-wire temperature sensor's id" in refused.stderr, refused.stderr


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (f"sensor_id: {SENSOR}", "sensor_id: 28-3c01d6", "configData.sensor_id: '28-3c01d6' is not a"
         " 1-wire temperature sensor's id: a DS18B20's is 28- and 12 hex digits, such as 28-3c01d607e4a1, as"
         " `ls /sys/bus/w1/devices` lists it"),
        ("timeout_s: 5 ", "timeout_s: 0 ", "configData.timeout_s: must be > 0"),
        ("w1_dir: ", "w1_path: ", "configData.w1_path: unknown field"),
        ("w1_dir: /sys/bus/w1/devices", "w1_dir: sys/bus/w1/devices", "configData.w1_dir: 'sys/bus/w1/devices' is"
         " relative: give the absolute path (the kernel's is /sys/bus/w1/devices)"),
    ],
)
def test_config_errors_name_file_line_and_fix(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(EXAMPLE.read_text().replace(old, new))
    with pytest.raises(DefinitionError) as info:
        load([path], base=tmp_path)
    assert f"probe.yaml:{line_of(path, new.strip())}: spec.protocol.{message}" in str(info.value)


def test_a_collect_cycle_shorter_than_a_read_is_a_warning_at_its_line(tmp_path: Path) -> None:
    """The example's 5000 draws none; 500 (shorter than the ~750 ms read) runs, with a warning."""
    assert load([EXAMPLE]).warnings == []
    path = tmp_path / "probe.yaml"
    path.write_text(EXAMPLE.read_text().replace("collectCycle: 5000", "collectCycle: 500"))
    result = load([path], base=tmp_path)
    assert PROBE in result.devices
    assert [str(w) for w in result.warnings] == [
        f"probe.yaml:{line_of(path, 'collectCycle: 500')}: spec.properties[0].collectCycle: a DS18B20 measures at"
        " each read, which takes about 750 ms: at a collectCycle of 500 ms the reads of 'temperature' follow one"
        " another without a pause and hold the 1-wire bus; set collectCycle: 1000 or more"]


def test_an_id_as_printed_on_a_label_is_the_kernels_lower_case(tmp_path: Path) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(EXAMPLE.read_text().replace(f"sensor_id: {SENSOR}", f"sensor_id: {SENSOR.upper()}"))
    assert load([path], base=tmp_path).devices[PROBE].protocol_config.sensor_id == SENSOR


def test_an_int_property_and_two_devices_on_one_sensor_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(EXAMPLE.read_text().replace("type: FLOAT", "type: INT"))
    with pytest.raises(DefinitionError, match="a DS18B20 reports its temperature in sixteenths of a degree: property"
                                              " 'temperature' must be FLOAT or DOUBLE"):
        load([tmp_path], base=tmp_path)
    model, device = EXAMPLE.read_text().split("---\n")
    (tmp_path / "a.yaml").write_text(model + "---\n" + device)
    (tmp_path / "b.yaml").write_text(device.replace("name: water-temperature-pi", "name: second-probe"))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert "configData.sensor_id" in str(info.value) and f"w1:{SENSOR}" in str(info.value)


# -- in a running mapper: device loop, twin, broker ---------------------------------------------


def twin_of(config: Any):  # noqa: ANN201
    with TwinStore.open(config.twin.path) as store:
        return store.device(PROBE)


class Received:
    """The probe's messages on one topic, awaited without blocking the loop the mapper runs in."""

    def __init__(self, probe: Any, topic: str) -> None:
        self.probe, self.topic = probe, topic

    async def next(self, check: Callable[[dict], bool], what: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.probe.messages.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.02)
                continue
            if message.topic == self.topic and check(body := orjson.loads(message.payload)):
                return body
        raise AssertionError(f"no {what} on {self.topic} within {timeout} s")


@pytest.fixture
def mapper_config(tmp_path: Path, broker: Any) -> Callable[..., Any]:
    from mapper_proc import mqtt_block

    def make(w1_dir: Path, **kwargs: Any) -> Any:
        devices = tmp_path / "devices"
        devices.mkdir(exist_ok=True)
        (devices / "probe.yaml").write_text(device_file(w1_dir, collect_ms=50, **kwargs))
        return load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db",
                                        extra=mqtt_block(broker, tmp_path)))
    return make


@pytest.fixture
def app(broker: Any) -> Any:
    from brokers import MqttProbe

    probe = MqttProbe.connected(broker, "app")
    yield probe
    probe.close()


FAULTS = [  # (what the kernel shows, or None: the sensor's directory gone; its kind; what the detail says)
    (w1_slave(23125, crc="NO"), "crc", "CRC check failed"),
    (w1_slave(85000), "power_on", "the value a DS18B20 holds from power-on"),
    (w1_slave(0, scratchpad="00 00 00 00 00 00 00 00 00"), "no_answer", "every byte read 00"),
    (None, "missing", "the sensor is not on the 1-wire bus (unplugged, or a loose wire)"),
]


async def test_each_fault_makes_the_device_unhealthy_with_its_cause_and_it_recovers(
        tmp_path: Path, mapper_config: Callable[..., Any], app: Any) -> None:
    """A running mapper reads the sensor into the twin and onto the broker; each fault the kernel can
    show is recorded as an error reading saying what it is, turns the device unhealthy after three
    reads in a row (its detail counting them by kind), and the first good read after it is published
    and makes the device ok again."""
    bus = W1Bus(tmp_path / "w1")
    bus.show(w1_slave(23125))
    bus.show(w1_slave(19000), sensor="28-0000000000aa")
    config = mapper_config(bus.root)
    topics = Topics("test-node")
    assert not app.subscribe(topics.telemetry(PROBE, "temperature")).is_failure
    readings = Received(app, topics.telemetry(PROBE, "temperature"))
    async with running_service(config, build=_build_service, timeout=15):
        first = await readings.next(lambda body: body["value"] == 23.125, "the first reading")
        assert first["unit"] == "Celsius"
        for step, (shown, kind, says) in enumerate(FAULTS):
            if shown is None:
                bus.unplug()
            else:
                bus.show(shown)

            def unhealthy(kind: str = kind) -> Any:
                twin = twin_of(config)
                return twin.state == "unhealthy" and f"{kind} 3" in (twin.state_detail or "") and twin

            twin = await async_wait_for(unhealthy, what=f"unhealthy from {kind}")
            assert says in twin.state_detail, twin.state_detail
            assert twin.properties["temperature"].quality == "error"
            assert says in twin.properties["temperature"].quality_detail
            good = 24000 + 500 * step
            bus.show(w1_slave(good))
            await readings.next(lambda body, good=good: body["value"] == good / 1000, f"the reading after {kind}")
            await async_wait_for(lambda: twin_of(config).state == "ok", what=f"ok again after {kind}")
    with TwinStore.open(config.twin.path) as store:
        history = store.history(PROBE, "temperature", limit=10_000)
    assert {value for _, value, quality in history if quality == "good"} >= {23.125, 24.0, 24.5, 25.0, 25.5}
    assert all(value is None for _, value, quality in history if quality == "error")


async def test_no_bus_says_how_to_enable_it_until_it_appears(tmp_path: Path, mapper_config: Callable[..., Any],
                                                             app: Any) -> None:
    """No w1 devices directory (the overlay not enabled): the device is unhealthy with the line to add
    to config.txt; once the bus and the sensor are there, its readings come."""
    w1 = tmp_path / "w1"
    config = mapper_config(w1)
    topics = Topics("test-node")
    assert not app.subscribe(topics.telemetry(PROBE, "temperature")).is_failure
    async with running_service(config, build=_build_service, timeout=15):
        twin = await async_wait_for(lambda: (t := twin_of(config)).state == "unhealthy" and t, what="unhealthy")
        assert "no_bus 3" in twin.state_detail and "add dtoverlay=w1-gpio to /boot/firmware/config.txt" in \
            twin.state_detail, twin.state_detail
        W1Bus(w1).show(w1_slave(21062))
        await Received(app, topics.telemetry(PROBE, "temperature")).next(lambda b: b["value"] == 21.062, "a reading")
        await async_wait_for(lambda: twin_of(config).state == "ok", what="ok")


async def test_a_read_that_hangs_times_out_and_the_next_one_reads(tmp_path: Path, mapper_config: Callable[..., Any],
                                                                  app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A w1 read that does not return (here w1_slave is a FIFO nobody writes: its open blocks, as a
    read on a hung bus does) fails after configData.timeout_s, in its thread: the mapper goes on,
    and once the read returns the sensor is read again."""
    bus = W1Bus(tmp_path / "w1")
    (bus.root / SENSOR).mkdir()
    fifo = bus.root / SENSOR / "w1_slave"
    os.mkfifo(fifo)
    config = mapper_config(bus.root, timeout_s=0.3)
    topics = Topics("test-node")
    assert not app.subscribe(topics.telemetry(PROBE, "temperature")).is_failure
    released = threading.Event()
    caplog.set_level(logging.DEBUG, logger="mapper.device")  # (each failed read: one DEBUG line)

    def release() -> None:
        """Put a file in the FIFO's place, then answer the read blocked in its open (a writer may open
        without waiting: a reader is there). In that order, no later read opens the FIFO again."""
        if released.is_set():
            return
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        released.set()
        bus.show(w1_slave(22500))
        os.write(writer, w1_slave(22000).encode())
        os.close(writer)

    try:
        async with running_service(config, build=_build_service, timeout=15):
            # The first read times out; those after it find the call still running, and say so.
            await async_wait_for(lambda: twin_of(config).state == "unhealthy", what="unhealthy")
            failures = [r.getMessage() for r in caplog.records if "read failed" in r.getMessage()]
            assert "no answer within 0.3 s" in failures[0], failures
            assert all("its previous call has not returned yet" in failure for failure in failures[1:]), failures
            release()
            await Received(app, topics.telemetry(PROBE, "temperature")).next(lambda b: b["value"] == 22.5,
                                                                             "a reading after the hang")
    finally:
        if not released.is_set():  # a failure above: never leave the driver's thread blocked
            with contextlib.suppress(OSError):  # (ENXIO: no read waits on it)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _build_service(config: Any) -> Any:
    from mapper.runtime import build_service

    return build_service(config)
