"""`mode: kubeedge` end to end: a real Mosquitto (the shipped config and ACL), the test edgecore, the real mapper.

In kubeedge mode edgecore is the twin authority for `$hw/events/...`: the mapper must neither
answer `twin/update`, `twin/get`, `membership/get` there nor apply what arrives on them, while
its own telemetry and `.../set` topics work as in standalone mode. The same harness in
standalone mode does get the answers, so a silent kubeedge run means the mapper stayed quiet,
not that the harness could not see answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from brokers import MosquittoBroker, MqttProbe, ensure_mosquitto_installed
from devices.ids import DeviceId
from dmi_edgecore import FakeEdgecore, device, model
from helpers import running_service, write_devices
from mapper.config import MapperConfig
from mapper.dmi.extension import KubeEdgeExtension
from mapper.runtime import build_service
from mapper.service import MapperService

NODE = "test-node"
SWITCH = model("switch-model", {"power": ("BOOLEAN", "ReadWrite")})
# Far above what the 200 ms counter reaches during a test: seeing it proves the `set` was applied.
BARRIER_COUNT = 100_000


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temp dir: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kem-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(mode: str, broker: MosquittoBroker, sockdir: Path) -> MapperConfig:
    secret = sockdir / "mapper.password"
    secret.write_text(broker.users["mapper"])
    secret.chmod(0o600)
    data: dict[str, Any] = {
        "node": NODE, "mode": mode,
        "devices": [str(write_devices(sockdir / "dev", ["lamp"], cycle=200))],
        "twin": {"path": str(sockdir / "twin.db"), "batch_delay_ms": 5},
        "loop": {"desired_poll_ms": 50},
        "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "username": "mapper", "password_file": str(secret),
                 "client_id": f"mapper-{sockdir.name}", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    }
    if mode == "kubeedge":
        data["kubeedge"] = {"name": "sim", "protocol": "simulated", "edgecore_socket": str(sockdir / "dmi.sock"),
                            "socket": str(sockdir / "sim.sock"), "register_backoff_max_s": 0.2,
                            "report_interval_s": 0}
    return MapperConfig.model_validate(data)


def running(cfg: MapperConfig):  # noqa: ANN201 - an async context manager
    return running_service(cfg, build=build_service, timeout=15)


class App:
    """The example app user of the shipped ACL, subscribed to every topic it may read for the node's devices."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.probe = MqttProbe.connected(broker, "app")
        for topic in ("$hw/events/device/default/+/#", f"mapper/{NODE}/default/+/+", "$hw/events/node/#"):
            assert not self.probe.subscribe(topic).is_failure
        self.seen: list[tuple[str, Any]] = []

    def publish(self, topic: str, payload: str) -> None:
        code = self.probe.publish(topic, payload)
        assert code is not None and not code.is_failure, code

    def expect(self, topic: str, predicate: Callable[[Any], bool] = lambda body: True,
               timeout: float = 15.0) -> Any:
        """Block until a message on `topic` satisfies `predicate`; every message seen is kept in `seen`."""
        import time

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.probe.next_message(timeout=left)
            except TimeoutError:
                break
            try:
                body = json.loads(message.payload)
            except ValueError:
                body = message.payload.decode(errors="replace")
            self.seen.append((message.topic, body))
            if message.topic == topic and predicate(body):
                return body
        raise AssertionError(f"no matching message on {topic} within {timeout} s; seen: {self.seen[-10:]}")

    def close(self) -> None:
        self.probe.close()


def value_is(expected: Any) -> Callable[[Any], bool]:
    return lambda body: isinstance(body, dict) and body.get("value") == expected


async def scenario(mode: str, broker: MosquittoBroker, sockdir: Path) -> tuple[App, MapperService]:
    """Run the mapper; send $hw requests for every device, then a `.../set` barrier; return what the app saw."""
    app = await asyncio.to_thread(App, broker)
    try:
        async with contextlib.AsyncExitStack() as stack:
            devices = ["lamp"]
            if mode == "kubeedge":
                edgecore = await stack.enter_async_context(FakeEdgecore(sockdir / "dmi.sock"))
                edgecore.devices = [(device("edge-lamp", "switch-model", {"power": {"kind": "switch"}},
                                            cycle_ms=200), SWITCH)]
                devices.append("edge-lamp")
            service = await stack.enter_async_context(running(config(mode, broker, sockdir)))
            if mode == "kubeedge":
                ext = next(e for e in service.extensions if isinstance(e, KubeEdgeExtension))
                async with asyncio.timeout(15):
                    await ext.registered.wait()
                assert DeviceId("default", "edge-lamp") in service.runners

            # Positive control: this mapper's telemetry reaches the app, for the local and the edgecore device.
            for name in devices:
                await asyncio.to_thread(app.expect, f"mapper/{NODE}/default/{name}/power", value_is(False))

            for i, name in enumerate(devices):
                hw = f"$hw/events/device/default/{name}"
                await asyncio.to_thread(app.publish, f"{hw}/twin/update",
                                        json.dumps({"event_id": f"u{i}", "timestamp": 0,
                                                    "twin": {"power": {"expected": {"value": "true"}}}}))
                await asyncio.to_thread(app.publish, f"{hw}/twin/get", json.dumps({"event_id": f"g{i}"}))
            await asyncio.to_thread(app.publish, f"$hw/events/node/{NODE}/membership/get", '{"event_id":"m1"}')
            # Barrier: the mapper handles its messages in order, and everything it publishes goes through one
            # ordered outbox. The `set` was accepted by the broker after the $hw requests, so once its effect
            # shows in the telemetry, any answer to them would have been published before it.
            await asyncio.to_thread(app.publish, f"mapper/{NODE}/default/lamp/count/set", str(BARRIER_COUNT))
            await asyncio.to_thread(app.expect, f"mapper/{NODE}/default/lamp/count",
                                    lambda b: isinstance(b, dict) and isinstance(b.get("value"), int)
                                    and b["value"] >= BARRIER_COUNT)
            twins = {name: await service.twin(lambda s, n=name: s.device(DeviceId("default", n))) for name in devices}
        return app, twins
    finally:
        await asyncio.to_thread(app.close)


def hw_messages(app: App) -> list[tuple[str, Any]]:
    return [(topic, body) for topic, body in app.seen if topic.startswith("$hw/")]


def test_kubeedge_mode_leaves_hw_twin_topics_to_edgecore(broker: MosquittoBroker, sockdir: Path) -> None:
    """No result, document, delta, get or membership answer on $hw, and the expected value is not applied,
    for the local YAML device and the edgecore device alike; telemetry and `.../set` still work."""
    app, twins = asyncio.run(scenario("kubeedge", broker, sockdir))
    assert hw_messages(app) == [], hw_messages(app)
    for name, twin in twins.items():
        assert twin.properties["power"].desired is None, f"{name}: a $hw twin/update was applied"


def test_standalone_mode_answers_in_the_same_harness(broker: MosquittoBroker, sockdir: Path) -> None:
    """Control for the test above: standalone, the same requests are answered and applied."""
    app, twins = asyncio.run(scenario("standalone", broker, sockdir))
    topics = {topic for topic, _ in hw_messages(app)}
    hw = "$hw/events/device/default/lamp"
    assert {f"{hw}/twin/update/result", f"{hw}/twin/get/result",
            f"$hw/events/node/{NODE}/membership/get/result"} <= topics, topics
    assert twins["lamp"].properties["power"].desired is True


def availability_until(app: MqttProbe, wanted: dict[str, bytes], timeout: float = 20.0) -> list[str]:
    """Wait until every topic of `wanted` had a live (not retained) message with that payload; the
    availability topics of every message seen meanwhile (empty ones, a deletion, left out)."""
    import time

    missing, seen = dict(wanted), []
    deadline = time.monotonic() + timeout
    while missing:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"still waiting for {missing}; seen: {seen}")
        try:
            message = app.next_message(left)
        except TimeoutError:
            raise AssertionError(f"still waiting for {missing}; seen: {seen}") from None
        if message.payload:
            seen.append(message.topic)
        if not message.retain and missing.get(message.topic) == message.payload:
            del missing[message.topic]
    return seen


def test_edgecore_devices_the_mapper_does_not_run_are_offline_at_every_connect(
        sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A local YAML device the mapper refuses is announced `offline` at every (re)connect (README), so a
    previous run's retained `online` does not stay. edgecore's Devices the mapper does not run (a bad
    definition, one waiting for its DeviceModel) got nothing: Home Assistant showed them available.
    Now they are announced `offline` too, at connect and again after a reconnect to a broker that lost
    it; a device whose id is not valid gets no topic at all, and the log says so."""
    ensure_mosquitto_installed()
    base = f"mapper/{NODE}/default"
    broken, orphan, lamp = (f"{base}/{name}/availability" for name in ("broken", "orphan", "edge-lamp"))
    with MosquittoBroker() as own:
        with own.client("mapper") as earlier:  # what a previous run, which ran them, left
            for topic in (broken, orphan):
                earlier.publish(topic, b"online", retain=True)

        async def scenario() -> None:
            async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
                edgecore.devices = [
                    (device("edge-lamp", "switch-model", {"power": {"kind": "switch"}}, cycle_ms=200), SWITCH),
                    (device("broken", "switch-model", {"power": {"kind": "switch"}}, config={"failure_rate": 5}),
                     SWITCH),
                    (device("orphan", "no-such-model", {"power": {"kind": "switch"}}), SWITCH),
                    (device("Bad_Name", "switch-model", {"power": {"kind": "switch"}}), SWITCH),
                ]
                app = await asyncio.to_thread(MqttProbe.connected, own, "app")
                try:
                    assert not (await asyncio.to_thread(app.subscribe, f"{base}/+/availability")).is_failure
                    async with running(config("kubeedge", own, sockdir)) as service:
                        ext = next(e for e in service.extensions if isinstance(e, KubeEdgeExtension))
                        async with asyncio.timeout(15):
                            await ext.registered.wait()
                        seen = await asyncio.to_thread(availability_until, app, {
                            broken: b"offline", orphan: b"offline", lamp: b"online"})
                        await asyncio.to_thread(app.close)
                        with own.client("mapper") as eraser:  # the broker loses them (an empty retained message)
                            for topic in (broken, orphan):
                                eraser.publish(topic, b"", retain=True)
                        await asyncio.to_thread(own.restart)  # the mapper's connection drops; it connects again
                        app = await asyncio.to_thread(MqttProbe.connected, own, "app")
                        assert not (await asyncio.to_thread(app.subscribe, f"{base}/+/availability")).is_failure
                        seen += await asyncio.to_thread(availability_until, app,
                                                        {broken: b"offline", orphan: b"offline"})
                finally:
                    await asyncio.to_thread(app.close)
            assert {t.split("/")[3] for t in seen} <= {"broken", "orphan", "edge-lamp", "lamp"}, seen

        asyncio.run(scenario())
    assert "Bad_Name" in caplog.text and "gets no MQTT topic" in caplog.text, caplog.text[-3000:]
