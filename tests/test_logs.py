"""Log lines for refused input (and for the outbox's drops) are throttled; the counters keep every one."""

from __future__ import annotations

import logging

import pytest

from mapper.config import TwinSettings
from mapper.logs import Throttle, held_note
from mapper.service import OutboxDropLog
from twin.store import OutboxLimits, OutMessage, TwinStore


def test_throttle_lets_a_burst_through_then_says_how_many_it_held_back():
    now = [100.0]
    throttle = Throttle(burst=3, interval_s=60.0, clock=lambda: now[0])
    assert [throttle("malformed") for _ in range(5)] == [0, 0, 0, None, None]
    assert throttle("unknown") == 0  # another key has its own allowance
    now[0] += 59.0
    assert throttle("malformed") is None
    now[0] += 1.0  # a new window: the first line carries what was held back
    assert throttle("malformed") == 3
    assert throttle("malformed") == 0
    assert held_note(3) == " (3 more like this not logged)" and held_note(0) == ""



def test_outbox_drops_are_logged_when_they_start_then_a_line_a_minute_with_the_count_since_the_last(
        tmp_path, caplog):
    """The twin's outbox limits drop the oldest telemetry after each commit that goes over them
    (TwinStore.on_outbox_dropped, one call a commit): the first drop is a WARNING at once, naming
    the limit hit; later ones wait for the minute to pass and then say how many since the last
    line (and in all); the drops of an outage's last minute come out at the next flush. A run of
    drops after a quiet minute is a new start, logged at once. A rolled-back drop is no drop."""
    now = [1000.0]
    drops = OutboxDropLog(TwinSettings(outbox_max_rows=100, outbox_max_bytes=70_000), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="mapper.service")

    def lines() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.name == "mapper.service"]
        caplog.clear()
        return found

    with TwinStore.open(tmp_path / "o.db", outbox=OutboxLimits(max_rows=100, max_bytes=70_000)) as store:
        store.on_outbox_dropped = drops.dropped
        store.record([], [OutMessage("tele", {"n": i}) for i in range(103)])  # 3 over the rows
        (first,) = lines()
        assert first.startswith("outbox full at twin.outbox_max_rows (100 messages): the oldest telemetry is dropped,"
                                " 3 messages so far. The broker does not take the messages (unreachable? see the MQTT"
                                " connection lines, mapper.mqtt)"), first
        assert first.endswith("raise twin.outbox_max_rows"), first
        for _ in range(5):  # within the minute: counted, not logged
            now[0] += 10.0
            store.record([], [OutMessage("tele", {"n": 0}) for _ in range(2)])
        assert lines() == []
        with pytest.raises(ZeroDivisionError), store.transaction():  # rolled back: nothing was dropped
            store.enqueue([OutMessage("tele", {"n": 0}) for _ in range(50)])
            raise ZeroDivisionError
        now[0] += 10.0
        store.record([], [OutMessage("tele", {"pad": "x" * 1000}) for _ in range(70)])  # over the rows and the bytes
        total = store.outbox_stats()["dropped"]  # as counted in the twin
        assert total == drops.total > 3 + 10 + 70
        assert lines() == [
            f"outbox: {total - 3} more telemetry messages dropped at twin.outbox_max_rows (100 messages) and"
            f" twin.outbox_max_bytes (70000 bytes) since the last line, {total} since the start (the broker does not"
            " take them: see the mapper.mqtt lines; or raise twin.outbox_max_rows or twin.outbox_max_bytes)"]
        now[0] += 30.0
        store.outbox_sent([r.id for r in store.outbox_pending(limit=1000)])  # the broker took them: empty again
        store.record([], [OutMessage("tele", {"n": 0}) for _ in range(101)])  # the outage's last drop: held back ...
        more = store.outbox_stats()["dropped"] - total
        assert more == 1
        drops.flush()
        assert lines() == []
        now[0] += 30.0  # ... until the minute has passed: the next flush (once a minute) says it
        drops.flush()
        assert lines() == ["outbox: 1 more telemetry message dropped at twin.outbox_max_rows (100 messages) since the"
                           f" last line, {total + more} since the start (the broker does not take them: see the"
                           " mapper.mqtt lines; or raise twin.outbox_max_rows)"]
        drops.flush()
        assert lines() == []  # nothing new, nothing said
        now[0] += 61.0  # a quiet minute: the next drop is a new start
        store.record([], [OutMessage("tele", {"n": 0})])
        (again,) = lines()
        assert again.startswith("outbox full at twin.outbox_max_rows (100 messages): the oldest telemetry is dropped,"
                                " 1 message so far."), again
