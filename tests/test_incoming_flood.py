"""A flood of twin/get must not cost another app its commands (the security review's reproduction).

An app with the shipped `app` account flooded `$hw/events/device/default/<dev>/twin/get` (QoS 0,
10 paho clients) while another app sent 20 twin/update commands (QoS 1): each was PUBACKed by the
broker, none got a result and the desired value stayed unset. The mapper's one FIFO of incoming
messages (INCOMING_LIMIT) was full of twin/gets, each costing a commit, and dropped whatever came
next, commands included. Now queries may take half the queue only (bus.QUERY_KINDS), and
twin/gets for a device within TWIN_GET_INTERVAL_S are answered together (router._coalesce).

Over a real Mosquitto, the mapper running in this process so that INCOMING_LIMIT can be lowered
(a flood of a few thousand reaches it). The twin's write lock is held by another connection while
the flood and the commands arrive (helpers.TwinLock): the mapper's first twin/get reply waits for
it, so what comes meanwhile waits in the incoming queue, as it did behind the flood's commits.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from brokers import MosquittoBroker
from devices.ids import DeviceId
from eventbus import bus as bus_module
from helpers import TwinLock, async_wait_for, running_service, write_devices
from mapper.config import MapperConfig
from mapper.runtime import build_service

NODE = "flood-node"
HW = "$hw/events/device/default/lamp"
FLOOD = 2_000          # twin/get requests, QoS 0, from one client
COMMANDS = 20          # twin/update requests, QoS 1, from another
LIMIT = 400            # INCOMING_LIMIT for the test: queries may take 200


def _config(broker: MosquittoBroker, tmp: Path) -> MapperConfig:
    secret = tmp / "mapper.password"
    secret.write_text(broker.users["mapper"])
    secret.chmod(0o600)
    return MapperConfig.model_validate({
        "node": NODE,
        "devices": [str(write_devices(tmp / "dev", ["lamp"], cycle=200))],
        "twin": {"path": str(tmp / "twin.db"), "batch_delay_ms": 5},
        "loop": {"desired_poll_ms": 50},
        "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "username": "mapper", "password_file": str(secret),
                 "client_id": f"mapper-{uuid.uuid4().hex[:8]}", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    })


def _update(i: int) -> str:
    return json.dumps({"event_id": f"c{i}", "timestamp": 0, "twin": {"count": {"expected": {"value": str(100 + i)}}}})


def _flood_then_commands(broker: MosquittoBroker, commander: Any) -> None:  # noqa: ANN401
    """FLOOD twin/gets as fast as paho sends them, then one QoS 1 message whose PUBACK says the broker
    routed them all; then the commands, each PUBACKed (mosquitto_pub's "success")."""
    with broker.client("app") as flooder:
        for i in range(FLOOD):
            # No wait per message (paho's own queue).
            flooder._client.publish(f"{HW}/twin/get", b'{"event_id":"f%d"}' % i, 0)  # noqa: SLF001
        assert not flooder.publish(f"{HW}/twin/get", b'{"event_id":"f-last"}', qos=1).is_failure
    for i in range(COMMANDS):
        assert not commander.publish(f"{HW}/twin/update", _update(i), qos=1).is_failure


@pytest.mark.timeout(60)
async def test_a_twin_get_flood_does_not_cost_another_app_its_commands(broker, tmp_path, monkeypatch):
    monkeypatch.setattr(bus_module, "INCOMING_LIMIT", LIMIT)
    commander = await asyncio.to_thread(broker.client, "app")
    try:
        assert not (await asyncio.to_thread(commander.subscribe, f"{HW}/twin/update/result")).is_failure
        async with running_service(_config(broker, tmp_path), build=build_service, timeout=15) as service:
            ext = service.bus
            await asyncio.wait_for(ext.bus.connected.wait(), 10)
            with TwinLock(tmp_path / "twin.db") as lock:
                await asyncio.to_thread(_flood_then_commands, broker, commander)
                # Every message the broker routed to the mapper before now is in its client: the
                # SUBACK comes after them on the connection (as in test_bus_incoming).
                await ext.bus.client.subscribe(f"mapper/{NODE}/barrier/{uuid.uuid4().hex[:8]}", qos=1)
                assert ext.bus.incoming_dropped > 0, "the flood did not reach the limit"
                lock.release()
            # What the other app sees: a result for every command, and the value of the last one set.
            results: dict[str, dict] = {}

            def every_result() -> bool:
                while not commander.messages.empty():
                    body = json.loads(commander.messages.get().payload)
                    results[body["event_id"]] = body
                return len(results) == COMMANDS

            await async_wait_for(every_result, timeout=20, what=f"results of all {COMMANDS} commands")
            assert all("code" not in body for body in results.values()), results
            assert results[f"c{COMMANDS - 1}"]["twin"]["count"]["expected"]["value"] == str(100 + COMMANDS - 1)
            twin = await service.twin(lambda s: s.device(DeviceId("default", "lamp")))
            assert twin.properties["count"].desired == 100 + COMMANDS - 1
            assert ext.bus.incoming_dropped_by["twin/update"] == 0 < ext.bus.incoming_dropped_by["twin/get"]
            # The flood was answered in batches, not a commit per request: at most one batch of
            # MEMBERSHIP_WAITING_MAX per interval after the first.
            assert ext.router.counts["twin_get_collapsed"] > 0
    finally:
        await asyncio.to_thread(commander.close)
