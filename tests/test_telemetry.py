"""The message factory: which readings become telemetry, and when a device's state message goes out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest

from devices.ids import DeviceId
from devices.loader import PushTopics, load
from eventbus.telemetry import Telemetry
from eventbus.topics import Topics
from twin.records import Reading
from helpers import one_property_device, write_devices

D = DeviceId("default", "d")


def _factory(tmp_path: Path, cycle: int, interval: int) -> tuple[Telemetry, Topics]:
    definitions = load([write_devices(tmp_path / "devices", ["d"], cycle=cycle)]).devices
    topics = Topics("n1")
    return Telemetry(topics, definitions, state_interval_ms=interval), topics


def _states(telemetry: Telemetry, topics: Topics, batches: list[tuple[int, int]]) -> list[dict]:
    """Feed (ts, count) readings one batch each; the state messages that came out, decoded."""
    out = []
    for ts, count in batches:
        for m in telemetry([Reading(D, "count", count, ts), Reading(D, "temperature", 20.0, ts)]):
            if m.topic == topics.device_state(D):
                assert m.retain
                out.append(orjson.loads(orjson.dumps(m.body)))
    return out


def test_state_goes_out_once_per_interval_with_the_latest_values(tmp_path):
    """A device read every 100 ms: telemetry for every reading, the retained state once a second,
    carrying the newest values."""
    telemetry, topics = _factory(tmp_path, cycle=100, interval=1000)
    batches = [(1_000_000 + 100 * k, k) for k in range(25)]  # 2.4 s of readings
    states = _states(telemetry, topics, batches)
    assert [(s["ts"], s["count"]) for s in states] == [(1_000_000, 0), (1_001_000, 10), (1_002_000, 20)]
    telemetry_count = sum(1 for ts, k in batches
                          for m in telemetry([Reading(D, "count", k, ts + 10_000)])
                          if m.topic == topics.telemetry(D, "count"))
    assert telemetry_count == 25  # every reading is still published on its own topic


def test_a_tick_that_lands_early_still_counts(tmp_path):
    """A 1 Hz device whose reading lands a millisecond early keeps its state message every second."""
    telemetry, topics = _factory(tmp_path, cycle=1000, interval=1000)
    states = _states(telemetry, topics, [(5_000, 1), (5_999, 2), (6_998, 3), (8_000, 4)])
    assert [s["count"] for s in states] == [1, 2, 3, 4]


def test_interval_zero_sends_state_with_every_batch(tmp_path):
    telemetry, topics = _factory(tmp_path, cycle=100, interval=0)
    states = _states(telemetry, topics, [(1_000 + 100 * k, k) for k in range(5)])
    assert [s["count"] for s in states] == [0, 1, 2, 3, 4]



def test_readings_after_the_clock_went_back_are_still_published(tmp_path):
    """The wall clock goes back an hour (a Pi without a real-time clock whose time sync corrects
    a clock that ran ahead): the readings taken after it are published on their topics (good and
    out of range alike), and the device's retained state goes on, each at its usual pace from
    the jump on. Before, a reading was due only a report cycle after the last one published:
    nothing went out for the hour the clock needed to catch up (eight days after a +8d/-8d)."""
    from twin.records import OUT_OF_RANGE

    telemetry, topics = _factory(tmp_path, cycle=100, interval=1000)
    start = 1_700_000_000_000
    back = start + 2_000 - 3_600_000  # 2 s of readings, then the clock is an hour behind
    published: list[tuple[str, int]] = []
    for ts in [start + 100 * k for k in range(21)] + [back + 100 * k for k in range(21)]:
        for m in telemetry([Reading(D, "count", ts // 100, ts), Reading(D, "temperature", 20.0, ts)]):
            published.append((m.topic, m.body["ts"] if m.topic == topics.device_state(D) else ts))
    after = [(topic, ts) for topic, ts in published if ts < start]
    assert [ts for topic, ts in after if topic == topics.telemetry(D, "count")] == [back + 100 * k for k in range(21)]
    assert [ts for topic, ts in after if topic == topics.telemetry(D, "temperature")] == [back + 100 * k for k in range(21)]
    # The state view: at once at the jump, then once a second again (as before it).
    assert [ts for topic, ts in after if topic == topics.device_state(D)] == [back, back + 1_000, back + 2_000]
    assert telemetry.state_message(D).body["ts"] == back + 2_000
    # An out-of-range reading older than the last one published is published too.
    out = list(telemetry([Reading(D, "count", -1, back - 60_000, OUT_OF_RANGE, "below the minimum 0")]))
    [m] = [m for m in out if m.topic == topics.telemetry(D, "count")]
    assert m.body["quality"] == "out_of_range"
    # It counts for the state view as a good reading does (older than the last view: at once); the
    # view keeps the last good values and their time.
    assert [(v.body["count"], v.body["ts"]) for v in out if v is not m] == [((back + 2_000) // 100, back + 2_000)]

def test_out_of_range_readings_keep_the_state_view_going_with_the_last_good_values(tmp_path):
    """A device read on time whose readings are all out of range sent no state view, and a dashboard
    that expires a value not refreshed in time (Home Assistant's `expire_after`) showed it
    unavailable. Such readings count for the view's pace now; it holds the last good value and
    its time. Before the device's first good reading they send none, and do not hold that one back."""
    from twin.records import OUT_OF_RANGE

    telemetry, topics = _factory(tmp_path, cycle=100, interval=1000)
    state = topics.device_state(D)
    assert state not in [m.topic for m in telemetry([Reading(D, "count", -1, 1_000, OUT_OF_RANGE, "below 0")])]
    [first] = [m.body for m in telemetry([Reading(D, "count", 5, 1_100)]) if m.topic == state]
    assert (first["count"], first["ts"]) == (5, 1_100)
    views = [m.body for k in range(1, 26)
             for m in telemetry([Reading(D, "count", -1, 1_100 + 100 * k, OUT_OF_RANGE, "below 0")]) if m.topic == state]
    assert [(v["count"], v["ts"]) for v in views] == [(5, 1_100), (5, 1_100)]  # at 2.1 s and 3.1 s of reading time


def _pushed(tmp_path: Path, topic: str, push_topics: PushTopics = PushTopics()) -> Telemetry:
    devices = write_devices(tmp_path / "devices", ["d"], cycle=100)
    text = (devices / "d.yaml").read_text()
    marker = "      collectCycle: 100\n      reportCycle: 100\n"
    assert marker in text
    (devices / "d.yaml").write_text(text.replace(marker, marker + f"      pushMethod:\n        mqtt: {{topic: '{topic}', qos: 0, retained: true}}\n", 1))
    return Telemetry(Topics("n1"), load([devices], push_topics=push_topics).devices, state_interval_ms=1000)


def test_a_push_topic_carries_the_property_with_its_qos_and_retain(tmp_path):
    """`pushMethod.mqtt` sends the property's readings to its own topic, QoS and retain flag."""
    telemetry = _pushed(tmp_path, "home/livingroom/temperature")
    [m] = [m for m in telemetry([Reading(D, "temperature", 21.5, 1_000)]) if "temperature" in m.topic]
    assert (m.topic, m.qos, m.retain) == ("home/livingroom/temperature", 0, True)


@pytest.mark.parametrize("topic", ["mapper/n1/availability", "mapper/node-b/default/lamp/state"])
def test_a_push_topic_inside_the_mappers_topics_is_not_used(tmp_path, caplog, topic):
    """A push topic under <prefix>/ (the node's availability, another node's state) would let
    readings pose as a mapper's messages. The loader refuses such a device; a definition that
    got past it (loaded here for another prefix) is not published there either: the readings go to
    the property's own topic, and the log says why."""
    import logging

    topics = Topics("n1")
    with caplog.at_level(logging.ERROR, logger="mapper.telemetry"):
        telemetry = _pushed(tmp_path, topic, PushTopics("elsewhere"))
        out = list(telemetry([Reading(D, "temperature", 21.5, 1_000)]))
    assert topic not in [m.topic for m in out]
    [m] = [m for m in out if m.topic == topics.telemetry(D, "temperature")]
    assert (m.qos, m.retain) == (1, False)
    assert "is inside the mappers' topics (mapper/...)" in caplog.text


def _not_reported(tmp_path: Path, push: str | None) -> Telemetry:
    """Device d with `reportToCloud: false` (KubeEdge's default) on every property; `push`:
    a pushMethod.mqtt topic for its temperature."""
    devices = write_devices(tmp_path / "devices", ["d"], cycle=100)
    text = (devices / "d.yaml").read_text().replace("reportToCloud: true", "reportToCloud: false")
    if push is not None:
        marker = "      collectCycle: 100\n      reportCycle: 100\n"
        text = text.replace(marker, marker + f"      pushMethod:\n        mqtt: {{topic: '{push}', qos: 0}}\n", 1)
    (devices / "d.yaml").write_text(text)
    return Telemetry(Topics("n1"), load([devices]).devices, state_interval_ms=1000)


def test_a_push_topic_is_published_whatever_report_to_cloud_says(tmp_path):
    """KubeEdge pushes `pushMethod.mqtt` whether or not the property reports to the cloud; the
    property topics of the others stay quiet (reportToCloud false), and the retained state view
    still follows the readings, once per interval."""
    telemetry = _not_reported(tmp_path, "factory/line1/temperature")
    topics = Topics("n1")
    out = []
    for k in range(25):  # 2.4 s of readings every 100 ms
        ts = 1_000_000 + 100 * k
        out += telemetry([Reading(D, "temperature", 20.0 + k, ts), Reading(D, "count", k, ts)])
    assert [m.reading.value for m in out if m.topic == "factory/line1/temperature"] == \
        [20.0 + k for k in range(25)]
    assert not [m for m in out if m.topic in (topics.telemetry(D, "temperature"), topics.telemetry(D, "count"))]
    states = [orjson.loads(orjson.dumps(m.body)) for m in out if m.topic == topics.device_state(D)]
    assert [(s["ts"], s["count"], s["temperature"]) for s in states] == \
        [(1_000_000, 0, 20.0), (1_001_000, 10, 30.0), (1_002_000, 20, 40.0)]


def test_a_device_that_reports_nothing_still_refreshes_its_state_view(tmp_path):
    telemetry = _not_reported(tmp_path, None)
    topics = Topics("n1")
    out = []
    for k in range(15):
        out += telemetry([Reading(D, "count", k, 1_000 + 100 * k)])
    assert [m.topic for m in out] == [topics.device_state(D)] * 2
    assert [m.body["count"] for m in out] == [0, 10]


PUSHED_PROBE = one_property_device(
    "probe", "{name: temperature, type: FLOAT, accessMode: ReadOnly, unit: Celsius}", "{kind: temperature, base: 21}",
    settings="""collectCycle: 500
reportToCloud: false
pushMethod:
  mqtt: {topic: factory/line1/temperature, qos: 1}""")


def test_a_mapper_pushes_a_property_that_does_not_report_to_the_cloud(tmp_path):
    """A file written for KubeEdge (reportToCloud false, pushMethod.mqtt) publishes its readings
    on the push topic and keeps the retained state fresh. The push topic may not be under mapper/
    (the mappers' topics), and the shipped ACL lets the mapper write only mapper/# and $hw/#: the
    broker here has the ACL line an operator adds for it (README.md, pushMethod.mqtt)."""
    from brokers import MosquittoBroker
    from mapper_proc import MapperProcess
    from test_twin_protocol import Sub

    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(PUSHED_PROBE)
    with MosquittoBroker("mosquitto.conf") as broker:
        acl = broker.workdir / "acl"
        acl.write_text(acl.read_text().replace("topic readwrite $hw/#\n", "topic readwrite $hw/#\ntopic readwrite factory/#\n", 1))
        broker.restart()
        with MapperProcess(tmp_path, devices, broker) as mapper:
            sub = Sub(broker, "mapper", "factory/#", "mapper/test-node/#")
            own = Sub(broker, "mapper", "mapper/test-node/default/probe/temperature")
            try:
                pushed = [sub.expect("factory/line1/temperature") for _ in range(3)]
                assert all(isinstance(b["value"], float) and b["unit"] == "Celsius" for b in pushed)
                assert [b["seq"] for b in pushed] == [pushed[0]["seq"] + k for k in range(3)]
                first = sub.expect("mapper/test-node/default/probe/state", lambda b: "temperature" in b)
                later = sub.expect("mapper/test-node/default/probe/state", lambda b: b["ts"] > first["ts"])
                assert later["state"] == "ok"
                assert own.lines.empty()  # its own topic follows reportToCloud: false
            finally:
                sub.close()
                own.close()
                assert mapper.stop() == 0


def test_a_reading_of_a_property_a_reload_removed_is_not_published(tmp_path):
    """A reading the old runner took of a property a reload has just removed can reach the factory
    after the new definitions: it is not published and does not come back into the state view
    (the lookup of its definition raised KeyError inside the recorder's flush before)."""
    telemetry, topics = _factory(tmp_path, cycle=100, interval=0)
    assert {m.topic for m in telemetry([Reading(D, "count", 1, 1_000), Reading(D, "temperature", 20.0, 1_000)])} \
        == {topics.telemetry(D, "count"), topics.telemetry(D, "temperature"), topics.device_state(D)}
    # The reload's definitions: the same device without `count` (as the loader would build them).
    old = telemetry.definitions[D]
    reloaded = dataclasses.replace(old, properties=tuple(p for p in old.properties if p.name != "count"))
    telemetry.definitions = {D: reloaded}
    out = list(telemetry([Reading(D, "count", 2, 1_100), Reading(D, "temperature", 21.0, 1_100)]))
    assert [m.topic for m in out if m.topic != topics.device_state(D)] == [topics.telemetry(D, "temperature")]
    (state,) = [orjson.loads(orjson.dumps(m.body)) for m in out if m.topic == topics.device_state(D)]
    assert "count" not in state and state["temperature"] == 21.0


def test_a_device_a_reload_changes_starts_its_state_view_afresh(tmp_path):
    """A reload that changes a device (here its temperature's `base`) drops the device's view and
    its pacing: no value its old runner read comes back (also not one still in the recorder), and
    the first reading of the new runner sends the state at once. A device the reload removes keeps
    its view (its `offline` state message carries what it read)."""
    import time

    telemetry, topics = _factory(tmp_path, cycle=100, interval=60_000)
    now = time.time_ns() // 1_000_000
    assert [m.body["temperature"] for m in telemetry([Reading(D, "temperature", 21.0, now - 500)])
            if m.topic == topics.device_state(D)] == [21.0]
    devices = tmp_path / "devices"
    (devices / "d.yaml").write_text((devices / "d.yaml").read_text().replace("base: 21", "base: 40"))
    telemetry.definitions = load([devices]).devices
    assert telemetry.state_message(D) is None
    # The old runner's last reading, recorded after the switch: published, but not in the view.
    out = list(telemetry([Reading(D, "temperature", 21.1, now - 400)]))
    assert [m.topic for m in out] == [topics.telemetry(D, "temperature")]
    later = time.time_ns() // 1_000_000 + 1
    (state,) = [m.body for m in telemetry([Reading(D, "temperature", 40.0, later)]) if m.topic == topics.device_state(D)]
    assert (state["temperature"], state["ts"]) == (40.0, later) and "count" not in state
    telemetry.definitions = {}
    assert telemetry.state_message(D).body["temperature"] == 40.0


def test_an_out_of_range_reading_is_published_marked_and_logged_not_hidden(tmp_path, broker):
    """A boiler at 90 C with a model whose maximum is 50: its readings were recorded out_of_range
    and then left out of MQTT altogether, with nothing in the log; the property's topic and the
    retained state went on showing the last good value while the device said `ok`. Now each one
    is published on the property's topic with `"quality": "out_of_range"`, the log says so (one
    line a minute per property), and the state view does not take it as the property's value."""
    from mapper_proc import MapperProcess
    from test_twin_protocol import Sub

    devices = write_devices(tmp_path / "devices", ["boiler"], cycle=100)
    device_file = devices / "boiler.yaml"
    device_file.write_text(device_file.read_text().replace("kind: temperature, base: 21,", "kind: temperature, base: 90,"))
    with MapperProcess(tmp_path, devices, broker) as mapper:
        sub = Sub(broker, "app", "mapper/test-node/default/boiler/#")
        try:
            readings = [sub.expect("mapper/test-node/default/boiler/temperature") for _ in range(3)]
            assert all(b["quality"] == "out_of_range" and b["value"] > 50 and b["unit"] == "Celsius"
                       for b in readings), readings
            assert [b["seq"] for b in readings] == [readings[0]["seq"] + k for k in range(3)]
            state = sub.expect("mapper/test-node/default/boiler/state", lambda b: b["ts"] > readings[-1]["ts"])
            assert "temperature" not in state and "count" in state, state  # never a good temperature
            lines = [line for line in mapper.log().splitlines() if "published with quality out_of_range" in line]
            assert len(lines) == 1, lines  # three readings and more, one line
            assert " WARNING " in lines[0] and "default/boiler: temperature: " in lines[0], lines[0]
            assert "is above the maximum 50" in lines[0], lines[0]
        finally:
            sub.close()
            assert mapper.stop() == 0


async def test_a_mapper_whose_clock_goes_back_goes_on_publishing(tmp_path, broker, monkeypatch):
    """End to end, a real broker and twin: the mapper's wall clock goes back an hour while it runs
    (its readings' time: mapper.device_loop.now_ms, what libfaketime's `-1h` moved in the field
    review). Its telemetry and its device's retained state go on, with the readings' new times.
    Before, nothing was published after the jump (the readings were in the twin's history, and
    `mapper devices` said ok), and would not have been for an hour."""
    import asyncio
    import queue
    import time

    from brokers import MqttProbe
    from helpers import running_service, write_config
    from mapper import device_loop
    from mapper.config import load_config
    from mapper.runtime import build_service
    from mapper_proc import mqtt_block

    devices = write_devices(tmp_path / "devices", ["d"], cycle=100)
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                                      extra=mqtt_block(broker, tmp_path)))
    topics = Topics("test-node")
    count, state = topics.telemetry(D, "count"), topics.device_state(D)
    app = MqttProbe.connected(broker, "app")
    try:
        assert not app.subscribe(f"{topics.device_state(D).rsplit('/', 1)[0]}/+").is_failure

        async def seen(what: str, check, timeout: float = 10.0) -> dict:  # noqa: ANN001
            """The first message for which check(topic, body); the probe's queue, polled without
            blocking the loop the mapper runs in."""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    message = app.messages.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.02)
                    continue
                if message.topic not in (count, state):  # (availability: plain text)
                    continue
                body = orjson.loads(message.payload)
                if check(message.topic, body):
                    return body
            raise AssertionError(f"no {what} within {timeout} s")

        async with running_service(config, build=build_service, timeout=15):
            await seen("count", lambda t, b: t == count)
            await seen("state", lambda t, b: t == state)
            real = device_loop.now_ms
            jump_at = real()
            monkeypatch.setattr(device_loop, "now_ms", lambda: real() - 3_600_000)
            before = jump_at - 3_000_000  # readings taken after the jump are an hour behind
            first = await seen("count taken after the jump", lambda t, b: t == count and b["ts"] < before)
            await seen("a later count", lambda t, b: t == count and b["ts"] > first["ts"])
            first_state = await seen("state after the jump", lambda t, b: t == state and b["ts"] < before)
            await seen("the next state", lambda t, b: t == state and b["ts"] > first_state["ts"] + 500)
    finally:
        app.close()


def test_a_state_view_over_the_packet_limit_is_left_out_with_one_error_until_it_fits(tmp_path, caplog):
    """A view certainly larger than the broker takes (here a 400-character STRING against a 300-byte
    limit) is not made: queued, it was committed to the twin at every interval only to be dropped as
    undeliverable. One error says it (again after OVERSIZE_LOG_INTERVAL_S, not at every interval),
    with the device, the sizes, the longest values and what to change; once the values are short
    enough the view goes out again, said at INFO. A view whose worst case (every character escaped)
    is over the limit but which fits goes out: only the encoded size decides."""
    import logging

    from eventbus.telemetry import OVERSIZE_LOG_INTERVAL_S

    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(one_property_device(
        "probe", "{name: note, type: STRING, accessMode: ReadOnly}", "{kind: constant, value: x}",
        settings="collectCycle: 100\nreportToCloud: false"))
    now = [1000.0]
    topics = Topics("n1")
    telemetry = Telemetry(topics, load([devices]).devices, state_interval_ms=1000, clock=lambda: now[0])
    telemetry.packet_limit = lambda: (300, "a test limit")
    probe = DeviceId("default", "probe")

    def views(note: str, seconds: int, start: int) -> list[dict]:
        out = []
        for k in range(seconds * 10):
            now[0] += 0.1
            for m in telemetry([Reading(probe, "note", note, start + 100 * k)]):
                assert m.topic == topics.device_state(probe)
                out.append(m.body)
        return out

    caplog.set_level(logging.INFO, logger="mapper.telemetry")
    assert views("n" * 400, 5, 1_000_000) == []
    said = [r for r in caplog.records if "state view is left out" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, said
    text = said[0].getMessage()
    assert text.startswith("default/probe: its state view is left out: its packet on mapper/n1/default/probe/state")
    assert "over the broker's packet limit of 300 bytes (a test limit)" in text and "note (400 characters)" in text
    assert "Shorten those values" in text and "max_packet_size" in text
    now[0] += OVERSIZE_LOG_INTERVAL_S
    assert views("n" * 400, 1, 1_010_000) == []
    assert len([r for r in caplog.records if "state view is left out" in r.getMessage()]) == 2  # said again, later
    # 100 control characters: 600 bytes if each were escaped as \u00XX, 200 as they are (\n).
    assert [v["note"] for v in views("\n" * 100, 2, 1_020_000)] == ["\n" * 100] * 2
    assert "fits the broker's packet limit again" in caplog.text


def test_a_locked_devices_state_view_counts_its_lock_against_the_packet_limit(tmp_path, caplog):
    """`$locked` (its holder and reason, of any length) is part of the view: a view the lock's
    reason takes over the limit is left out, not handed to the publisher as if it fitted."""
    from twin.records import AdminLock

    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(one_property_device(
        "probe", "{name: level, type: FLOAT, accessMode: ReadOnly}", "{kind: constant, value: 1}",
        settings="collectCycle: 100\nreportToCloud: false"))
    now = [1000.0]
    telemetry = Telemetry(Topics("n1"), load([devices]).devices, state_interval_ms=1000, clock=lambda: now[0])
    telemetry.packet_limit = lambda: (300, "a test limit")
    probe = DeviceId("default", "probe")
    telemetry.locks[probe] = AdminLock(1, "pid 1 (mapper lock)", "r" * 400)
    out = []
    for k in range(30):
        now[0] += 0.1
        out += telemetry([Reading(probe, "level", 1.0, 1_000_000 + 100 * k)])
    assert [m for m in out if m.topic.endswith("/state")] == []
    assert "the maintenance lock's reason (400 characters)" in caplog.text
