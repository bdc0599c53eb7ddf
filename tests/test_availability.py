"""Availability as an app sees it on a real Mosquitto.

The node's retained `online`/`offline` (a clean stop says `offline`, a crash leaves it to the
last will), each device's retained availability following its state, and both published
again after the mapper reconnects to a broker that lost them.
"""

from __future__ import annotations

import secrets

import pytest

from brokers import MosquittoBroker, MqttProbe, ensure_mosquitto_installed
from helpers import write_devices
from mapper_proc import MapperProcess


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
    """A clean stop publishes `offline` itself; after SIGKILL the broker publishes the last will."""
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


def test_device_availability_follows_its_state(broker, tmp_path, node):
    """A failing sensor goes `offline` (unhealthy) while the node stays `online`; it comes back by itself."""
    fault = tmp_path / "unplugged"
    devices = write_devices(tmp_path / "dev", ["probe"], cycle=50,
                            configs={"probe": "{fail_while_exists: " + str(fault) + "}"})
    topic = f"mapper/{node}/default/probe/availability"
    with broker.client("app") as app:
        app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, node=node):
            # (A connection made before the first read announces the device `offline`: its state is
            # still unknown. `online` follows with that read.)
            wait_payload(app, topic, b"online")
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
