"""Edge broker bridged to a cloud broker with the shipped configs: telemetry out, desired values in."""

from __future__ import annotations

import contextlib
import json
import signal
import time

from helpers import device_yaml, write_devices
from brokers import CompromisedCloud, MosquittoBroker, ensure_mosquitto_installed, wait_until_bridged
from mapper_proc import MapperProcess


def next_matching(probe, topic: str, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = probe.next_message(timeout=left)
        if message.topic == topic:
            body = json.loads(message.payload)
            if predicate(body):
                return body
    raise AssertionError(f"no matching message on {topic}")


def test_telemetry_reaches_the_cloud_and_cloud_desired_reaches_the_device(cloud_and_edge, tmp_path):
    """Readings published on the edge arrive at the cloud broker; a `.../set` and a $hw twin/update sent on
    the cloud broker reach the device, which reports the new values back up to the cloud."""
    cloud, edge, node = cloud_and_edge
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with MapperProcess(tmp_path, devices, edge, node=node) as mapper, cloud.client("app", tls=True) as app:
        app.subscribe(f"mapper/{node}/default/lamp/+")
        app.subscribe(f"edge/{node}/$hw/events/device/default/lamp/twin/update/#")
        mapper.wait_log("connected to mqtt://")
        first = next_matching(app, f"mapper/{node}/default/lamp/count", lambda b: True)
        assert first["seq"] >= 1 and "ts" in first
        assert str(app.publish(f"mapper/{node}/default/lamp/power/set", b"true")) == "Success"
        next_matching(app, f"mapper/{node}/default/lamp/power", lambda b: b["value"] is True)
        update = json.dumps({"event_id": "c1", "twin": {"count": {"expected": {"value": "1000"}}}})
        app.publish(f"edge/{node}/$hw/events/device/default/lamp/twin/update", update)
        result = next_matching(app, f"edge/{node}/$hw/events/device/default/lamp/twin/update/result",
                               lambda b: b["event_id"] == "c1")
        assert "code" not in result and result["twin"]["count"]["expected"]["value"] == "1000"
        next_matching(app, f"mapper/{node}/default/lamp/count", lambda b: 1000 <= b["value"] < 1100)
        assert mapper.stop() == 0
    # Its own availability, state and health, carried out by the bridge, are never taken for another client's.
    assert "another client published" not in mapper.log()


def test_a_command_retained_on_the_cloud_is_never_applied_not_even_at_a_bridge_reconnect(cloud_and_edge, tmp_path):
    """A `/set` retained on the cloud broker reaches the Pi with its retain flag (the mapper subscribes
    with MQTT 5 retain-as-published), live and again at every reconnect of the bridge, when the cloud
    broker hands its copy to the bridge once more: it is ignored each time, so an old command never
    sets its value over a newer one."""
    cloud, edge, node = cloud_and_edge
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    power, count = f"mapper/{node}/default/lamp/power", f"mapper/{node}/default/lamp/count"
    with MapperProcess(tmp_path, devices, edge, node=node) as mapper, cloud.client("app", tls=True) as app:
        app.subscribe(power)
        app.subscribe(count)
        mapper.wait_log("connected to mqtt://")
        app.publish(f"{power}/set", b"true")
        next_matching(app, power, lambda b: b["value"] is True)
        app.publish(f"{power}/set", b"false", retain=True)  # kept by the cloud broker
        mapper.wait_log("ignored a retained message on")
        cloud.restart()  # the bridge reconnects and subscribes again: the cloud hands it the copy again
        wait_until_bridged(cloud, edge, timeout=60)
        with cloud.client("app", tls=True) as app2:
            app2.subscribe(power)
            app2.subscribe(count)
            # Sent after the bridge's subscriptions are in place, so after the copy on that connection.
            app2.publish(f"{count}/set", b"5000")
            next_matching(app2, count, lambda b: 5000 <= b["value"] < 6000)
            assert next_matching(app2, power, lambda b: True)["value"] is True
        mapper.wait_log("ignored a retained message on", count=2)  # the copy did come again
        assert mapper.stop() == 0
    assert "applied desired value false" not in mapper.log()


def test_a_reload_that_changes_the_devices_reaches_the_cloud_as_membership_updated(cloud_and_edge, tmp_path):
    """A reload that adds or removes devices makes `$hw/events/node/<node>/membership/updated` on the
    Pi (docs/kubeedge.md); the bridge carries it out as it does the twin results, under
    `edge/<node>/`, and the cloud's `app` reads it. The bridge used to carry no membership topic:
    a cloud app tracking a node's devices never learnt of a change."""
    cloud, edge, node = cloud_and_edge
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    topic = f"edge/{node}/$hw/events/node/{node}/membership/updated"
    with MapperProcess(tmp_path, devices, edge, node=node) as mapper, cloud.client("app", tls=True) as app:
        assert not app.subscribe(topic).is_failure
        app.subscribe(f"mapper/{node}/default/lamp/count")
        mapper.wait_log("connected to mqtt://")
        next_matching(app, f"mapper/{node}/default/lamp/count", lambda b: True)  # the bridge carries its readings
        (devices / "lamp.yaml").unlink()
        (devices / "fan.yaml").write_text(device_yaml("fan", cycle=200))
        mapper.process.send_signal(signal.SIGHUP)
        update = next_matching(app, topic, lambda b: True)
        assert [d["id"] for d in update["added_devices"]] == ["default/fan"], update
        assert [d["id"] for d in update["removed_devices"]] == ["default/lamp"], update
        assert mapper.stop() == 0


def test_a_cloud_app_asks_a_node_for_its_devices_and_gets_the_answer(cloud_and_edge, tmp_path):
    """A cloud app's `edge/<node>/$hw/events/node/<node>/membership/get` reaches the mapper on the Pi
    (the bridge takes it in as it takes twin/get), and the answer comes back to the app as
    `edge/<node>/$hw/events/node/<node>/membership/get/result`. The bridge used to carry neither:
    a cloud app could ask a Pi for a device's twin but not for its devices."""
    cloud, edge, node = cloud_and_edge
    devices = write_devices(tmp_path / "dev", ["lamp", "fan"], cycle=200)
    request = f"edge/{node}/$hw/events/node/{node}/membership/get"
    with MapperProcess(tmp_path, devices, edge, node=node) as mapper, cloud.client("app", tls=True) as app:
        assert not app.subscribe(f"{request}/result").is_failure
        app.subscribe(f"mapper/{node}/default/lamp/count")
        mapper.wait_log("connected to mqtt://")
        next_matching(app, f"mapper/{node}/default/lamp/count", lambda b: True)  # the mapper is subscribed
        assert str(app.publish(request, json.dumps({"event_id": "m1"}))) == "Success"
        result = next_matching(app, f"{request}/result", lambda b: b["event_id"] == "m1")
        assert sorted(d["id"] for d in result["devices"]) == ["default/fan", "default/lamp"], result
        assert mapper.stop() == 0


def retained_value(broker, topic: str) -> bytes:
    """What the broker keeps retained on `topic` (what an app subscribing now is told first)."""
    with broker.client("app") as reader:
        reader.subscribe(topic)
        message = reader.next_message()
        assert message.retain and message.topic == topic, message.topic
        return message.payload


def test_the_bridge_subscribes_to_the_commands_only_but_a_compromised_cloud_publishes_any_topic(tmp_path):
    """What mosquitto/README.md ("What the bridge lets the cloud do") says of the shipped bridge:
    bridge.conf's `in` lines subscribe the bridge to what the cloud legitimately sends down (desired
    values, twin and membership requests, offload results), and nothing else, yet Mosquitto 2.0
    takes any PUBLISH the cloud's end sends on the bridge connection, past the Pi's ACL: a forged
    retained state, availability or health reaches the Pi's apps. No bridge setting narrows it; the
    mapper corrects what it can (its node's availability and health, below)."""
    ensure_mosquitto_installed()
    node = "pi-test"
    cloud = MosquittoBroker("cloud.conf")  # rendered, never started: the attacker's server takes its port
    try:
        with CompromisedCloud(cloud) as attacker, \
                MosquittoBroker("mosquitto.conf", bridge_to=cloud, node=node) as edge:
            assert sorted(attacker.wait_subscribed()) == sorted([
                f"mapper/{node}/+/+/+/set", f"edge/{node}/$hw/events/device/+/+/twin/update",
                f"edge/{node}/$hw/events/device/+/+/twin/get", f"edge/{node}/$hw/events/node/{node}/membership/get",
                f"mapper/{node}/offload/result"])
            forged = {f"mapper/{node}/default/lamp/state": b'{"power":{"value":true}}',
                      f"mapper/{node}/default/lamp/availability": b"online",
                      f"mapper/{node}/health": b'{"twin":"ok"}'}
            with edge.client("app") as app:
                for topic in forged:
                    app.subscribe(topic)
                for topic, payload in forged.items():
                    attacker.publish(topic, payload, retain=True)
                heard = [app.next_message() for _ in forged]
                assert {m.topic: m.payload for m in heard} == forged
            for topic, payload in forged.items():  # and kept: what an app subscribing later is told
                assert retained_value(edge, topic) == payload, topic
    finally:
        cloud.close()


def test_a_health_the_cloud_forges_through_the_bridge_is_corrected_by_the_mapper(tmp_path):
    """A compromised cloud broker leaves a retained `unwritable` (or an `ok` hiding a twin that cannot be
    written) on the node's health through the bridge, which Mosquitto takes from it on any topic (above).
    It stayed until the mapper's next message there: the next connect or the next change of the twin,
    so for as long as the twin stayed as it was. The mapper now hears its health topic as it hears
    its availability, and publishes its own health again (WARNING in its log), at most once per
    HEALTH_INTERVAL_S."""
    ensure_mosquitto_installed()
    node = "pi-test"
    topic = f"mapper/{node}/health"
    forged = b'{"twin":"unwritable","since":1,"cause":"disk full","readings_waiting":9}'
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with mapper_behind_a_compromised_cloud(tmp_path, devices, node) as (attacker, edge, mapper, app):
        app.subscribe(topic)
        next_matching(app, topic, lambda b: b["twin"] == "ok")  # the mapper's, at its connect
        attacker.publish(topic, forged, retain=True)
        assert app.next_message().payload == forged  # it did reach the Pi's apps
        corrected = next_matching(app, topic, lambda b: True)
        assert corrected["twin"] == "ok", corrected
        assert json.loads(retained_value(edge, topic))["twin"] == "ok"  # what an app subscribing now is told
        mapper.wait_log("another client published on the node's health")
        assert mapper.stop() == 0


def test_a_device_availability_and_state_the_cloud_forges_through_the_bridge_are_corrected(tmp_path):
    """A compromised cloud broker leaves a retained `offline` on a running device's availability and a
    state view of its own through the bridge (above). The availability stayed until the device's
    state changed (days, for a device that works) and the state view until its next reading. The
    mapper now subscribes to its devices' views for what other clients publish (MQTT 5 No Local: its
    own do not come back, nor retained ones at the subscribe) and publishes the device's own again,
    at most once per REASSERT_INTERVAL_S."""
    ensure_mosquitto_installed()
    node = "pi-test"
    availability, state = f"mapper/{node}/default/lamp/availability", f"mapper/{node}/default/lamp/state"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=60_000)  # one reading a minute: no state meanwhile
    with mapper_behind_a_compromised_cloud(tmp_path, devices, node) as (attacker, edge, mapper, app):
        app.subscribe(availability)
        app.subscribe(state)
        next_message_on(app, state, lambda m: json.loads(m.payload)["state"] == "ok")  # after its `online`
        attacker.publish(availability, b"offline", retain=True)
        attacker.publish(state, b'{"state":"offline"}', retain=True)
        # It did reach the Pi's apps (after any `online` of the mapper's still on its way), then the mapper's:
        next_message_on(app, availability, lambda m: m.payload == b"offline")
        next_message_on(app, state, lambda m: m.payload == b'{"state":"offline"}')  # (after a view of its start's)
        assert next_message_on(app, availability).payload == b"online"
        assert json.loads(next_message_on(app, state).payload)["state"] == "ok"
        assert retained_value(edge, availability) == b"online"
        assert json.loads(retained_value(edge, state))["state"] == "ok"
        lines = [line for line in mapper.log().splitlines() if "another client published" in line]
        assert lines and all("default/lamp/" in line and " WARNING " in line for line in lines), lines
        assert mapper.stop() == 0


@contextlib.contextmanager
def mapper_behind_a_compromised_cloud(tmp_path, devices, node: str):  # noqa: ANN001, ANN201
    """A mapper of `devices` on an edge broker bridged to a cloud broker the attacker holds, and an
    app on the edge: (attacker, edge, mapper, app), once the bridge has subscribed at the cloud."""
    cloud = MosquittoBroker("cloud.conf")
    try:
        with CompromisedCloud(cloud) as attacker, \
                MosquittoBroker("mosquitto.conf", bridge_to=cloud, node=node) as edge, \
                MapperProcess(tmp_path, devices, edge, node=node) as mapper, edge.client("app") as app:
            attacker.wait_subscribed()
            yield attacker, edge, mapper, app
    finally:
        cloud.close()


def next_message_on(probe, topic: str, predicate=lambda message: True, timeout: float = 20.0):
    """The next message on `topic` of which `predicate` is true (others skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = probe.next_message(timeout=left)
        if message.topic == topic and predicate(message):
            return message
    raise AssertionError(f"no message on {topic}")
