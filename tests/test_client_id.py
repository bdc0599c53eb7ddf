"""The mapper's MQTT client id on the shipped broker configuration.

Mosquitto ties no client id to a user: whoever connects with the mapper's id closes the mapper's
connection and takes its session over. The default id was `mapper-<node>`, and the node is in every
topic, so any `app` account could knock the gateway off its broker. The default now ends in a random
part made at the first start and kept beside the twin; mqtt.client_id, when set, is used as written.
"""

from __future__ import annotations

import re
import secrets
import stat
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

from brokers import MosquittoBroker
from eventbus.bus import SHORT_WARN
from eventbus.extension import client_id_file
from helpers import write_devices
from mapper_proc import MapperProcess


@pytest.fixture
def node() -> str:
    """A node name of its own, so retained messages of other tests never answer for this one."""
    return f"cid-{secrets.token_hex(3)}"


def connected_ids(mapper: MapperProcess, broker: MosquittoBroker) -> list[str]:
    """The client id of each connection the mapper made, from its log, in order."""
    return re.findall(rf"connected to mqtt://{broker.host}:{broker.port} as (\S+) \(MQTT", mapper.log())


def run_once(tmp: Path, devices: Path, broker: MosquittoBroker, node: str) -> MapperProcess:
    """Start a mapper whose twin (its state) is in `tmp`, wait until it is connected, stop it."""
    mapper = MapperProcess(tmp, devices, broker, node=node)
    runs = len(connected_ids(mapper, broker)) + 1  # (its log is appended to)
    with mapper:
        mapper.wait_log("connected to mqtt://", count=runs)
        assert mapper.stop() == 0
    return mapper


def test_the_default_client_id_is_unguessable_stays_the_same_across_starts_and_differs_per_state(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """The session is persistent (clean_start=False): found again only under the same id, so the
    random part is made once, logged once, and read back at the next start; another state
    directory (another mapper with the same node name) makes its own."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    run_once(first, devices, broker, node)
    mapper = run_once(first, devices, broker, node)
    ids = connected_ids(mapper, broker)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    assert re.fullmatch(rf"mapper-{node}-[0-9a-f]{{16}}", ids[0]), ids
    kept = client_id_file(mapper.twin_path)
    assert kept.read_text() == ids[0].removeprefix(f"mapper-{node}-") + "\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert mapper.log().count(f"MQTT client id: {ids[0]}, made now and kept in {kept}") == 1
    another = connected_ids(run_once(other, devices, broker, node), broker)
    assert len(another) == 1 and another[0].startswith(f"mapper-{node}-") and another[0] != ids[0], (ids, another)


def test_a_first_start_does_not_speak_of_an_earlier_versions_session_but_an_upgrade_does(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """On a new twin no mapper ran before, so no session of the old default id `mapper-<node>` can
    be left on the broker: a first start said one "is not resumed (desired values queued in it are
    not delivered)", which puzzled every new user in their first minute. A twin that ran before the
    id file existed (an upgrade: the file missing beside an existing twin) still says it."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    mapper = run_once(tmp_path, devices, broker, node)
    kept = client_id_file(mapper.twin_path)
    made = re.findall(r"MQTT client id: (.*)", mapper.log())
    assert len(made) == 1 and made[0].endswith(f"made now and kept in {kept} (set mqtt.client_id to choose one)"), made
    kept.unlink()  # as a twin of a version before the random part has none
    run_once(tmp_path, devices, broker, node)
    made = re.findall(r"MQTT client id: (.*)", mapper.log())
    assert len(made) == 2 and f"A session of the default id of earlier versions, mapper-{node}, if the broker" \
        " has one, is not resumed" in made[1], made


def test_an_app_connecting_as_mapper_node_does_not_disconnect_the_mapper(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """The shipped broker's `app` user connects with client id `mapper-<node>`, the old default. It
    took the mapper's connection and session over: the mapper reconnected and took them back, and
    the two fought for as long as the app kept trying. Now it is just another client's id: the
    mapper's next readings arrive on the connection it had, and the app's stays up too."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    topic = f"mapper/{node}/default/lamp/count"
    with broker.client("app") as app:
        app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, node=node) as mapper:
            app.next_message(20)  # the mapper is connected and publishing
            with broker.client("app", client_id=f"mapper-{node}") as impostor:
                connected_at_ms = time.time_ns() // 1_000_000
                # A reading taken after the app connected: on the old default, only sent once the
                # mapper, thrown off, had connected again.
                while orjson.loads(app.next_message(20).payload)["ts"] <= connected_at_ms:
                    pass
                log = mapper.log()
                assert "MQTT connection to" not in log, log  # (lost or refused, taken over, lost again soon)
                assert len(connected_ids(mapper, broker)) == 1, log
                assert impostor._client.is_connected()  # noqa: SLF001 - MqttProbe has no such query


def test_an_explicit_client_id_is_used_as_written(broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """mqtt.client_id is the id the broker sees (an app connecting with it throws the mapper off:
    choosing it is the operator's call), and no id file is made."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    chosen = f"pi-mapper-{node}"
    with MapperProcess(tmp_path, devices, broker, node=node, extra=f"  client_id: {chosen}\n") as mapper:
        mapper.wait_log("connected to mqtt://")
        assert connected_ids(mapper, broker) == [chosen]
        broker.client("app", client_id=chosen).close()
        mapper.wait_log("MQTT connection to")  # Mosquitto 2.0 closes it with no reason ("Unspecified error")
        mapper.wait_log("connected to mqtt://", count=2)  # and it connects again
        assert connected_ids(mapper, broker) == [chosen, chosen]
    assert not client_id_file(mapper.twin_path).exists()


def test_another_client_taking_the_client_id_again_and_again_over_mqtt_3_1_1_is_named(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """Over MQTT 3.1.1 a takeover has no reason code (MQTT 5's 0x8E): the mapper tells it by the
    broker closing connection after connection soon after making it while it keeps listening. After
    SHORT_WARN of them in a row the ERROR names the client id and asks about another client (a
    broker restarting as often is not taken for one: test_broker_restarts.py)."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    chosen = f"pi-mapper-{node}"
    with MapperProcess(tmp_path, devices, broker, node=node,
                       extra=f"  client_id: {chosen}\n  protocol: '3.1.1'\n") as mapper:
        for taken in range(1, SHORT_WARN + 1):
            mapper.wait_log("connected to mqtt://", count=taken)
            broker.client("app", client_id=chosen, protocol=mqtt.MQTTv311).close()
        mapper.wait_log("times in a row")
        (told,) = [line for line in mapper.log().splitlines() if "times in a row" in line]
        assert " ERROR " in told and f"({SHORT_WARN} times in a row)" in told, told
        assert f"connecting with client id {chosen!r}" in told and "another client" in told, told
        assert "(MQTT 3.1.1)" in mapper.log()
