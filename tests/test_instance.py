"""Another mapper serving the same node, on the shipped broker configuration (mosquitto.conf + acl).

With the default client id `mapper-<node>`, two mappers for one node (the service and a stray manual
`mapper run` on another twin, two Pis given the same node name) threw each other off the broker, and
the log said so. The default id now ends in a random part kept beside the twin: they no longer
collide, and both read and drove the same devices in silence, a subscriber seeing two interleaved
sequences. Each mapper now announces itself on `mapper/<node>/instance` and logs an ERROR naming
another one it hears there (eventbus/instance.py).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path

import orjson
import pytest

from brokers import MosquittoBroker, MqttProbe
from eventbus.instance import instance_token
from helpers import write_devices
from mapper_proc import MapperProcess

OTHER = "ANOTHER MAPPER serves node"


@pytest.fixture
def node() -> str:
    """A node name of its own, so retained messages of other tests never answer for this one."""
    return f"inst-{secrets.token_hex(3)}"


def announced(mapper: MapperProcess, node: str, count: int = 1) -> None:
    """Wait until the mapper has heard its own announcement come back `count` times (once per
    connection): the broker's retained one, sent before it, has been handled by then."""
    mapper.wait_log(f"announced on mapper/{node}/instance:", count=count)


def errors_naming(mapper: MapperProcess, other: MapperProcess) -> list[str]:
    assert other.process is not None
    return [line for line in mapper.log().splitlines() if OTHER in line and f"pid {other.process.pid}," in line]


def announcements_of(probe: MqttProbe, pid: int, count: int, timeout: float = 15.0) -> None:
    """Wait for `count` announcements of the mapper with `pid` on the probe's subscription."""
    seen = 0
    while seen < count:
        message = probe.next_message(timeout)
        if message.payload and orjson.loads(message.payload).get("pid") == pid:
            seen += 1


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_two_mappers_for_one_node_on_other_twins_each_log_an_error_naming_the_other(
        broker: MosquittoBroker, tmp_path: Path, node: str, protocol: str) -> None:
    """Different client ids (the default's random part is per state directory): the broker lets both
    run. Each names the other's host, pid and start time; the second hears the first's retained
    announcement, the first the second's live one."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    extra = f"  protocol: \"{protocol}\"\n"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with MapperProcess(first_dir, devices, broker, node=node, extra=extra) as first:
        announced(first, node)
        with MapperProcess(second_dir, devices, broker, node=node, extra=extra) as second:
            for mapper, other in ((second, first), (first, second)):
                mapper.wait_log(OTHER)
                lines = errors_naming(mapper, other)
                assert lines and "ERROR" in lines[0], mapper.log()
                assert re.search(r"host '[^']+', pid \d+, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", lines[0]), lines[0]
            assert second.stop() == 0
        assert first.stop() == 0
    # Neither mapper's connection was disturbed: this is not a client id collision.
    assert "MQTT connection to" not in first.log() + second.log()


def test_the_error_repeats_while_the_other_runs_and_stops_once_it_stopped_cleanly(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """mqtt.instance_interval_s 1: each announces itself every second, and logs the other at most
    once a second. The second's clean stop clears its retained announcement; the first says so and
    logs no ERROR through three announcements of its own after that."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    extra = "  instance_interval_s: 1\n"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with broker.client("mapper") as probe, MapperProcess(first_dir, devices, broker, node=node, extra=extra) as first:
        probe.subscribe(f"mapper/{node}/instance")
        announced(first, node)
        with MapperProcess(second_dir, devices, broker, node=node, extra=extra) as second:
            first.wait_log(OTHER, count=3, timeout=20)  # repeated while it lasts
            second_pid = second.process.pid
            assert len(errors_naming(first, second)) >= 3
            # A stop clears the announcement only when the last one it heard was its own: the first's
            # must not come after the second's last. Their phases are the starts' (an announcement
            # every second each): when the first's came right after the second's, the second's stop
            # (under load) heard it, cleared nothing, and the first waited in vain (1 in 4 runs of the
            # suite in two pytest-xdist workers). So the first is held (SIGSTOP; what it is sent meanwhile
            # waits in its socket) from before two more announcements of the second until its stop.
            assert first.process is not None
            os.kill(first.process.pid, signal.SIGSTOP)
            try:
                with probe.messages.mutex:
                    probe.messages.queue.clear()
                announcements_of(probe, second_pid, 2)  # the last one sent well after the first's last
                assert second.stop() == 0
            finally:
                os.kill(first.process.pid, signal.SIGCONT)
        first.wait_log(f"the announcement on mapper/{node}/instance was cleared (a clean stop)")
        errors = first.log().count(OTHER)
        assert first.process is not None
        with probe.messages.mutex:
            probe.messages.queue.clear()
        announcements_of(probe, first.process.pid, 3)
        assert first.log().count(OTHER) == errors, first.log()[-3000:]
        assert first.stop() == 0
    assert f"pid {second_pid}," in first.log()


def test_one_mapper_restarted_on_its_twin_is_not_another_mapper(
        broker: MosquittoBroker, tmp_path: Path, node: str) -> None:
    """A clean stop clears its announcement; a kill leaves it retained, and the same state directory
    started again finds its own token there. No ERROR either way, once the retained announcement has
    been handled (its own announcement came back after it) and a reading has gone out since."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    topic = f"mapper/{node}/instance"
    with broker.client("mapper") as probe:
        probe.subscribe(f"mapper/{node}/default/lamp/count")
        mapper = MapperProcess(tmp_path, devices, broker, node=node)
        with mapper:
            announced(mapper, node)
            assert mapper.stop() == 0
        with mapper:
            announced(mapper, node, count=2)
            killed = mapper.process.pid
            mapper.kill()
        with broker.client("mapper") as retained:  # the killed one's announcement stays
            retained.subscribe(topic)
            assert orjson.loads(retained.next_message().payload)["pid"] == killed
        with mapper:
            announced(mapper, node, count=3)
            with probe.messages.mutex:
                probe.messages.queue.clear()
            probe.next_message(15)  # a reading published after it
            assert OTHER not in mapper.log(), mapper.log()
            assert mapper.stop() == 0
    assert OTHER not in mapper.log(), mapper.log()


def test_the_instance_token_is_no_client_id_and_stays_with_the_state() -> None:
    """A hash: the same for one state directory (the default id's random part is kept there), and for
    an mqtt.client_id set in the config, different per twin (two mappers given the same id on two
    twins collide at the broker, and still hear each other here)."""
    client_id = f"mapper-n-{secrets.token_hex(8)}"
    token = instance_token(client_id, None)
    assert re.fullmatch(r"[0-9a-f]{16}", token) and client_id[-16:] not in token
    assert instance_token(client_id, None) == token
    assert instance_token(f"mapper-n-{secrets.token_hex(8)}", None) != token
    chosen = "pi-mapper"
    assert instance_token(chosen, Path("/var/lib/mapper/twin.db")) == instance_token(chosen, Path("/var/lib/mapper/twin.db"))
    assert instance_token(chosen, Path("/var/lib/mapper/twin.db")) != instance_token(chosen, Path("/home/pi/twin.db"))


def test_apps_and_workers_can_neither_read_nor_write_the_instance_topic(broker: MosquittoBroker, node: str) -> None:
    """Only `mapper` (readwrite mapper/#): an app must not learn the hosts and pids, nor fake a mapper."""
    topic = f"mapper/{node}/instance"
    with broker.client("mapper") as mapper, broker.client("app") as app, broker.client("worker") as worker:
        mapper.subscribe(topic)
        for user in (app, worker):
            user.subscribe(f"mapper/{node}/#")
            assert user.publish(topic, b'{"token":"forged"}').is_failure
        assert not mapper.publish(topic, b'{"token":"real"}').is_failure
        assert mapper.next_message().payload == b'{"token":"real"}'  # not a forged one first
        mapper.publish(f"mapper/{node}/availability", b"online")  # what the app may read, after it
        assert app.next_message().topic == f"mapper/{node}/availability"
        with pytest.raises(TimeoutError):
            worker.next_message(0.5)


def test_systemd_status_names_another_mapper() -> None:
    """`systemctl status mapper` shows it, next to the devices."""
    from mapper.systemd import status_line

    line = status_line(["ok"], 0, None, other_mapper="host 'pi2', pid 812, started 2026-11-30 16:19:54 UTC")
    assert line == "1 device: 1 ok; ANOTHER MAPPER serves this node: host 'pi2', pid 812, started 2026-11-30 16:19:54 UTC (see the log)"
    assert "ANOTHER" not in status_line(["ok"], 0, None)
