"""`mapper lock` / `mapper unlock`: a device locked for maintenance is read and reported, but
nothing is written to it (MQTT /set, the twin protocol, REST, `mapper twin set`) until it is
unlocked; an auto-off still switches an output off. Real Mosquitto, real twin files, the
simulated driver and the GPIO driver on its fake pins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devices.ids import DeviceId
from helpers import async_wait_for, async_wait_until, running_service, write_config, write_devices
from mapper.config import load_config
from mapper_proc import MapperProcess
from test_gpio import MODEL, RELAY, device_yaml, wire_of
from test_twin_protocol import HW, Sub, pub
from twin.records import Reading
from twin.store import DeviceLocked, TwinStore

REPO = Path(__file__).resolve().parents[1]
LAMP = DeviceId("default", "lamp")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapper", *args], capture_output=True, text=True, timeout=30,
                          cwd=REPO)


def test_a_locked_device_is_read_but_refuses_every_write_until_unlocked(broker, tmp_path):
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    with MapperProcess(tmp_path, devices, broker) as proc:
        config = str(proc.config)
        proc.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", f"{HW}/#", "mapper/test-node/default/lamp/#")
        try:
            sub.expect("mapper/test-node/default/lamp/state")
            locked = cli("lock", "lamp", "--reason", "rewiring the pump", "--config", config)
            assert locked.returncode == 0, locked
            assert "default/lamp is locked for maintenance since " in locked.stdout
            assert "rewiring the pump" in locked.stdout and "`mapper unlock default/lamp`" in locked.stdout
            view = sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" in b)
            assert view["$locked"]["reason"] == "rewiring the pump" and view["$locked"]["by"], view
            # Still read and reported: the counter goes on.
            seen = sub.expect("mapper/test-node/default/lamp/count")["value"]
            sub.expect("mapper/test-node/default/lamp/count", lambda b: b["value"] > seen)

            pub(broker, "mapper/test-node/default/lamp/power/set", "true")
            proc.wait_log("refused set for default/lamp: 423 refused: default/lamp is locked for maintenance")
            pub(broker, f"{HW}/twin/update",
                '{"event_id":"e1","timestamp":0,"twin":{"power":{"expected":{"value":"true"}}}}')
            result = sub.expect(f"{HW}/twin/update/result", lambda b: b.get("event_id") == "e1")
            assert result["code"] == 423, result
            assert "rewiring the pump" in result["reason"] and "`mapper unlock default/lamp`" in result["reason"]
            refused = cli("twin", "set", "lamp", "power", "true", "--config", config)
            assert refused.returncode == 1 and refused.stdout == "", refused
            assert refused.stderr.startswith("error: refused: default/lamp is locked for maintenance since "), refused
            assert "`mapper unlock default/lamp`" in refused.stderr

            twin = json.loads(cli("twin", "get", "lamp", "--config", config, "--json").stdout)
            assert twin["locked"]["reason"] == "rewiring the pump", twin
            assert twin["properties"]["power"]["desired"] is None and twin["properties"]["power"]["reported"] is False
            assert "LOCKED: default/lamp is locked for maintenance" in cli("twin", "get", "lamp", "--config",
                                                                           config).stdout
            assert "LOCKED since " in cli("devices", "--config", config).stdout

            # The lock is in the twin: a restart keeps it.
            assert proc.stop() == 0
            proc.start()
            proc.wait_log("connected to mqtt://", count=2)
            sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" in b)
            pub(broker, "mapper/test-node/default/lamp/power/set", "true")
            proc.wait_log("refused set for default/lamp: 423", count=2)

            unlocked = cli("unlock", "lamp", "--config", config)
            assert unlocked.returncode == 0 and "default/lamp unlocked" in unlocked.stdout, unlocked
            sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" not in b)
            assert cli("twin", "set", "lamp", "power", "true", "--config", config).returncode == 0
            sub.expect("mapper/test-node/default/lamp/power", lambda b: b["value"] is True)
        finally:
            sub.close()
            assert proc.stop() == 0
    assert "not locked" in cli("unlock", "lamp", "--config", config).stdout


def test_every_command_shows_the_locks_time_in_one_format(tmp_path):
    """`mapper lock` and `mapper twin get` said `since 2026-12-01 11:25:56 UTC`, `mapper unlock` and
    `mapper devices` `since 2026-12-01 11:25:56.643Z`: the same lock's time, written two ways. All
    four say it as the lock does now (AdminLock.since_text)."""
    from datetime import UTC, datetime

    from devices.loader import load

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = str(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    locked = cli("lock", "lamp", "--reason", "wiring", "--config", config)
    assert locked.returncode == 0, locked
    with TwinStore.open(tmp_path / "twin.db") as store:
        lock = store.admin_lock(LAMP)
    since = datetime.fromtimestamp(lock.since_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    by = lock.by
    assert locked.stdout.splitlines()[0] == (f"default/lamp is locked for maintenance since {since} by {by}: wiring;"
                                             " nothing is written to it until `mapper unlock default/lamp` (on the"
                                             " mapper's host)"), locked.stdout
    shown = cli("twin", "get", "lamp", "--config", config)
    assert f"LOCKED: {locked.stdout.splitlines()[0]}" in shown.stdout.splitlines(), shown
    listed = cli("devices", "--config", config)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("default/lamp "))
    assert f" LOCKED since {since} by {by}: wiring" in row, listed.stdout
    unlocked = cli("unlock", "lamp", "--config", config)
    assert unlocked.stdout.splitlines()[0] == (f"default/lamp unlocked (locked since {since} by {by}: wiring); the"
                                               " values refused meanwhile are not written: set them again (mapper"
                                               " twin set, MQTT)"), unlocked


def test_locking_a_device_the_config_no_longer_defines_warns(tmp_path):
    """A device removed from the config stays in the twin, inactive: `mapper lock` locked it without
    a word, as if a mapper ran it. The lock is still taken (it holds if the device comes back:
    maintenance on a device taken out of the config for it), with a warning saying the config does
    not define it."""
    from devices.loader import load

    devices = write_devices(tmp_path / "dev", ["lamp", "pump"])
    config = str(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    (devices / "pump.yaml").unlink()  # removed from the config, as a reload or the next start makes it
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.deactivate_devices([LAMP])
    pump = DeviceId("default", "pump")
    locked = cli("lock", "pump", "--config", config)
    assert locked.returncode == 0, locked
    assert locked.stdout.startswith("default/pump is locked for maintenance since "), locked
    assert locked.stderr == (f"warning: {config} does not define default/pump: the twin {tmp_path / 'twin.db'} keeps it"
                             " from an earlier run, inactive, and no mapper runs it; the lock holds if the device comes"
                             " back (`mapper unlock default/pump` releases it)\n"), locked
    again = cli("lock", "pump", "--config", config)  # (locked already: said again, as the lock is)
    assert again.returncode == 0 and again.stderr == locked.stderr, again
    with TwinStore.open(tmp_path / "twin.db") as store:
        assert set(store.admin_locks()) == {pump}
    defined = cli("lock", "lamp", "--config", config)
    assert defined.returncode == 0 and defined.stderr == "", defined


def test_the_state_view_says_a_lock_and_an_unlock_at_once_not_at_the_next_report(broker, tmp_path):
    """Home Assistant's controls follow the view's `$locked`: a device reported once an hour must not
    keep its switch usable for up to an hour after `mapper lock`, nor unavailable after `mapper unlock`."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=3_600_000)
    with MapperProcess(tmp_path, devices, broker) as proc:
        config = str(proc.config)
        proc.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "mapper/test-node/default/lamp/state")
        try:
            sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" not in b)
            assert cli("lock", "lamp", "--reason", "wiring", "--config", config).returncode == 0
            view = sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" in b)
            assert view["$locked"]["reason"] == "wiring", view
            assert cli("lock", "lamp", "--reason", "wiring, call Ann", "--config", config).returncode == 0
            sub.expect("mapper/test-node/default/lamp/state",
                       lambda b: b.get("$locked", {}).get("reason") == "wiring, call Ann")
            assert cli("unlock", "lamp", "--config", config).returncode == 0
            sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" not in b)
        finally:
            sub.close()
            assert proc.stop() == 0


def test_locking_drops_a_pending_value_and_an_unknown_device_is_named(tmp_path):
    """A value set before the lock and not yet written is never written: not while locked, not at
    the unlock (a relay switched on by an old command would surprise the person who unlocks it)."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    from devices.loader import load

    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.set_desired(LAMP, "power", True)  # no mapper runs: pending
        store.record([Reading(LAMP, "power", True, 1_000)])  # and last read on (by hand, say)
    locked = cli("lock", "lamp", "--config", str(config))
    assert locked.returncode == 0, locked
    assert "dropped the desired values not yet written (power)" in locked.stdout
    # The lock switches nothing: the note says how to have it off (once locked, no write can).
    assert ("the lock writes nothing: power=true as last reported. If it must be off, unlock, switch it off and"
            " lock again: `mapper unlock default/lamp`, `mapper twin set default/lamp power false`, then"
            " `mapper lock default/lamp`") in locked.stdout, locked.stdout
    again = cli("lock", "lamp", "--config", str(config))
    assert again.returncode == 0 and again.stdout.startswith("already locked, left as it was: "), again
    first = again.stdout.removeprefix("already locked, left as it was: ")
    assert first.startswith("default/lamp is locked for maintenance since ") and "dropped" not in again.stdout
    # A new reason replaces the reason (an unlock to correct it would let writes through meanwhile);
    # the lock's time and holder stay the first lock's.
    reasoned = cli("lock", "lamp", "--reason", "another", "--config", str(config))
    assert reasoned.returncode == 0, reasoned
    assert reasoned.stdout == ("already locked: its reason is now 'another' (was none), its time and holder left as"
                               f" they were: {first.replace('; nothing is written', ': another; nothing is written')}")
    assert cli("lock", "lamp", "--reason", "another", "--config", str(config)).stdout.startswith(
        "already locked, left as it was: ")
    with TwinStore.open(tmp_path / "twin.db") as store:
        assert store.pending_desired() == []
        power = store.device(LAMP).properties["power"]
        assert power.desired is True and "dropped when default/lamp was locked" in power.apply_error
        with pytest.raises(DeviceLocked, match="mapper unlock default/lamp"):
            store.set_desired(LAMP, "count", 3)
        assert store.admin_lock(LAMP).reason == "another"
    unlocked = cli("unlock", "lamp", "--config", str(config))
    assert unlocked.returncode == 0 and "default/lamp unlocked (locked since " in unlocked.stdout, unlocked
    not_locked = cli("unlock", "lamp", "--config", str(config))  # idempotent, and says so
    assert not_locked.returncode == 0 and not_locked.stdout == "default/lamp was not locked\n", not_locked
    with TwinStore.open(tmp_path / "twin.db") as store:
        assert store.pending_desired() == []  # the unlock writes nothing
    unknown = cli("lock", "lamb", "--config", str(config))
    assert unknown.returncode == 1 and "did you mean default/lamp" in unknown.stderr, unknown


def _relay_devices(tmp_path: Path, relay: str) -> Path:
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "model.yaml").write_text(MODEL)
    (devices / "io.yaml").write_text(device_yaml("io", RELAY % relay).replace(
        "visitors:", "collectCycle: 50\n    visitors:"))
    return devices


async def test_an_auto_off_still_switches_a_locked_relay_off(tmp_path):
    """The safety direction is not blocked: the relay on when the lock came goes off at its
    auto_off_s, and the twin takes `false` as its desired value; an on is refused."""
    devices = _relay_devices(tmp_path, "{pin: 18, direction: out, auto_off_s: 0.5}")
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    io = DeviceId("default", "io")

    def relay():
        with TwinStore.open(config.twin.path) as store:
            return store.device(io).properties["relay"]

    async with running_service(config) as service:
        wire = wire_of(service.runners[io].driver)
        with TwinStore.open(config.twin.path) as store:
            store.set_desired(io, "relay", True)
        await async_wait_for(lambda: relay().reported is True, what="relay on")
        with TwinStore.open(config.twin.path) as store:
            store.lock_device(io, "ann", "pump rewiring")
        await async_wait_for(lambda: relay().reported is False and relay().desired is False,
                             what="the auto-off while locked")
        assert wire.pin(18).level is False
        with TwinStore.open(config.twin.path) as store, pytest.raises(DeviceLocked, match="pump rewiring"):
            store.set_desired(io, "relay", True)
        assert relay().apply_error is None


async def test_a_locked_relay_is_not_restored_at_a_start(tmp_path):
    """`initial: restore` writes the twin's last value at a start: not while locked, nor at the unlock."""
    devices = _relay_devices(tmp_path, "{pin: 18, direction: out, initial: restore}")
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    io = DeviceId("default", "io")
    async with running_service(config):
        with TwinStore.open(config.twin.path) as store:
            store.set_desired(io, "relay", True)

        def on() -> bool:
            with TwinStore.open(config.twin.path) as store:
                return store.device(io).properties["relay"].reported is True

        await async_wait_for(on, what="relay on")
    with TwinStore.open(config.twin.path) as store:
        store.lock_device(io, "ann", "")
    async with running_service(config) as service:
        wire = wire_of(service.runners[io].driver)
        runner = service.runners[io]
        await async_wait_for(lambda: runner.state == "ok", what="the relay's device open")
        assert wire.pin(18).states.count(True) == 0, wire.pin(18).states  # never switched on
        with TwinStore.open(config.twin.path) as store:
            store.unlock_device(io)
        assert await service.twin(lambda s: s.pending_desired()) == []  # nothing to write at the unlock
        assert wire.pin(18).states.count(True) == 0, wire.pin(18).states
        relay = await service.twin(lambda s: s.device(io).properties["relay"])
        assert relay.desired is False and not relay.delta, relay  # the value from before the lock is gone
    async with running_service(config) as service:  # so a start after the unlock does not restore it
        runner = service.runners[io]
        await async_wait_for(lambda: runner.state == "ok", what="the relay's device open")
        assert wire_of(runner.driver).pin(18).states.count(True) == 0


async def test_a_value_stored_just_before_the_lock_is_not_written(tmp_path):
    """The device loop asks the twin before each write: a value that reached it as the lock was
    taken (stored, not yet written, not dropped by the lock) is refused for good, not written."""
    from devices.loader import load

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    with TwinStore.open(config.twin.path) as store:
        store.sync_devices(load([devices]).devices.values())
        store.set_desired(LAMP, "power", True)
        # (as lock_device stores it, without its drop of the pending value: the race it loses)
        store.conn.execute("INSERT INTO admin_locks (device_id, since_ms, by, reason) VALUES (?, 0, 'ann', 'x')",
                           (str(LAMP),))
    async with running_service(config) as service:
        power = await async_wait_until(lambda: service.twin(lambda s: s.device(LAMP).properties["power"]),
                                       lambda p: p.apply_error is not None, what="the value refused")
        assert power.apply_error.startswith("write failed: not written: default/lamp is locked for maintenance"), power
        assert await service.twin(lambda s: s.pending_desired()) == []  # refused for good: not at the unlock
        await service.recorder.flush()
        power = await async_wait_until(lambda: service.twin(lambda s: s.device(LAMP).properties["power"]),
                                       lambda p: p.reported is not None, what="power read")
        assert power.reported is False


async def test_a_desired_value_a_device_file_gives_while_locked_is_not_written(tmp_path):
    """A Device's `desired:` (a local file's, or the Device edgecore sends in kubeedge mode) taken
    up while the device is locked is stored, not written: the device loop refuses it for good."""
    from devices.loader import load

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db"))
    with TwinStore.open(config.twin.path) as store:
        store.sync_devices(load([devices]).devices.values())
        store.lock_device(LAMP, "ann", "pump rewiring")
    lamp = devices / "lamp.yaml"
    anchor = "    - name: power\n"
    lamp.write_text(lamp.read_text().replace(anchor, anchor + '      desired: {value: "true"}\n'))
    async with running_service(config) as service:
        power = await async_wait_until(lambda: service.twin(lambda s: s.device(LAMP).properties["power"]),
                                       lambda p: p.apply_error is not None, what="the file's value refused")
        assert power.desired is True and "pump rewiring" in power.apply_error, power
        await service.recorder.flush()
        power = await async_wait_until(lambda: service.twin(lambda s: s.device(LAMP).properties["power"]),
                                       lambda p: p.reported is not None, what="power read")
        assert power.reported is False


def test_a_device_is_locked_before_the_first_run_and_a_name_no_config_defines_is_refused(broker, tmp_path):
    """`mapper lock` needed a twin (`no twin at ...: mapper run creates it`): a device could not be
    locked before the mapper's first start, nor one added to the config since its last. The twin is
    now made as `mapper run` makes it, and the lock holds from the device's first start; a name that
    neither the config nor the twin has is refused before anything is made, naming the config's devices."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    proc = MapperProcess(tmp_path, devices, broker, twin=tmp_path / "state" / "twin.db")
    config = str(proc.config)
    unknown = cli("lock", "pump", "--config", config)
    assert unknown.returncode == 1 and unknown.stderr == (
        f"error: unknown device default/pump: {config} defines default/lamp, and the twin {proc.twin_path} has no"
        " device\n"), unknown
    assert not (tmp_path / "state").exists()
    not_locked = cli("unlock", "lamp", "--config", config)
    assert not_locked.returncode == 0 and not_locked.stdout.startswith("default/lamp was not locked (no twin at "), \
        not_locked
    assert not (tmp_path / "state").exists()

    locked = cli("lock", "lamp", "--reason", "wiring", "--config", config)
    assert locked.returncode == 0, locked
    assert locked.stdout.startswith("default/lamp is locked for maintenance since ")
    assert (f"made the twin {proc.twin_path} (no `mapper run` had made it yet): the lock holds from the mapper's first"
            " start") in locked.stdout
    # As `mapper run` makes it: the directory and the file its user's alone, migrated.
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700 and proc.twin_path.stat().st_mode & 0o777 == 0o600
    with proc:
        proc.wait_log("connected to mqtt://")
        sub = Sub(broker, "app", "mapper/test-node/default/lamp/#")
        try:
            view = sub.expect("mapper/test-node/default/lamp/state", lambda b: "$locked" in b)
            assert view["$locked"]["reason"] == "wiring", view
            pub(broker, "mapper/test-node/default/lamp/power/set", "true")
            proc.wait_log("refused set for default/lamp: 423 refused: default/lamp is locked for maintenance")
        finally:
            sub.close()
            assert proc.stop() == 0

    # A device added to the config since the last run: locked before it is in the twin, unlocked too.
    write_devices(tmp_path / "dev", ["lamp", "fan"], cycle=100)
    added = cli("lock", "fan", "--config", config)
    assert added.returncode == 0 and ("default/fan is not in the twin yet (no `mapper run` since it was added): the lock"
                                      " holds from its first start") in added.stdout, added
    misspelt = cli("lock", "fna", "--config", config)
    assert misspelt.returncode == 1 and "did you mean default/fan?" in misspelt.stderr, misspelt
    with TwinStore.open(proc.twin_path) as store:
        assert set(store.admin_locks()) == {LAMP, DeviceId("default", "fan")}
    assert cli("unlock", "fan", "--config", config).stdout.startswith("default/fan unlocked (locked since ")
    assert cli("unlock", "fan", "--config", config).stdout == "default/fan was not locked\n"


def test_a_device_is_locked_before_the_first_run_while_another_device_file_has_a_mistake(tmp_path):
    """A mistake in one device file made every device unknown to `mapper lock` before the first run
    (`device files cannot be read (mapper check ...)`, a command that does not exist): the lamp, whose
    file is right, could not be locked while the other was being fixed."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    lamp = (devices / "lamp.yaml").read_text()
    (devices / "other.yaml").write_text(lamp.replace("name: lamp", "name: other").replace("{kind: switch}",
                                                                                         "{knd: switch}"))
    twin = tmp_path / "state" / "twin.db"
    config = str(write_config(tmp_path / "c.yaml", devices, twin))
    unknown = cli("lock", "pump", "--config", config)
    assert unknown.returncode == 1 and unknown.stderr == (
        f"error: unknown device default/pump: {config} defines default/lamp (some of its device files cannot be"
        f" read: `mapper validate --config {config}` says why), and the twin {twin} has no device\n"), unknown
    assert not twin.parent.exists()
    locked = cli("lock", "lamp", "--reason", "wiring", "--config", config)
    assert locked.returncode == 0 and locked.stdout.startswith("default/lamp is locked for maintenance"), locked
    assert cli("unlock", "lamp", "--config", config).stdout.startswith("default/lamp unlocked")
