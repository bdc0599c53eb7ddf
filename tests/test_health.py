"""`mapper health`: the exit code of a liveness/readiness probe, from what the running mapper leaves
behind (its twin's lock file, the broker note in its twin), reaching no broker and writing nothing."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import files_of, wait_for, write_config, write_devices

REPO = Path(__file__).resolve().parents[1]


def health(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapper", "health", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def health_json(config: Path, *args: str) -> dict:
    done = health(config, "--json", *args)
    shown = json.loads(done.stdout)
    assert done.returncode == (0 if shown["healthy"] else 1), (done.returncode, shown)
    return shown


def health_touching_nothing(state: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """`mapper health`, asserting that it left every file of the state directory as it was."""
    files = files_of(state)
    done = health(config, *args)
    assert files_of(state) == files, done
    return done


def test_health_follows_the_mapper_and_its_broker(tmp_path, broker_for):
    """Healthy while the mapper runs connected; still healthy while the broker has been unreachable for
    less than --broker-down-s, unhealthy past it (0 here: at once, so the test waits for no threshold);
    unhealthy once the mapper has stopped. One line each time, saying why."""
    from mapper_proc import MapperProcess

    broker = broker_for("test-node")
    url = f"mqtt://{broker.host}:{broker.port}"
    run = MapperProcess(tmp_path, write_devices(tmp_path / "dev", ["lamp"], cycle=200), broker)
    before = health(run.config)
    assert before.returncode == 1, before
    assert before.stdout == (f"unhealthy: no mapper runs on the twin {run.twin_path}"
                             f" (nobody holds {run.twin_path}.lock)\n")
    with run:
        wait_for(lambda: health_json(run.config)["healthy"], timeout=20, what="a healthy mapper")
        shown = wait_for(lambda: (done := health(run.config)).returncode == 0 and "connected to" in done.stdout
                         and done, what="its broker connection noted")
        pid = run.process.pid
        assert shown.stdout.startswith(f"healthy: the mapper (pid {pid}) runs, connected to {url} since "), shown.stdout
        assert shown.stdout.count("\n") == 1, shown.stdout

        broker.stop()
        noted = wait_for(lambda: (shown := health_json(run.config))["broker"]
                         and not shown["broker"]["connected"] and shown, what="the broker's loss noted")
        assert noted["healthy"] is True, noted  # less than the default 300 s down
        assert f"broker {url} unreachable for " in noted["reason"] and "unhealthy after 300 s" in noted["reason"], noted
        down = health(run.config, "--broker-down-s", "0")
        assert down.returncode == 1, down
        assert down.stdout.startswith(f"unhealthy: broker {url} unreachable for "), down.stdout
        assert "(more than 0 s)" in down.stdout and down.stdout.count("\n") == 1, down.stdout
        assert run.stop() == 0
    after = health(run.config)
    assert after.returncode == 1, after
    assert after.stdout.startswith(f"unhealthy: no mapper runs on the twin {run.twin_path}"), after.stdout


def test_health_reads_a_stopped_mapper_s_twin_without_touching_it(tmp_path, broker):
    """A probe runs every few seconds for the node's lifetime: it must not write the twin, take its
    write lock or make files beside it. A reader of a WAL twin nobody has open makes its -wal and
    -shm (a clean stop removed them): the twin of a stopped mapper is not opened at all."""
    from mapper_proc import MapperProcess

    state = tmp_path / "state"
    state.mkdir()
    run = MapperProcess(tmp_path, write_devices(tmp_path / "dev", ["lamp"], cycle=200), broker,
                        twin=state / "twin.db")
    with run:
        wait_for(lambda: health_json(run.config)["healthy"], timeout=20, what="a healthy mapper")
        assert run.stop() == 0
    for stopped in ("a clean stop", "a crash"):
        if stopped == "a crash":  # its -wal and -shm stay
            run.start()
            wait_for(lambda: health_json(run.config)["healthy"], timeout=20, what="a healthy mapper")
            run.kill()
        assert health_touching_nothing(state, run.config).returncode == 1, stopped
        assert health_touching_nothing(state, run.config, "--json").returncode == 1, stopped


def test_health_says_when_the_running_mapper_no_longer_writes_its_twin(tmp_path):
    """The running mapper notes its broker connection in the twin every 60 s: a note older than
    --stale-s (its twin refuses writes, or it is stuck) is unhealthy, as is a run that has noted none
    for that long. The twin is read while it is open (as the mapper keeps it) and left as it was.
    (The running mapper: this process, holding the twin's lock, its twin open.)"""
    from twin.store import BROKER_META, TwinStore

    state = tmp_path / "state"
    twin = state / "twin.db"
    url = "mqtt://127.0.0.1:1883"
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), twin,
                          extra=f"mqtt:\n  url: {url}\n")
    hour_ago = round((time.time() - 3600) * 1000)
    with TwinStore.open(twin) as store, open(f"{twin}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        os.utime(lock.fileno(), (hour_ago / 1000, hour_ago / 1000))  # running for an hour
        silent = health_touching_nothing(state, config)
        assert silent.returncode == 1, silent
        assert silent.stdout.startswith(f"unhealthy: twin not written: the mapper (pid {os.getpid()}) has run for 60 min"
                                        f" without noting its broker connection in {twin}"), silent.stdout

        store.swap_meta(BROKER_META, json.dumps({"url": url, "connected": True, "since": hour_ago - 5000,
                                                 "error": None, "pid": os.getpid(), "noted": hour_ago}))
        # An hour-old note with this pid, from before this run ran: an earlier run's (a container's mapper
        # is pid 1 at every start), not this one's, which has just begun running.
        os.utime(lock.fileno())
        fresh_run = health(config)
        assert fresh_run.returncode == 0, fresh_run
        assert fresh_run.stdout == f"healthy: the mapper (pid {os.getpid()}) runs; it has not noted its broker" \
                                   " connection yet\n", fresh_run.stdout

        two_hours_ago = hour_ago / 1000 - 3600
        os.utime(lock.fileno(), (two_hours_ago, two_hours_ago))  # this run's note, not renewed for an hour
        stale = health_touching_nothing(state, config)
        assert stale.returncode == 1, stale
        assert stale.stdout.startswith(f"unhealthy: twin not written for 60 min: the mapper (pid {os.getpid()}) notes"
                                       f" its broker connection in {twin} every 60 s, last at "), stale.stdout
        assert health(config, "--stale-s", "7200").returncode == 0  # within a longer bound

        store.swap_meta(BROKER_META, json.dumps({"url": url, "connected": True, "since": hour_ago,
                                                 "error": None, "pid": os.getpid(), "noted": round(time.time() * 1000)}))
        assert health(config).returncode == 0

        alone = write_config(tmp_path / "alone.yaml", tmp_path / "dev", twin)  # no mqtt: only whether it runs
        assert health_touching_nothing(state, alone).stdout == (
            f"healthy: the mapper (pid {os.getpid()}) runs on the twin {twin} (no mqtt section: no broker to check)\n")

        lock.seek(0)
        lock.write(f"{os.getpid()} starting\n")
        lock.flush()
        starting = health(config)
        assert starting.returncode == 1, starting
        assert starting.stdout.startswith(f"unhealthy: the mapper (pid {os.getpid()}) is starting, not running yet")


def test_health_refuses_a_stale_bound_below_the_mapper_s_own_refresh(tmp_path):
    """--stale-s at or below the 60 s between the mapper's notes would call a healthy mapper stale."""
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), tmp_path / "twin.db")
    done = health(config, "--stale-s", "30")
    assert done.returncode == 2
    assert "--stale-s: must be more than 60 (the running mapper notes its broker connection in the twin every 60 s)" \
        in done.stderr, done.stderr
