"""The history as the twin's log: telemetry carried in history rows, the published cursor,
reported values folded at checkpoints, and what survives a crash (a connection closed
without TwinStore.close(), as after kill -9: nothing of close() runs)."""

from __future__ import annotations

import sqlite3

import orjson
import pytest

from devices.ids import DeviceId
from devices.loader import load
from twin.records import ERROR, Reading
from twin.store import OUTBOX_DEPTH_SQL, OutboxLimits, OutMessage, TwinStore, committed_seqs
from helpers import write_devices

D1 = DeviceId("default", "d1")
UNIT = {"unit": "Celsius"}  # the telemetry factory's body of a carried message: the fields after value and ts


def telemetry(readings: list[Reading]) -> list[OutMessage]:
    return [OutMessage(f"t/{r.property}", UNIT, reading=r) for r in readings]


def crash(store: TwinStore) -> None:
    store.conn.close()  # no checkpoint, no seq saved: what kill -9 leaves


@pytest.fixture
def path(tmp_path):
    result = load([write_devices(tmp_path / "devices", ["d1", "d2"])])
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(result.devices.values())
    return tmp_path / "twin.db"


def test_telemetry_rides_in_its_reading_row_and_is_sent_again_after_a_crash(path):
    """No outbox row per reading: the message is rebuilt from the history row, byte for byte."""
    store = TwinStore.open(path)
    batch = [Reading(D1, "temperature", 21.5, 1000), Reading(D1, "count", 7, 1001)]
    rows = store.record(batch, telemetry(batch))
    assert [(r.topic, r.payload) for r in rows] == [
        ("t/temperature", b'{"value":21.5,"ts":1000,"unit":"Celsius","seq":1}'),
        ("t/count", b'{"value":7,"ts":1001,"unit":"Celsius","seq":1}')]
    assert store.conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    crash(store)
    with TwinStore.open(path) as again:
        assert again.outbox_pending() == rows
        assert again.outbox_stats()["depth"] == 2
        assert again.conn.execute(OUTBOX_DEPTH_SQL).fetchone()[0] == 2
        r = Reading(D1, "temperature", 22.0, 2000)
        (row,) = again.record([r], telemetry([r]))
        assert row.payload == b'{"value":22.0,"ts":2000,"unit":"Celsius","seq":2}'  # the seq went on


def test_acknowledged_telemetry_moves_the_cursor_and_stays_sent_after_a_crash(path):
    """Acks out of order: the cursor stops at the oldest unacknowledged message; after a crash
    that one and the ones above it come again (QoS 1 duplicates, seq reveals them), never the
    ones below."""
    store = TwinStore.open(path)
    batch = [Reading(D1, "count", i, 1000 + i) for i in range(3)]
    first, second, third = store.record(batch, telemetry(batch))
    store.outbox_sent([first.id, third.id])
    assert store.outbox_pending() == [second]
    assert store.outbox_stats()["depth"] == 1
    crash(store)
    store = TwinStore.open(path)
    assert [r.id for r in store.outbox_pending()] == [second.id, third.id]
    store.outbox_sent([second.id, third.id])
    assert store.outbox_stats()["depth"] == 0
    crash(store)
    with TwinStore.open(path) as again:
        assert again.outbox_pending() == []
        assert again.conn.execute(OUTBOX_DEPTH_SQL).fetchone()[0] == 0


def test_reported_values_are_exact_across_checkpoints_crashes_and_readers(path):
    """`properties` is written at most once per CHECKPOINT_MS; every reader sees every committed
    reading anyway, another process's store never folds them a second time, and after a crash
    the versions count each good reading once."""
    store = TwinStore.open(path)
    store.record([Reading(D1, "temperature", 20.0, 1000)])                        # checkpointed at once
    store.record([Reading(D1, "temperature", 21.0, 2000), Reading(D1, "temperature", 22.0, 3000),
                  Reading(D1, "count", None, 3000, ERROR, "timeout")])             # within CHECKPOINT_MS: not yet
    stored = store.conn.execute(
        "SELECT reported, reported_version FROM properties WHERE device_id=? AND name='temperature'", (str(D1),)).fetchone()
    assert stored == ("20.0", 1)
    with TwinStore.open(path) as reader:  # another process, e.g. `mapper twin get`
        twin = reader.device(D1)
        temperature, count = twin.properties["temperature"], twin.properties["count"]
        assert (temperature.reported, temperature.reported_version, temperature.reported_ts) == (22.0, 3, 3000)
        assert (count.quality, count.quality_detail, twin.last_reading_ts) == (ERROR, "timeout", 3000)
        assert store.device(D1) == twin  # the recording store answers from its fold in memory: the same
    crash(store)
    with TwinStore.open(path) as after:
        after.record([Reading(D1, "temperature", 23.0, 4000)])
        assert after.device(D1).properties["temperature"].reported_version == 4
    with TwinStore.open(path) as last:
        stored = last.conn.execute(
            "SELECT reported, reported_version FROM properties WHERE device_id=? AND name='temperature'",
            (str(D1),)).fetchone()
        assert stored == ("23.0", 4)  # close() folded the rest, each reading once
        assert last.device(D1).properties["count"].quality_detail == "timeout"


def test_a_failed_batch_leaves_no_trace_in_memory_either(path):
    """A batch that fails half way (its rows and messages written, then an error) commits nothing:
    no reported value, no queued message, no seq handed out, and the next batch counts right."""
    with TwinStore.open(path) as store:
        assert store.record([Reading(D1, "count", 1, 1000)]) == []  # a reading without telemetry sends nothing
        good = Reading(D1, "count", 2, 2000)
        with pytest.raises(TypeError):
            store.record([good], [OutMessage("t/count", UNIT, reading=good), OutMessage("t/x", {"v": object()})])
        assert store.device(D1).properties["count"].reported == 1
        assert store.outbox_stats()["depth"] == 0 and store.outbox_pending() == []
        again = Reading(D1, "count", 3, 3000)
        (row,) = store.record([again], telemetry([again]))
        assert row.payload == b'{"value":3,"ts":3000,"unit":"Celsius","seq":1}'
        assert store.device(D1).properties["count"].reported_version == 2
    with TwinStore.open(path) as again:  # close() folded what it held in memory: the failed batch is not in it
        count = again.device(D1).properties["count"]
        assert (count.reported, count.reported_version, count.reported_ts) == (3, 2, 3000)


def test_a_message_whose_reading_is_not_in_the_batch_is_sent_whole(path):
    with TwinStore.open(path) as store:
        elsewhere = Reading(D1, "count", 5, 5000)
        (row,) = store.record([Reading(D1, "count", 6, 6000)], [OutMessage("t/count", UNIT, reading=elsewhere)])
        assert row.payload == b'{"value":5,"ts":5000,"unit":"Celsius","seq":1}'
        assert store.conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1


def test_messages_out_of_reading_order_still_go_out_each_with_its_reading(path):
    with TwinStore.open(path) as store:
        first, second = Reading(D1, "count", 1, 1000), Reading(D1, "temperature", 20.5, 1001)
        rows = store.record([first, second], [OutMessage("t/temperature", UNIT, reading=second),
                                              OutMessage("t/count", UNIT, reading=first)])
        assert sorted((r.topic, r.payload) for r in rows) == [
            ("t/count", b'{"value":1,"ts":1000,"unit":"Celsius","seq":1}'),
            ("t/temperature", b'{"value":20.5,"ts":1001,"unit":"Celsius","seq":1}')]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert store.outbox_pending() == rows


def test_pruning_keeps_unsent_telemetry_and_saves_the_seqs_it_deletes(path):
    """History rows whose message is not acknowledged stay (and so do the rows after them); once
    pruned, the seqs they held live on in topic_seq."""
    store = TwinStore.open(path)
    batch = [Reading(D1, "count", i, 1000 + i) for i in range(10)]  # all far too old
    rows = store.record(batch, telemetry(batch))
    store.outbox_sent([r.id for r in rows[:4]])
    assert store.prune_history(max_rows=1000, max_age_ms=1000) == 4
    assert [r.id for r in store.outbox_pending()] == [r.id for r in rows[4:]]
    store.outbox_sent([r.id for r in rows[4:]])
    assert store.prune_history(max_rows=1000, max_age_ms=1000) == 6
    crash(store)
    with TwinStore.open(path) as again:
        assert committed_seqs(again.conn)["t/count"] == 10
        r = Reading(D1, "count", 11, 9000)
        (row,) = again.record([r], telemetry([r]))
        assert row.payload.endswith(b'"seq":11}')


def test_a_twin_file_of_schema_4_keeps_its_history_folded_and_sent(tmp_path):
    """History written before m005 was folded into `properties` and published already: after the
    upgrade nothing of it counts twice or goes out again."""
    from twin import migrations

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version, step in enumerate(migrations.MIGRATIONS[:4], start=1):
        step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO devices (id, namespace, name, model, protocol) VALUES ('default/d1','default','d1','m','sim')")
    conn.execute("INSERT INTO properties (device_id, name, type, writable, reported, reported_version, reported_ts, quality)"
                 " VALUES ('default/d1', 'count', 'int', 0, '3', 3, 3000, 'good')")
    conn.executemany("INSERT INTO readings (device_id, property, value, ts, quality) VALUES ('default/d1','count',?,?,'good')",
                     [(str(i), i * 1000) for i in (1, 2, 3)])
    conn.close()
    with TwinStore.open(path) as store:
        assert store.device(D1).properties["count"].reported_version == 3
        assert store.outbox_stats()["depth"] == 0
        r = Reading(D1, "count", 4, 4000)
        (row,) = store.record([r], telemetry([r]))
        assert row.id > 3  # after every id the old history used
        assert store.device(D1).properties["count"].reported_version == 4
        assert store.integrity_ok()


def test_another_process_writing_desired_values_neither_folds_nor_rewinds_seqs(path):
    """`mapper twin set` opens its own store while the mapper records: its close() must not fold
    the mapper's readings (they would count twice) nor write back seqs older than the mapper's."""
    mapper = TwinStore.open(path)
    first = [Reading(D1, "count", 1, 1000)]
    mapper.record(first, telemetry(first))                   # folded at once
    second = [Reading(D1, "count", 2, 2000)]
    mapper.record(second, telemetry(second))                 # not yet folded
    cli = TwinStore.open(path)
    cli.set_desired(D1, "power", True, messages=[OutMessage("t/power", {"v": True})])
    cli.close()
    third = [Reading(D1, "count", 3, 3000)]
    mapper.record(third, telemetry(third))
    mapper.close()
    with TwinStore.open(path) as again:
        count = again.device(D1).properties["count"]
        assert (count.reported, count.reported_version) == (3, 3)
        assert again.conn.execute(
            "SELECT reported_version FROM properties WHERE device_id=? AND name='count'", (str(D1),)).fetchone()[0] == 3
        assert committed_seqs(again.conn)["t/count"] == 3
        assert dict(again.conn.execute("SELECT topic, seq FROM topic_seq"))["t/count"] == 3


def test_seqs_recovered_after_a_crash_are_saved_before_their_rows_go(path):
    """A topic silent after a crash-restart still keeps its seq once its rows are pruned and
    the mapper restarts again."""
    store = TwinStore.open(path)
    batch = [Reading(D1, "temperature", 20.0 + i, 1000 + i) for i in range(5)]
    rows = store.record(batch, telemetry(batch))
    store.outbox_sent([r.id for r in rows])
    crash(store)                                              # seqs 1..5 only in history rows
    store = TwinStore.open(path)
    other = Reading(D1, "count", 1, 2000)
    store.record([other], telemetry([other]))                 # temperature stays silent
    assert store.prune_history(max_rows=1000, max_age_ms=0) == 5
    crash(store)
    with TwinStore.open(path) as again:
        r = Reading(D1, "temperature", 99.0, 9000)
        (row,) = again.record([r], telemetry([r]))
        assert row.payload.endswith(b'"seq":6}')


def test_a_rolled_back_transaction_gives_back_what_the_limits_dropped(path):
    """The outbox limits dropped the oldest message inside a transaction that then failed: it is
    queued again, and not counted as dropped."""
    store = TwinStore.open(path, outbox=OutboxLimits(max_rows=3))
    batch = [Reading(D1, "count", i, 1000 + i) for i in range(3)]
    rows = store.record(batch, telemetry(batch))
    with pytest.raises(RuntimeError), store.transaction():
        r = Reading(D1, "count", 99, 2000)
        store.record([r], telemetry([r]))                    # over the limit: rows[0] goes
        raise RuntimeError("a later step of the transaction fails")
    assert store.outbox_pending() == rows
    assert store.outbox_stats() == {"depth": 3, "bytes": sum(len(r.payload) for r in rows), "dropped": 0}
    store.outbox_sent([rows[2].id])                           # the cursor must not pass rows[0]
    crash(store)
    with TwinStore.open(path) as again:  # (rows[2] was acknowledged above the cursor: sent again, a duplicate)
        assert [r.id for r in again.outbox_pending()] == [r.id for r in rows]
        assert again.outbox_stats()["dropped"] == 0


def test_a_full_disk_half_way_through_a_batch_counts_nothing(path):
    """The history INSERT fails (disk full): nothing of the batch is shown or folded, and the
    recorder's retry of the same batch counts each reading once."""
    store = TwinStore.open(path)
    first = Reading(D1, "count", 0, 1000)
    store.record([first], telemetry([first]))
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count={pages}")
    batch = [Reading(D1, "count", i, 2000 + i) for i in range(1, 3001)]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.record(batch, telemetry(batch))
    count = store.device(D1).properties["count"]
    assert (count.reported, count.reported_version) == (0, 1)
    assert store.outbox_stats()["depth"] == 1 and store.outbox_stats()["bytes"] > 0
    store.conn.execute("PRAGMA max_page_count=1073741823")   # space again: the batch is retried
    store.record(batch, telemetry(batch))
    store.close()
    with TwinStore.open(path) as again:
        assert again.device(D1).properties["count"].reported_version == 3001


class _Fetched:
    def __init__(self, row: tuple) -> None:
        self._row = row

    def fetchone(self) -> tuple:
        return self._row


class _Interleaved:
    """A reader's connection that lets the recording store commit right after the reader's first
    statement (a deterministic interleaving of two processes)."""

    def __init__(self, conn: sqlite3.Connection, between) -> None:  # noqa: ANN001
        self._conn, self._between = conn, between

    def execute(self, sql: str, *args):  # noqa: ANN201
        cursor = self._conn.execute(sql, *args)
        if self._between is not None and sql.lstrip().startswith("SELECT model"):
            row = cursor.fetchone()
            between, self._between = self._between, None
            between()
            return _Fetched(row)
        return cursor

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._conn, name)


def test_another_process_reads_one_snapshot_while_the_mapper_folds(path, monkeypatch):
    """A fold committed between the reader's statements must not hide readings from it: it sees
    the twin as of one moment, never older than what it had already seen."""
    import twin.store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_MS", 0)  # the next commit folds
    mapper = TwinStore.open(path)
    mapper.record([Reading(D1, "count", 1, 1000)])
    monkeypatch.setattr(store_module, "CHECKPOINT_MS", 3_600_000)
    mapper.record([Reading(D1, "count", 2, 2000)])           # in history only
    reader = TwinStore.open(path)

    def mapper_folds() -> None:
        monkeypatch.setattr(store_module, "CHECKPOINT_MS", 0)
        mapper.record([Reading(D1, "count", 3, 3000)])       # folds 2 and 3 into properties

    reader.conn = _Interleaved(reader.conn, mapper_folds)
    count = reader.device(D1).properties["count"]
    assert (count.reported, count.reported_version) == (2, 2)  # as of its snapshot: not 1
    count = reader.device(D1).properties["count"]
    assert (count.reported, count.reported_version) == (3, 3)
    reader.close()
    mapper.close()


def test_one_unacknowledged_message_does_not_stop_pruning_the_rest(path):
    """Broker away: the readings that publish nothing still go by the history limits; the one
    waiting for its acknowledgement stays."""
    import time

    now = int(time.time() * 1000)
    with TwinStore.open(path) as store:
        waiting = Reading(D1, "count", 0, now)
        (row,) = store.record([waiting], telemetry([waiting]))
        store.record([Reading(D1, "temperature", 20.0, now + 1 + i) for i in range(500)])  # no telemetry
        assert store.prune_history(max_rows=100, max_age_ms=3_600_000_000) == 400  # the 401 oldest but one
        assert store.outbox_pending() == [row]
        assert len(store.history(D1, "temperature", limit=1000)) == 100
        assert store.history(D1, "count") == [(now, 0, "good")]


def test_a_prune_with_nothing_to_delete_still_bounds_what_a_restart_reads_back(path):
    """Every prune saves the seqs and moves the published cursor over a drained queue, so after
    a crash the restart reads back only what came since."""
    store = TwinStore.open(path)
    batch = [Reading(D1, "count", i, 10**13 + i) for i in range(3)]  # young: nothing to prune
    rows = store.record(batch, telemetry(batch))
    store.outbox_sent([r.id for r in rows])
    store.record([Reading(D1, "temperature", 20.0, 10**13 + 5)])    # no telemetry
    assert store.prune_history(max_rows=1000, max_age_ms=1000) == 0
    counters = dict(store.conn.execute("SELECT name, value FROM counters"))
    assert counters["seq_saved_through"] >= rows[-1].id and counters["published_through"] >= rows[-1].id
    assert dict(store.conn.execute("SELECT topic, seq FROM topic_seq"))["t/count"] == 3
    crash(store)
    with TwinStore.open(path) as again:  # what the restart reads back: nothing to send again, seq goes on
        assert again.outbox_pending() == []
        r = Reading(D1, "count", 3, 10**13 + 6)
        (row,) = again.record([r], telemetry([r]))
        assert orjson.loads(row.payload)["seq"] == 4


def test_two_processes_opening_at_once_migrate_once(path):
    """The mapper starting while `mapper twin get` polls: the second one read the schema version
    before the first had migrated. It must look again under the write lock, not apply the
    migrations a second time."""
    from twin import migrations

    class StaleFirstRead:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn, self.stale = conn, True

        def execute(self, sql: str, *args):  # noqa: ANN201
            if self.stale and sql == "PRAGMA user_version":
                self.stale = False
                return self.conn.execute("SELECT 4")  # what it read before the other process migrated
            return self.conn.execute(sql, *args)

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrations.apply(StaleFirstRead(conn)) == len(migrations.MIGRATIONS)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
    finally:
        conn.close()
    with TwinStore.open(path) as store:
        assert store.integrity_ok()


def test_another_process_opens_one_snapshot_while_the_mapper_records(path, monkeypatch):
    """`mapper twin get` opening while the mapper commits a reading on a new topic between the
    reader's statements: the reader sees the state before or after it, never half of it."""
    mapper = TwinStore.open(path)
    first = Reading(D1, "count", 1, 1000)
    mapper.record([first], telemetry([first]))
    count_table = TwinStore._count_outbox_table
    calls = []

    def mapper_commits_between(self: TwinStore) -> None:
        if self is not mapper and not calls:
            calls.append(1)
            r = Reading(D1, "temperature", 20.0, 2000)
            mapper.record([r], telemetry([r]))               # a new route, and a row using it
        count_table(self)

    monkeypatch.setattr(TwinStore, "_count_outbox_table", mapper_commits_between)
    with TwinStore.open(path) as reader:                      # read its routes before that commit
        assert calls and reader.outbox_stats()["depth"] == 1   # as of its snapshot
    monkeypatch.setattr(TwinStore, "_count_outbox_table", count_table)
    with TwinStore.open(path) as reader:
        assert reader.outbox_stats()["depth"] == 2
    mapper.close()


def _history_ts(store: TwinStore) -> list[int]:
    return [ts for (ts,) in store.conn.execute("SELECT ts FROM readings ORDER BY id")]


def _reported(store: TwinStore, name: str) -> tuple[str, int]:
    return store.conn.execute("SELECT reported, reported_version FROM properties WHERE device_id=? AND name=?",
                              (str(D1), name)).fetchone()


def test_a_wall_clock_jumping_ahead_does_not_delete_the_history(path, monkeypatch, caplog):
    """The wall clock jumps ahead by more than twin.history_age_s (a Pi without a real-time
    clock, a wrong date typed in). The whole history went at the next prune, readings never
    published included (their telemetry held back, or none). Now the age is judged on the time
    elapsed since the twin was opened (monotonic): only the count rule deletes, until the
    readings are really that old; the log says the clock is ahead."""
    import time

    import twin.store as store_module

    caplog.set_level("INFO", logger="mapper.twin")
    max_age_ms = 1_500
    store = TwinStore.open(path)
    real = store_module.now_ms
    taken = real()
    recorded = time.monotonic()
    store.record([Reading(D1, "count", i, taken + i) for i in range(10)])
    monkeypatch.setattr(store_module, "now_ms", lambda: real() + 8 * 86_400_000)  # eight days ahead
    assert store.prune_history(max_rows=7, max_age_ms=max_age_ms) == 3  # the count rule's, no more
    assert _history_ts(store) == [taken + i for i in range(3, 10)]
    assert any("ahead of the time elapsed since the twin was opened" in r.getMessage() for r in caplog.records)
    # Once the readings are really older than max_age_ms (monotonic), the age rule takes them.
    deadline = recorded + 10
    while _history_ts(store):
        assert time.monotonic() < deadline, "the age rule never deleted the readings"
        if store.prune_history(max_rows=7, max_age_ms=max_age_ms):
            assert time.monotonic() - recorded >= max_age_ms / 1000 - 0.01  # not before they were that old
        else:
            time.sleep(0.05)
    store.close()


def test_the_age_rule_says_when_it_deletes_many_readings_at_once(path, caplog):
    """Readings from a run two hours ago, with an age limit of one hour: the first prune deletes
    them, and says how many and by which rule (it was silent). Readings ageing out as they
    come, a prune period's worth at a time, are not logged."""
    import time

    import twin.store as store_module

    caplog.set_level("INFO", logger="mapper.twin")
    hour = 3_600_000
    now = store_module.now_ms()
    with TwinStore.open(path) as store:
        store.record([Reading(D1, "count", i, now - 2 * hour + i) for i in range(50)])
        store.record([Reading(D1, "count", 100 + i, now - hour + 1_000 + i) for i in range(5)])  # young a while yet
        assert store.prune_history(max_rows=1000, max_age_ms=hour, step=20) == 20  # a pass in steps
        assert store.prune_history(max_rows=1000, max_age_ms=hour, step=20) == 20
        assert not any("for their age" in r.getMessage() for r in caplog.records)  # (the pass goes on)
        assert store.prune_history(max_rows=1000, max_age_ms=hour, step=20) == 10
        lines = [r for r in caplog.records if "for their age" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelname == "INFO", lines
        assert "deleted 50 readings from the twin's history for their age (twin.history_age_s: 3600 s)" \
            in lines[0].getMessage()
        time.sleep(max(0.0, (now + 1_010 - store_module.now_ms()) / 1000))
        assert store.prune_history(max_rows=1000, max_age_ms=hour, step=20) == 5  # aged out since the last pass
        assert len([r for r in caplog.records if "for their age" in r.getMessage()]) == 1


def test_the_fold_into_properties_goes_on_after_the_clock_went_back(path, monkeypatch):
    """`properties` is written once per CHECKPOINT_MS: an interval, measured on the wall clock
    before, so a clock set back an hour stopped the folds for an hour (readers still saw the
    readings, folding the history themselves, ever more of it)."""
    import time

    import twin.store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_MS", 100)
    with TwinStore.open(path) as store:
        store.record([Reading(D1, "count", 1, 1000)])  # folded at once
        assert _reported(store, "count") == ("1", 1)
        real = store_module.now_ms
        monkeypatch.setattr(store_module, "now_ms", lambda: real() - 3_600_000)
        time.sleep(0.15)
        store.record([Reading(D1, "count", 2, 2000)])
        assert _reported(store, "count") == ("2", 2)
