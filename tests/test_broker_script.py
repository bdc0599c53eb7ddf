"""`scripts/broker.py`: the shipped mosquitto.conf run unprivileged from a checkout, for trying the mapper."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import paho.mqtt.client as mqtt
import pytest
from brokers import free_port, stop_loop

REPO = Path(__file__).resolve().parents[1]
NOT_AUTHORIZED = 135


class Script(NamedTuple):
    process: subprocess.Popen[str]
    lines: list[str]  # its output so far
    reader: threading.Thread


def _start(state: Path, *args: str) -> Script:
    """The script, once it says how to connect."""
    script = subprocess.Popen([sys.executable, "scripts/broker.py", "--state", str(state), "--node", "n1", *args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert script.stdout is not None
        for line in script.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops it."):
                ready.set()
        ready.set()  # (ended: the assertion below says so)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not ready.wait(60) or not lines or not lines[-1].startswith("Ctrl-C"):
        _stop(Script(script, lines, reader))
        raise AssertionError("".join(lines))
    return Script(script, lines, reader)


def _connack(port: int, user: str | None, password: str | None) -> int:
    """The CONNACK's reason code for this login (paho gives MQTT 5's: 0 accepted, 135 not authorized)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if user is not None:
        client.username_pw_set(user, password)
    answered = threading.Event()
    codes: list[int] = []

    def on_connect(client, userdata, flags, code, properties) -> None:  # noqa: ANN001
        codes.append(code.value)
        answered.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        stop_loop(client)
    return codes[0]


def _stop(script: Script) -> None:
    """Ctrl-C: it stops the broker and ends (exit 0)."""
    script.process.send_signal(signal.SIGINT)
    try:
        assert script.process.wait(30) == 0, "".join(script.lines)
    finally:
        script.process.kill()  # (gone already when it stopped)
        script.process.wait()
        script.reader.join(10)
        if script.process.stdout is not None:
            script.process.stdout.close()
    assert script.lines[-1] == "broker stopped\n", "".join(script.lines)


def test_the_broker_script_runs_the_shipped_config_with_passwords_and_says_how_to_connect(tmp_path):
    """The README had no way to run the shipped mosquitto.conf on a laptop (/etc paths, a TLS
    certificate, a pid file the `mosquitto` user cannot write): the script runs it from a state
    directory on the port given, with password files for the mapper and the app, refuses anonymous
    clients as the shipped config does, and stops on Ctrl-C. Run again, it keeps the logins."""
    state = tmp_path / "broker"
    port = free_port()
    script = _start(state, "--port", str(port))
    lines = script.lines
    try:
        assert lines[0].startswith(f"mosquitto (shipped mosquitto/mosquitto.conf: passwords, ACL for node n1) on"
                                   f" mqtt://127.0.0.1:{port}"), lines
        assert f"password_file: {state / 'mapper.password'}" in "".join(lines)
        passwords = {user: (state / f"{user}.password").read_text() for user in ("mapper", "app", "worker")}
        assert {f"{(state / f'{user}.password').stat().st_mode & 0o777:o}" for user in passwords} == {"600"}
        assert _connack(port, "mapper", passwords["mapper"]) == 0
        assert _connack(port, None, None) == NOT_AUTHORIZED  # anonymous
        assert _connack(port, "mapper", "wrong") == NOT_AUTHORIZED
        # The printed app command, its login in the options files (the ACL lets it read telemetry).
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        publisher.username_pw_set("mapper", passwords["mapper"])
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        publisher.publish("mapper/n1/default/fan/power", b"true", qos=1, retain=True).wait_for_publish(10)
        publisher.disconnect()
        stop_loop(publisher)
        # The command as printed (the password in the options file, never on a command line).
        sub = next(line.strip() for line in lines if "mosquitto_sub -v" in line)
        assert sub.startswith("XDG_CONFIG_HOME=") and "-P" not in sub, sub
        watched = subprocess.run(f"{sub} -C 1 -W 10", shell=True, cwd=REPO, capture_output=True, text=True,
                                 timeout=20, check=False)
        assert watched.stdout == "mapper/n1/default/fan/power true\n", watched
    finally:
        _stop(script)
    with pytest.raises(ConnectionRefusedError):  # the broker went with it
        _connack(port, "mapper", passwords["mapper"])

    # Again, on a free port: the same passwords (a mapper config naming the file logs in again).
    script = _start(state)
    lines = script.lines
    try:
        port = int(lines[0].split("mqtt://127.0.0.1:")[1].split()[0])
        assert (state / "mapper.password").read_text() == passwords["mapper"]
        assert _connack(port, "mapper", passwords["mapper"]) == 0
        again = subprocess.run([sys.executable, "scripts/broker.py", "--state", str(state)], cwd=REPO,
                               capture_output=True, text=True, timeout=30, check=False)
        assert again.returncode == 1 and again.stderr.startswith(f"error: another broker is running on {state}"), again
    finally:
        _stop(script)


def test_the_broker_script_leaves_a_shared_directory_alone(tmp_path):
    """`--state` naming a directory others may read (a /tmp, a home, a shared folder): the script
    made it 0700, closing it to everyone else. Now it refuses it, changed in nothing; a directory
    it makes itself is 0700."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    refused = subprocess.run([sys.executable, "scripts/broker.py", "--state", str(shared), "--node", "n1"], cwd=REPO,
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 1 and "is open to other users (mode 1777)" in refused.stderr, refused
    assert shared.stat().st_mode & 0o7777 == 0o1777 and not any(shared.iterdir())
