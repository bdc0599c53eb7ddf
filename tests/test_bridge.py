"""Edge broker bridged to a cloud broker with the shipped configs: telemetry out, desired values in."""

from __future__ import annotations

import json
import time

from helpers import write_devices
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
