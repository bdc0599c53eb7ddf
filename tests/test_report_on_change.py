"""Report on change: a property with `reportDeadband` (or `reportDeadbandPercent`) in its visitors'
configData is published when it moved by the deadband from the last value published, and at least
once per `reportMaxIntervalMs` (a heartbeat); the twin still records every reading."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from devices.ids import DeviceId
from devices.loader import load
from eventbus.telemetry import Telemetry
from eventbus.topics import Topics
from twin.records import OUT_OF_RANGE, Reading
from helpers import one_property_device, the_problem_at_its_line
from mapper_proc import REPO

D = DeviceId("default", "probe")
TOPICS = Topics("n1")


def _device(tmp_path: Path, visitor: str, *, kind: str = "FLOAT", cycle: int = 100) -> Path:
    directory = tmp_path / "devices"
    directory.mkdir(exist_ok=True)
    (directory / "probe.yaml").write_text(one_property_device(
        "probe", f"{{name: level, type: {kind}, accessMode: ReadWrite}}", visitor,
        settings=f"collectCycle: {cycle}\nreportCycle: {cycle}\nreportToCloud: true"))
    return directory


def _telemetry(tmp_path: Path, options: str) -> Telemetry:
    devices = load([_device(tmp_path, f"{{kind: constant, value: 0, {options}}}")]).devices
    return Telemetry(TOPICS, devices, state_interval_ms=0)


def _published(telemetry: Telemetry, readings: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(ts, value) of the readings that went out on the property's topic, fed one batch each."""
    out = []
    for ts, value in readings:
        for message in telemetry([Reading(D, "level", value, ts)]):
            if message.topic == TOPICS.telemetry(D, "level"):
                out.append((ts, value))
    return out


def test_a_drifting_value_is_published_each_time_it_moved_by_the_deadband(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadband: 0.5")
    start = 1_700_000_000_000
    drift = [(start + 100 * k, 20 + 0.1 * k) for k in range(21)]  # 20.0 .. 22.0, 0.1 a reading
    published = _published(telemetry, drift)
    # From the last PUBLISHED value: 20.0, then the first at least 0.5 above it, and so on.
    assert [round(v, 6) for _, v in published] == [20.0, 20.5, 21.0, 21.5, 22.0]


def test_a_jump_goes_out_at_once_and_a_small_move_back_does_not(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadband: 2")
    start = 1_700_000_000_000
    published = _published(telemetry, [(start, 10.0), (start + 100, 10.5), (start + 200, 30.0),
                                       (start + 300, 29.0), (start + 400, 27.9)])
    assert published == [(start, 10.0), (start + 200, 30.0), (start + 400, 27.9)]


def test_the_reportcycle_does_not_hold_a_jump_back(tmp_path):
    """reportCycle 10 s, read every 100 ms: a jump goes out with the reading that shows it."""
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(one_property_device(
        "probe", "{name: level, type: FLOAT, accessMode: ReadOnly}", "{kind: constant, reportDeadband: 1}",
        settings="collectCycle: 100\nreportCycle: 10000\nreportToCloud: true"))
    telemetry = Telemetry(TOPICS, load([devices]).devices, state_interval_ms=0)
    start = 1_700_000_000_000
    assert _published(telemetry, [(start, 1.0), (start + 100, 5.0)]) == [(start, 1.0), (start + 100, 5.0)]


def test_a_silent_value_still_goes_out_once_per_max_interval(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadband: 1, reportMaxIntervalMs: 1000")
    start = 1_700_000_000_000
    steady = [(start + 100 * k, 5.0) for k in range(31)]  # 3 s of the same value
    assert [ts for ts, _ in _published(telemetry, steady)] == [start, start + 1000, start + 2000, start + 3000]
    # Its device's state view goes out with it, and only with it (its only property).
    states = [m for m in telemetry([Reading(D, "level", 5.0, start + 3100)]) if m.topic == TOPICS.device_state(D)]
    assert states == []


def test_the_heartbeat_defaults_to_a_minute(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadband: 1")
    start = 1_700_000_000_000
    steady = [(start + 1000 * k, 5.0) for k in range(121)]
    assert [ts for ts, _ in _published(telemetry, steady)] == [start, start + 60_000, start + 120_000]


def test_a_percent_deadband_is_of_the_last_published_value(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadbandPercent: 10")
    start = 1_700_000_000_000
    values = [100.0, 109.0, 110.0, 120.0, 121.0, 99.0]
    published = _published(telemetry, [(start + 100 * k, v) for k, v in enumerate(values)])
    assert [v for _, v in published] == [100.0, 110.0, 121.0, 99.0]


def test_a_clock_gone_back_publishes_at_once(tmp_path):
    telemetry = _telemetry(tmp_path, "reportDeadband: 1")
    start = 1_700_000_000_000
    back = start - 3_600_000
    assert _published(telemetry, [(start, 5.0), (start + 100, 5.0), (back, 5.0), (back + 100, 5.0)]) == [
        (start, 5.0), (back, 5.0)]


def test_a_good_value_after_an_out_of_range_message_goes_out_at_once(tmp_path):
    """The topic's last message said out of range: the value back in range is news, deadband or not
    (it waited for the heartbeat, a minute of the topic showing the sensor out of range)."""
    telemetry = _telemetry(tmp_path, "reportDeadband: 5")
    start = 1_700_000_000_000
    assert _published(telemetry, [(start, 20.0)]) == [(start, 20.0)]
    out = [m.body for m in telemetry([Reading(D, "level", 90.0, start + 100, OUT_OF_RANGE)])
           if m.topic == TOPICS.telemetry(D, "level")]
    assert out == [{"quality": "out_of_range"}]
    assert _published(telemetry, [(start + 200, 20.0), (start + 300, 21.0)]) == [(start + 200, 20.0)]


def test_a_jump_the_state_view_s_pacing_held_reaches_it_at_its_next_interval(tmp_path):
    """A jump published soon after the last view (state_interval_ms not yet over) waited for the next
    published reading, the heartbeat a minute later: Home Assistant, which reads the view, showed the
    old value that long. The readings after it send the view once its interval is over."""
    devices = load([_device(tmp_path, "{kind: constant, value: 0, reportDeadband: 5}")]).devices
    telemetry = Telemetry(TOPICS, devices, state_interval_ms=1000)
    start = 1_700_000_000_000
    views = []
    for ts, value in [(start, 20.0), *((start + 100 * k, 40.0) for k in range(2, 21))]:
        views += [(ts, m.body["level"]) for m in telemetry([Reading(D, "level", value, ts)])
                  if m.topic == TOPICS.device_state(D)]
    assert views == [(start, 20.0), (start + 1000, 40.0)]


def test_properties_without_the_option_are_paced_by_their_report_cycle_as_before(tmp_path):
    devices = load([_device(tmp_path, "{kind: constant, value: 0}")]).devices
    assert devices[D].prop("level").deadband is None
    telemetry = Telemetry(TOPICS, devices, state_interval_ms=0)
    start = 1_700_000_000_000
    assert len(_published(telemetry, [(start + 100 * k, 5.0) for k in range(10)])) == 10


@pytest.mark.parametrize(("visitor", "kind", "field", "said"), [
    ("{kind: constant, value: x, reportDeadband: 0.5}", "STRING", "reportDeadband",
     "a deadband needs a number: the property's type is STRING"),
    ("{kind: constant, reportDeadband: '0.5'}", "FLOAT", "reportDeadband", "'0.5' is not a number"),
    ("{kind: constant, reportDeadband: -1}", "FLOAT", "reportDeadband", "-1 is below 0"),
    ("{kind: constant, reportDeadbandPercent: 0}", "FLOAT", "reportDeadbandPercent", "0 is not above 0"),
    ("{kind: constant, reportDeadband: 1, reportDeadbandPercent: 5}", "FLOAT", "reportDeadbandPercent",
     "give reportDeadband (absolute) or reportDeadbandPercent, not both"),
    ("{kind: constant, reportMaxIntervalMs: 1000}", "FLOAT", "reportMaxIntervalMs", "it needs reportDeadband"),
    ("{kind: constant, reportDeadband: 1, reportMaxIntervalMs: 0.5}", "FLOAT", "reportMaxIntervalMs",
     "not a whole number of milliseconds"),
    ("{kind: constant, reportDeadband: true}", "FLOAT", "reportDeadband", "True is not a number"),
])
def test_a_bad_option_is_an_error_at_its_line(tmp_path, visitor, kind, field, said):
    text = the_problem_at_its_line(_device(tmp_path, visitor, kind=kind), "probe.yaml", field)
    assert "property 'level'" in text and said in text, text


def test_the_options_are_not_given_to_the_driver_and_validate_shows_them(tmp_path):
    """The simulated driver refuses unknown visitor keys (extra="forbid"): the mapper's own are taken
    out before it reads them, in the model's visitors too, and `mapper validate` lists them."""
    directory = _device(tmp_path, "{kind: constant, reportDeadband: 0.25, reportMaxIntervalMs: 30000}")
    definition = load([directory]).devices[D]
    assert "reportDeadband" not in definition.prop("level").visitor.model_dump()
    done = subprocess.run([sys.executable, "-m", "mapper", "validate", str(directory)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "default/probe level: published on a change of 0.25 or more, else every 30 s" in done.stdout


def test_a_drifting_sensor_publishes_less_a_jump_goes_out_and_a_silent_one_has_a_heartbeat(tmp_path, broker):
    """End to end, a real mapper, broker and twin: a counter (+1 every 50 ms) with a deadband of 5 is
    published every 5th value while the twin records every reading; a written jump goes out with the
    first reading that shows it (its heartbeat is a minute away); a constant with a 600 ms heartbeat
    goes out again with the same value."""
    from mapper_proc import MapperProcess
    from test_twin_protocol import Sub

    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "drift.yaml").write_text(one_property_device(
        "drift", "{name: count, type: INT, accessMode: ReadWrite}", "{kind: counter, reportDeadband: 5}",
        settings="collectCycle: 50\nreportCycle: 50\nreportToCloud: true"))
    (devices / "still.yaml").write_text(one_property_device(
        "still", "{name: level, type: FLOAT, accessMode: ReadOnly}",
        "{kind: constant, value: 7.5, reportDeadband: 1, reportMaxIntervalMs: 600}",
        settings="collectCycle: 50\nreportCycle: 50\nreportToCloud: true"))
    count_topic, level_topic = "mapper/test-node/default/drift/count", "mapper/test-node/default/still/level"
    with MapperProcess(tmp_path, devices, broker) as mapper:
        sub = Sub(broker, "app", count_topic, level_topic)
        try:
            counts = [sub.expect(count_topic)["value"] for _ in range(4)]
            assert [b - a for a, b in zip(counts, counts[1:])] == [5, 5, 5], counts
            levels = [sub.expect(level_topic) for _ in range(2)]
            assert [b["value"] for b in levels] == [7.5, 7.5]
            assert levels[1]["ts"] - levels[0]["ts"] >= 600 - 25, levels
            with sqlite3.connect(mapper.twin_path) as twin:
                recorded = twin.execute("SELECT count(*) FROM readings WHERE property = 'level' AND ts > ? AND ts < ?",
                                        (levels[0]["ts"], levels[1]["ts"])).fetchone()[0]
            assert recorded >= 3, recorded  # every reading in between is in the twin's history
            subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "app",
                            "-P", broker.users["app"], "-q", "1", "-t", f"{count_topic}/set", "-m", "1000000"],
                           check=True, timeout=10)
            jumped = sub.expect(count_topic, lambda body: body["value"] >= 1_000_000)
            assert jumped["value"] < 1_000_000 + 5, jumped  # the first reading of the new value, not a later one
        finally:
            sub.close()
            assert mapper.stop() == 0


def test_home_assistant_keeps_a_report_on_change_sensor_available_between_heartbeats(tmp_path):
    """HA marks a sensor unavailable after `expire_after` without a message: counted from the
    reportCycle, a steady value with a deadband (sent once a heartbeat) went unavailable."""
    import orjson

    from eventbus.homeassistant import Discovery
    from eventbus.settings import HomeAssistantSettings

    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "probe.yaml").write_text(one_property_device(
        "probe", "{name: level, type: FLOAT, accessMode: ReadOnly}",
        "{kind: constant, reportDeadband: 1, reportMaxIntervalMs: 120000}",
        settings="collectCycle: 1000\nreportCycle: 1000\nreportToCloud: true"))
    made = Discovery(HomeAssistantSettings(discovery=True), TOPICS, "n1", version="v",
                     state_interval_ms=1000).configs(load([devices]).devices)
    [config] = [orjson.loads(body) for body in made.values()]
    assert config["expire_after"] == 2 * 120 + 5


def _deadband_under_a_banded_model(tmp_path: Path, device_visitor: str):  # noqa: ANN202 - a Deadband
    """The deadband of a device with `device_visitor` whose model's visitor gives reportDeadband: 2
    and reportMaxIntervalMs: 5000."""
    devices = tmp_path / "devices"
    devices.mkdir()
    model_prop = ("{name: level, type: FLOAT, accessMode: ReadOnly, visitors: {protocolName: simulated,"
                  " configData: {reportDeadband: 2, reportMaxIntervalMs: 5000}}}")
    (devices / "probe.yaml").write_text(one_property_device("probe", model_prop, device_visitor,
                                                            settings="collectCycle: 100"))
    return load([devices]).devices[D].prop("level").deadband


def test_a_models_visitor_gives_its_devices_the_option_and_a_device_overrides_it(tmp_path):
    """As for the driver's own keys, the model's visitors configData is overridden key by key by the device's."""
    band = _deadband_under_a_banded_model(tmp_path, "{kind: constant, reportDeadband: 0.1}")
    assert (band.absolute, band.percent, band.max_interval_ms) == (0.1, None, 5000)


def test_a_device_s_percent_deadband_replaces_its_model_s_absolute_one(tmp_path):
    """The device's deadband, of either kind, replaces the model's: it was refused as `not both` at the
    device's line, which gives one only, and the device's author could not take the model's out."""
    band = _deadband_under_a_banded_model(tmp_path, "{kind: constant, reportDeadbandPercent: 5}")
    assert (band.absolute, band.percent, band.max_interval_ms) == (None, 5.0, 5000)
