"""The README's demo runs end to end: broker, mapper, live telemetry, a desired value applied."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Both demos keep their state in the checkout's one state/demo/ (the second must find the first
# running there): they must not run at once. scripts/test.sh's pytest-xdist workers take whole
# files (--dist loadfile), so they run in one worker, one after the other. (Not --dist loadgroup
# with an xdist_group mark: pytest-xdist 3.8 under pytest 9.2 ignores the mark, pytest-xdist#1386.)


def _reap(demo: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Whatever happened: the demo's whole process group gone, its output reader done."""
    if demo.poll() is None:
        os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
    reader.join(10)
    assert demo.stdout is not None
    demo.stdout.close()


def test_demo_shows_telemetry_and_an_applied_desired_value():
    """`scripts/demo.py` prints live readings, the twin exchange and decisions, and stops cleanly on
    Ctrl-C: the terminal sends SIGINT to its whole process group (the broker too), and the mapper
    still hands every reading to the broker before it goes (the broker used to die first)."""
    # Its own process group, as a terminal gives it: if it hangs, its broker, mapper and worker go down with it.
    demo = subprocess.Popen([sys.executable, "scripts/demo.py", "--duration", "60"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()  # the desired value applied and reported, windows decided at the edge and by the worker

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            text = "".join(lines)
            if all(s in text for s in ("came back as reported", "data   fan-relay.power = True",
                                       "(cloud exit, confidence ", "(edge exit, confidence ")):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(90), "".join(lines)[-3000:]
        # The demo says how to watch it from another terminal, with the app user's password (the
        # broker's passwords used to be known to the demo alone: no subscriber of the user's own got in).
        sub = next((line.split("  ", 2)[-1].strip() for line in lines if "mosquitto_sub " in line), None)
        # Its login comes from an options file: a password on a command line is in `ps` for every local user.
        assert sub is not None and sub.startswith("XDG_CONFIG_HOME=") and "-P" not in sub, "".join(lines)[-3000:]
        watched = subprocess.run(f"{sub} -C 1 -W 10", shell=True, cwd=REPO, capture_output=True, text=True,
                                 timeout=20, check=False)
        assert watched.returncode == 0 and watched.stdout.startswith("mapper/demo-node/"), watched
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        demo.wait(timeout=60)
    finally:
        _reap(demo, reader)
    out = "".join(lines)
    assert demo.returncode == 0, out[-3000:]
    log = (REPO / "state" / "demo" / "mapper.log").read_text()
    # The broker passwords and the twin are the demo's user's alone (the directory was 0755).
    state = REPO / "state" / "demo"
    modes = {p.name: f"{stat.S_IMODE(p.stat().st_mode):04o}" for p in (
        state, state / "mapper.password", state / "worker.password", state / "twin.db", state / "app.password",
        state / "mosquitto_sub", state / "mosquitto_pub")}
    assert modes == {"demo": "0700", "mapper.password": "0600", "worker.password": "0600", "twin.db": "0600",
                     "app.password": "0600", "mosquitto_sub": "0600", "mosquitto_pub": "0600"}, modes
    assert "MQTT connection" not in log, log[-2000:]  # the broker outlived the mapper

    def shows(text: str) -> None:
        assert text in out, f"{text!r} is not in the demo's output:\n{out[-3000:]}"

    shows("data   room-sensor.temperature = ")
    shows('twin   fan-relay: delta {"power": "true"}')  # JSON, as the protocol carries it (was a Python dict)
    shows("twin   fan-relay.power: desired=true reported=true")
    shows("fan-relay: the desired value reached the driver and came back as reported")
    shows("data   fan-relay.power = True")
    shows("outbox: 0 message(s)")
    # Inference: windows decided on the Pi, and uncertain ones answered by the worker the demo runs.
    shows("infer  room-sensor-faulty-sensor-faults: ")
    shows("(edge exit, confidence ")
    shows("(cloud exit, confidence ")
    # The latest decision is also in the twin, as the pipeline's derived device.
    shows("default/room-sensor-faulty-sensor-faults  model=")
    shows("protocol=derived")
    shows("demo stopped")
    assert "data   room-sensor-faulty-sensor-faults.alert" not in out  # an alert is not a reading


def test_a_second_demo_refuses_to_start_and_leaves_the_running_one_alone():
    """Running the demo twice (a second terminal, or `scripts/demo.sh` again): the second used to
    start anyway and delete state/demo/twin.db under the first one's running mapper (and overwrite
    its config and logs). It now refuses at once, naming the running demo, and the first runs on
    and stops cleanly."""
    first = subprocess.Popen([sys.executable, "scripts/demo.py", "--duration", "120"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    running = threading.Event()  # the first demo's mapper is publishing (so its twin exists)

    def read() -> None:
        assert first.stdout is not None
        for line in first.stdout:
            lines.append(line)
            if "data   " in line:
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    second = None
    try:
        assert running.wait(90), "".join(lines)[-3000:]
        twin = REPO / "state" / "demo" / "twin.db"
        assert twin.exists()
        second = subprocess.run([sys.executable, "scripts/demo.py", "--duration", "1"], cwd=REPO,
                                capture_output=True, text=True, timeout=90, start_new_session=True)
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"demo: another demo is running from this checkout (pid {first.pid}" in second.stderr, second.stderr
        assert twin.exists()  # the first one's twin was left alone
        assert first.poll() is None
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        first.wait(timeout=60)
    finally:
        _reap(first, reader)
    assert first.returncode == 0, "".join(lines)[-3000:]
    assert "demo stopped" in "".join(lines)


def test_setup_run_again_installs_nothing_until_pyproject_or_itself_changes(tmp_path):
    """Every `scripts/demo.sh` runs `scripts/setup.sh`, which ran pip three times at each start: a
    page of build warnings before the demo, seconds of rebuild, and the package index asked, so a
    second demo on a Pi offline did not start. Run again with the same pyproject.toml and setup.sh
    it installs nothing; a changed pyproject.toml installs again. (pip is a stand-in here that
    records its calls; the system packages it checks are there wherever the suite runs.)"""
    import shutil

    for tool in ("mosquitto_pub", "openssl"):
        if shutil.which(tool) is None:  # setup.sh would apt-get it: not from a test
            pytest.skip(f"{tool} is not installed")
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    shutil.copy2(REPO / "pyproject.toml", checkout / "pyproject.toml")
    calls = tmp_path / "pip-calls"
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "mapper").write_text("#!/bin/sh\n")
    for tool in ("python", "mapper"):
        (bin_dir / tool).chmod(0o755)

    def setup() -> list[str]:
        before = calls.read_text().splitlines() if calls.exists() else []
        done = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done
        return (calls.read_text().splitlines() if calls.exists() else [])[len(before):]

    first = setup()
    assert len(first) == 3 and all(call.startswith("-m pip install") for call in first), first  # noqa: PLR2004
    assert setup() == []
    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a new dependency, say\n")
    assert len(setup()) == 3  # noqa: PLR2004
