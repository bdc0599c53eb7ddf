"""KubeEdge's $hw/events twin protocol over a real Mosquitto, driven the way an app author would."""

from __future__ import annotations

import json
import subprocess
import threading
import queue
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from devices.ids import DeviceId
from helpers import device_yaml, one_property_device, wait_for, write_devices
from mapper_proc import MapperProcess
from twin.store import TwinStore

HW = "$hw/events/device/default/lamp"


class Sub:
    """`mosquitto_sub -v` in the background; lines arrive in a queue."""

    def __init__(self, broker, user: str, *topics: str) -> None:
        args = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-u", user, "-P", broker.users[user],
                "-i", f"sub-{uuid.uuid4().hex[:8]}", "-q", "1", "-F", "%t %p"]
        for topic in topics:
            args += ["-t", topic]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            topic, _, payload = line.rstrip("\n").partition(" ")
            self.lines.put((topic, payload))

    def expect(self, topic: str, predicate=lambda body: True, timeout: float = 10.0) -> dict:
        """The next message on `topic` whose JSON body satisfies `predicate` (others are skipped)."""
        import time
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got, payload = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if got == topic:
                body = json.loads(payload)
                if predicate(body):
                    return body
        raise AssertionError(f"no matching message on {topic} within {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        # The pump reads to the end of the pipe, which the exit gave it: closed under it, its read
        # raised "I/O operation on closed file" in its thread (a teardown error in a loaded CI run).
        self._pumping.join(timeout=5)
        self.proc.stdout.close()


def pub(broker, topic: str, payload: str, user: str = "app") -> None:
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", user, "-P", broker.users[user],
                    "-i", f"pub-{uuid.uuid4().hex[:8]}", "-q", "1", "-t", topic, "-m", payload],
                   check=True, timeout=10)


@pytest.fixture
def lamp(broker, tmp_path):
    yield from _lamp(broker, tmp_path)


@pytest.fixture
def lamp_with_documents(broker, tmp_path):
    """The lamp with `mqtt.reading_documents: true` (off by default)."""
    yield from _lamp(broker, tmp_path, "  reading_documents: true\n")


def _lamp(broker, tmp_path, extra: str = ""):
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with MapperProcess(tmp_path, devices, broker, extra=extra) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "$hw/events/device/default/+/#", "mapper/test-node/#", "$hw/events/node/#")
        try:
            # The retained device state arrives once mosquitto_sub's subscriptions are in place: a
            # reply published before that would be missed (seen once in CI).
            sub.expect("mapper/test-node/default/lamp/state")
            yield mapper, sub
        finally:
            sub.close()
            assert mapper.stop() == 0


def test_expected_is_applied_and_comes_back_as_reported(broker, lamp):
    """twin/update with expected -> result, document, delta; then the device reports it and the delta is gone."""
    mapper, sub = lamp
    sub.expect("mapper/test-node/default/lamp/power", lambda b: b["value"] is False)
    pub(broker, f"{HW}/twin/update", '{"event_id":"e1","timestamp":0,"twin":{"power":{"expected":{"value":"true"}}}}')
    result = sub.expect(f"{HW}/twin/update/result")
    assert result["event_id"] == "e1" and result["twin"]["power"]["expected"]["value"] == "true"
    document = sub.expect(f"{HW}/twin/update/document", lambda b: b["event_id"] == "e1")
    assert document["twin"]["power"]["current"]["expected_version"]["edge"] == 1
    delta = sub.expect(f"{HW}/twin/update/delta")
    assert delta["delta"] == {"power": "true"}
    final = sub.expect(f"{HW}/twin/update/document",
                       lambda b: b["twin"]["power"]["current"].get("actual", {}).get("value") == "true")
    assert final["twin"]["power"]["current"]["expected"]["value"] == "true"
    # `last` is the twin before the device applied the value (edgecore's previous twin state): asked
    # for, not yet reported. Before, it was null.
    last = final["twin"]["power"]["last"]
    assert last is not None, final
    assert (last["expected"]["value"], last["actual"]["value"]) == ("true", "false"), last
    assert last["expected_version"]["edge"] == 1 and last["metadata"] == {"type": "boolean"}
    pub(broker, f"{HW}/twin/get", '{"event_id":"g1"}')
    got = sub.expect(f"{HW}/twin/get/result")
    assert got["event_id"] == "g1"
    assert got["twin"]["power"]["actual"]["value"] == "true" == got["twin"]["power"]["expected"]["value"]
    assert float(got["twin"]["temperature"]["actual"]["value"]) > 0  # readings appear as actual
    assert got["twin"]["temperature"]["metadata"] == {"type": "float"}
    sub.expect("mapper/test-node/default/lamp/power", lambda b: b["value"] is True)


@pytest.mark.parametrize(("payload", "code", "reason"), [
    ('{"event_id":"x1","twin":{"power":{"expected":{"value":"maybe"}}}}', 400, "expected a boolean"),
    ('{"event_id":"x2","twin":{"temperature":{"expected":{"value":"5"}}}}', 400, "ReadOnly"),
    ('{"event_id":"x3","twin":{"nope":{"expected":{"value":"5"}}}}', 400, "has no property 'nope'"),
    ('{"event_id":"x4","twin":{"count":{"expected":{"value":"-4"}}}}', 400, "below the minimum"),
    # The model's maximum as it writes it (`:g` shortened it to 1e+08).
    ('{"event_id":"xc","twin":{"count":{"expected":{"value":"100000001"}}}}', 400,
     "100000001 is above the maximum 100000000"),
    ('{"event_id":"x5","twin":{"power":{"actual":{"value":"true"}}}}', 400, "reported by the device"),
    ('{"event_id":"x6", "twin": [1,2]', 400, "malformed JSON"),
    ('[1,2,3]', 400, "must be a JSON object"),
    ('{"event_id":"x7","twin":{"count":{"expected":{"value":1e20}}}}', 400, "integer from -2^63"),
    # Pydantic's first error named the union's first member: "value.str: Input should be a valid string".
    ('{"event_id":"xd","twin":{"count":{"expected":{"value":[1]}}}}', 400,
     "twin.count.expected.value: a value is a string, number, boolean or null, not a list"),
    # Not "Input should be a valid dictionary or instance of ValueIn" (a class of the mapper's).
    ('{"event_id":"xe","twin":{"count":{"expected":"5"}}}', 400, "twin.count.expected: should be a JSON object"),
    ('{"event_id":"xb","twin":{"nope":null}}', 400, "has no property 'nope'"),  # not "it is declared"
    # A version is a JSON integer (edgecore's int64): `true` is not version 1, nor "0" version 0.
    ('{"event_id":"x8","twin":{"count":{"expected":{"value":"3"},"expected_version":{"edge":true}}}}', 400,
     "expected_version.edge"),
    ('{"event_id":"x9","twin":{"count":{"expected":{"value":"3"},"expected_version":{"edge":"0"}}}}', 400,
     "expected_version.edge"),
    ('{"event_id":"xa","twin":{"count":{"expected":{"value":"3"},"expected_version":{"edge":2.0}}}}', 400,
     "expected_version.edge"),
])
def test_bad_updates_get_edgecore_errors(broker, lamp, payload, code, reason):
    """Wrong type, read-only, unknown property, out of range, actual, malformed JSON: 400 with a reason."""
    mapper, sub = lamp
    pub(broker, f"{HW}/twin/update", payload)
    reply = sub.expect(f"{HW}/twin/update/result")
    assert reply["code"] == code and reason in reply["reason"], reply
    expected_id = json.loads(payload)["event_id"] if payload.startswith('{"event_id":"x') and "x6" not in payload else ""
    assert reply["event_id"] == expected_id


def test_a_request_that_is_not_utf8_is_refused_saying_where(broker, lamp):
    """A byte that is not UTF-8 anywhere in a request: orjson's reason was "str is not valid UTF-8:
    surrogates not allowed: line 1 column 1 (char 0)", whatever and wherever the byte was."""
    mapper, sub = lamp
    # "\udcff" is the byte 0xff on the command line (os.fsencode's surrogateescape).
    pub(broker, f"{HW}/twin/update", '{"event_id":"u8","twin":{"power":{"expected":{"value":"tr\udcffue"}}}}')
    reply = sub.expect(f"{HW}/twin/update/result")
    assert reply["code"] == 400, reply
    assert reply["reason"] == "the payload is not UTF-8 text: byte 0xff at offset 57 (invalid start byte)", reply
    pub(broker, "mapper/test-node/default/lamp/power/set", "tr\udcffue")
    mapper.wait_log("refused set for default/lamp: 400 the payload is not UTF-8 text: byte 0xff at offset 2")


def test_an_update_with_actual_next_to_expected_applies_the_expected(broker, lamp):
    """An app that read the twin (twin/get: each property with `actual`, `optional` and `metadata`)
    and sends a property back with a new `expected` gets it applied, as from edgecore: the `actual`
    beside it is ignored (before, the whole update was refused with 400 `actual values are reported
    by the device, not set`). An `actual` alone is still refused (test_bad_updates_get_edgecore_errors)."""
    mapper, sub = lamp
    sub.expect("mapper/test-node/default/lamp/power", lambda b: b["value"] is False)
    pub(broker, f"{HW}/twin/get", '{"event_id":"g0"}')
    got = sub.expect(f"{HW}/twin/get/result", lambda b: b["event_id"] == "g0")
    entry = got["twin"]["power"]
    assert entry["actual"]["value"] == "false" and "optional" in entry and "metadata" in entry, entry
    entry["expected"] = {"value": "true"}
    entry["actual"] = {"value": "garbage", "metadata": {"timestamp": 1}}  # ignored, not checked either
    pub(broker, f"{HW}/twin/update", json.dumps({"event_id": "ea", "timestamp": 0, "twin": {"power": entry}}))
    result = sub.expect(f"{HW}/twin/update/result", lambda b: b["event_id"] == "ea")
    assert "code" not in result, result
    assert result["twin"]["power"]["expected"]["value"] == "true", result
    # Applied by the device: the next reading reports it (the app's `actual` never became one).
    sub.expect("mapper/test-node/default/lamp/power", lambda b: b["value"] is True)
    with TwinStore.open(mapper.twin_path) as store:
        assert store.device(DeviceId("default", "lamp")).properties["power"].reported is True


def test_unknown_device_is_404_and_old_version_is_409(broker, lamp):
    """An unknown device gets 404; an update with a version older than stored gets 409."""
    mapper, sub = lamp
    pub(broker, "$hw/events/device/default/ghost/twin/update", '{"event_id":"u1","twin":{"power":{"expected":{"value":"true"}}}}')
    reply = sub.expect("$hw/events/device/default/ghost/twin/update/result")
    assert (reply["code"], reply["event_id"]) == (404, "u1")
    for i in range(2):
        pub(broker, f"{HW}/twin/update", '{"event_id":"v%d","twin":{"count":{"expected":{"value":"%d"}}}}' % (i, i + 10))
        sub.expect(f"{HW}/twin/update/result", lambda b, i=i: b["event_id"] == f"v{i}")
    pub(broker, f"{HW}/twin/update",
        '{"event_id":"old","twin":{"count":{"expected":{"value":"1"},"expected_version":{"edge":1}}}}')
    reply = sub.expect(f"{HW}/twin/update/result", lambda b: b["event_id"] == "old")
    assert reply["code"] == 409 and "older than the stored version 2" in reply["reason"]


def test_oversized_payload_is_refused(broker, lamp):
    """A payload over the limit is refused with 400 and never parsed."""
    mapper, sub = lamp
    big = '{"event_id":"big","twin":{"power":{"expected":{"value":"' + "x" * 70_000 + '"}}}}'
    pub(broker, f"{HW}/twin/update", big)
    reply = sub.expect(f"{HW}/twin/update/result")
    assert reply["code"] == 400 and "larger than the limit" in reply["reason"]


def _peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes: the most memory it has held at once."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_oversized_payload_is_refused_without_being_parsed(broker, lamp, tmp_path):
    """mosquitto.conf promises that a command over mqtt.max_payload_bytes is refused unread. An 8 MB
    `[{},{},...]` (within the broker's packet limit) was parsed whole all the same, to find an
    event_id for the refusal: the mapper's peak memory grew by about 30 times the payload. Now the
    refusal comes without an event_id, and the peak grows by a few copies of the payload at most."""
    mapper, sub = lamp
    big = tmp_path / "big.json"
    size = 8_000_000
    big.write_bytes(b"[" + b"{}," * ((size - 5) // 3) + b"{}]")
    before = _peak_rss(mapper.process.pid)
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P", broker.users["app"],
                    "-i", f"pub-{uuid.uuid4().hex[:8]}", "-q", "1", "-t", f"{HW}/twin/update", "-f", str(big)],
                   check=True, timeout=20)
    reply = sub.expect(f"{HW}/twin/update/result", timeout=20)
    assert reply["code"] == 400 and "larger than the limit" in reply["reason"] and reply["event_id"] == "", reply
    grown = _peak_rss(mapper.process.pid) - before
    # The MQTT client's own copies of the packet (its read buffer, the message's payload) take
    # about 3 times the payload; the full parse took over 30 times.
    assert grown < 5 * size, f"peak memory grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB payload"


def test_membership_state_and_plain_set_topic(broker, lamp):
    """membership/get lists the node's devices; state/update is answered (refused: the mapper reports
    the lamp's state itself); `.../set` applies a value."""
    mapper, sub = lamp
    pub(broker, "$hw/events/node/test-node/membership/get", '{"event_id":"m1"}')
    members = sub.expect("$hw/events/node/test-node/membership/get/result")
    assert members["event_id"] == "m1" and [d["id"] for d in members["devices"]] == ["default/lamp"]
    pub(broker, "mapper/test-node/default/lamp/count/set", "500")
    sub.expect("mapper/test-node/default/lamp/count", lambda b: 500 <= b["value"] < 600)
    pub(broker, f"{HW}/state/update", '{"event_id":"s1","state":"online"}', user="mapper")
    state = sub.expect(f"{HW}/state/update/result")
    assert state["event_id"] == "s1" and state["code"] == 400, state


def test_telemetry_payload_and_sequence(broker, lamp):
    """Telemetry carries value, unit, ts (ms) and a seq that counts up by one per topic."""
    mapper, sub = lamp
    first = sub.expect("mapper/test-node/default/lamp/temperature")
    second = sub.expect("mapper/test-node/default/lamp/temperature")
    assert second["seq"] == first["seq"] + 1
    assert first["unit"] == "Celsius" and 1_700_000_000_000 < first["ts"] <= second["ts"]
    state = sub.expect("mapper/test-node/default/lamp/state")
    assert set(state) >= {"temperature", "power", "count", "ts", "state", "seq"}


def test_a_retained_command_is_not_applied_at_connect(broker_for, tmp_path):
    """The broker's stored copy of a `/set` published with retain, handed out at every (re)connect,
    is ignored (it would set an old value again over newer ones)."""
    node = "retained-set"
    broker = broker_for(node)  # its ACL lets apps write this node's topics
    topic = f"mapper/{node}/default/lamp/count/set"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P", broker.users["app"],
                    "-q", "1", "-r", "-t", topic, "-m", "500"], check=True, timeout=10)
    try:
        mapper = MapperProcess(tmp_path, devices, broker, node=node)
        with mapper:
            mapper.wait_log("ignored a retained message on")
            pub(broker, topic, "7")  # a live command after it: applied
            mapper.wait_log("applied desired value 7")
            assert mapper.stop() == 0
        log = mapper.log()
        assert "applied desired value 500" not in log
        with sqlite3.connect(mapper.twin_path) as db:
            assert db.execute("SELECT desired FROM properties WHERE device_id='default/lamp' AND name='count'"
                              ).fetchone() == ("7",)
    finally:  # the shared broker keeps retained messages: clear it
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P",
                        broker.users["app"], "-q", "1", "-r", "-n", "-t", topic], check=True, timeout=10)


def _retained_commands(broker, node: str) -> list[str]:
    """The topics of the retained commands a new subscriber is handed (read as the mapper: no app may
    read a command topic). Mosquitto queues them as it handles each SUBSCRIBE, before it handles the
    reader's next packet: a message the reader then sends itself comes after every one of them (a
    barrier; each call used to wait out a whole second for them)."""
    barrier = f"mapper/{node}/barrier-{uuid.uuid4().hex[:8]}"
    with broker.client("mapper") as reader:
        reader.subscribe(f"mapper/{node}/+/+/+/set")
        reader.subscribe("$hw/events/device/default/+/twin/update")
        reader.subscribe(barrier)
        reader.publish(barrier, b"barrier")
        got: list[str] = []
        while (message := reader.next_message(timeout=10)).topic != barrier:
            if message.retain and message.payload and (message.topic.startswith(f"mapper/{node}/")
                                                       or "/ghost-" in message.topic or "/lamp/" in message.topic):
                got.append(message.topic)
        return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_retained_commands_are_cleared_from_the_broker(broker_for, tmp_path, protocol):
    """An app may publish a retained command to any device or property topic its ACL's `+` allows,
    invented ones too; the mapper ignored them but left them with the broker, which kept every one
    (memory, disk) and handed them all to the mapper again at every reconnect. The mapper now
    clears each (an empty retained message on its topic), says so in its log (a few lines, not one
    a message), and goes on working. Under MQTT 3.1.1 a live message arrives without the flag, so
    only the copies handed out at (re)connect are known as retained: those are published first."""
    node = f"clear-all-{protocol.replace('.', '')}"
    broker = broker_for(node)  # its ACL lets apps write this node's topics
    count = 100
    topics = [f"mapper/{node}/default/ghost-{i}/p{i}/set" for i in range(count)]
    topics += [f"$hw/events/device/default/ghost-{node}-{i}/twin/update" for i in range(count - 1)]
    # One of this mapper's devices too: an invented one's clear, taken as a request, fails with 404
    # before its payload is read; this one's would be refused as malformed JSON, with a reply.
    topics.insert(count, f"{HW}/twin/update")
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    extra = f'  protocol: "{protocol}"\n'
    results = Sub(broker, "app", "$hw/events/device/default/+/twin/update/result", f"{HW}/twin/get/result")
    try:
        with broker.client("app") as app:
            for topic in topics[: count // 2] + topics[count: count + count // 2]:
                assert not app.publish(topic, b'{"event_id":"r","twin":{}}' if topic.startswith("$") else b"1",
                                       retain=True).is_failure
        assert len(_retained_commands(broker, node)) == count
        with MapperProcess(tmp_path, devices, broker, node=node, extra=extra) as mapper:
            mapper.wait_log("connected to mqtt://")
            if protocol == "5":  # live ones, known as retained by retain-as-published
                with broker.client("app") as app:
                    for topic in topics[count // 2: count] + topics[count + count // 2:]:
                        assert not app.publish(topic, b"{}" if topic.startswith("$") else b"2", retain=True).is_failure
            deadline = time.monotonic() + 20
            while (left := _retained_commands(broker, node)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not left, f"{len(left)} retained commands still with the broker, e.g. {left[:3]}"
            pub(broker, f"mapper/{node}/default/lamp/count/set", "7")  # the mapper still works
            mapper.wait_log("applied desired value 7")
            # The mapper's own clears are no requests (under 3.1.1 they come back without the
            # flag): no reply to any. The barrier: a twin/get after them, answered after them.
            time.sleep(0.5)
            with broker.client("app") as app:
                assert not app.publish(f"{HW}/twin/get", b'{"event_id":"barrier"}').is_failure
            replies = _replies_before_barrier(results, f"{HW}/twin/get/result", "barrier", quiet=set())
            assert replies == [], replies[:3]
            assert mapper.stop() == 0
        log = mapper.log()
        lines = [line for line in log.splitlines() if "ignored a retained message on" in line]
        assert 1 <= len(lines) <= 10 and all("cleared it" in line for line in lines), lines
        assert "an empty message is no" not in log and "malformed JSON" not in log, log[-2000:]
    finally:  # the shared broker keeps retained messages: clear what is left
        results.close()
        with broker.client("app") as app:
            for topic in topics:
                app.publish(topic, b"", retain=True)


def _device_dir(tmp_path: Path, name: str, text: str) -> Path:
    """tmp_path/dev holding one device file."""
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / name).write_text(text)
    return devices


LABEL = one_property_device("sign", "{name: label, type: STRING, accessMode: ReadWrite}", "{kind: switch}",
                            settings="collectCycle: 200")


def test_a_command_sent_live_with_retain_is_ignored_and_clearing_it_sets_no_value(broker_for, tmp_path):
    """Under MQTT 5 (retain-as-published) a `/set` published with the retain flag reaches the mapper
    with it, live too, and is ignored: applied, the broker's copy would set it again at every
    reconnect. The README's way to clear that copy, an empty retained message, is no value either:
    a STRING property keeps its desired value instead of becoming "" (`""` sets an empty string)."""
    node = "clear-retained"
    broker = broker_for(node)  # its ACL lets apps write this node's topics
    topic = f"mapper/{node}/default/sign/label/set"
    devices = _device_dir(tmp_path, "sign.yaml", LABEL)
    with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        mapper.wait_log("connected to mqtt://")
        pub(broker, topic, "hello")
        mapper.wait_log("applied desired value 'hello'")
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P",
                        broker.users["app"], "-q", "1", "-r", "-t", topic, "-m", '"kept"'], check=True, timeout=10)
        mapper.wait_log("ignored a retained message on")
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P",
                        broker.users["app"], "-q", "1", "-r", "-n", "-t", topic], check=True, timeout=10)
        outcome = wait_for(lambda: ("applied" if "applied desired value ''" in mapper.log() else
                                    "cleared" if "was cleared (no value" in mapper.log() else None),
                           what="the empty message applied or taken as a clear")
        assert outcome == "cleared", mapper.log()[-1500:]
        subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P",
                        broker.users["app"], "-q", "1", "-n", "-t", topic], check=True, timeout=10)
        mapper.wait_log("an empty message is no value")  # the same without the flag (MQTT 3.1.1 gets it so)
        pub(broker, topic, '""')  # an empty string, said so
        mapper.wait_log("applied desired value ''")
        assert mapper.stop() == 0
    assert "applied desired value 'kept'" not in mapper.log()


def _replies_before_barrier(sub, barrier_result: str, event_id: str, *, quiet: set[str]) -> list[tuple[str, str]]:
    """Every `$hw` result (or other reply) `sub` got before the barrier's get/result, skipping the
    requests themselves (`quiet`) and the mapper's telemetry. The barrier is a twin/get sent on the
    same connection after the messages under test: the mapper handles them in order and publishes
    its answers through its outbox in that order, so a reply to one of them arrives before it."""
    replies = []
    while True:
        try:
            topic, payload = sub.lines.get(timeout=10)
        except queue.Empty:
            raise AssertionError(f"no {barrier_result} for the barrier; seen before it: {replies}") from None
        if topic == barrier_result and json.loads(payload).get("event_id") == event_id:
            return replies
        if topic in quiet or topic.startswith("mapper/test-node/"):
            continue
        if topic.endswith("/twin/update/delta") or (topic.endswith("/twin/update/document")
                                                    and json.loads(payload)["event_id"] == ""):
            continue  # a device's readings' documents (and a delta left with them), at each report cycle
        replies.append((topic, payload))


def test_an_empty_twin_request_is_refused_without_a_reply(broker, lamp):
    """An empty payload is what clears a retained message: under MQTT 3.1.1 a broker forwards a
    clear live, without the retain flag, and so does a mapper's own clear when its echo is not
    recognised (on a shared broker another mapper's, or one beyond CLEARING_MAX). As an empty
    `/set` is, it is refused (logged, counted), never answered: a `{"code":400,"reason":"malformed
    JSON ..."}` (or a 404 for an invented device) on `.../result` reached the apps reading it."""
    mapper, sub = lamp
    while not sub.lines.empty():
        sub.lines.get()
    ghost = "$hw/events/device/default/ghost-empty"
    empty = [f"{HW}/twin/update", f"{HW}/twin/get", f"{ghost}/twin/update", f"{ghost}/twin/get"]
    barrier = f"{HW}/twin/get"
    with broker.client("app") as app:
        for topic in empty:
            assert not app.publish(topic, b"").is_failure
        app.publish(barrier, '{"event_id":"barrier"}')
    replies = _replies_before_barrier(sub, f"{barrier}/result", "barrier", quiet=set(empty))
    assert replies == [], replies
    mapper.wait_log("refused twin/update for default/lamp: 400 an empty message is no request")
    mapper.wait_log("refused twin/get for default/lamp: 400 an empty message is no request")
    mapper.wait_log("refused twin/update for default/ghost-empty: 404")


def test_an_update_with_an_empty_twin_is_answered_as_edgecore_does(broker, lamp):
    """edgecore refuses an update only when `twin` is missing or null (UnmarshalDeviceTwinUpdate):
    `{"twin":{}}` changes nothing and gets a result with an empty `twin`, no document. It was a
    400 here. A missing or null `twin` is still a 400."""
    mapper, sub = lamp
    while not sub.lines.empty():
        sub.lines.get()
    with broker.client("app") as app:
        app.publish(f"{HW}/twin/update", '{"event_id":"none","timestamp":0,"twin":{}}')
        app.publish(f"{HW}/twin/update", '{"event_id":"null","twin":null}')
        app.publish(f"{HW}/twin/update", '{"event_id":"missing"}')
        app.publish(f"{HW}/twin/get", '{"event_id":"barrier"}')
    replies = _replies_before_barrier(sub, f"{HW}/twin/get/result", "barrier", quiet={f"{HW}/twin/update"})
    bodies = [(topic, json.loads(payload)) for topic, payload in replies]
    assert [(topic, body["event_id"]) for topic, body in bodies] == [
        (f"{HW}/twin/update/result", "none"), (f"{HW}/twin/update/result", "null"),
        (f"{HW}/twin/update/result", "missing")], bodies
    empty, null, missing = (body for _, body in bodies)
    assert empty["twin"] == {} and "code" not in empty, empty
    assert null["code"] == 400 and "twin" in null["reason"], null
    assert missing["code"] == 400 and "twin" in missing["reason"], missing


def test_a_long_desired_value_is_named_not_copied_into_the_log(broker_for, tmp_path):
    """A client may set a STRING property to 60 KB of text: the value is applied whole, and the
    log line says so with the first 200 characters, instead of writing all of it into the journal
    at every set."""
    node = "long-value"
    broker = broker_for(node)  # its ACL lets apps write this node's topics
    topic = f"mapper/{node}/default/sign/label/set"
    devices = _device_dir(tmp_path, "sign.yaml", LABEL)
    text = "x" * 60_000
    with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
        mapper.wait_log("connected to mqtt://")
        pub(broker, topic, json.dumps(text))
        mapper.wait_log("applied desired value 'xxx")
        line = next(x for x in mapper.log().splitlines() if "applied desired value" in x)
        assert line.endswith("... (60000 characters) (version 1)"), line[-200:]
        assert len(line) < 400
        assert mapper.stop() == 0
    with TwinStore.open(mapper.twin_path) as store:
        assert store.device(DeviceId.parse("sign")).properties["label"].reported == text


@pytest.mark.parametrize("entry", ['{"expected":{"value":"5"}}', "null", '{"actual":{"value":"5"}}', '{"expected":"5"}'])
def test_a_long_property_name_is_named_not_copied_into_the_log_or_reply(broker, lamp, entry):
    """A twin/update naming a property of 60 KB (undeclared, deleted, with an actual value, or
    malformed): refused with 400, and the reason and the log line give the name's first
    characters and its length, not all of it: the refusal log is limited in lines a minute, so
    one such line per request would still write 600 KB a minute into the journal."""
    mapper, sub = lamp
    name = "k" * 60_000
    pub(broker, f"{HW}/twin/update", '{"event_id":"long","twin":{"%s":%s}}' % (name, entry))
    reply = sub.expect(f"{HW}/twin/update/result", lambda b: b["event_id"] == "long")
    assert reply["code"] == 400 and "(60000 characters)" in reply["reason"], reply["reason"][:300]
    assert len(reply["reason"]) < 400
    mapper.wait_log("refused twin/update")
    refused = [x for x in mapper.log().splitlines() if "refused twin/update" in x]
    assert refused and all(len(x) < 600 for x in refused), max(len(x) for x in refused)


def test_a_null_event_id_is_answered_as_edgecore_does(broker, lamp):
    """`"event_id": null` is what Go's encoding/json reads as "" (edgecore answers it): twin/update
    took it so, but twin/get got a 400 and membership/get no answer at all."""
    mapper, sub = lamp
    pub(broker, f"{HW}/twin/get", '{"event_id":null,"timestamp":0}')
    got = sub.expect(f"{HW}/twin/get/result")
    assert got["event_id"] == "" and "code" not in got and "power" in got["twin"], got
    pub(broker, "$hw/events/node/test-node/membership/get", '{"event_id":null}')
    members = sub.expect("$hw/events/node/test-node/membership/get/result")
    assert members["event_id"] == "" and [d["id"] for d in members["devices"]] == ["default/lamp"]
    pub(broker, f"{HW}/state/update", '{"event_id":null,"state":"online"}', user="mapper")
    refused = sub.expect(f"{HW}/state/update/result")  # (the mapper reports the lamp's state itself)
    assert refused["event_id"] == "" and refused["code"] == 400, refused


def test_an_empty_expected_value_is_no_delta_as_in_edgecore():
    """edgecore's delta lists only twins whose expected is not "" (FACTS.md §5.2: published only
    if some twin has expected != "" and expected != actual; `twin` holds those with a non-empty
    expected). A STRING property asked to be "" is therefore no delta. Before, it was listed."""
    from eventbus import payloads
    from twin.records import DeviceTwin, PropertyTwin

    def prop(name: str, ptype: str, desired, reported) -> PropertyTwin:  # noqa: ANN001
        return PropertyTwin(name=name, type=ptype, writable=True, unit="", desired=desired, desired_version=1,
                            desired_ts=1, reported=reported, reported_version=1, reported_ts=1, quality="good",
                            quality_detail=None, apply_error=None)

    def device(*props: PropertyTwin) -> DeviceTwin:
        return DeviceTwin(DeviceId("default", "lamp"), "m", "simulated", "online", None, None, None, None,
                          {p.name: p for p in props})

    label = prop("label", "STRING", "", "kitchen")
    assert payloads.delta(device(label, prop("power", "BOOLEAN", True, True))) is None
    body = payloads.delta(device(label, prop("power", "BOOLEAN", True, False)))
    assert body["delta"] == {"power": "true"} and set(body["twin"]) == {"power"}, body
    # A non-empty string is a delta as before.
    body = payloads.delta(device(prop("label", "STRING", "hall", "kitchen")))
    assert body["delta"] == {"label": "hall"} and set(body["twin"]) == {"label"}


def test_a_burst_of_membership_requests_gets_a_bounded_number_of_replies(broker, lamp):
    """membership/get is answered at once at most once a second: 200 requests in a burst (one
    client, `mosquitto_pub -l`, about 20 bytes each; each reply lists the node's devices) get the
    first reply at once and, when the second is up, one reply for each of the newest 8 event_ids;
    a request sent after the burst gets its own answer. Before, every request got its reply (200)."""
    import time

    mapper, sub = lamp
    topic = "$hw/events/node/test-node/membership/get"
    burst = "".join('{"event_id":"b%d"}\n' % i for i in range(200))
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app", "-P", broker.users["app"],
                    "-i", f"pub-{uuid.uuid4().hex[:8]}", "-q", "1", "-t", topic, "-l"],
                   input=burst, text=True, check=True, timeout=10)
    pub(broker, topic, '{"event_id":"legit"}')
    replies: list[str] = []
    deadline = time.monotonic() + 10
    while "legit" not in replies and (left := deadline - time.monotonic()) > 0:
        try:
            got, payload = sub.lines.get(timeout=left)
        except queue.Empty:
            break
        if got == f"{topic}/result":
            body = json.loads(payload)
            assert [d["id"] for d in body["devices"]] == ["default/lamp"]
            replies.append(body["event_id"])
    assert replies and replies[-1] == "legit", replies
    assert replies[0] == "b0" and len(replies) <= 1 + 8, replies  # the first at once, the newest 8 after
    assert len(set(replies)) == len(replies), replies
    mapper.wait_log("membership/get: more than 8 requests within 1 s; the oldest of them get no reply")


def test_membership_requests_within_a_second_each_get_their_own_reply(broker, lamp):
    """A few apps asking within the same second (after a broker restart, say) each get a reply
    with their own event_id, as from edgecore, once the second is up: matching a reply by its
    event_id keeps working under the rate limit. (Collapsed into one reply with the newest
    event_id, the others timed out.)"""
    mapper, sub = lamp
    topic = "$hw/events/node/test-node/membership/get"
    for event_id in ("a1", "a2", "a3", "a2"):
        pub(broker, topic, '{"event_id":"%s"}' % event_id)
    got = [sub.expect(f"{topic}/result")["event_id"] for _ in range(3)]
    assert got == ["a1", "a3", "a2"], got  # a1 at once; a3 and a2 (asked again: once, as the newest) after


def test_twin_gets_for_a_device_within_a_second_each_get_their_own_reply(broker, lamp):
    """twin/get is rate-limited per device as membership/get is (router._coalesce): the first at
    once, those within the second after it together when it is up, each with its own event_id (a
    repeated one once, as the newest), and the twin read then (a value set meanwhile is in it).
    Each reply used to be a commit of its own (an fsync): a client flooding twin/get took the
    twin's time from the readings and filled the incoming queue (test_incoming_flood.py)."""
    mapper, sub = lamp
    with broker.client("app") as app:  # one connection: the four below go out within the second
        assert not app.publish(f"{HW}/twin/get", '{"event_id":"g1"}', qos=1).is_failure
        assert sub.expect(f"{HW}/twin/get/result")["event_id"] == "g1"
        for event_id in ("g2", "g3", "g2"):
            assert not app.publish(f"{HW}/twin/get", '{"event_id":"%s"}' % event_id, qos=1).is_failure
        assert not app.publish(f"{HW}/twin/update", '{"event_id":"u1","twin":{"count":{"expected":{"value":"7"}}}}',
                               qos=1).is_failure
    sub.expect(f"{HW}/twin/update/result", lambda body: body["event_id"] == "u1")
    got = [sub.expect(f"{HW}/twin/get/result") for _ in range(2)]
    assert [body["event_id"] for body in got] == ["g3", "g2"], got
    assert all(body["twin"]["count"]["expected"]["value"] == "7" for body in got), got


def test_a_burst_of_refused_twin_gets_gets_a_bounded_number_of_replies(broker, lamp):
    """Refusals of queries (twin/get, state/update) are answered at most 20 a second (a burst of
    20): each reply is a commit, and an app may name any device. 100 twin/gets for invented
    devices get 20 or a few more 404s; the rest are refused without a reply, counted and logged.
    A refused command is still answered: the twin/update after them gets its 404."""
    mapper, sub = lamp
    ghosts = "$hw/events/device/default/ghost"
    with broker.client("app") as app:
        for i in range(100):
            assert not app.publish(f"{ghosts}{i}/twin/get", '{"event_id":"r%d"}' % i).is_failure
        assert not app.publish(f"{ghosts}/twin/update",
                               '{"event_id":"cmd","twin":{"power":{"expected":{"value":"true"}}}}').is_failure
    replies = _replies_before_barrier(sub, f"{ghosts}/twin/update/result", "cmd",
                                      quiet={f"{ghosts}{i}/twin/get" for i in range(100)})
    refused = [json.loads(payload) for topic, payload in replies if topic.endswith("/twin/get/result")]
    assert all(body["code"] == 404 for body in refused), refused
    assert 20 <= len(refused) < 60, len(refused)
    mapper.wait_log("no reply (more than 20 refused queries a second)")


def test_a_membership_request_waiting_for_the_rate_limit_is_answered_by_a_clean_stop(broker, lamp):
    """A membership/get within a second of the last reply waits for the interval's end; a clean
    stop in that second ended the task that would answer it, and the request (acknowledged to
    the broker) got no reply. The stop now answers it before the outbox drains."""
    mapper, sub = lamp
    topic = "$hw/events/node/test-node/membership/get"
    pub(broker, topic, '{"event_id":"first"}')
    assert sub.expect(f"{topic}/result")["event_id"] == "first"
    pub(broker, topic, '{"event_id":"waiting"}')
    # Handled in order: once this twin/get is answered, the waiting request was taken in too.
    pub(broker, f"{HW}/twin/get", '{"event_id":"after"}')
    sub.expect(f"{HW}/twin/get/result", lambda body: body.get("event_id") == "after")
    assert mapper.stop() == 0
    assert sub.expect(f"{topic}/result", timeout=5)["event_id"] == "waiting"


LABELLED = one_property_device("tag", "{name: label, type: STRING, accessMode: ReadWrite}",
                               "{kind: constant, value: none}",
                               settings="collectCycle: 100\nreportCycle: 100\nreportToCloud: true")


def test_a_string_set_as_plain_text_is_kept_as_it_is(broker, tmp_path):
    """Text that looks like a number is a STRING's value as written (`1.10`, not "1.1"), as the CLI,
    REST and twin/update keep it; a JSON string is still decoded, and `{"value": ...}` still works."""
    devices = _device_dir(tmp_path, "tag.yaml", LABELLED)
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "mapper/test-node/default/tag/label")
        try:
            sub.expect("mapper/test-node/default/tag/label", lambda b: b["value"] == "none")
            for payload, value in [("1.10", "1.10"), ("0.50", "0.50"), ("1e3", "1e3"), ("007", "007"),
                                   ("true", "true"), ('"1.10 "', "1.10 "), ('{"value": "x1"}', "x1"),
                                   # Text that starts with "{" goes inside {"value": ...} or as a JSON string.
                                   ('{"value": "{not json"}', "{not json"), ('"{\\"a\\":1}"', '{"a":1}'),
                                   ("[1, 2", "[1, 2")]:
                pub(broker, "mapper/test-node/default/tag/label/set", payload)
                sub.expect("mapper/test-node/default/tag/label", lambda b, v=value: b["value"] == v)
        finally:
            sub.close()
            assert mapper.stop() == 0


def test_a_json_number_for_a_string_property_is_refused_not_rewritten(broker, tmp_path):
    """`{"value": 1.10}` (twin/update, or a `/set` object) for a STRING property: the JSON parser
    keeps no number's text, so the property was set to "1.1" (and a 23-digit number to
    "1.2345678901234568e+22"): another text than the one sent. Refused, saying to send a string."""
    devices = _device_dir(tmp_path, "tag.yaml", LABELLED)
    hw = "$hw/events/device/default/tag"
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "mapper/test-node/default/tag/label", f"{hw}/twin/update/result")
        try:
            sub.expect("mapper/test-node/default/tag/label", lambda b: b["value"] == "none")
            pub(broker, f"{hw}/twin/update", '{"event_id":"n1","twin":{"label":{"expected":{"value":1.10}}}}')
            reply = sub.expect(f"{hw}/twin/update/result", lambda b: b["event_id"] == "n1")
            assert reply.get("code") == 400, reply
            assert reply["reason"].startswith("property 'label': a STRING value is sent as a JSON string"), reply
            pub(broker, "mapper/test-node/default/tag/label/set", '{"value": 12345678901234567890123}')
            mapper.wait_log("refused set for default/tag: 400 a STRING value is sent as a JSON string")
            # The same values as JSON strings are taken as they are.
            pub(broker, f"{hw}/twin/update", '{"event_id":"n2","twin":{"label":{"expected":{"value":"1.10"}}}}')
            assert "code" not in sub.expect(f"{hw}/twin/update/result", lambda b: b["event_id"] == "n2")
            sub.expect("mapper/test-node/default/tag/label", lambda b: b["value"] == "1.10")
        finally:
            sub.close()
            assert mapper.stop() == 0
    with TwinStore.open(mapper.twin_path) as store:
        assert store.device(DeviceId.parse("tag")).properties["label"].desired == "1.10"


def test_two_mappers_on_a_shared_broker_answer_only_for_their_own_devices(broker, tmp_path):
    """With `mqtt.shared_broker`, a twin request for one node's device gets that mapper's answer
    only: the other mapper, which does not have the device, stays silent (it answered 404 first)."""
    shared = "  shared_broker: true\n"
    a = MapperProcess(tmp_path, write_devices(tmp_path / "dev-a", ["lamp-a"], cycle=200), broker,
                      node="node-a", name="mapper-a", extra=shared)
    b = MapperProcess(tmp_path, write_devices(tmp_path / "dev-b", ["lamp-b"], cycle=200), broker,
                      node="node-b", name="mapper-b", extra=shared)
    base = "$hw/events/device/default"
    with a, b:
        a.wait_log("connected to mqtt://")  # (logged once the broker acknowledged its subscriptions)
        b.wait_log("connected to mqtt://")
        sub = Sub(broker, "mapper", f"{base}/+/twin/get/result", "mapper/node-a/default/lamp-a/state")
        try:
            sub.expect("mapper/node-a/default/lamp-a/state")  # the subscriber is in place
            seen: list[tuple[str, dict]] = []

            def until(done) -> None:  # noqa: ANN001 - every get/result in order, until `done(seen)`
                deadline = time.monotonic() + 15
                while not done(seen):
                    left = deadline - time.monotonic()
                    assert left > 0, f"timed out; seen {seen}"
                    try:
                        topic, payload = sub.lines.get(timeout=left)
                    except queue.Empty:
                        continue
                    if topic.endswith("/twin/get/result"):
                        seen.append((topic.split("/")[4], json.loads(payload)))

            def answered(device: str, event_id: str):  # noqa: ANN202
                return lambda got: any(d == device and body.get("event_id") == event_id and "twin" in body
                                       for d, body in got)

            pub(broker, f"{base}/lamp-a/twin/get", '{"event_id":"g-a"}')
            # The barrier: mapper B answers its own device after whatever it sent for lamp-a.
            pub(broker, f"{base}/lamp-b/twin/get", '{"event_id":"g-b"}')
            until(lambda got: answered("lamp-a", "g-a")(got) and answered("lamp-b", "g-b")(got))
            assert [body.get("code") for _, body in seen] == [None, None], seen
        finally:
            sub.close()
            assert a.stop() == 0
            assert b.stop() == 0


def test_plain_set_takes_a_json_object_and_a_refusal_has_no_reply(broker, lamp):
    """What the README's topics table says of `.../<property>/set`: the value may come as a JSON
    object `{"value": ...}` (other keys ignored), and a refused /set gets no reply on any topic,
    only a log line (and the refusal count)."""
    mapper, sub = lamp
    pub(broker, "mapper/test-node/default/lamp/count/set", '{"value": 700, "note": "ignored"}')
    # The reading of 700 and the twin document of the write (KubeEdge's twin protocol, sent once the
    # driver has the value) come in either order: a document arriving after the drain was taken
    # for a reply to the refused set below (failed once).
    waiting = {"mapper/test-node/default/lamp/count": lambda body: 700 <= body["value"] < 800,
               f"{HW}/twin/update/document": lambda body: "count" in body["twin"]}
    deadline = time.monotonic() + 20  # the lamp publishes on: bounded in all, not per message
    while waiting:
        try:
            topic, payload = sub.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"still waiting for {sorted(waiting)}") from None
        if topic in waiting and waiting[topic](json.loads(payload)):
            del waiting[topic]
    pub(broker, f"{HW}/twin/get", '{"event_id":"drained"}')  # what the write sent (its delta) comes before
    _replies_before_barrier(sub, f"{HW}/twin/get/result", "drained", quiet=set())
    refused, barrier = "mapper/test-node/default/lamp/count/set", f"{HW}/twin/get"
    # One connection: the mapper takes the set, then the get, and publishes what it answers (through
    # its outbox) in that order, so a reply to the set would reach `sub` before the get's result.
    with broker.client("app") as app:
        app.publish(refused, "-5")
        app.publish(barrier, '{"event_id":"barrier"}')
    mapper.wait_log("refused set for default/lamp: 400")
    replies = []
    while True:
        try:
            topic, payload = sub.lines.get(timeout=10)
        except queue.Empty:
            raise AssertionError(f"no twin/get/result for the barrier; seen before it: {replies}") from None
        if topic == f"{barrier}/result" and json.loads(payload).get("event_id") == "barrier":
            break
        if topic in (refused, barrier):  # the requests themselves
            continue
        if topic == f"{HW}/twin/update/delta" or (topic == f"{HW}/twin/update/document"
                                                  and json.loads(payload)["event_id"] == ""):
            continue  # the lamp's readings' documents, and the delta the count set above leaves with each
        if not topic.startswith("mapper/test-node/default/lamp/") or topic.count("/") > 5:
            replies.append(topic)
    assert replies == [], replies


def test_on_a_shared_broker_under_311_another_mappers_clear_gets_no_reply(broker, tmp_path):
    """Two mappers on one broker (`mqtt.shared_broker`), MQTT 3.1.1, and a retained twin/update of
    B's device: both are handed it at connect and clear it, and each gets the other's clear live,
    without the retain flag. B refused A's as malformed JSON and published a 400 on
    `.../twin/update/result`, which apps read; an empty message is now refused without a reply."""
    extra = '  shared_broker: true\n  protocol: "3.1.1"\n'
    base = "$hw/events/device/default"
    retained = f"{base}/lamp-b/twin/update"
    a = MapperProcess(tmp_path, write_devices(tmp_path / "dev-a", ["lamp-a"], cycle=200), broker,
                      node="node-a", name="mapper-a", extra=extra)
    b = MapperProcess(tmp_path, write_devices(tmp_path / "dev-b", ["lamp-b"], cycle=200), broker,
                      node="node-b", name="mapper-b", extra=extra)
    sub = Sub(broker, "app", f"{base}/lamp-b/twin/update/result", f"{base}/lamp-b/twin/get/result",
              "mapper/node-b/default/lamp-b/state")
    try:
        with broker.client("app") as app:
            assert not app.publish(retained, b'{"event_id":"old","twin":{}}', retain=True).is_failure
        with a, b:
            a.wait_log("connected to mqtt://")
            b.wait_log("connected to mqtt://")
            sub.expect("mapper/node-b/default/lamp-b/state")
            wait_for(lambda: "cleared it" in a.log() + b.log(), what="the retained twin/update cleared")
            time.sleep(0.5)  # the clears' echoes
            # Whether both were handed the retained copy depends on who subscribed first: what A's
            # clear is, an empty retained message from the mapper's user, once more for certain.
            with broker.client("mapper") as other:
                assert not other.publish(retained, b"", retain=True).is_failure
            pub(broker, f"{base}/lamp-b/twin/get", '{"event_id":"barrier"}')
            replies = _replies_before_barrier(sub, f"{base}/lamp-b/twin/get/result", "barrier",
                                              quiet={"mapper/node-b/default/lamp-b/state"})
            assert replies == [], replies
            assert a.stop() == 0
            assert b.stop() == 0
        assert "malformed JSON" not in a.log() + b.log()
    finally:
        sub.close()
        with broker.client("app") as app:
            app.publish(retained, b"", retain=True)


def test_state_update_is_refused_for_a_device_this_mapper_reports_the_state_of(broker, tmp_path):
    """In standalone mode the mapper observes the state of its devices itself: `lamp`, which it
    runs, and `odd`, which it refuses (no driver for its protocol, so `offline`). A state/update
    from a client overwrote that state (`offline` for the healthy lamp, `ok` for odd), contradicting
    the availability topics until the next change. Now it is refused with a 400 on
    `.../state/update/result` whose reason says so, logged and counted; the state stays the mapper's."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    (devices / "odd.yaml").write_text(device_yaml("odd").replace("protocolName: simulated\n    configData",
                                                                 "protocolName: bacnet\n    configData"))
    base = "$hw/events/device/default"
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{base}/+/state/update/result", "mapper/test-node/default/lamp/state",
                  "$hw/events/node/test-node/membership/get/result")
        try:
            sub.expect("mapper/test-node/default/lamp/state", lambda b: b["state"] == "ok")
            for device, event_id, state in (("lamp", "s-lamp", "offline"), ("odd", "s-odd", "ok")):
                pub(broker, f"{base}/{device}/state/update", json.dumps({"event_id": event_id, "state": state}),
                    user="mapper")
                reply = sub.expect(f"{base}/{device}/state/update/result")
                assert reply["event_id"] == event_id and reply["code"] == 400, reply
                assert "reports this device's state itself" in reply["reason"], reply
                assert "device" not in reply, reply
            mapper.wait_log("refused state/update for default/lamp: 400")
            mapper.wait_log("refused state/update for default/odd: 400")
            pub(broker, "$hw/events/node/test-node/membership/get", '{"event_id":"m1"}')
            members = sub.expect("$hw/events/node/test-node/membership/get/result")
            states = {d["id"]: d["state"] for d in members["devices"]}
            assert states == {"default/lamp": "ok", "default/odd": "offline"}, states
        finally:
            sub.close()
            assert mapper.stop() == 0


def _labels_until(sub, barrier: str, limit: int = 1000) -> list[str]:
    """The label values published until `barrier` is (at most `limit` of them: the label is
    published on every cycle, so a barrier that never comes must still end the wait)."""
    seen = []
    while (value := sub.expect("mapper/test-node/default/tag/label")["value"]) != barrier:
        seen.append(value)
        assert len(seen) < limit, f"no {barrier!r} among {limit} label values"
    return seen


def test_a_malformed_json_object_set_on_a_string_is_refused_not_written_as_text(broker, tmp_path):
    """A `/set` payload that starts with "{" is a JSON object carrying `value`, or refused: a
    truncated object, one with a typo, one nested deeper than the twin protocol takes, or one
    without `value` were written to the STRING property as literal text (the deep one as 2.2 KB)."""
    devices = _device_dir(tmp_path, "tag.yaml", LABELLED)
    deep = '{"value": ' + "[" * 1100 + "]" * 1100 + "}"
    refused = [('{"value": "trunc"', "malformed JSON: unexpected end of data"),
               ('  {"value": "ON",}', "malformed JSON: trailing comma is not allowed"),
               (deep, "malformed JSON: depth limit exceeded"),
               ('{"a": 1}', 'the JSON object has no "value" key')]
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "mapper/test-node/default/tag/label")
        try:
            sub.expect("mapper/test-node/default/tag/label", lambda b: b["value"] == "none")
            with broker.client("app") as app:  # one connection: taken in this order
                for payload, _ in refused:
                    app.publish("mapper/test-node/default/tag/label/set", payload)
                app.publish("mapper/test-node/default/tag/label/set", '{"value": "after"}')
            assert set(_labels_until(sub, "after")) <= {"none"}
            for _, reason in refused:
                mapper.wait_log(f"refused set for default/tag: 400 {reason}")
        finally:
            sub.close()
            assert mapper.stop() == 0
    with TwinStore.open(mapper.twin_path) as store:
        label = store.device(DeviceId("default", "tag")).properties["label"]
    assert (label.desired, label.desired_version) == ("after", 1), label  # the refused ones were never written


def test_a_set_object_without_a_value_key_says_so(broker, lamp):
    """`{"a":1}` on a numeric property's `/set` was refused as "the value must be a scalar", though
    it carries no value at all: the refusal names the missing `value` key."""
    mapper, sub = lamp
    pub(broker, "mapper/test-node/default/lamp/count/set", '{"a": 1}')
    mapper.wait_log('refused set for default/lamp: 400 the JSON object has no "value" key')
    assert "must be a scalar" not in mapper.log()


async def test_the_stop_ends_run_when_its_wake_comes_with_the_cancel():
    """run() waiting out a rate limit's interval, woken (a request for a new key) in the loop iteration
    where the stop cancels it: asyncio.wait_for, which it waited with, returns under Python 3.11 when
    the awaited wait is done and drops the cancel; run() went on, and the event bus's task group (the
    mapper's stop with it) waited for it for ever."""
    import asyncio

    from eventbus.router import Router
    from eventbus.topics import Topics

    async def never_answered(event_ids: list[str]) -> None:
        raise AssertionError(f"answered {event_ids} before the interval's end")

    router = Router(None, Topics("n"), max_payload=1024, serve_twin_protocol=True)  # type: ignore[arg-type]
    key = ("twin/get", DeviceId("default", "a"))
    router._waiting[key], router._answer[key] = {"a2": None}, never_answered
    router._next[key] = asyncio.get_running_loop().time() + 600  # the interval: run() waits it out
    task = asyncio.create_task(router.run())
    try:
        while not router._wake._waiters:  # (a few loop iterations: run() and the wait it starts)
            await asyncio.sleep(0)
        router._wake.set()
        await asyncio.sleep(0)  # the wait ends in the next iteration, before this task goes on ...
        task.cancel()  # ... and the stop comes before run() has resumed
        done, _ = await asyncio.wait({task}, timeout=10)  # (no cancel from here: it would end the task)
        assert task in done, "run() went on after its stop"
        assert task.cancelled()
    finally:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)


async def test_a_stop_that_answers_waiting_requests_while_run_answers_them_is_not_an_error():
    """Two keys fell due together (two devices' twin/get waiting out the rate limit) and run() was
    answering the first when a clean stop's flush_waiting answered and emptied the rest: run() then
    popped a key that was gone (KeyError), which ended the event bus's task group mid-stop (its
    drain and the node's `offline` with it). Each waiting request is answered exactly once."""
    import asyncio
    import contextlib

    from eventbus.router import Router
    from eventbus.topics import Topics

    router = Router(None, Topics("n"), max_payload=1024, serve_twin_protocol=True,  # type: ignore[arg-type]
                    twin_get_interval_s=0.05)
    answered: list[tuple[str, list[str]]] = []
    first_started, release = asyncio.Event(), asyncio.Event()

    def answer_for(device: str):  # noqa: ANN202
        async def answer(event_ids: list[str]) -> None:
            answered.append((device, event_ids))
            if len(answered) == 3:  # run()'s first answer of the waiting ones: hold it
                first_started.set()
                await release.wait()
        return answer

    for device in ("a", "b"):  # the first of each is answered at once, the second waits out the interval
        for n in (1, 2):
            await router._coalesce("twin/get", DeviceId("default", device), f"{device}{n}", answer_for(device))
    task = asyncio.create_task(router.run())
    try:
        await asyncio.wait_for(first_started.wait(), 30)
        await router.flush_waiting()  # the stop: answers the other key
        release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sorted(answered) == [("a", ["a1"]), ("a", ["a2"]), ("b", ["b1"]), ("b", ["b2"])]


def test_reported_values_come_as_twin_documents_at_each_report_cycle(broker, lamp_with_documents):
    """edgecore publishes a twin/update/document for every actual value a mapper reports. Here the
    mapper's own readings are the actual values: at a report point (once per reportCycle) where a
    property's value differs from its last document, the device gets one document with the
    properties that changed, in edgecore's shape; before, readings made none, and an app following
    sensor values through documents saw nothing. `last` is the property as the previous document had
    it: the same expected value, the previous actual one."""
    mapper, sub = lamp_with_documents
    topic = f"{HW}/twin/update/document"
    first = sub.expect(topic, lambda b: "count" in b["twin"])
    second = sub.expect(topic, lambda b: "count" in b["twin"])
    assert first["event_id"] == "" and first["timestamp"] > 1_700_000_000_000, first
    previous, current = first["twin"]["count"]["current"], second["twin"]["count"]["current"]
    last = second["twin"]["count"]["last"]
    assert current["actual"]["value"] != previous["actual"]["value"], (first, second)  # a counter
    assert last["actual"] == previous["actual"], (last, previous)
    assert current["metadata"] == {"type": "int"} and current["optional"] is False, current
    assert current["actual_version"]["edge"] > last["actual_version"]["edge"], (current, last)
    assert int(current["actual"]["value"]) > 0 and current["actual"]["metadata"]["timestamp"] > 0
    assert "expected" not in current, current  # nothing asked for
    # Only what changed at its report point: `power` (a switch nobody set) is not in them again.
    assert all(set(b["twin"]) <= {"temperature", "count"} for b in (second,)), second
    # An expected value set by an app stays in the documents of the actual values (last and current).
    pub(broker, f"{HW}/twin/update", '{"event_id":"c1","twin":{"count":{"expected":{"value":"50000"}}}}')
    sub.expect(f"{HW}/twin/update/result", lambda b: b["event_id"] == "c1")
    later = sub.expect(topic, lambda b: b["event_id"] == "" and "count" in b["twin"]
                       and b["twin"]["count"]["last"].get("expected", {}).get("value") == "50000"
                       and int(b["twin"]["count"]["current"]["actual"]["value"]) > 50000)
    assert later["twin"]["count"]["current"]["expected"]["value"] == "50000", later


def test_reading_documents_are_off_by_default(broker, tmp_path):
    """Without `mqtt.reading_documents: true` readings make no documents (on a Pi they cost about a
    quarter more CPU and 4x the bytes written to the twin: docs/kubeedge.md); an app's twin/update
    still does."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{HW}/#", "mapper/test-node/#")
        try:
            sub.expect("mapper/test-node/default/lamp/state")
            for _ in range(5):  # changed values at their report points
                sub.expect("mapper/test-node/default/lamp/count")
            pub(broker, f"{HW}/twin/update", '{"event_id":"d1","twin":{"power":{"expected":{"value":"true"}}}}')
            seen = []
            while True:  # every document up to the one the update makes
                body = sub.expect(f"{HW}/twin/update/document")
                seen.append(body["event_id"])
                if body["event_id"] == "d1":
                    break
            assert seen == ["d1"], seen
        finally:
            sub.close()
            assert mapper.stop() == 0


def test_state_changes_and_membership_changes_are_published_as_edgecore_does(broker, tmp_path):
    """edgecore publishes `$hw/events/device/<ns>/<name>/state/update/result` when a device's state
    changes, and `$hw/events/node/<node>/membership/updated` when devices join or leave the node.
    Standalone, the mapper now publishes both: the first with each state change it announces on the
    device's availability topic (a clean stop's `offline` too), the second when a reload adds or
    removes devices. Both reach an app through the shipped ACL (the test broker's)."""
    import signal

    fault = tmp_path / "unplugged"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=50,
                            configs={"lamp": "{fail_while_exists: " + str(fault) + "}"})
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{HW}/state/update/result", "$hw/events/device/default/fan/state/update/result",
                  "$hw/events/node/test-node/membership/updated", "mapper/test-node/default/lamp/state")
        try:
            # The retained state arrives once mosquitto_sub's subscriptions are in place.
            sub.expect("mapper/test-node/default/lamp/state")
            fault.touch()
            failing = sub.expect(f"{HW}/state/update/result", lambda b: b["device"]["state"] != "ok")
            assert failing["device"]["name"] == "lamp" and failing["device"]["state"] == "unhealthy", failing
            assert failing["device"]["last_online"].endswith("Z") and failing["timestamp"] > 1_700_000_000_000
            assert failing["event_id"], failing  # a uuid, as edgecore's
            fault.unlink()
            back = sub.expect(f"{HW}/state/update/result", lambda b: b["device"]["state"] == "ok")
            assert set(back["device"]) == {"name", "state", "last_online"}, back
            # A reload: fan joins, lamp leaves.
            (devices / "lamp.yaml").unlink()
            (devices / "fan.yaml").write_text(device_yaml("fan", cycle=50))
            mapper.process.send_signal(signal.SIGHUP)
            # In any order: lamp's `offline`, the membership update, fan's first state.
            waiting = {"$hw/events/node/test-node/membership/updated": lambda b: True,
                       f"{HW}/state/update/result": lambda b: b["device"]["state"] == "offline",
                       "$hw/events/device/default/fan/state/update/result": lambda b: b["device"]["state"] == "ok"}
            got = {}
            deadline = time.monotonic() + 15
            while waiting:
                try:
                    topic, payload = sub.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"still waiting for {sorted(waiting)}") from None
                if topic in waiting and waiting[topic](body := json.loads(payload)):
                    del waiting[topic]
                    got[topic] = body
            update = got["$hw/events/node/test-node/membership/updated"]
            assert [d["id"] for d in update["added_devices"]] == ["default/fan"], update
            assert [d["id"] for d in update["removed_devices"]] == ["default/lamp"], update
            removed = update["removed_devices"][0]
            assert removed["name"] == "lamp" and removed["state"] == "offline" and removed["last_online"], removed
            assert update["added_devices"][0]["attributes"]["model"]["value"] == "thing-model", update
            assert update["event_id"] and update["timestamp"] > 1_700_000_000_000, update
            assert got[f"{HW}/state/update/result"]["device"]["name"] == "lamp"
            assert mapper.stop() == 0
            stopped = sub.expect("$hw/events/device/default/fan/state/update/result",
                                 lambda b: b["device"]["state"] == "offline")
            assert stopped["device"]["last_online"], stopped
        finally:
            sub.close()


def test_a_document_whose_commit_failed_keeps_the_previous_value_as_last(broker, tmp_path):
    """A reading's document is made inside the readings' transaction; the baseline for the next
    document's `last` moved there too, before the commit. A commit that failed (here the twin
    refuses the document's outbox row: a test trigger, until the mapper logged the failure) is
    retried with its document made again, and that one's `last` was its `current`: the previous
    value lost. Now the baseline moves once the commit succeeded, and every document's `last` is
    the previous document's `current`."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    with MapperProcess(tmp_path, devices, broker, extra="  reading_documents: true\n") as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{HW}/twin/update/document")
        refuse = sqlite3.connect(mapper.twin_path, timeout=10, isolation_level=None)
        try:
            documents = [sub.expect(f"{HW}/twin/update/document", lambda b: "count" in b["twin"])]
            refuse.executescript("""
                CREATE TABLE test_refuse_documents (x);
                INSERT INTO test_refuse_documents VALUES (1);
                CREATE TRIGGER test_refuse_documents BEFORE INSERT ON outbox
                WHEN new.topic LIKE '%/twin/update/document' AND EXISTS (SELECT 1 FROM test_refuse_documents)
                BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END;
            """)
            mapper.wait_log("test trigger")  # "cannot commit ...": the batch is retried
            refuse.execute("DELETE FROM test_refuse_documents")
            taken_ms = time.time_ns() // 1_000_000
            # Up to a document of a reading taken after the twin took writes again: the retried one before it.
            while documents[-1]["twin"]["count"]["current"]["actual"]["metadata"]["timestamp"] <= taken_ms:
                documents.append(sub.expect(f"{HW}/twin/update/document", lambda b: "count" in b["twin"]))
        finally:
            refuse.close()
            sub.close()
            assert mapper.stop() == 0
        assert "cannot commit" in mapper.log(), mapper.log()[-3000:]
    assert len(documents) >= 3, documents
    for before, after in zip(documents, documents[1:]):
        last, current = after["twin"]["count"]["last"], after["twin"]["count"]["current"]
        assert last["actual"] == before["twin"]["count"]["current"]["actual"], (before, after)
        assert last["actual"]["value"] != current["actual"]["value"], after


def test_a_restart_makes_no_document_for_a_value_the_twin_already_has(broker, tmp_path):
    """The event bus took the twin's values at a start as the baselines of the documents' `last`,
    but what is due (Telemetry) started empty: after every start each property's first value at a
    report point made a document, though it was the twin's (docs/kubeedge.md: documents come when
    a value differs from its last document). Now both start from the twin: `power` (a switch
    nobody sets) is in no document after a restart, while the counter, which changes, goes on
    making them."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    extra = "  reading_documents: true\n"
    with MapperProcess(tmp_path, devices, broker, extra=extra) as mapper:
        mapper.wait_log("connected to mqtt://")
        # (Its first document has `power`: not in the twin before.) Until the twin has every value.
        wait_for(lambda: all(p.reported is not None for p in _lamp_twin(mapper).properties.values()),
                 what="the lamp's values in the twin")
        assert mapper.stop() == 0
    sub = Sub(broker, "app", f"{HW}/twin/update/document", "mapper/test-node/default/lamp/state")
    try:
        sub.expect("mapper/test-node/default/lamp/state")  # retained: the subscriptions are in place
        started_ms = time.time_ns() // 1_000_000
        with MapperProcess(tmp_path, devices, broker, extra=extra) as again:
            counted = 0
            while counted < 3:  # the counter's first three documents of this run, and any between
                body = sub.expect(f"{HW}/twin/update/document", lambda b: b["timestamp"] >= started_ms)
                assert "power" not in body["twin"], body
                counted += "count" in body["twin"]
            assert again.stop() == 0
    finally:
        sub.close()


def _lamp_twin(mapper):
    with TwinStore.open(mapper.twin_path) as store:
        return store.device(DeviceId("default", "lamp"))


def test_no_desired_value_is_taken_for_a_device_whose_file_names_another_node(broker, tmp_path):
    """A device file with `spec.nodeName: node-b` in a mapper of test-node: the device is not run
    here (another node's). Its twin/update was answered 200 and its `/set` stored all the same, so
    an app wrote desired values for a device this node does not have (on a shared broker, next to
    node-b's own answer), and they were applied once the file moved the device here. Now the
    twin/update gets edgecore's 404, the `/set` is refused, and the twin holds no desired value."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    (devices / "other.yaml").write_text(
        device_yaml("other", cycle=200).replace("spec:\n", "spec:\n  nodeName: node-b\n", 1))
    other = "$hw/events/device/default/other"
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "$hw/events/device/default/+/#", "mapper/test-node/#", "$hw/events/node/#")
        try:
            sub.expect("mapper/test-node/default/lamp/state")  # the subscriber is in place
            pub(broker, "mapper/test-node/default/other/count/set", "7")
            pub(broker, f"{other}/twin/update", '{"event_id":"o1","twin":{"power":{"expected":{"value":"true"}}}}')
            result = sub.expect(f"{other}/twin/update/result")
            assert (result["event_id"], result.get("code")) == ("o1", 404), result
            assert "not on node test-node" in result["reason"]
            mapper.wait_log("refused set for default/other: 404")
            # Nor is it one of this node's members (it was, offline: node-b's device claimed by test-node).
            pub(broker, "$hw/events/node/test-node/membership/get", '{"event_id":"m-other"}')
            members = sub.expect("$hw/events/node/test-node/membership/get/result")
            assert [d["id"] for d in members["devices"]] == ["default/lamp"], members
        finally:
            sub.close()
            assert mapper.stop() == 0
    with TwinStore.open(mapper.twin_path) as store:
        twin = store.device(DeviceId("default", "other"))
    assert {name: p.desired for name, p in twin.properties.items()} == {"count": None, "power": None,
                                                                          "temperature": None}


def test_a_member_never_online_has_no_last_online_key_as_in_edgecore():
    """membership/get/result and membership/updated list devices as edgecore's dttype.Device, whose
    `last_online` is `omitempty`: a device never `ok` has no such key (state/update/result already
    left it out). Before, membership listed it as `"last_online": ""`."""
    from eventbus import payloads
    from twin.records import DeviceTwin

    def device(name: str, last_online: int | None) -> DeviceTwin:
        return DeviceTwin(DeviceId("default", name), "m", "simulated", "offline", None, None, last_online, None, {})

    body = payloads.membership("m1", [device("never", None), device("once", 1_795_338_608_348)], {})
    never, once = body["devices"]
    assert "last_online" not in never, never
    assert once["last_online"] == "2026-11-22T09:10:08Z", once
    update = payloads.membership_updated([(device("never", None), None)], [])
    assert "last_online" not in update["added_devices"][0], update


def test_an_update_result_holds_what_the_update_set_not_the_devices_actual_value():
    """edgecore's twin/update/result for an app's update of `expected` holds, per twin, the sync result
    of that update (dtmanager dealTwinCompare: `expected` with its timestamp, `optional`, `metadata`;
    versions stripped), never the twin's `actual`, which the update did not change. Before, the
    result also carried the device's last reading as `actual`."""
    from eventbus import payloads
    from twin.records import DeviceTwin, PropertyTwin

    power = PropertyTwin(name="power", type="BOOLEAN", writable=True, unit="", desired=True, desired_version=2,
                         desired_ts=5, reported=False, reported_version=7, reported_ts=4, quality="good",
                         quality_detail=None, apply_error=None)
    twin = DeviceTwin(DeviceId("default", "lamp"), "m", "simulated", "ok", None, None, None, None, {"power": power})
    result = payloads.update_result("e1", twin, ["power"])
    assert result["event_id"] == "e1"
    assert result["twin"] == {"power": {"expected": {"value": "true", "metadata": {"timestamp": 5}},
                                        "optional": False, "metadata": {"type": "boolean"}}}, result
    # twin/get still lists the device's actual value.
    assert payloads.get_result("g1", twin)["twin"]["power"]["actual"]["value"] == "false"


def test_an_expected_value_edgecore_refuses_is_refused_over_the_twin_protocol(broker, tmp_path):
    """edgecore refuses a twin/update whose expected value does not match its twin value pattern
    (dtcommon.ValidateTwinValue, `^[a-zA-Z0-9-_.,:/@#]{1,512}$`; "" is not checked) with 400. Here a
    STRING property took `hello world` over $hw, so an app tried against the mapper failed under
    edgecore. The property's /set topic, the mapper's own, still takes it."""
    devices = _device_dir(tmp_path, "sign.yaml", LABEL)
    hw = "$hw/events/device/default/sign"
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{hw}/#", "mapper/test-node/#")
        try:
            sub.expect("mapper/test-node/default/sign/state")
            for event_id, value in (("sp", "hello world"), ("pc", "100%"), ("nb", "t\u00e9l\u00e9"), ("lg", "x" * 513)):
                pub(broker, f"{hw}/twin/update", json.dumps({"event_id": event_id, "twin": {"label": {"expected": {"value": value}}}}))
                reply = sub.expect(f"{hw}/twin/update/result", lambda b, e=event_id: b["event_id"] == e)
                assert reply["code"] == 400 and "is not a KubeEdge twin value" in reply["reason"], reply
            for event_id, value in (("ok", "a_b-c:1/2@x#y,z."), ("empty", "")):
                pub(broker, f"{hw}/twin/update", json.dumps({"event_id": event_id, "twin": {"label": {"expected": {"value": value}}}}))
                reply = sub.expect(f"{hw}/twin/update/result", lambda b, e=event_id: b["event_id"] == e)
                assert "code" not in reply and reply["twin"]["label"]["expected"]["value"] == value, reply
            pub(broker, "mapper/test-node/default/sign/label/set", "hello world")
            mapper.wait_log("applied desired value 'hello world'")
        finally:
            sub.close()
        assert mapper.stop() == 0
