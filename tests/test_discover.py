"""`mapper discover` and the 1-wire checks of `mapper validate --config` and `mapper run` (devices/w1.py).

Where the fake sits: the kernel's w1 devices directory and the Pi's config.txt are the hardware
boundary. Each test lays out a w1 directory in tmp_path as /sys/bus/w1/devices is (a bus
master, a `28-...` directory per sensor with the `w1_slave` the kernel shows) and writes a
config.txt, and points the real CLI at them (--w1-root or MAPPER_W1_ROOT; MAPPER_BOOT_CONFIG).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from helpers import wait_for, write_config
from test_ds18b20 import W1Bus, w1_slave

from devices.w1 import w1_overlay_pins

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "devices/examples/pi/water-temperature-ds18b20.yaml"
RELAY = REPO / "devices/examples/pi/relay-gpio.yaml"
DHT = REPO / "devices/examples/pi/room-sensor-dht.yaml"
PROBE = "28-0316a2795bff"


def mapper(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapper", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture
def bus(tmp_path: Path) -> W1Bus:
    """A bus with a DS18B20 at 23.125 C, a DS18S20 a kernel shows only `temperature` of, and a
    DS2413 (a switch, family 3a: not a temperature sensor)."""
    bus = W1Bus(tmp_path / "w1")
    bus.show(w1_slave(23125), sensor=PROBE)
    bus.show("-10062\n", sensor="10-000802b4d8e1", name="temperature")
    (bus.root / "3a-00000012ab34").mkdir()
    return bus


# -- discover ----------------------------------------------------------------------------------


def test_discover_lists_each_sensor_with_its_reading(bus: W1Bus) -> None:
    listed = mapper("discover", "--w1-root", str(bus.root))
    assert listed.returncode == 0, listed
    lines = listed.stdout.splitlines()
    assert lines[0] == f"1-wire bus {bus.root} (w1_bus_master1): 2 temperature sensor(s)", listed.stdout
    assert lines[1].split() == ["10-000802b4d8e1", "DS18S20", "ds18s20-000802b4d8e1", "-10.062", "C"], lines
    assert lines[2].split() == [PROBE, "DS18B20", "ds18b20-0316a2795bff", "23.125", "C"], lines
    assert "not temperature sensors (no driver here reads them): 3a-00000012ab34" in listed.stdout
    assert "`mapper discover --yaml > FILE`" in listed.stdout


def test_discover_json_from_the_environments_root_shows_a_failed_read(bus: W1Bus) -> None:
    bus.show(w1_slave(23125, crc="NO"), sensor="28-0000000000aa")
    found = mapper("discover", "--json", env={"MAPPER_W1_ROOT": str(bus.root)})
    assert found.returncode == 0, found
    body = orjson.loads(found.stdout)
    assert (body["w1Root"], body["bus"], body["problem"], body["otherDevices"]) == (
        str(bus.root), True, None, ["3a-00000012ab34"])
    by_id = {s["id"]: s for s in body["sensors"]}
    assert by_id[PROBE] == {"id": PROBE, "chip": "DS18B20", "celsius": 23.125, "device": "ds18b20-0316a2795bff",
                            "error": None, "errorKind": None}
    assert by_id["28-0000000000aa"]["celsius"] is None and by_id["28-0000000000aa"]["errorKind"] == "crc"
    assert "CRC check failed" in by_id["28-0000000000aa"]["error"]


def test_discover_gives_up_a_read_that_never_returns_and_lists_the_others(bus: W1Bus) -> None:
    """A sensor whose read the kernel never returns (a hung bus; here its w1_slave a FIFO nobody writes):
    discover waited for ever, showing nothing. It is shown as a failed read (timeout), the others read."""
    hung = bus.root / "28-00000000dead"
    hung.mkdir()
    os.mkfifo(hung / "w1_slave")
    listed = mapper("discover", "--json", "--w1-root", str(bus.root))
    assert listed.returncode == 0, listed
    by_id = {s["id"]: s for s in orjson.loads(listed.stdout)["sensors"]}
    assert by_id["28-00000000dead"]["errorKind"] == "timeout", by_id
    assert "no answer within 5 s" in by_id["28-00000000dead"]["error"], by_id
    assert by_id[PROBE]["celsius"] == 23.125, by_id


def test_discover_yaml_is_accepted_by_validate_as_is(tmp_path: Path, bus: W1Bus) -> None:
    """The Devices use a DeviceModel over the sensor's whole range (ds18b20-model), written out with them:
    it needs no example file (a wheel install has none)."""
    written = mapper("discover", "--yaml", "--w1-root", str(bus.root))
    assert written.returncode == 0, written
    saved = tmp_path / "devices" / "w1.yaml"
    saved.parent.mkdir()
    saved.write_text(written.stdout)
    checked = mapper("validate", str(saved))
    assert checked.returncode == 0, checked
    assert checked.stdout.startswith("ok: 2 device(s), 1 model(s)"), checked.stdout
    assert "warning" not in checked.stderr, checked.stderr
    assert written.stdout.count("name: ds18b20-model") == 3  # the model, and each device's reference to it
    assert 'minimum: "-55"' in written.stdout and 'maximum: "125"' in written.stdout
    assert "name: ds18b20-0316a2795bff" in written.stdout and "name: ds18s20-000802b4d8e1" in written.stdout
    # Run as they are, they read the bus they were found on: --config finds them there.
    config = write_config(tmp_path / "mapper.yaml", saved.parent, tmp_path / "state" / "twin.db")
    run_checks = mapper("validate", "--config", str(config))
    assert run_checks.returncode == 0 and "1-wire" not in run_checks.stderr, run_checks


def test_discover_without_a_bus_says_how_to_enable_the_overlay(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", (tmp_path / "no-master")):
        if root.name == "no-master":
            root.mkdir()  # (the w1 module loaded, but no bus master: no overlay)
        for shown in ((), ("--yaml",)):
            missing = mapper("discover", "--w1-root", str(root), *shown)
            assert missing.returncode == 1 and missing.stdout == "", missing
            assert missing.stderr.startswith(f"error: no 1-wire bus: {root} "), missing.stderr
            assert "dtoverlay=w1-gpio,gpiopin=N" in missing.stderr and "/boot/firmware/config.txt" in missing.stderr
            assert "then reboot" in missing.stderr, missing.stderr
    (tmp_path / "a-file").write_text("")
    not_a_directory = mapper("discover", "--w1-root", str(tmp_path / "a-file"))
    assert not_a_directory.returncode == 1 and "Traceback" not in not_a_directory.stderr, not_a_directory
    assert f"cannot list the w1 devices directory {tmp_path / 'a-file'}: Not a directory" in not_a_directory.stderr
    as_json = mapper("discover", "--json", "--w1-root", str(tmp_path / "absent"))
    assert as_json.returncode == 1, as_json
    body = orjson.loads(as_json.stdout)
    assert body["bus"] is False and "dtoverlay=w1-gpio" in body["problem"], body


def test_discover_on_a_bus_without_sensors_says_what_to_check(tmp_path: Path) -> None:
    bus = W1Bus(tmp_path / "w1")
    (bus.root / "00-200000000000").mkdir()  # what the kernel lists with no pull-up on the data line
    empty = mapper("discover", "--w1-root", str(bus.root))
    assert empty.returncode == 1 and empty.stdout == "", empty
    assert "lists no temperature sensor (00-200000000000: ids such as these are what a bus without its pull-up" \
        " reads)" in empty.stderr, empty.stderr
    assert "4.7 kOhm pull-up from data to 3.3 V" in empty.stderr, empty.stderr


# -- validate --config: the configured sensors against the bus ----------------------------------


def ds18b20_config(tmp_path: Path, w1_dir: Path, sensor_id: str = PROBE) -> Path:
    devices = tmp_path / "devices"
    devices.mkdir(exist_ok=True)
    (devices / "probe.yaml").write_text(EXAMPLE.read_text().replace("w1_dir: /sys/bus/w1/devices", f"w1_dir: {w1_dir}")
                                        .replace("sensor_id: 28-3c01d607e4a1", f"sensor_id: {sensor_id}"))
    return write_config(tmp_path / "mapper.yaml", devices, tmp_path / "state" / "twin.db")


def test_validate_config_warns_of_a_ds18b20_without_a_bus(tmp_path: Path) -> None:
    config = ds18b20_config(tmp_path, tmp_path / "w1")
    checked = mapper("validate", "--config", str(config))
    assert checked.returncode == 0, checked
    assert (f"warning: {tmp_path / 'devices' / 'probe.yaml'}:") in checked.stderr, checked.stderr
    assert (f"device default/water-temperature-pi: no 1-wire bus here: {tmp_path / 'w1'} does not exist, so the"
            " device cannot be read; to enable the bus, add `dtoverlay=w1-gpio,gpiopin=N`") in checked.stderr
    assert "then reboot" in checked.stderr and checked.stdout.startswith(f"ok: {config}: 1 device(s)")


def test_validate_config_warns_of_a_sensor_id_the_bus_does_not_list(tmp_path: Path, bus: W1Bus) -> None:
    typo = "28-0316a2795bfe"
    checked = mapper("validate", "--config", str(ds18b20_config(tmp_path, bus.root, typo)))
    assert checked.returncode == 0, checked
    assert (f"spec.protocol.configData.sensor_id: {typo} is not on the 1-wire bus ({bus.root}): a typo in the id, or"
            f" the sensor is not connected; the bus lists 10-000802b4d8e1, {PROBE} (did you mean {PROBE}?)"
            " (`mapper discover` lists them)") in checked.stderr, checked.stderr
    right = mapper("validate", "--config", str(ds18b20_config(tmp_path, bus.root, PROBE)))
    assert right.returncode == 0 and "1-wire" not in right.stderr, right


async def test_run_warns_at_start_of_a_ds18b20_without_a_bus(tmp_path: Path, caplog) -> None:
    """`mapper run`'s start gives the 1-wire warnings `mapper validate --config` gives (one function,
    devices.w1.host_warnings): it named the overlay's pin only, not a ds18b20 without a bus."""
    from helpers import running_service

    from mapper.config import load_config

    caplog.set_level(logging.WARNING)
    config = load_config(ds18b20_config(tmp_path, tmp_path / "w1"))
    async with running_service(config):
        pass
    warned = [r for r in caplog.records if "no 1-wire bus here" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, caplog.text
    assert f"device default/water-temperature-pi: no 1-wire bus here: {tmp_path / 'w1'} does not exist" \
        in warned[0].getMessage()


# -- a GPIO pin the w1-gpio overlay holds ------------------------------------------------------


@pytest.mark.parametrize(
    ("config_txt", "pins"),
    [
        ("dtoverlay=w1-gpio\n", [(4, 1, "data line")]),
        ("[all]\ndtparam=audio=on\ndtoverlay=w1-gpio,gpiopin=22\n", [(22, 3, "data line")]),
        ("dtoverlay=w1-gpio-pullup,gpiopin=17,pullup=1  # the shed probe\n",
         [(17, 1, "data line"), (5, 1, "pull-up drive (extpullup)")]),
        ("dtoverlay=w1-gpio\ndtparam=gpiopin=5\ndtoverlay=vc4-kms-v3d\ndtparam=gpiopin=6\n", [(5, 1, "data line")]),
        ("#dtoverlay=w1-gpio\ndtoverlay=i2c-gpio\n", []),
        ("dtoverlay=w1-gpio,gpiopin=22\ndtoverlay=w1-gpio-pullup,gpiopin=27,extpullup=23\n",
         [(22, 1, "data line"), (27, 2, "data line"), (23, 2, "pull-up drive (extpullup)")]),
    ],
    ids=["default-gpio4", "gpiopin", "pullup-variant-comment", "dtparam", "commented-out", "two-buses"],
)
def test_the_overlays_pin_is_read_from_config_txt(tmp_path: Path, config_txt: str, pins: list) -> None:
    path = tmp_path / "config.txt"
    path.write_text(config_txt)
    assert w1_overlay_pins(path) == pins


def pi_devices(tmp_path: Path, relay_pin: int = 17) -> Path:
    """The Pi examples (DHT on GPIO4, relay on `relay_pin`, over `pins: fake`) in a config."""
    devices = tmp_path / "devices"
    devices.mkdir(exist_ok=True)
    (devices / "room.yaml").write_text(DHT.read_text())
    (devices / "relay.yaml").write_text(RELAY.read_text().replace("pins: rpi-gpio", "pins: fake")
                                        .replace("pin: 17 ", f"pin: {relay_pin} "))
    return write_config(tmp_path / "mapper.yaml", devices, tmp_path / "state" / "twin.db")


def test_validate_config_warns_of_a_dht_or_gpio_device_on_the_overlays_pin(tmp_path: Path) -> None:
    config = pi_devices(tmp_path, relay_pin=22)
    boot = tmp_path / "config.txt"
    boot.write_text("dtparam=audio=on\ndtoverlay=w1-gpio\n")  # GPIO4: the DHT's
    checked = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert checked.returncode == 0, checked
    warned = [line for line in checked.stderr.splitlines() if "1-wire bus's data line" in line]
    assert warned == [
        f"warning: {tmp_path / 'devices' / 'room.yaml'}:{room_line()}: device default/room-sensor-pi:"
        f" spec.protocol.configData.pin: GPIO4 is the 1-wire bus's data line ({boot}:2 loads the w1-gpio overlay on"
        " it): the kernel holds the pin, so this dht device's reads fail or disturb the bus; wire one of them to"
        " another GPIO (the overlay's: dtoverlay=w1-gpio,gpiopin=N, then reboot)"], checked.stderr
    boot.write_text("dtoverlay=w1-gpio,gpiopin=22\n")  # the relay's
    moved = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert "room-sensor-pi" not in moved.stderr, moved.stderr
    assert (f"device default/fan-relay-pi: spec.properties[0].visitors.configData.pin: GPIO22 is the 1-wire bus's"
            f" data line ({boot}:1") in moved.stderr, moved.stderr
    boot.write_text("dtoverlay=w1-gpio-pullup,gpiopin=27,extpullup=22\n")  # (the pull-up's drive pin: the relay's)
    drive = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert (f"device default/fan-relay-pi: spec.properties[0].visitors.configData.pin: GPIO22 is the 1-wire bus's"
            f" pull-up drive (extpullup) ({boot}:1") in drive.stderr, drive.stderr
    boot.write_text("dtoverlay=w1-gpio,gpiopin=27\n")
    free = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert free.returncode == 0 and "1-wire" not in free.stderr, free


def test_validate_config_reads_the_overlay_in_a_file_config_txt_includes(tmp_path: Path) -> None:
    """`include extra.txt` inserts the file beside config.txt, as the firmware does: its overlay holds the pin too."""
    config = pi_devices(tmp_path, relay_pin=22)
    boot = tmp_path / "config.txt"
    boot.write_text("dtparam=audio=on\n[all]\ninclude w1.txt  # the sensors\n")
    (tmp_path / "w1.txt").write_text("# 1-wire\ndtoverlay=w1-gpio,gpiopin=22\n")
    checked = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert checked.returncode == 0, checked
    assert (f"device default/fan-relay-pi: spec.properties[0].visitors.configData.pin: GPIO22 is the 1-wire bus's"
            f" data line ({tmp_path / 'w1.txt'}:2 loads the w1-gpio overlay on it)") in checked.stderr, checked.stderr
    boot.write_text("include config.txt\ninclude gone.txt\n")  # (itself, a missing file: nothing held, no loop)
    free = mapper("validate", "--config", str(config), env={"MAPPER_BOOT_CONFIG": str(boot)})
    assert free.returncode == 0 and "1-wire" not in free.stderr, free


def room_line() -> int:
    """The line of the DHT example's Device document (where its warnings point)."""
    lines = DHT.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line == "kind: Device") - 1


def test_run_warns_once_at_start_of_a_device_on_the_overlays_pin(tmp_path: Path) -> None:
    config = pi_devices(tmp_path, relay_pin=4)
    (tmp_path / "devices" / "room.yaml").unlink()  # (the relay alone on GPIO4: over pins: fake, it runs here)
    boot = tmp_path / "config.txt"
    boot.write_text("dtoverlay=w1-gpio\n")
    log = tmp_path / "log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MAPPER_BOOT_CONFIG": str(boot)})
    try:
        wait_for(lambda: "running: 1 device(s)" in log.read_text(), timeout=30, what="the mapper running")
        assert mapper("reload", "--config", str(config)).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert text.count("GPIO4 is the 1-wire bus's data line") == 1, text
    assert "device default/fan-relay-pi: spec.properties[0].visitors.configData.pin: GPIO4" in text, text


def test_a_reload_warns_of_a_device_it_moves_onto_the_overlays_pin(tmp_path: Path) -> None:
    """The check ran at start only: a relay moved onto the bus's pin by a SIGHUP reload was not warned of."""
    config = pi_devices(tmp_path, relay_pin=17)
    (tmp_path / "devices" / "room.yaml").unlink()
    boot = tmp_path / "config.txt"
    boot.write_text("dtoverlay=w1-gpio\n")
    log = tmp_path / "log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MAPPER_BOOT_CONFIG": str(boot)})
    try:
        wait_for(lambda: "running: 1 device(s)" in log.read_text(), timeout=30, what="the mapper running")
        relay = tmp_path / "devices" / "relay.yaml"
        relay.write_text(relay.read_text().replace("pin: 17 ", "pin: 4 "))
        assert mapper("reload", "--config", str(config)).returncode == 0
        wait_for(lambda: "GPIO4 is the 1-wire bus's data line" in log.read_text(), timeout=30,
                 what="the reload's warning")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "device default/fan-relay-pi: spec.properties[0].visitors.configData.pin: GPIO4" in log.read_text()
