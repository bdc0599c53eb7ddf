"""Availability as an app sees it on a real Mosquitto.

The node's retained `online`/`offline` (a clean stop says `offline`, a crash leaves it to the
last will), each device's retained availability following its state (`offline` after a clean
stop), and both published again after the mapper reconnects to a broker that lost them; a
device's retained state as a Home Assistant user reads it after a stop and at the next start.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import orjson
import pytest

from brokers import MosquittoBroker, MqttProbe, ensure_mosquitto_installed
from helpers import TwinLock, device_yaml, one_property_device, wait_for, write_devices
from mapper_proc import REPO, MapperProcess


@pytest.fixture
def node() -> str:
    """A node name of its own, so retained messages of other tests never answer for this one."""
    return f"avail-{secrets.token_hex(3)}"


def next_payload(app: MqttProbe, topic: str, timeout: float = 20.0) -> bytes:
    """The next message on `topic` (others are skipped); TimeoutError if none comes."""
    while True:
        message = app.next_message(timeout)
        if message.topic == topic:
            return message.payload


def wait_payload(app: MqttProbe, topic: str, expected: bytes, timeout: float = 20.0) -> None:
    """Return once `expected` arrives on `topic` (repeats of the previous value are skipped)."""
    while next_payload(app, topic, timeout) != expected:
        pass


def retained(broker: MosquittoBroker, topic: str) -> bytes:
    """What a newly subscribing app is told (the retained message)."""
    with broker.client("app") as fresh:
        fresh.subscribe(topic)
        return fresh.next_message(10).payload


@pytest.mark.parametrize("ending", ["clean stop", "crash"])
def test_node_online_while_running_and_offline_after_it_ends(broker, tmp_path, node, ending):
    """A clean stop publishes `offline` itself, for the node and for each device; after SIGKILL
    the broker publishes the last will, the node's only: the device's retained availability
    stays `online` (README: Home Assistant takes the node's and the device's together)."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    node_topic = f"mapper/{node}/availability"
    with broker.client("app") as app:
        app.subscribe(node_topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            assert next_payload(app, node_topic) == b"online"
            assert retained(broker, f"mapper/{node}/default/lamp/availability") == b"online"
            if ending == "clean stop":
                assert mapper.stop() == 0
            else:
                mapper.kill()
            assert next_payload(app, node_topic) == b"offline"
    assert retained(broker, node_topic) == b"offline"
    assert retained(broker, f"mapper/{node}/default/lamp/availability") == (
        b"offline" if ending == "clean stop" else b"online")


def test_device_availability_follows_its_state(broker, tmp_path, node):
    """A failing sensor goes `offline` (unhealthy) while the node stays `online`; it comes back by itself."""
    fault = tmp_path / "unplugged"
    devices = write_devices(tmp_path / "dev", ["probe"], cycle=50,
                            configs={"probe": "{fail_while_exists: " + str(fault) + "}"})
    topic = f"mapper/{node}/default/probe/availability"
    with broker.client("app") as app:
        app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, node=node):
            assert next_payload(app, topic) == b"online"
            fault.touch()
            wait_payload(app, topic, b"offline")
            assert retained(broker, f"mapper/{node}/availability") == b"online"
            fault.unlink()
            wait_payload(app, topic, b"online")


def test_availability_is_published_again_after_a_reconnect(tmp_path, node):
    """The broker comes back without the retained messages: the mapper publishes them again."""
    ensure_mosquitto_installed()
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    node_topic = f"mapper/{node}/availability"
    device_topic = f"mapper/{node}/default/lamp/availability"
    with MosquittoBroker() as own, MapperProcess(tmp_path, devices, own, node=node) as mapper:
        with own.client("app") as app:
            app.subscribe(node_topic)
            assert next_payload(app, node_topic) == b"online"
        assert retained(own, device_topic) == b"online"
        with own.client("mapper") as eraser:  # an empty retained message deletes the retained one
            for topic in (node_topic, device_topic):
                eraser.publish(topic, b"", retain=True)
        own.restart()  # persistence keeps the deletion; the mapper's connection drops
        with own.client("app") as app:
            app.subscribe(node_topic)
            app.subscribe(device_topic)
            seen = {}
            while len(seen) < 2:
                message = app.next_message(30)
                if message.payload:
                    seen[message.topic] = message.payload
        assert seen == {node_topic: b"online", device_topic: b"online"}
        mapper.wait_log("connected to mqtt://", count=2)



def one_property_probe(directory, *, cycle: int, config: str):
    """A device with one property (so that `fail_first` counts its reads one cycle each)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "probe.yaml").write_text(one_property_device(
        "probe", "{name: temperature, type: FLOAT, accessMode: ReadOnly}", "{kind: temperature}",
        settings=f"collectCycle: {cycle}", config=config))
    return directory


def test_a_device_whose_first_reads_fail_is_not_announced_offline_before_it_is_known(broker, tmp_path, node):
    """At start the broker usually answers before a driver's first good read. Every device's
    availability was announced at connect, `offline` while its state was still unknown, then
    `online` with the first good read: a flap per device at every start. The first announcement
    now waits for the state (here two failed reads a second apart, then good ones: never
    `unhealthy`, three failures in a row)."""
    devices = one_property_probe(tmp_path / "dev", cycle=1000, config="{fail_first: 2}")
    topic = f"mapper/{node}/default/probe/availability"
    with broker.client("app") as app:
        app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            assert next_payload(app, topic) == b"online"
            assert "default/probe: state ok (was unknown)" in mapper.log()


def test_a_device_still_unknown_after_the_grace_is_announced_offline(broker, tmp_path, node):
    """A device whose reads fail, slowly (one read in 10 s: `unhealthy` only after three, at 20 s
    or later), is announced `offline` once FIRST_STATE_GRACE_S (5 s) has passed, not left with a
    previous run's retained `online` until it is unhealthy."""
    devices = one_property_probe(tmp_path / "dev", cycle=10_000, config="{broken: true}")
    topic = f"mapper/{node}/default/probe/availability"
    with broker.client("mapper") as earlier:  # what a previous run left
        earlier.publish(topic, b"online", retain=True)
    with broker.client("app") as app:
        app.subscribe(topic)
        assert next_payload(app, topic) == b"online"  # the retained one
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            assert next_payload(app, topic, timeout=15) == b"offline"
            assert "state unhealthy" not in mapper.log()  # the grace ran out, not the failure threshold


# -- a GPIO output (a relay or an LED on `pins: fake`), as a Home Assistant user sees it ---------

LED = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: led-model, namespace: default}
spec:
  protocol: gpio
  properties:
    - {name: power, type: BOOLEAN, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: led, namespace: default}
spec:
  deviceModelRef: {name: led-model}
  protocol: {protocolName: gpio, configData: {pins: fake}}
  properties:
    - name: power
      visitors: {protocolName: gpio, configData: {pin: 17, direction: out}}
      collectCycle: 100
      reportCycle: 100
      reportToCloud: true
"""


def write_led(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "led.yaml").write_text(LED)
    return directory


def cli(mapper: MapperProcess, *args: str) -> str:
    """`mapper <args> --config <the mapper's>`, its output (it must succeed)."""
    result = subprocess.run([sys.executable, "-m", "mapper", *args, "--config", str(mapper.config)],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result
    return result.stdout


def live_json(app: MqttProbe, topic: str, check, timeout: float = 20.0) -> dict:
    """The next live (not retained) JSON message on `topic` for which `check` holds, within `timeout`
    in all (the state topic publishes every 100 ms: a wait per message would never end)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        message = app.next_message(left)
        if message.topic == topic and not message.retain and check(body := orjson.loads(message.payload)):
            return body
    raise AssertionError(f"no live message on {topic} for which the check holds within {timeout} s")


def switch_led_on(broker: MosquittoBroker, mapper: MapperProcess, node: str) -> None:
    """`mapper twin set led power true`; returns once a state message reports it read back."""
    state_topic = f"mapper/{node}/default/led/state"
    with broker.client("app") as app:
        app.subscribe(state_topic)
        live_json(app, state_topic, lambda b: b.get("power") is False and b["state"] == "ok")
        cli(mapper, "twin", "set", "led", "power", "true")
        live_json(app, state_topic, lambda b: b.get("power") is True)


def test_a_clean_stop_leaves_the_device_offline_on_its_retained_topics(broker, tmp_path, node):
    """A stop closes the drivers (a GPIO output is switched off). The device's retained
    availability said `online` afterwards, and its retained state `"state":"ok"`: a Home Assistant
    switch paired with the device availability showed the relay available, and on, while the
    mapper was down and the relay off. Now the stop leaves `offline` on both; the state keeps the
    last value measured, with the time it was measured (what close() did was not measured)."""
    devices = write_led(tmp_path / "dev")
    base = f"mapper/{node}/default/led"
    with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        switch_led_on(broker, mapper, node)
        assert retained(broker, f"{base}/availability") == b"online"
        assert mapper.stop() == 0
    assert retained(broker, f"mapper/{node}/availability") == b"offline"
    assert retained(broker, f"{base}/availability") == b"offline"
    state = orjson.loads(retained(broker, f"{base}/state"))
    power = orjson.loads(cli(mapper, "twin", "get", "led", "--json"))["properties"]["power"]
    assert (state["state"], state["power"], state["ts"]) == ("offline", True, power["reportedTs"])


def test_at_start_the_state_tells_no_earlier_value_as_measured_now(broker, tmp_path, node):
    """A switch that was on when the previous run stopped starts in its boot state (off); the
    desired value applied before is not re-applied. Its first reads fail here (`fail_first`), so
    the broker answers before the first good read, as it often does. The state announced at
    connect said `"power":true` (the twin's value, from the previous run) with the current time
    as `ts`, and the first reading then said false. Every state message now carries values with
    the time they were read: the first one of the new run is the switch as read in this run."""
    devices = tmp_path / "dev"
    devices.mkdir()

    def switch(config: str) -> None:
        (devices / "led.yaml").write_text(one_property_device(
            "led", "{name: power, type: BOOLEAN, accessMode: ReadWrite}", "{kind: switch}",
            settings="collectCycle: 500\nreportCycle: 500\nreportToCloud: true", config=config))

    switch("{}")
    state_topic = f"mapper/{node}/default/led/state"
    with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        switch_led_on(broker, mapper, node)
        assert mapper.stop() == 0
    switch("{fail_first: 2}")  # two failed reads, 0.5 s apart: not `unhealthy` (three in a row)
    with broker.client("app") as app:
        app.subscribe(state_topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            first = live_json(app, state_topic, lambda b: True)
            mapper.wait_log("started in its boot state False")
            assert mapper.stop() == 0
    run = mapper.log()[mapper.log().rindex("event bus: mqtt://"):]
    assert "led: state ok" not in run[:run.index("connected to mqtt://")]  # the case at hand: connected first
    readings = {(r["value"], r["ts"]) for r in orjson.loads(
        cli(mapper, "twin", "history", "led", "power", "--limit", "100000", "--json")) if r["quality"] == "good"}
    assert first["power"] is False and (False, first["ts"]) in readings, (first, sorted(readings))


# -- what a Home Assistant user sees of a device refused, failing, or reloaded ------------------

def no_driver(yaml: str) -> str:
    """The device `yaml` with a protocol for which no driver is installed: refused, not run."""
    return yaml.replace("protocolName: simulated\n    configData", "protocolName: bacnet\n    configData")


def until_seen(app: MqttProbe, wanted: dict[str, bytes | Callable[[dict], bool]], timeout: float = 20.0) -> None:
    """Return once every topic of `wanted` has had a live message that matches (bytes: equal to
    the payload; a function: true of the JSON body); other messages are skipped."""
    missing = dict(wanted)
    while missing:
        message = app.next_message(timeout)
        want = missing.get(message.topic)
        if want is None or message.retain:
            continue
        if want == message.payload if isinstance(want, bytes) else want(orjson.loads(message.payload)):
            del missing[message.topic]


def test_a_device_refused_at_start_is_announced_offline(broker, tmp_path, node):
    """A previous run ran `odd` and left `online` on its retained availability; this run refuses it
    (its protocol has no driver installed now). Nothing replaced that `online`: Home Assistant
    showed the device available while the mapper did not run it. Now the mapper announces
    `offline` for every refused device at connect, retained. `lamp` runs next to it as usual."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    (devices / "odd.yaml").write_text(no_driver(device_yaml("odd")))
    topic = f"mapper/{node}/default/odd/availability"
    lamp = f"mapper/{node}/default/lamp/availability"
    with broker.client("mapper") as earlier:  # what the previous run left
        earlier.publish(topic, b"online", retain=True)
    assert retained(broker, topic) == b"online"
    with broker.client("app") as app:
        app.subscribe(topic)
        app.subscribe(lamp)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            until_seen(app, {topic: b"offline", lamp: b"online"})
            assert "refusing device default/odd" in mapper.log()
            assert retained(broker, topic) == b"offline"


def test_a_device_a_reload_refuses_goes_offline(broker, tmp_path, node):
    """`lamp` runs and is `online`; its file changes to a protocol with no driver and SIGHUP reloads
    it: refused, it is stopped, its retained availability goes `offline` and its retained state
    says `"state":"offline"`, with the last values read. `other` runs on."""
    devices = write_devices(tmp_path / "dev", ["lamp", "other"], cycle=100)
    base = f"mapper/{node}/default/lamp"
    other = f"mapper/{node}/default/other/availability"
    with broker.client("app") as app:
        for topic in (f"{base}/availability", f"{base}/state", other):
            app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            until_seen(app, {f"{base}/availability": b"online", other: b"online",
                             f"{base}/state": lambda b: b["state"] == "ok"})
            (devices / "lamp.yaml").write_text(no_driver(device_yaml("lamp", cycle=100)))
            mapper.process.send_signal(signal.SIGHUP)
            until_seen(app, {f"{base}/availability": b"offline",
                             f"{base}/state": lambda b: b["state"] == "offline" and "temperature" in b})
            mapper.wait_log("reload done")
            assert "refusing device default/lamp" in mapper.log()
            assert retained(broker, f"{base}/availability") == b"offline"
            assert orjson.loads(retained(broker, f"{base}/state"))["state"] == "offline"
            assert retained(broker, other) == b"online"


def test_the_retained_state_follows_a_device_that_becomes_unhealthy(broker, tmp_path, node):
    """A sensor's reads start failing (unplugged): its availability went `offline`, but its retained
    state kept `"state":"ok"`, as state messages went out only with good readings. A change of
    the device's state now sends the state message at once with the new state, the values and
    `ts` of the last good readings; and `ok` again when it comes back."""
    fault = tmp_path / "unplugged"
    devices = write_devices(tmp_path / "dev", ["probe"], cycle=50,
                            configs={"probe": "{fail_while_exists: " + str(fault) + "}"})
    base = f"mapper/{node}/default/probe"
    with broker.client("app") as app:
        app.subscribe(f"{base}/state")
        app.subscribe(f"{base}/availability")
        with MapperProcess(tmp_path, devices, broker, node=node):
            good = live_json(app, f"{base}/state", lambda b: b["state"] == "ok")
            fault.touch()
            failing = live_json(app, f"{base}/state", lambda b: b["state"] != "ok")
            assert failing["state"] == "unhealthy" and failing["ts"] >= good["ts"], (good, failing)
            assert set(failing) == set(good), (good, failing)  # the last values stay
            assert retained(broker, f"{base}/availability") == b"offline"
            assert orjson.loads(retained(broker, f"{base}/state"))["state"] == "unhealthy"
            fault.unlink()
            live_json(app, f"{base}/state", lambda b: b["state"] == "ok")


def test_a_property_a_reload_removes_leaves_the_state(broker, tmp_path, node):
    """A reload drops `power` and `count` from `lamp`, and moves its temperature to about 40: the
    state message kept the last `power` and `count` of before the reload for as long as the
    mapper ran. The state view now holds the properties of the device's definition only."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    state_topic = f"mapper/{node}/default/lamp/state"
    with broker.client("app") as app:
        app.subscribe(state_topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            before = live_json(app, state_topic, lambda b: {"temperature", "power", "count"} <= b.keys())
            assert before["temperature"] < 30
            only_temperature = device_yaml("lamp", cycle=100).split("    - name: power")[0]
            (devices / "lamp.yaml").write_text(
                only_temperature.replace("base: 21, amplitude: 1, noise: 0.1", "base: 40, amplitude: 0, noise: 0"))
            mapper.process.send_signal(signal.SIGHUP)
            after = live_json(app, state_topic, lambda b: b.get("temperature", 0) > 30)
            mapper.wait_log("reload done: changed default/lamp")
            assert set(after) == {"temperature", "ts", "state", "seq"}, after
            assert set(orjson.loads(retained(broker, state_topic))) == {"temperature", "ts", "state", "seq"}


def test_a_state_change_the_locked_twin_kept_does_not_follow_the_stop_offline(tmp_path, node):
    """A device comes back (`ok`) while another process holds the twin's write lock: its state
    change is kept and written again once a second. The mapper is stopped, the lock let go: the
    stop queued every device's `offline`, and the retry then wrote the kept `online` (and
    `"state":"ok"`) after it, while the outbox drained: the broker kept `online` for a stopped
    device. The broker is held (frozen) during the stop, so that the drain lasts until the retry
    had its chance: it is let go once the mapper logged either outcome."""
    ensure_mosquitto_installed()
    fault = tmp_path / "unplugged"
    devices = write_devices(tmp_path / "dev", ["probe"], cycle=50,
                            configs={"probe": "{fail_while_exists: " + str(fault) + "}"})
    base = f"mapper/{node}/default/probe"
    written_after_all, dropped = "device states saved in the twin again", "device states the twin could not take"
    with MosquittoBroker() as own:
        with MapperProcess(tmp_path, devices, own, node=node, extra="  drain_on_stop_s: 30\n",
                           env={"MAPPER_TWIN__BUSY_TIMEOUT_MS": "50"}) as mapper:
            with own.client("app") as app:
                app.subscribe(f"{base}/availability")
                assert next_payload(app, f"{base}/availability") == b"online"
                fault.touch()
                wait_payload(app, f"{base}/availability", b"offline")
            with TwinLock(mapper.twin_path) as lock:
                fault.unlink()
                mapper.wait_log("default/probe: state ok not saved in the twin")
                own.freeze()
                try:
                    mapper.process.send_signal(signal.SIGTERM)
                    lock.release()  # the stop's last commits go through (the mapper's lock timeout is 50 ms)
                    wait_for(lambda: written_after_all in mapper.log() or dropped in mapper.log(), timeout=15,
                             what="the kept state written, or dropped, in the mapper log")
                finally:
                    own.thaw()
                assert mapper.stop() == 0, mapper.log()[-3000:]
        assert retained(own, f"{base}/availability") == b"offline", mapper.log()[-3000:]
        assert orjson.loads(retained(own, f"{base}/state"))["state"] == "offline"
        assert retained(own, f"mapper/{node}/availability") == b"offline"
