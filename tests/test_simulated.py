"""The simulated driver's `clock` kind: the exact read time, the latency benchmark's probe."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devices.drivers.base import load_driver
from devices.ids import DeviceId
from devices.loader import load

CLOCK_DEVICE = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: probe-model, namespace: default}
spec:
  protocol: simulated
  properties:
    - {name: now, type: FLOAT, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: probe, namespace: default}
spec:
  deviceModelRef: {name: probe-model}
  protocol: {protocolName: simulated}
  properties:
    - name: now
      visitors: {protocolName: simulated, configData: {kind: clock}}
      collectCycle: 10
"""


def test_a_clock_property_reads_the_wall_clock_time_of_the_read(tmp_path: Path) -> None:
    (tmp_path / "probe.yaml").write_text(CLOCK_DEVICE)
    definition = load([tmp_path]).devices[DeviceId("default", "probe")]
    driver = load_driver("simulated")(definition)
    driver.open()
    prop = definition.prop("now")
    values = []
    for _ in range(3):
        before = time.time()
        value = driver.read(prop)
        after = time.time()
        assert isinstance(value, float)
        assert before <= value <= after
        values.append(value)
    assert values == sorted(values)


def test_faults_as_flat_keys_are_the_nested_settings() -> None:
    """edgecore refuses a nested configData value, so the faults travel as flat keys (faults_rate,
    faults_seed, faults_kinds as a comma-separated string); the nested form still works locally."""
    from devices.drivers.simulated import FaultSettings, SimulatedConfig

    flat = SimulatedConfig.model_validate({"seed": 11, "faults_rate": 0.03, "faults_seed": 12.0,
                                           "faults_kinds": "spike, stuck"})
    nested = SimulatedConfig.model_validate({"seed": 11, "faults": {"rate": 0.03, "seed": 12,
                                                                    "kinds": ["spike", "stuck"]}})
    assert flat.faults == nested.faults == FaultSettings(rate=0.03, seed=12, kinds=["spike", "stuck"])
    assert SimulatedConfig.model_validate({"faults_rate": 0.1}).faults == FaultSettings(rate=0.1)
    assert SimulatedConfig.model_validate({}).faults is None
    with pytest.raises(ValueError, match="faults_kinds"):
        SimulatedConfig.model_validate({"faults_kinds": "spike,boom"})
    with pytest.raises(ValueError, match="both given"):
        SimulatedConfig.model_validate({"faults": {"rate": 0.1}, "faults_rate": 0.2})


def test_a_visitor_without_a_kind_is_a_warning_at_its_line_naming_the_kinds(tmp_path: Path) -> None:
    """`kind` defaults to `constant` (value 0): a visitor that left it out (`{base: 21}` for a
    temperature) loaded without a word and read 0 for ever. It is a warning at the visitor's line
    now, naming the kinds; a visitor with a kind, or a `value` (a constant meant), gets none."""
    text = CLOCK_DEVICE.replace("    - {name: now, type: FLOAT, accessMode: ReadOnly}\n",
                                "    - {name: now, type: FLOAT, accessMode: ReadOnly}\n"
                                "    - {name: temp, type: FLOAT, accessMode: ReadOnly}\n"
                                "    - {name: setpoint, type: FLOAT, accessMode: ReadOnly}\n")
    text += ("    - name: temp\n"
             "      visitors: {protocolName: simulated, configData: {base: 21}}\n"
             "    - name: setpoint\n"
             "      visitors: {protocolName: simulated, configData: {value: 20}}\n")
    (tmp_path / "probe.yaml").write_text(text)
    result = load([tmp_path], base=tmp_path)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "configData: {base: 21}" in row)
    assert [str(w) for w in result.warnings] == [
        f"probe.yaml:{line}: spec.properties[1].visitors.configData.kind: not given, so property 'temp' reads the"
        " constant 0 (kind: constant, value: 0); set the kind meant: temperature, humidity, switch, counter,"
        " constant, clock"]
    assert DeviceId("default", "probe") in result.devices  # (a warning: it runs as written)
