"""Calibration: `valueScale`, `valueOffset` and `valueDigits` in a numeric property's visitors'
configData make every reading `raw * scale + offset` (rounded to valueDigits decimals) before range
checks, twin and telemetry see it; a desired value goes to the driver through the inverse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from devices.definitions import Calibration
from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import load
from eventbus.topics import Topics
from helpers import async_wait_for, one_property_device, running_service, the_problem_at_its_line, write_config
from mapper.config import load_config
from mapper_proc import REPO, mqtt_block
from test_ds18b20 import Received, _build_service
from twin.store import TwinStore

PROBE = DeviceId("default", "probe")
TOPICS = Topics("test-node")


@pytest.mark.parametrize(("scale", "offset"), [(0.1, 0.0), (0.5, -1.5), (1.8, 32.0), (1.0, -273.15), (-0.25, 3.0)])
def test_a_desired_value_written_through_the_inverse_reads_back_as_itself(scale, offset):
    """Float arithmetic leaves noise in the last digits ((2.3 / 0.1) * 0.1 = 2.2999999999999998): the
    calibrated value is rounded to 12 significant digits of its larger term, so the twin's reported
    value equals the desired one once the device took it."""
    calibration = Calibration(scale=scale, offset=offset, digits=None, integral=False)
    for desired in (2.3, 0.7, 25.0, 19.99, -3.3, 0.001, 1234.5678):
        assert calibration.reading(calibration.raw(desired)) == desired


def test_digits_round_and_an_int_stays_an_int():
    assert Calibration(scale=0.5, offset=0.03, digits=1, integral=False).reading(41.0) == 20.5
    integral = Calibration(scale=1000, offset=-5, digits=None, integral=True)
    assert integral.reading(3) == 2995 and isinstance(integral.reading(3), int)
    assert integral.raw(2995) == 3
    with pytest.raises(ValueError, match="the nearest are 1995 and 2995"):
        integral.raw(2500)


def _device(tmp_path: Path, visitor: str, *, kind: str = "FLOAT", access: str = "ReadOnly") -> Path:
    directory = tmp_path / "devices"
    directory.mkdir(exist_ok=True)
    (directory / "probe.yaml").write_text(one_property_device(
        "probe", f"{{name: level, type: {kind}, accessMode: {access}}}", visitor, settings="collectCycle: 100"))
    return directory


@pytest.mark.parametrize(("visitor", "kind", "field", "said"), [
    ("{kind: constant, valueScale: 0}", "FLOAT", "valueScale", "0 would make every reading the offset"),
    ("{kind: constant, valueScale: '1.8'}", "FLOAT", "valueScale", "'1.8' is not a number"),
    ("{kind: constant, valueOffset: true}", "FLOAT", "valueOffset", "True is not a number"),
    ("{kind: constant, valueOffset: .nan}", "FLOAT", "valueOffset", "is not a number"),
    ("{kind: constant, value: x, valueScale: 2}", "STRING", "valueScale",
     "calibration needs a number: the property's type is STRING"),
    ("{kind: constant, valueScale: 0.5}", "INT", "valueScale",
     "0.5 is not a whole number: an INT property's readings stay integers"),
    ("{kind: constant, valueOffset: -1.5}", "INT", "valueOffset", "-1.5 is not a whole number"),
    ("{kind: constant, valueDigits: 1}", "INT", "valueDigits", "an INT property has no decimals to round"),
    ("{kind: constant, valueDigits: -1}", "FLOAT", "valueDigits", "-1 is below 0"),
    ("{kind: constant, valueDigits: 1.5}", "FLOAT", "valueDigits", "1.5 is not a whole number of decimals"),
    ("{kind: constant, valueDigits: 16}", "FLOAT", "valueDigits", "16 is not a whole number of decimals from 0 to 15"),
])
def test_a_bad_calibration_is_an_error_at_its_line(tmp_path, visitor, kind, field, said):
    text = the_problem_at_its_line(_device(tmp_path, visitor, kind=kind), "probe.yaml", field)
    assert "device default/probe, property 'level'" in text and said in text, text


def test_the_keys_are_not_given_to_the_driver_and_validate_shows_them(tmp_path):
    """The simulated driver refuses unknown visitor keys (extra="forbid"): the calibration keys are
    taken out before it reads them, and `mapper validate` lists the calibrated properties."""
    directory = _device(tmp_path, "{kind: constant, valueScale: 1.8, valueOffset: 32, valueDigits: 1,"
                                  " reportDeadband: 0.5}")
    definition = load([directory]).devices[PROBE]
    dumped = definition.prop("level").visitor.model_dump()
    assert not {"valueScale", "valueOffset", "valueDigits", "reportDeadband"} & set(dumped)
    assert definition.prop("level").calibration == Calibration(scale=1.8, offset=32.0, digits=1, integral=False)
    done = subprocess.run([sys.executable, "-m", "mapper", "validate", str(directory)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "default/probe level: calibrated: raw * 1.8 + 32, rounded to 1 decimal(s)" in done.stdout, done.stdout


def test_a_models_visitor_calibrates_its_devices_and_a_device_overrides_a_key(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    model_prop = ("{name: level, type: FLOAT, accessMode: ReadOnly, visitors: {protocolName: simulated,"
                  " configData: {valueScale: 2, valueOffset: 1}}}")
    (devices / "probe.yaml").write_text(one_property_device(
        "probe", model_prop, "{kind: constant, valueOffset: -1.5}", settings="collectCycle: 100"))
    assert load([devices]).devices[PROBE].prop("level").calibration == Calibration(2.0, -1.5, None, False)


def test_an_int_desired_value_between_two_raw_steps_is_refused_with_the_nearest(tmp_path):
    definition = load([_device(tmp_path, "{kind: constant, valueScale: 10, valueOffset: 5}", kind="INT",
                               access="ReadWrite")]).devices[PROBE]
    assert definition.desired_value("level", 25) == 25
    with pytest.raises(ValueError, match=r"property 'level': 27 cannot be written: .* \(the nearest are 25 and 35\)"):
        definition.desired_value("level", 27)


def test_a_files_desired_value_an_int_calibration_cannot_reach_is_an_error_at_its_line(tmp_path):
    directory = tmp_path / "devices"
    directory.mkdir()
    (directory / "probe.yaml").write_text(one_property_device(
        "probe", "{name: level, type: INT, accessMode: ReadWrite}", "{kind: constant, valueScale: 10}",
        settings="desired: {value: '27'}"))
    with pytest.raises(DefinitionError) as caught:
        load([directory])
    [problem] = caught.value.problems
    assert "desired.value" in str(problem) and "27 cannot be written" in str(problem), str(problem)


PROBE_FILE = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: probe-model, namespace: default}
spec:
  protocol: simulated
  properties:
    - {name: level, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "30"}
    - {name: hot, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "30"}
    - {name: setpoint, type: FLOAT, accessMode: ReadWrite, minimum: "5", maximum: "30"}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: probe, namespace: default}
spec:
  deviceModelRef: {name: probe-model}
  protocol: {protocolName: simulated, configData: {}}
  properties:
    - name: level      # raw 50 is above the maximum; calibrated 23.5 is not
      visitors: {protocolName: simulated, configData: {kind: constant, value: 50, valueScale: 0.5, valueOffset: -1.5}}
      collectCycle: 50
      reportCycle: 50
      reportToCloud: true
    - name: hot        # raw 25 is within the range; calibrated 50 is not
      visitors: {protocolName: simulated, configData: {kind: constant, value: 25, valueScale: 2}}
      collectCycle: 50
      reportCycle: 50
      reportToCloud: true
    - name: setpoint   # boots at raw 40: 20.3
      visitors: {protocolName: simulated, configData: {kind: constant, value: 40, valueScale: 0.5,
                                                       valueOffset: 0.3, valueDigits: 2}}
      collectCycle: 50
      reportCycle: 50
      reportToCloud: true
"""


@pytest.fixture
def app(broker: Any) -> Any:
    from brokers import MqttProbe

    probe = MqttProbe.connected(broker, "app")
    yield probe
    probe.close()


async def test_a_calibrated_device_publishes_records_and_range_checks_calibrated_values_and_writes_raw(
        tmp_path: Path, broker: Any, app: Any) -> None:
    """A real device loop, twin and broker with the simulated driver: readings go out and into the
    twin calibrated, the model's range is checked on calibrated values, and a desired value set over
    MQTT reaches the driver uncalibrated and reads back calibrated, equal to the desired value."""
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(PROBE_FILE)
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db",
                                      extra=mqtt_block(broker, tmp_path)))
    for name in ("level", "hot", "setpoint"):
        assert not app.subscribe(TOPICS.telemetry(PROBE, name)).is_failure
    level = Received(app, TOPICS.telemetry(PROBE, "level"))

    def twin() -> Any:
        with TwinStore.open(config.twin.path) as store:
            return store.device(PROBE).properties

    async with running_service(config, build=_build_service, timeout=15) as service:
        body = await level.next(lambda body: True, "a level reading")
        assert body["value"] == 23.5 and body.get("quality", "good") == "good", body
        hot = await Received(app, TOPICS.telemetry(PROBE, "hot")).next(lambda body: True, "a hot reading")
        assert hot.get("quality") == "out_of_range", hot
        props = await async_wait_for(lambda: (p := twin())["hot"].quality and p["level"].quality and p,
                                     what="the twin's readings")
        assert (props["level"].reported, props["level"].quality) == (23.5, "good")
        assert props["hot"].quality == "out_of_range" and "50.0 is above the maximum 30" in props["hot"].quality_detail
        assert props["setpoint"].reported == 20.3  # raw 40

        app.publish(f"{TOPICS.telemetry(PROBE, 'setpoint')}/set", b"22.7")
        written = await Received(app, TOPICS.telemetry(PROBE, "setpoint")).next(
            lambda body: body["value"] == 22.7, "the written setpoint")
        assert written.get("quality", "good") == "good", written
        driver = service.runners[PROBE].driver
        assert driver._values["setpoint"] == pytest.approx((22.7 - 0.3) / 0.5)  # the raw value, 44.8
        props = await async_wait_for(lambda: (p := twin())["setpoint"].desired == 22.7 and p, what="the desired")
        await async_wait_for(lambda: not (p := twin()["setpoint"]).delta and p.apply_error is None,
                             what="reported == desired, applied")
        assert twin()["setpoint"].reported == 22.7
    # Restarted, the simulated constant is back at raw 40: its boot value, calibrated as its readings
    # are, replaces the applied desired value (raw, 40 would have been a delta against 20.3 for ever).
    async with running_service(config, build=_build_service, timeout=15):
        await async_wait_for(lambda: (p := twin()["setpoint"]).desired == 20.3 and p.reported == 20.3,
                             what="the boot value as the desired value")


def test_the_readme_shows_what_validate_says():
    line = Calibration(scale=1.0, offset=-1.5, digits=1, integral=False).describe()
    assert line == "calibrated: raw - 1.5, rounded to 1 decimal(s)"
    assert f"default/room t: {line}" in (REPO / "README.md").read_text()


def test_the_keys_as_edgecore_sends_them_make_the_calibration_written(tmp_path):
    """edgecore sends every configData number as a float32 (docs/kubeedge.md): unpacked, they are the
    numbers written (0.1, not 0.10000000149011612; a digits count of 1.0 is 1)."""
    from google.protobuf import wrappers_pb2
    from google.protobuf.any_pb2 import Any as AnyPb

    from mapper.dmi.convert import unpack_data

    def float32(value: float) -> AnyPb:
        packed = AnyPb()
        packed.Pack(wrappers_pb2.FloatValue(value=value))
        return packed

    data = unpack_data({"valueScale": float32(0.1), "valueOffset": float32(-1.5), "valueDigits": float32(1.0)},
                       "probe")
    assert data == {"valueScale": 0.1, "valueOffset": -1.5, "valueDigits": 1}
    visitor = "{kind: constant, " + ", ".join(f"{key}: {value}" for key, value in data.items()) + "}"
    assert load([_device(tmp_path, visitor)]).devices[PROBE].prop("level").calibration == Calibration(
        scale=0.1, offset=-1.5, digits=1, integral=False)


def test_home_assistants_number_for_a_calibrated_int_steps_by_its_scale(tmp_path):
    """An INT with valueScale 10 takes only every tenth value: a step of 1 would offer values the
    `/set` refuses (27 with valueScale 10, valueOffset 5)."""
    from eventbus.homeassistant import Discovery
    from eventbus.settings import HomeAssistantSettings

    (tmp_path / "probe.yaml").write_text(one_property_device(
        "probe", "{name: level, type: INT, accessMode: ReadWrite, minimum: -95, maximum: 105}",
        "{kind: constant, valueScale: -10, valueOffset: 5}", settings="reportToCloud: true"))
    definitions = load([tmp_path / "probe.yaml"]).devices
    made = Discovery(HomeAssistantSettings(discovery=True), Topics("pi1"), "pi1", version="v",
                     state_interval_ms=1000).configs(definitions)
    (number,) = [orjson.loads(body) for topic, body in made.items() if topic.split("/")[1] == "number"]
    assert number["step"] == 10
