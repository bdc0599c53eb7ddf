"""docs/raspberry-pi.md stays true: its mapper commands parse, the files it names exist, its config and examples load."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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


def mapper_commands() -> list[list[str]]:
    """The arguments after each `.../mapper` executable in the guide's shell blocks."""
    commands = []
    for line in shell_lines():
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word.endswith("/bin/mapper"):
                commands.append(words[i + 1:])
                break
    return commands


def test_the_guide_still_has_the_mapper_commands_checked_below() -> None:
    """The parametrized check below runs once per `.../bin/mapper` line: if the guide's code
    blocks changed shape (another fence, another path), it would silently check nothing."""
    commands = mapper_commands()
    assert len(commands) >= 8, commands
    for verb in ("--version", "validate", "run", "install-service", "devices", "twin"):
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
