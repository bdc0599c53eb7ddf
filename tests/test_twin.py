"""The SQLite device twin: desired/reported with versions, delta, history bounds, outbox policy."""

from __future__ import annotations

import contextlib
import time

import orjson
import pytest

from devices.ids import DeviceId
from devices.loader import load
from twin.records import ERROR, GOOD, OUT_OF_RANGE, Reading
from devices.values import PropertyType
from twin.store import (
    DERIVED_PROTOCOL,
    DerivedDevice,
    NotWritable,
    OutboxLimits,
    OutMessage,
    TwinError,
    TwinStore,
    UnknownDevice,
    UnknownProperty,
    VersionConflict,
    fair_cuts,
)
from helpers import write_devices

D1 = DeviceId("default", "d1")


@pytest.fixture
def twin(tmp_path):
    result = load([write_devices(tmp_path / "devices", ["d1", "d2"])])
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(result.devices.values())
        yield store


def test_wal_and_schema_version(twin):
    """The twin file is in WAL mode and migrated to the latest schema."""
    assert twin.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert twin.conn.execute("PRAGMA user_version").fetchone()[0] >= 2


def test_reading_updates_reported_value_version_and_history(twin):
    """A good reading becomes the reported value, bumps its version and lands in history."""
    twin.record([Reading(D1, "temperature", 21.5, 1000), Reading(D1, "temperature", 21.7, 2000)])
    prop = twin.device(D1).properties["temperature"]
    assert (prop.reported, prop.reported_version, prop.reported_ts, prop.quality) == (21.7, 2, 2000, GOOD)
    assert twin.history(D1, "temperature") == [(1000, 21.5, GOOD), (2000, 21.7, GOOD)]


def test_out_of_range_and_errors_do_not_become_reported(twin):
    """Bad readings are recorded as such; the reported value stays the last good one."""
    twin.record([Reading(D1, "temperature", 20.0, 1000)])
    twin.record([Reading(D1, "temperature", 99.0, 2000, OUT_OF_RANGE, "99.0 is above the maximum 50"),
                 Reading(D1, "temperature", None, 3000, ERROR, "timeout")])
    prop = twin.device(D1).properties["temperature"]
    assert prop.reported == 20.0 and prop.quality == ERROR and prop.quality_detail == "timeout"
    assert [q for _, _, q in twin.history(D1, "temperature")] == [GOOD, OUT_OF_RANGE, ERROR]


def test_desired_value_delta_and_versions(twin):
    """Setting desired creates a delta that disappears once reported matches."""
    value, version = twin.set_desired(D1, "power", "true")
    assert (value, version) == (True, 1)
    assert twin.device(D1).delta() == {"power": True}
    assert [c.property for c in twin.pending_desired()] == ["power"]
    twin.mark_applied(D1, "power", version)
    assert twin.pending_desired() == []
    twin.record([Reading(D1, "power", True, 5000)])
    assert twin.device(D1).delta() == {}


def test_desired_refused_for_read_only_unknown_and_wrong_type(twin):
    """Read-only, unknown and badly typed desired values are refused with a clear error."""
    with pytest.raises(NotWritable, match="'temperature' of default/d1 is ReadOnly"):
        twin.set_desired(D1, "temperature", 5)
    with pytest.raises(UnknownProperty, match="has no property 'nope'"):
        twin.set_desired(D1, "nope", 5)
    with pytest.raises(UnknownDevice):
        twin.set_desired(DeviceId("default", "ghost"), "power", True)
    with pytest.raises(ValueError, match="expected an integer"):
        twin.set_desired(D1, "count", "lots")


def test_integers_beyond_64_bits_are_refused_like_any_wrong_type(twin):
    """SQLite and the JSON payloads hold 64-bit integers: a larger one is a 400, not an internal
    error half way through storing it."""
    for raw in (2**63, -(2**63) - 1, 1e20, "99999999999999999999999"):
        with pytest.raises(ValueError, match="integer from -2"):
            twin.set_desired(D1, "count", raw)
    for raw in ("1_000", "\u0661\u0662"):  # Python's int() takes these; JSON and YAML do not
        with pytest.raises(ValueError, match="expected an integer"):
            twin.set_desired(D1, "count", raw)
    assert twin.set_desired(D1, "count", " 12 ")[0] == 12
    assert twin.set_desired(D1, "count", 2**63 - 1)[0] == 2**63 - 1
    assert twin.device(D1).properties["count"].desired == 2**63 - 1


def test_integers_are_taken_only_when_exact_never_through_a_rounding_float(twin):
    """An INT passed through a float: `12345678901234567.5e0` was stored as ...568 and
    `9007199254740993.0` as ...992, a value nobody sent. A numeral with a fraction or exponent (or
    a JSON float) is an integer only when whole and no larger than 2^53-1, where floats are exact."""
    refused = {
        "12345678901234567.5e0": "not a whole number",
        "1.5": "not a whole number",
        "9007199254740993.0": "exact only up to 2\\^53-1",
        "-9007199254740993e0": "exact only up to 2\\^53-1",
        9007199254740992.0: "exact only up to 2\\^53-1",  # what a JSON 9007199254740993.0 parses to
        1e18: "exact only up to 2\\^53-1",
        "nan": "expected an integer",
    }
    for raw, why in refused.items():
        with pytest.raises(ValueError, match=why):
            twin.set_desired(D1, "count", raw)
    assert twin.device(D1).properties["count"].desired_version == 0  # nothing stored
    taken = {"1e3": 1000, "12.0": 12, 7.0: 7, "-9007199254740991.0": -(2**53 - 1), 2.0**53 - 1: 2**53 - 1,
             "9007199254740993": 2**53 + 1, 2**53 + 1: 2**53 + 1}  # integers as integers: exact to 2^63-1
    for raw, value in taken.items():
        assert twin.set_desired(D1, "count", raw)[0] == value, raw
        assert twin.device(D1).properties["count"].desired == value


def test_desired_values_set_in_one_transaction_are_all_or_nothing(twin):
    """Several desired values in one transaction() (a twin/update naming several properties):
    when anything fails before the end, none of them is stored."""
    with pytest.raises(RuntimeError, match="later failure"), twin.transaction():
        twin.set_desired(D1, "count", 5)
        twin.set_desired(D1, "power", True)
        raise RuntimeError("later failure")
    props = twin.device(D1).properties
    assert (props["count"].desired, props["count"].desired_version) == (None, 0)
    assert (props["power"].desired, props["power"].desired_version) == (None, 0)
    with twin.transaction():
        twin.set_desired(D1, "count", 5)
        twin.set_desired(D1, "power", True)
    props = twin.device(D1).properties
    assert (props["count"].desired, props["power"].desired) == (5, True)


def test_older_version_is_a_conflict(twin):
    """An update carrying a version older than the stored one is refused (409)."""
    twin.set_desired(D1, "count", 1)
    twin.set_desired(D1, "count", 2)
    with pytest.raises(VersionConflict):
        twin.set_desired(D1, "count", 3, expected_version=1)
    assert twin.set_desired(D1, "count", 3, expected_version=2) == (3, 3)


def test_a_version_check_cannot_overwrite_a_value_another_process_set_meanwhile(twin, monkeypatch):
    """`mapper twin set` (another process) commits a desired value just after the mapper read the
    version it checks against (a device setting itself back, a $hw update with expected_version).
    The check ran before the write lock was taken: it passed on the stale version and the
    accepted value of the other process was overwritten, never applied. Now the check runs under
    the write lock: either the other process waits for it (here it gives up at once, locked) and
    its value comes after, or the check sees the new version and refuses (409)."""
    import sqlite3

    cli = TwinStore.open(twin.path)
    cli.conn.execute("PRAGMA busy_timeout=50")  # the other process: give up quickly instead of waiting 30 s
    other: list[object] = []
    read = twin._property_row

    def read_then_other_process_commits(device_id, name):  # noqa: ANN001, ANN202
        row = read(device_id, name)
        if not other:
            try:
                other.append(cli.set_desired(D1, "count", 7))
            except sqlite3.OperationalError as exc:  # the mapper holds the write lock
                other.append(exc)
        return row

    try:
        version = twin.set_desired(D1, "count", 1)[1]
        monkeypatch.setattr(twin, "_property_row", read_then_other_process_commits)
        try:
            twin.set_desired(D1, "count", 2, expected_version=version)
            conflict = False
        except VersionConflict:
            conflict = True
        accepted = isinstance(other[0], tuple)
        assert not (accepted and not conflict), "the value the other process was told it set was overwritten"
        assert twin.device(D1).properties["count"].desired == (7 if accepted else 2)
    finally:
        cli.close()


def test_history_drops_exactly_the_readings_older_than_the_age_limit(twin):
    """With a row limit far above the history's size, the age limit alone decides: the readings
    older than it go, every younger one stays."""
    import time
    now = int(time.time() * 1000)
    twin.record([Reading(D1, "count", -1 - i, now - 10_000_000 + i) for i in range(10)])  # old
    twin.record([Reading(D1, "count", i, now + i) for i in range(200)])                   # young
    deleted = twin.prune_history(max_rows=1_000_000, max_age_ms=1_000_000)
    rows = twin.history(D1, "count", limit=1000)
    assert deleted == 10
    assert sorted(v for _ts, v, *_ in rows) == list(range(200))


def test_history_keeps_the_newest_readings_up_to_the_row_limit(twin):
    """With an age limit none of the readings reaches, the row limit alone decides: the newest
    `max_rows` readings stay."""
    import time
    now = int(time.time() * 1000)
    twin.record([Reading(D1, "count", i, now + i) for i in range(200)])
    deleted = twin.prune_history(max_rows=150, max_age_ms=1_000_000)
    rows = twin.history(D1, "count", limit=1000)
    assert deleted == 50
    assert sorted(v for _ts, v, *_ in rows) == list(range(50, 200))


def test_age_pruning_reads_only_the_old_end_of_history(twin):
    """Age pruning stops at the first young reading instead of scanning all of history (there is no
    index on ts): counted in SQLite VM instructions, not time. A reading that arrives with an old
    timestamp behind young ones stays until it reaches the old end (documented)."""
    import time
    now = int(time.time() * 1000)
    twin.record([Reading(D1, "count", i, now - 10_000_000 + i) for i in range(50)])      # old
    twin.record([Reading(D1, "count", i, now + i) for i in range(20_000)])               # young
    twin.record([Reading(D1, "count", -1, now - 10_000_000)])                            # old, late
    instructions = [0]

    def count() -> int:
        instructions[0] += 1000
        return 0

    twin.conn.set_progress_handler(count, 1000)
    try:
        deleted = twin.prune_history(max_rows=1_000_000, max_age_ms=1_000_000)
    finally:
        twin.conn.set_progress_handler(None, 0)
    assert deleted == 50
    assert instructions[0] < 20_000, f"{instructions[0]} VM instructions: the young rows were scanned"
    values = [v for _ts, v, *_ in twin.history(D1, "count", limit=30_000)]
    assert len(values) == 20_001 and values[-1] == -1  # the late one, newest by arrival


def test_the_wal_file_shrinks_back_after_a_reader_held_off_its_checkpoint(tmp_path, twin):
    """A reader that keeps a snapshot open stops SQLite's checkpoints, so the -wal file grows with
    every commit; once the reader is gone and a checkpoint emptied it, the file is cut back to
    WAL_SIZE_LIMIT instead of keeping that size on the disk for good."""
    import sqlite3
    import time

    from twin.store import WAL_SIZE_LIMIT

    wal = tmp_path / "twin.db-wal"
    reader = sqlite3.connect(tmp_path / "twin.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM readings").fetchone()  # a snapshot: no checkpoint may pass it
    now = int(time.time() * 1000)
    k = 0
    while wal.stat().st_size <= 2 * WAL_SIZE_LIMIT:
        assert k < 200_000, f"the -wal file did not grow past {2 * WAL_SIZE_LIMIT} bytes"
        twin.record([Reading(D1, "count", k + i, now + k + i) for i in range(50)])
        k += 50
    reader.execute("COMMIT")
    reader.close()
    # Commits go on; SQLite's auto-checkpoint empties the file, and a later commit starts it over.
    for _ in range(4000):
        twin.record([Reading(D1, "count", k, now + k)])
        k += 1
        if wal.stat().st_size <= WAL_SIZE_LIMIT:
            break
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    assert twin.history(D1, "count", limit=1)[0][1] == k - 1  # nothing lost on the way


def test_outbox_sequences_survive_reopen(tmp_path, twin):
    """Per-topic sequence numbers count up by one and continue after a restart."""
    rows = twin.record([], [OutMessage("t/a", {"v": 1}), OutMessage("t/a", {"v": 2}), OutMessage("t/b", {"v": 3})])
    assert [r.payload for r in rows] == [b'{"v":1,"seq":1}', b'{"v":2,"seq":2}', b'{"v":3,"seq":1}']
    twin.close()
    with TwinStore.open(tmp_path / "twin.db") as again:
        (row,) = again.record([], [OutMessage("t/a", {"v": 4})])
        assert row.payload == b'{"v":4,"seq":3}'
        assert [r.topic for r in again.outbox_pending()] == ["t/a", "t/a", "t/b", "t/a"]


@pytest.mark.parametrize(("configured", "code"), [("FULL", 2), ("EXTRA", 3), ("NORMAL", 1)])
def test_acknowledged_rows_are_deleted_and_durability_is_restored(tmp_path, configured, code):
    """outbox_sent skips its own fsync (its COMMIT runs at synchronous=NORMAL), then the
    connection is back at the configured level: the next commit is durable again. The level each
    COMMIT ran at is followed through the statements SQLite traces."""
    import re
    with TwinStore.open(tmp_path / "twin.db", synchronous=configured) as store:
        rows = store.record([], [OutMessage("t/a", {"v": i}) for i in range(3)])
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == code
        level = [configured]
        commits: list[str] = []  # the synchronous level each COMMIT ran at

        def trace(sql: str) -> None:
            setting = re.fullmatch(r"\s*PRAGMA\s+synchronous\s*=\s*(\w+)\s*;?\s*", sql, re.IGNORECASE)
            if setting:
                level[0] = setting.group(1).upper()
            elif sql.strip().upper().startswith(("COMMIT", "END")):
                commits.append(level[0])

        store.conn.set_trace_callback(trace)
        try:
            store.outbox_sent([rows[0].id, rows[2].id])
            assert commits == ["NORMAL"]  # the ack: one commit, without an fsync of its own
            assert [r.id for r in store.outbox_pending()] == [rows[1].id]
            assert store.outbox_stats()["depth"] == 1
            assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == code
            store.record([], [OutMessage("t/a", {"v": 9})])
            assert commits == ["NORMAL", configured]  # the next commit is durable again
        finally:
            store.conn.set_trace_callback(None)


def test_record_deletes_acknowledged_rows_in_the_same_transaction(tmp_path, twin):
    """Acks ride along with the next batch: one commit, the outbox and its counts follow."""
    first = twin.record([], [OutMessage("t/a", {"v": i}) for i in range(3)])
    rows = twin.record([Reading(D1, "count", 7, 1_000)], [OutMessage("t/a", {"v": 3})],
                       sent=[first[0].id, first[1].id])
    assert [r.id for r in twin.outbox_pending()] == [first[2].id, rows[0].id]
    assert twin.outbox_stats()["depth"] == 2 == twin._outbox_rows  # noqa: SLF001 - the in-memory count matches
    with pytest.raises(TypeError):  # a batch that fails after the delete rolls it back too
        twin.record([Reading(D1, "count", 8, 2_000)], [OutMessage("t/a", {"v": object()})], sent=[first[2].id])
    assert [r.id for r in twin.outbox_pending()] == [first[2].id, rows[0].id]


def test_outbox_limit_drops_oldest_telemetry_only(tmp_path):
    """Over the row limit the oldest telemetry goes; twin replies are never dropped; drops are counted."""
    with TwinStore.open(tmp_path / "o.db", outbox=OutboxLimits(max_rows=5)) as store:
        store.record([], [OutMessage("reply", {"n": 0}, kind="twin")])
        store.record([], [OutMessage("tele", {"n": i}) for i in range(1, 8)])
        kept = store.outbox_pending()
        assert [r.kind for r in kept][0] == "twin"
        assert [r.payload for r in kept[1:]] == [b'{"n":%d,"seq":%d}' % (i, i) for i in range(4, 8)]
        assert store.outbox_stats() == {"depth": 5, "bytes": sum(len(r.payload) for r in kept), "dropped": 3}
        store.outbox_sent([r.id for r in kept[:2]])
        assert store.outbox_stats()["depth"] == 3


def test_edited_definition_wins_over_old_desired(tmp_path):
    """A desired value from YAML is applied when the device is new or the file's own desired
    value changed (so an edited file wins over an old desired value), also across a restart."""
    devices = write_devices(tmp_path / "devices", ["d1"])
    text = (devices / "d1.yaml").read_text().replace("    - name: count\n", "    - name: count\n      desired: {value: '7'}\n")
    (devices / "d1.yaml").write_text(text)
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.set_desired(D1, "count", 9)
        store.sync_devices(load([devices]).devices.values())  # unchanged: keeps 9
        assert store.device(D1).properties["count"].desired == 9
        (devices / "d1.yaml").write_text(text.replace("'7'", "'8'"))
        store.sync_devices(load([devices]).devices.values())
        assert store.device(D1).properties["count"].desired == 8
    with TwinStore.open(tmp_path / "twin.db") as store:  # restarted
        store.set_desired(D1, "count", 10)
    with TwinStore.open(tmp_path / "twin.db") as store:  # restarted with the same files
        store.sync_devices(load([devices]).devices.values())
        assert store.device(D1).properties["count"].desired == 10
    (devices / "d1.yaml").write_text(text.replace("'7'", "'11'"))
    with TwinStore.open(tmp_path / "twin.db") as store:  # restarted with the file's value edited
        store.sync_devices(load([devices]).devices.values())
        assert store.device(D1).properties["count"].desired == 11


def test_a_change_besides_the_files_desired_value_keeps_the_operators_value(tmp_path):
    """The operator's desired value (set after the file's was applied) stays when the device or
    its model changes in anything but the file's own `desired:` (the model's description, the
    property's type, the device's config): the device restarts (sync_devices says it changed),
    its desired value is not set again. Before, every such change applied the file's value
    again over the operator's. Removing the file's `desired:` and giving the same one again is a
    change of it (applied); a property made ReadOnly and ReadWrite again gets the file's value."""
    devices = write_devices(tmp_path / "devices", ["d1"])
    model = (devices / "model.yaml").read_text()
    plain = (devices / "d1.yaml").read_text()
    text = plain.replace("    - name: count\n", "    - name: count\n      desired: {value: '7'}\n")
    (devices / "d1.yaml").write_text(text)

    def sync():  # noqa: ANN202
        return store.sync_devices(load([devices]).devices.values())

    with TwinStore.open(tmp_path / "twin.db") as store:
        sync()
        assert store.device(D1).properties["count"].desired == 7
        _, version = store.set_desired(D1, "count", 9)
        (devices / "model.yaml").write_text(model.replace("    - name: count\n", "    - name: count\n      description: events\n"))
        assert sync() == [D1]
        (devices / "d1.yaml").write_text(text.replace("configData: {}", "configData: {seed: 3}"))
        assert sync() == [D1]
        assert (store.device(D1).properties["count"].desired, store.device(D1).properties["count"].desired_version) == (9, version)
        # The property's type changes (INT -> FLOAT): the file's text is the same; 9 is kept, as a FLOAT.
        (devices / "model.yaml").write_text(model.replace("      type: INT\n", "      type: FLOAT\n"))
        assert sync() == [D1]
        count = store.device(D1).properties["count"]
        assert count.desired == 9.0 and isinstance(count.desired, float), count
        (devices / "model.yaml").write_text(model)
        sync()
        assert store.device(D1).properties["count"].desired == 9
        # The file's desired value goes, then comes back: applied then.
        (devices / "d1.yaml").write_text(plain)
        sync()
        assert store.device(D1).properties["count"].desired == 9
        (devices / "d1.yaml").write_text(text)
        sync()
        assert store.device(D1).properties["count"].desired == 7
        store.set_desired(D1, "count", 9)
        # ReadOnly (the file's value is ignored, the twin's dropped), then ReadWrite again: applied.
        readonly = model.replace("      type: INT\n      accessMode: ReadWrite", "      type: INT\n      accessMode: ReadOnly")
        assert readonly != model
        (devices / "model.yaml").write_text(readonly)
        sync()
        assert store.device(D1).properties["count"].desired is None
        (devices / "model.yaml").write_text(model)
        sync()
        assert store.device(D1).properties["count"].desired == 7


def test_an_operators_value_the_changed_model_no_longer_takes_gives_way_to_the_files(tmp_path):
    """The operator's desired value is kept over the file's while the file's does not change, but
    not once the model no longer takes it: the maximum lowered below it (or a type it cannot be),
    it stayed, a delta for good that no write could apply. It is cleared, and the file's own
    `desired:` applies again (before the file's value was kept apart, every model change re-applied it)."""
    devices = write_devices(tmp_path / "devices", ["d1"])
    model = (devices / "model.yaml").read_text()
    (devices / "d1.yaml").write_text((devices / "d1.yaml").read_text().replace(
        "    - name: count\n", "    - name: count\n      desired: {value: '7'}\n"))

    def sync():  # noqa: ANN202
        return store.sync_devices(load([devices]).devices.values())

    with TwinStore.open(tmp_path / "twin.db") as store:
        sync()
        store.set_desired(D1, "count", 90)
        narrower = model.replace('      maximum: "100000000"\n', '      maximum: "10"\n')
        assert narrower != model
        (devices / "model.yaml").write_text(narrower)
        assert sync() == [D1]
        assert store.device(D1).properties["count"].desired == 7
        # Within the new range, the operator's value stays.
        store.set_desired(D1, "count", 9)
        (devices / "model.yaml").write_text(narrower.replace('      maximum: "10"\n', '      maximum: "20"\n'))
        assert sync() == [D1]
        assert store.device(D1).properties["count"].desired == 9


def test_a_twin_file_from_before_file_desired_applies_no_file_value_over_the_twins(tmp_path, caplog):
    """A twin file from before the file's desired value was kept (m007: file_desired NULL) does
    not know what the file said. Its `desired:` is recorded, not applied over the twin's desired
    value (the operator's, perhaps); said once in the log when the device's definition changed
    since (its value may be new), silently when it did not. A property with no desired value in
    the twin gets it. Next time the file's own value decides as usual."""
    import sqlite3

    from twin import migrations

    old = tmp_path / "m006.db"
    conn = sqlite3.connect(old, isolation_level=None)
    for version, step in enumerate(migrations.MIGRATIONS[:6], start=1):
        step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    with TwinStore.open(old) as store:
        assert store.conn.execute("SELECT count(*) FROM pragma_table_info('properties') WHERE name='file_desired'"
                                  ).fetchone()[0] == 1

    D2 = DeviceId("default", "d2")
    devices = write_devices(tmp_path / "devices", ["d1", "d2"])
    for name in ("d1", "d2"):
        text = (devices / f"{name}.yaml").read_text()
        (devices / f"{name}.yaml").write_text(text.replace("    - name: count\n", "    - name: count\n      desired: {value: '7'}\n"))
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as store:
        store.sync_devices(load([devices]).devices.values())
        store.set_desired(D1, "count", 9)
        store.set_desired(D2, "count", 9)
        store.conn.execute("UPDATE properties SET file_desired=NULL")  # as written before m007
    with TwinStore.open(path) as store:  # same files: kept, nothing said
        store.sync_devices(load([devices]).devices.values())
        assert [store.device(d).properties["count"].desired for d in (D1, D2)] == [9, 9]
        assert not [r for r in caplog.records if "recorded, not applied" in r.getMessage()]
        store.conn.execute("UPDATE properties SET file_desired=NULL")
        store.conn.execute("UPDATE properties SET desired=NULL WHERE device_id=?", (str(D2),))
    text = (devices / "d1.yaml").read_text()
    (devices / "d1.yaml").write_text(text.replace("configData: {}", "configData: {seed: 3}").replace("'7'", "'8'"))
    with TwinStore.open(path) as store:  # d1's file edited while the old mapper was stopped
        store.sync_devices(load([devices]).devices.values())
        assert [store.device(d).properties["count"].desired for d in (D1, D2)] == [9, 7]
        said = [r.getMessage() for r in caplog.records if "recorded, not applied" in r.getMessage()]
        assert len(said) == 1 and "default/d1 property 'count'" in said[0] and "8" in said[0], said
        store.sync_devices(load([devices]).devices.values())
        assert len([r for r in caplog.records if "recorded, not applied" in r.getMessage()]) == 1
        (devices / "d1.yaml").write_text(text.replace("'7'", "'12'"))
        store.sync_devices(load([devices]).devices.values())
        assert store.device(D1).properties["count"].desired == 12


def test_batch_folds_per_property_and_last_quality_wins(twin):
    """In one batch: the version counts every good reading, the last good one is reported,
    and the property's quality is that of its last reading."""
    twin.record([Reading(D1, "temperature", 20.0, 1000), Reading(D1, "temperature", 21.0, 2000),
                 Reading(D1, "temperature", None, 3000, ERROR, "timeout"),
                 Reading(D1, "count", None, 1000, ERROR, "timeout"), Reading(D1, "count", 4, 2000)])
    twin_doc = twin.device(D1)
    temperature, count = twin_doc.properties["temperature"], twin_doc.properties["count"]
    assert (temperature.reported, temperature.reported_version, temperature.reported_ts) == (21.0, 2, 2000)
    assert (temperature.quality, temperature.quality_detail) == (ERROR, "timeout")
    assert (count.reported, count.reported_version, count.quality, count.quality_detail) == (4, 1, GOOD, None)
    assert twin_doc.last_reading_ts == 3000
    assert len(twin.history(D1, "temperature")) == 3 and len(twin.history(D1, "count")) == 2


def test_outbox_ids_never_repeat_after_the_outbox_emptied_and_a_restart(tmp_path):
    """The publisher tells new rows from old by id: an emptied outbox must not start again at 1."""
    path = tmp_path / "o.db"
    with TwinStore.open(path) as store:
        rows = store.record([], [OutMessage("t", {"n": i}) for i in range(10)])
        store.outbox_sent([r.id for r in rows])
        assert store.outbox_stats()["depth"] == 0
    with TwinStore.open(path) as store:
        (row,) = store.record([], [OutMessage("t", {"n": 10})])
        assert row.id > rows[-1].id
        assert row.payload == b'{"n":10,"seq":11}'


def test_migration_keeps_outbox_rows_and_the_old_id_high_water_mark(tmp_path):
    """A twin file from before m004 (AUTOINCREMENT outbox) keeps its rows, and ids go on above
    any id it ever handed out, even ones already deleted."""
    import sqlite3

    from twin import migrations

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version, step in enumerate(migrations.MIGRATIONS[:3], start=1):
        step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.executemany("INSERT INTO outbox (topic, payload, qos, retain, kind, created_ts) VALUES (?,?,1,0,'telemetry',0)",
                     [("t", b"x%d" % i) for i in range(50)])
    conn.execute("DELETE FROM outbox WHERE id > 5")
    conn.close()
    with TwinStore.open(path) as store:
        assert [r.id for r in store.outbox_pending()] == [1, 2, 3, 4, 5]
        (row,) = store.record([], [OutMessage("t", b"new")])
        assert row.id > 50
        assert store.integrity_ok()
        indexes = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "readings_by_property" not in indexes


def test_transaction_with_outbox_messages_commits_or_rolls_back_together(tmp_path):
    """transaction() + enqueue(): own rows and outbox rows are all or nothing, seqs included."""
    with TwinStore.open(tmp_path / "t.db") as store:
        store.conn.execute("CREATE TABLE mine (x INTEGER)")
        with store.transaction():
            store.conn.execute("INSERT INTO mine VALUES (1)")
            (first,) = store.enqueue([OutMessage("t", {"v": 1})])
        with pytest.raises(RuntimeError), store.transaction():
            store.conn.execute("INSERT INTO mine VALUES (2)")
            store.enqueue([OutMessage("t", {"v": 2})])
            raise RuntimeError("boom")
        with store.transaction():
            (again,) = store.enqueue([OutMessage("t", {"v": 3})])
        assert [r[0] for r in store.conn.execute("SELECT x FROM mine")] == [1]
        assert (first.payload, again.payload) == (b'{"v":1,"seq":1}', b'{"v":3,"seq":2}')
        assert [r.id for r in store.outbox_pending()] == [first.id, again.id]
        assert store.outbox_stats()["depth"] == 2
        with pytest.raises(TwinError, match="inside transaction"):
            store.enqueue([OutMessage("t", {"v": 4})])


def test_failed_record_leaves_no_trace(twin):
    """A batch that fails half way (readings written, one message not encodable) commits nothing
    and hands out no seq."""
    with pytest.raises(TypeError):
        twin.record([Reading(D1, "temperature", 20.0, 1000)], [OutMessage("t", {"v": 1}), OutMessage("t", {"v": object()})])
    assert twin.device(D1).properties["temperature"].reported_version == 0
    assert twin.history(D1, "temperature") == []
    (row,) = twin.record([], [OutMessage("t", {"v": 2})])
    assert row.payload == b'{"v":2,"seq":1}'


def test_outbox_limit_keeps_state_rows_between_dropped_telemetry(tmp_path):
    """Dropped telemetry may surround state rows: those stay, in order, and only telemetry is counted."""
    with TwinStore.open(tmp_path / "o.db", outbox=OutboxLimits(max_rows=4)) as store:
        store.record([], [OutMessage("tele", {"n": 1}), OutMessage("state", {"n": 2}, kind="state"),
                          OutMessage("tele", {"n": 3}), OutMessage("tele", {"n": 4}), OutMessage("tele", {"n": 5}),
                          OutMessage("tele", {"n": 6})])
        assert [(r.topic, r.payload) for r in store.outbox_pending()] == [
            ("state", b'{"n":2,"seq":1}'), ("tele", b'{"n":4,"seq":3}'), ("tele", b'{"n":5,"seq":4}'),
            ("tele", b'{"n":6,"seq":5}')]
        assert store.outbox_stats()["dropped"] == 2


DERIVED = DerivedDevice(DeviceId("default", "d1-faults"), "some-model",
                        (("label", PropertyType.STRING, ""), ("window_end", PropertyType.INT, "ms")), "from d1")


def test_derived_devices_are_read_only_reported_with_versions_and_retired_by_their_owner(twin):
    """A derived device: registered by sync_derived, its values reported like readings inside a transaction
    (versions, history), an older `newer` value refused, never writable, left alone by deactivate_devices and
    retired by the next sync_derived without it. An active device of the YAML keeps its name."""
    derived = DERIVED.id
    assert twin.sync_derived([DERIVED]) == []
    t = twin.device(derived)
    assert (t.model, t.protocol, t.state, t.state_detail) == ("some-model", DERIVED_PROTOCOL, "ok", "from d1")
    assert {n: (p.type, p.writable, p.unit) for n, p in t.properties.items()} == {
        "label": ("STRING", False, ""), "window_end": ("INT", False, "ms")}
    with pytest.raises(TwinError):
        twin.report_derived(derived, {"label": "x", "window_end": 1})
    with twin.transaction():
        assert twin.report_derived(derived, {"label": "spike", "window_end": 2000}, ts=5000, newer="window_end")
        assert twin.report_derived(derived, {"label": "normal", "window_end": 2000}, ts=6000, newer="window_end")
        assert not twin.report_derived(derived, {"label": "stuck", "window_end": 1000}, ts=7000, newer="window_end")
        assert not twin.report_derived(D1, {"temperature": 1.0})  # not a derived device: untouched
    label = twin.device(derived).properties["label"]
    assert (label.reported, label.reported_version, label.reported_ts, label.quality) == ("normal", 2, 6000, GOOD)
    assert twin.history(derived, "label") == [(5000, "spike", GOOD), (6000, "normal", GOOD)]
    assert twin.device(derived).last_reading_ts == 6000
    assert twin.device(D1).properties["temperature"].reported is None
    with pytest.raises(NotWritable):
        twin.set_desired(derived, "label", "stuck")

    with twin.transaction():  # a failure rolls the report back with the rest
        twin.report_derived(derived, {"label": "drift", "window_end": 3000}, newer="window_end")
    with pytest.raises(RuntimeError), twin.transaction():
        twin.report_derived(derived, {"label": "noise", "window_end": 4000}, newer="window_end")
        raise RuntimeError("boom")
    assert twin.device(derived).properties["label"].reported == "drift"

    twin.deactivate_devices([D1])
    assert derived in twin.device_ids() and DeviceId("default", "d2") not in twin.device_ids()
    assert twin.sync_derived([]) == []
    assert derived not in twin.device_ids() and twin.device(derived).state == "offline"
    assert twin.sync_derived([DERIVED]) == [] and derived in twin.device_ids()
    assert twin.device(derived).properties["label"].reported == "drift"  # values survive a re-registration
    assert twin.sync_derived([DerivedDevice(D1, "m", (), None)]) == [D1]
    assert twin.device(D1).protocol != DERIVED_PROTOCOL and derived not in twin.device_ids()


def test_a_derived_device_whose_name_a_device_of_the_files_takes_is_reported_no_more(twin, tmp_path):
    """report_derived knows the derived devices without a query a window: a device of the files that
    takes a derived device's name (sync_devices) is no derived device for it from then on, also when a
    report came before; one registered later (sync_derived) is."""
    derived = DERIVED.id
    assert twin.sync_derived([DERIVED]) == []
    with twin.transaction():
        assert twin.report_derived(derived, {"label": "spike", "window_end": 1000}, newer="window_end")
    files = load([write_devices(tmp_path / "taken", ["d1", "d2", "d1-faults"])]).devices
    twin.sync_devices(files.values())
    assert twin.device(derived).protocol != DERIVED_PROTOCOL
    with twin.transaction():
        assert not twin.report_derived(derived, {"label": "drift", "window_end": 2000}, newer="window_end")
    assert [value for _, value, _ in twin.history(derived, "label")] == ["spike"]

    other = DerivedDevice(DeviceId("default", "d2-faults"), "some-model", DERIVED.properties)
    assert twin.sync_derived([other]) == []
    with twin.transaction():
        assert twin.report_derived(other.id, {"label": "drift", "window_end": 2000}, newer="window_end")


def test_pruning_in_steps_deletes_the_oldest_rows_a_step_at_a_time(twin):
    """With `step`, each call deletes at most that many of the oldest rows; calling until it
    returns less leaves what one unlimited call leaves."""
    import time
    now = int(time.time() * 1000)
    twin.record([Reading(D1, "count", i, now - 10_000_000 + i) for i in range(250)])   # too old
    twin.record([Reading(D1, "count", i, now + i) for i in range(1000)])                # young
    steps = []
    for _ in range(10):  # 1,250 rows in steps of 300: far fewer calls than this
        steps.append(twin.prune_history(max_rows=600, max_age_ms=1_000_000, step=300))
        if steps[-1] != 300:
            break
    else:
        pytest.fail(f"still deleting full steps after 10 calls: {steps}")
    assert steps == [300, 300, 50]
    values = [v for _ts, v, *_ in twin.history(D1, "count", limit=10_000)]
    assert values == list(range(400, 1000))
    assert twin.prune_history(max_rows=600, max_age_ms=1_000_000, step=300) == 0


def prune_in_steps(store: TwinStore, step: int = 1000, calls: int = 100) -> None:
    """Prune as the mapper does, a step per call, until a call deletes less than a step (30,000
    rows at most here: 30 full steps); fails instead of looping for ever."""
    for _ in range(calls):
        if store.prune_history(1000, 10**13, step=step) < step:
            return
    pytest.fail(f"still deleting full steps of {step} after {calls} calls")


def test_stepped_pruning_goes_past_rows_still_waiting_for_the_broker(tmp_path):
    """During a broker outage the rows carrying an unacknowledged message pile up at the old end
    of history. A stepped prune (the mapper's, PRUNE_STEP rows per transaction) must still reach
    the rows behind them that may go, as an unstepped one does: history stays at the limit plus
    the rows that wait, instead of growing for as long as the outage lasts."""
    with TwinStore.open(tmp_path / "twin.db") as store:
        for k in range(3000):  # 10 readings per batch, the first of each published (reportCycle = 10 cycles)
            batch = [Reading(D1, "count", i, 10**12 + 10 * k + i) for i in range(10)]
            store.record(batch, [OutMessage("t/count", {"unit": "1"}, reading=batch[0])])

        def rows() -> tuple[int, int]:
            total, carrying = store.conn.execute("SELECT count(*), count(seq) FROM readings").fetchone()
            return total, carrying

        assert rows() == (30_000, 3000)
        prune_in_steps(store)
        assert rows() == (1000 + 3000, 3000)  # the limit, and on top of it the rows still waiting
        assert len(store.outbox_pending(limit=10_000)) == 3000
        oldest = [row_id for (row_id,) in store.conn.execute("SELECT id FROM readings WHERE seq IS NOT NULL"
                                                             " ORDER BY id LIMIT 2500")]
        store.outbox_sent(oldest)  # the broker is back: the oldest 2,500 are acknowledged
        prune_in_steps(store)
        assert rows()[0] == 1000 + 500  # they go as any other reading
        assert len(store.outbox_pending(limit=10_000)) == 500


def rows_per_property(store: TwinStore) -> dict[str, int]:
    return dict(store.conn.execute("SELECT property, count(*) FROM readings GROUP BY property"))


def prune_fully(store: TwinStore, max_rows: int, max_age_ms: int = 10**13, step: int = 100) -> None:
    """Prune as the mapper does, in steps, until a call deletes less than a step."""
    for _ in range(1000):
        if store.prune_history(max_rows, max_age_ms, step=step) < step:
            return
    pytest.fail(f"still deleting full steps of {step} after 1000 calls")


def test_fair_cuts_share_the_limit_among_the_holders():
    """Water-filling: a holder under its share loses nothing, what it leaves unused goes to the others."""
    assert fair_cuts({"a": 10, "b": 20}, 100) == {}
    assert fair_cuts({"slow": 20, "fast": 4000}, 1000) == {"fast": 3020}
    assert fair_cuts({"a": 600, "b": 600, "c": 100}, 1000) == {"a": 150, "b": 150}
    assert fair_cuts({"a": 500, "b": 500, "c": 500}, 1000) == {"a": 167, "b": 167, "c": 166}
    assert fair_cuts({"a": 5, "b": 5}, 0) == {"a": 5, "b": 5}


def test_a_fast_property_does_not_prune_a_slow_ones_history(tmp_path):
    """twin.history_rows was one limit for the oldest rows of all properties: a property read
    fast pushed out a slow one's history (20 properties at 1 Hz: a sensor read once a minute
    kept ~3 hours of its 7 days). Now the count rule cuts the properties over their fair share
    only: the slow one keeps every row, the fast one is cut to the rest, the total to the
    limit; also across a restart (the rows per property are counted again)."""
    now = 10**12
    for run in range(2):
        with TwinStore.open(tmp_path / "twin.db") as store:
            for k in range(100):
                t = now + 1000 * (100 * run + k)
                # (every other one an error: those count toward the share as much as good ones)
                batch = [Reading(D1, "count", k * 20 + i, t + i, quality=GOOD if i % 2 else ERROR) for i in range(20)]
                if k % 10 == 0:
                    batch.append(Reading(D1, "temperature", 20.0 + k, t))
                store.record(batch)
                prune_fully(store, max_rows=1000)
                assert sum(rows_per_property(store).values()) <= 1000
    with TwinStore.open(tmp_path / "twin.db") as store:
        assert rows_per_property(store) == {"count": 980, "temperature": 20}
        assert len(store.history(D1, "temperature", limit=100)) == 20
        values = [v for _ts, v, *_ in store.history(D1, "count", limit=2000)]
        assert values == list(range(2000 - 980, 2000))  # the newest ones


def test_fair_pruning_keeps_the_readings_waiting_for_the_broker(tmp_path):
    """Rows carrying an unacknowledged message stay, on top of the limit, and do not count
    against their property's share; once acknowledged they are rows like any other."""
    now = 10**12
    with TwinStore.open(tmp_path / "twin.db") as store:
        slow = [Reading(D1, "temperature", 20.0 + i, now + i) for i in range(30)]
        waiting = store.record(slow, [OutMessage("t/temperature", {"unit": "C"}, reading=r) for r in slow])
        store.record([Reading(D1, "count", i, now + 100 + i) for i in range(2000)])
        prune_fully(store, max_rows=100)
        assert rows_per_property(store) == {"count": 100, "temperature": 30}
        assert len(store.outbox_pending(limit=100)) == 30
        store.outbox_sent([row.id for row in waiting])  # the broker is back
        prune_fully(store, max_rows=100)
        assert rows_per_property(store) == {"count": 70, "temperature": 30}  # under its share (50): all kept


def test_a_property_that_stops_keeps_its_rows_until_its_share_shrinks_or_they_age(tmp_path):
    """A property that stops producing keeps its rows while they fit its share; a new property
    shrinks the shares and it is cut to its own (its oldest rows go); the age rule still
    deletes its rows once they are too old."""
    now = 10**12
    with TwinStore.open(tmp_path / "twin.db") as store:
        def produce(names: list[str], rounds: int, start: int) -> None:
            for k in range(start, start + rounds):
                store.record([Reading(D1, name, k, now + 1000 * k) for name in names])
                prune_fully(store, max_rows=1000)

        produce(["count", "temperature"], 600, 0)
        assert rows_per_property(store) == {"count": 500, "temperature": 500}
        produce(["count"], 600, 600)  # temperature stops
        assert rows_per_property(store) == {"count": 500, "temperature": 500}
        produce(["count", "humidity"], 600, 1200)  # a third property: shares of a third
        kept = rows_per_property(store)
        assert sorted(kept.values()) == [333, 333, 334] and set(kept) == {"count", "humidity", "temperature"}
        kept_t = kept["temperature"]
        assert [v for _ts, v, *_ in store.history(D1, "temperature", limit=1000)] == list(range(600 - kept_t, 600))
        # Older than the age limit (judged from the old end): temperature's rows go, all of them.
        max_age_ms = int(time.time() * 1000) - (now + 1000 * 1000)  # (the limit just before the 1000th round)
        store.prune_history(1000, max_age_ms)
        assert "temperature" not in rows_per_property(store)
        assert rows_per_property(store)["humidity"] == 333


def test_a_failed_write_stays_pending_with_its_error(twin):
    """mark_applied(pending=True): the write failed; the error is shown and the value stays pending
    (it used to count as applied: never written again). An older attempt's error is not put on a
    newer value; a later successful write applies it."""
    _, v1 = twin.set_desired(D1, "power", True)
    twin.mark_applied(D1, "power", v1, "write failed: no answer", pending=True)
    assert twin.device(D1).properties["power"].apply_error == "write failed: no answer"
    assert [(c.property, c.version) for c in twin.pending_desired()] == [("power", v1)]
    _, v2 = twin.set_desired(D1, "power", False)
    assert twin.device(D1).properties["power"].apply_error is None
    twin.mark_applied(D1, "power", v1, "write failed: late", pending=True)
    assert twin.device(D1).properties["power"].apply_error is None
    assert [(c.property, c.version) for c in twin.pending_desired()] == [("power", v2)]
    twin.mark_applied(D1, "power", v2)
    assert twin.pending_desired() == []


def test_an_older_versions_result_made_after_a_newer_ones_leaves_the_newer_outcome(twin):
    """mark_applied for an older version, made after the newer version's (a record that waited for
    the twin's lock, retried after the newer value was applied): it set apply_error regardless,
    putting the older value's outcome on the newer one. The twin keeps the newer outcome."""
    _, v1 = twin.set_desired(D1, "power", True)
    _, v2 = twin.set_desired(D1, "power", False)
    twin.mark_applied(D1, "power", v2, "read back True after writing False")
    twin.mark_applied(D1, "power", v1)  # v1 written fine, recorded late
    prop = twin.device(D1).properties["power"]
    assert (prop.desired, prop.desired_version, prop.apply_error) == (False, v2, "read back True after writing False")
    assert twin.pending_desired() == []

    _, v3 = twin.set_desired(D1, "power", True)
    _, v4 = twin.set_desired(D1, "power", False)
    twin.mark_applied(D1, "power", v4)
    twin.mark_applied(D1, "power", v3, "read back False after writing True")  # v3's failure, recorded late
    prop = twin.device(D1).properties["power"]
    assert (prop.desired, prop.desired_version, prop.apply_error) == (False, v4, None)
    assert twin.pending_desired() == []

    _, v5 = twin.set_desired(D1, "power", True)
    twin.mark_applied(D1, "power", v4, "read back True after writing False")  # older, while v5 is pending
    prop = twin.device(D1).properties["power"]
    assert prop.apply_error is None
    assert [(c.property, c.version) for c in twin.pending_desired()] == [("power", v5)]


def test_an_apply_error_goes_once_a_folded_reading_equals_the_desired_value(tmp_path, twin, monkeypatch):
    """A read-back that gave up too early (a slow relay): its apply error goes at the fold that
    reports the desired value, as seen by another process too. A value still pending (its write
    failed) keeps its error even if the device happens to read that value."""
    import twin.store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_MS", 0)  # every commit folds
    _, version = twin.set_desired(D1, "power", True)
    twin.record([Reading(D1, "power", False, 1000)])
    twin.mark_applied(D1, "power", version, "read back False after writing True")
    twin.record([Reading(D1, "power", False, 2000)])
    assert twin.device(D1).properties["power"].apply_error == "read back False after writing True"
    twin.record([Reading(D1, "power", True, 3000)])
    with TwinStore.open(tmp_path / "twin.db") as other:
        prop = other.device(D1).properties["power"]
        assert (prop.reported, prop.desired, prop.apply_error) == (True, True, None)

    _, version = twin.set_desired(D1, "count", 7)
    twin.mark_applied(D1, "count", version, "write failed: no answer", pending=True)
    twin.record([Reading(D1, "count", 7, 4000)])
    assert twin.device(D1).properties["count"].apply_error == "write failed: no answer"


def test_a_new_origin_of_a_device_id_drops_its_desired_values(tmp_path, caplog):
    """The same namespace/name defined by an edgecore Device, then by a local YAML file (and back):
    the desired values stored for the one are dropped (a new version, nothing pending) for the
    other, also across a reopen (a restart), unless the new definition gives its own; logged once.
    An active row from before origins were recorded (NULL) keeps its values."""
    import dataclasses

    devices = write_devices(tmp_path / "devices", ["d1"])
    local = load([devices]).devices[D1]
    edge = dataclasses.replace(local, source="dmi:Device default/d1")
    assert (local.origin, edge.origin) == ("local", "edgecore")
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as store:
        store.sync_devices([edge])
        _, version = store.set_desired(D1, "count", 77)
        assert store.sync_devices([edge]) == []  # unchanged: kept
        assert store.device(D1).properties["count"].desired == 77
    with TwinStore.open(path) as store:  # restarted with the local file
        assert store.sync_devices([local]) == [D1]
        count = store.device(D1).properties["count"]
        assert count.desired is None and count.desired_version == version + 1 and count.apply_error is None
        assert [c for c in store.pending_desired() if c.device_id == D1] == []
        said = [r.getMessage() for r in caplog.records if "dropped, not applied" in r.getMessage()]
        assert len(said) == 1 and "count=77" in said[0] and "an edgecore Device" in said[0], said
        store.set_desired(D1, "count", 5)
        store.sync_devices([local])
        assert store.device(D1).properties["count"].desired == 5
        assert len([r for r in caplog.records if "dropped, not applied" in r.getMessage()]) == 1
        # Back to edgecore: the operator's value is not inherited either.
        store.sync_devices([edge])
        assert store.device(D1).properties["count"].desired is None
        # A definition with its own desired value gives it.
        store.set_desired(D1, "count", 6)
        with_desired = dataclasses.replace(local, properties=tuple(
            dataclasses.replace(p, desired=8) if p.name == "count" else p for p in local.properties))
        store.sync_devices([with_desired])
        assert store.device(D1).properties["count"].desired == 8
        # Origin not known (a twin file from before it was recorded), the row active: nothing dropped.
        store.conn.execute("UPDATE devices SET origin=NULL")
        store.sync_devices([edge])
        assert store.device(D1).properties["count"].desired == 8
        assert store.conn.execute("SELECT origin FROM devices WHERE id=?", (str(D1),)).fetchone()[0] == "edgecore"


def test_an_inactive_row_of_unknown_origin_taken_up_drops_its_desired_values(tmp_path, caplog):
    """A twin file from before origins were recorded: edgecore's default/d1 had a desired value
    and was removed before the upgrade (inactive, origin NULL; the upgraded mapper's syncs never
    meet it). Weeks later the operator's local d1 takes the name: counted as an origin change (the
    old value dropped, a new version, nothing pending, logged once), not applied to their device.
    A row of unknown origin that is active keeps its values (the test above)."""
    import dataclasses

    D2 = DeviceId("default", "d2")
    devices = write_devices(tmp_path / "devices", ["d1", "d2"])
    defs = load([devices]).devices
    local1, local2 = defs[D1], defs[D2]
    edge1 = dataclasses.replace(local1, source="dmi:Device default/d1")
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as store:
        store.sync_devices([edge1, local2])
        _, version = store.set_desired(D1, "count", 77)
        store.sync_devices([local2])
        store.deactivate_devices([D2])  # edgecore's d1 removed
        store.conn.execute("UPDATE devices SET origin=NULL")  # as written before m006
    with TwinStore.open(path) as store:  # upgraded: runs with d2 only, d1 stays inactive and NULL
        store.sync_devices([local2])
        store.deactivate_devices([D2])
        assert store.recorded_origin(D1) == (None, False)
        assert store.sync_devices([local1, local2]) == [D1]  # the operator's d1.yaml, reloaded
        count = store.device(D1).properties["count"]
        assert count.desired is None and count.desired_version == version + 1
        assert [c for c in store.pending_desired() if c.device_id == D1] == []
        assert store.recorded_origin(D1) == ("local", True)
        said = [r.getMessage() for r in caplog.records if "dropped, not applied" in r.getMessage()]
        assert len(said) == 1 and "count=77" in said[0] and "does not know" in said[0], said
        store.set_desired(D1, "count", 5)
        store.sync_devices([local1, local2])
        assert store.device(D1).properties["count"].desired == 5
        assert len([r for r in caplog.records if "dropped, not applied" in r.getMessage()]) == 1


def test_a_retained_state_message_supersedes_the_older_ones_of_its_topic_waiting_in_the_outbox(tmp_path):
    """A device flapping through a broker outage queued an availability and a state view per
    change, kind "state", never dropped by the outbox limits: once they alone were over
    twin.outbox_max_rows, every reading was dropped as soon as it was queued, and every stale
    one was sent at the reconnect. Now a retained state message deletes the older rows of its
    topic still waiting (in its own transaction): one per topic waits, the readings under the
    limit all stay, nothing is counted as dropped, and a restarted store holds the same. Rows
    that are not retained state (a twin reply, a non-retained state message) are left alone."""
    import sqlite3

    devices = load([write_devices(tmp_path / "devices", ["d1"])]).devices.values()
    path = tmp_path / "o.db"
    base = "mapper/n/default/d1"

    def availability(i: int) -> OutMessage:
        return OutMessage(f"{base}/availability", b"online" if i % 2 else b"offline", retain=True, kind="state")

    def view(i: int) -> OutMessage:
        return OutMessage(f"{base}/state", {"count": i, "state": "ok" if i % 2 else "unhealthy"}, retain=True,
                          kind="state")

    with TwinStore.open(path, outbox=OutboxLimits(max_rows=20)) as store:
        store.sync_devices(devices)
        store.record([], [OutMessage("$hw/events/device/default/d1/twin/update/document", {"n": 0}, kind="twin",
                                     sequenced=False),
                          OutMessage(f"{base}/note", {"n": 0}, kind="state")])  # not retained: stays
        first = store.record([], [availability(0), view(0)])  # taken by the publisher: in flight
        change = 0
        for i in range(1, 16):  # 15 readings, 8 state changes after each: 240 state messages
            reading = Reading(D1, "count", i, 1000 + i)
            store.record([reading], [OutMessage(f"{base}/count", {}, reading=reading)])
            for _ in range(8):
                change += 1
                store.set_state(D1, "ok" if change % 2 else "unhealthy", None, [availability(change), view(change)])
            # Two of a topic in one batch: only the last is queued.
            change += 1
            rows = store.record([], [availability(change - 1), view(change - 1), availability(change), view(change)])
            assert [r.topic for r in rows] == [f"{base}/availability", f"{base}/state"]

        def outbox(s: TwinStore) -> list[tuple[int, str, bytes, str]]:
            return [(r.id, r.topic, r.payload, r.kind) for r in s.outbox_pending(limit=1000)]

        kept = outbox(store)
        telemetry = [orjson.loads(p)["seq"] for _, t, p, _ in kept if t == f"{base}/count"]
        assert telemetry == list(range(1, 16))  # no reading dropped: under the limit without the stale states
        assert [(t, p) for _, t, p, k in kept if k == "state" and t != f"{base}/note"] == [
            (f"{base}/availability", b"online" if change % 2 else b"offline"),
            (f"{base}/state", orjson.dumps({"count": change, "state": "ok" if change % 2 else "unhealthy",
                                            "seq": 1 + 15 * 10}))]  # (superseded ones used theirs)
        assert [k for _, t, _, k in kept if t.endswith(("/note", "/update/document"))] == ["twin", "state"]
        assert kept == sorted(kept)  # in id order: the newest state after the readings queued before it
        stats = store.outbox_stats()
        assert stats == {"depth": len(kept), "bytes": sum(len(p) for _, _, p, _ in kept), "dropped": 0}
        # The rows in flight when they were superseded are acknowledged: nothing to delete, nothing miscounted.
        store.outbox_sent([r.id for r in first])
        assert outbox(store) == kept and store.outbox_stats() == stats
        # A transaction that fails after superseding puts the superseded rows back.
        with pytest.raises(RuntimeError), store.transaction():
            store.enqueue([availability(change + 1), view(change + 1)])
            raise RuntimeError("boom")
        assert outbox(store) == kept and store.outbox_stats() == stats
    with TwinStore.open(path, outbox=OutboxLimits(max_rows=20)) as again:
        assert outbox(again) == kept
        assert again.outbox_stats() == stats
    # A twin from before: several rows of a retained topic waiting. The next one supersedes them all.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        top = max(i for i, *_ in kept)
        db.executemany("INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts)"
                       " VALUES (?,?,?,1,1,'state',0)",
                       [(top + 1, f"{base}/availability", b"online"), (top + 2, f"{base}/availability", b"offline")])
    with TwinStore.open(path, outbox=OutboxLimits(max_rows=20)) as again:
        assert [t for _, t, _, _ in outbox(again)].count(f"{base}/availability") == 3
        (row,) = again.record([], [availability(1)])
        now = outbox(again)
        assert [(i, p) for i, t, p, _ in now if t == f"{base}/availability"] == [(row.id, b"online")]
        assert again.outbox_stats() == {"depth": len(now), "bytes": sum(len(p) for _, _, p, _ in now), "dropped": 0}
        assert again.losses()["outbox_dropped"] == 0
