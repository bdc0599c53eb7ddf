"""docs/raspberry-pi.md stays true: its mapper commands parse, the files it names exist, its config and examples load."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from brokers import SHIPPED, MosquittoBroker, acl_users
from helpers import write_devices

from devices.ids import DeviceId
from devices.loader import load
from mapper.cli import parser
from mapper.config import load_config

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "raspberry-pi.md"
SRC = "/opt/mapper/src/"


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


SHELL_OPERATORS = {"|", ">", ">>", "&&", "||", ";"}


def mapper_commands() -> list[list[str]]:
    """The arguments after each `.../mapper` executable in the guide's shell blocks, up to a shell
    operator (`mapper discover --yaml | sudo tee FILE`)."""
    commands = []
    for line in shell_lines():
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word.endswith("/bin/mapper"):
                args = words[i + 1:]
                commands.append(next((args[:j] for j, arg in enumerate(args) if arg in SHELL_OPERATORS), args))
                break
    return commands


def test_the_guide_still_has_the_mapper_commands_checked_below() -> None:
    """The parametrized check below runs once per `.../bin/mapper` line: if the guide's code
    blocks changed shape (another fence, another path), it would silently check nothing."""
    commands = mapper_commands()
    assert len(commands) >= 8, commands
    for verb in ("--version", "validate", "run", "install-service", "devices", "twin", "discover"):
        assert any(args[:1] == [verb] for args in commands), (verb, commands)


@pytest.mark.parametrize("args", mapper_commands(), ids=lambda a: " ".join(a[:2]))
def test_documented_mapper_commands_parse(args: list[str]) -> None:
    """Every `mapper ...` line in the guide is accepted by the CLI's parser."""
    if args == ["--version"]:
        with pytest.raises(SystemExit) as info:
            parser().parse_args(args)
        assert info.value.code == 0
    else:
        parser().parse_args(args)


def test_guide_covers_the_service_commands() -> None:
    """The guide installs, starts and inspects the service, and installs the `pi` extra."""
    text = "\n".join(shell_lines())
    for needed in ("mapper install-service --config", "systemctl enable --now mapper", "systemctl status mapper",
                   "journalctl -u mapper -f", "sudo apt install -y", "mosquitto mosquitto-clients", "[pi]",
                   "pip uninstall -y RPi.GPIO", "pip install --force-reinstall rpi-lgpio"):
        assert needed in text, needed


def test_files_named_in_the_guide_exist() -> None:
    """Paths under /opt/mapper/src/ in the guide are files in this repository."""
    named = {m for line in shell_lines() for m in re.findall(re.escape(SRC) + r"[\w./-]+\.yaml", line)}
    assert named
    for path in named:
        assert (REPO / path.removeprefix(SRC)).is_file(), path


def test_guide_config_and_examples_load(tmp_path: Path) -> None:
    """The mapper.yaml written by the guide is valid, and the examples it copies load with the pins it wires."""
    heredoc = re.search(r"<<'EOF'\n(.*?)\nEOF", GUIDE.read_text(), flags=re.S)
    assert heredoc is not None
    config_path = tmp_path / "mapper.yaml"
    config_path.write_text(heredoc.group(1).replace("/etc/mapper/devices", str(REPO / "devices/examples/pi")))
    config = load_config(config_path, env={})
    result = load(config.devices)
    sensor = result.devices[DeviceId("default", "room-sensor-pi")]
    relay = result.devices[DeviceId("default", "fan-relay-pi")]
    assert sensor.protocol_config.pin == 4 and "GPIO4, physical pin 7" in GUIDE.read_text()
    assert relay.prop("power").visitor.pin == 17 and "GPIO17, physical pin 11" in GUIDE.read_text()



def test_the_ds18b20_example_is_wired_as_the_guide_wires_it() -> None:
    """The guide puts the DS18B20 on GPIO22 (the DHT is on GPIO4); the example's wiring comment says the same."""
    example = (REPO / "devices/examples/pi/water-temperature-ds18b20.yaml").read_text()
    assert "| DATA (yellow) | GPIO22, physical pin 15" in GUIDE.read_text()
    assert "data (yellow) to GPIO22 (physical pin 15" in example
    assert "dtoverlay=w1-gpio,gpiopin=22" in example

def guide_config_text() -> str:
    heredoc = re.search(r"<<'EOF'\n(.*?)\nEOF", GUIDE.read_text(), flags=re.S)
    assert heredoc is not None
    return heredoc.group(1)


def test_the_guide_sets_up_a_broker_that_asks_for_passwords() -> None:
    """The guide's broker is the shipped one, and the mapper logs in to it. It used to keep the
    packaged Mosquitto config (Mosquitto 2's local-only mode: anonymous access from every process
    on the Pi) with a mapper config without user: any local process could switch the relay."""
    text = "\n".join(shell_lines())
    config = yaml.safe_load(guide_config_text())
    mqtt = config.get("mqtt") or {}
    assert mqtt.get("username") and mqtt.get("password_file"), f"the guide's mapper logs in anonymously: {mqtt}"
    assert mqtt["username"] in acl_users(SHIPPED / "acl"), mqtt["username"]
    for needed in ("sudo cp mosquitto/mosquitto.conf /etc/mosquitto/mosquitto.conf",
                   f"sudo mosquitto/render.sh -o /etc/mosquitto/acl -g mosquitto acl {config['node']}",
                   f"sudo mosquitto/mkpasswd.sh {mqtt['username']} app",
                   f"/dev/stdin {mqtt['password_file']}"):
        assert needed in text, needed
    # The password file is made readable by the service's group, which install-service requires.
    assert f"sudo install -m 0640 -o root -g mapper /dev/stdin {mqtt['password_file']}" in text
    # Every mosquitto client line logs in (through the options file the guide writes first).
    clients = [line for line in shell_lines() if re.match(r"mosquitto_(sub|pub)\b", line)]
    assert clients
    options = [i for i, line in enumerate(shell_lines()) if "~/.config/mosquitto_sub" in line]
    assert options and all(shell_lines().index(line) > options[0] for line in clients), clients


def test_the_guide_config_and_app_login_work_with_the_shipped_broker(tmp_path: Path) -> None:
    """The guide's mapper.yaml (devices, URL and password file moved to this test) logs in to the
    shipped broker and publishes; the guide's own line writes the mosquitto_sub options file, with
    which mosquitto_sub, as `app`, receives those readings."""
    devices = write_devices(tmp_path / "devices", ["thermo"])
    config = yaml.safe_load(guide_config_text())
    with MosquittoBroker(node=config["node"]) as broker:  # the ACL rendered for the guide's node
        user = config["mqtt"]["username"]
        secret = tmp_path / "mqtt.password"
        secret.write_text(broker.users[user] + "\n")
        secret.chmod(0o600)
        config["devices"] = [str(devices)]
        config["twin"]["path"] = str(tmp_path / "twin.db")
        config["mqtt"].update(url=f"mqtt://{broker.host}:{broker.port}", password_file=str(secret))
        (tmp_path / "mapper.yaml").write_text(yaml.safe_dump(config))
        # The guide's options-file line, run as it is, with the app password on its standard input.
        line = next(line for line in shell_lines() if "~/.config/mosquitto_sub" in line)
        home = tmp_path / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home)}
        env.pop("XDG_CONFIG_HOME", None)
        subprocess.run(["bash", "-c", line], input=broker.users["app"] + "\n", text=True, env=env, check=True,
                       capture_output=True, timeout=10)
        options = home / ".config" / "mosquitto_sub"
        assert stat.S_IMODE(options.stat().st_mode) == 0o600
        node = config["node"]
        topic = f"mapper/{node}/default/thermo/temperature"
        sub = subprocess.Popen(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-C", "1", "-W", "30",
                                "-v", "-t", topic], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = (tmp_path / "mapper.log").open("w")
        mapper = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(tmp_path / "mapper.yaml")],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            # mosquitto_sub exits after its first message (-C 1), or fails after 30 s without one (-W 30).
            out, err = sub.communicate(timeout=40)
            assert sub.returncode == 0, (sub.returncode, err, (tmp_path / "mapper.log").read_text()[-2000:])
            assert out.startswith(f"{topic} "), out
            assert '"value"' in out, out
        finally:
            for process in (sub, mapper):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=10)
            log.close()


def test_the_readme_parts_the_docs_point_to_are_there() -> None:
    """The guide sent readers to "README.md, Verified" for a disk filling while the mapper runs, a
    section the README no longer has (it is the Durability list of How it fits together). Each
    `README, NAME` of the docs names a heading of the README, a bold lead (`**NAME`) or the start
    of one of its paragraphs."""
    readme = (REPO / "README.md").read_text()
    docs = [GUIDE, REPO / "docs" / "kubeedge.md", REPO / "mosquitto" / "README.md"]
    named = {(doc.name, m) for doc in docs for m in re.findall(r"README(?:\.md)?, ([A-Z][A-Za-z ]+)", doc.read_text())}
    assert ("raspberry-pi.md", "MQTT topics") in named, named
    for doc, name in sorted(named):
        there = re.search(rf"^(## |### )?{re.escape(name)}|\*\*`?{re.escape(name)}", readme, flags=re.M)
        assert there, f"{doc}: README, {name}: no such part of the README"


def test_the_guides_discover_line_leaves_nothing_in_the_devices_directory_when_discover_fails(tmp_path: Path) -> None:
    """The guide's `mapper discover --yaml` line, run as written (its paths pointed at tmp_path) on a Pi
    whose bus is not enabled: `| sudo tee FILE` left an empty file in the devices directory, which the
    mapper refuses (`no Device or DeviceModel in it`): its next start or reload failed."""
    (line,) = [line for line in shell_lines() if line.startswith("/opt/mapper/venv/bin/mapper discover --yaml")]
    devices = tmp_path / "devices"
    devices.mkdir()
    command = (line.replace("/opt/mapper/venv/bin/mapper", f"{shlex.quote(sys.executable)} -m mapper")
               .replace("/etc/mapper/devices", str(devices)).replace("sudo ", ""))
    ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MAPPER_W1_ROOT": str(tmp_path / "no-bus"),
                              "PYTHONPATH": str(REPO)})
    assert "no 1-wire bus" in ran.stderr, ran
    assert list(devices.iterdir()) == [], ran
