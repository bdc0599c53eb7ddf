"""`mapper/<node>/health`: a twin that cannot be written is told on MQTT (eventbus/health.py).

While the twin's disk was full the readings waited in memory and no telemetry went out (it leaves
only through the outbox, after its commit), yet the node's retained availability stayed `online`:
only the log and systemd's STATUS= said why. A fleet watching MQTT saw a healthy node that
published nothing. Now a retained message says `unwritable` (with the cause and the readings
waiting) while it lasts, and `ok` once a commit succeeds again and at every start.

A real `mapper run` and the session's real Mosquitto; the disk a real 16 MB tmpfs that a file fills
(root only: skipped otherwise, as in test_twin_disk_at_start.py).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import paho.mqtt.client as mqtt

from brokers import MosquittoBroker, MqttProbe
from eventbus.health import HEALTH_INTERVAL_S
from helpers import wait_for, write_devices
from mapper_proc import MapperProcess
from test_twin_disk_at_start import fill, small_disk  # noqa: F401 - small_disk is a fixture
from twin.store import committed_seqs

NODE = "test-node"  # the session broker's node (its ACL is rendered for it)
HEALTH = f"mapper/{NODE}/health"
COUNT = f"mapper/{NODE}/default/lamp/count"


class Heard:
    """What an app subscribed to the node's health and to a telemetry topic has received so far."""

    def __init__(self, probe: MqttProbe) -> None:
        self.probe = probe
        self.health: list[dict] = []
        self.seqs: list[int] = []
        self.live: list[dict] = []  # sent live, with no seq, while the twin could not be written (mapper/recorder.py)

    def take(self) -> None:
        while not self.probe.messages.empty():
            message: mqtt.MQTTMessage = self.probe.messages.get_nowait()
            body = json.loads(message.payload) if message.payload else None
            if message.topic == HEALTH and body is not None:
                self.health.append(body)
            elif message.topic == COUNT and not message.retain:
                if body.get("live"):
                    self.live.append(body)
                else:
                    self.seqs.append(body["seq"])

    def health_after(self, index: int, twin: str) -> tuple[int, dict] | None:
        """The first health message from `index` on saying `twin`, with its index."""
        self.take()
        return next(((i, h) for i, h in enumerate(self.health) if i >= index and h["twin"] == twin), None)


def committed_count_seq(twin: Path) -> int:
    with sqlite3.connect(f"file:{twin}?mode=ro", uri=True) as db:
        return committed_seqs(db).get(COUNT, 0)


def test_a_full_twin_disk_is_told_on_mqtt_and_the_readings_that_waited_arrive(broker: MosquittoBroker,
                                                                              tmp_path: Path,
                                                                              small_disk: Path) -> None:  # noqa: F811
    """Full: `unwritable` (cause `disk full`, readings waiting), again with new counts at most once per
    HEALTH_INTERVAL_S; freed: `ok`, and every reading that waited reaches the app, no seq missing."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=50)
    twin = small_disk / "state" / "twin.db"
    with broker.client("mapper") as cleaner:  # no retained message of another test's run comes first
        cleaner.publish(HEALTH, b"", retain=True)
    with broker.client("app") as app, MapperProcess(tmp_path, devices, broker, twin=twin) as mapper:
        heard = Heard(app)
        assert not app.subscribe(HEALTH).is_failure
        assert not app.subscribe(COUNT).is_failure
        wait_for(lambda: heard.take() or len(heard.seqs) >= 5, timeout=20, what="telemetry before the disk fills")
        filler = fill(small_disk)
        at, unwritable = wait_for(lambda: heard.health_after(0, "unwritable"), timeout=20,
                                  what="`unwritable` while the disk is full")
        assert unwritable["cause"] == "disk full", unwritable
        assert unwritable["readings_waiting"] > 0 and unwritable["readings_dropped"] == 0, unwritable
        assert isinstance(unwritable["since"], int) and unwritable["since"] <= unwritable["at"], unwritable
        assert "full" in unwritable["error"] or "I/O" in unwritable["error"], unwritable
        # While it lasts: told again as the readings pile up, no more often than the interval.
        again = wait_for(lambda: heard.health_after(at + 1, "unwritable"), timeout=3 * HEALTH_INTERVAL_S,
                         what="`unwritable` again, with more readings waiting")[1]
        assert again["readings_waiting"] > unwritable["readings_waiting"], (unwritable, again)
        assert again["since"] == unwritable["since"], (unwritable, again)
        assert again["at"] - unwritable["at"] >= HEALTH_INTERVAL_S * 1000 - 100, (unwritable, again)
        assert mapper.process is not None and mapper.process.poll() is None, mapper.log()[-3000:]
        filler.unlink()
        ok = wait_for(lambda: heard.health_after(at + 1, "ok"), timeout=20, what="`ok` once the disk has room")[1]
        assert ok["since"] > unwritable["since"] and ok["readings_dropped"] == 0, ok
        # The readings that waited are committed and go out: every seq up to the twin's latest.
        committed = committed_count_seq(twin)
        wait_for(lambda: heard.take() or set(heard.seqs) >= set(range(1, committed + 1)), timeout=30,
                 what=f"every count reading up to seq {committed}")
        assert mapper.stop() == 0, mapper.log()[-3000:]
    assert "twin writable again after" in mapper.log()


def test_a_start_replaces_a_stale_unwritable_with_ok(broker: MosquittoBroker, tmp_path: Path) -> None:
    """A run that stopped or crashed while its twin could not be written leaves `unwritable` retained:
    the next one says `ok` once it is connected (its twin opened and written)."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    stale = b'{"twin":"unwritable","since":1,"cause":"disk full","readings_waiting":9,"readings_dropped":0}'
    with broker.client("mapper") as previous:
        assert not previous.publish(HEALTH, stale, retain=True).is_failure
    with broker.client("app") as app:
        heard = Heard(app)
        assert not app.subscribe(HEALTH).is_failure
        assert wait_for(lambda: heard.health_after(0, "unwritable"), what="the stale message, retained")
        with MapperProcess(tmp_path, devices, broker) as mapper:
            ok = wait_for(lambda: heard.health_after(0, "ok"), timeout=20, what="`ok` from the new run")[1]
            assert ok["readings_dropped"] == 0 and ok["since"] <= ok["at"], ok
            assert mapper.stop() == 0, mapper.log()[-3000:]


def test_a_twin_another_process_holds_locked_is_told_as_locked(tmp_path: Path) -> None:
    """The cause of a commit refused for another connection's write lock (a backup, a CLI command)
    is `locked`, not `error`: waiting cures it, as it cures a full disk."""
    from helpers import TwinLock
    from mapper.twin_disk import twin_write_cause

    twin = tmp_path / "twin.db"
    with sqlite3.connect(twin) as db:
        db.execute("CREATE TABLE t (x)")
    db = sqlite3.connect(twin, timeout=0)
    try:
        with TwinLock(twin):
            try:
                db.execute("INSERT INTO t VALUES (1)")
            except sqlite3.OperationalError as exc:
                refused = exc
            else:
                raise AssertionError("the write went through the other connection's lock")
    finally:
        db.close()
    assert twin_write_cause(refused, twin) == "locked", refused
    assert twin_write_cause(sqlite3.DatabaseError("file is not a database"), twin) == "error"


def test_the_health_says_the_mapper_version_and_the_config_fingerprint(broker: MosquittoBroker,
                                                                       tmp_path: Path) -> None:
    """A fleet could not see from MQTT which node runs which version, nor whose config drifted: each
    health message now carries the version and the fingerprint of the config the run started with.
    The same config gives the same fingerprint at the next start, a changed setting another."""
    from mapper import __version__
    from mapper.config import load_config

    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with broker.client("mapper") as cleaner:  # no retained message of another test's run comes first
        cleaner.publish(HEALTH, b"", retain=True)
    fingerprints = []
    with broker.client("app") as app:
        heard = Heard(app)
        assert not app.subscribe(HEALTH).is_failure
        for extra in ("", "", "  state_interval_ms: 500\n"):
            mapper = MapperProcess(tmp_path, devices, broker, extra=extra)
            index = len(heard.health)
            with mapper:
                ok = wait_for(lambda: heard.health_after(index, "ok"), timeout=20, what="`ok` from this run")[1]
                assert mapper.stop() == 0, mapper.log()[-3000:]
            assert ok["version"] == __version__ and __version__, ok
            assert ok["config"] == load_config(mapper.config, env={}).fingerprint(), ok
            fingerprints.append(ok["config"])
    assert fingerprints[0] == fingerprints[1] != fingerprints[2], fingerprints


def test_the_config_fingerprint_leaves_out_the_node_and_secrets_and_ignores_key_order(tmp_path: Path) -> None:
    """Pis with one config show one fingerprint though each has its node and client id; a secret-like
    text (mqtt.client_id, the session's secret) is never in what is hashed, only that it is set."""
    from mapper.config import load_config

    def fingerprint(text: str) -> tuple[str, bytes]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        config = load_config(path, env={})
        return config.fingerprint(), config.fingerprint_document()

    mqtt = ("mqtt:\n  url: mqtts://broker.example.com:8883\n  client_id: {cid}\n  username: mapper\n"
            "  password_env: MQTT_PW\n"
            "  allow_password_in_clear: false\n")
    base = "node: pi-1\ntwin:\n  commit_interval_ms: 5000\n"
    one, document = fingerprint(base + mqtt.format(cid="mapper-pi-1-5ecre7"))
    assert b"5ecre7" not in document and b'"client_id":"(set)"' in document, document
    assert b"pi-1" not in document and b"MQTT_PW" in document, document  # (where the password is, not it)
    assert len(one) == 16 and int(one, 16) >= 0
    other = fingerprint(mqtt.format(cid="mapper-pi-2-0ther1d") + "twin:\n  commit_interval_ms: 5000\nnode: pi-2\n")[0]
    assert other == one
    assert fingerprint("node: pi-1\ntwin:\n  commit_interval_ms: 4000\n" + mqtt.format(cid="x"))[0] != one
    assert fingerprint("node: pi-1\ntwin:\n  commit_interval_ms: 5000\n" + mqtt.format(cid="x").replace(
        "allow_password_in_clear: false", "allow_password_in_clear: true"))[0] != one  # a flag is a setting


def test_the_version_in_the_health_is_the_one_the_package_is_installed_as() -> None:
    """`version` is mapper.__version__; pyproject.toml says it a second time, for pip: they must agree."""
    import tomllib

    from mapper import __version__

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__, "bump mapper/__init__.py and pyproject.toml together"


async def test_the_health_counts_outbox_messages_dropped_as_undeliverable(broker: MosquittoBroker,
                                                                         tmp_path: Path) -> None:
    """An outbox message that can never go (paho refuses its wildcard topic, queued before topics were
    validated; a broker's ACL or packet limit refuses others) is dropped as undeliverable. `mapper
    devices` and STATUS= counted them, the health on MQTT did not: a fleet watching MQTT could not
    see a node losing messages. Now `outbox_undeliverable` says how many since the twin was created
    (the twin's count), also after a restart."""
    import asyncio
    import uuid

    from devices.loader import load
    from eventbus.extension import EventBusExtension
    from helpers import async_wait_for, write_config
    from mapper.config import load_config
    from mapper.service import MapperService
    from mapper_proc import mqtt_block
    from twin.store import OutMessage, TwinStore

    node = f"health-{uuid.uuid4().hex[:8]}"
    health = f"mapper/{node}/health"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db", node=node,
                                      extra=mqtt_block(broker, tmp_path)))
    with TwinStore.open(config.twin.path) as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([], [OutMessage(f"mapper/{node}/default/+/count", {"n": 1}, sequenced=False)])
    heard: list[dict] = []

    def counted_after(index: int) -> dict | None:
        while not app.messages.empty():
            message = app.messages.get_nowait()
            if message.topic == health and message.payload:
                heard.append(json.loads(message.payload))
        return next((h for h in heard[index:] if h.get("outbox_undeliverable") == 1), None)

    with broker.client("app") as app:
        assert not app.subscribe(health).is_failure
        for run in ("first", "restarted"):
            index = len(heard)
            service = MapperService(config)
            service.extensions.append(EventBusExtension(config.mqtt))
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            try:
                said = await async_wait_for(lambda: counted_after(index), timeout=20,  # noqa: B023
                                            what=f"a health message counting the dropped message ({run} run)")
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
            assert said["twin"] == "ok", said
            assert service.bus.publisher.undeliverable == (1 if run == "first" else 0)
