"""The example third-party driver, examples/drivers/mapper-bme280, installed as `pip install` lays it
out (its module and a .dist-info with its pyproject's entry point) and run as a user runs it: listed
by `mapper drivers`, its device file checked by `mapper validate`, and under `mapper run` with the
shipped broker: readings out, a desired value over MQTT back as reported, a value it refuses, a
device whose reads time out."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import orjson

from brokers import MosquittoBroker, MqttProbe
from helpers import dist_info
from mapper_proc import MapperProcess
from test_cli import mapper
from devices.ids import DeviceId
from twin.store import TwinStore

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "drivers" / "mapper-bme280"
# A second device of the example's model whose every read hangs past the driver's 1 s timeout.
STUCK = """
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: bme-stuck, namespace: default}
spec:
  deviceModelRef: {name: bme280-model}
  protocol: {protocolName: bme280, configData: {bus: 1, address: 0x77, stall_s: 3}}
  properties:
    - {name: temperature, visitors: {protocolName: bme280, configData: {field: temperature}}, collectCycle: 200}
"""


def install_example(site: Path) -> dict[str, str]:
    """The example in `site` as pip installs it; the environment that puts `site` on the path."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    drivers = project["entry-points"]["mapper.drivers"]
    site.mkdir(parents=True)
    shutil.copy(EXAMPLE / "mapper_bme280.py", site)
    dist_info(site, project["name"], project["version"],
              entry_points_txt="[mapper.drivers]\n" + "".join(f"{k} = {v}\n" for k, v in drivers.items()))
    return {"PYTHONPATH": str(site)}


def test_the_example_driver_is_listed_and_its_device_file_validates(tmp_path):
    env = install_example(tmp_path / "site")
    listed = mapper("drivers", env=env)
    assert listed.returncode == 0, listed
    row = next(line for line in listed.stdout.splitlines() if line.startswith("bme280 "))
    assert row.split() == ["bme280", "mapper_bme280:Bme280Driver", "mapper-bme280", "0.1.0", "(blocking,", "timeout",
                           "1", "s,", "writes)"], row
    # Its models forbid unknown keys and its class is named as it is registered: no warning about it.
    listed_json = orjson.loads(mapper("drivers", "--json", env=env).stdout)
    assert next(d for d in listed_json["drivers"] if d["protocol"] == "bme280")["warnings"] == [], listed_json
    checked = mapper("validate", str(EXAMPLE / "bme280.yaml"), env=env)
    assert (checked.returncode, checked.stderr) == (0, ""), checked
    # Its settings are checked at their lines: a misspelt key, and two devices on one bus address.
    text = (EXAMPLE / "bme280.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("address: 0x76", "adress: 0x76"))
    bad = mapper("validate", str(tmp_path / "bad.yaml"), env=env)
    assert bad.returncode == 1, bad
    assert f"{tmp_path / 'bad.yaml'}:17: spec.protocol.configData.adress: unknown field, did you mean address?" \
        in bad.stderr, bad.stderr
    (tmp_path / "twice.yaml").write_text(text + STUCK.replace("0x77", "0x76"))
    twice = mapper("validate", str(tmp_path / "twice.yaml"), env=env)
    assert twice.returncode == 1, twice
    assert (f"{tmp_path / 'twice.yaml'}:46: spec.protocol.configData.address: i2c:1:0x76 is already used by device"
            f" default/bme-room ({tmp_path / 'twice.yaml'}:17)") in twice.stderr, twice.stderr


def next_value(app: MqttProbe, topic: str) -> object:
    while True:
        message = app.next_message(20)
        if message.topic == topic:
            return orjson.loads(message.payload)["value"]


def test_the_example_driver_runs_under_mapper_run(broker: MosquittoBroker, tmp_path):
    env = install_example(tmp_path / "site")
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "bme280.yaml").write_text((EXAMPLE / "bme280.yaml").read_text() + STUCK)
    prefix = f"mapper/{broker.node}/default/bme-room"
    with broker.client("app") as app, MapperProcess(tmp_path, devices, broker, env=env) as proc:
        app.subscribe(f"{prefix}/#")
        assert 15 <= next_value(app, f"{prefix}/temperature") <= 27
        assert 900 <= next_value(app, f"{prefix}/pressure") <= 1100
        assert next_value(app, f"{prefix}/oversampling") == 2  # the file's configData, given by open()
        app.publish(f"{prefix}/oversampling/set", "4")
        while next_value(app, f"{prefix}/oversampling") != 4:
            pass
        proc.wait_log("default/bme-room/oversampling: applied desired value 4")
        # Within the model's range, but not a value the chip takes: refused once, not written again.
        app.publish(f"{prefix}/oversampling/set", "3")
        proc.wait_log("default/bme-room/oversampling: write refused by the driver: oversampling takes 1, 2, 4, 8,"
                      " 16, not 3")
        with TwinStore.open(proc.twin_path) as twin:
            assert twin.pending_desired() == []
        shown = mapper("twin", "get", "bme-room", "--config", str(proc.config), env=env)
        assert "[apply error: write refused by the driver: oversampling takes" in shown.stdout, shown
        # The stuck device: each read fails after the driver's timeout_s, and the device is unhealthy.
        proc.wait_log("default/bme-stuck: state unhealthy")
        with TwinStore.open(proc.twin_path) as twin:
            stuck = twin.device(DeviceId("default", "bme-stuck")).properties["temperature"]
            assert (stuck.quality, stuck.reported) == ("error", None)
            # (the read that timed out, or one made while its call still hangs, its 3 s not over)
            assert stuck.quality_detail == "default/bme-stuck: no answer within 1 s" or stuck.quality_detail.startswith(
                "default/bme-stuck: its previous call has not returned yet, stuck in the bme280 driver for"), stuck
        assert proc.stop() == 0
    assert proc.log().count("write refused by the driver") == 1
    # Started again, the chip is back at the file's setting (boot_value), and the twin says so.
    with MapperProcess(tmp_path, devices, broker, env=env) as again:
        again.wait_log("default/bme-room/oversampling: started in its boot state 2; the desired value 3")
        with TwinStore.open(again.twin_path) as twin:
            assert twin.device(DeviceId("default", "bme-room")).properties["oversampling"].desired == 2
        assert again.stop() == 0
