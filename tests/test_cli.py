"""The `mapper` command line, run as a user would run it (subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from devices.errors import DefinitionError
from devices.ids import DeviceId
from helpers import (MODEL, catches, device_yaml, dist_info, wait_for, write_config, write_devices,
                     write_several_mistakes)
from mapper.config import load_config

REPO = Path(__file__).resolve().parents[1]


def mapper(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapper", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def start_mapper(config: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)


def stop_mapper(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int | None:
    """Signal `mapper run` and return its exit code; killed (None) if it does not exit within 15 s,
    so a hung mapper never outlives the test nor hides the failure that got us here."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


def _commands(parser, path=("mapper",)):  # noqa: ANN001, ANN202
    """(command path, its parser) for the parser and every subcommand under it."""
    import argparse

    yield path, parser
    for action in parser._actions:  # noqa: SLF001 - argparse exposes its subcommands no other way
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


def test_every_command_and_argument_says_what_it_is_in_its_help():
    """`mapper run --help` said nothing about running, nor what --config is; `twin set --help` named
    `device property value` without how a value is written; `--json`, `--unit-file` had no word.
    Every subcommand's own --help opens with what it does, and every argument has a help line."""
    from mapper.cli import parser

    for path, command in _commands(parser()):
        assert command.description, f"{' '.join(path)} --help has no description"
        for action in command._actions:  # noqa: SLF001
            assert action.help, f"{' '.join(path)}: {action.dest} has no help"
    helped = mapper("twin", "set", "--help")
    assert helped.returncode == 0 and '{"value": ...}' in helped.stdout and "namespace/name" in helped.stdout, helped
    assert "first steps:" in mapper("--help").stdout


def test_drivers_lists_each_protocol_with_its_entry_point_package_and_why_one_cannot_load(tmp_path):
    """A third party who installed a driver had no way to see it registered: `mapper validate` said
    nothing about a device whose driver loads, and a driver that cannot be imported, or one named
    like a built-in (not used), showed only once a device named it, or in the log. `mapper drivers`
    lists every protocol with its entry point and the package (and version) it comes from, each
    that cannot be loaded with why, and each entry point not used; exit 1 when one cannot be loaded."""
    site = tmp_path / "site"
    (site / "acme_bus").mkdir(parents=True)
    (site / "acme_bus" / "__init__.py").write_text(
        "from devices.drivers import Driver\n\n\nclass AcmeDriver(Driver):\n    protocol = 'acme'\n"
        "    blocking = True\n    timeout_s = 1.5\n\n    def write(self, prop, value):\n        pass\n")
    dist_info(site, "mapper-acme", "0.3.1", entry_points_txt="[mapper.drivers]\nacme = acme_bus:AcmeDriver\n"
              "simulated = acme_bus:AcmeDriver\n")
    dist_info(site, "mapper-bacnet", "1.0", entry_points_txt="[mapper.drivers]\nbacnet = mapper_bacnet:BacnetDriver\n")
    env = {"PYTHONPATH": str(site)}
    twice = tmp_path / "twice"  # a second package registering `acme`: one of the two is used, the other said
    dist_info(twice, "acme-fork", "2.0", entry_points_txt="[mapper.drivers]\nacme = acme_fork:AcmeDriver\n")
    both = mapper("drivers", env={"PYTHONPATH": f"{site}:{twice}"}).stdout
    assert ("not used: mapper-acme registers protocol 'acme' (acme_bus:AcmeDriver), acme-fork registers it too,"
            " and that one is used" in both) != ("not used: acme-fork registers protocol 'acme' (acme_fork:AcmeDriver),"
                                                 " mapper-acme registers it too, and that one is used" in both), both
    listed = mapper("drivers", env=env)
    assert listed.returncode == 1, listed
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["protocol", "driver", "from"], lines
    rows = {line.split()[0]: line for line in lines[1:] if not line.startswith("not used: ")}
    assert set(rows) == {"acme", "bacnet", "dht", "ds18b20", "gpio", "modbus", "replay", "simulated"}, lines
    assert rows["acme"].split() == ["acme", "acme_bus:AcmeDriver", "mapper-acme", "0.3.1", "(blocking,",
                                    "timeout", "1.5", "s,", "writes)"], rows["acme"]
    assert rows["simulated"].split()[1:4] == ["devices.drivers.simulated:SimulatedDriver", "built", "in"]
    assert rows["modbus"].split()[1:] == ["devices.drivers.modbus:ModbusDriver", "built", "in", "(blocking,", "timeout",
                                          "7", "s,", "writes)"], rows["modbus"]
    assert rows["bacnet"].split()[1:4] == ["mapper_bacnet:BacnetDriver", "mapper-bacnet", "1.0:"], rows["bacnet"]
    assert "cannot be loaded: ModuleNotFoundError: No module named 'mapper_bacnet'" in rows["bacnet"]
    assert ("not used: mapper-acme registers protocol 'simulated' (acme_bus:AcmeDriver), a built-in name:"
            " register the driver under another name") in listed.stdout, listed.stdout
    as_json = json.loads(mapper("drivers", "--json", env=env).stdout)
    acme = next(d for d in as_json["drivers"] if d["protocol"] == "acme")
    assert acme == {"protocol": "acme", "driver": "acme_bus:AcmeDriver", "package": "mapper-acme",
                    "version": "0.3.1", "builtin": False, "error": None, "warnings": [], "blocking": True,
                    "timeoutS": 1.5, "writes": True}
    assert set(as_json) == {"drivers", "notUsed"}, as_json  # named as the table names them
    assert as_json["notUsed"] == [{"protocol": "simulated", "driver": "acme_bus:AcmeDriver",
                                   "package": "mapper-acme", "why": "a built-in name"}]
    assert mapper("drivers").returncode == 0  # the built-in ones alone all load


LENIENT_DRIVER = """\
from pydantic import BaseModel, ConfigDict

from devices.drivers.simulated import SimulatedDriver, SimulatedVisitor


class Port(BaseModel):
    number: int = 1


class LaxConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    speed: int = 9600
    ports: list[Port] = []


class LaxDriver(SimulatedDriver):
    protocol = "lax-bus"
    Config = LaxConfig
    Visitor = SimulatedVisitor
"""


def test_a_driver_named_unlike_its_entry_point_or_taking_any_key_is_warned_about(tmp_path):
    """A driver registered as `lax` whose class says protocol = 'lax-bus' was accepted without a word
    (its messages named another protocol than the devices'), and one whose Config model does not forbid
    unknown keys took a misspelt `sped: 19200` silently, the device running at the default speed. Both
    are warned about, naming both names and the model with the fix: in `mapper drivers` (table and
    JSON; exit 0: it runs) and once per process when the driver is loaded (`mapper validate`, two devices)."""
    site = tmp_path / "site"
    (site / "lax_bus").mkdir(parents=True)
    (site / "lax_bus" / "__init__.py").write_text(LENIENT_DRIVER)
    dist_info(site, "mapper-lax", "0.2", entry_points_txt="[mapper.drivers]\nlax = lax_bus:LaxDriver\n")
    env = {"PYTHONPATH": str(site)}
    named = ("mapper-lax registers lax_bus:LaxDriver as protocol 'lax', but its class says protocol = 'lax-bus':"
             " devices of protocolName 'lax' run it, and its messages name 'lax-bus'; set protocol = 'lax' in the"
             " class (or register it under 'lax-bus')")
    fix = ("so a misspelt key in its spec.protocol.configData is accepted without a word and its setting left at the"
           " default: add `model_config = ConfigDict(extra=\"forbid\")` to")
    lax = (f"driver lax_bus:LaxDriver (protocol 'lax'): its Config model LaxConfig takes keys it does not know, {fix}"
           " LaxConfig (from pydantic import ConfigDict)")
    port = (f"driver lax_bus:LaxDriver (protocol 'lax'): its Config model Port (within LaxConfig) takes keys it does not"
            f" know, {fix} Port (from pydantic import ConfigDict)")
    expected = [named, lax, port]
    listed = mapper("drivers", env=env)
    assert listed.returncode == 0, listed
    assert [line.removeprefix("warning: ") for line in listed.stdout.splitlines()
            if line.startswith("warning: ")] == expected, listed.stdout
    as_json = json.loads(mapper("drivers", "--json", env=env).stdout)
    assert {d["protocol"]: d["warnings"] for d in as_json["drivers"]} == {
        "lax": expected, "dht": [], "ds18b20": [], "gpio": [], "modbus": [], "replay": [], "simulated": []}, as_json  # (the built-ins forbid)

    devices = write_devices(tmp_path / "dev", ["a", "b"])
    for path in devices.glob("*.yaml"):
        path.write_text(path.read_text().replace("protocolName: simulated", "protocolName: lax")
                        .replace("protocol: simulated", "protocol: lax"))
    checked = mapper("validate", str(devices), env=env)
    assert checked.returncode == 0, checked
    for warning in expected:
        assert checked.stderr.splitlines().count(f"warning: {warning}") == 1, checked.stderr


def test_the_test_drivers_forbid_unknown_keys_and_are_named_as_registered():
    """The drivers of tests/plugin_site, shipped as a third party ships one, draw no warning either."""
    from plugin_drivers import installed

    from devices.drivers.base import listing

    with installed():
        listed, _ = listing()
    assert {d.protocol: d.warnings for d in listed if not d.builtin} == {
        name: () for name in ("failing", "forgetful", "gated", "panicking", "slow")}


def test_a_visitor_field_named_as_a_mapper_key_is_warned_about():
    """The loader takes the mapper's own configData keys (valueScale, reportDeadband ...) out before a
    driver's Visitor reads the rest: a driver whose Visitor has a field of that name (an ADC driver's
    own `valueScale`) would never be given it, without a word. Said among its contract warnings."""
    from pydantic import BaseModel, ConfigDict, Field

    from devices.drivers.base import contract_warnings
    from devices.drivers.simulated import SimulatedDriver

    class AdcVisitor(BaseModel):
        model_config = ConfigDict(extra="forbid")
        channel: int = 0
        valueScale: float = 1.0  # noqa: N815 - named as a device file writes it
        deadband: float = Field(0.0, alias="reportDeadband")

    class AdcDriver(SimulatedDriver):
        protocol = "adc"
        Visitor = AdcVisitor

    said = contract_warnings("adc", "adc_bus:AdcDriver", AdcDriver)
    assert said == [
        f"driver adc_bus:AdcDriver (protocol 'adc'): its Visitor field {field!r} has the name of the mapper's own"
        f" visitors.configData key {key!r}, which the mapper takes out before the driver reads the rest: the driver"
        " never gets it; rename the field" for field, key in (("valueScale", "valueScale"), ("deadband", "reportDeadband"))]


def test_validate_ok_and_warns_about_missing_drivers(tmp_path):
    """`mapper validate` exits 0 for valid files and warns (stderr) about protocols without a driver."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d").replace("protocolName: simulated\n    configData",
                                                              "protocolName: acme-fieldbus\n    configData"))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "'acme-fieldbus'" in result.stderr
    assert "ok: 1 device(s), 1 model(s)" in result.stdout
    # (the device cannot run here: said in the closing line too, not only among the warnings, which it counts:
    # a bare "ok" after a screen of them read as if there were none)
    warned = sum(line.startswith("warning: ") for line in result.stderr.splitlines())
    assert warned >= 1, result.stderr
    assert result.stdout == (f"ok: 1 device(s), 1 model(s), {warned} warning(s); 1 of the devices would not run"
                             " here: see the warnings\n")
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "d.yaml").write_text(device_yaml("d"))
    clean = mapper("validate", str(tmp_path / "m.yaml"), str(tmp_path / "clean"))  # none: no count
    assert clean.returncode == 0 and clean.stdout == "ok: 1 device(s), 1 model(s)\n" and not clean.stderr, clean


def test_validate_lists_every_error_and_exits_1(tmp_path):
    """`mapper validate` exits 1 and prints each problem as FILE:LINE: FIELD: PROBLEM."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model").replace('minimum: "0"', 'minimum: "99"'))
    (tmp_path / "d.yaml").write_text(device_yaml("d", cycle=-1))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if ".yaml:" in l]
    assert any(l.endswith("m.yaml:9: spec.properties[0]: minimum 99 is greater than maximum 50") for l in lines)
    assert sum("collectCycle: must be >= 0" in l for l in lines) == 3
    assert "error(s)" in result.stderr.splitlines()[-1]


def test_validate_run_and_twin_set_say_a_devices_model_has_errors_not_that_it_is_missing(tmp_path):
    """A DeviceModel with an error (`type: BOOL`) made `mapper validate`, `mapper run` and `twin set`
    add `DeviceModel default/thing-model not found (known: none)` for each of its devices, with the
    model right there in model.yaml. They now say the model has errors, naming where it is."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    (devices / "model.yaml").write_text(MODEL.format(model="thing-model").replace("type: BOOLEAN", "type: BOOL"))
    device_error = ("lamp.yaml:8: spec.deviceModelRef.name: DeviceModel default/thing-model"
                    f" ({devices / 'model.yaml'}:4) has errors (above): its devices cannot start until it is fixed")
    model_error = "model.yaml:16: spec.properties[1].type: unknown value 'BOOL'"
    for args in (("validate", str(devices)), ("run", "--config", str(config)),
                 ("twin", "set", "lamp", "power", "true", "--config", str(config))):
        result = mapper(*args)
        assert result.returncode == 1, result
        lines = [l for l in result.stderr.splitlines() if ".yaml:" in l]
        assert len(lines) == 2, result.stderr
        assert model_error in lines[0] and lines[1].endswith(device_error), (args, result.stderr)
        assert "not found" not in result.stderr, (args, result.stderr)


def test_validate_warns_about_a_field_written_by_its_python_name(tmp_path):
    """`access_mode: ReadWrite` (the schema's Python name for accessMode) used to fill the field: the
    property passed `mapper validate` with no warning and loaded writable, while KubeEdge's API
    server drops the key and reads the property as ReadOnly. Documents are read by their CRD names
    only, so it is an unknown field, warned about at its line with the name it should have."""
    model = MODEL.format(model="thing-model").replace(
        "    - name: power\n      type: BOOLEAN\n      accessMode: ReadWrite",
        "    - name: power\n      type: BOOLEAN\n      access_mode: ReadWrite")
    device = device_yaml("d").replace("{kind: counter}\n      collectCycle: 50", "{kind: counter}\n      collect_cycle: 20")
    assert "collect_cycle" in device
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    mode_line = next(i for i, l in enumerate(model.splitlines(), 1) if "access_mode" in l)
    cycle_line = next(i for i, l in enumerate(device.splitlines(), 1) if "collect_cycle" in l)
    assert f"m.yaml:{mode_line}: spec.properties[1].access_mode: unknown field, did you mean accessMode?" \
        in result.stderr, result.stderr
    assert f"d.yaml:{cycle_line}: spec.properties[2].collect_cycle: unknown field, did you mean collectCycle?" \
        in result.stderr, result.stderr
    from devices.loader import load

    definition = load([tmp_path], base=tmp_path).devices[DeviceId("default", "d")]
    assert not definition.prop("power").writable  # ReadOnly, as KubeEdge reads it
    assert definition.prop("count").collect_cycle_ms == 1000  # not given: KubeEdge's default


def test_validate_says_what_a_misspelt_field_with_a_telling_default_leaves(tmp_path):
    """`acessMode: ReadWrite` drew "unknown field, did you mean accessMode?" and exit 0, but not
    that the property then keeps the default ReadOnly, so every /set, twin set and $hw update to it
    is refused. The warning says so, for a field whose default changes what the mapper does; a
    misspelling of one that is given as well, or of another field, gets the plain warning."""
    model = MODEL.format(model="thing-model").replace(
        "    - name: power\n      type: BOOLEAN\n      accessMode: ReadWrite",
        "    - name: power\n      type: BOOLEAN\n      acessMode: ReadWrite").replace(
        "      type: INT\n      accessMode: ReadWrite\n", "      type: INT\n      accessMode: ReadWrite\n"
                                                        "      AccessMode: ReadWrite\n      unt: x\n")
    head, tail = device_yaml("d").rsplit("reportToCloud: true", 1)  # count's
    device = head + "reportToClod: true" + tail
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    line = {key: next(i for i, l in enumerate(text.splitlines(), 1) if key in l)
            for key, text in (("acessMode", model), ("AccessMode", model), ("unt:", model),
                              ("reportToClod", device))}
    kubeedge = "KubeEdge's API server would drop it (kubectl refuses it)"
    warnings = [l.removeprefix(f"warning: {tmp_path}/") for l in result.stderr.splitlines() if l.startswith("warning: ")]
    assert f"m.yaml:{line['acessMode']}: spec.properties[1].acessMode: unknown field, did you mean accessMode? It is " \
           f"ignored here, so the property stays ReadOnly: writes to it are refused (/set, twin and $hw updates); " \
           f"{kubeedge}" in warnings, result.stderr
    assert f"d.yaml:{line['reportToClod']}: spec.properties[2].reportToClod: unknown field, did you mean " \
           "reportToCloud? It is ignored here, so reportToCloud stays false: the property's readings are not " \
           "published to its own topic (a pushMethod.mqtt.topic still gets them) nor in the twin reported to " \
           f"KubeEdge; {kubeedge}" in warnings, result.stderr
    # accessMode is given as well: nothing is left at its default, the plain warning.
    assert f"m.yaml:{line['AccessMode']}: spec.properties[2].AccessMode: unknown field, did you mean accessMode? It " \
           f"is ignored here; {kubeedge}" in warnings, result.stderr
    assert any(w.startswith(f"m.yaml:{line['unt:']}: spec.properties[2].unt: unknown field, did you mean unit? It is "
                            f"ignored here; {kubeedge}") for w in warnings), result.stderr
    assert len(warnings) == 4, result.stderr


def test_validate_warns_about_a_bare_number_where_kubeedges_crd_wants_a_string(tmp_path):
    """`minimum: -40` and `desired: {value: 5}` passed `mapper validate` with no word, while
    KubeEdge's CRD declares minimum, maximum and desired.value as strings, so `kubectl apply`
    refuses the file. They are still accepted (existing files keep working), but each is a warning
    at its line, naming the field and saying to quote it, as the mapper reads it."""
    model = MODEL.format(model="thing-model").replace('minimum: "0"\n      maximum: "50"',
                                                      "minimum: -40\n      maximum: 85.5", 1)
    model += "    - {name: label, type: STRING, accessMode: ReadWrite}\n"
    device = device_yaml("d").replace("    - name: count\n", "    - name: count\n      desired: {value: 5}\n")
    device += "    - {name: label, desired: {value: 1.10}, visitors: {configData: {kind: constant}}}\n"
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ok: 1 device(s), 1 model(s)" in result.stdout
    line = {key: next(i for i, l in enumerate(text.splitlines(), 1) if key in l)
            for key, text in (("minimum: -40", model), ("maximum: 85.5", model), ("value: 5", device),
                              ("value: 1.10", device))}
    refused = ("a bare number: accepted here, but KubeEdge's API server (kubectl apply) refuses a number there "
               "(its CRD says string)")
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning: ")]
    expected = [
        f'm.yaml:{line["minimum: -40"]}: spec.properties[0].minimum: {refused}; quote it: '
        'minimum: "-40"',
        f'm.yaml:{line["maximum: 85.5"]}: spec.properties[0].maximum: {refused}; quote it: '
        'maximum: "85.5"',
        f'd.yaml:{line["value: 5"]}: spec.properties[2].desired.value: {refused}; quote it: '
        'value: "5"',
        # A STRING property takes the text as written ("1.10"), so that is what to quote.
        f'd.yaml:{line["value: 1.10"]}: spec.properties[3].desired.value: {refused}; '
        'quote it: value: "1.10"',
    ]
    for want in expected:
        assert any(w.endswith(want) for w in warnings), (want, result.stderr)
    assert len(warnings) == 4, result.stderr
    # Quoted, as KubeEdge wants them, nothing is said.
    (tmp_path / "m.yaml").write_text(model.replace("minimum: -40", 'minimum: "-40"').replace(
        "maximum: 85.5", 'maximum: "85.5"'))
    (tmp_path / "d.yaml").write_text(device.replace("value: 5}", 'value: "5"}').replace("value: 1.10}",
                                                                                          'value: "1.10"}'))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    # The model with an error of its own (the property's type is not known then): the hint still
    # quotes what the file says, not the number YAML reads ("1.1" would change a STRING's value).
    (tmp_path / "m.yaml").write_text(model.replace("type: BOOLEAN", "type: BOOL", 1))
    (tmp_path / "d.yaml").write_text(device)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert f'd.yaml:{line["value: 1.10"]}: spec.properties[3].desired.value: {refused}; quote it: value: "1.10"' \
        in result.stderr, result.stderr


def test_shipped_examples_validate():
    """The shipped examples pass `mapper validate`."""
    assert mapper("validate", "devices/examples").returncode == 0


def test_bad_config_file_is_reported_with_line(tmp_path):
    """A config file with a wrong field gets FILE:LINE too."""
    config = tmp_path / "c.yaml"
    config.write_text("node: n1\ntwin:\n  path: x.db\n  batch_max: 0\n")
    result = mapper("devices", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}:4: twin.batch_max: must be >= 1" in result.stderr


def test_a_password_written_in_the_config_is_told_where_it_goes(tmp_path):
    """`mqtt: {password: ...}`, the key anyone writes first, drew "unknown field, did you mean
    password_env?": a hint toward an environment variable, and no word of password_file. It now
    says why the config takes no password and both places it goes; so does the cloud worker's config,
    whose loader said only "unknown field" (and no "did you mean" for a misspelt key either)."""
    config = tmp_path / "c.yaml"
    config.write_text("node: n\nmqtt:\n  url: mqtt://127.0.0.1:1883\n  username: mapper\n  password: s3cret\n")
    worker = tmp_path / "worker.yaml"
    worker.write_text("models: [sensor_faults]\nmqtt:\n  url: mqtt://127.0.0.1:1883\n  username: worker\n"
                      "  password: s3cret\n")
    for command in (("validate", "--config", str(config)), ("cloud-worker", "--config", str(worker))):
        done = mapper(*command)
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"{command[-1]}:5: mqtt.password: a password is not taken in the config"), done
        assert "mqtt.password_file" in done.stderr and "mqtt.password_env" in done.stderr, done.stderr
        assert "s3cret" not in done.stderr, done.stderr
    worker.write_text("mqtt:\n  url: mqtt://127.0.0.1:1883\n  pasword_file: /etc/mapper/worker.password\n")
    done = mapper("cloud-worker", "--config", str(worker))
    assert done.returncode == 1 and done.stderr == (
        f"{worker}:3: mqtt.pasword_file: unknown field, did you mean password_file?\n"), done


def test_a_password_without_a_username_is_a_config_error_at_its_field(tmp_path):
    """`mqtt: {password_file: ...}` without `username` passed `mapper validate`; the mapper then
    connected without the password (it is sent only with a user name) and the broker refused it,
    `Not authorized`, with the password file right. Now it is a config error at the field."""
    password = tmp_path / "mqtt.password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), tmp_path / "twin.db",
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1883\n  password_file: {password}\n")
    line = config.read_text().splitlines().index(f"  password_file: {password}") + 1
    done = mapper("validate", "--config", str(config))
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"{config}:{line}: mqtt.password_file: a password without mqtt.username is never"
                                  " sent"), done.stderr
    config.write_text(config.read_text().replace("  password_file:", "  username: mapper\n  password_file:"))
    assert mapper("validate", "--config", str(config)).returncode == 0


def test_an_unreadable_mqtt_password_is_a_config_error_before_the_start(tmp_path):
    """`mqtt.password_file` missing (or not readable by the user the mapper runs as): `mapper run`
    and `mapper install-service` refuse the config at once, naming the field and the file. The
    mapper used to start, then end with a traceback once it connected (under systemd: five
    restarts, then nothing)."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    missing = tmp_path / "nowhere" / "mapper.password"
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {missing}\n")
    for args in (("run", "--config", str(config)), ("install-service", "--config", str(config), "--dry-run")):
        result = mapper(*args)
        assert result.returncode == 1, result
        assert f"mqtt.password_file: cannot read {missing}: No such file or directory" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "twin.db").exists()  # nothing started


def test_a_bad_cloud_worker_config_is_one_line_per_problem(tmp_path):
    """`mapper cloud-worker` reports its config's mistakes as the mapper does: FILE:LINE: FIELD:
    PROBLEM, no pydantic dump, no traceback, and exit 1."""
    config = tmp_path / "worker.yaml"
    config.write_text("mqtt:\n  url: mqtt://127.0.0.1:1\ngroup: 'no spaces please'\nworkers: 3\n")
    result = mapper("cloud-worker", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    lines = result.stderr.strip().splitlines()
    assert f"{config}:3: group: " in lines[0] and f"{config}:4: workers: unknown field" in lines[1], lines
    config.write_text("mqtt: [\n")
    result = mapper("cloud-worker", "--config", str(config))
    assert result.returncode == 1 and result.stderr.startswith(f"{config}:") and "invalid YAML" in result.stderr
    result = mapper("cloud-worker", "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 1 and "config file not found" in result.stderr


def test_the_cloud_worker_given_the_mappers_config_says_so(tmp_path):
    """`mapper cloud-worker --config examples/demo.yaml` (the mapper's config, the one at hand) said
    "node: unknown field, did you mean models?" and a line per key: now one line says it is a mapper
    config and what a worker's holds."""
    result = mapper("cloud-worker", "--config", "examples/demo.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.splitlines() == [
        "examples/demo.yaml:2: node: this looks like a mapper config (node, devices, twin, inference: `mapper run"
        " --config` reads it), not a cloud worker's: the worker's holds mqtt (its own broker login, e.g. user worker),"
        " models_dir, models and group (docs/inference.md)"], result.stderr
    # and the other way round: `models: unknown field, did you mean mode?` for a worker's config
    worker = tmp_path / "worker.yaml"
    worker.write_text("mqtt:\n  url: mqtt://127.0.0.1:1\nmodels: [sensor_faults]\n")
    for command in ("run", "validate"):
        result = mapper(command, "--config", str(worker))
        assert result.returncode == 1 and result.stderr.splitlines()[0] == (
            f"{worker}:3: models: this looks like a cloud worker config (models: `mapper cloud-worker --config` reads"
            " it), not a mapper config: the mapper's holds node, devices, twin, mqtt ... (README, Config file)"), result


def test_a_problem_found_by_a_whole_section_check_is_at_its_field(tmp_path):
    """A check of a whole section about one of its fields names that field's line: `mode: kubeedge`
    without a `kubeedge:` section was reported at the file's first key (line 2, `node: n`, here),
    and a TLS key without its certificate at the `tls:` line."""
    config = tmp_path / "k.yaml"
    config.write_text("# comment\nnode: n\n\nmode: kubeedge\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert str(info.value) == (f"{config}:4: mode: kubeedge needs a `kubeedge:` section with at least `name`"
                               " and `protocol`")
    config.write_text("node: n\nmqtt:\n  url: mqtt://h\n  tls:\n    ca_file: ca.crt\n    key_file: k.key\n")
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={})
    assert str(info.value) == (f"{config}:6: mqtt.tls.key_file: key_file and cert_file go together: add cert_file,"
                               " or remove key_file")
    config.write_text("# comment\nnode: n\n")  # set by the environment: its variable, as for any setting
    with pytest.raises(DefinitionError) as info:
        load_config(config, env={"MAPPER_MODE": "kubeedge"})
    assert str(info.value) == ("environment variable MAPPER_MODE: mode: kubeedge needs a `kubeedge:` section with at"
                               " least `name` and `protocol`")


def test_cloud_worker_models_it_cannot_serve_are_config_errors(tmp_path):
    """A model name that is not in models_dir was a ModelError traceback; a models_dir without models
    started a worker that joined the shared subscription and refused every request it took from
    healthy workers. Both are config errors now, at the field, and the worker does not start."""
    from mapper.inference.worker import CloudWorker, WorkerSettings

    config = tmp_path / "w.yaml"
    config.write_text("mqtt: {url: 'mqtt://127.0.0.1:1'}\nmodels:\n  - sensor_faults\n  - nope\n")
    result = mapper("cloud-worker", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.strip() == (f"{config}:4: models[1]: no model 'nope' in {REPO / 'models'}"
                                     " (models there: rain, sensor_faults)"), result.stderr
    (tmp_path / "empty").mkdir()
    config.write_text("# no models here\nmqtt: {url: 'mqtt://127.0.0.1:1'}\nmodels_dir: empty\n")
    result = mapper("cloud-worker", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.strip() == (f"{config}:3: models_dir: no models in {tmp_path / 'empty'} (no sub-directory"
                                     " with a model.json): a worker needs at least one; set models_dir to where they"
                                     " are"), result.stderr
    with pytest.raises(DefinitionError, match=r"^worker config: models: an empty list: name at least one model"):
        CloudWorker(WorkerSettings(models=[]))


def test_a_port_out_of_range_in_mqtt_url_is_a_config_error(tmp_path):
    """`mqtt.url` with a port outside 1-65535 or not a number passed validation; `mapper run` then
    started its devices and died with a ValueError traceback, and port 0 silently meant 1883. Now a
    config error at mqtt.url, for the mapper and the cloud worker (which share the settings)."""
    from mapper.inference.worker import load_worker_config

    devices = write_devices(tmp_path / "dev", ["x"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db", extra="mqtt:\n  url: mqtt://127.0.0.1:99999\n")
    result = mapper("run", "--config", str(config), timeout=20)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.strip() == (f"{config}:12: mqtt.url: 'mqtt://127.0.0.1:99999': port '99999' is not a port"
                                     " number 1-65535 (leave it out for 1883)"), result.stderr
    for port in ("0", "abc", "-1", ""):
        config = write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db",
                              extra=f"mqtt:\n  url: 'mqtts://broker:{port}'\n")
        with pytest.raises(DefinitionError, match=rf"^{config}:12: mqtt.url: .*port '{port}' is not a port number"
                                                  r" 1-65535 \(leave it out for 8883\)$"):
            load_config(config)
    worker = tmp_path / "worker.yaml"
    worker.write_text("group: g\nmqtt:\n  url: mqtt://127.0.0.1:0\n")
    with pytest.raises(DefinitionError, match=rf"^{worker}:3: mqtt.url: 'mqtt://127.0.0.1:0': port '0' is not"):
        load_worker_config(worker)
    assert load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db",
                                    extra="mqtt: {url: 'mqtt://[::1]'}\n")).mqtt.port == 1883


def test_mqtt_paths_are_relative_to_the_config_file_for_the_mapper_and_the_worker(tmp_path, monkeypatch):
    """Relative `password_file` and `tls` paths mean the config file's directory, for `mapper run`
    and `mapper cloud-worker` alike (the worker read its TLS files from the current directory);
    and `protocol: 5`, unquoted YAML, means MQTT 5."""
    from mapper.inference.worker import load_worker_config

    block = ("mqtt:\n  url: mqtts://127.0.0.1:1\n  protocol: 5\n  username: mapper\n  password_file: secret\n"
             "  tls: {ca_file: pki/ca.crt, cert_file: pki/me.crt, key_file: /abs/me.key}\n")
    (tmp_path / "etc").mkdir()
    devices = write_devices(tmp_path / "dev", ["x"])
    worker_file = tmp_path / "etc" / "worker.yaml"
    worker_file.write_text(block)
    monkeypatch.chdir(tmp_path)  # elsewhere than the config files
    for mqtt in (load_config(write_config(tmp_path / "etc" / "c.yaml", devices, tmp_path / "t.db", extra=block)).mqtt,
                 load_worker_config(worker_file).mqtt):
        assert mqtt.protocol == "5"
        assert mqtt.password_file == tmp_path / "etc" / "secret"
        assert (mqtt.tls.ca_file, mqtt.tls.cert_file) == (tmp_path / "etc" / "pki" / "ca.crt",
                                                          tmp_path / "etc" / "pki" / "me.crt")
        assert mqtt.tls.key_file == Path("/abs/me.key")


def test_kubeedge_state_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    """`kubeedge.state_file: state/ke.json` means beside the config file, as every other path of the
    config does (it was refused: "must be an absolute path")."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path / "dev")  # elsewhere than the config file
    config = load_config(write_config(tmp_path / "etc" / "c.yaml", devices, tmp_path / "t.db", extra=(
        f"kubeedge: {{name: dht, protocol: dht, edgecore_socket: {tmp_path}/dmi.sock,"
        f" socket: {tmp_path}/dht.sock, state_file: state/ke.json}}\n")))
    assert config.kubeedge.state_file == tmp_path / "etc" / "state" / "ke.json"


def test_twin_commands_do_not_create_a_twin_where_there_is_none(tmp_path):
    """A wrong twin.path: each twin command says there is no twin there, and leaves nothing behind."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "state" / "twin.db")
    for args in (("twin", "get", "lamp"), ("twin", "set", "lamp", "power", "true"), ("devices",),
                 ("twin", "history", "lamp", "count")):
        result = mapper(*args, "--config", str(config))
        assert result.returncode == 1 and f"no twin at {tmp_path / 'state' / 'twin.db'}" in result.stderr, result
    assert not (tmp_path / "state").exists()


def test_ordinary_mistakes_are_errors_not_tracebacks(tmp_path):
    """A twin path that is a directory (a config error at FILE:LINE: twin.path), a twin file that
    is not a database: one line each."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    (tmp_path / "dir.db").mkdir()
    (tmp_path / "junk.db").write_text("not a database\n" * 100)
    for twin in ("dir.db", "junk.db"):
        config = write_config(tmp_path / f"{twin}.yaml", devices, tmp_path / twin)
        result = mapper("twin", "set", "lamp", "power", "true", "--config", str(config))
        expected = f"{config}:4: twin.path: " if twin == "dir.db" else "error: "
        assert result.returncode == 1 and result.stderr.startswith(expected), result
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("damage", ["not a database", "a damaged page"])
def test_a_twin_sqlite_cannot_read_is_named_by_every_command_with_what_to_do(tmp_path, damage):
    """`mapper devices` and `mapper twin get` on a twin file that is not a database printed only
    `error: file is not a database` (and a damaged page `error: database disk image is malformed`),
    naming no file, and `mapper run` named the file but not what to do. Every command now names the
    twin and says to move it aside (with its -wal and -shm files) for a new one. "a damaged page":
    the devices table's root page overwritten, which the open does not read: found later, by the
    command's reads or by the start's first write."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin)
    if damage == "not a database":
        twin.parent.mkdir(mode=0o700)
        twin.write_text("not a database\n" * 100)
        twin.chmod(0o600)
        commands = [("devices",), ("twin", "get", "lamp"), ("twin", "set", "lamp", "power", "true"),
                    ("twin", "history", "lamp", "count")]
    else:
        with TwinStore.open(twin) as store:
            store.sync_devices(load([devices]).devices.values())
            root = store.conn.execute("SELECT rootpage FROM sqlite_master WHERE name='devices'").fetchone()[0]
            page = store.conn.execute("PRAGMA page_size").fetchone()[0]
        with twin.open("r+b") as f:
            f.seek((root - 1) * page)
            f.write(b"\xa5" * page)
        commands = [("devices",), ("twin", "get", "lamp"), ("twin", "set", "lamp", "power", "true")]
    said = f"error: the twin {twin} cannot be read as a database ("
    todo = f"move the twin aside (mv {twin} {twin}.broken, and likewise {twin}-wal and {twin}-shm if they are there)"
    for args in commands:
        result = mapper(*args, "--config", str(config))
        assert result.returncode == 1 and result.stderr.startswith(said), (args, result.stderr)
        assert todo in result.stderr and len(result.stderr.splitlines()) == 1, (args, result.stderr)
    run = mapper("run", "--config", str(config), timeout=60)
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith(said), run.stderr[-2000:]
    assert todo in run.stderr and "Traceback" not in run.stderr


@contextlib.contextmanager
def lamp_synced_into_a_new_twin(tmp_path: Path):  # noqa: ANN201
    """Device lamp, a config of it and its new twin (state/twin.db), open with the lamp synced into it:
    (devices directory, config, twin, lamp's id, store)."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin)
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
        yield devices, config, twin, DeviceId("default", "lamp"), store


def test_commands_other_than_run_never_migrate_a_twin_an_older_mapper_left(tmp_path):
    """`mapper devices`, `twin get` and `twin history` migrated the twin's schema: run after an upgrade
    of the package but before the restart, under the older mapper still running on it, which then
    could not start on it again, and the copy to go back to (docs/raspberry-pi.md) came too late.
    They now read it as it is (saying so on stderr) or say plainly that they cannot, and write
    nothing; `twin set` refuses it. Only `mapper run` migrates."""
    from twin import migrations
    from twin.records import Reading
    from twin.store import TwinStore

    newest = len(migrations.MIGRATIONS)
    with lamp_synced_into_a_new_twin(tmp_path) as (devices, config, twin, lamp, store):
        store.record([Reading(lamp, "count", 5, 1_000)])
        store.set_desired(lamp, "power", True)
    # The file as the mapper before the last migration left it (m009 only added `admin_locks`).
    with contextlib.closing(sqlite3.connect(twin, isolation_level=None)) as conn:
        conn.execute("DROP TABLE admin_locks")
        conn.execute(f"PRAGMA user_version = {newest - 1}")
    before = twin.read_bytes()

    def version(path: Path) -> int:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    older = f"the twin {twin} is from an older mapper (schema version {newest - 1}; this mapper's is {newest})"
    for args, shown in ((("devices",), "default/lamp"), (("twin", "get", "lamp"), "power"),
                        (("twin", "history", "lamp", "count", "--json"), '"value":5')):
        result = mapper(*args, "--config", str(config))
        assert result.returncode == 0 and shown in result.stdout, (args, result)
        assert version(twin) == newest - 1 and twin.read_bytes() == before, args
        assert result.stderr.startswith(f"note: {older}: shown as it is, not migrated"), (args, result.stderr)
        assert "`mapper run`" in result.stderr and len(result.stderr.splitlines()) == 1, (args, result.stderr)
    refused = mapper("twin", "set", "lamp", "power", "false", "--config", str(config))
    assert refused.returncode == 1 and refused.stderr.startswith(f"error: {older}: `mapper twin set` writes nothing"), \
        refused.stderr
    assert version(twin) == newest - 1 and twin.read_bytes() == before
    # Older than what these commands can read as it is (no `routes`, m005): said, not "no such table".
    ancient = tmp_path / "m004.db"
    with contextlib.closing(sqlite3.connect(ancient, isolation_level=None)) as conn:
        for number, step in enumerate(migrations.MIGRATIONS[:4], start=1):
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
    ancient.chmod(0o600)
    # `twin history` reads the history with its own query; a reading's column that its twin lacks (as
    # a column a later migration adds to `readings` would be) is said likewise.
    lacking = tmp_path / "m004-lacking.db"
    lacking.write_bytes(ancient.read_bytes())
    with contextlib.closing(sqlite3.connect(lacking, isolation_level=None)) as conn:
        conn.execute("ALTER TABLE readings DROP COLUMN quality")
        conn.execute("INSERT INTO readings (device_id, property, value, ts) VALUES ('default/lamp', 'count', '5', 1)")
    lacking.chmod(0o600)
    for args, twin_file in ((("devices",), ancient), (("twin", "get", "lamp"), ancient),
                            (("twin", "set", "lamp", "power", "true"), ancient),
                            (("twin", "history", "lamp", "count"), ancient),
                            (("twin", "history", "lamp", "count"), lacking)):
        config = write_config(tmp_path / f"{twin_file.stem}.yaml", devices, twin_file)
        result = mapper(*args, "--config", str(config))
        assert result.returncode == 1 and result.stderr.startswith(
            f"error: the twin {twin_file} is from an older mapper (schema version 4; this mapper's is {newest}): "), \
            (args, result.stderr)
        assert "`mapper run`" in result.stderr and len(result.stderr.splitlines()) == 1, (args, result.stderr)
        assert version(twin_file) == 4, args
    with TwinStore.open(ancient) as store:  # as `mapper run` opens it
        assert store.schema_version == newest and version(ancient) == newest


def test_an_older_twin_read_commands_open_but_cannot_read_is_said_on_one_line(tmp_path):
    """`mapper devices` and `twin get` said the older-twin note ("shown as it is") when the twin
    opened, and then, when a read hit a column a later migration adds, the error that it cannot be
    read: two lines that contradict each other. Now the error alone; the note only once read.
    (The twins of schema 5 to 7 read fine today: the column is dropped here, as a later migration's
    column would be missing, from a twin otherwise as the mapper before the last migration left it.)"""
    from devices.loader import load
    from twin import migrations
    from twin.store import TwinStore

    newest = len(migrations.MIGRATIONS)
    devices = write_devices(tmp_path / "dev", ["lamp"])
    twin = tmp_path / "twin.db"
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
    with contextlib.closing(sqlite3.connect(twin, isolation_level=None)) as conn:
        conn.execute("DROP TABLE admin_locks")  # m009
        conn.execute("ALTER TABLE devices DROP COLUMN state_detail")
        conn.execute(f"PRAGMA user_version = {newest - 1}")
    config = write_config(tmp_path / "c.yaml", devices, twin)
    for args in (("devices",), ("twin", "get", "lamp")):
        result = mapper(*args, "--config", str(config))
        assert result.returncode == 1 and result.stderr.startswith(
            f"error: the twin {twin} is from an older mapper (schema version {newest - 1}; this mapper's is {newest}):"
            " this command cannot read it before it is migrated"), (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and result.stdout == "", (args, result)


def test_run_twin_get_set_devices_and_clean_stop(tmp_path):
    """run -> readings visible with `twin get`/`devices`; `twin set` is applied; SIGTERM stops cleanly."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    proc = start_mapper(config, tmp_path / "log")
    try:
        def reported():
            r = mapper("twin", "get", "lamp", "--config", str(config), "--json")
            return r.returncode == 0 and json.loads(r.stdout)["properties"]["count"]["reported"] is not None and json.loads(r.stdout)
        twin = wait_for(reported, what="first readings")
        assert twin["state"] == "ok" and twin["id"] == "default/lamp"
        set_result = mapper("twin", "set", "default/lamp", "power", "on", "--config", str(config))
        assert set_result.returncode == 0 and "desired = true" in set_result.stdout
        wait_for(lambda: json.loads(mapper("twin", "get", "lamp", "--config", str(config), "--json").stdout)
                 ["properties"]["power"]["reported"] is True, what="power reported true")
        shown = mapper("twin", "get", "lamp", "--config", str(config)).stdout  # values as `twin set` takes them
        assert re.search(r"^power +true +true ", shown, flags=re.M), shown
        history = json.loads(mapper("twin", "history", "lamp", "count", "-n", "3", "--config", str(config),
                                    "--json").stdout)
        assert len(history) == 3 and [h["ts"] for h in history] == sorted(h["ts"] for h in history)
        human = mapper("devices", "--config", str(config))
        assert "default/lamp" in human.stdout and " ok " in human.stdout
        assert human.stdout.startswith(f"mapper: running (pid {proc.pid})\n"), human.stdout
        refused = mapper("twin", "set", "lamp", "temperature", "3", "--config", str(config))
        assert refused.returncode == 1 and "ReadOnly" in refused.stderr
        # Checked as the MQTT router checks: the model's range, a device in the files.
        refused = mapper("twin", "set", "lamp", "count", "-5", "--config", str(config))
        assert refused.returncode == 1 and "below the minimum" in refused.stderr, refused.stderr
        refused = mapper("twin", "set", "ghost", "power", "true", "--config", str(config))
        assert refused.returncode == 1 and "ghost" in refused.stderr, refused.stderr
    finally:
        code = stop_mapper(proc, signal.SIGTERM)
    assert code == 0
    log = (tmp_path / "log").read_text()
    assert "drivers closed, twin flushed" in log
    # After the stop the twin still says `ok` (as the device last was): the commands say no mapper runs.
    human = mapper("devices", "--config", str(config)).stdout
    assert human.startswith(f"mapper: not running on {tmp_path / 'twin.db'}: the states below are as its last run"
                            " left them\n"), human
    assert json.loads(mapper("devices", "--config", str(config), "--json").stdout)["mapper"] == {"running": False,
                                                                                                  "pid": None,
                                                                                                  "starting": False,
                                                                                                  "cannotTell": None}
    later = mapper("twin", "set", "lamp", "power", "false", "--config", str(config))
    assert later.returncode == 0 and "no mapper is running on this twin: the next `mapper run` applies it" in later.stdout


def test_devices_and_twin_set_say_a_mapper_is_starting_until_it_runs(tmp_path):
    """The lock says `<pid> starting` until the mapper runs (here held in its start by a driver whose
    open waits for a gate): `mapper devices` said "mapper: running (pid N)" all the same, and `twin
    set` "the running mapper applies it". They now say it is starting, until it runs."""
    from plugin_drivers import SITE, write_device

    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    opening, gate = tmp_path / "opening", tmp_path / "gate"
    write_device(devices, "gated", "gated", {"opening": str(opening), "open_when": str(gate), "wait_s": 60})
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    env = {"PYTHONPATH": os.pathsep.join((str(SITE), str(REPO)))}
    log = tmp_path / "log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env})
    try:
        wait_for(lambda: opening.exists() or proc.poll() is not None, timeout=30, what="the gated driver opening")
        assert proc.poll() is None, log.read_text()
        human = mapper("devices", "--config", str(config), env=env)
        assert human.returncode == 0, human
        assert human.stdout.startswith(f"mapper: starting (pid {proc.pid}), not running yet: "), human.stdout
        shown = json.loads(mapper("devices", "--config", str(config), "--json", env=env).stdout)["mapper"]
        assert shown == {"running": True, "pid": proc.pid, "starting": True, "cannotTell": None}, shown
        taken = mapper("twin", "set", "lamp", "power", "true", "--config", str(config), env=env)
        assert taken.returncode == 0, taken
        assert f"the mapper (pid {proc.pid}) is still starting: it applies it once it runs" in taken.stdout, taken
        assert "mapper test-node running" not in log.read_text()  # (still starting all along)
        gate.touch()
        wait_for(lambda: "mapper test-node running" in log.read_text(), timeout=30, what="the mapper running")
        wait_for(lambda: mapper("devices", "--config", str(config), env=env).stdout.startswith(
            f"mapper: running (pid {proc.pid})\n"), what="`mapper devices` saying it runs")
        shown = json.loads(mapper("devices", "--config", str(config), "--json", env=env).stdout)["mapper"]
        assert shown == {"running": True, "pid": proc.pid, "starting": False, "cannotTell": None}, shown
    finally:
        code = stop_mapper(proc)
    assert code == 0, log.read_text()


def test_run_refuses_only_the_device_without_driver(tmp_path):
    """`mapper run` refuses a device whose protocol has no driver, with the validate message, and runs the rest."""
    devices = write_devices(tmp_path / "dev", ["fine"], cycle=100)
    (devices / "odd.yaml").write_text(device_yaml("odd").replace("protocolName: simulated\n    configData",
                                                                 "protocolName: bacnet\n    configData"))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    proc = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: "state ok" in (tmp_path / "log").read_text(), what="fine device ok")
        log = (tmp_path / "log").read_text()
        assert "refusing device default/odd" in log and "'bacnet'" in log
        devices_out = mapper("devices", "--config", str(config)).stdout
        assert "default/odd" in devices_out and "offline" in devices_out
    finally:
        code = stop_mapper(proc, signal.SIGINT)
    assert code == 0


def test_env_overrides_config(tmp_path):
    """MAPPER_TWIN__PATH overrides twin.path from the file."""
    devices = write_devices(tmp_path / "dev", ["x"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    other = tmp_path / "other.db"
    result = mapper("devices", "--config", str(config), env={"MAPPER_TWIN__PATH": str(other)})
    assert f"no twin at {other}" in result.stderr  # the command looked there, not at the file's path
    from twin.store import TwinStore

    TwinStore.open(other).close()
    result = mapper("devices", "--config", str(config), env={"MAPPER_TWIN__PATH": str(other)})
    assert result.returncode == 0 and not (tmp_path / "twin.db").exists()
    # A MAPPER_ variable that is no config setting (set for something else) is none of ours.
    result = mapper("devices", "--config", str(config), env={"MAPPER_TWIN__PATH": str(other),
                                                             "MAPPER_HOME": "/opt/mapper"})
    assert result.returncode == 0, result.stderr


def test_env_override_types_follow_the_setting(tmp_path):
    """A text setting keeps the variable's text ("0042" is no number, "OFF" no boolean); a number
    is read as one; a bad value names the variable, not a line of the file."""
    devices = write_devices(tmp_path / "dev", ["x"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    loaded = load_config(config, {"MAPPER_NODE": "0042", "MAPPER_TWIN__HISTORY_ROWS": "1000"})
    assert loaded.node == "0042" and loaded.twin.history_rows == 1000
    # `null` unsets a text setting that may be unset (and stays text where it may not).
    with_mqtt = write_config(tmp_path / "m.yaml", devices, tmp_path / "twin.db",
                             extra="mqtt:\n  url: mqtt://127.0.0.1:1\n  client_id: pi-mapper\n")
    assert load_config(with_mqtt, {"MAPPER_MQTT__CLIENT_ID": "null"}).mqtt.client_id is None
    assert load_config(with_mqtt, {"MAPPER_MQTT__CLIENT_ID": "~"}).mqtt.client_id is None
    assert load_config(config, {"MAPPER_NODE": "null"}).node == "null"
    for variable, value, says in (("MAPPER_TWIN__SYNCHRONOUS", "OFF", "'OFF' is not allowed"),
                                  ("MAPPER_TWIN__HISTORY_ROWS", "lots", "must be an integer"),
                                  ("MAPPER_NODE", "Pi_1", "not a valid node name")):
        with pytest.raises(DefinitionError) as caught:
            load_config(config, {variable: value})
        (problem,) = caught.value.problems
        assert problem.file == f"environment variable {variable}" and problem.line is None
        assert says in problem.message


def test_sigkill_loses_nothing_committed(tmp_path):
    """kill -9 mid-run: the file passes integrity_check and every reading seen as committed is still there."""
    names = [f"s{i}" for i in range(8)]
    devices = write_devices(tmp_path / "dev", names, cycle=10)
    twin_path = tmp_path / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin_path)
    proc = start_mapper(config, tmp_path / "log")
    seen: dict[int, tuple] = {}
    try:
        wait_for(lambda: twin_path.exists(), what="twin file")
        observer = sqlite3.connect(f"file:{twin_path}?mode=ro", uri=True, timeout=10)

        def observe():
            try:
                rows = observer.execute("SELECT id, device_id, property, value, ts, quality FROM readings "
                                        "WHERE id > ? ORDER BY id", (max(seen, default=0),)).fetchall()
            except sqlite3.OperationalError:
                return False  # schema not created yet
            seen.update({r[0]: r for r in rows})
            return len(seen) >= 3000
        wait_for(observe, timeout=60, interval=0.01, what="3000 committed readings")
        observer.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    check = sqlite3.connect(twin_path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after = {r[0]: r for r in check.execute("SELECT id, device_id, property, value, ts, quality FROM readings")}
    missing = [i for i in seen if after.get(i) != seen[i]]
    assert missing == [], f"{len(missing)} committed readings lost"
    # The mapper starts again on the same file and keeps going.
    proc = start_mapper(config, tmp_path / "log2")
    try:
        top = max(after)
        wait_for(lambda: check.execute("SELECT max(id) FROM readings").fetchone()[0] > top + 100, what="new readings")
    finally:
        code = stop_mapper(proc, signal.SIGTERM)
    assert code == 0


async def test_run_freezes_the_start_up_heap_once_ready(tmp_path):
    """`mapper run`'s heap freeze waits for the service to be ready, then moves what exists out of the
    garbage collector's walks."""
    import asyncio
    import gc

    from mapper.cli import freeze_heap_when_ready
    from mapper.service import MapperService

    devices = write_devices(tmp_path / "dev", ["lamp"])
    service = MapperService(load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")))
    stop = asyncio.Event()
    assert gc.get_freeze_count() == 0
    freezer = asyncio.create_task(freeze_heap_when_ready(service))
    running = asyncio.create_task(service.run(stop))
    try:
        await asyncio.sleep(0)
        assert not service.ready.is_set() and gc.get_freeze_count() == 0  # still starting: nothing frozen
        await asyncio.wait_for(freezer, 10)
        assert service.ready.is_set()
        assert gc.get_freeze_count() > 10_000  # this test process's modules and objects
    finally:
        gc.unfreeze()
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_the_start_up_garbage_is_collected_before_the_devices_start(tmp_path):
    """`mapper run` collects its start-up garbage once everything is set up and before any device
    loop runs, where the ~20 ms pause costs no reading (once running, it held up the first ones)."""
    import asyncio

    from mapper.service import MapperService

    devices = write_devices(tmp_path / "dev", ["lamp"])
    service = MapperService(load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")))
    seen: list[tuple[int, bool]] = []
    service.before_devices.append(lambda: seen.append((len(service.runners), service.recorder is not None)))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        assert seen == [(0, True)]  # once, set up, no device loop yet
        assert len(service.runners) == 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


def test_twin_set_refuses_a_device_no_longer_in_the_files(tmp_path):
    """The twin keeps a removed device's row (inactive): `mapper twin set` refuses it, naming why,
    instead of storing a value no device loop will ever apply."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp", "old"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    (devices / "old.yaml").unlink()
    refused = mapper("twin", "set", "old", "power", "true", "--config", str(config))
    assert refused.returncode == 1 and "no longer in the device files" in refused.stderr, refused.stderr
    accepted = mapper("twin", "set", "lamp", "power", "true", "--config", str(config))
    assert accepted.returncode == 0, accepted.stderr


def test_twin_set_refuses_a_local_device_whose_twin_row_is_still_edgecores(tmp_path):
    """The operator adds d1.yaml for a name the twin still records as edgecore's Device (the mapper
    has not taken the file up yet): `twin set` refuses, saying to reload or start the mapper first,
    instead of writing into edgecore's row a value the next sync drops (origin change). Once the
    mapper has synced the local file, it is accepted. And back: a local row whose file is gone is
    refused in `mode: kubeedge` too (not yet edgecore's device)."""
    import dataclasses

    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["d1"])
    local = load([devices]).devices[DeviceId("default", "d1")]
    edge = dataclasses.replace(local, source="dmi:Device default/d1")
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", extra=(
        f"mode: kubeedge\nkubeedge:\n  name: sim\n  protocol: simulated\n  edgecore_socket: {tmp_path}/dmi.sock\n"))
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices([edge])
        store.set_desired(local.id, "count", 77)
    refused = mapper("twin", "set", "default/d1", "count", "5", "--config", str(config))
    assert refused.returncode == 1, refused.stdout
    assert "edgecore's device in the twin" in refused.stderr and "SIGHUP" in refused.stderr, refused.stderr
    with TwinStore.open(tmp_path / "twin.db") as store:
        assert store.device(local.id).properties["count"].desired == 77  # nothing written
        store.sync_devices([local])  # the mapper takes up the file (edgecore's 77 dropped)
    accepted = mapper("twin", "set", "default/d1", "count", "5", "--config", str(config))
    assert accepted.returncode == 0, accepted.stderr
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices([local])
        assert store.device(local.id).properties["count"].desired == 5
    (devices / "d1.yaml").unlink()
    gone = mapper("twin", "set", "default/d1", "count", "6", "--config", str(config))
    assert gone.returncode == 1 and "still the local file's device" in gone.stderr, gone.stderr


def test_twin_set_refuses_a_local_device_whose_twin_row_is_inactive_of_unknown_origin(tmp_path):
    """A twin row from before origins were recorded, inactive (NULL, active 0): the mapper counts
    the local file's taking it up as an origin change (its desired values dropped), so `twin set`
    refuses it until then, as for edgecore's row."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["d1"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.deactivate_devices([])
        store.conn.execute("UPDATE devices SET origin=NULL")
    refused = mapper("twin", "set", "default/d1", "count", "5", "--config", str(config))
    assert refused.returncode == 1 and "origin the twin does not know" in refused.stderr, refused.stderr


def test_twin_set_takes_a_value_for_a_device_the_running_mapper_runs_while_it_is_offline(tmp_path):
    """A device the mapper runs is `offline` in the twin after a clean stop until a read decides
    its state again (for good, while its driver cannot read it). `twin set` takes a value for it:
    the mapper applies it once the device is back. (A first version refused every `offline` device
    as one the mapper does not run.)"""
    from helpers import one_property_device

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "dead.yaml").write_text(one_property_device(
        "dead", "{name: level, type: INT, accessMode: ReadWrite, minimum: '0', maximum: '3'}",
        "{kind: constant, value: 1}", settings="collectCycle: 10000", config="{broken: true}"))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    for run in (1, 2):  # the first run's clean stop leaves it offline in the twin
        log = tmp_path / f"log{run}"
        proc = start_mapper(config, log)
        try:
            wait_for(lambda: "running: 1 device(s)" in log.read_text(), what="the mapper running")
            if run == 2:
                twin = json.loads(mapper("twin", "get", "dead", "--config", str(config), "--json").stdout)
                assert twin["state"] == "offline", twin
                taken = mapper("twin", "set", "dead", "level", "2", "--config", str(config))
                assert taken.returncode == 0 and "the running mapper applies it" in taken.stdout, taken
        finally:
            assert stop_mapper(proc) == 0


def test_twin_set_checks_against_what_the_running_mapper_loaded_not_the_files(tmp_path):
    """`twin set` checked the value against the device files on disk, not the definition the
    running mapper loaded: a maximum raised from 3 to 10 in the model file without a reload let
    `twin set greenhouse level 8` print "the running mapper applies it", and the mapper then
    refused it (`write failed: ... 8 is above the maximum 3`, an apply error for good). Now a
    device whose files differ from what the running mapper synced into the twin (its
    fingerprint) is refused, nothing written, saying to reload it; after the SIGHUP it is set and
    applied. A device file added without a reload is not "unknown device" but one the running
    mapper has not loaded (reload it); with no mapper running, one `mapper run` takes up."""
    from helpers import one_property_device

    devices = tmp_path / "dev"
    devices.mkdir()
    level = ("{name: level, type: INT, accessMode: ReadWrite, minimum: '0', maximum: '%s'}")
    greenhouse = devices / "greenhouse.yaml"
    greenhouse.write_text(one_property_device("greenhouse", level % 3, "{kind: constant, value: 1}",
                                              settings="collectCycle: 50"))
    (devices / "pump.yaml").write_text(one_property_device("pump", level % 3, "{}", settings="collectCycle: 50")
                                       .replace("simulated", "acme-fieldbus"))  # no driver: the mapper skips it
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")

    def twin_level() -> dict:
        return json.loads(mapper("twin", "get", "greenhouse", "--config", str(config), "--json").stdout
                          )["properties"]["level"]

    proc = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: "running: 1 device(s)" in (tmp_path / "log").read_text(), what="the mapper running")
        greenhouse.write_text(greenhouse.read_text().replace("maximum: '3'", "maximum: '10'"))
        refused = mapper("twin", "set", "greenhouse", "level", "8", "--config", str(config))
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert ("differs from the definition the running mapper (pid %d) loaded" % proc.pid) in refused.stderr
        assert f"kill -HUP {proc.pid}" in refused.stderr and "systemctl reload mapper" in refused.stderr
        assert twin_level()["desired"] is None  # nothing written
        # Valid under both: refused too (the twin does not record the range the mapper runs).
        assert mapper("twin", "set", "greenhouse", "level", "2", "--config", str(config)).returncode == 1
        (devices / "shed.yaml").write_text(one_property_device("shed", level % 3, "{kind: constant, value: 1}",
                                                               settings="collectCycle: 50"))
        new = mapper("twin", "set", "shed", "level", "2", "--config", str(config))
        assert new.returncode == 1, new
        assert new.stderr.startswith(f"error: device default/shed is defined in {devices / 'shed.yaml'}"), new.stderr
        assert f"the running mapper (pid {proc.pid}) has not loaded it" in new.stderr
        assert f"kill -HUP {proc.pid}" in new.stderr, new.stderr
        # A device the mapper refused at its start (no driver): refused too, saying why (it said
        # "the running mapper applies it", and nothing ever did).
        refused_at_start = mapper("twin", "set", "pump", "level", "2", "--config", str(config))
        assert refused_at_start.returncode == 1, refused_at_start
        assert "the running mapper (pid %d) does not run it: " % proc.pid in refused_at_start.stderr
        assert "acme-fieldbus" in refused_at_start.stderr, refused_at_start.stderr  # why: no such driver
        assert json.loads(mapper("twin", "get", "pump", "--config", str(config), "--json").stdout
                          )["properties"]["level"]["desired"] is None  # nothing written

        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in (tmp_path / "log").read_text(), what="the reload")
        accepted = mapper("twin", "set", "greenhouse", "level", "8", "--config", str(config))
        assert accepted.returncode == 0 and "the running mapper applies it" in accepted.stdout, accepted
        wait_for(lambda: twin_level()["reported"] == 8, what="level 8 applied and read back")
        assert twin_level()["applyError"] is None
        assert mapper("twin", "set", "shed", "level", "2", "--config", str(config)).returncode == 0
    finally:
        assert stop_mapper(proc) == 0
    assert "write failed" not in (tmp_path / "log").read_text()
    # No mapper running: the files are what the next start runs, and a device not in the twin yet says so.
    greenhouse.write_text(greenhouse.read_text().replace("maximum: '10'", "maximum: '20'"))
    assert mapper("twin", "set", "greenhouse", "level", "15", "--config", str(config)).returncode == 0
    (devices / "barn.yaml").write_text(one_property_device("barn", level % 3, "{kind: constant, value: 1}",
                                                           settings="collectCycle: 50"))
    barn = mapper("twin", "set", "barn", "level", "2", "--config", str(config))
    assert barn.returncode == 1 and "not in the twin yet: `mapper run` takes it up when it starts" in barn.stderr, barn


def _kubeedge_refusals(tmp_path, sitecustomize: str) -> list[str]:
    """The stderr of `mapper run` and `mapper install-service --dry-run` with a `mode: kubeedge`
    config, under a sitecustomize that changes what this install has; both must refuse it at
    once (exit 1, no traceback) and open no twin."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", extra=(
        f"mode: kubeedge\nkubeedge: {{name: dht, protocol: dht, edgecore_socket: {tmp_path}/dmi.sock,"
        f" socket: {tmp_path}/dht.sock}}\n"))
    said = []
    for args in (("run",), ("install-service", "--dry-run")):
        done = mapper(*args, "--config", str(config), env={"PYTHONPATH": str(site)})
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        said.append(done.stderr)
    assert not (tmp_path / "twin.db").exists()
    return said


def test_kubeedge_mode_without_the_kubeedge_extra_is_a_config_error(tmp_path):
    """A core-only install (`pip install .`, no grpcio/protobuf) and a `mode: kubeedge` config:
    `mapper run` and `mapper install-service` refuse it at once, naming the extra, as they do for
    inference without the `ml` extra. `mapper run` used to die with a ModuleNotFoundError traceback."""
    for stderr in _kubeedge_refusals(tmp_path, "import sys\nsys.modules['grpc'] = None\n"):
        assert "mode: kubeedge: needs grpc" in stderr and "`kubeedge` extra" in stderr, stderr


@pytest.mark.parametrize(("sitecustomize", "says"), [
    # protobuf's runtime reports its own version from these constants; 7.0.0 is older than any stub.
    ("from google.protobuf import runtime_version\nruntime_version.MINOR = runtime_version.PATCH = 0\n",
     "runtime 7.0.0"),
    ("import grpc\ngrpc.__version__ = '1.60.0'\n", "grpc package installed is at version 1.60.0"),
], ids=["protobuf", "grpcio"])
def test_kubeedge_mode_with_grpc_or_protobuf_older_than_the_stubs_is_a_config_error(tmp_path, sitecustomize, says):
    """grpcio and protobuf installed, but older than the ones the checked-in DMI stubs were generated
    for (installed outside the `kubeedge` extra): `mapper run` and `install-service` refuse the
    config at once with the library's own version message and what to upgrade. `mapper run` used
    to die with a VersionError (or RuntimeError) traceback from the stubs' first import."""
    for stderr in _kubeedge_refusals(tmp_path, sitecustomize):
        assert "cannot load the DMI stubs" in stderr and says in stderr, stderr
        assert "pip install --upgrade grpcio protobuf" in stderr, stderr


@pytest.mark.parametrize(("limit", "says"), [("0", "must be 1 or more"), ("-5", "must be 1 or more"),
                                            ("ten", "not a whole number"),
                                            ("100000000000000000000", "must be at most 10,000,000"),
                                            ("10000001", "must be at most 10,000,000")])
def test_twin_history_needs_a_count_from_1_to_10_million(tmp_path, limit, says):
    """`-n -5` used to print the whole history (SQLite takes a negative LIMIT as none) and `-n 0`
    said "no readings"; `-n 100000000000000000000` printed SQLite's raw `error: datatype mismatch`
    (beyond its 64-bit LIMIT). All are usage errors now, before any file is read."""
    done = mapper("twin", "history", "lamp", "count", "-n", limit, "--config", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and "--limit/-n" in done.stderr and says in done.stderr, done.stderr


def test_twin_history_takes_the_largest_count(tmp_path):
    """-n 10000000, the maximum, reads the history (here all of it)."""
    from devices.loader import load
    from twin.records import Reading
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(DeviceId("default", "lamp"), "count", n, 1_700_000_000_000 + n) for n in range(3)])
    done = mapper("twin", "history", "lamp", "count", "-n", "10000000", "--json", "--config", str(config))
    assert done.returncode == 0 and [r["value"] for r in json.loads(done.stdout)] == [0, 1, 2], done


def test_twin_history_of_a_misspelt_device_or_property_says_so(tmp_path):
    """`mapper twin history lamp tempreature` said "no readings of default/lamp/tempreature", as
    for a real property that has none yet: a typo looked like a sensor that never reads. Now an
    unknown device or property is named as such, with the device's properties."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    typo = mapper("twin", "history", "lamp", "tempreature", "--config", str(config))
    assert typo.returncode == 1 and typo.stderr == (
        "error: device default/lamp has no property 'tempreature' (properties: count, power, temperature)\n"), typo
    ghost = mapper("twin", "history", "ghost", "count", "--config", str(config))
    assert ghost.returncode == 1 and ghost.stderr == (
        f"error: unknown device default/ghost in the twin {tmp_path / 'twin.db'}: its devices are default/lamp\n"), ghost
    none_yet = mapper("twin", "history", "lamp", "count", "--config", str(config))
    assert none_yet.returncode == 1 and none_yet.stderr.startswith("no readings of default/lamp/count in "), none_yet


LABELLED_MODEL = MODEL.format(model="thing-model") + """\
    - name: label
      type: STRING
      accessMode: ReadOnly
"""


def _history_twin(tmp_path: Path, readings: list) -> Path:
    """A config whose twin (tmp_path/state/twin.db) holds `readings` (Reading or (device, property,
    value, ts[, quality, detail])), recorded through the store in that order; devices lamp and fan,
    each with a STRING property `label` besides temperature, power and count."""
    from devices.loader import load
    from twin.records import Reading
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp", "fan"])
    (devices / "model.yaml").write_text(LABELLED_MODEL)
    for name in ("lamp", "fan"):
        (devices / f"{name}.yaml").write_text(device_yaml(name).replace(
            "  properties:\n", "  properties:\n    - name: label\n      visitors:\n        protocolName: simulated\n"
            "        configData: {kind: constant, value: idle}\n", 1))
    (tmp_path / "state").mkdir()
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin)
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([r if isinstance(r, Reading) else Reading(DeviceId("default", r[0]), *r[1:]) for r in readings])
    return config


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def test_twin_history_exports_a_time_window_given_as_iso_times(tmp_path):
    """`twin history` showed the last N readings of one property only: a day's data could not be
    had by time. --since (inclusive) and --until (exclusive) take ISO 8601 times, UTC when they name
    no zone; a window without --limit prints all of it (here more than the default 20)."""
    eight = _ms("2025-06-01T08:00:00+00:00")
    inside = [("lamp", "count", n, eight + n * 60_000) for n in range(59)] + [("lamp", "count", 59, eight + 3_599_999)]
    config = _history_twin(tmp_path, [("lamp", "count", -1, eight - 1), *inside,
                                      ("lamp", "count", 60, eight + 3_600_000), ("fan", "count", 99, eight + 5)])

    def shown(*args: str) -> list:
        done = mapper("twin", "history", "lamp", "count", *args, "--json", "--config", str(config))
        assert done.returncode == 0, done
        return [r["value"] for r in json.loads(done.stdout)]

    hour = list(range(60))
    assert shown("--since", "2025-06-01T08:00", "--until", "2025-06-01T09:00") == hour  # bare: UTC
    assert shown("--since", "2025-06-01T08:00:00Z", "--until", "2025-06-01 09:00:00.000Z") == hour
    assert shown("--since", "2025-06-01T10:00+02:00", "--until", "2025-06-01T11:00+02:00") == hour
    assert shown("--since", "2025-06-01T08:59:59.999") == [59, 60]
    assert shown("--until", "2025-06-01T08:00") == [-1]
    assert shown("--since", "2025-06-01", "--until", "2025-06-02") == [-1, *hour, 60]
    assert shown("-n", "2", "--since", "2025-06-01T08:00", "--until", "2025-06-01T09:00") == [58, 59]  # its newest
    assert shown() == list(range(41, 61))  # no window: the last 20, as before
    empty = mapper("twin", "history", "lamp", "count", "--since", "2025-06-02", "--config", str(config))
    assert empty.returncode == 1 and empty.stdout == "" and empty.stderr.startswith(
        "no readings of default/lamp/count in that time window in "), empty


def test_twin_history_takes_a_window_as_durations_back_from_now(tmp_path):
    """--since 2h, --until 30m ...: s, m, h and d back from now (the readings here are minutes
    apart from each edge, far more than the command takes to start)."""
    import time

    now = int(time.time() * 1000)
    ago = {"3d": 3 * 86_400_000, "2h": 2 * 3_600_000, "40m": 40 * 60_000, "5m": 5 * 60_000, "now": 0}
    config = _history_twin(tmp_path, [("lamp", "temperature", float(n), now - ms) for n, ms in enumerate(ago.values())])

    def shown(*args: str) -> list:
        done = mapper("twin", "history", "lamp", "temperature", *args, "--json", "--config", str(config))
        assert done.returncode == 0, done
        return [r["value"] for r in json.loads(done.stdout)]

    assert shown("--since", "7d") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert shown("--since", "1d") == [1.0, 2.0, 3.0, 4.0]
    assert shown("--since", "3h", "--until", "1h") == [1.0]
    assert shown("--since", "60m", "--until", "600s") == [2.0]
    assert shown("--since", "1.5h", "-n", "1") == [4.0]


@pytest.mark.parametrize("when", ["yesterday", "5w", "1y", "2h ago", "2026-13-01T08:00", "12:00", ""])
def test_twin_history_refuses_a_time_it_cannot_read_naming_the_option_and_the_forms(tmp_path, when):
    done = mapper("twin", "history", "lamp", "--since", when, "--config", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and f"argument --since: not a time nor a duration: {when!r}" in done.stderr, done
    assert "ISO 8601" in done.stderr and "UTC unless" in done.stderr and "(90s, 15m, 2h, 7d)" in done.stderr, done
    until = mapper("twin", "history", "lamp", "--until", when, "--config", str(tmp_path / "none.yaml"))
    assert until.returncode == 2 and "argument --until: not a time nor a duration" in until.stderr, until


def test_twin_history_refuses_an_empty_window_and_a_property_with_all(tmp_path):
    config = _history_twin(tmp_path, [("lamp", "count", 1, 1_700_000_000_000)])
    backwards = mapper("twin", "history", "lamp", "--since", "1h", "--until", "2h", "--config", str(config))
    assert backwards.returncode == 2 and backwards.stderr.startswith("error: --since (") and (
        ") must be before --until (") in backwards.stderr, backwards
    both = mapper("twin", "history", "lamp", "count", "--all", "--config", str(config))
    assert both.returncode == 2 and both.stderr == (
        "error: give PROPERTY or --all, not both (--all: every property of the device)\n"), both


def test_twin_history_of_every_property_is_in_time_order_and_only_of_that_device(tmp_path):
    """Without PROPERTY (or with --all) every property of the device, ordered by the time taken,
    also a reading recorded after one taken later (a slow driver's)."""
    t = 1_700_000_000_000
    config = _history_twin(tmp_path, [("lamp", "temperature", 21.5, t), ("lamp", "count", 7, t + 2000),
                                      ("fan", "count", 1, t + 2500), ("lamp", "power", True, t + 1000),
                                      ("lamp", "label", "idle", t + 3000)])
    for every in ((), ("--all",)):
        done = mapper("twin", "history", "lamp", *every, "--json", "--config", str(config))
        assert done.returncode == 0 and json.loads(done.stdout) == [
            {"ts": t, "property": "temperature", "value": 21.5, "quality": "good"},
            {"ts": t + 1000, "property": "power", "value": True, "quality": "good"},
            {"ts": t + 2000, "property": "count", "value": 7, "quality": "good"},
            {"ts": t + 3000, "property": "label", "value": "idle", "quality": "good"}], done
    windowed = mapper("twin", "history", "lamp", "--since", "2023-01-01", "-n", "2", "--config", str(config))
    assert windowed.returncode == 0 and windowed.stdout == (
        "2023-11-14 22:13:22.000Z  count                     7  good\n"
        '2023-11-14 22:13:23.000Z  label                "idle"  good\n'), windowed
    newest = mapper("twin", "history", "lamp", "count", "--config", str(config))
    assert newest.stdout == "2023-11-14 22:13:22.000Z             7  good\n", newest  # one property: as before


def test_twin_history_csv_round_trips_awkward_strings(tmp_path):
    """--csv: a header, ts in ISO 8601 UTC with milliseconds and in epoch ms; a string value as it
    is, whatever its commas, quotes, newlines, leading spaces or letters (csv.reader gives it back);
    numbers and booleans as JSON; an error reading's value empty, its detail in its column."""
    import csv
    import io

    from twin.records import ERROR, Reading

    lamp = DeviceId("default", "lamp")
    awkward = ["a, b", 'say "hi", then go', "line one\nline two\r\nthree", "", "  padded  ", "température ✓",
               '"quoted"', "=SUM(A1:A2)", "null", "42"]
    t = 1_796_112_000_123  # 2026-12-01T08:00:00.123Z
    readings = [("lamp", "label", text, t + n) for n, text in enumerate(awkward)]
    readings += [("lamp", "temperature", 21.5, t + 100), ("lamp", "power", False, t + 101),
                 Reading(lamp, "count", None, t + 102, ERROR, 'timeout, "bus" busy')]
    config = _history_twin(tmp_path, readings)
    done = subprocess.run([sys.executable, "-m", "mapper", "twin", "history", "lamp", "--all", "--since",
                           "2026-12-01T08:00", "--csv", "--config", str(config)],
                          capture_output=True, timeout=30, cwd=REPO)  # bytes: text=True would turn \r\n into \n
    assert done.returncode == 0 and done.stderr == b"", done
    rows = list(csv.reader(io.StringIO(done.stdout.decode(), newline="")))
    assert rows[0] == ["ts", "ts_ms", "device", "property", "value", "quality", "detail"]
    assert [r[4] for r in rows[1:len(awkward) + 1]] == awkward
    assert rows[1][:4] == ["2026-12-01T08:00:00.123Z", str(t), "default/lamp", "label"]
    assert rows[-3:] == [["2026-12-01T08:00:00.223Z", str(t + 100), "default/lamp", "temperature", "21.5", "good", ""],
                         ["2026-12-01T08:00:00.224Z", str(t + 101), "default/lamp", "power", "false", "good", ""],
                         ["2026-12-01T08:00:00.225Z", str(t + 102), "default/lamp", "count", "", "error",
                          'timeout, "bus" busy']]
    label = mapper("twin", "history", "lamp", "label", "-n", "1", "--csv", "--config", str(config))
    assert label.returncode == 0 and list(csv.reader(io.StringIO(label.stdout, newline="")))[1][3:5] == ["label", "42"]


@pytest.mark.parametrize("left_by", ["a running mapper", "a killed mapper", "a clean stop"])
def test_twin_history_writes_nothing_to_the_twin_files(tmp_path, left_by):
    """`twin history` beside the running mapper wrote its read mark to the twin's -shm (the file changed
    at every run), and after a killed mapper the reader's close checkpointed the WAL it left into
    the twin file: a read that wrote to the SD card. Now, as `mapper health`, every file of the twin's
    directory is left as it was (mtime and size), whether a mapper has the twin open, one was
    killed with readings in the WAL, or a clean stop left the twin file alone."""
    from devices.loader import load
    from helpers import files_of
    from twin.records import Reading
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    state = tmp_path / "state"
    state.mkdir()
    twin = state / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin)
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(DeviceId("default", "lamp"), "count", n, 1_700_000_000_000 + n) for n in range(3)])
    running = None
    if left_by == "a running mapper":
        running = TwinStore.open(twin)
        running.record([Reading(DeviceId("default", "lamp"), "count", 777, 1_700_000_000_003)])
    elif left_by == "a killed mapper":
        subprocess.run([sys.executable, "-c", "import os, sys; from devices.ids import DeviceId;"
                        " from twin.records import Reading; from twin.store import TwinStore;"
                        " s = TwinStore.open(sys.argv[1]);"
                        " s.record([Reading(DeviceId('default', 'lamp'), 'count', 777, 1_700_000_000_003)]);"
                        " os._exit(0)", str(twin)], check=True, cwd=REPO)
        assert (state / "twin.db-wal").stat().st_size > 0
    try:
        before = files_of(state)
        for args in (("count", "--json"), ("--all", "--since", "2023-01-01", "--csv"), ("count",)):
            done = mapper("twin", "history", "lamp", *args, "--config", str(config))
            assert done.returncode == 0 and ("777" in done.stdout) == (left_by != "a clean stop"), done
            assert files_of(state) == before, (args, before, files_of(state))
    finally:
        if running is not None:
            running.close()


def test_twin_get_and_set_of_a_misspelt_device_or_property_name_the_one_meant(tmp_path):
    """`mapper twin set lamp powr true` said "device default/lamp has no property 'powr'", and
    `twin get lamp-1` "unknown device default/lamp-1", leaving the user to look the names up. The
    property's refusal lists the device's properties (as `twin history` does), and a device name
    close to one in the twin is said with it; one close to none stays as it was."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp", "pump-7"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    typo = mapper("twin", "set", "lamp", "powr", "true", "--config", str(config))
    assert typo.returncode == 1 and typo.stderr == (
        "error: device default/lamp has no property 'powr' (properties: count, power, temperature)\n"), typo
    for command in (["get", "pump7"], ["set", "pump7", "power", "true"], ["history", "pump7", "count"]):
        done = mapper("twin", *command, "--config", str(config))
        assert done.returncode == 1 and done.stderr == (
            "error: unknown device default/pump7; did you mean default/pump-7?\n"), (command, done)
    ghost = mapper("twin", "get", "ghost", "--config", str(config))
    # (a name close to none: the devices the twin has, which it said nothing about)
    assert ghost.returncode == 1 and ghost.stderr == (
        f"error: unknown device default/ghost in the twin {tmp_path / 'twin.db'}: its devices are default/lamp,"
        " default/pump-7\n"), ghost
    ghost = mapper("twin", "set", "ghost", "power", "true", "--config", str(config))
    assert ghost.returncode == 1 and ghost.stderr.startswith("error: unknown device default/ghost in the twin "), ghost


def test_twin_set_of_a_read_only_property_says_where_that_comes_from_and_which_are_writable(tmp_path):
    """`mapper twin set lamp temperature 5` said only "property 'temperature' of default/lamp is
    ReadOnly": not where ReadOnly is set, nor which properties of the device do take a value."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    refused = mapper("twin", "set", "lamp", "temperature", "5", "--config", str(config))
    assert refused.returncode == 1 and refused.stderr == (
        "error: property 'temperature' of default/lamp is ReadOnly (its DeviceModel thing-model's accessMode, or a"
        " driver that cannot write it): it takes no desired value; the device's ReadWrite properties: count, power\n"
    ), refused.stderr


def test_an_out_of_range_value_is_refused_with_the_limit_as_the_file_writes_it(tmp_path):
    """`mapper twin set lamp count 999999999` against `maximum: "100000000"` said "above the maximum
    1e+08": the limit in a notation the file does not use."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    model = (devices / "model.yaml").read_text()
    count = '    - name: count\n      type: INT\n      accessMode: ReadWrite\n      minimum: "0"\n      maximum: "100000000"\n'
    assert count in model, model
    (devices / "model.yaml").write_text(model.replace(count, count.replace('"0"', '"-2.5"')))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    above = mapper("twin", "set", "lamp", "count", "999999999", "--config", str(config))
    assert above.returncode == 1 and above.stderr == (
        "error: property 'count': 999999999 is above the maximum 100000000\n"), above.stderr
    below = mapper("twin", "set", "lamp", "count", "-3", "--config", str(config))
    assert below.returncode == 1 and below.stderr == "error: property 'count': -3 is below the minimum -2.5\n", below


def test_an_unknown_device_is_said_with_the_one_meant_in_another_namespace(tmp_path):
    """"did you mean" looked only within the namespace asked for: `other/soil-1` (or a bare `soil-1`,
    which is `default/soil-1`) got no hint while `default/soil-1` (or `farm/soil-1`) was in the twin."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["soil-1"])
    (devices / "farm.yaml").write_text(
        (devices / "model.yaml").read_text().replace("namespace: default", "namespace: farm") + "---\n"
        + (devices / "soil-1.yaml").read_text().replace("name: soil-1", "name: pump-2")
        .replace("namespace: default", "namespace: farm"))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    for asked, meant in (("other/soil-1", "default/soil-1"), ("pump-2", "farm/pump-2"),
                         ("other/pump2", "farm/pump-2")):
        for command in (["get", asked], ["set", asked, "power", "true"], ["history", asked, "count"]):
            done = mapper("twin", *command, "--config", str(config))
            wanted = asked if "/" in asked else f"default/{asked}"
            assert done.returncode == 1 and done.stderr == (
                f"error: unknown device {wanted}; did you mean {meant}?\n"), (command, done)


def test_devices_and_twin_get_keep_their_columns_in_line_with_long_names_and_values(tmp_path):
    """A device id longer than 32 characters (the demo's `default/room-sensor-faulty-sensor-faults`)
    and a reported value longer than 12 (`0.6307235560375336`) pushed their rows out of line with
    the header: each column is now as wide as its longest entry."""
    from devices.loader import load
    from twin.records import Reading
    from twin.store import TwinStore

    long_name = "room-sensor-faulty-sensor-faults-long"
    devices = write_devices(tmp_path / "dev", ["lamp", long_name])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(DeviceId("default", long_name), "temperature", 21.307235560375336, 1_700_000_000_000)])
    listed = mapper("devices", "--config", str(config))
    assert listed.returncode == 0, listed
    header, *rows = [line for line in listed.stdout.splitlines() if line.startswith(("device ", "default/"))]
    assert len(rows) == 2 and all(row.index(row.split()[1]) == header.index("state") for row in rows), listed.stdout
    shown = mapper("twin", "get", long_name, "--config", str(config))
    assert shown.returncode == 0, shown
    header, *rows = shown.stdout.splitlines()[1:]
    value = next(row for row in rows if row.startswith("temperature "))
    assert "21.307235560375336 Celsius" in value, shown.stdout
    right = header.index("reported") + len("reported")
    assert value.index("21.307235560375336 Celsius") + len("21.307235560375336 Celsius") == right, shown.stdout
    assert all(row.index(row.split()[2]) < header.index("delta") for row in rows), shown.stdout


def test_a_twin_that_cannot_be_written_at_start_is_named_in_the_error(tmp_path):
    """`mapper run` whose twin file cannot be written (RLIMIT_FSIZE 0: every write fails with a disk
    I/O error) said only `error: disk I/O error` (or `unable to open database file`), naming no
    file. Now the error names the twin file and what it needs. (The disk itself has room here: a
    start on a disk that is really full or read-only waits for it, tests/test_twin_disk_at_start.py.)"""
    import resource

    devices = write_devices(tmp_path / "dev", ["s1"])
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    run = subprocess.run([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert run.returncode == 1
    assert f"cannot open the twin {twin}:" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_twin_set_on_a_twin_it_may_not_write_names_the_twin_and_why(tmp_path):
    """`mapper twin set` on a twin file it may not write said only `error: attempt to write a
    readonly database`: no file, no cause. Now it names the twin, its owner and mode, and what to
    look at. (The file is made immutable, `chattr +i`: the tests run as root, whom modes do not stop.)"""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp"])
    twin = tmp_path / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin)
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
    if subprocess.run(["chattr", "+i", str(twin)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        if os.access(twin, os.W_OK):
            pytest.skip("this user may write an immutable file")
        refused = mapper("twin", "set", "lamp", "power", "true", "--config", str(config))
        run = mapper("run", "--config", str(config), timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(twin)], check=True)
    # `mapper run` named the twin, not why it could not write it
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith(
        f"error: cannot write the twin {twin} at start: attempt to write a readonly database: {twin} is "), run.stderr
    assert "may not write (its mode, or an immutable flag: lsattr)" in run.stderr, run.stderr
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith(f"error: cannot write the twin {twin}: attempt to write a readonly database: "
                                     f"{twin} is "), refused.stderr
    assert "may not write" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_a_world_readable_mqtt_secret_is_warned_about(tmp_path):
    """A password file every local user can read (`echo secret > file` under the usual umask 022
    makes it 0644) is a weak default: `mapper run` and `mapper install-service` say so, with the
    chmod that closes it, and still run. A 0600 file draws no warning."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    secret = tmp_path / "mapper.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {secret}\n")
    warning = (f"warning: {config}: mqtt.password_file: {secret} is readable by every user of this machine"
               f" (mode 0644): sudo chmod o-r {secret}")
    result = mapper("install-service", "--config", str(config), "--dry-run", "--user", "root", "--groups", "--other-twin",
                    "--force")
    assert result.returncode == 0 and "ExecStart=" in result.stdout, result
    assert warning in result.stderr.splitlines(), result.stderr
    proc = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: "running: 1 device(s)" in (tmp_path / "log").read_text(), what="mapper running")
        assert warning in (tmp_path / "log").read_text().splitlines()
    finally:
        stop_mapper(proc, signal.SIGTERM)
    secret.chmod(0o600)
    result = mapper("install-service", "--config", str(config), "--dry-run", "--user", "root", "--groups", "--other-twin",
                    "--force")
    assert result.returncode == 0 and "readable by every user" not in result.stderr, result



def test_a_twin_path_that_cannot_be_a_file_is_a_config_error_with_file_and_line(tmp_path):
    """`twin.path` naming a directory, or a file below something that is a file: `mapper run` said
    `error: [Errno 17] File exists: '...'` (no config file, line or field; the mapper had already
    logged its start), or an SQLite error. It is now a config error at FILE:LINE: twin.path (or at
    the environment variable that set it), for every command that reads the config."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "afile" / "twin.db")
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if "path:" in text)
    for args in (("run", "--config", str(config)), ("devices", "--config", str(config))):
        result = mapper(*args)
        assert result.returncode == 1, result
        assert result.stderr == (f"{config}:{line}: twin.path: {tmp_path / 'afile'} is a file, not a directory,"
                                 f" so the twin {tmp_path / 'afile' / 'twin.db'} cannot be created\n"), result.stderr
    result = mapper("run", "--config", str(config), env={"MAPPER_TWIN__PATH": str(tmp_path / "adir")})
    assert result.returncode == 1, result
    assert result.stderr == (f"environment variable MAPPER_TWIN__PATH: twin.path: {tmp_path / 'adir'} is a directory:"
                             f" name the twin file in it (e.g. {tmp_path / 'adir' / 'twin.db'})\n"), result.stderr


def assert_refused_saying(args: tuple[str, ...], said: str) -> None:
    """`mapper *args` exits 1 and says `said`: as its last line, or, for install-service (which says
    all its errors in one run), as its first error."""
    result = mapper(*args)
    assert result.returncode == 1, result
    if args[0] == "install-service":  # the first of the install's errors, all said in one run
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")][0] == said, result.stderr
    else:
        assert result.stderr.endswith(said + "\n"), result.stderr


def test_a_password_file_that_is_not_utf8_is_an_error_naming_the_field(tmp_path):
    """A password file saved as UTF-16 (a Windows editor) or Latin-1: `mapper run` and
    `install-service` said `error: c.yaml: 'utf-8' codec can't decode byte 0xff ...`, naming neither
    the field nor the file. Now both name mqtt.password_file and the file."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    secret = tmp_path / "mapper.password"
    secret.write_bytes("s3cret\n".encode("utf-16"))
    secret.chmod(0o600)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                          extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {secret}\n")
    for args in (("run", "--config", str(config)), ("install-service", "--config", str(config), "--dry-run")):
        said = (f"error: {config}: mqtt.password_file: {secret} is not UTF-8 text (byte 0: invalid start byte); write"
                " the password as one line of UTF-8")
        assert_refused_saying(args, said)
    assert not (tmp_path / "twin.db").exists()  # nothing started


@pytest.mark.parametrize("content", ["", "\n", "  \t\n"])
def test_an_empty_password_file_is_a_config_error_naming_the_field_and_the_file(tmp_path, content):
    """An empty (or white-space only) password file was taken as the password "": `mapper run`
    started and the broker refused it at every reconnect ("Not authorized"), `mapper cloud-worker`
    likewise. Now `run`, `install-service` and `cloud-worker` refuse the config at once, naming
    mqtt.password_file and the file."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    secret = tmp_path / "mapper.password"
    secret.write_text(content)
    secret.chmod(0o600)
    block = f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {secret}\n"
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", extra=block)
    worker = tmp_path / "worker.yaml"
    worker.write_text(block)
    for source, args in ((config, ("run", "--config", str(config))),
                         (config, ("install-service", "--config", str(config), "--dry-run")),
                         (worker, ("cloud-worker", "--config", str(worker)))):
        said = (f"error: {source}: mqtt.password_file: {secret} is empty (or only white space): write the broker"
                " password of user 'mapper' in it, as one line")
        assert_refused_saying(args, said)
    assert not (tmp_path / "twin.db").exists()  # nothing started


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_password_variable_is_a_config_error_naming_the_field_and_the_variable(tmp_path, value):
    """mqtt.password_env naming a variable that is set but empty (a systemd `Environment=` line
    without its value) was taken as the password "": the broker refused it at every reconnect with
    nothing pointing at the variable. `run` and `cloud-worker` now refuse the config at once."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    block = "mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_env: MAPPER_TEST_EMPTY_PASSWORD\n"
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", extra=block)
    worker = tmp_path / "worker.yaml"
    worker.write_text(block)
    for source, args in ((config, ("run", "--config", str(config))), (worker, ("cloud-worker", "--config", str(worker)))):
        result = mapper(*args, env={"MAPPER_TEST_EMPTY_PASSWORD": value})
        assert result.returncode == 1, result
        assert result.stderr.endswith(f"error: {source}: mqtt.password_env: environment variable "
                                      "MAPPER_TEST_EMPTY_PASSWORD is empty (or only white space): set it to the broker "
                                      "password of user 'mapper'\n"), result.stderr
    assert not (tmp_path / "twin.db").exists()  # nothing started


def _client_certificate(tmp_path: Path, name: str, key_password: str | None = None) -> tuple[Path, Path]:
    """A self-signed client certificate and its key (encrypted with `key_password` if given)."""
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    secret = ["-passout", f"pass:{key_password}"] if key_password else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", *secret, "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


def test_unusable_tls_files_are_a_config_error_naming_the_field(tmp_path):
    """A client key whose password file holds the wrong password made `mapper run` start every
    device, then end with an ExceptionGroup traceback (ssl.SSLError: [SSL] PEM lib) when the event
    bus first connected; a missing key password file or CA file likewise. Now `run`,
    `install-service` and `cloud-worker` refuse the config at once, naming the field and the file,
    and nothing starts. An encrypted key without a password file is refused too (OpenSSL would
    otherwise prompt on the terminal)."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    cert, key = _client_certificate(tmp_path, "mapper", key_password="right one")
    other_cert, _ = _client_certificate(tmp_path, "other")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong\n")
    wrong.chmod(0o600)
    cases = {
        f"cert_file: {cert}, key_file: {key}, key_password_file: {wrong}":
            f"mqtt.tls: OpenSSL cannot load the client certificate {cert} (cert_file) with its key {key} "
            f"(key_file) and the password in {wrong} (key_password_file): check the password (the file's whole "
            "first line, spaces included), and that both are PEM files",
        f"cert_file: {cert}, key_file: {key}, key_password_file: {tmp_path / 'gone'}":
            f"mqtt.tls.key_password_file: cannot read {tmp_path / 'gone'}: No such file or directory",
        f"cert_file: {cert}, key_file: {key}":
            f"mqtt.tls.key_file: {key} is encrypted: put its password in a file readable only by the mapper and "
            "name it in mqtt.tls.key_password_file",
        f"cert_file: {other_cert}, key_file: {key}, key_password_file: {wrong}":
            f"mqtt.tls: OpenSSL cannot load the client certificate {other_cert} (cert_file)",
        f"ca_file: {tmp_path / 'no-ca.pem'}":
            f"mqtt.tls.ca_file: cannot read {tmp_path / 'no-ca.pem'}: No such file or directory",
        f"ca_file: {wrong}":
            f"mqtt.tls.ca_file: {wrong} holds no CA certificate OpenSSL can use (NO_CERTIFICATE_OR_CRL_FOUND): "
            "give the PEM file of the CA that signed the broker's certificate",
        "ciphers: NO-SUCH-CIPHER":
            "mqtt.tls.ciphers: OpenSSL can use none of 'NO-SUCH-CIPHER'",
    }
    # The right password saved with a Windows line ending is taken (read_text's universal newlines; a
    # guard: it would not be if the file were read as bytes).
    windows = tmp_path / "windows.password"
    windows.write_bytes(b"right one\r\n")
    windows.chmod(0o600)
    good = f"mqtt:\n  url: mqtts://127.0.0.1:1\n  tls: {{cert_file: {cert}, key_file: {key}, key_password_file: {windows}}}\n"
    assert load_config(write_config(tmp_path / "ok.yaml", devices, tmp_path / "ok.db", extra=good)).mqtt.read_tls()
    for tls, expected in cases.items():
        block = f"mqtt:\n  url: mqtts://127.0.0.1:1\n  tls: {{{tls}}}\n"
        config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", extra=block)
        worker = tmp_path / "worker.yaml"
        worker.write_text(block + "models: [sensor_faults]\n")
        for source, args in ((config, ("run", "--config", str(config))),
                             (config, ("install-service", "--config", str(config), "--dry-run")),
                             (worker, ("cloud-worker", "--config", str(worker)))):
            result = mapper(*args)
            assert result.returncode == 1, (tls, args, result)
            assert f"error: {source}: {expected}" in result.stderr, (tls, args, result.stderr)
            assert "Traceback" not in result.stderr
        assert not (tmp_path / "twin.db").exists()  # nothing started


def test_the_cloud_worker_warns_about_world_readable_secrets_as_the_mapper_does(tmp_path):
    """`mapper cloud-worker` read a password file and a TLS key every local user can read without a
    word, while `mapper run` warns about both. It now prints the same warnings (with the chmod that
    closes each) and still runs; 0600 files draw none."""
    secret = tmp_path / "worker.password"
    secret.write_text("s3cret\n")
    key, cert = tmp_path / "worker.key", tmp_path / "worker.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=worker"], check=True, capture_output=True)
    config = tmp_path / "worker.yaml"
    # Port 1: nothing listens, the worker retries (and runs) until stopped.
    config.write_text(f"mqtt:\n  url: mqtts://127.0.0.1:1\n  username: worker\n  password_file: {secret}\n"
                      f"  reconnect_min_s: 0.2\n  reconnect_max_s: 0.5\n"
                      f"  tls: {{cert_file: {cert}, key_file: {key}}}\nmodels: [sensor_faults]\n")
    warnings = [f"warning: {config}: {field}: {path} is readable by every user of this machine (mode 0644): "
                f"sudo chmod o-r {path}" for field, path in (("mqtt.password_file", secret), ("mqtt.tls.key_file", key))]
    for mode in (0o644, 0o600):
        secret.chmod(mode)
        key.chmod(mode)
        log = tmp_path / f"worker-{mode:o}.log"
        with log.open("w") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "mapper", "cloud-worker", "--config", str(config)],
                                    stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            # The connection's first failure: the worker is running, past its start-up checks.
            wait_for(lambda: "worker: connection to mqtts://127.0.0.1:1 lost or refused" in log.read_text(),
                     timeout=30, what="the worker's first connection attempt")
        finally:
            assert stop_mapper(proc) == 0, log.read_text()
        lines = log.read_text().splitlines()
        if mode == 0o644:
            assert all(w in lines for w in warnings), lines
        else:
            assert "readable by every user" not in log.read_text(), lines


def test_a_second_mapper_on_the_same_twin_is_refused_and_the_first_runs_on(tmp_path):
    """`mapper run --config examples/demo.yaml` next to the running demo (the README lists both)
    started a second mapper on the demo's twin: two processes interleaved their readings in one
    history, and the twin's reported values and history ended at the second's stop. The second
    is now refused at once, naming the first, which runs on; once the first stops, the twin is free."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    first = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: "running: 1 device(s)" in (tmp_path / "log").read_text(), what="the first mapper running")
        second = mapper("run", "--config", str(config), timeout=20)
        assert second.returncode == 1, second.stderr
        assert f"another mapper (pid {first.pid}) is running on the twin {tmp_path / 'twin.db'}" in second.stderr
        assert first.poll() is None
    finally:
        assert stop_mapper(first) == 0
    again = start_mapper(config, tmp_path / "log2")
    try:
        wait_for(lambda: "running: 1 device(s)" in (tmp_path / "log2").read_text(), what="a mapper started after it")
    finally:
        assert stop_mapper(again) == 0


def test_a_second_mapper_on_the_same_twin_through_a_symlink_is_refused(tmp_path):
    """The lock was `<twin.path>.lock` on the path as written: a second mapper configured with a
    symlink to the first one's twin locked `<link>.lock` and ran, and SQLite followed the link to the
    same file (a field test: 280 (property, seq) pairs held two different values). The lock is now
    beside the real file, whichever path names it, and so is the MQTT client id's file."""
    from eventbus.extension import mqtt_client_id
    from eventbus.settings import MqttSettings

    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    (tmp_path / "state").mkdir()
    real = tmp_path / "state" / "twin.db"
    link = tmp_path / "link.db"
    link.symlink_to(real)
    first = start_mapper(write_config(tmp_path / "real.yaml", devices, real), tmp_path / "log")
    try:
        wait_for(lambda: "running: 1 device(s)" in (tmp_path / "log").read_text(), what="the first mapper running")
        second = mapper("run", "--config", str(write_config(tmp_path / "link.yaml", devices, link)), timeout=20)
        assert second.returncode == 1, second.stderr
        assert f"another mapper (pid {first.pid}) is running on the twin {link}" in second.stderr
        assert first.poll() is None
    finally:
        assert stop_mapper(first) == 0
    assert not (tmp_path / "link.db.lock").exists()
    settings = MqttSettings()
    assert mqtt_client_id(settings, "n", link)[0] == mqtt_client_id(settings, "n", real)[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("link.db")) == ["link.db"]


def test_twin_get_says_a_reported_value_is_the_last_known_one_when_its_device_or_mapper_is_not_running(tmp_path):
    """After a restart that left a relay offline (its output switched off at the stop), `twin get`
    showed `power  true ... good`, as if it were the relay's state now; so too with no mapper running.
    The twin keeps the value (the last known one); each value's row says why it is not live."""
    from mapper.cli import _lock_twin, _write_lock_owner
    from twin.records import Reading
    from twin.store import TwinStore

    with lamp_synced_into_a_new_twin(tmp_path) as (_, config, twin, lamp, store):
        store.record([Reading(lamp, "power", True, 1_000)])
        store.set_state(lamp, "offline", "cannot open: the bus is gone")

    def rows() -> dict[str, str]:
        shown = mapper("twin", "get", "lamp", "--config", str(config))
        assert shown.returncode == 0, shown
        return {line.split()[0]: line for line in shown.stdout.splitlines()[2:]}

    def live() -> tuple[bool, str | None]:  # --json says it too (it said nothing of it)
        as_json = json.loads(mapper("twin", "get", "lamp", "--config", str(config), "--json").stdout)
        listed = json.loads(mapper("devices", "--config", str(config), "--json").stdout)["devices"][0]
        assert (listed["live"], listed["notLive"]) == (as_json["live"], as_json["notLive"]), (listed, as_json)
        return as_json["live"], as_json["notLive"]

    assert rows()["power"].endswith(" good; last known: mapper not running"), rows()
    assert live() == (False, "mapper not running")
    held = _lock_twin(twin)
    try:
        _write_lock_owner(held, starting=True)
        assert rows()["power"].endswith(" good; last known: mapper starting"), rows()
        assert live() == (False, "mapper starting")
        _write_lock_owner(held, starting=False)  # a mapper runs (this process), the device is offline
        shown = rows()
        assert re.fullmatch(r"power +true +- +1970-01-01 00:00:01\.000Z +good; last known: device offline",
                            shown["power"]), shown
        assert shown["count"].split()[1:3] == ["-", "-"] and "last known" not in shown["count"], shown  # (no value)
        assert live() == (False, "device offline")
        with TwinStore.open(twin) as store:
            store.set_state(lamp, "ok")
        assert rows()["power"].endswith(" good"), rows()  # live: as before
        assert live() == (True, None)
    finally:
        held.close()
    as_json = json.loads(mapper("twin", "get", "lamp", "--config", str(config), "--json").stdout)
    assert as_json["properties"]["power"]["reported"] is True and as_json["properties"]["power"]["quality"] == "good"


def test_a_command_asking_whether_a_mapper_runs_does_not_refuse_one_starting(tmp_path):
    """`mapper devices` and `twin set` hold `<twin>.lock` for an instant to learn whether a mapper runs
    (and that a command probing in a loop does not keep a mapper from starting): a `mapper run` that
    finds the lock taken tries again for half a second before it refuses."""
    import fcntl
    import threading

    from mapper.cli import _lock_twin, _running_mapper

    twin = tmp_path / "twin.db"
    assert _running_mapper(twin) == (False, None)  # no lock file: no mapper ever ran here
    probe = (tmp_path / "twin.db.lock").open("a+")
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.1, probe.close).start()  # the probe lets go while _lock_twin tries
    held = _lock_twin(twin)
    try:
        assert held is not None and _running_mapper(twin) == (True, os.getpid())
    finally:
        held.close()
    assert _running_mapper(twin) == (False, None)


def test_the_cloud_worker_without_the_ml_extra_says_what_to_install(tmp_path):
    """A core-only install (`pip install .`) and `mapper cloud-worker`: it died with a
    ModuleNotFoundError traceback (No module named 'numpy'); it now names the `ml` extra, as
    `mapper run` does for a pipeline."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\nsys.modules['onnxruntime'] = None\n")
    config = tmp_path / "worker.yaml"
    config.write_text("mqtt: {url: 'mqtt://127.0.0.1:1'}\n")
    done = mapper("cloud-worker", "--config", str(config), env={"PYTHONPATH": str(site)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "needs numpy and onnxruntime" in done.stderr and "`ml` extra" in done.stderr, done.stderr


def test_validate_config_warns_of_a_device_whose_drivers_library_is_not_installed(tmp_path):
    """A config whose GPIO relay (pins: rpi-gpio) and DHT sensor need the `pi` extra passed
    `mapper validate --config` with a bare ok on a node without it; `mapper run` then starts them and
    they stay offline (cannot open: RPi.GPIO / adafruit_dht is not importable). Each is a warning now,
    naming the library and the command that installs the extra; a relay over `pins: fake` needs none."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor name in ('RPi', 'RPi.GPIO', 'adafruit_dht', 'board'):\n    sys.modules[name] = None\n")
    devices = tmp_path / "dev"
    devices.mkdir()
    relay = (REPO / "devices/examples/pi/relay-gpio.yaml").read_text()
    (devices / "relay.yaml").write_text(relay)
    (devices / "room.yaml").write_text((REPO / "devices/examples/pi/room-sensor-dht.yaml").read_text())
    (devices / "fake.yaml").write_text(
        relay.split("---\n")[1].replace("name: fan-relay-pi", "name: fake-relay").replace("pins: rpi-gpio", "pins: fake")
        .replace("pin: 17 ", "pin: 27 "))
    config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "state" / "twin.db")

    checked = mapper("validate", "--config", str(config), env={"PYTHONPATH": str(site)})
    assert checked.returncode == 0, checked.stderr  # (run starts: a warning, as for a device not run here)
    warned = [line for line in checked.stderr.splitlines() if "would stay offline" in line]
    assert len(warned) == 2, checked.stderr
    relay_line, room_line = sorted(warned)
    assert relay_line.startswith(f"warning: {devices / 'relay.yaml'}:"), relay_line
    assert ("device default/fan-relay-pi would stay offline under `mapper run` (it cannot open): pins: rpi-gpio needs"
            " RPi.GPIO, not installed here: install the `pi` extra (") in relay_line, relay_line
    assert ("device default/room-sensor-pi would stay offline under `mapper run` (it cannot open): needs adafruit_dht"
            " and board (adafruit-circuitpython-dht, Blinka), not installed here: install the `pi` extra (") in room_line
    assert "[pi]'" in relay_line and "[pi]'" in room_line, warned  # (the command: extras.install_extra)
    assert checked.stdout.startswith(f"ok: {config}: 3 device(s), 2 model(s), "), checked.stdout


def test_the_advice_to_install_an_extra_names_this_installation_not_pypi(tmp_path):
    """Errors that need an extra said `pip install 'mapper[ml]'`: PyPI's `mapper`, another project,
    into whichever environment that `pip` is. This one is installed from its source tree (a checkout,
    /opt/mapper/src on a Pi): the advice now gives this interpreter's pip and the tree pip recorded."""
    site = tmp_path / "site"
    dist_info(site, "mapper", "0.1.0", direct_url_json='{"url": "file:///opt/mapper/src", "dir_info": {}}')
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\nsys.modules['onnxruntime'] = None\n")
    config = tmp_path / "worker.yaml"
    config.write_text("mqtt: {url: 'mqtt://127.0.0.1:1'}\n")
    done = mapper("cloud-worker", "--config", str(config), env={"PYTHONPATH": str(site)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{sys.executable} -m pip install '/opt/mapper/src[ml]')" in done.stderr, done.stderr
    assert "'mapper[ml]'" not in done.stderr, done.stderr


def test_validate_given_the_config_file_says_it_is_a_config(tmp_path):
    """`mapper validate examples/demo.yaml` (the config, where a new user looks for a check) said
    `kind: None is not supported: use Device or DeviceModel`. It now says the file looks like a
    mapper config and which command reads one."""
    result = mapper("validate", "examples/demo.yaml")
    assert result.returncode == 1
    assert "examples/demo.yaml:2: kind: required field is missing: this looks like a mapper config file" in result.stderr
    assert "None" not in result.stderr and "mapper run --config" in result.stderr, result.stderr
    # (`mapper validate --config`, which checks a config, came later: the hint named only `run`)
    assert "check it with `mapper validate --config examples/demo.yaml`" in result.stderr, result.stderr


def test_validate_prints_the_warnings_too_when_there_are_errors(tmp_path):
    """A device whose protocol has no driver (a warning) next to one with `collectCycle: -1` (an
    error): only the error was printed, though every problem is to be listed. Both are now."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "bacnet.yaml").write_text(MODEL.format(model="bacnet-model").replace("protocol: simulated",
                                                                                     "protocol: bacnet"))
    (tmp_path / "a.yaml").write_text(device_yaml("a", model="bacnet-model").replace("protocolName: simulated",
                                                                                    "protocolName: bacnet"))
    (tmp_path / "b.yaml").write_text(device_yaml("b", cycle=-1))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"{tmp_path}/b.yaml:17: spec.properties[0].collectCycle: must be >= 0" in lines, lines
    assert any(l.startswith(f"warning: {tmp_path}/a.yaml:10: spec.protocol.protocolName: device default/a: "
                            "no driver installed for protocol 'bacnet'") for l in lines), lines
    assert lines[-1] == "5 error(s), 1 warning(s)", lines


def test_a_missing_devices_entry_is_reported_at_its_config_line_also_run_from_root(tmp_path):
    """`devices: [devices, nosuchdir]` printed just `nosuchdir: file not found` (no config file, line
    or field; run from `/`, the path lost its leading slash). It is a problem of the config now."""
    write_devices(tmp_path / "devices", ["d"])
    config = tmp_path / "c.yaml"
    config.write_text(f"node: n1\ndevices: [devices, nosuchdir]\ntwin: {{path: {tmp_path / 'twin.db'}}}\n")
    result = subprocess.run([sys.executable, "-m", "mapper", "run", "--config", str(config)], capture_output=True,
                            text=True, timeout=30, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert f"{config}:2: devices[1]: {tmp_path}/nosuchdir: no such file or directory" in result.stderr.splitlines(), \
        result.stderr


def test_validate_run_from_root_keeps_the_leading_slash(tmp_path):
    """Run from `/`, a file's label is no longer its path relative to `/` (`tmp/x.yaml`)."""
    result = subprocess.run([sys.executable, "-m", "mapper", "validate", str(tmp_path / "nosuch.yaml")],
                            capture_output=True, text=True, timeout=30, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and f"{tmp_path}/nosuch.yaml: file not found" in result.stderr.splitlines(), \
        result.stderr


def test_a_device_file_given_as_the_config_says_so(tmp_path):
    """`mapper run --config switch.yaml` said `the config file must hold one YAML mapping`, without
    the hint `mapper validate` gives for the reverse mistake."""
    result = mapper("run", "--config", "devices/examples/switch.yaml")
    assert result.returncode == 1
    assert ("devices/examples/switch.yaml:3: kind: this looks like a device YAML file (kind: DeviceModel), not a mapper"
            " config: name it under `devices:` in the config, or check it alone with `mapper validate "
            "devices/examples/switch.yaml`") in result.stderr.splitlines(), result.stderr


def test_twin_set_refuses_a_config_naming_a_missing_devices_entry_even_with_another_file_broken(tmp_path):
    """`devices: [dev, nosuch.yaml]` with a broken file in dev/: the missing entry is the config's own
    problem and `mapper run` refuses the config, so `twin set` does too (it left the missing file out
    like a broken device file, set the value and promised that the next `mapper run` applies it)."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp", "other"])
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    (devices / "other.yaml").write_text(device_yaml("other", cycle=-1))
    config = tmp_path / "c.yaml"
    config.write_text(f"node: n1\ndevices: [{devices}, nosuch.yaml]\ntwin: {{path: {tmp_path / 'twin.db'}}}\n")
    result = mapper("twin", "set", "lamp", "power", "true", "--config", str(config))
    assert result.returncode == 1, result
    assert f"{config}:2: devices[1]: {tmp_path}/nosuch.yaml: no such file or directory" in result.stderr, result.stderr
    assert result.stdout == ""


def test_twin_set_needs_only_the_named_devices_definition(tmp_path):
    """A problem in another device's file refused `mapper twin set` for a valid device (exit 1,
    printing the other file's errors). Now it sets the value with a one-line warning naming the
    files with problems, and refuses only a device whose own definition is invalid (its file's
    problems printed), or one its model's broken file leaves undefined."""
    from devices.loader import load
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["lamp", "other"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
    (devices / "other.yaml").write_text(device_yaml("other", cycle=-1))
    result = mapper("twin", "set", "lamp", "power", "true", "--config", str(config))
    assert result.returncode == 0, result
    assert result.stdout == ("default/lamp/power: desired = true (version 1); no mapper is running on this twin:"
                             " the next `mapper run` applies it\n")
    assert result.stderr == (f"warning: default/lamp is valid; other device files have problems and were left out of"
                             f" this check: {devices / 'other.yaml'} (`mapper validate` lists them; `mapper run` and a"
                             " reload refuse the files until they are fixed)\n")
    # Still checked against its own definition.
    result = mapper("twin", "set", "lamp", "count", "-5", "--config", str(config))
    assert result.returncode == 1 and "below the minimum" in result.stderr, result
    # The named device's own file is broken: refused, with that file's problems.
    result = mapper("twin", "set", "other", "power", "true", "--config", str(config))
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{devices / 'other.yaml'}:") and "collectCycle: must be >= 0" in lines[0], lines
    assert lines[-1] == ("error: device default/other is not defined in the device files without problems; the files"
                         " above have problems (`mapper validate` lists them): fix them first"), lines
    # The model's file is broken: no device is defined, none is set.
    (devices / "other.yaml").write_text(device_yaml("other"))
    (devices / "model.yaml").write_text("kind: [\n")
    result = mapper("twin", "set", "lamp", "power", "false", "--config", str(config))
    assert result.returncode == 1 and "not defined in the device files without problems" in result.stderr, result
    assert f"{devices / 'model.yaml'}:" in result.stderr, result


def test_twin_get_reads_the_twin_and_the_history_in_one_snapshot(tmp_path, monkeypatch, capsys):
    """`twin get` and `devices` read the twin, then the newest reading of each property whose
    quality is not good, for qualityTs. They were two read transactions: a reading the running
    mapper committed in between was not the reading the twin's quality describes, and qualityTs was
    that later reading's time (another error) or null (a good one). The hook commits such a reading
    through a second connection to the same SQLite file right after the twin is read; both reads
    must see the twin as it was before it."""
    from devices.ids import DeviceId
    from devices.loader import load
    from mapper.cli import main
    from twin.records import Reading
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["room"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    room = DeviceId.parse("room")
    good_ms, failed_ms = 1_795_338_800_717, 1_795_338_803_250
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(room, "temperature", 23.2, good_ms)])
        store.record([Reading(room, "temperature", None, failed_ms, "error", "Checksum did not validate")])
    mapper_store = TwinStore.open(tmp_path / "twin.db")  # the running mapper's connection
    read_device = TwinStore.device
    timeout_ms, good_again_ms = failed_ms + 1000, failed_ms + 2000
    readings = iter([Reading(room, "temperature", None, timeout_ms, "error", "timed out"),  # during `twin get`
                     Reading(room, "temperature", 24.0, good_again_ms)])  # during `devices`
    recorded: list[int] = []

    def device_then_a_reading_commits(self, device_id):  # noqa: ANN001, ANN202
        twin = read_device(self, device_id)
        if self is not mapper_store:
            reading = next(readings)
            mapper_store.record([reading])
            recorded.append(reading.taken_at_ms)
        return twin

    monkeypatch.setattr(TwinStore, "device", device_then_a_reading_commits)
    try:
        assert main(["twin", "get", "room", "--config", str(config), "--json"]) == 0
        temperature = json.loads(capsys.readouterr().out)["properties"]["temperature"]
        shown = ("reported", "reportedTs", "quality", "qualityDetail", "qualityTs")
        assert {k: temperature[k] for k in shown} == {"reported": 23.2, "reportedTs": good_ms, "quality": "error",
                                                      "qualityDetail": "Checksum did not validate",
                                                      "qualityTs": failed_ms}
        assert main(["devices", "--config", str(config), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)["devices"][0]["properties"]["temperature"]
        assert {k: listed[k] for k in shown} == {"reported": 23.2, "reportedTs": good_ms, "quality": "error",
                                                 "qualityDetail": "timed out", "qualityTs": timeout_ms}
        # The hook ran in both, and its readings were committed: a later read sees them.
        assert recorded == [timeout_ms, good_again_ms]
        assert mapper_store.history(room, "temperature", limit=1)[0][0] == good_again_ms
    finally:
        mapper_store.close()


def test_twin_get_shows_a_failed_read_apart_from_the_last_good_value(tmp_path):
    """A DHT read fails after a good one: the twin keeps the good value (reported, reportedTs) and
    the failure's quality and detail. `twin get` printed them on one line,
    `temperature 23.2 Celsius  error  08:13:20.717Z  [Checksum did not validate]`, the time being the
    good read's: as if the 23.2 reading had failed. Now the value goes with "last good read" and its
    time, the failure with its own time; --json has the failure's time as qualityTs."""
    from devices.ids import DeviceId
    from devices.loader import load
    from twin.records import Reading
    from twin.store import TwinStore

    devices = write_devices(tmp_path / "dev", ["room"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    room = DeviceId.parse("room")
    good_ms, failed_ms = 1_795_338_800_717, 1_795_338_803_250  # 2026-11-22 09:13:20.717Z, :23.250Z
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(room, "temperature", 23.2, good_ms), Reading(room, "count", 7, good_ms)])
        store.record([Reading(room, "temperature", None, failed_ms, "error", "Checksum did not validate"),
                      Reading(room, "count", 8, failed_ms)])
    shown = mapper("twin", "get", "room", "--config", str(config))
    assert shown.returncode == 0, shown
    lines = shown.stdout.splitlines()
    assert re.match(r"^property +reported +desired +delta  last good read +latest read$", lines[1]), lines
    temperature = next(line for line in lines if line.startswith("temperature "))
    # (no mapper runs on this twin: each value is its last known one, and says so)
    assert re.match(r"^temperature +23\.2 Celsius +- +2026-11-22 09:13:20\.717Z  error at 2026-11-22"
                    r" 09:13:23\.250Z \[Checksum did not validate\]; last known: mapper not running$", temperature), temperature
    count = next(line for line in lines if line.startswith("count "))
    assert re.match(r"^count +8 +- +2026-11-22 09:13:23\.250Z  good; last known: mapper not running$", count), count
    twin = json.loads(mapper("twin", "get", "room", "--config", str(config), "--json").stdout)
    assert {k: twin["properties"]["temperature"][k] for k in ("reported", "reportedTs", "quality", "qualityTs")} == {
        "reported": 23.2, "reportedTs": good_ms, "quality": "error", "qualityTs": failed_ms}
    assert twin["properties"]["count"]["qualityTs"] == failed_ms
    listed = json.loads(mapper("devices", "--config", str(config), "--json").stdout)["devices"][0]
    assert listed["properties"]["temperature"]["qualityTs"] == failed_ms


def test_validate_refuses_a_push_topic_of_another_node(tmp_path):
    """`mapper validate` names the file, line and field of a pushMethod.mqtt.topic in the mappers'
    topic tree: such a device would publish another node's retained state."""
    text = device_yaml("d").replace("reportToCloud: true", "reportToCloud: true\n      pushMethod:\n"
                                    "        mqtt: {topic: mapper/node-b/default/lamp/state, retained: true}", 1)
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 1, result.stdout
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "mapper/node-b" in l)
    assert f"d.yaml:{line}: spec.properties[0].pushMethod.mqtt.topic: topic 'mapper/node-b/default/lamp/state' " \
        "is inside the mapper's topic tree" in result.stderr, result.stderr


def test_a_config_without_node_takes_the_host_name(tmp_path, monkeypatch):
    """Every Pi of a fleet that left `node` out was `edge-node`: their topics (mapper/edge-node/...)
    mixed on the cloud broker through their bridges. The default is now the host's name, as edgecore
    names its node; a host name that is not a valid node name falls back to `edge-node`."""
    import socket

    config = tmp_path / "c.yaml"
    config.write_text("devices: []\n")
    monkeypatch.setattr(socket, "gethostname", lambda: "Pi-Greenhouse-3.local")
    assert load_config(config).node == "pi-greenhouse-3"
    monkeypatch.setattr(socket, "gethostname", lambda: "pi_under_score")
    assert load_config(config).node == "edge-node"
    config.write_text("node: chosen\n")
    assert load_config(config).node == "chosen"


def test_a_mapper_running_as_its_host_name_says_so(tmp_path):
    """A mapper whose config has no `node` runs as the host name, and its log says so at start, with
    where its topics are: a Pi upgraded from a version whose default was `edge-node` moves its topics
    (its bridge forwards mapper/edge-node/#), and nothing said it."""
    import socket

    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    config.write_text(config.read_text().replace("node: test-node\n", ""))
    node = load_config(config).node
    assert node == socket.gethostname().split(".")[0].lower() or node == "edge-node"
    proc = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: "running:" in (tmp_path / "log").read_text(), what="the mapper running")
    finally:
        assert stop_mapper(proc) == 0
    assert (f"WARNING mapper.service: no `node` in the config: running as node {node!r}, the host name (its topics"
            f" are under mapper/{node}/)") in (tmp_path / "log").read_text()


def test_a_twin_that_last_ran_as_another_node_says_the_topics_moved(tmp_path):
    """The node is in every topic and defaults to the host name: a Pi renamed (or a config edited)
    moved its topics away from its apps and its bridge, and the start said nothing. The twin keeps
    the node it last ran as; a start as another node warns, naming both and how to keep the old."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    for run, node in enumerate(("greenhouse-1", "greenhouse-1", "raspberrypi")):
        config.write_text(re.sub(r"(?m)^node: .*$", f"node: {node}", config.read_text()))
        log = tmp_path / f"log{run}"
        proc = start_mapper(config, log)
        try:
            wait_for(lambda log=log: "running:" in log.read_text(), what="the mapper running")
        finally:
            assert stop_mapper(proc) == 0
        moved = [line for line in log.read_text().splitlines() if "this twin last ran as node" in line]
        if run < 2:
            assert moved == [], moved
    assert len(moved) == 1, moved
    assert ("this twin last ran as node 'greenhouse-1', now as 'raspberrypi': the topics moved from "
            "mapper/greenhouse-1/ to mapper/raspberrypi/") in moved[0]
    assert "set `node: greenhouse-1` to keep them" in moved[0]


def test_output_cut_short_by_the_reader_is_not_an_error(tmp_path):
    """`mapper validate DIR | head -1`: the reader leaves, the next write fails with EPIPE, and the
    CLI printed `error: [Errno 32] Broken pipe` as if the command had failed. It now stops quietly
    with 141 (128 + SIGPIPE), as a shell reports any Unix tool in that case."""
    devices = write_devices(tmp_path / "dev", [f"lamp{i}" for i in range(3)])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE for certain
    try:
        result = subprocess.run([sys.executable, "-m", "mapper", "validate", str(devices)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=30, cwd=REPO)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, ""), result


def test_a_misspelt_config_field_is_named_with_the_field_meant(tmp_path):
    """`mqtt.usrname` in the config said only "unknown field", while a device file says which field
    was meant. The config now says it too, or lists the section's fields when nothing is close."""
    config = tmp_path / "c.yaml"
    config.write_text("node: n1\nmqtt:\n  url: mqtt://127.0.0.1:1\n  usrname: mapper\n"
                      "inference:\n  pipelines:\n    - {device: a, model: m, widnow: 16}\nbogus: 1\n")
    result = mapper("run", "--config", str(config))
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        f"{config}:4: mqtt.usrname: unknown field, did you mean username?",
        f"{config}:7: inference.pipelines[0].widnow: unknown field, did you mean window?",
        f"{config}:8: bogus: unknown field (known here: api, devices, homeassistant, inference, kubeedge, load_openssl,"
        " log_level, loop, metrics, mode, mqtt, node, systemd, twin)"], result.stderr


def _warnings(result: subprocess.CompletedProcess, directory: Path | None = None) -> list[str]:
    """The warnings `mapper validate` printed, with `directory/` cut from the file names."""
    cut = f"{directory}/" if directory else ""
    return [line.removeprefix("warning: ").removeprefix(cut) for line in result.stderr.splitlines()
            if line.startswith("warning: ")]


def test_validate_warns_about_the_push_methods_the_mapper_does_not_carry_out(tmp_path):
    """`pushMethod.mqtt.address`, `pushMethod.http`, `otel` and `dbMethod` passed `mapper validate`
    without a word, while the mapper publishes to its own broker and never POSTs, exports or writes
    a database: each is a warning at its line saying where the readings go instead."""
    text = device_yaml("d").replace("reportToCloud: true", """reportToCloud: true
      pushMethod:
        mqtt: {address: "tcp://cloud.example:1883", topic: t/count}
        http: {hostName: "http://127.0.0.1", port: 8080, requestPath: /x, timeout: 5}
        otel: {endpointURL: "http://127.0.0.1:4318/v1/metrics"}
        dbMethod:
          redis: {redisClientConfig: {addr: "127.0.0.1:6379"}}""", 1)
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    line = {key: next(i for i, l in enumerate(text.splitlines(), 1) if f"{key}:" in l)
            for key in ("mqtt", "http", "otel", "dbMethod")}
    where = "d.yaml:{}: spec.properties[0].pushMethod.{}: "
    expected = [
        where.format(line["mqtt"], "mqtt.address") + "the mapper publishes to its own broker (mqtt.url in its"
        " config), not to 'tcp://cloud.example:1883': the readings go to t/count there; to get them to"
        " tcp://cloud.example:1883, bridge that broker to it (mosquitto/bridge.conf)",
        where.format(line["http"], "http") + "not supported here: nothing is POSTed; readings go to the twin and"
        " MQTT only (subscribe to the property's topic instead)",
        where.format(line["otel"], "otel") + "not supported here: nothing is exported over OTLP; readings go to"
        " the twin and MQTT only (subscribe to the property's topic instead)",
        where.format(line["dbMethod"], "dbMethod") + "not supported here: nothing is written to redis; readings go"
        " to the twin (its history: `mapper twin history`) and MQTT only",
    ]
    assert _warnings(result, tmp_path) == expected, result.stderr
    # Without an address the mqtt push is what the mapper does: nothing is said.
    (tmp_path / "d.yaml").write_text(device_yaml("d").replace(
        "reportToCloud: true", "reportToCloud: true\n      pushMethod:\n        mqtt: {topic: t/count}", 1))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0 and not _warnings(result), result.stderr


def test_validate_warns_about_a_nested_config_data_value_edgecore_refuses(tmp_path):
    """edgecore's ConvertDevice turns each configData value into a protobuf Any and refuses a map
    or a list, so such a device never reaches the mapper under KubeEdge: a warning at the key."""
    model = MODEL.format(model="thing-model") + "---\n" + MODEL.format(model="list-model").replace(
        "  protocol: simulated\n", "  protocol: simulated\n  protocolConfigData: {faults_kinds: [spike, stuck]}\n", 1)
    text = device_yaml("d", config="{seed: 11, faults: {rate: 0.03, seed: 12}}")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(text)
    (tmp_path / "e.yaml").write_text(device_yaml("e", model="list-model", config="{seed: 11}"))
    result = mapper("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    device_line = next(i for i, l in enumerate(text.splitlines(), 1) if "faults:" in l)
    model_line = next(i for i, l in enumerate(model.splitlines(), 1) if "faults_kinds:" in l)
    assert _warnings(result, tmp_path) == [
        f"d.yaml:{device_line}: spec.protocol.configData.faults: a nested map: edgecore's ConvertDevice refuses"
        " a value that is not a string, number or boolean, so under KubeEdge this device never reaches the"
        " mapper; use flat keys, e.g. faults_rate",
        f"m.yaml:{model_line}: spec.protocolConfigData.faults_kinds: a list: edgecore merges it into the configData of"
        " each device of this model, and its ConvertDevice refuses a value that is not a string, number or"
        " boolean, so under KubeEdge those devices never reach the mapper; use a flat value (a comma-separated"
        " string, say)",
    ], result.stderr


def test_the_shipped_inference_example_travels_through_edgecore():
    """examples/inference/room-sensor-faulty.yaml had `faults: {rate, seed}`, which edgecore refuses:
    its flat keys validate without a warning and inject the same faults."""
    result = mapper("validate", "devices/examples/room-sensor.yaml", "examples/inference")
    assert result.returncode == 0 and not _warnings(result), result.stderr


def test_twin_set_takes_its_value_as_a_set_payload(tmp_path):
    """`mapper twin set` parses its value as the router parses a `.../set` payload (one function):
    `{"value":"x"}` on a STRING stored the literal JSON, where `/set` stores x; a malformed
    object or one without `value` was stored as text, where `/set` refuses it."""
    from devices.loader import load
    from helpers import one_property_device
    from twin.store import TwinStore

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "tag.yaml").write_text(one_property_device(
        "tag", "{name: label, type: STRING, accessMode: ReadWrite}", "{kind: constant, value: none}",
        settings="collectCycle: 100"))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices]).devices.values())

    def desired() -> object:
        got = mapper("twin", "get", "tag", "--config", str(config), "--json")
        return json.loads(got.stdout)["properties"]["label"]["desired"]

    for value, stored in (('{"value":"x"}', "x"), ('"ON"', "ON"), ("1.10", "1.10"), ('{"value": "{a}"}', "{a}"),
                          ("plain text", "plain text")):
        result = mapper("twin", "set", "tag", "label", value, "--config", str(config))
        assert result.returncode == 0, result
        assert desired() == stored, (value, desired())
    for value, reason in (('{"value":"x"', "malformed JSON: unexpected end of data"),
                          ('{"value": "ON",}', "malformed JSON: trailing comma is not allowed"),
                          ('{"a": 1}', 'the JSON object has no "value" key'),
                          ('{"value": [1]}', "the value must be a scalar")):
        result = mapper("twin", "set", "tag", "label", value, "--config", str(config))
        assert result.returncode == 1 and result.stderr.startswith(f"error: {reason}"), (value, result.stderr)
        assert desired() == "plain text"


def test_run_refuses_an_api_token_file_others_may_read_and_writes_beyond_loopback_without_one(tmp_path):
    """`mapper run` with api.token_file group-readable (the token opens every device to whoever
    reads it), or with `api.writes` on a host that is not loopback and no token_file (anyone on the
    LAN could set desired values): a config error naming the field, before anything starts."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    token = tmp_path / "api.token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o640)
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                          extra="api:\n  port: 0\n  token_file: api.token\n")
    result = mapper("run", "--config", str(config))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"error: {config}: api.token_file: {token} may be read or written by other users"
                                    " than its owner (mode 0640)"), result.stderr
    assert f"chmod 600 {token}" in result.stderr and "Traceback" not in result.stderr
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db",
                          extra="api:\n  port: 0\n  host: 0.0.0.0\n  writes: true\n")
    result = mapper("run", "--config", str(config))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"{config}:14: api.writes: writes through the REST API on host '0.0.0.0', which"
                                    " is not loopback, need api.token_file"), result.stderr
    assert not (tmp_path / "twin.db").exists()  # nothing started


def test_validate_config_checks_what_mapper_run_refuses_without_running(tmp_path: Path) -> None:
    """`mapper validate` read device files only: a fleet pushing a new mapper.yaml had no way to check it
    but `mapper run` (which, passing, starts a mapper) or a reload (refused only once pushed, and the next
    start refuses it). A pipeline naming a device the files lack passed `mapper validate DIR`. Now
    `mapper validate --config FILE` makes the checks `mapper run` makes before it starts (the config,
    its device files, its pipelines against them, the password file) and exits 1 on any, touching no twin."""
    devices = write_devices(tmp_path / "dev", ["a"])
    twin = tmp_path / "state" / "twin.db"
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-password\n")
    secret.chmod(0o600)
    mqtt = f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {secret}\n"
    config = write_config(tmp_path / "mapper.yaml", devices, twin,
                          extra=mqtt + "inference:\n  pipelines:\n    - device: nosuchdev\n      model: sensor_faults\n")
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "device: nosuchdev" in text)

    assert mapper("validate", str(devices)).returncode == 0  # the device files alone are fine
    checked = mapper("validate", "--config", str(config))
    assert checked.returncode == 1, checked
    assert (f"{config}:{line}: inference.pipelines[0].device: no device default/nosuchdev in the device files"
            in checked.stderr), checked.stderr
    assert "1 error(s)" in checked.stderr, checked.stderr

    secret.unlink()  # what the next start would refuse: a password file that is not there
    config.write_text(write_config(tmp_path / "mapper.yaml", devices, twin, extra=mqtt).read_text())
    missing = mapper("validate", "--config", str(config))
    assert missing.returncode == 1, missing
    assert f"{config}: mqtt.password_file" in missing.stderr and str(secret) in missing.stderr, missing.stderr

    secret.write_text("s3cret-password\n")
    secret.chmod(0o600)
    fine = write_config(tmp_path / "fine.yaml", write_devices(tmp_path / "dev2", ["a", "b"]), twin, extra=mqtt)
    ok = mapper("validate", "--config", str(fine))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: {fine}: 2 device(s), 1 model(s)", ok.stdout
    assert not twin.parent.exists(), "validate made the twin's directory"

    both = mapper("validate", str(devices), "--config", str(fine))
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr


# (twin.path, what `mapper validate --config` says, what `mapper run` says)
def _sticky_shared_directory(tmp_path: Path) -> tuple[Path, str, str]:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    said = f"refusing the twin {shared / 'twin.db'}: {shared} is {_owner_and_group(shared)} 1777: every user can"
    return shared / "twin.db", said, said


def _lock_file_a_link(tmp_path: Path) -> tuple[Path, str, str]:
    home = tmp_path / "state"
    home.mkdir(mode=0o700)
    (home / "twin.db.lock").symlink_to(tmp_path / "elsewhere")
    said = f"the twin's lock file {home / 'twin.db.lock'} is a symbolic link (to {tmp_path / 'elsewhere'})"
    return home / "twin.db", said, said


def _directory_it_cannot_make(tmp_path: Path) -> tuple[Path, str, str]:
    home = tmp_path / "state"
    home.mkdir(mode=0o700)
    if subprocess.run(["chattr", "+i", str(home)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")  # (the tests run as root, whom modes do not stop)
    return (home / "sub" / "twin.db", f"may not write (its mode, or an immutable flag: lsattr): `mapper run` cannot"
            f" make the twin's directory {home / 'sub'}", f"Operation not permitted: '{home / 'sub'}'")


def _owner_and_group(path: Path) -> str:
    import grp
    import pwd

    st = path.stat()
    return f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"


@pytest.mark.parametrize("place", [_sticky_shared_directory, _lock_file_a_link, _directory_it_cannot_make],
                         ids=["sticky-like-tmp", "lock-file-a-link", "directory-it-cannot-make"])
def test_validate_config_refuses_the_twin_places_mapper_run_refuses(tmp_path: Path, place) -> None:  # noqa: ANN001
    """`mapper validate --config` said ok for a config whose twin.path `mapper run` refuses: a twin in a
    directory every user can write (/tmp), beside a lock file that is a symbolic link, or in a directory
    that cannot be made. It now makes run's checks of the twin's place, by looking only (nothing made,
    nothing opened), so that its ok means run will not refuse the config; both name the same cause."""
    twin, said, run_said = place(tmp_path)
    config = write_config(tmp_path / "mapper.yaml", write_devices(tmp_path / "dev", ["a"]), twin)
    before = sorted(tmp_path.rglob("*"))
    try:
        checked = mapper("validate", "--config", str(config))
        assert sorted(tmp_path.rglob("*")) == before, "validate made something"
        run = mapper("run", "--config", str(config))
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "state")], capture_output=True)
    assert run.returncode == 1 and run_said in run.stderr, run.stderr
    assert checked.returncode == 1, checked
    assert f"{config}: twin.path: " in checked.stderr and said in checked.stderr, checked.stderr
    assert "1 error(s): `mapper run` refuses to start with" in checked.stderr, checked.stderr


def test_twin_set_refuses_a_device_whose_file_names_another_node(tmp_path):
    """`twin set` checks as the router does: a device whose file says `spec.nodeName: node-b` is not
    this node's (test-node), so no desired value is stored for it (it was, and applied once the file
    moved the device here). The twin knows the device from the mapper's last run."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    (devices / "other.yaml").write_text(device_yaml("other").replace("spec:\n", "spec:\n  nodeName: node-b\n", 1))
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    proc = start_mapper(config, tmp_path / "log")
    try:
        wait_for(lambda: mapper("twin", "get", "other", "--config", str(config)).returncode == 0,
                 what="the device in the twin")
    finally:
        assert stop_mapper(proc, signal.SIGTERM) == 0
    refused = mapper("twin", "set", "other", "power", "true", "--config", str(config))
    assert refused.returncode == 1, refused.stdout
    assert "nodeName is 'node-b', but this mapper is node 'test-node'" in refused.stderr, refused.stderr
    assert "no desired value is set for it here" in refused.stderr
    twin = json.loads(mapper("twin", "get", "other", "--config", str(config), "--json").stdout)
    assert twin["properties"]["power"]["desired"] is None
    assert mapper("twin", "set", "lamp", "power", "true", "--config", str(config)).returncode == 0


def test_a_yaml_slip_in_the_config_file_is_said_at_its_line_quoted_with_what_to_do(tmp_path: Path) -> None:
    """The config file is read as the device files are (devices.loader.read_documents): a mis-indented
    line is quoted with a caret and a plain hint, by `mapper validate --config` and `mapper run` alike,
    not YAML's `did not find expected key` alone."""
    devices = write_devices(tmp_path / "dev", ["lamp"])
    config = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    text = config.read_text()
    assert text.splitlines()[4] == "  batch_delay_ms: 5", text  # (helpers.write_config's line 5)
    config.write_text(text.replace("\n  batch_delay_ms: 5\n", "\n batch_delay_ms: 5\n"))
    expected = (f"{config}:5: invalid YAML: line 5 is indented 1 space; the lines before it are indented 0 (line 3)"
                " or 2 (line 4): indent it as the ones it belongs with (did not find expected key)\n"
                "  5 |  batch_delay_ms: 5\n"
                "    |  ^\n")
    for args in (("validate", "--config", str(config)), ("run", "--config", str(config))):
        result = mapper(*args)
        assert result.returncode == 1 and result.stderr == expected, (args, result.stderr)
    assert not (tmp_path / "twin.db").exists()


def test_validate_config_says_the_warnings_mapper_run_says_each_once(tmp_path: Path) -> None:
    """`mapper validate --config` printed the warnings of mqtt.exposed_secrets, which start with
    `warning: ` already, as `warning: warning: ...`, and none of the REST API's (api.exposure_warnings:
    every device readable by the LAN, which `mapper run` logs as the API starts)."""
    devices = write_devices(tmp_path / "dev", ["a"])
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-password\n")
    secret.chmod(0o644)  # readable by every user: warned, not refused
    extra = (f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: mapper\n  password_file: {secret}\n"
             "api:\n  host: 0.0.0.0\n  port: 0\n")
    config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "state" / "twin.db", extra=extra)

    checked = mapper("validate", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "warning: warning:" not in checked.stderr, checked.stderr
    lines = checked.stderr.splitlines()
    assert sum(f"{config}: mqtt.password_file: {secret} is readable by every user" in line for line in lines) == 1, lines
    assert any(line.startswith(f"warning: {config}: api.host: '0.0.0.0' is not loopback and api.token_file is not set")
               for line in lines), lines
    warned = sum(line.startswith("warning: ") for line in lines)  # and counts them in its closing line
    assert checked.stdout == f"ok: {config}: 1 device(s), 1 model(s), {warned} warning(s)\n", checked.stdout


def test_a_twin_of_a_newer_mapper_is_an_error_naming_it_not_a_traceback(tmp_path: Path) -> None:
    """A twin a newer mapper migrated (a rollback to the older mapper without the copy made before the
    upgrade) made `mapper run`, `mapper devices` and `mapper twin get` end in a RuntimeError's
    traceback, which named no file. Now it is an error naming the twin and what to do, and exit 1.
    `mapper twin history`, which reads the file with its own query, showed its readings: refused alike."""
    from devices.loader import load
    from twin.migrations import MIGRATIONS
    from twin.records import Reading
    from twin.store import TwinStore

    twin = tmp_path / "twin.db"
    devices = write_devices(tmp_path / "dev", ["a"])
    config = write_config(tmp_path / "c.yaml", devices, twin)
    with TwinStore.open(twin) as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([Reading(DeviceId("default", "a"), "count", 5, 1_000)])
    with contextlib.closing(sqlite3.connect(twin)) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    for args in (("devices",), ("twin", "get", "a"), ("twin", "history", "a", "count"),
                 ("twin", "history", "a", "count", "--json"), ("run",)):
        refused = mapper(*args, "--config", str(config))
        assert refused.returncode == 1, (args, refused)
        assert "Traceback" not in refused.stderr, (args, refused.stderr)
        assert (f"error: the twin {twin} is from a newer mapper (schema version {len(MIGRATIONS) + 1}; this"
                f" mapper's is {len(MIGRATIONS)})") in refused.stderr, (args, refused.stderr)


def test_devices_says_whether_the_mapper_is_connected_to_its_broker(tmp_path, broker_for):
    """`mapper devices` said whether a mapper runs, not whether it reaches its broker: only systemd's
    Status: line did. It now says connected or disconnected since when, to which broker (as the
    running mapper noted it in the twin); after a crash (SIGKILL while connected) the note stays, and
    is shown as what was last known then, not as the current state."""
    from mapper_proc import MapperProcess

    broker = broker_for("test-node")
    url = f"mqtt://{broker.host}:{broker.port}"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    run = MapperProcess(tmp_path, devices, broker)

    def broker_line() -> str:
        shown = mapper("devices", "--config", str(run.config)).stdout
        return next((line for line in shown.splitlines() if line.startswith("broker:")), "")

    with run:
        wait_for(lambda: broker_line().startswith(f"broker: connected to {url} since "), what="connected")
        noted = json.loads(mapper("devices", "--config", str(run.config), "--json").stdout)["broker"]
        assert noted["connected"] is True and noted["current"] is True and noted["url"] == url, noted
        assert "password" not in json.dumps(noted) and broker.users["mapper"] not in json.dumps(noted)
        broker.stop()
        line = wait_for(lambda: (line := broker_line()).startswith(f"broker: disconnected from {url} since ")
                        and line, what="disconnected")
        assert re.search(r" since [-0-9: .]+Z, latest reason: \S", line), line  # and why
        broker.start()
        wait_for(lambda: broker_line().startswith(f"broker: connected to {url} since "), what="connected again")
        run.kill()  # a crash: nobody notes the connection's end
        line = broker_line()
        assert not line.startswith("broker: connected"), line
        assert line.startswith("broker: last known ") and f"connected to {url} since " in line, line
        noted = json.loads(mapper("devices", "--config", str(run.config), "--json").stdout)["broker"]
        assert noted["connected"] is True and noted["current"] is False, noted


def test_devices_says_the_latest_reason_the_broker_is_not_reached(tmp_path, broker_for):
    """Disconnected, `mapper devices` said the error of the loss (the broker closing the connection) for as
    long as the outage lasted: the mapper noted the connection only when it was made or lost, not when
    the attempts after the loss failed for another reason (nothing listening, a login refused). The note
    now follows the latest reason: here the attempts' `Connection refused` once the broker is gone."""
    from mapper_proc import MapperProcess

    broker = broker_for("test-node")
    url = f"mqtt://{broker.host}:{broker.port}"
    run = MapperProcess(tmp_path, write_devices(tmp_path / "dev", ["lamp"], cycle=200), broker)

    def broker_line() -> str:
        shown = mapper("devices", "--config", str(run.config)).stdout
        return next((line for line in shown.splitlines() if line.startswith("broker:")), "")

    with run:
        wait_for(lambda: broker_line().startswith(f"broker: connected to {url} since "), what="connected")
        broker.stop()
        run.wait_log("Connection refused")  # an attempt after the loss, refused: nothing listens
        line = wait_for(lambda: (line := broker_line()).startswith(f"broker: disconnected from {url} since ")
                        and "Connection refused" in line and line, what="the attempts' reason")
        assert re.search(r" since [-0-9: .]+Z, latest reason: .*Connection refused", line), line
        noted = json.loads(mapper("devices", "--config", str(run.config), "--json").stdout)["broker"]
        assert "Connection refused" in noted["error"] and noted["current"] and noted["fresh"], noted


def test_devices_says_how_old_a_broker_note_the_running_mapper_has_not_renewed_is(tmp_path):
    """The running mapper notes its broker connection again every BROKER_NOTE_REFRESH_S; a note it has
    not renewed for longer (its twin refusing writes: a full disk) was shown as the current state,
    `broker: connected ...`, its time only in --json. It is now shown as last known, when, how long
    ago and why it may no longer be so. (The running mapper: this process, holding the twin's lock.)"""
    import fcntl
    import time

    from mapper.cli import _fmt_ts
    from twin.store import BROKER_META, TwinStore

    twin = tmp_path / "twin.db"
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), twin,
                          extra="mqtt:\n  url: mqtt://127.0.0.1:1883\n")
    noted = round((time.time() - 3600) * 1000)  # an hour ago: a mapper that runs notes it every minute
    url = "mqtt://127.0.0.1:1883"
    with TwinStore.open(twin) as store:
        store.swap_meta(BROKER_META, json.dumps({"url": url, "connected": True, "since": noted - 5000,
                                                 "error": None, "pid": os.getpid(), "noted": noted}))
    with open(f"{twin}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        running_since = noted / 1000 - 3600  # running for two hours: the note is this run's
        os.utime(lock.fileno(), (running_since, running_since))
        shown = mapper("devices", "--config", str(config))
        as_json = json.loads(mapper("devices", "--config", str(config), "--json").stdout)["broker"]
    assert shown.returncode == 0, shown.stderr
    assert f"mapper: running (pid {os.getpid()})" in shown.stdout, shown.stdout
    line = next(line for line in shown.stdout.splitlines() if line.startswith("broker:"))
    assert not line.startswith("broker: connected"), line
    assert line.startswith(f"broker: last known {_fmt_ts(noted)}, "), line
    assert re.search(r", \d+ (min|h) ago \(by this mapper, pid \d+, which notes it every 60 s but has not since: its twin"
                     r" may refuse writes", line), line
    assert line.endswith(f": connected to {url} since {_fmt_ts(noted - 5000)}"), line
    assert as_json["current"] is True and as_json["fresh"] is False, as_json


def test_devices_does_not_show_an_earlier_run_s_note_with_the_same_pid_as_this_run_s(tmp_path):
    """A container's mapper is pid 1 at every start: the previous run's last broker note has the new
    run's pid, and `mapper devices` showed it as this run's (current). A note older than
    BROKER_NOTE_STALE_S written before the lock says the mapper ran (its mtime) is an earlier run's, as
    `mapper health` counts it. (The running mapper: this process, holding the twin's lock, just begun.)"""
    import fcntl
    import time

    from mapper.cli import _fmt_ts
    from twin.store import BROKER_META, TwinStore

    twin = tmp_path / "twin.db"
    url = "mqtt://127.0.0.1:1883"
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), twin,
                          extra=f"mqtt:\n  url: {url}\n")
    noted = round((time.time() - 3600) * 1000)  # an hour ago, by an earlier run with this pid
    with TwinStore.open(twin) as store:
        store.swap_meta(BROKER_META, json.dumps({"url": url, "connected": True, "since": noted - 5000,
                                                 "error": None, "pid": os.getpid(), "noted": noted}))
    with open(f"{twin}.lock", "w") as lock:  # this run: running since now
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        shown = mapper("devices", "--config", str(config))
        as_json = json.loads(mapper("devices", "--config", str(config), "--json").stdout)["broker"]
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("broker:"))
    assert line.startswith(f"broker: last known {_fmt_ts(noted)}, "), line
    assert f"(by pid {os.getpid()}, an earlier run; this one (pid {os.getpid()}) has noted nothing yet)" in line, line
    assert as_json["current"] is False, as_json


def test_the_running_mapper_notes_its_broker_connection_again_while_nothing_changes(broker, tmp_path, monkeypatch):
    """The note `mapper devices` reads was written only at a change: an old note could not be told from
    one the mapper could no longer write. It is written again every REFRESH_NOTE_S (here 0.2 s), the same
    connection (`since`) with a new `noted`. (In process, for the short refresh; a real broker and twin.)"""
    import asyncio

    import eventbus.extension
    from eventbus.settings import MqttSettings
    from mapper.config import MapperConfig, TwinSettings
    from mapper.runtime import build_service
    from twin.store import BROKER_META

    monkeypatch.setattr(eventbus.extension, "REFRESH_NOTE_S", 0.2, raising=False)
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    secret.chmod(0o600)
    config = MapperConfig(node="test-node", devices=[write_devices(tmp_path / "dev", ["lamp"], cycle=200)],
                          twin=TwinSettings(path=tmp_path / "twin.db"),
                          mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper",
                                            password_file=secret))

    async def notes_while_connected() -> list[dict]:
        service = build_service(config)
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        notes: list[dict] = []
        try:
            async with asyncio.timeout(15):
                await service.ready.wait()
                while len({note["noted"] for note in notes}) < 3:
                    text = await service.twin(lambda s: s.meta(BROKER_META))
                    if text:
                        notes.append(json.loads(text))
                    await asyncio.sleep(0.05)  # (written by another task on its own clock: polled)
        finally:
            stop.set()
            await running
        return notes

    notes = asyncio.run(notes_while_connected())
    assert all(note["connected"] for note in notes), notes
    assert len({note["since"] for note in notes}) == 1, notes  # one connection, noted again and again


def test_a_sigterm_while_the_mapper_starts_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM's default action ended `mapper run` until its event loop listened for it (about a second
    of imports, checks and models): a `systemctl stop` or `restart` right after a start ended it by the
    signal (exit 143), not by the clean stop the unit relies on. It is noted from the start on: the
    mapper stops before opening anything, exit 0, saying so. The start is held here by its config file,
    a FIFO the test writes only after the SIGTERM (`mapper run` reads the config first thing)."""
    devices = write_devices(tmp_path / "dev", ["a"])
    twin = tmp_path / "state" / "twin.db"
    config = tmp_path / "mapper.yaml"
    os.mkfifo(config)
    log_path = tmp_path / "mapper.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGHUP) or proc.poll() is not None, interval=0.001,
                 what="mapper run's first line (early_signals.hold)")
        proc.send_signal(signal.SIGTERM)  # before it reads its config file: long before its event loop

        def reader_there() -> int | bool:
            """The FIFO opened for writing once the mapper opens it to read (ENXIO until then), or True
            when the mapper ended first."""
            with contextlib.suppress(OSError):
                return os.open(config, os.O_WRONLY | os.O_NONBLOCK)
            return proc.poll() is not None

        fifo = wait_for(reader_there, timeout=30, interval=0.005, what="mapper run reading its config file")
        assert proc.poll() is None, f"mapper run ended ({proc.returncode}) by the SIGTERM:\n{log_path.read_text()}"
        with os.fdopen(fifo, "w") as writer:
            writer.write(write_config(tmp_path / "real.yaml", devices, twin).read_text())
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGTERM while starting: stopped before opening the twin or any device" in log_path.read_text()
    assert not twin.exists(), "a twin was opened"


def test_a_sighup_does_not_end_the_cloud_worker(tmp_path):
    """SIGHUP's default action ended `mapper cloud-worker` silently, answers owed lost (an operator
    reloads the mapper that way). The worker now logs that it ignores it, runs on, and stops cleanly."""
    with socket.socket() as probe:  # a port nothing listens on: the worker keeps retrying, no broker needed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "worker.yaml"
    config.write_text(f"models: [sensor_faults]\nworker_id: w-hup\nmqtt:\n  url: mqtt://127.0.0.1:{port}\n")
    log = tmp_path / "log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mapper", "cloud-worker", "--config", str(config)],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: "lost or refused" in log.read_text(), what="the worker's first connection attempt")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP ignored" in log.read_text(), what="the SIGHUP noted")
        assert proc.poll() is None, log.read_text()
        assert "restart it to load changed ones" in log.read_text()
    finally:
        assert stop_mapper(proc) == 0, log.read_text()
    assert "worker w-hup stopped" in log.read_text()


def _first_lines(stderr: str) -> list[str]:
    """Each problem's own line, without the source lines a YAML syntax error quotes below it."""
    return [line for line in stderr.splitlines() if not line.startswith(" ")]


def test_mistakes_in_the_config_and_in_its_device_files_are_all_listed_in_one_run(tmp_path):
    """A config file with a bad value (or a bad MAPPER_... override, or a password file that is not
    there) made `mapper validate --config` and `mapper run` stop at it: the device files' mistakes
    showed only once it was fixed, one stage at a time. Now the config's and the device files'
    (each at its file, line and field) are listed in one run, and `run` still starts nothing. So is
    a misspelt key in a device's anomalyDetection map, which waited for every other file to be right."""
    devices = tmp_path / "dev"
    said = write_several_mistakes(devices, f"{devices}/", anomaly_map=True)
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin, extra="bogus: 1\n")
    config.write_text(config.read_text().replace("log_level: info", "log_level: loud"))
    text = config.read_text().splitlines()
    level, bogus = text.index("log_level: loud") + 1, text.index("bogus: 1") + 1
    own = ["environment variable MAPPER_LOOP__FAILURE_THRESHOLD: loop.failure_threshold: must be an integer, got 'many'",
           f"{config}:{level}: log_level: 'loud' is not allowed: must be 'debug', 'info', 'warning' or 'error'",
           f"{config}:{bogus}: bogus: unknown field (known here: api, devices, homeassistant, inference, kubeedge,"
           " load_openssl, log_level, loop, metrics, mode, mqtt, node, systemd, twin)"]
    for args in (("validate", "--config", str(config)), ("run", "--config", str(config))):
        result = mapper(*args, env={"MAPPER_LOOP__FAILURE_THRESHOLD": "many"})
        assert result.returncode == 1, result
        assert _first_lines(result.stderr) == own + said, result.stderr
    validated = mapper("validate", str(devices))
    assert validated.returncode == 1, validated
    assert _first_lines(validated.stderr) == [*said, f"{len(said)} error(s)"], validated.stderr

    missing = tmp_path / "mapper.password"
    write_config(config, devices, twin, extra=f"mqtt:\n  url: mqtt://127.0.0.1:1\n  username: m\n  password_file: {missing}\n")
    unread = f"{config}: mqtt.password_file: cannot read {missing}: No such file or directory"
    result = mapper("run", "--config", str(config))
    assert result.returncode == 1, result
    assert _first_lines(result.stderr) == [f"error: {unread} (the mapper reads it as the user it runs as)", *said]
    result = mapper("validate", "--config", str(config))
    assert result.returncode == 1, result
    assert _first_lines(result.stderr)[:-1] == [f"{unread} (the mapper reads it as the user it runs as)", *said]
    assert not twin.parent.exists()  # nothing started, nothing made


def test_a_refused_setting_leaves_the_rest_of_its_section_for_the_device_check(tmp_path):
    """The config's refused settings are taken at their defaults to check the device files; the key
    alone, not its whole section: a misspelt key in `inference:` left out its `from_devices: false`
    too, and a device's anomalyDetection map the mapper would not read was listed as a mistake. A
    refused `node` is not compared with a device's nodeName (it said the config had no `node`)."""
    devices = write_devices(tmp_path / "dev", ["lamp", "bad"], configs={})
    (devices / "bad.yaml").write_text(device_yaml("bad").replace("{kind: switch}", "{knd: switch}"))
    (devices / "lamp.yaml").write_text(
        device_yaml("lamp").replace("spec:\n", "spec:\n  nodeName: kitchen\n", 1)
        .replace("collectCycle: 50\n", "collectCycle: 50\n      pushMethod:\n        anomalyDetection:\n"
                 "          data: {meant: for another tool}\n", 1))
    twin = tmp_path / "state" / "twin.db"
    config = write_config(tmp_path / "c.yaml", devices, twin, extra="inference:\n  from_devices: false\n  modles: {}\n")
    config.write_text("node: Kitchen_1\n" + config.read_text().replace("node: test-node\n", ""))
    for args in (("validate", "--config", str(config)), ("run", "--config", str(config))):
        result = mapper(*args)
        assert result.returncode == 1, result
        assert "bad.yaml:" in result.stderr and "configData.knd: unknown field" in result.stderr, result.stderr
        assert "lamp.yaml" not in result.stderr, result.stderr
        assert "inference.modles: unknown field" in result.stderr and "'Kitchen_1'" in result.stderr, result.stderr
    assert not twin.parent.exists()
    config.write_text(config.read_text().replace("Kitchen_1", "kitchen").replace("  modles: {}\n", ""))
    fixed = mapper("validate", "--config", str(config))  # (what it is once the config is right)
    assert fixed.returncode == 1 and "lamp.yaml" not in fixed.stderr and "bad.yaml:" in fixed.stderr, fixed
