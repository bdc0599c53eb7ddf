"""The twin thread notices commits by another process (`mapper twin set`) without a hop per poll."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from devices.ids import DeviceId
from devices.loader import load
from mapper.store_worker import StoreWorker
from twin.records import Reading
from twin.store import TwinStore
from helpers import async_wait_for, write_devices

LAMP = DeviceId("default", "lamp")


def _lamp_twin(tmp_path: Path) -> Path:
    """A twin file that knows the simulated device `lamp`."""
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as setup:
        setup.sync_devices(load([write_devices(tmp_path / "devices", ["lamp"])]).devices.values())
    return path


async def test_known_version_changes_only_when_another_process_commits(tmp_path):
    path = _lamp_twin(tmp_path)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        first = await worker.data_version()
        assert worker.known_version() == first  # nothing written since: no hop needed

        # Our own commits change the files but not data_version, and the worker's note follows them.
        await worker.call(lambda s: s.record([Reading(LAMP, "count", 1, 1_000)]))
        assert worker.known_version() == first

        # Another connection (the CLI) commits a desired value: the files no longer match the note.
        with TwinStore.open(path) as cli:
            cli.set_desired(LAMP, "power", True)
        assert worker.known_version() is None
        second = await worker.data_version()
        assert second != first
        assert worker.known_version() == second
        assert [(c.device_id, c.property, c.value) for c in await worker.call(lambda s: s.pending_desired())] == [
            (LAMP, "power", True)]


async def test_group_commit_does_not_wait_for_the_batch_timer_unless_busy(tmp_path):
    """Not busy: a lone reading is committed at once, though batch_delay is a minute. Busy (a batch
    of BUSY_BATCH or more just went by): small batches wait for company, a full one goes at once."""
    import asyncio

    from mapper.recorder import BUSY_BATCH, Recorder

    path = _lamp_twin(tmp_path)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        recorder = Recorder(worker, batch_max=BUSY_BATCH * 2, batch_delay_s=60.0)
        commits: asyncio.Queue[int] = asyncio.Queue()
        recorder.on_commit = lambda batch: commits.put_nowait(len(batch))
        task = asyncio.create_task(recorder.run())
        try:
            recorder.add(Reading(LAMP, "count", 1, 1_000))
            assert await asyncio.wait_for(commits.get(), 5) == 1  # far sooner than the 60 s delay
            for i in range(BUSY_BATCH):
                recorder.add(Reading(LAMP, "count", i, 2_000 + i))
            assert await asyncio.wait_for(commits.get(), 5) == BUSY_BATCH  # added at once: one batch
            # Busy now: a lone reading waits for company (the loop runs the recorder in between,
            # which would commit it alone if it did not wait), and a full batch goes at once.
            recorder.add(Reading(LAMP, "count", 0, 3_000))
            for _ in range(5):
                await asyncio.sleep(0)
            for i in range(1, BUSY_BATCH * 2):
                recorder.add(Reading(LAMP, "count", i, 3_000 + i))
            assert await asyncio.wait_for(commits.get(), 5) == BUSY_BATCH * 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert [r[1] for r in await worker.call(lambda s: s.history(LAMP, "count", limit=1))] == [BUSY_BATCH * 2 - 1]


async def test_commit_interval_gathers_readings_into_one_commit_and_a_flush_does_not_wait(tmp_path):
    """twin.commit_interval_ms (SD-card wear): readings arriving one by one, which the group commit
    would commit one by one (the loop runs the recorder between them), wait for company and commit
    together once the interval is over, or at once at batch_max; a flush (the stop's) commits them
    without waiting for the interval."""
    import asyncio

    from mapper.recorder import Recorder

    async def one_by_one(recorder: Recorder, values: range, ts: int) -> None:
        for i in values:
            recorder.add(Reading(LAMP, "count", i, ts + i))
            for _ in range(5):
                await asyncio.sleep(0)

    path = _lamp_twin(tmp_path)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        for interval_s in (1.0, 600.0):
            recorder = Recorder(worker, batch_max=50, commit_interval_s=interval_s)
            commits: asyncio.Queue[int] = asyncio.Queue()
            recorder.on_commit = lambda batch, commits=commits: commits.put_nowait(len(batch))
            task = asyncio.create_task(recorder.run())
            try:
                await one_by_one(recorder, range(5), 1_000)
                if interval_s == 1.0:  # one commit once the second is over
                    assert await asyncio.wait_for(commits.get(), 30) == 5
                    continue
                await one_by_one(recorder, range(5, 50), 1_000)  # batch_max: at once, not in 10 minutes
                assert await asyncio.wait_for(commits.get(), 30) == 50
                await one_by_one(recorder, range(50, 53), 1_000)
                await asyncio.wait_for(recorder.flush(), 30)
                assert commits.get_nowait() == 3
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert [r[1] for r in await worker.call(lambda s: s.history(LAMP, "count", limit=1))] == [52]


async def test_pre_commit_work_commits_with_its_batch_and_a_failed_batch_is_retried_as_it_was(tmp_path):
    """A pre-commit hook's work (an inference decision) is in the readings' own transaction: when it
    fails, neither the readings nor the work are committed; the retry commits that same batch with
    the same work, and the hook saw each reading exactly once."""
    import pytest

    from mapper.recorder import Extra, Recorder
    from twin.store import OutMessage

    path = _lamp_twin(tmp_path)
    seen: list[int] = []
    attempts: list[int] = []
    done: list[list[str]] = []

    def hook(batch: list[Reading]) -> Extra:
        seen.extend(r.value for r in batch)

        def work(store: TwinStore) -> list[str]:
            attempts.append(len(batch))
            rows = store.enqueue([OutMessage("mapper/test/decision", {"n": len(batch)})])
            if len(attempts) == 1:
                raise OSError("disk full")  # after the readings and the message were written
            return [row.topic for row in rows]

        return Extra(work, done.append)

    def count(sql: str) -> int:
        return worker.call(lambda s: s.conn.execute(sql).fetchone()[0])

    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        recorder = Recorder(worker)
        recorder.pre_commit.append(hook)
        for i in range(3):
            recorder.add(Reading(LAMP, "count", i, 1_000 + i))
        with pytest.raises(OSError, match="disk full"):
            await recorder.flush()
        assert await count("SELECT count(*) FROM readings") == 0
        assert await count("SELECT count(*) FROM outbox") == 0
        assert done == []
        recorder.add(Reading(LAMP, "count", 3, 1_003))  # arrives meanwhile: a batch of its own, after
        await recorder.flush()
        assert seen == [0, 1, 2, 3]                       # each reading through the hook once
        assert attempts == [3, 3, 1]                      # the failed batch again, whole, then the new one
        assert done == [["mapper/test/decision"], ["mapper/test/decision"]]
        assert await count("SELECT count(*) FROM readings") == 4
        assert await count("SELECT count(*) FROM outbox") == 2
        assert [r[1] for r in await worker.call(lambda s: s.history(LAMP, "count", limit=1))] == [3]


async def test_work_that_keeps_failing_is_given_up_and_the_readings_commit_without_it(tmp_path):
    """An extra whose work fails every time (a bug, not a full disk) does not hold the readings
    back for ever: after EXTRA_TRIES failed commits the batch commits alone, the extra's failed()
    gets the error instead of done(), and a second extra that works on its own is still done."""
    import sqlite3

    import pytest

    from mapper.recorder import EXTRA_TRIES, Extra, Recorder
    from twin.store import OutMessage

    path = _lamp_twin(tmp_path)
    done: list[object] = []
    failed: list[BaseException] = []
    seen: list[int] = []

    def broken(store: TwinStore) -> None:
        store.conn.execute("INSERT INTO no_such_table VALUES (1)")

    def fine(store: TwinStore) -> list[str]:
        return [row.topic for row in store.enqueue([OutMessage("mapper/test/decision", {"ok": True})])]

    def hook(batch: list[Reading]) -> Extra:
        seen.extend(r.value for r in batch)
        return Extra(broken, done.append, failed.append)

    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        recorder = Recorder(worker)
        recorder.pre_commit += [hook, lambda batch: Extra(fine, done.append, failed.append)]
        for i in range(3):
            recorder.add(Reading(LAMP, "count", i, 1_000 + i))
        for _ in range(EXTRA_TRIES):
            with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
                await recorder.flush()
            assert await worker.call(lambda s: s.conn.execute("SELECT count(*) FROM readings").fetchone()[0]) == 0
        await recorder.flush()
        assert seen == [0, 1, 2]
        assert done == [["mapper/test/decision"]]
        assert len(failed) == 1 and "no_such_table" in str(failed[0])
        assert [r[1] for r in await worker.call(lambda s: s.history(LAMP, "count", limit=5))] == [0, 1, 2]
        assert await worker.call(lambda s: s.conn.execute("SELECT count(*) FROM outbox").fetchone()[0]) == 1
        recorder.add(Reading(LAMP, "count", 3, 1_003))  # the next batch tries its extras with it again
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await recorder.flush()


async def test_pruning_goes_in_steps_and_readings_commit_between_them(tmp_path, monkeypatch):
    """A large prune is many small transactions on the twin thread: a reading committed while it
    runs waits for one step, not for the whole delete. The result is the same as one delete."""
    import asyncio
    import threading
    import time

    from mapper import service as service_module
    from mapper.config import load_config
    from mapper.service import MapperService
    from helpers import write_config

    monkeypatch.setattr(service_module, "PRUNE_STEP", 100)
    devices = write_devices(tmp_path / "devices", ["lamp"])
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    config = config.model_copy(update={"twin": config.twin.model_copy(update={"history_rows": 1000})})
    path = config.twin.path
    now = int(time.time() * 1000)
    with TwinStore.open(path) as setup:
        setup.sync_devices(load([devices]).devices.values())
        setup.record([Reading(LAMP, "count", i, now + i) for i in range(5000)])  # none too old
    service = MapperService(config)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        service.worker = worker
        # The twin thread held until the prune's first step is queued, and the reading behind it.
        held, release = threading.Event(), threading.Event()
        hold = worker.submit(lambda s: (held.set(), release.wait(10)))
        assert await asyncio.to_thread(held.wait, 10)
        pruning = asyncio.create_task(service.prune_history())
        await async_wait_for(lambda: worker.pending() == 2, what="the first step queued behind the hold")

        def record_and_count(store: TwinStore) -> int:
            store.record([Reading(LAMP, "count", -1, now + 5000)])
            return store.conn.execute("SELECT count(*) FROM readings").fetchone()[0]

        counted = worker.submit(record_and_count)
        release.set()
        await hold
        assert await counted == 5000 - 100 + 1  # after exactly one step
        assert not pruning.done()
        assert await pruning == 4001
        history = await worker.call(lambda s: s.history(LAMP, "count", limit=10_000))
    assert len(history) == 1000 and history[-1][1] == -1 and history[0][1] == 4001


async def test_a_retried_batch_publishes_what_its_first_attempt_would_have(tmp_path):
    """The telemetry factory remembers what it made due. A batch whose commit failed is retried
    with the messages made for it the first time: the reading still carries its telemetry
    message (and the device its state message), with the next seq, and the rows are offered."""
    from eventbus.telemetry import Telemetry
    from eventbus.topics import Topics
    from mapper.recorder import Extra, Recorder

    path = _lamp_twin(tmp_path)
    definitions = load([tmp_path / "devices"]).devices
    offered: list[str] = []
    attempts: list[int] = []

    def fails_once(store: TwinStore) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk full")

    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        recorder = Recorder(worker)
        recorder.message_factory = Telemetry(Topics("test-node"), definitions)
        recorder.on_outbox = lambda rows: offered.extend(row.topic for row in rows)
        recorder.pre_commit.append(lambda batch: Extra(fails_once, lambda _: None))
        recorder.add(Reading(LAMP, "count", 7, 1_000))
        with pytest.raises(OSError, match="disk full"):
            await recorder.flush()
        assert offered == []
        await recorder.flush()
        history = await worker.call(lambda s: s.conn.execute("SELECT value, seq FROM readings").fetchall())
    assert history == [("7", 1)]
    assert sorted(offered) == ["mapper/test-node/default/lamp/count", "mapper/test-node/default/lamp/state"]


async def test_a_flush_cancelled_during_its_commit_commits_once(tmp_path):
    """Cancelling the task that awaits a flush does not stop the twin thread. The commit goes
    through, and the batch is then done (counted, offered), not retried: one history row, one
    telemetry message, one seq."""
    import asyncio
    import threading

    from eventbus.telemetry import Telemetry
    from eventbus.topics import Topics
    from mapper.recorder import Extra, Recorder

    path = _lamp_twin(tmp_path)
    definitions = load([tmp_path / "devices"]).devices
    in_commit, release = threading.Event(), threading.Event()
    offered: list[str] = []
    committed: list[int] = []

    def slow(store: TwinStore) -> None:
        in_commit.set()
        assert release.wait(10)

    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        recorder = Recorder(worker)
        recorder.message_factory = Telemetry(Topics("test-node"), definitions)
        recorder.on_outbox = lambda rows: offered.extend(row.topic for row in rows)
        recorder.on_commit = lambda batch: committed.append(len(batch))
        recorder.pre_commit.append(lambda batch: Extra(slow, lambda _: None) if not committed else None)
        recorder.add(Reading(LAMP, "count", 7, 1_000))
        flushing = asyncio.create_task(recorder.flush())
        assert await asyncio.to_thread(in_commit.wait, 10)
        flushing.cancel()
        # The cancel reaches the flush while the twin thread still commits: cancel() queues the
        # task's wake-up on the loop now, and the commit's end can only be queued after it (the
        # thread hands its result over with call_soon_threadsafe), whenever the thread gets there.
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        assert committed == [1]
        await recorder.flush()  # nothing left to retry
        history = await worker.call(lambda s: s.conn.execute("SELECT value, seq FROM readings").fetchall())
    assert committed == [1]
    assert history == [("7", 1)]
    assert offered.count("mapper/test-node/default/lamp/count") == 1


async def test_stalled_for_counts_only_work_the_thread_has_not_finished(tmp_path):
    """The watchdog's measure (mapper.systemd): nothing waiting is never stalled; a call that does
    not return keeps the worker stalled, and shows where it is; a queued call cancelled before it
    started is forgotten, so it cannot keep the worker "stalled" for good once the thread is free."""
    import asyncio
    import threading

    path = _lamp_twin(tmp_path)
    entered, release = threading.Event(), threading.Event()

    def stuck_call(_store):
        entered.set()
        assert release.wait(30), "never released"

    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        try:
            await worker.call(lambda s: s.record([Reading(LAMP, "count", 1, 1_000)]))
            assert (worker.pending(), worker.stalled_for()) == (0, 0.0)

            blocked = worker.submit(stuck_call)
            assert await asyncio.to_thread(entered.wait, 10)
            queued = worker.submit(lambda s: s.record([Reading(LAMP, "count", 2, 2_000)]))
            given_up = worker.submit(lambda s: s.record([Reading(LAMP, "count", 3, 3_000)]))
            assert worker.pending() == 3
            assert "stuck_call" in (worker.thread_stack() or "")
            given_up.cancel()  # a caller that stopped waiting (its task was cancelled)
            # (The cancel reaches the thread's future through a loop callback.)
            await async_wait_for(lambda: worker.pending() == 2, what="the cancelled call forgotten")

            release.set()
            await asyncio.wait_for(asyncio.gather(blocked, queued), 10)
            assert (worker.pending(), worker.stalled_for()) == (0, 0.0)
        finally:
            release.set()
    with TwinStore.open(path) as check:
        assert [r[1] for r in check.history(LAMP, "count", limit=5)] == [1, 2]


async def test_readings_waiting_for_a_twin_that_cannot_be_written_are_bounded_oldest_dropped_first(tmp_path, caplog):
    """Another process holds the twin's write lock (as a full disk would, every commit fails):
    at most `max_waiting` readings wait in memory; beyond that the oldest go, first from the
    batch whose commit failed (with the telemetry they carry), then from the front of the
    pending ones; the drop is counted, logged once (throttled) and, once the twin can be written,
    saved in its counters, once. What else came with a dropped batch (its extra: an inference
    decision) is committed once, in order, and the readings kept commit in order and are offered."""
    import asyncio
    import logging
    import sqlite3
    import threading

    import orjson

    from eventbus.telemetry import Telemetry
    from eventbus.topics import Topics
    from helpers import async_wait_for
    from mapper.recorder import Extra, Recorder
    from twin.store import OutMessage

    bound = 10
    path = _lamp_twin(tmp_path)
    definitions = load([tmp_path / "devices"]).devices
    seen: list[int] = []          # readings through the pre-commit hook
    done: list[int] = []          # extras done, by the first reading of their batch
    offered: list = []

    def hook(batch: list[Reading]) -> Extra:
        seen.extend(r.value for r in batch)
        first = batch[0].value

        def work(store: TwinStore) -> int:
            store.enqueue([OutMessage("mapper/test/decision", {"first": first}, kind="offload", sequenced=False)])
            return first

        return Extra(work, done.append)

    def reading(i: int) -> Reading:
        return Reading(LAMP, "count", i, 1_000 + i * 60_000)  # a minute apart: each one's telemetry is due

    def count_rows() -> list[tuple[int, int]]:
        return [(orjson.loads(r.payload)["value"], orjson.loads(r.payload)["seq"]) for r in offered
                if r.topic.endswith("/lamp/count")]

    caplog.set_level(logging.WARNING, logger="mapper.recorder")
    lock = sqlite3.connect(path, isolation_level=None)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        await worker.call(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed commit fails at once
        recorder = Recorder(worker, batch_max=4, batch_delay_s=0, max_waiting=bound)
        recorder.message_factory = Telemetry(Topics("test-node"), definitions)
        recorder.on_outbox = offered.extend
        recorder.pre_commit.append(hook)
        gate = threading.Event()
        held = worker.submit(lambda _s: gate.wait(30))  # the twin thread is busy: the next commit waits
        try:
            lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written from here on
            for i in range(3):
                recorder.add(reading(i))
            flush = asyncio.create_task(recorder.flush())
            await async_wait_for(lambda: worker.pending() == 2, what="the batch handed to the twin thread")
            for i in range(3, 3 + bound):  # meanwhile: up to the bound (the batch in the twin thread aside)
                recorder.add(reading(i))
            assert recorder.waiting() == bound and recorder.dropped == 0
            gate.set()
            await held
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await flush
            # The failed batch is back, the oldest: its readings go, not the newer ones.
            assert recorder.waiting() == bound and recorder.dropped == 3
            for i in range(3 + bound, 30):
                recorder.add(reading(i))
                assert recorder.waiting() == bound
            assert recorder.dropped == 30 - bound
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await recorder.flush()  # still locked: retried, nothing more dropped
            assert recorder.waiting() == bound and recorder.dropped == 30 - bound
            warnings = [r.getMessage() for r in caplog.records if "waiting_max_readings" in r.getMessage()]
            assert len(warnings) == 1, warnings  # 20 drops, one line (throttled)
            assert await worker.call(lambda s: s.conn.execute("SELECT count(*) FROM readings").fetchone()[0]) == 0
        finally:
            gate.set()
            if lock.in_transaction:
                lock.execute("ROLLBACK")  # the twin can be written again
            lock.close()
        await recorder.flush()
        assert recorder.waiting() == 0 and recorder.committed == bound
        history = await worker.call(lambda s: s.conn.execute("SELECT value, seq FROM readings ORDER BY id").fetchall())
        decisions = await worker.call(lambda s: s.conn.execute(
            "SELECT payload FROM outbox WHERE topic='mapper/test/decision' ORDER BY id").fetchall())
        dropped = await worker.call(lambda s: s.readings_dropped())
        recorder.add(reading(30))
        await recorder.flush()
        dropped_after = await worker.call(lambda s: s.readings_dropped())
    kept = list(range(30 - bound, 30))
    assert history == [(str(i), n) for n, i in enumerate(kept, 1)]  # the newest, in order, seqs without a gap
    assert count_rows() == [(i, n) for n, i in enumerate(kept, 1)] + [(30, bound + 1)]  # offered, in order
    assert seen == [0, 1, 2, *kept, 30]  # the hook saw no dropped pending reading, and none twice
    # The dropped batch's decision still committed, once, first; then one per later batch.
    assert done == [0, 20, 24, 28, 30]
    assert [orjson.loads(p)["first"] for (p,) in decisions] == [0, 20, 24, 28]
    assert dropped == dropped_after == 30 - bound  # counted in the twin once, not again


async def test_failed_commits_are_logged_once_a_minute_and_the_recovery_once(tmp_path, caplog):
    """While the twin cannot be written (another process holds its write lock, as a full disk
    would fail every commit) the recorder retries; its "cannot commit" error was logged at every
    try, once a second, 3,600 lines an hour. Now the first is logged at once, then one a minute
    saying how many were not; the commit that succeeds says how long it took and how many readings
    waited; and the next outage's first failure is logged at once again."""
    import asyncio
    import logging
    import re
    import sqlite3

    from mapper.logs import Throttle
    from mapper.recorder import Recorder

    path = _lamp_twin(tmp_path)
    caplog.set_level(logging.WARNING, logger="mapper.recorder")
    now = [0.0]

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mapper.recorder" and text in r.getMessage()]

    lock = sqlite3.connect(path, isolation_level=None)
    async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
        await worker.call(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed commit fails at once
        recorder = Recorder(worker, batch_max=4, batch_delay_s=0)
        recorder.retry_s = 0.01
        recorder._log_throttle = Throttle(burst=1, interval_s=60.0, clock=lambda: now[0])  # noqa: SLF001
        task = asyncio.create_task(recorder.run())
        try:
            lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written from here on
            recorder.add(Reading(LAMP, "count", 1, 1_000))
            await async_wait_for(lambda: recorder.commit_failures >= 5, what="5 failed commits")
            assert len(lines("cannot commit")) == 1, lines("cannot commit")
            now[0] = 61.0  # a minute later: one more line, saying how many were not logged
            await async_wait_for(lambda: len(lines("cannot commit")) == 2, what="the next line a minute later")
            held = re.search(r"\((\d+) more like this not logged\)$", lines("cannot commit")[1])
            assert held and int(held[1]) >= 4, lines("cannot commit")  # at least the 2nd to 5th
            failures = recorder.commit_failures
            recorder.add(Reading(LAMP, "count", 2, 2_000))
            await async_wait_for(lambda: recorder.commit_failures >= failures + 3, what="3 more failed commits")
            assert len(lines("cannot commit")) == 2
            lock.execute("ROLLBACK")  # the twin can be written again
            await async_wait_for(lambda: recorder.committed == 2, what="the readings committed")
            [again] = lines("twin writable again")
            held = re.fullmatch(r"twin writable again after 0 s, 2 readings waited \((\d+) more failed commits not logged\)",
                                again)
            assert held and int(held[1]) >= 3, again  # at least the 3 since the last line

            lock.execute("BEGIN IMMEDIATE")  # a second outage, within the same minute: logged at once
            recorder.add(Reading(LAMP, "count", 3, 3_000))
            await async_wait_for(lambda: len(lines("cannot commit")) == 3, what="the next outage's first failure")
            lock.execute("ROLLBACK")
            await async_wait_for(lambda: recorder.committed == 3, what="the third reading committed")
            assert len(lines("twin writable again")) == 2
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
