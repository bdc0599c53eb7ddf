"""Availability as an app sees it on a real Mosquitto.

The node's retained `online`/`offline` (a clean stop says `offline`, a crash leaves it to the
last will), each device's retained availability following its state (`offline` after a clean
stop), and both published again after the mapper reconnects to a broker that lost them; a
device's retained state as a Home Assistant user reads it after a stop and at the next start.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import sqlite3
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from brokers import MosquittoBroker, MqttProbe, ensure_mosquitto_installed
from devices.ids import DeviceId
from helpers import TwinLock, device_yaml, one_property_device, wait_for, write_devices
from mapper_proc import REPO, MapperProcess
from twin.store import TwinStore


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


def test_an_offline_another_client_retains_on_the_running_nodes_availability_is_corrected(broker, tmp_path, node):
    """The bridge hands on whatever the cloud broker sends, retained too, past the local ACL: a
    compromised cloud could leave `offline` retained on the node's availability while the mapper
    runs, and every app that subscribed afterwards believed the node down. The mapper now publishes
    its `online` again (WARNING in its log), at most once per REASSERT_INTERVAL_S however often the
    other client repeats it; and a clean stop still ends with its own `offline`."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    topic = f"mapper/{node}/availability"
    with broker.client("app") as app, MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        app.subscribe(topic)
        assert next_payload(app, topic) == b"online"
        with broker.client("mapper") as bridge:  # a user with the bridge's rights on the topic
            assert not bridge.publish(topic, b"offline", retain=True).is_failure
        assert next_payload(app, topic) == b"offline"
        wait_payload(app, topic, b"online")
        assert retained(broker, topic) == b"online"  # what a dashboard subscribing now is told
        mapper.wait_log("another client published b'offline' on the node's availability")
        assert " WARNING " in next(line for line in mapper.log().splitlines() if "another client published" in line)
        # Bounded: 30 more at once get one `online` at once at most, the next after the interval
        # (REASSERT_INTERVAL_S, 5 s), not one each (counted until the 30th `offline` has come by).
        with broker.client("mapper") as bridge:
            for _ in range(30):
                bridge.publish(topic, b"offline", retain=True)
        seen: list[bytes] = []
        while seen.count(b"offline") < 30:
            seen.append(next_payload(app, topic, timeout=30))
        assert seen.count(b"online") <= 2, seen
        wait_payload(app, topic, b"online", timeout=15)  # the last word is the mapper's
        assert retained(broker, topic) == b"online"
        lines = [line for line in mapper.log().splitlines() if "another client published" in line]
        assert 1 <= len(lines) <= 3, lines  # a few lines a minute, not one per message
        assert mapper.stop() == 0
        wait_payload(app, topic, b"offline")
    assert retained(broker, topic) == b"offline"


def test_a_broker_that_stops_is_not_taken_for_another_mapper_on_the_node(tmp_path, node):
    """Mosquitto publishes its clients' last wills when it stops: the mapper received its own
    `offline` on the node's availability and logged, at every broker restart (a package upgrade),
    a WARNING "another client published b'offline' ... (another mapper serving this node that
    stopped ...?)", sending its reader after a second mapper that does not exist. Its will now
    carries a mark of this connection (an MQTT 5 user property, kept through the incoming queue,
    which drops the other properties), and its own will is recognised. Whether the will reaches
    the mapper before the broker closes its connection varies: the broker is stopped until it did
    (at most RESTARTS times)."""
    ensure_mosquitto_installed()
    restarts = 12
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    topic = f"mapper/{node}/availability"
    own_will = "the broker published this connection's last will"
    with MosquittoBroker() as broker, MapperProcess(tmp_path, devices, broker, node=node,
                                                    env={"MAPPER_LOG_LEVEL": "debug"}) as mapper:
        with broker.client("app") as app:
            app.subscribe(topic)
            assert next_payload(app, topic) == b"online"
        mapper.wait_log("announced on")  # (after its subscriptions: it hears its own availability)
        for attempt in range(1, restarts + 1):
            lost = mapper.log().count("lost or refused")
            broker.stop()
            mapper.wait_log("lost or refused", count=lost + 1)
            if own_will in mapper.log() or "another client published" in mapper.log():
                break
            broker.start()
            mapper.wait_log("announced on", count=attempt + 1, timeout=30)
        assert own_will in mapper.log(), mapper.log()[-3000:]
        assert "another client published" not in mapper.log(), mapper.log()[-3000:]
        assert mapper.stop() == 0


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
    """The broker comes back without the retained messages: the mapper publishes them again.

    The mapper's will (`offline`, retained) may be what an app finds first: the broker stopping
    publishes it, and an app subscribing before the mapper is back gets it. What counts is that
    `online` follows and stays retained."""
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
            seen: dict[str, bytes] = {}
            for _ in range(20):  # (bounded: a will, then the values the mapper publishes again)
                message = app.next_message(30)
                if message.payload:
                    seen[message.topic] = message.payload
                if seen == {node_topic: b"online", device_topic: b"online"}:
                    break
        assert seen == {node_topic: b"online", device_topic: b"online"}
        mapper.wait_log("connected to mqtt://", count=2)
        assert retained(own, node_topic) == b"online" and retained(own, device_topic) == b"online"



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
    mapper was down and the relay off. Now the stop leaves `offline` on both, and in the twin; the
    state keeps the last value measured, with the time it was measured (what close() did was not
    measured)."""
    devices = write_led(tmp_path / "dev")
    base = f"mapper/{node}/default/led"
    with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        switch_led_on(broker, mapper, node)
        assert retained(broker, f"{base}/availability") == b"online"
        assert mapper.stop() == 0
    assert retained(broker, f"mapper/{node}/availability") == b"offline"
    assert retained(broker, f"{base}/availability") == b"offline"
    state = orjson.loads(retained(broker, f"{base}/state"))
    twin = orjson.loads(cli(mapper, "twin", "get", "led", "--json"))
    power = twin["properties"]["power"]
    assert (state["state"], state["power"], state["ts"]) == ("offline", True, power["reportedTs"])
    # The twin says so too (it said `state=ok`, contradicting MQTT and the switched-off relay).
    assert (twin["state"], twin["stateDetail"]) == ("offline", "stopped: the mapper stopped"), twin


def test_a_mapper_that_fails_leaves_the_devices_last_state_in_the_twin(tmp_path):
    """A clean stop writes `offline` for every device it ran; a mapper whose task group fails (here an
    extension's task raises once the devices run) is no clean stop: as after a crash, the twin keeps
    each device's last state (the stop's write ran on that path too, and said "stopped")."""
    import asyncio

    from mapper.config import MapperConfig, TwinSettings
    from mapper.runtime import build_service

    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=50)
    config = MapperConfig(node="test-node", devices=[devices], twin=TwinSettings(path=tmp_path / "twin.db"))
    lamp = DeviceId("default", "lamp")

    class Failing:
        """An extension whose task fails once the lamp's state `ok` is in the twin."""

        async def setup(self, service) -> None:  # noqa: ANN001
            pass

        async def run(self, service) -> None:  # noqa: ANN001
            await service.ready.wait()
            async with asyncio.timeout(10):
                while (await service.twin(lambda s: s.device(lamp))).state != "ok":
                    await asyncio.sleep(0.02)  # (another thread's writes: nothing to await here)
            raise RuntimeError("an extension failed")

        async def shutdown(self, service) -> None:  # noqa: ANN001
            pass

    async def main() -> None:
        service = build_service(config)
        service.extensions.append(Failing())
        with pytest.raises(ExceptionGroup) as failed:
            await service.run(asyncio.Event())
        assert failed.group_contains(RuntimeError, match="an extension failed")

    asyncio.run(main())
    with TwinStore.open(tmp_path / "twin.db") as store:
        device = store.device(lamp)
    assert (device.state, device.state_detail) != ("offline", "stopped: the mapper stopped"), device
    assert device.state == "ok", device


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


def quiet_reload(broker: MosquittoBroker, tmp_path, node: str, device: str, before: str, after: str,
                 *, then: Callable[[MapperProcess], None] | None = None) -> tuple[MapperProcess, list[dict]]:
    """Run `device` (file text `before`, no property reporting to the cloud) with
    mqtt.state_interval_ms at 60 s: after its first state messages the outbox stays empty, so a
    subscriber that comes after that gets no state message built before the reload. Then `after`
    and SIGHUP, `then(mapper)`, SIGTERM. Returns the mapper and every live state message from the
    SIGHUP to the stop's `offline` one (the only messages the reload and the stop made)."""
    devices = tmp_path / "dev"
    devices.mkdir(exist_ok=True)
    (devices / f"{device}.yaml").write_text(before)
    state_topic = f"mapper/{node}/default/{device}/state"
    # (No twin documents of the readings either: they would keep the outbox busy.)
    with MapperProcess(tmp_path, devices, broker, node=node,
                       extra="  state_interval_ms: 60000\n  reading_documents: false\n") as mapper:
        def first_state() -> dict | None:
            with broker.client("app") as fresh:
                fresh.subscribe(state_topic)
                try:
                    return orjson.loads(fresh.next_message(1).payload)
                except TimeoutError:
                    return None
        wait_for(lambda: (s := first_state()) is not None and s["state"] == "ok", what="the first state message")

        def depth() -> int:
            with TwinStore.open(mapper.twin_path) as store:
                return store.outbox_stats()["depth"]
        wait_for(lambda: depth() == 0, what="the outbox to be empty")
        seen = []
        with broker.client("app") as app:
            app.subscribe(state_topic)
            assert app.next_message(10).retain  # what was sent before: the retained message
            (devices / f"{device}.yaml").write_text(after)
            mapper.process.send_signal(signal.SIGHUP)
            seen.append(live_json(app, state_topic, lambda b: True))
            mapper.wait_log(f"reload done: changed default/{device}")
            if then is not None:
                then(mapper)
            assert mapper.stop() == 0
            while seen[-1]["state"] != "offline":
                seen.append(live_json(app, state_topic, lambda b: True))
    return mapper, seen


def first_good_readings(mapper: MapperProcess, device: str, name: str, value) -> list[int]:
    """The times of the readings of `value` in the twin's history, oldest first."""
    history = orjson.loads(cli(mapper, "twin", "history", device, name, "--limit", "100000", "--json"))
    return sorted(r["ts"] for r in history if r["quality"] == "good" and r["value"] == value)


def test_a_device_a_reload_changes_states_only_what_it_reads_now(broker, tmp_path, node):
    """A reload changes the `base` of a probe's temperature from 21 to 40. The device's new runner
    started `unknown`; its first good read set it `ok` before the reading was recorded, and that
    state change sent the view kept from before the reload: `{"temperature":21.0,"state":"ok"}`
    with the old `ts`. Then the pacing of the old runner's state messages held the first reading
    of 40 back (up to mqtt.state_interval_ms, here 60 s). A changed device now starts its view
    afresh: the first state message after the reload carries the first reading of 40, and no
    state message after it a value of before."""
    def probe(base: int) -> str:
        return one_property_device(
            "probe", "{name: temperature, type: FLOAT, accessMode: ReadOnly}",
            f"{{kind: temperature, base: {base}, amplitude: 0, noise: 0}}",
            settings="collectCycle: 100\nreportToCloud: false")

    mapper, seen = quiet_reload(broker, tmp_path, node, "probe", probe(21), probe(40))
    first = seen[0]
    assert (first["temperature"], first["state"]) == (40.0, "ok"), seen
    # The first reading of 40 went out at once (a batch of the recorder may carry two readings).
    assert first["ts"] in first_good_readings(mapper, "probe", "temperature", 40.0)[:2], seen
    assert [s["temperature"] for s in seen] == [40.0] * len(seen), seen
    assert seen[-1]["state"] == "offline"


def test_a_property_a_reload_removes_leaves_the_state(broker, tmp_path, node):
    """A reload drops `power` and `count` from `lamp`, and moves its temperature to 40: the
    state message kept the last `power` and `count` of before the reload for as long as the
    mapper ran. The state view now holds the properties of the device's definition only, read
    since the reload: the first state message after it is the first reading of 40 (this test
    once waited for a temperature above 30, which skipped a message with the values of before)."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)  # (and the model)
    lamp = (devices / "lamp.yaml").read_text().replace("reportToCloud: true", "reportToCloud: false")
    only_temperature = lamp.split("    - name: power")[0].replace(
        "base: 21, amplitude: 1, noise: 0.1", "base: 40, amplitude: 0, noise: 0")
    state_topic = f"mapper/{node}/default/lamp/state"

    def retained_keys(mapper: MapperProcess) -> None:
        wait_for(lambda: "temperature" in orjson.loads(retained(broker, state_topic)), what="the retained state")
        assert set(orjson.loads(retained(broker, state_topic))) == {"temperature", "ts", "state", "seq"}

    mapper, seen = quiet_reload(broker, tmp_path, node, "lamp", lamp, only_temperature, then=retained_keys)
    assert seen[0]["temperature"] == 40.0, seen
    assert all(set(s) == {"temperature", "ts", "state", "seq"} and s["temperature"] == 40.0 for s in seen), seen


FLAPPY_ID = DeviceId("default", "flappy")
# A device that flaps with failure_threshold 1: `bad` fails every read, `temperature` reads well,
# so it goes `unhealthy` and `ok` again in every 50 ms collect cycle, until `{fault}` exists (then
# every read fails: `unhealthy` for good). Neither property is published: only its state is.
FLAPPY = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {{name: flappy-model, namespace: default}}
spec:
  protocol: simulated
  properties:
    - {{name: bad, type: INT, accessMode: ReadOnly}}
    - {{name: temperature, type: FLOAT, accessMode: ReadOnly}}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {{name: flappy, namespace: default}}
spec:
  deviceModelRef: {{name: flappy-model}}
  protocol: {{protocolName: simulated, configData: {{fail_while_exists: {fault}}}}}
  properties:
    - name: bad
      visitors: {{protocolName: simulated, configData: {{kind: constant, value: not a number}}}}
      collectCycle: 50
      reportToCloud: false
    - name: temperature
      visitors: {{protocolName: simulated, configData: {{kind: temperature, base: 21, amplitude: 0, noise: 0}}}}
      collectCycle: 50
      reportToCloud: false
"""


def _flappy_mapper(tmp_path: Path, broker: MosquittoBroker, node: str, fault: Path,
                   ) -> tuple[MapperProcess, Callable[[str], list[tuple[int, object, str]]]]:
    """A `mapper run` (not started) with the FLAPPY device and failure_threshold 1: `bad` fails
    every read, `temperature` reads well, so the device goes `unhealthy` and `ok` again in every
    50 ms collect cycle until `fault` exists. Returns it and the twin's history of a property."""
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "flappy.yaml").write_text(FLAPPY.format(fault=fault))
    mapper = MapperProcess(tmp_path, devices, broker, node=node)
    config = mapper.config.read_text()
    assert "failure_threshold: 3" in config
    mapper.config.write_text(config.replace("failure_threshold: 3", "failure_threshold: 1"))

    def history(name: str) -> list[tuple[int, object, str]]:
        with TwinStore.open(mapper.twin_path) as store:
            return store.history(FLAPPY_ID, name, limit=1_000_000)

    return mapper, history


def _flap_then_fail(history: Callable[[str], list[tuple[int, object, str]]], fault: Path,
                    ) -> tuple[list[int], int, int, int]:
    """Let the running flappy device flap for 40 collect cycles (two state changes each), then stop
    the flapping (the fault file: every read fails, `unhealthy` for good). Returns, by the
    mapper's own reading times: the good readings' `ts`, the last good one's, the first failed
    read of temperature after it, and the device's first change (`bad`'s first, failed, read)."""
    wait_for(lambda: sum(q == "good" for _, _, q in history("temperature")) >= 40, timeout=30,
             what="40 good readings of temperature")
    fault.touch()
    # The flapping has stopped once a read failed after the last good one (`bad` fails always).
    wait_for(lambda: (h := history("temperature")) and h[-1][2] != "good", timeout=30,
             what="a failed read of temperature")
    readings = history("temperature")
    good = [ts for ts, _, q in readings if q == "good"]
    last_good = good[-1]
    first_failed_after = next(ts for ts, _, q in readings if q != "good" and ts >= last_good)
    first_change = history("bad")[0][0]  # its first read failed: `unhealthy`, the first change
    return good, last_good, first_failed_after, first_change


def test_a_flapping_device_writes_its_state_to_the_twin_at_most_once_per_interval(broker, tmp_path, node):
    """The flapping device of the test below made a twin transaction per state change (tens a
    second: SD-card wear, the twin's lock taken from everyone else). Its state writes are paced
    as its messages are: at most one per mqtt.state_interval_ms (1000 ms), the first at once,
    the latest state after the interval. Counted by a SQLite trigger on the twin's devices table
    (every UPDATE of `state`, with the mapper's `state_ts`); once the flapping stops, the twin says
    what the device is (`unhealthy`), and so it does after a clean stop."""
    fault = tmp_path / "unplugged"
    interval = 1000
    mapper, history = _flappy_mapper(tmp_path, broker, node, fault)
    with TwinStore.open(mapper.twin_path):  # the schema, before the mapper's first write
        pass
    with sqlite3.connect(mapper.twin_path) as db:
        db.executescript("""
            CREATE TABLE state_writes (n INTEGER PRIMARY KEY, device TEXT, state TEXT, ts INTEGER);
            CREATE TRIGGER count_state_writes AFTER UPDATE OF state ON devices BEGIN
                INSERT INTO state_writes (device, state, ts) VALUES (NEW.id, NEW.state, NEW.state_ts);
            END;
        """)
    db.close()  # (the context manager commits; it does not close)

    def writes() -> list[tuple[str, int]]:  # the flapping's states written, in order
        with contextlib.closing(sqlite3.connect(mapper.twin_path)) as db:
            return db.execute("SELECT state, ts FROM state_writes WHERE device = ? AND state IN ('ok', 'unhealthy')"
                              " ORDER BY n", (str(FLAPPY_ID),)).fetchall()

    def twin_state() -> str:
        with TwinStore.open(mapper.twin_path) as store:
            return store.device(FLAPPY_ID).state

    with mapper:
        good, last_good, first_failed_after, first_change = _flap_then_fail(history, fault)
        # Its final state is written within one interval after the last change: the last write
        # says `unhealthy`, made after the last good read.
        wait_for(lambda: (w := writes()) and w[-1][0] == "unhealthy" and w[-1][1] > last_good, timeout=10,
                 what="the final `unhealthy` written after the last good read")
        assert twin_state() == "unhealthy"
        during = writes()
        assert mapper.stop() == 0
    assert len(good) >= 40  # (40 cycles flapped: 80 changes, each written before)
    # Writes are at least `interval` apart, from the first change to one interval after the last
    # (which came before the first failed read of temperature after the last good one): the span
    # by the mapper's own reading times, no clock of the test's.
    span = first_failed_after + interval - first_change
    paced = 1 + -(-span // interval) + 1  # (+1: the loop's clock and the readings' are not one)
    assert len(during) <= paced, (len(during), paced, during)
    # A write's `state_ts` is taken when the twin's thread makes it, a little after the mapper
    # decided it: a state held back is written by a timer (one interval after the write before),
    # which fires late on a busy machine, and the twin's thread may finish a commit first. When that
    # timer fired just before the last change (held back in turn), this delay is all the margin
    # there is: 4 ms over the bound in 2 of 15 runs with both cores loaded. Half an interval allows
    # for it.
    late = interval // 2
    assert all(ts <= first_failed_after + interval + late for _, ts in during), (first_failed_after, during)
    # While it flapped, every write but the first wrote a state held back, one interval after the
    # write before it, give or take those delays. A state held back longer (say two intervals) makes
    # every gap that long: it fails here even when the bound above happens to hold.
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(during)]
    assert min(gaps) <= interval + late, (gaps, during)
    # A clean stop writes the device's last state held back by the pacing, then leaves it `offline`.
    assert writes()[-1][0] == "unhealthy" and twin_state() == "offline"


def test_a_flapping_device_sends_its_state_at_most_once_per_interval(broker, tmp_path, node):
    """With `failure_threshold: 1` a device with one property that always fails (a constant its
    type refuses) and one that reads well goes `unhealthy` and `ok` again in every collect cycle
    (50 ms). Each change sent a retained availability message (kind "state": never dropped by the
    outbox limits) and a retained state message: 40 a second, without bound in an outage. They are
    coalesced now: at most one send per mqtt.state_interval_ms (1000 ms), the first at once, the
    latest state after the interval. Once the flapping stops (every read fails: the fault file),
    the last messages say what the device is: `offline`, `"state":"unhealthy"`."""
    fault = tmp_path / "unplugged"
    base = f"mapper/{node}/default/flappy"
    interval = 1000
    mapper, history = _flappy_mapper(tmp_path, broker, node, fault)

    received: list[tuple[str, bytes]] = []
    with broker.client("app") as app:
        app.subscribe(f"{base}/availability")
        app.subscribe(f"{base}/state")
        with mapper:
            good, last_good, first_failed_after, first_change = _flap_then_fail(history, fault)
            # Everything up to the state message made after the last change (it alone says
            # `unhealthy` with the last good reading's `ts`: before it, that reading came with `ok`).
            while True:
                message = app.next_message(20)
                assert not message.retain, message.topic  # (a node of its own: nothing retained before)
                received.append((message.topic, message.payload))
                if message.topic == f"{base}/state":
                    body = orjson.loads(message.payload)
                    if body["state"] == "unhealthy" and body["ts"] == last_good:
                        break
            assert retained(broker, f"{base}/availability") == b"offline"
            after: list[tuple[str, bytes]] = []
            assert mapper.stop() == 0
            while True:  # until the stop's state message
                message = app.next_message(20)
                after.append((message.topic, message.payload))
                if message.topic == f"{base}/state" and orjson.loads(message.payload)["state"] == "offline":
                    break
    availability = [p for t, p in received if t.endswith("/availability")]
    states = [orjson.loads(p) for t, p in received if t.endswith("/state")]
    # Sends of state changes are at least `interval` apart; they happen from the first change to
    # one interval after the last (which came before the first failed read after the last good
    # one). The mapper's own reading times measure that span: no clock of the test's.
    span = first_failed_after + interval - first_change
    paced = 1 + -(-span // interval) + 1  # (+1: the loop's clock and the readings' are not one)
    # One more of each at connect (the announcement), and the state messages of the readings
    # (once per interval, a reading up to half a cycle early counting as on time).
    readings_paced = 2 + -(-(last_good - good[0]) // (interval - 25))
    assert len(availability) <= paced + 1, (len(availability), paced, availability)
    assert len(states) <= paced + 1 + readings_paced, (len(states), paced, readings_paced)
    assert len(good) >= 40  # (40 cycles flapped: 80 changes, each sent before)
    assert availability[-1] == b"offline" and states[-1]["state"] == "unhealthy"
    # After it, until the stop's own `offline`: nothing but the final state (a send held back at
    # most), and the stop's `offline` last.
    assert {p for t, p in after if t.endswith("/availability")} <= {b"offline"}, after
    assert [orjson.loads(p)["state"] for t, p in after if t.endswith("/state")][-1] == "offline", after
    assert {orjson.loads(p)["state"] for t, p in after if t.endswith("/state")} <= {"unhealthy", "offline"}, after


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


def test_a_flapping_devices_state_results_in_a_broker_outage_are_dropped_as_telemetry(tmp_path, node):
    """With the twin protocol served, each state change queued a `$hw/.../state/update/result`
    next to the device's availability, both of kind "state", which the outbox limits never drop:
    a device flapping through a broker outage filled the outbox with never-dropped rows twice as
    fast (pushing readings out), and every stale result replayed at the reconnect. Now the results
    are telemetry for the limits: beyond twin.outbox_max_rows the oldest go. The retained state
    (availability, state view) waits as one row per topic, each superseding the one before."""
    ensure_mosquitto_installed()
    fault = tmp_path / "never"  # never created: the device flaps throughout
    max_rows = 100  # (the least the setting takes)
    with MosquittoBroker() as own:
        mapper, _history = _flappy_mapper(tmp_path, own, node, fault)
        mapper.env = {**mapper.env, "MAPPER_TWIN__OUTBOX_MAX_ROWS": str(max_rows)}
        config = mapper.config.read_text()
        mapper.config.write_text(config + "  state_interval_ms: 0\n")  # unpaced; (the mqtt section is last)

        def snapshot() -> tuple[list[tuple[str, str]], int] | None:  # once the results reached the limit
            with contextlib.closing(sqlite3.connect(mapper.twin_path)) as db:
                rows = db.execute("SELECT kind, topic FROM outbox ORDER BY id").fetchall()
                dropped = db.execute("SELECT value FROM counters WHERE name='outbox_dropped'").fetchone()
            results = sum(t.endswith("/state/update/result") for _, t in rows)
            return (rows, dropped[0]) if dropped and dropped[0] > 0 and results >= 60 else None

        with mapper:
            mapper.wait_log("connected to mqtt://")
            own.stop()
            rows, dropped = wait_for(snapshot, timeout=60, what="the outbox limit reached in the outage")
            own.start()
            mapper.wait_log("connected to mqtt://", count=2)
            assert mapper.stop() == 0
    results = [k for k, t in rows if t.endswith("/state/update/result")]
    states = [t for k, t in rows if k == "state"]
    # The never-dropped rows are the retained state's, one per topic (before: an availability per
    # change and as many results again, 120 of them, over the limit: every telemetry row was
    # dropped as soon as it was queued).
    assert sorted(states) == [f"mapper/{node}/default/flappy/availability", f"mapper/{node}/default/flappy/state"], rows
    # The limit holds: the droppable rows (results) made room, and results remain.
    assert len(rows) <= max_rows, len(rows)
    assert results and all(k == "telemetry" for k in results), rows
    assert dropped > 0
