"""Home Assistant MQTT discovery (eventbus/homeassistant.py) as Home Assistant's MQTT user sees it on
a real Mosquitto with the shipped ACL, rendered for the node (broker_for): the retained configs of a
sensor and a switch, announced again on HA's birth message, a switch set through its command_topic,
and the configs of a removed device cleared (by a reload, or at the next start)."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent

import orjson
import pytest
from paho.mqtt.client import MQTTMessage

from brokers import MosquittoBroker, MqttProbe
from eventbus.topics import DiscoveryTopics, ha_id
from mapper import __version__
from helpers import wait_for
from mapper_proc import MapperProcess

HA_ON = "homeassistant:\n  discovery: true\n"

SENSOR = dedent("""\
    apiVersion: devices.kubeedge.io/v1beta1
    kind: DeviceModel
    metadata: {name: dht11-model, namespace: default}
    spec:
      protocol: simulated
      properties:
        - {name: temperature, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "50", unit: Celsius}
        - {name: humidity, type: FLOAT, accessMode: ReadOnly, minimum: "0", maximum: "100", unit: Percent}
        - {name: quiet, type: FLOAT, accessMode: ReadOnly}
    ---
    apiVersion: devices.kubeedge.io/v1beta1
    kind: Device
    metadata: {name: room, namespace: default}
    spec:
      deviceModelRef: {name: dht11-model}
      protocol: {protocolName: simulated, configData: {}}
      properties:
        - name: temperature
          visitors: {protocolName: simulated, configData: {kind: temperature, base: 21.5, amplitude: 1}}
          collectCycle: 200
          reportCycle: 200
          reportToCloud: true
        - name: humidity
          visitors: {protocolName: simulated, configData: {kind: humidity, base: 48, amplitude: 2}}
          collectCycle: 200
          reportCycle: 200
          reportToCloud: true
        - name: quiet
          visitors: {protocolName: simulated, configData: {kind: constant, value: 1}}
          collectCycle: 200
          reportToCloud: false
    """)

SWITCH = dedent("""\
    apiVersion: devices.kubeedge.io/v1beta1
    kind: DeviceModel
    metadata: {name: switch-model, namespace: default}
    spec:
      protocol: simulated
      properties:
        - {name: power, type: BOOLEAN, accessMode: ReadWrite}
    ---
    apiVersion: devices.kubeedge.io/v1beta1
    kind: Device
    metadata: {name: relay, namespace: default}
    spec:
      deviceModelRef: {name: switch-model}
      protocol: {protocolName: simulated, configData: {}}
      properties:
        - name: power
          visitors: {protocolName: simulated, configData: {kind: switch}}
          collectCycle: 200
          reportCycle: 200
          reportToCloud: true
    """)


@pytest.fixture
def node() -> str:
    """A node of its own, with a broker whose ACL is rendered for it: retained configs of other tests never answer."""
    return f"ha-{secrets.token_hex(3)}"


def devices_dir(tmp_path: Path, *files: str) -> Path:
    directory = tmp_path / "devices"
    directory.mkdir(exist_ok=True)
    for name in files:
        (directory / f"{name}.yaml").write_text({"room": SENSOR, "relay": SWITCH}[name])
    return directory


def topics(node: str) -> dict[str, str]:
    ha = DiscoveryTopics("homeassistant", node)
    return {"temperature": f"homeassistant/sensor/{node}/default_room_temperature/config",
            "humidity": f"homeassistant/sensor/{node}/default_room_humidity/config",
            "power": f"homeassistant/switch/{node}/default_relay_power/config",
            "filter": ha.config_filter()}


def messages(ha: MqttProbe, timeout: float = 20.0) -> Iterator[MQTTMessage]:
    """The probe's messages until `timeout` has passed (the state views come every second: a
    per-message timeout alone would never end a wait for something that does not come)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        yield ha.next_message(left)
    raise TimeoutError(f"not within {timeout} s")


def configs(ha: MqttProbe, wanted: set[str]) -> dict[str, bytes]:
    """The next message on each of `wanted` (others on the subscription are kept too, by topic)."""
    seen: dict[str, bytes] = {}
    for message in messages(ha):
        seen[message.topic] = message.payload
        if wanted <= seen.keys():
            return seen
    raise AssertionError


def state_where(ha: MqttProbe, topic: str, check: Callable[[dict], bool]) -> dict:
    for message in messages(ha):
        if message.topic == topic and message.payload and check(view := orjson.loads(message.payload)):
            return view
    raise AssertionError


def retained(broker: MosquittoBroker, topic_filter: str) -> dict[str, bytes]:
    """What the broker keeps under `topic_filter`, as a new Home Assistant connection gets it: the
    retained messages come before the answer to a birth message the test publishes after subscribing."""
    kept = {}
    with broker.client("homeassistant") as fresh:
        fresh.subscribe(topic_filter)
        marker = "homeassistant/status"
        fresh.subscribe(marker)
        fresh.publish(marker, b"marker")
        while (message := fresh.next_message(10)).topic != marker:
            kept[message.topic] = message.payload
    return kept


def test_a_sensor_and_a_switch_are_announced_and_the_switch_works(broker_for, tmp_path: Path, node: str) -> None:
    broker = broker_for(node)
    t = topics(node)
    state = f"mapper/{node}/default/relay/state"
    with broker.client("homeassistant") as ha:
        assert not ha.subscribe(t["filter"]).is_failure
        assert not ha.subscribe(state).is_failure
        with MapperProcess(tmp_path, devices_dir(tmp_path, "room", "relay"), broker, node=node, extra=HA_ON) as mapper:
            seen = configs(ha, {t["temperature"], t["humidity"], t["power"]})
            # Only published properties (reportToCloud): `quiet` is not announced.
            assert not any("quiet" in topic for topic in seen), seen
            temperature = orjson.loads(seen[t["temperature"]])
            device = {"identifiers": [f"mapper_{node}_default_room"], "name": "room", "model": "dht11-model",
                      "manufacturer": "mapper", "sw_version": __version__}
            availability = [f"mapper/{node}/availability", f"mapper/{node}/default/room/availability"]
            assert temperature == {
                "name": "temperature", "unique_id": f"mapper_{node}_default_room_temperature",
                "state_topic": f"mapper/{node}/default/room/state",
                "value_template": "{% if value_json['temperature'] is defined %}{{ value_json['temperature'] }}{% endif %}",
                "availability": [{"topic": a, "payload_available": "online", "payload_not_available": "offline"}
                                 for a in availability],
                "availability_mode": "all", "device": device, "origin": {"name": "mapper", "sw_version": __version__},
                "unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
                # 2 cycles (the state view's 1 s interval, longer than the 200 ms collect cycle) + 5 s.
                "expire_after": 7}
            humidity = orjson.loads(seen[t["humidity"]])
            assert (humidity["unit_of_measurement"], humidity["device_class"]) == ("%", "humidity")
            assert humidity["device"] == device
            power = orjson.loads(seen[t["power"]])
            assert power["command_topic"] == f"mapper/{node}/default/relay/power/set"
            assert (power["payload_on"], power["payload_off"], power["state_topic"]) == ("ON", "OFF", state)
            assert "ON" in power["value_template"] and "value_json['power']" in power["value_template"]
            assert not {"state_class", "expire_after", "unit_of_measurement"} & power.keys()
            assert power["device"]["model"] == "switch-model"
            # The configs are retained: a Home Assistant that starts now gets them.
            assert set(retained(broker, t["filter"])) == {t["temperature"], t["humidity"], t["power"]}

            # The switch, as Home Assistant sets it: payload_on on the command_topic (the /set path).
            state_where(ha, state, lambda view: view.get("power") is False)
            assert not ha.publish(power["command_topic"], power["payload_on"]).is_failure
            view = state_where(ha, state, lambda view: view.get("power") is True)
            assert view["state"] == "ok"
            assert not ha.publish(power["command_topic"], power["payload_off"]).is_failure
            state_where(ha, state, lambda view: view.get("power") is False)

            # Home Assistant's birth message: every config again.
            assert not ha.publish("homeassistant/status", b"online").is_failure
            again = configs(ha, {t["temperature"], t["humidity"], t["power"]})
            assert again[t["power"]] == seen[t["power"]] and again[t["temperature"]] == seen[t["temperature"]]
            assert mapper.stop() == 0
    # A clean stop leaves the configs (HA shows the entities unavailable: the availability says offline).
    assert set(retained(broker, t["filter"])) == {t["temperature"], t["humidity"], t["power"]}


LOCK_AVAILABILITY = {"value_template": "{{ 'locked' if value_json['$locked'] | default(false) else 'online' }}",
                     "payload_available": "online", "payload_not_available": "locked"}


def test_a_locked_devices_controls_are_unavailable_and_its_sensors_are_not(broker_for, tmp_path: Path,
                                                                          node: str) -> None:
    """`mapper lock`: the mapper refuses every write, so HA showed a switch that snapped back with no
    reason. A control's availability also reads the device's state view: `locked` while it carries
    `$locked`, `online` without it (an unlocked device's view, an older mapper's). Sensors do not read it."""
    import subprocess
    import sys

    broker = broker_for(node)
    t = topics(node)
    state = f"mapper/{node}/default/relay/state"
    with broker.client("homeassistant") as ha:
        assert not ha.subscribe(t["filter"]).is_failure
        assert not ha.subscribe(state).is_failure
        with MapperProcess(tmp_path, devices_dir(tmp_path, "room", "relay"), broker, node=node, extra=HA_ON) as mapper:
            seen = configs(ha, {t["temperature"], t["power"]})
            power, temperature = orjson.loads(seen[t["power"]]), orjson.loads(seen[t["temperature"]])
            assert power["availability"] == [
                {"topic": f"mapper/{node}/availability", "payload_available": "online", "payload_not_available": "offline"},
                {"topic": f"mapper/{node}/default/relay/availability", "payload_available": "online",
                 "payload_not_available": "offline"},
                {"topic": state, **LOCK_AVAILABILITY}]
            assert power["availability_mode"] == "all"  # the lock's `locked` alone makes it unavailable
            assert [a["topic"] for a in temperature["availability"]] == [
                f"mapper/{node}/availability", f"mapper/{node}/default/room/availability"]
            # The view the template reads: no `$locked` while unlocked, the lock (a non-empty object) while locked.
            assert "$locked" not in state_where(ha, state, lambda view: "power" in view)

            def cli(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "mapper", *args, "--config", str(mapper.config)],
                                      capture_output=True, text=True, timeout=30)

            assert cli("lock", "relay").returncode == 0
            locked = state_where(ha, state, lambda view: "$locked" in view)
            assert locked["$locked"]["by"] and locked["$locked"]["reason"] == "", locked  # truthy with no reason too
            assert cli("unlock", "relay").returncode == 0
            state_where(ha, state, lambda view: "$locked" not in view)
            assert mapper.stop() == 0


def test_a_removed_device_is_cleared_by_a_reload_and_at_the_next_start(broker_for, tmp_path: Path,
                                                                       node: str) -> None:
    broker = broker_for(node)
    t = topics(node)
    directory = devices_dir(tmp_path, "room", "relay")
    # Another program's config under the same node_id (an ESPHome device named as the node) stays.
    foreign = f"homeassistant/sensor/{node}/esp_temp/config"
    with broker.client("homeassistant") as other:
        # (Home Assistant's user may not write configs: the shipped ACL grants it to the mapper only.)
        assert other.publish(foreign, b'{"unique_id":"esp_temp"}', retain=True).is_failure
    with broker.client("mapper") as esphome_like:
        assert not esphome_like.publish(foreign, b'{"unique_id":"esp_temp"}', retain=True).is_failure
    with broker.client("homeassistant") as ha:
        ha.subscribe(t["filter"])
        mapper = MapperProcess(tmp_path, directory, broker, node=node, extra=HA_ON)
        with mapper:
            before = configs(ha, {t["temperature"], t["humidity"], t["power"]})
            # A reload: the relay removed, the room's temperature now in °F; its humidity as it was.
            (directory / "relay.yaml").unlink()
            (directory / "room.yaml").write_text(SENSOR.replace("unit: Celsius", "unit: Fahrenheit"))
            assert mapper.process is not None
            mapper.process.send_signal(signal.SIGHUP)
            after: dict[str, bytes] = {}
            for message in messages(ha):
                after[message.topic] = message.payload
                if {t["temperature"], t["power"]} <= after.keys():
                    break
            assert after[t["power"]] == b""  # HA deletes the entity
            assert orjson.loads(after[t["temperature"]])["unit_of_measurement"] == "°F"
            mapper.wait_log("Home Assistant discovery: 1 entity announced, 1 removed")  # humidity: unchanged
            assert retained(broker, t["filter"])[t["humidity"]] == before[t["humidity"]]
            assert mapper.stop() == 0
        assert set(retained(broker, t["filter"])) == {t["temperature"], t["humidity"], foreign}

        # Removed while the mapper was stopped: cleared when the broker hands it over at the next start.
        (directory / "room.yaml").unlink()
        (directory / "relay.yaml").write_text(SWITCH)
        with MapperProcess(tmp_path, directory, broker, node=node, extra=HA_ON) as again:
            cleared = set()
            for message in messages(ha):
                if not message.payload:
                    cleared.add(message.topic)
                if cleared == {t["temperature"], t["humidity"]}:
                    break
            assert again.stop() == 0
    assert set(retained(broker, t["filter"])) == {t["power"], foreign}


def test_a_node_with_a_dot_gets_one_discovery_node_id_in_the_topics_and_the_acl() -> None:
    """Home Assistant takes only letters, digits, `_` and `-` in a discovery topic's node_id; the
    ACL's line for the mapper (render.sh, @HA_NODE@) names the same id eventbus/topics.py builds."""
    from brokers import render_shipped

    assert ha_id("pi-1") == "pi-1"
    assert ha_id("pi.lan") != ha_id("pi_lan") and ha_id("pi.lan").startswith("pi_lan_")
    acl = render_shipped("acl", "pi.lan")
    assert f"topic readwrite homeassistant/+/{ha_id('pi.lan')}/+/config" in acl.splitlines()
    assert DiscoveryTopics("homeassistant", "pi.lan").config_filter() == f"homeassistant/+/{ha_id('pi.lan')}/+/config"


def test_discovery_is_off_by_default_and_its_config_mistakes_name_their_line(tmp_path: Path) -> None:
    """`homeassistant:` is opt-in; discovery without `mqtt:` or under the mapper's own topic prefix is
    refused at the field's line, saying what to do."""
    from devices.errors import DefinitionError
    from mapper.config import load_config
    from mapper.runtime import build_service

    config = tmp_path / "c.yaml"
    config.write_text("node: n\nmqtt:\n  url: mqtt://127.0.0.1:1\n")
    assert not any(type(e).__name__ == "HomeAssistantExtension" for e in build_service(load_config(config, env={})).extensions)
    config.write_text("node: n\nmqtt:\n  url: mqtt://127.0.0.1:1\nhomeassistant:\n  discovery: true\n")
    loaded = load_config(config, env={})
    assert (loaded.homeassistant.prefix, [type(e).__name__ for e in build_service(loaded).extensions][:2]) == (
        "homeassistant", ["EventBusExtension", "HomeAssistantExtension"])
    config.write_text("node: n\nhomeassistant:\n  discovery: true\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert str(info.value).startswith(f"{config}:3: homeassistant.discovery: needs an `mqtt:` section")
    config.write_text("node: n\nmqtt:\n  url: mqtt://127.0.0.1:1\nhomeassistant:\n  discovery: true\n  prefix: mapper\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert str(info.value).startswith(f"{config}:6: homeassistant.prefix: 'mapper' is mqtt.topic_prefix")
    config.write_text("node: n\nmqtt:\n  url: mqtt://127.0.0.1:1\nhomeassistant:\n  discovery: true\n  prefix: home/assistant\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert f"{config}:6: homeassistant.prefix" in str(info.value)


THINGS = dedent("""\
    apiVersion: devices.kubeedge.io/v1beta1
    kind: DeviceModel
    metadata: {name: things-model, namespace: lab}
    spec:
      protocol: simulated
      properties:
        - {name: level, type: INT, accessMode: ReadWrite, minimum: "0", maximum: "10"}
        - {name: gain, type: FLOAT, accessMode: ReadWrite}
        - {name: label, type: STRING, accessMode: ReadWrite}
        - {name: door, type: BOOLEAN, accessMode: ReadOnly}
        - {name: battery, type: FLOAT, accessMode: ReadOnly, unit: "%"}
        - {name: co2, type: FLOAT, accessMode: ReadOnly, unit: ppm}
        - {name: snapshot, type: BYTES, accessMode: ReadOnly}
        - {name: hot.water, type: FLOAT, accessMode: ReadOnly, unit: "°F"}
        - {name: status, type: STRING, accessMode: ReadOnly}
    ---
    apiVersion: devices.kubeedge.io/v1beta1
    kind: Device
    metadata: {name: box.2, namespace: lab}
    spec:
      deviceModelRef: {name: things-model}
      protocol: {protocolName: simulated, configData: {}}
      properties:
    """) + "".join(
    f"    - {{name: {p}, visitors: {{protocolName: simulated, configData: {{kind: {k}}}}}, collectCycle: 5000,"
    f" reportCycle: 10000, reportToCloud: true}}\n"
    for p, k in (("level", "switch"), ("gain", "switch"), ("label", "switch"), ("door", "constant"),
                 ("battery", "constant"), ("co2", "constant"), ("hot.water", "constant"), ("snapshot", "constant"),
                 ("status", "constant")))


def test_components_units_and_ids_from_the_model(tmp_path: Path) -> None:
    """Each kind of property gets its component and the fields HA needs from the model; a device
    class only where the unit leaves no doubt; names HA's topics do not take get an id that does."""
    from eventbus.homeassistant import Discovery
    from eventbus.settings import HomeAssistantSettings
    from eventbus.topics import Topics
    from mapper.config import load_config

    (tmp_path / "things.yaml").write_text(THINGS)
    config = tmp_path / "c.yaml"
    config.write_text(f"node: pi1\ndevices: [{tmp_path / 'things.yaml'}]\nmqtt: {{url: 'mqtt://127.0.0.1:1'}}\n")
    definitions = load_config(config, env={}).load_devices().devices
    made = Discovery(HomeAssistantSettings(discovery=True), Topics("pi1"), "pi1", version="v",
                     state_interval_ms=1000).configs(definitions)
    device_id = ha_id("lab_box.2")
    by_name = {orjson.loads(body)["name"]: (topic, orjson.loads(body)) for topic, body in made.items()}
    assert {name: topic.split("/")[1] for name, (topic, _) in by_name.items()} == {
        "level": "number", "gain": "number", "label": "text", "door": "binary_sensor", "battery": "sensor",
        "co2": "sensor", "hot.water": "sensor", "status": "sensor"}  # not `snapshot`: BYTES, no HA state holds it
    for topic, _ in by_name.values():
        prefix, _, node_id, object_id, last = topic.split("/")
        assert (prefix, node_id, last) == ("homeassistant", "pi1", "config") and ha_id(object_id) == object_id
    assert by_name["level"][0] == f"homeassistant/number/pi1/{ha_id('lab_box.2_level')}/config" != device_id
    level, gain = by_name["level"][1], by_name["gain"][1]
    assert (level["min"], level["max"], level["step"], level["mode"]) == (0, 10, 1, "auto")
    assert (gain["min"], gain["max"], gain["mode"]) == (-(2**53 - 1), 2**53 - 1, "box")
    assert level["command_topic"] == "mapper/pi1/lab/box.2/level/set"
    assert by_name["label"][1]["command_topic"] == "mapper/pi1/lab/box.2/label/set"
    # A text goes as a JSON string: HA sends an emptied text field as an empty message, which `/set`
    # refuses ("an empty message is no value"), and a text starting with `{` would be read as an object.
    assert by_name["label"][1]["command_template"] == "{{ value | tojson }}"
    # HA's limit, said in the config (a `max` above 255 HA refuses): a longer text goes over `/set` only.
    assert by_name["label"][1]["max"] == 255 and "max" not in by_name["status"][1]
    assert "command_template" not in level and "command_template" not in by_name["door"][1]
    # A control reads the maintenance lock from the state view; a sensor does not (it is still read).
    for name, (_, config) in by_name.items():
        lock = [a for a in config["availability"] if a["topic"] == "mapper/pi1/lab/box.2/state"]
        assert lock == ([{"topic": "mapper/pi1/lab/box.2/state", **LOCK_AVAILABILITY}]
                        if name in ("level", "gain", "label") else []), name
    door = by_name["door"][1]
    assert (door["payload_on"], door["payload_off"], door["expire_after"]) == ("ON", "OFF", 25)  # 2 x 10 s + 5
    assert "state_class" not in door and "command_topic" not in door
    assert by_name["battery"][1]["unit_of_measurement"] == "%" and "device_class" not in by_name["battery"][1]
    assert by_name["co2"][1]["device_class"] == "carbon_dioxide"
    hot = by_name["hot.water"][1]
    assert (hot["device_class"], hot["unit_of_measurement"], hot["state_class"]) == ("temperature", "°F", "measurement")
    assert hot["value_template"] == "{% if value_json['hot.water'] is defined %}{{ value_json['hot.water'] }}{% endif %}"
    assert hot["unique_id"] == "mapper_pi1_lab_box.2_hot.water"
    # A text sensor's state is cut to HA's 255 characters (a longer one HA refuses, keeping the old one);
    # a writable text is not (cut, it would be set back cut), nor a number.
    assert by_name["status"][1]["value_template"] == (
        "{% if value_json['status'] is defined %}{{ value_json['status'][:255] }}{% endif %}")
    assert "[:255]" not in by_name["label"][1]["value_template"] and "state_class" not in by_name["status"][1]
    assert hot["device"]["name"] == "lab/box.2"


def test_a_device_removed_while_the_broker_is_down_is_cleared_at_the_reconnect(broker_for, tmp_path: Path,
                                                                             node: str) -> None:
    """A reload during a broker outage: its clears could not go out then; they do at the reconnect."""
    broker = broker_for(node)
    t = topics(node)
    directory = devices_dir(tmp_path, "room", "relay")
    with MapperProcess(tmp_path, directory, broker, node=node, extra=HA_ON) as mapper:
        mapper.wait_log("Home Assistant discovery: 3 entities announced")
        assert t["power"] in retained(broker, t["filter"])
        broker.stop()
        mapper.wait_log("lost or refused")
        (directory / "relay.yaml").unlink()
        assert mapper.process is not None
        mapper.process.send_signal(signal.SIGHUP)
        mapper.wait_log("devices updated: 0 added, 0 changed, 1 removed")
        broker.start()
        wait_for(lambda: set(retained(broker, t["filter"])) == {t["temperature"], t["humidity"]}, timeout=20,
                 interval=0.2, what="the relay's config cleared")
        assert mapper.stop() == 0


GAUGE = dedent("""\
    apiVersion: devices.kubeedge.io/v1beta1
    kind: DeviceModel
    metadata: {name: gauge-model, namespace: default}
    spec:
      protocol: simulated
      properties:
        - {name: level, type: INT, accessMode: ReadOnly, minimum: "0", maximum: "2"}
    ---
    apiVersion: devices.kubeedge.io/v1beta1
    kind: Device
    metadata: {name: gauge, namespace: default}
    spec:
      deviceModelRef: {name: gauge-model}
      protocol: {protocolName: simulated, configData: {}}
      properties:
        - name: level
          visitors: {protocolName: simulated, configData: {kind: counter}}
          collectCycle: 200
          reportCycle: 200
          reportToCloud: true
    """)


def test_a_sensor_out_of_range_stays_available_with_its_last_good_value(broker_for, tmp_path: Path,
                                                                       node: str) -> None:
    """A device whose only property reads 0, 1, 2 (its model's maximum), then 3, 4, ... for good: its
    readings are out of range, not its value. Its state view stopped with the last good reading, so
    Home Assistant made the entity unavailable after `expire_after` (7 s) though the device was read
    every 200 ms. The view now goes on at its pace with the last good value and that value's time."""
    broker = broker_for(node)
    state = f"mapper/{node}/default/gauge/state"
    directory = tmp_path / "devices"
    directory.mkdir()
    (directory / "gauge.yaml").write_text(GAUGE)
    with broker.client("homeassistant") as ha:
        assert not ha.subscribe(state).is_failure
        with MapperProcess(tmp_path, directory, broker, node=node, extra=HA_ON) as mapper:
            last_good = state_where(ha, state, lambda view: view.get("level") == 2)
            mapper.wait_log("recorded and published with quality out_of_range")
            # The views that follow, while every reading is out of range (each one a state_interval_ms
            # apart: 1 s; expire_after is 7 s). Before, none came.
            later = [state_where(ha, state, lambda view: True) for _ in range(3)]
            assert all(view["level"] == 2 and view["ts"] == last_good["ts"] and view["state"] == "ok"
                       for view in later), later
            assert mapper.stop() == 0



def test_configs_the_broker_refuses_are_not_counted_as_announced(broker_for, tmp_path: Path, node: str) -> None:
    """A prefix the broker's ACL does not grant the mapper (the shipped one grants homeassistant/ only):
    the broker refuses every config (MQTT 5's PUBACK: Not authorized). The log said "3 entities
    announced"; now it says they were refused, and why, and none is counted as announced."""
    broker = broker_for(node)
    extra = "homeassistant:\n  discovery: true\n  prefix: hass\n"
    with MapperProcess(tmp_path, devices_dir(tmp_path, "room", "relay"), broker, node=node, extra=extra) as mapper:
        mapper.wait_log("Home Assistant discovery: 3 entities refused by the broker")
        line = next(line for line in mapper.log().splitlines() if "3 entities refused by the broker" in line)
        assert " WARNING " in line and "Not authorized" in line and f"hass/+/{node}/+/config" in line, line
        assert "entities announced" not in mapper.log()
        assert mapper.stop() == 0
    assert retained(broker, f"hass/+/{node}/+/config") == {}


SIGN = dedent("""\
    apiVersion: devices.kubeedge.io/v1beta1
    kind: DeviceModel
    metadata: {name: sign-model, namespace: default}
    spec:
      protocol: simulated
      properties:
        - {name: message, type: STRING, accessMode: ReadWrite}
    ---
    apiVersion: devices.kubeedge.io/v1beta1
    kind: Device
    metadata: {name: sign, namespace: default}
    spec:
      deviceModelRef: {name: sign-model}
      protocol: {protocolName: simulated, configData: {}}
      properties:
        - name: message
          visitors: {protocolName: simulated, configData: {kind: constant, value: hello}}
          collectCycle: 200
          reportCycle: 200
          reportToCloud: true
    """)


def test_a_writable_text_is_announced_within_home_assistants_limit_and_a_longer_one_goes_over_set(
        broker_for, tmp_path: Path, node: str) -> None:
    """A writable STRING's length is not in its model, and Home Assistant's text holds 255 characters
    at most: its config says `max: 255` (HA's limit; a larger one it refuses), and the log says, once,
    that a longer value can only be set over the property's own `/set` topic, which takes it."""
    broker = broker_for(node)
    topic = f"homeassistant/text/{node}/default_sign_message/config"
    state = f"mapper/{node}/default/sign/state"
    directory = tmp_path / "devices"
    directory.mkdir()
    (directory / "sign.yaml").write_text(SIGN)
    with broker.client("homeassistant") as ha:
        assert not ha.subscribe(topic).is_failure
        assert not ha.subscribe(state).is_failure
        with MapperProcess(tmp_path, directory, broker, node=node, extra=HA_ON) as mapper:
            config = orjson.loads(configs(ha, {topic})[topic])
            assert (config["max"], config["command_topic"]) == (255, f"mapper/{node}/default/sign/message/set")
            line = next(line for line in mapper.log().splitlines() if "writable STRING" in line)
            assert " INFO " in line and "at most 255 characters" in line, line
            assert f"default/sign: message (mapper/{node}/default/sign/message/set)" in line, line
            long = "x" * 300  # (as Home Assistant's user, who may write this node's /set topics)
            assert not ha.publish(config["command_topic"], orjson.dumps(long)).is_failure
            state_where(ha, state, lambda view: view.get("message") == long)
            assert mapper.stop() == 0
