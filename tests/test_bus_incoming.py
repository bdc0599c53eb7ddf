"""A flood of incoming messages against the mapper's MQTT connection, over a real Mosquitto.

Incoming messages are handled one at a time (each may wait for the twin), so a client that
sends faster than that builds a queue. In memory it grew without bound (about 6 KB a message:
100,000 twin/get requests took a running mapper from 43 MB to 700 MB, and 1 GB after a second
round). QoS 1 messages are acknowledged once handled, and MQTT 5's Receive Maximum asks the broker
to hold the rest; the Mosquitto these tests run (Debian 12's 2.0.11) sends on past it once
acknowledgements come, so a waiting message keeps only what the handlers read, and a message that
finds the limit (messages, or payload bytes) waiting is dropped, acknowledged, counted and logged.
The limits are lowered here so that a flood of a few thousand reaches them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from eventbus import bus as bus_module
from eventbus.bus import MqttBus
from eventbus.settings import MqttSettings
from helpers import async_wait_for

COUNT = 3_000


async def _nothing(*_args: object) -> None:
    return None


async def _bus(broker, tmp_path, protocol: str, topic: str, handler) -> tuple[MqttBus, asyncio.Task]:  # noqa: ANN001
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            protocol=protocol, reconnect_min_s=0.2, reconnect_max_s=0.5)
    bus = MqttBus(settings, client_id=f"incoming-{uuid.uuid4().hex[:8]}", will_topic="mapper/incoming/availability",
                  subscriptions=[(topic, 1)], on_message=handler, on_connect=_nothing)
    task = asyncio.create_task(bus.run())
    async with asyncio.timeout(10):
        await bus.connected.wait()
    return bus, task


async def _everything_sent_is_here(bus: MqttBus) -> None:
    """Every message the broker had sent this connection before now has been read into the
    client's queue: the SUBACK comes after them on the connection, and paho reads in order."""
    assert bus.client is not None
    await bus.client.subscribe(f"mapper/incoming/barrier/{uuid.uuid4().hex[:8]}", qos=1)


def _queued(bus: MqttBus) -> int:
    assert bus.client is not None
    return bus.client._queue.qsize()  # noqa: SLF001 - aiomqtt's queue of messages not yet handled


def _flood(broker, topic: str, qos: int) -> None:  # noqa: ANN001
    """COUNT messages from an app, then one QoS 1 message whose PUBACK says the broker has routed them all."""
    with broker.client("app") as app:
        for i in range(COUNT):
            app._client.publish(topic, b'{"event_id":"%d"}' % i, qos)  # noqa: SLF001 - no wait per message
        assert not app.publish(topic, b'{"event_id":"last"}', qos=1).is_failure


def _throttled_drop_lines(caplog) -> list[str]:  # noqa: ANN001
    return [r.getMessage() for r in caplog.records if "dropped an incoming message" in r.getMessage()]


@pytest.mark.parametrize(("protocol", "qos", "limit"), [
    ("5", 1, "messages"), ("3.1.1", 1, "messages"), ("5", 0, "messages"), ("5", 0, "bytes")])
async def test_a_flood_is_held_to_a_limit_and_every_message_is_handled_or_counted(broker, tmp_path, caplog,
                                                                                   monkeypatch, protocol, qos, limit):
    if limit == "messages":
        monkeypatch.setattr(bus_module, "INCOMING_LIMIT", 1_000)
    else:  # 1,000 of the flood's ~17-byte payloads
        monkeypatch.setattr(bus_module, "INCOMING_BYTES", 17_000)
    topic = f"$hw/events/device/default/flood-{qos}-{protocol.replace('.', '')}-{limit}/twin/get"
    release = asyncio.Event()
    handled: list[bytes] = []

    async def slow(message) -> None:  # noqa: ANN001
        await release.wait()
        handled.append(message.payload)

    caplog.set_level(logging.WARNING, logger="mapper.mqtt")
    bus, task = await _bus(broker, tmp_path, protocol, topic, slow)
    try:
        await asyncio.to_thread(_flood, broker, topic, qos)
        await _everything_sent_is_here(bus)
        assert _queued(bus) <= bus_module.INCOMING_LIMIT, f"{_queued(bus)} messages held in memory"
        waiting = list(bus.client._queue._queue)  # type: ignore[union-attr]  # noqa: SLF001
        assert sum(len(m.payload) for m in waiting) <= bus_module.INCOMING_BYTES
        assert all(m.properties is None for m in waiting)  # ~6 KB each with paho's Properties object
        if qos == 0:  # nothing holds QoS 0 back at the broker: the flood reaches the limit
            assert bus.incoming_dropped > 0
        release.set()
        await async_wait_for(lambda: len(handled) + bus.incoming_dropped == COUNT + 1 and _queued(bus) == 0,
                             timeout=60, what="every message handled or dropped")
        if bus.incoming_dropped:
            assert 1 <= len(_throttled_drop_lines(caplog)) <= 10  # said, but not once a message
        # Dropped QoS 1 messages were acknowledged: the broker's window is not held by them (a
        # command sent now is handled now), and they do not come back as old commands later.
        with broker.client("app") as app:
            assert not app.publish(topic, b'{"event_id":"after"}', qos=1).is_failure
        await async_wait_for(lambda: handled[-1:] == [b'{"event_id":"after"}'], what="a command after the flood")
        assert len(set(handled)) == len(handled)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
