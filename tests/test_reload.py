"""SIGHUP reloads device files in a running `mapper run`: only changed devices restart; invalid files are refused."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.ids import DeviceId
from helpers import (catches, device_yaml, faulty_probe_yaml, wait_for, write_config, write_devices,
                     write_several_mistakes)
from twin.store import TwinStore

REPO = Path(__file__).resolve().parents[1]
A, B = DeviceId("default", "a"), DeviceId("default", "b")


class Mapper:
    """`python -m mapper run` in tmp_path (so problems are labelled dev/...), its log in a file."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.devices = write_devices(tmp / "dev", ["a", "b"], cycle=20)
        self.twin = tmp / "twin.db"
        self.tmp = tmp
        self.env = env or {}
        self.config = write_config(tmp / "mapper.yaml", self.devices, self.twin)
        self.log_path = tmp / "mapper.log"
        self.start()

    def start(self) -> None:
        """`mapper run` (its log appended to the same file)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)

    def stop(self) -> None:
        """SIGTERM: a clean stop."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, count: int = 1) -> str:
        return wait_for(lambda: len(re.findall(pattern, self.log())) >= count and self.log(),
                        what=f"{count} x {pattern!r} in the log")

    def count(self, device: DeviceId) -> int:
        """The counter property's reported value: it restarts from 0 when the device's driver is recreated."""
        with TwinStore.open(self.twin) as store:
            value = store.device(device).properties["count"].reported
        return -1 if value is None else int(value)

    def restarts(self, device: DeviceId) -> int:
        """How often the counter went down in the history: each time the device's driver was recreated.
        (Read from the history, not the reported value: a poll could miss the short time after a restart
        while the new count is still below the old one.)"""
        with TwinStore.open(self.twin) as store:
            values = [v for _, v, _ in store.history(device, "count", limit=1_000_000) if v is not None]
        return sum(1 for old, new in zip(values, values[1:], strict=False) if new < old)

    def counts_above(self, minimum: dict[DeviceId, int]) -> dict[DeviceId, int]:
        counts = {d: self.count(d) for d in minimum}
        return counts if all(counts[d] > m for d, m in minimum.items()) else {}


@contextlib.contextmanager
def running_mapper(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Mapper]:
    running = Mapper(tmp, env)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


@pytest.fixture
def mapper(tmp_path: Path) -> Iterator[Mapper]:
    with running_mapper(tmp_path) as running:
        yield running


def test_sighup_restarts_only_changed_devices_and_refuses_invalid_files(mapper: Mapper) -> None:
    """Edit b, SIGHUP: b restarts (its counter resets), a keeps counting; an invalid edit is refused; SIGTERM exits 0."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    before = wait_for(lambda: mapper.counts_above({A: 10, B: 10}), what="both devices counting")

    (mapper.devices / "b.yaml").write_text(device_yaml("b", cycle=20, config="{seed: 7}"))
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload done: ")
    assert "reload done: changed default/b" in log
    assert "devices updated: 0 added, 1 changed, 0 removed" in log
    wait_for(lambda: mapper.restarts(B) == 1, what="b's counter to restart")
    assert mapper.count(A) >= before[A] and mapper.restarts(A) == 0, "device a was restarted although its file did not change"
    # b's restarted runner names the state b had (ok), not "was unknown" as if it had never been read.
    log = mapper.wait_log(r"default/b: state ok \(was ok before a reload changed the device\)")
    assert log.count("default/b: state ok (was unknown)") == 1, log  # (the start's)

    good_b = (mapper.devices / "b.yaml").read_text()
    (mapper.devices / "b.yaml").write_text(good_b.replace("collectCycle: 20", "collectCycle: -5", 1))
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload refused: \d+ error")
    line = next(n for n, text in enumerate((mapper.devices / "b.yaml").read_text().splitlines(), 1)
                if "collectCycle: -5" in text)
    assert re.search(rf"reload refused: dev/b\.yaml:{line}: spec\.properties\[0\]\.collectCycle: ", log), log
    # A restart (a reboot, the watchdog) would not fall back to the previous devices: it refuses to start.
    assert (f"reload refused: 1 error(s); still running the previous devices; fix them before the next start:"
            f" `mapper run` refuses to start with them (`mapper validate --config {mapper.config}`)") in log, log
    refused_at = {A: mapper.count(A), B: mapper.count(B)}
    wait_for(lambda: mapper.counts_above({A: refused_at[A] + 5, B: refused_at[B] + 5}),
             what="both devices still counting after the refused reload")
    assert len(re.findall(r"reload done: ", mapper.log())) == 1
    assert mapper.restarts(B) == 1, "the refused edit restarted b"

    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0
    assert "stopped: drivers closed, twin flushed" in mapper.log()


def test_a_reloaded_switch_leaves_no_delta_behind(mapper: Mapper) -> None:
    """`twin set b power true`, applied; then b's file changes and a SIGHUP restarts b: its simulated
    switch starts off again, like a GPIO relay in its initial state. The twin must say so (desired
    becomes the boot state, a new version) instead of keeping desired=true next to reported=false:
    before, that delta stayed for good and nothing ever applied it again."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    with TwinStore.open(mapper.twin) as store:
        store.set_desired(B, "power", "true")

    def power() -> tuple:
        with TwinStore.open(mapper.twin) as store:
            p = store.device(B).properties["power"]
        return p.desired, p.reported, p.delta, p.desired_version

    wait_for(lambda: power()[:3] == (True, True, False), what="power=true applied to b")
    (mapper.devices / "b.yaml").write_text(device_yaml("b", cycle=20, config="{seed: 7}"))
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b")
    wait_for(lambda: mapper.restarts(B) == 1, what="b to restart")
    desired, reported, delta, version = wait_for(lambda: (p := power())[1] is False and p, what="b's switch off again")
    desired, reported, delta, version = wait_for(lambda: not (p := power())[2] and p, what="no delta on b.power",
                                                 timeout=5)
    assert (desired, reported, version) == (False, False, 2)
    assert "b/power: started in its boot state False" in mapper.log()
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


def test_a_property_removed_by_a_reload_leaves_the_twin(mapper: Mapper, tmp_path: Path) -> None:
    """b's file drops its `power` property, SIGHUP: the twin (`mapper twin get`, the $hw twin
    document, DMI reports: all read the same rows) no longer lists it. Before, it stayed there for
    good with its last reported value and quality `good`, although nothing read it any more; its
    readings stay in the history."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    wait_for(lambda: mapper.counts_above({B: 2}), what="b counting")
    with TwinStore.open(mapper.twin) as store:
        assert "power" in store.device(B).properties
    text = device_yaml("b", cycle=20)
    start = text.index("    - name: power")
    (mapper.devices / "b.yaml").write_text(text[:start] + text[text.index("    - name: count"):])
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b")
    with TwinStore.open(mapper.twin) as store:
        assert sorted(store.device(B).properties) == ["count", "temperature"]
        assert sorted(store.device(A).properties) == ["count", "power", "temperature"]
        assert store.history(B, "power"), "the removed property's readings are history: they stay"
    shown = subprocess.run([sys.executable, "-m", "mapper", "twin", "get", "b", "--config", str(tmp_path / "mapper.yaml")],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert shown.returncode == 0 and "power" not in shown.stdout, shown
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


def test_a_property_made_read_only_by_a_reload_drops_its_desired_value(mapper: Mapper) -> None:
    """power is set (desired true, applied), then the model makes it ReadOnly, SIGHUP: a ReadOnly
    property takes no desired value, so the twin must not keep one. Before, desired=true stayed,
    next to the reported value of a switch nothing writes any more: a delta (`mapper twin get`,
    the $hw delta) that nothing could ever apply or clear."""
    from helpers import MODEL

    mapper.wait_log(r"mapper test-node running: 2 device")
    with TwinStore.open(mapper.twin) as store:
        store.set_desired(B, "power", "true")

    def power():  # noqa: ANN202
        with TwinStore.open(mapper.twin) as store:
            return store.device(B).properties["power"]

    wait_for(lambda: (p := power()).reported is True and not p.delta, what="power=true applied to b")
    model = MODEL.format(model="thing-model")
    readonly = model.replace("type: BOOLEAN\n      accessMode: ReadWrite", "type: BOOLEAN\n      accessMode: ReadOnly")
    assert readonly != model
    (mapper.devices / "model.yaml").write_text(readonly)
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/a, default/b")
    wait_for(lambda: mapper.restarts(B) == 1, what="b to restart")
    wait_for(lambda: power().reported is False, what="b's switch off again")
    p = power()
    assert not p.writable and p.desired is None and not p.delta, p
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


async def test_a_reload_the_twin_refuses_keeps_the_previous_devices_running(tmp_path: Path) -> None:
    """The twin refuses a device update's write (a lock held past its timeout, a full SD card) after
    the changed and removed devices were stopped. The log says "reload failed; still running the
    previous devices", and so it must be: before, b (changed) and a (removed) stayed stopped,
    with no reading taken, until another SIGHUP. The refusal is real: another connection holds
    the twin file's write lock (BEGIN IMMEDIATE), and the service's busy timeout is made short.
    (A SIGHUP reload waits for such a lock now, tests/test_twin_lock.py; a DMI update is refused.)"""
    import sqlite3

    from devices.loader import load
    from helpers import async_wait_for, running_service
    from mapper.cli import reload_devices
    from mapper.config import load_config

    devices = write_devices(tmp_path / "dev", ["a", "b"], cycle=20)
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        before = {d: r.definition.fingerprint for d, r in service.runners.items()}
        (devices / "b.yaml").write_text(device_yaml("b", cycle=20, config="{seed: 7}"))
        (devices / "a.yaml").unlink()
        await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
        lock = sqlite3.connect(tmp_path / "twin.db", isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written until the ROLLBACK
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await service.update_devices(load(config.devices))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert {d: r.definition.fingerprint for d, r in service.runners.items()} == before
        assert set(service.definitions.devices) == {A, B}
        with TwinStore.open(tmp_path / "twin.db") as reader:
            taken = {d: len(reader.history(d, "count", limit=1_000_000)) for d in (A, B)}
            await async_wait_for(lambda: all(len(reader.history(d, "count", limit=1_000_000)) > taken[d] + 3
                                             for d in (A, B)), what="a and b still reading")
        # The next reload, once the twin takes it, switches as usual.
        assert await reload_devices(service, config)
        assert set(service.runners) == {B} and service.runners[B].definition.fingerprint != before[B]


@pytest.mark.parametrize("twin_refuses", [False, True], ids=["taken", "refused"])
async def test_a_twin_request_for_a_device_a_reload_adds_is_answered(tmp_path: Path, twin_refuses: bool) -> None:
    """A reload adds device c; twin/update and twin/get for c arrive after the definitions were
    swapped, before the twin took the new set (the twin thread is held there). They are queued
    after the reload's twin write: taken, c is updated and answered as any device; refused (a
    lock held past its timeout), the previous definitions come back and c is answered 404, as
    a device not on the node. Before, the refused case ended as an internal error with no reply.

    The refusal is real: another connection holds the twin file's write lock (BEGIN IMMEDIATE)
    with the service's busy timeout made short, and lets go right after the reload's write was
    refused (its ROLLBACK is queued on the twin thread behind that write), so the replies can be
    written."""
    import asyncio
    import sqlite3
    import threading

    import orjson

    from devices.loader import load
    from eventbus.router import Router
    from eventbus.topics import Topics
    from helpers import async_wait_for, running_service
    from mapper.config import load_config

    C = DeviceId("default", "c")
    devices = write_devices(tmp_path / "dev", ["a"], cycle=1000)
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    swapped = asyncio.Event()
    lock = sqlite3.connect(tmp_path / "twin.db", isolation_level=None, check_same_thread=False)
    async with running_service(config, prepare=lambda s: s.device_listeners.append(
            lambda defs: C in defs and swapped.set())) as service:
        router = Router(service, Topics("test-node"), max_payload=4096, serve_twin_protocol=True)
        (devices / "c.yaml").write_text(device_yaml("c", cycle=1000))
        result = load(config.devices)
        if twin_refuses:
            await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
        held, release = threading.Event(), threading.Event()
        hold = service.worker.submit(lambda s: (held.set(), release.wait(10)))
        await asyncio.to_thread(held.wait, 10)
        if twin_refuses:
            lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written until the ROLLBACK
        try:
            update = asyncio.create_task(service.update_devices(result))
            async with asyncio.timeout(10):
                await swapped.wait()
            assert C in service.definitions.devices
            unlocked = None
            if twin_refuses:
                # The reload's twin write was handed to the twin thread before the swap was told
                # (no await in between): this runs after it, the short busy timeout meanwhile.
                unlocked = service.worker.submit(
                    lambda s: (lock.execute("ROLLBACK"), s.conn.execute("PRAGMA busy_timeout=30000")))
            hw = "$hw/events/device/default/c"
            requests = [asyncio.create_task(router.handle(f"{hw}/twin/update",
                                                          b'{"event_id":"r1","twin":{"power":{"expected":{"value":"true"}}}}')),
                        asyncio.create_task(router.handle(f"{hw}/twin/get", b'{"event_id":"g1"}'))]
            # Each request is checked against the swapped definitions and hands its twin call to
            # the held thread, behind the reload's twin write (and the lock's release).
            queued = 4 + twin_refuses  # the hold, the reload's write, (the release,) the two requests
            await async_wait_for(lambda: service.worker.pending() >= queued, what="the requests' twin calls queued")
            assert not any(r.done() for r in requests)
        finally:
            release.set()
        await hold
        if twin_refuses:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await update
            await unlocked
        else:
            await update
        await asyncio.gather(*requests)
        rows = await service.twin(lambda s: s.outbox_pending())
    lock.close()
    assert router.counts["internal_error"] == 0, router.counts
    replies = {r.topic.removeprefix(hw + "/"): orjson.loads(r.payload) for r in rows if r.topic.startswith(hw)}
    update_reply, get_reply = replies["twin/update/result"], replies["twin/get/result"]
    assert (update_reply["event_id"], get_reply["event_id"]) == ("r1", "g1")
    if twin_refuses:
        assert update_reply["code"] == get_reply["code"] == 404, replies
        assert "device default/c is not on node test-node" in update_reply["reason"]
        assert C not in service.definitions.devices
    else:
        assert "code" not in update_reply and update_reply["twin"]["power"]["expected"]["value"] == "true", replies
        assert "power" in get_reply["twin"]


def test_a_value_whose_write_failed_is_written_after_the_reload_that_repairs_the_device(mapper: Mapper,
                                                                                       tmp_path: Path) -> None:
    """`mapper twin set` while the device does not answer: the write fails and the twin says so.
    The device file is repaired and SIGHUP reloads it: the value is written. It used to be taken
    as applied: `twin get` showed the desired value, a delta and the apply error for good, after
    a reload and a restart too."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    (mapper.devices / "b.yaml").write_text(device_yaml("b", cycle=20, config="{broken: true}"))
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "mapper", "twin", "set", "b", "count", "500", "--config",
                    str(tmp_path / "mapper.yaml")], cwd=tmp_path, env=env, check=True, capture_output=True)

    def prop():  # noqa: ANN202
        with TwinStore.open(mapper.twin) as store:
            return store.device(B).properties["count"], store.pending_desired()

    failed, pending = wait_for(lambda: (p := prop())[0].apply_error and p, what="the write failed")
    assert failed.apply_error.startswith("write failed:") and failed.desired == 500
    assert [(c.device_id, c.property) for c in pending] == [(B, "count")]

    (mapper.devices / "b.yaml").write_text(device_yaml("b", cycle=20))
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b", count=2)
    applied, pending = wait_for(lambda: (p := prop())[0].apply_error is None and not p[1] and p,
                                what="the value written once the device answers")
    assert applied.desired == 500 and applied.reported >= 500
    assert "default/b/count: applied desired value 500" in mapper.log()
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=20) == 0


def test_a_file_desired_value_is_applied_only_when_the_file_changes_it(mapper: Mapper, tmp_path: Path) -> None:
    """b's file gives count `desired: {value: "1000"}` (applied), then the operator sets 5000
    (`mapper twin set`, applied). Only the model's description changes, SIGHUP: b restarts (its
    model changed), but the file did not change its desired value, so the operator's 5000 stays.
    Before, any change of the device or its model (its fingerprint) set the file's 1000 again
    (`applied desired value 1000 (version 3)`), overriding the operator. A restart with the same
    files keeps 5000 too (what the file said is kept in the twin); the file's desired value
    changed while the mapper was stopped (2000) is applied at the start, and one changed by a
    reload (3000) at the SIGHUP."""
    from helpers import MODEL

    mapper.wait_log(r"mapper test-node running: 2 device")
    b_file = mapper.devices / "b.yaml"
    plain = b_file.read_text()
    anchor = "    - name: count\n"
    assert anchor in plain

    def with_desired(value: str) -> str:
        return plain.replace(anchor, anchor + f'      desired: {{value: "{value}"}}\n')

    def count():  # noqa: ANN202
        with TwinStore.open(mapper.twin) as store:
            return store.device(B).properties["count"]

    def applied(value: int):  # noqa: ANN202
        def done():  # noqa: ANN202
            with TwinStore.open(mapper.twin) as store:
                p = store.device(B).properties["count"]
                pending = [c for c in store.pending_desired() if c.device_id == B]
            return p.desired == value and not pending and p.apply_error is None and p
        return wait_for(done, what=f"count={value} applied to b")

    b_file.write_text(with_desired("1000"))
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b")
    applied(1000)
    subprocess.run([sys.executable, "-m", "mapper", "twin", "set", "b", "count", "5000", "--config",
                    str(mapper.config)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True, timeout=30)
    version = applied(5000).desired_version
    mapper.wait_log(r"default/b/count: applied desired value 5000 ")

    # The model alone changes (a description): a, b restart; the operator's value stays.
    model = MODEL.format(model="thing-model")
    described = model.replace("    - name: count\n", "    - name: count\n      description: events counted\n")
    assert described != model
    (mapper.devices / "model.yaml").write_text(described)
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/a, default/b")
    wait_for(lambda: mapper.restarts(B) >= 1, what="b to restart")
    p = count()
    assert (p.desired, p.desired_version) == (5000, version), p
    assert len(re.findall(r"default/b/count: applied desired value 1000 ", mapper.log())) == 1, mapper.log()

    # A restart with the same files: the file's desired value was applied before, it stays so.
    mapper.stop()
    mapper.start()
    mapper.wait_log(r"mapper test-node running: 2 device", count=2)  # (the twin's devices synced before)
    p = count()
    assert (p.desired, p.desired_version) == (5000, version), p

    # The file's desired value changed while the mapper was stopped: applied at the start.
    mapper.stop()
    b_file.write_text(with_desired("2000"))
    mapper.start()
    mapper.wait_log(r"mapper test-node running: 2 device", count=3)
    assert applied(2000).desired_version == version + 1

    # ... and changed by a reload: applied at the SIGHUP.
    b_file.write_text(with_desired("3000"))
    mapper.proc.send_signal(signal.SIGHUP)
    mapper.wait_log(r"reload done: changed default/b", count=2)
    assert applied(3000).desired_version == version + 2
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


def test_sighup_reads_the_config_file_again(tmp_path: Path) -> None:
    """mapper.yaml gets a second device directory (relative, as a user writes it), `log_level:
    debug`, another node and twin.batch_delay_ms; SIGHUP. The devices of the new list run (c is
    added, a and b keep running), debug lines are logged from then on, and node and twin are named
    in a warning as taking effect at the next start. The environment's override of loop (as at
    start) is no change. Before, the config loaded at start was reused: the log named the old list,
    said "reload done: nothing changed", and nothing hinted that mapper.yaml had changed."""
    with running_mapper(tmp_path, {"MAPPER_LOOP__FAILURE_THRESHOLD": "4"}) as mapper:
        _reads_the_config_file_again(mapper, tmp_path)


def _reads_the_config_file_again(mapper: Mapper, tmp_path: Path) -> None:
    C = DeviceId("default", "c")
    mapper.wait_log(r"mapper test-node running: 2 device")
    before = wait_for(lambda: mapper.counts_above({A: 5, B: 5}), what="both devices counting")
    (tmp_path / "dev2").mkdir()
    (tmp_path / "dev2" / "c.yaml").write_text(device_yaml("c", cycle=20, config="{fail_first: 2}"))
    text = mapper.config.read_text()
    edited = (text.replace(f"devices: [{mapper.devices}]", f"devices: [{mapper.devices}, dev2]")
              .replace("log_level: info", "log_level: debug").replace("node: test-node", "node: other-node")
              .replace("batch_delay_ms: 5", "batch_delay_ms: 50"))
    assert edited.count("dev2") == 1 and "debug" in edited and "other-node" in edited and "batch_delay_ms: 50" in edited
    mapper.config.write_text(edited)
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload done: ")
    assert "reload done: added default/c" in log, log
    assert f"SIGHUP: reloading device files {mapper.devices}, {tmp_path / 'dev2'}" in log, log
    assert (f"WARNING mapper.reload: {mapper.config}: node, twin changed: they take effect at the next start"
            f" (systemctl restart mapper); until then the mapper runs with the previous ones") in log, log
    warning = log.split("WARNING mapper.reload:")[1].split("\n")[0]
    assert "loop" not in warning, "the environment's override (MAPPER_LOOP__FAILURE_THRESHOLD) was taken for a change"
    # log_level applied live: the new device's first failed reads are logged at debug
    mapper.wait_log(r"DEBUG \S+: default/c: read failed \(1 in a row\)")
    wait_for(lambda: mapper.counts_above({A: before[A], B: before[B], C: 3}), what="a, b and c counting")
    assert mapper.restarts(A) == mapper.restarts(B) == 0
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0
    assert "mapper test-node stopped" in mapper.log()  # the node changes at the next start only


def test_a_reload_that_changed_only_the_node_says_it_takes_effect_at_the_next_start(mapper: Mapper,
                                                                                   tmp_path: Path) -> None:
    """mapper.yaml gets another `node` and nothing else; `mapper reload`. The reload ended with
    "reload done: nothing changed" after the warning that the mapper "runs with the previous ones",
    and `mapper reload` said only that the mapper runs the new files: read together, as if the edit
    had been ignored. The closing line and the command now say that the node changed and takes
    effect at the next start."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    mapper.config.write_text(mapper.config.read_text().replace("node: test-node", "node: other-node", 1))
    done = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    later = "node changed in the config file: it takes effect at the next start (systemctl restart mapper)"
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"reloaded: the mapper (pid {mapper.proc.pid}) runs the new device files; {later}", \
        done.stdout
    log = mapper.wait_log(r"reload done: ")
    assert f"INFO mapper.reload: reload done: no device changed; {later}" in log, log
    assert "nothing changed" not in log, log
    mapper.stop()
    assert "mapper test-node stopped" in mapper.log()  # the running mapper kept its node


def test_a_reload_that_adds_a_device_it_refuses_says_so_in_the_log_and_in_mapper_reload(mapper: Mapper,
                                                                                        tmp_path: Path) -> None:
    """A device file added whose protocol has no driver here: the reload ran the others and refused
    it, but closed with "reload done: nothing changed", and `mapper reload` said "runs the new
    files" after the warning. Both now name the refused device."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    (mapper.devices / "c.yaml").write_text(device_yaml("c").replace("protocolName: simulated\n    configData",
                                                                     "protocolName: nosuchproto\n    configData"))
    done = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    assert done.returncode == 0, done
    assert done.stdout.strip() == (f"reloaded: the mapper (pid {mapper.proc.pid}) runs the new files, but not the"
                                   " device(s) it refused: default/c (why: above)"), done.stdout
    assert "no driver installed for protocol 'nosuchproto'" in done.stderr, done.stderr
    log = mapper.wait_log(r"reload done: ")
    assert "INFO mapper.reload: reload done: refused default/c" in log, log
    assert "devices updated: 0 added, 0 changed, 0 removed, 1 refused" in log, log
    assert "nothing changed" not in log, log
    mapper.stop()


def test_a_reload_says_when_a_changed_mqtt_section_would_stop_the_next_start(mapper: Mapper, tmp_path: Path) -> None:
    """mapper.yaml gets an `mqtt` section whose password file is not there; SIGHUP. It takes effect at
    the next start only, and that start refuses it (`mapper run` checks the password at start): a
    reboot or the watchdog's restart would leave nothing running. The reload says so now, while the
    mapper runs; a section that adds TLS is named as checked at the next start (this mapper runs
    without OpenSSL)."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    missing = tmp_path / "mqtt.password"
    with_mqtt = mapper.config.read_text() + (
        f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {missing}\n")
    mapper.config.write_text(with_mqtt)
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload done: ")
    assert f"WARNING mapper.reload: {mapper.config}: mqtt changed: it takes effect at the next start" in log, log
    assert (f"ERROR mapper.reload: {mapper.config}: mqtt.password_file: cannot read {missing}: No such file or"
            " directory (the mapper reads it as the user it runs as); the next start refuses it (fix it before a"
            " restart or a reboot)") in log, log
    missing.write_text("secret\n")
    missing.chmod(0o600)
    mapper.config.write_text(with_mqtt.replace("mqtt://127.0.0.1:1", "mqtts://127.0.0.1:1"))
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload done: ", count=2)
    assert f"{mapper.config}: mqtt now uses TLS: its files are checked at the next start" in log, log
    assert log.count("the next start refuses it") == 1, log  # the password file is there now
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


def test_a_config_file_that_no_longer_validates_refuses_the_reload(mapper: Mapper, tmp_path: Path) -> None:
    """mapper.yaml gets a second device directory and a log_level it does not take; SIGHUP. The
    reload is refused, with the config file's line and field as at start, and saying the next
    start refuses it too; the devices run as before. Once fixed, the next SIGHUP takes it. Before,
    the file was not read again: the log said "reload done: nothing changed"."""
    C = DeviceId("default", "c")
    mapper.wait_log(r"mapper test-node running: 2 device")
    (tmp_path / "dev2").mkdir()
    (tmp_path / "dev2" / "c.yaml").write_text(device_yaml("c", cycle=20))
    good = mapper.config.read_text().replace(f"devices: [{mapper.devices}]", f"devices: [{mapper.devices}, dev2]")
    mapper.config.write_text(good.replace("log_level: info", "log_level: loud"))
    line = next(n for n, text in enumerate(mapper.config.read_text().splitlines(), 1) if "log_level" in text)
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload refused: .*error\(s\)")
    where = re.escape(f"{mapper.config}:{line}: log_level: ")
    assert re.search(rf"ERROR mapper.reload: reload refused: {where}", log), log
    assert (f"reload refused: {mapper.config}: 1 error(s); still running the previous config and devices; fix it"
            " before the next start: `mapper run` refuses to start with it") in log, log
    refused_at = {A: mapper.count(A), B: mapper.count(B)}
    wait_for(lambda: mapper.counts_above({A: refused_at[A] + 5, B: refused_at[B] + 5}),
             what="both devices still counting after the refused reload")
    assert "reload done" not in mapper.log()
    with TwinStore.open(mapper.twin) as store:
        assert C not in store.device_ids()

    mapper.config.write_text(good)
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload done: ")
    assert "reload done: added default/c" in log, log
    assert "WARNING mapper.reload" not in log, log  # nothing that waits for a restart changed
    mapper.proc.send_signal(signal.SIGTERM)
    assert mapper.proc.wait(timeout=15) == 0


def test_inference_pipeline_mistakes_refuse_the_start_and_a_reload_that_brings_them(mapper: Mapper,
                                                                                   tmp_path: Path) -> None:
    """A config pipeline whose device lacks a property the model reads, one with a misspelt model and
    one naming no device: `mapper run` logged `pipeline ... disabled` and ran the rest, half
    configured, with no line of the config. It now refuses to start, each at its line and field (the
    model with a did-you-mean), as for a bad device file. Started right, a SIGHUP whose device files
    no longer define the pipeline's device is refused, and the devices and the pipeline run on."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    mapper.stop()
    (mapper.devices / "probe.yaml").write_text(faulty_probe_yaml(20))
    base = mapper.config.read_text()
    mapper.config.write_text(base + "inference:\n  pipelines:\n    - device: a\n      model: sensor_faults\n"
                             "    - device: probe\n      model: sensor_fault\n"
                             "    - device: nosuchdev\n      model: sensor_faults\n")
    lines = mapper.config.read_text().splitlines()
    at = {text.strip(): n for n, text in enumerate(lines, 1) if "device:" in text or "model: sensor_fault" in text}
    run = _mapper_cli(tmp_path, "run", "--config", str(mapper.config))
    assert run.returncode == 1, run.stderr
    assert "test-node running" not in run.stderr and "disabled" not in run.stderr, run.stderr
    assert (f"{mapper.config}:{at['- device: a']}: inference.pipelines[0].device: pipeline default/a-sensor-faults:"
            " device default/a has no property 'humidity'") in run.stderr, run.stderr
    assert (f"{mapper.config}:{at['model: sensor_fault']}: inference.pipelines[1].model: no model 'sensor_fault' in"
            ) in run.stderr and "; did you mean sensor_faults?" in run.stderr, run.stderr
    assert (f"{mapper.config}:{at['- device: nosuchdev']}: inference.pipelines[2].device: no device default/nosuchdev"
            " in the device files") in run.stderr, run.stderr

    mapper.config.write_text(base + "inference:\n  pipelines:\n    - device: probe\n      model: sensor_faults\n"
                             "      deadline_s: 0\n")
    line = next(n for n, text in enumerate(mapper.config.read_text().splitlines(), 1) if "device: probe" in text)
    mapper.start()
    mapper.wait_log(r"mapper test-node running: 3 device")
    mapper.wait_log(r"inference pipeline default/probe-sensor-faults: device default/probe")
    (mapper.devices / "probe.yaml").unlink()
    _reload_refused_pipeline_runs_on(mapper, f"reload refused: {mapper.config}:{line}: inference.pipelines[0].device:"
                                     " no device default/probe in the device files", "probe-sensor-faults")
    # The command the refusal names finds the problem (`mapper validate DIR` knows no pipeline: it says ok).
    assert f"(`mapper validate --config {mapper.config}`)" in mapper.log(), mapper.log()
    assert _mapper_cli(tmp_path, "validate", str(mapper.devices)).returncode == 0
    checked = _mapper_cli(tmp_path, "validate", "--config", str(mapper.config))
    assert checked.returncode == 1 and "inference.pipelines[0].device: no device default/probe" in checked.stderr, checked


def _mapper_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mapper ARGS` in `cwd`, its output captured."""
    return subprocess.run([sys.executable, "-m", "mapper", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)


def _reload_refused_pipeline_runs_on(mapper: Mapper, refusal: str, pipeline: str) -> None:
    """SIGHUP: the reload is refused with `refusal` in the log, nothing switched, and the pipeline's
    derived device (default/`pipeline`) still `ok`; then the mapper is stopped."""
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload refused: \d+ error")
    assert refusal in log, log
    assert "reload done" not in log and "pipelines updated" not in log, log
    with TwinStore.open(mapper.twin) as store:
        assert store.device(DeviceId("default", pipeline)).state == "ok"
    mapper.stop()


def _with_maps(text: str, maps: dict[str, str]) -> str:
    """A device file with a pushMethod.anomalyDetection map (YAML lines of its `data:`) after each named
    property's collectCycle."""
    out: list[str] = []
    prop = None
    for line in text.splitlines():
        out.append(line)
        if line.strip().startswith("- name: "):
            prop = line.split("- name: ")[1].strip()
        if line.strip().startswith("collectCycle:") and prop in maps:
            out += ["      pushMethod:", "        anomalyDetection:", "          data:",
                    *(f"            {entry}" for entry in maps[prop].splitlines())]
    return "\n".join(out) + "\n"


def _line(path: Path, text: str, after: int = 0) -> int:
    """The number of the first line of `path` holding `text` after line `after`."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if n > after and text in line)


def test_device_map_mistakes_refuse_the_start_and_a_reload_that_brings_them(mapper: Mapper, tmp_path: Path) -> None:
    """Mistakes in the pushMethod.anomalyDetection maps of device files (a misspelt model, an unknown key,
    setDevice without setProperty, a device without the properties the model reads): `mapper run` logged
    them and ran without those pipelines, half started. It now refuses to start, each at its line and key
    of the device file, as for the config's own pipelines; `mapper validate` names those it can tell without
    the models. Started right, a SIGHUP that brings such a mistake is refused, and the pipeline runs on."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    mapper.stop()
    probe = mapper.devices / "probe.yaml"
    probe.write_text(_with_maps(faulty_probe_yaml(20), {
        "temperature": "model: sensor_fault\nname: probe-ad",
        "humidity": "model: sensor_faults\nname: humid-ad\ntreshold: 0.5"}))
    a_file = mapper.devices / "a.yaml"
    a_file.write_text(_with_maps(a_file.read_text(), {"temperature": "model: sensor_faults\nsetDevice: b"}))
    b_file = mapper.devices / "b.yaml"
    b_file.write_text(_with_maps(b_file.read_text(), {"temperature": "model: sensor_faults\nname: b-ad"}))
    run = _mapper_cli(tmp_path, "run", "--config", str(mapper.config))
    assert run.returncode == 1, run.stderr
    assert "test-node running" not in run.stderr and "disabled" not in run.stderr, run.stderr
    field = "spec.properties[{}].pushMethod.anomalyDetection.data"
    assert (f"dev/probe.yaml:{_line(probe, 'model: sensor_fault')}: {field.format(0)}.model: no model 'sensor_fault'"
            ) in run.stderr and "; did you mean sensor_faults?" in run.stderr, run.stderr
    assert (f"dev/probe.yaml:{_line(probe, 'treshold')}: {field.format(1)}.treshold: default/probe/humidity: unknown"
            " key(s) treshold (did you mean threshold?)") in run.stderr, run.stderr
    assert (f"dev/a.yaml:{_line(a_file, 'setDevice: b')}: {field.format(0)}.setDevice: default/a/temperature:"
            " setDevice, setProperty and setValue go together: add setProperty and setValue") in run.stderr, run.stderr
    assert (f"dev/b.yaml:{_line(b_file, '  data:')}: {field.format(0)}: pipeline default/b-ad: device default/b has no"
            " property 'humidity'") in run.stderr, run.stderr
    assert "4 error(s)" in run.stderr or run.stderr.count("anomalyDetection.data") == 4, run.stderr

    # `mapper validate`: the maps' own keys (whether a model exists is for the start to say).
    check = _mapper_cli(tmp_path, "validate", "dev")
    assert check.returncode == 1, check.stderr
    assert f"dev/probe.yaml:{_line(probe, 'treshold')}: {field.format(1)}.treshold:" in check.stderr, check.stderr
    assert f"dev/a.yaml:{_line(a_file, 'setDevice: b')}: {field.format(0)}.setDevice:" in check.stderr, check.stderr
    assert "2 error(s)" in check.stderr and "sensor_fault'" not in check.stderr, check.stderr

    # Right: it starts, with the pipeline; a reload bringing a mistake is refused and the pipeline runs on.
    a_file.write_text(device_yaml("a", cycle=20))
    b_file.write_text(device_yaml("b", cycle=20))
    probe.write_text(_with_maps(faulty_probe_yaml(20), {"temperature": "model: sensor_faults\nname: probe-ad\n"
                                                                       "deadlineS: 0"}))
    mapper.start()
    mapper.wait_log(r"mapper test-node running: 3 device")
    mapper.wait_log(r"inference pipeline default/probe-ad: device default/probe")
    probe.write_text(_with_maps(faulty_probe_yaml(20), {"temperature": "model: sensor_faults\nname: probe-ad\n"
                                                                       "deadlineS: 0\nwindow: 8"}))
    _reload_refused_pipeline_runs_on(mapper, f"reload refused: dev/probe.yaml:{_line(probe, 'window: 8')}:"
                                     f" {field.format(0)}.window: pipeline default/probe-ad: window 8 but model",
                                     "probe-ad")


def test_mapper_reload_waits_for_the_reload_and_fails_when_it_is_refused(mapper: Mapper, tmp_path: Path) -> None:
    """`systemctl reload mapper` ran `kill -HUP` and succeeded at once: a reload the mapper then refused
    (a bad device file pushed to the node) looked done to the operator and to Ansible's handler, and
    the next reboot would not start. `mapper reload` (the unit's ExecReload=) sends the SIGHUP, waits
    for that reload's outcome and exits 1 with its errors when it was refused."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    good_b = (mapper.devices / "b.yaml").read_text()
    (mapper.devices / "b.yaml").write_text(good_b.replace("collectCycle: 20", "collectCycle: -5", 1))
    refused = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    assert refused.returncode == 1, refused
    assert re.search(r"reload refused: dev/b\.yaml:\d+: spec\.properties\[0\]\.collectCycle: ", refused.stderr), refused
    assert f"pid {mapper.proc.pid}" in refused.stderr, refused.stderr

    (mapper.devices / "b.yaml").write_text(good_b.replace("collectCycle: 20", "collectCycle: 30", 1))
    done = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"reloaded: the mapper (pid {mapper.proc.pid}) runs the new files", done.stdout
    assert "reload done: changed default/b" in mapper.log()

    mapper.stop()
    nothing = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    assert nothing.returncode == 1 and f"no mapper runs on the twin {mapper.twin}" in nothing.stderr, nothing


@pytest.mark.parametrize("text", ["", "\n  \n", "# the new sensor, to come\n"])
def test_a_device_file_left_empty_is_refused_not_taken_for_no_devices(mapper: Mapper, tmp_path: Path,
                                                                      text: str) -> None:
    """A device file emptied (a save cut short by a full disk, `> b.yaml` instead of `>>`, a copy that
    failed): a reload took it for a file with no devices, removed device b and said "runs the new
    files", and its readings stopped. An empty file, or one with only comments, is refused now,
    naming it, and the devices run on; `mapper validate` says the same."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    (mapper.devices / "b.yaml").write_text(text)
    refused = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
    assert refused.returncode == 1, refused
    assert "reload refused: dev/b.yaml: no Device or DeviceModel in it" in refused.stderr, refused.stderr
    assert "removed default/b" not in mapper.log()
    before = mapper.count(B)
    wait_for(lambda: mapper.count(B) > before, what="device b still read")
    checked = _mapper_cli(tmp_path, "validate", "--config", str(mapper.config))
    assert checked.returncode == 1 and "dev/b.yaml: no Device or DeviceModel in it" in checked.stderr, checked
    mapper.stop()


def test_a_sighup_while_the_mapper_starts_is_a_reload_once_it_runs(tmp_path: Path) -> None:
    """A SIGHUP's default action ends the process, and `mapper run` listened for it only once its
    event loop ran, after the config's checks, the twin's lock and the imports: a `kill -HUP` then
    (logrotate, an operator, `systemctl kill -s HUP mapper`) ended a starting mapper. It is now noted
    from the start of `mapper run` on, and is one reload once the mapper runs. Sent at three moments
    of one start: as soon as the process catches SIGHUP, when its lock says `<pid> starting` (before,
    it died there), and while a device's driver is still opening (the start held there by a gate)."""
    from plugin_drivers import SITE, write_device

    devices = write_devices(tmp_path / "dev", ["a"], cycle=20)
    opening, gate = tmp_path / "opening", tmp_path / "gate"
    write_device(devices, "gated", "gated", {"opening": str(opening), "open_when": str(gate), "wait_s": 60})
    twin = tmp_path / "twin.db"
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    lock, log_path = Path(f"{twin}.lock"), tmp_path / "mapper.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join((str(SITE), str(REPO)))})
    try:
        def lock_says_starting() -> bool:
            with contextlib.suppress(FileNotFoundError):
                return lock.read_text() == f"{proc.pid} starting\n"
            return False

        moments = {"it catches SIGHUP": lambda: catches(proc.pid, signal.SIGHUP),
                   "its lock says starting": lock_says_starting, "a driver is opening": opening.exists}
        sent: list[str] = []

        def send_at_each_moment() -> bool:
            for moment, reached in moments.items():
                if moment not in sent and proc.poll() is None and reached():
                    proc.send_signal(signal.SIGHUP)
                    sent.append(moment)
            return len(sent) == len(moments) or proc.poll() is not None

        wait_for(send_at_each_moment, timeout=30, interval=0.001, what="the moments of the start")
        assert proc.poll() is None, f"ended ({proc.returncode}) by the SIGHUP sent when {sent[-1]}:\n{log_path.read_text()}"
        assert sent == list(moments), sent
        assert "mapper test-node running" not in log_path.read_text()  # (all three sent while it was starting)
        gate.touch()
        wait_for(lambda: "reload done: " in log_path.read_text(), timeout=30, what="the reload once running")
        text = log_path.read_text()
        assert text.index("SIGHUP while starting: the config and device files are read again once the mapper runs") \
            < text.index("mapper test-node running: 2 device(s)") < text.index("SIGHUP: reading the config file"), text
        assert text.count("SIGHUP: reading the config file") == 1 and "reload done: nothing changed" in text, text
        assert lock.read_text() == f"{proc.pid}\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mapper_reload_says_when_it_cannot_tell_whether_a_mapper_runs(tmp_path: Path) -> None:
    """`mapper reload` said "no mapper runs on the twin ...: start it" when it could not read the
    twin's lock (a user who may not read the service's state directory: running unknown), and when the
    lock was held but named no pid: the operator was told to start a mapper that was running. Now
    it says what it could not tell, and how to reload all the same."""
    import fcntl

    twin = tmp_path / "state" / "twin.db"
    twin.parent.mkdir()
    config = write_config(tmp_path / "mapper.yaml", write_devices(tmp_path / "dev", ["a"]), twin)
    lock = Path(f"{twin}.lock")

    lock.mkdir()  # not a file: whether a mapper holds it cannot be told (as for a lock it may not open)
    unknown = _mapper_cli(tmp_path, "reload", "--config", str(config), "--timeout", "1")
    assert unknown.returncode == 1, unknown
    assert "no mapper runs" not in unknown.stderr, unknown.stderr
    assert f"cannot tell whether a mapper runs on the twin {twin}" in unknown.stderr, unknown.stderr
    assert str(lock) in unknown.stderr and "systemctl reload mapper" in unknown.stderr, unknown.stderr

    lock.rmdir()
    lock.write_text("")  # held, by a process that wrote no pid in it
    with lock.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nameless = _mapper_cli(tmp_path, "reload", "--config", str(config), "--timeout", "1")
    assert nameless.returncode == 1, nameless
    assert "no mapper runs" not in nameless.stderr, nameless.stderr
    assert f"a mapper runs on the twin {twin}, but {lock} names no pid" in nameless.stderr, nameless.stderr


def test_mapper_reload_fails_when_the_api_keeps_its_token_or_certificate(tmp_path: Path) -> None:
    """A reload reads api.token_file (and api.tls's files) again; one refused then is logged and the
    API keeps the one read before. That was logged on `mapper.api`, which `mapper reload` did not
    hear: `systemctl reload mapper` after a botched token rotation said "reloaded: the mapper runs
    the new files" and exited 0, while the API still took the old token (and the next start refuses
    the file). Now the reload's outcome has the error and `mapper reload` exits 1."""
    token = tmp_path / "api.token"
    token.write_text("a" * 32 + "\n")
    token.chmod(0o600)
    cert, key, other_key = tmp_path / "api.crt", tmp_path / "api.key", tmp_path / "other.key"
    for made, out in ((key, cert), (other_key, tmp_path / "other.crt")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(made), "-out", str(out), "-days", "1", "-subj", "/CN=api"],
                       check=True, capture_output=True, timeout=30)
        made.chmod(0o600)
    env = {"MAPPER_API__PORT": "0", "MAPPER_API__TOKEN_FILE": str(token), "MAPPER_API__TLS__CERT_FILE": str(cert),
           "MAPPER_API__TLS__KEY_FILE": str(key)}
    with running_mapper(tmp_path, env) as mapper:
        mapper.wait_log(r"mapper test-node running: 2 device")
        token.write_text("short\n")  # too short: refused
        kept = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
        assert kept.returncode == 1, kept
        assert "the REST API keeps the token read before" in kept.stderr, kept.stderr
        assert "reloaded" not in kept.stdout, kept.stdout

        token.write_text("b" * 32 + "\n")
        good_key = key.read_bytes()
        key.write_bytes(other_key.read_bytes())  # a renewal gone wrong: not the certificate's key
        kept = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
        assert kept.returncode == 1, kept
        assert (f"api.tls.key_file: {key} is not the private key of the certificate in api.tls.cert_file ({cert});"
                " the REST API keeps the certificate loaded before") in kept.stderr, kept.stderr
        assert "the REST API takes the new token" in mapper.log()

        key.write_bytes(good_key)
        done = _mapper_cli(tmp_path, "reload", "--config", str(mapper.config))
        assert done.returncode == 0, done
        assert "api.tls: the REST API loaded its certificate" in mapper.log()
        mapper.stop()


def test_a_reload_lists_the_config_files_and_the_device_files_mistakes_in_one_go(mapper: Mapper) -> None:
    """Mistakes in several device files, and a bad value in mapper.yaml, SIGHUP: the refused reload
    used to log the config file's alone, the device files' only at the SIGHUP after it was fixed.
    Every one is logged at once, in order (each at its file, line and field), and the previous
    config and devices run on; once the config is fixed, the device files' are all logged again."""
    mapper.wait_log(r"mapper test-node running: 2 device")
    said = write_several_mistakes(mapper.devices, "dev/", anomaly_map=True)
    good = mapper.config.read_text()
    mapper.config.write_text(good.replace("log_level: info", "log_level: loud"))
    level = good.splitlines().index("log_level: info") + 1
    own = f"{mapper.config}:{level}: log_level: 'loud' is not allowed: must be 'debug', 'info', 'warning' or 'error'"

    def refused_in_order(expected: list[str], log: str) -> None:
        at = [log.find(f"ERROR mapper.reload: reload refused: {text}\n") for text in expected]
        assert -1 not in at and at == sorted(at), log

    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload refused: .*error\(s\)")
    refused_in_order([own, *said], log)
    assert f"reload refused: {mapper.config}: {1 + len(said)} error(s); still running the previous config" in log, log

    mapper.config.write_text(good)
    mapper.proc.send_signal(signal.SIGHUP)
    log = mapper.wait_log(r"reload refused: .*error\(s\)", count=2)
    refused_in_order(said, log[log.index(f"{mapper.config}: {1 + len(said)} error(s)"):])
    assert f"reload refused: {len(said)} error(s); still running the previous devices" in log, log
    refused_at = {A: mapper.count(A), B: mapper.count(B)}
    wait_for(lambda: mapper.counts_above({A: refused_at[A] + 5, B: refused_at[B] + 5}),
             what="both devices still counting after the refused reloads")
    assert "reload done" not in mapper.log()
    mapper.stop()
