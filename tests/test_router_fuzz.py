"""Hostile payloads and topics never crash the mapper nor reach a driver unvalidated (hypothesis)."""

from __future__ import annotations

import asyncio
import os

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.ids import DeviceId
from eventbus.router import Router
from eventbus.topics import Topics
from mapper.config import load_config
from mapper.service import MapperService
from helpers import write_config, write_devices

LAMP = DeviceId("default", "lamp")

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=20)
twin_entry = st.fixed_dictionaries({}, optional={
    "expected": st.one_of(json_values, st.fixed_dictionaries({"value": json_values})),
    "actual": st.fixed_dictionaries({"value": json_values}),
    "expected_version": st.one_of(json_values, st.fixed_dictionaries({"edge": st.integers(-2**63, 2**63 - 1)})),
})
updates = st.fixed_dictionaries({"twin": st.dictionaries(
    st.sampled_from(["power", "count", "temperature", "nope", "", "a/b", "#"]) | st.text(max_size=8),
    st.one_of(st.none(), twin_entry, json_values), max_size=4)}, optional={"event_id": json_values})
edge_cases = st.sampled_from([
    b'{"twin":{"count":{"expected":{"value":1e400}}}}', b'{"twin":{"count":{"expected":{"value":' + b"9" * 500 + b"}}}}",
    b'{"twin":{"power":{"expected":{"value":"true"}}}}', b'{"twin":{"count":{"expected":{"value":"12"}}}}',
    b'{"twin":' * 200 + b"1" + b"}" * 200, b"\xff\xfe", b"", b"null", b'"true"', b"true", b"42", b"  7 ",
])
payloads = st.one_of(updates.map(orjson.dumps), json_values.map(orjson.dumps), st.binary(max_size=300), edge_cases)
segments = st.sampled_from(["default", "lamp", "ghost", "+", "#", "", "LAMP", "a b", "..", "$hw", "x" * 300])
topics = st.one_of(
    st.builds(lambda ns, d, k: f"$hw/events/device/{ns}/{d}/{k}", segments, segments,
              st.sampled_from(["twin/update", "twin/get", "state/update", "twin/update/result", "twin"])),
    st.builds(lambda ns, d, p: f"mapper/test-node/{ns}/{d}/{p}/set", segments, segments,
              st.sampled_from(["power", "count", "temperature", "#", "+"])),
    st.just("$hw/events/node/test-node/membership/get"),
    st.text(max_size=60),
)


async def test_fuzz_router(tmp_path):
    """Thousands of hostile (topic, payload) pairs: no exception escapes, only valid values reach the twin."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=1000)
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))

    service = MapperService(config)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await service.ready.wait()
    router = Router(service, Topics("test-node"), max_payload=4096, serve_twin_protocol=True)
    loop = asyncio.get_running_loop()
    writes: list[tuple[str, object]] = []
    driver = service.runners[LAMP].driver
    original = driver.write
    driver.write = lambda prop, value: (writes.append((prop.name, value)), original(prop, value))[1]

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(topic=topics, payload=payloads)
    def one(topic: str, payload: bytes) -> None:
        asyncio.run_coroutine_threadsafe(router.handle(topic, payload), loop).result(timeout=10)

    await asyncio.to_thread(one)
    # Still serving after the storm: valid requests are applied.
    await router.handle("$hw/events/device/default/lamp/twin/update", b'{"twin":{"power":{"expected":{"value":"true"}}}}')
    await router.handle("mapper/test-node/default/lamp/count/set", b"77")
    await service.recorder.flush()
    twin = await service.twin(lambda s: s.device(LAMP))
    stop.set()
    await asyncio.wait_for(task, 20)
    assert router.counts["internal_error"] == 0
    assert sum(v for k, v in router.counts.items() if k.startswith("rejected_")) > 300, router.counts
    assert router.counts["ignored"] > 300, router.counts  # topics with invalid segments: no reply at all
    assert router.counts["twin/update"] >= 1 and router.counts["set"] >= 1
    assert twin.properties["count"].desired == 77
    for name, value in writes:
        assert name in ("power", "count")
        assert isinstance(value, bool) if name == "power" else (type(value) is int and 0 <= value <= 100_000_000)
    assert twin.properties["power"].desired is True  # the valid update after the storm was applied
    assert twin.properties["temperature"].desired is None  # read-only: never set

