"""Device YAML: KubeEdge v1beta1 documents validated with FILE:LINE: FIELD: PROBLEM errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import load
from helpers import MODEL, device_yaml, dist_info, write_several_mistakes

REPO = Path(__file__).resolve().parents[1]


def problems_of(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    return [str(p) for p in info.value.problems]


def install_plugin(site: Path, monkeypatch: pytest.MonkeyPatch, protocol: str, module_text: str) -> None:
    """A driver distribution `<protocol>-driver` in `site` (a package plus a .dist-info with its
    `mapper.drivers` entry point, as pip leaves them), put on sys.path for the test."""
    import sys

    package = f"{protocol}_driver"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(module_text)
    dist_info(site, f"{protocol}-driver", "1.0",
              entry_points_txt=f"[mapper.drivers]\n{protocol} = {package}:{protocol.capitalize()}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, package, raising=False)


def test_examples_load():
    """The shipped simulated examples load: room sensor, switch and counter."""
    result = load([REPO / "devices/examples"])
    assert set(result.devices) == {DeviceId("default", "room-sensor"), DeviceId("default", "fan-relay"),
                                   DeviceId("default", "counter")}
    relay = result.devices[DeviceId("default", "fan-relay")]
    assert relay.prop("power").writable and relay.prop("power").desired is False
    sensor = result.devices[DeviceId("default", "room-sensor")]
    assert sensor.prop("temperature").collect_cycle_ms == 2000
    assert sensor.prop("temperature").maximum == 50.0


def test_negative_cycle_names_file_line_and_field(tmp_path):
    """A negative collectCycle is reported with its file, line and field path."""
    text = device_yaml("d1").replace("collectCycle: 50\n      reportCycle: 50\n      reportToCloud: true\n    - name: power",
                                     "collectCycle: -5\n      reportCycle: 50\n      reportToCloud: true\n    - name: power")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "collectCycle: -5" in l)
    assert problems == [f"d.yaml:{line}: spec.properties[0].collectCycle: must be >= 0"]


def test_every_problem_is_reported_at_once(tmp_path):
    """Errors in several files and documents all come back in one report."""
    bad_model = MODEL.format(model="thing-model").replace("type: INT", "type: INTEGER")
    bad_device = device_yaml("Bad Name")
    missing_model = device_yaml("d2", model="nope")
    problems = problems_of(tmp_path, {"a.yaml": bad_model, "b.yaml": bad_device, "c.yaml": missing_model})
    joined = "\n".join(problems)
    assert "a.yaml:19: spec.properties[2].type: unknown value 'INTEGER'" in joined
    assert "b.yaml:4: metadata.name: 'Bad Name' is not a Kubernetes name" in joined
    assert "c.yaml:8: spec.deviceModelRef.name: DeviceModel default/nope not found" in joined
    assert len(problems) == 3


@pytest.mark.parametrize(("change", "error"), [
    (("type: BOOLEAN", "type: BOOL"), "relay.yaml:16: spec.properties[1].type: unknown value 'BOOL': must be one of 'INT', 'FLOAT', 'DOUBLE',"
     " 'STRING', 'BOOLEAN', 'BYTES' or 'STREAM'; did you mean 'BOOLEAN'?"),
    (('minimum: "0"\n      maximum: "50"', 'minimum: "80"\n      maximum: "-40"'),
     "relay.yaml:9: spec.properties[0]: minimum 80 is greater than maximum -40"),
    (("apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel", "apiVersion: devices.kubeedge.io/v1\nkind: DeviceModel"),
     "relay.yaml:1: apiVersion: 'devices.kubeedge.io/v1' is not supported: use devices.kubeedge.io/v1beta1"),
])
def test_a_device_of_a_model_with_errors_says_so_not_that_it_is_missing(tmp_path, change, error):
    """A DeviceModel with any error (`type: BOOL`, minimum above maximum, a wrong apiVersion) made
    its devices report `DeviceModel default/relay-model not found (known: <the others>)`, with the
    model there in the same file: the operator went hunting for a typo in the name. The device's
    error now says the model has errors, and where; a model that is really missing is still "not found"."""
    model = MODEL.format(model="relay-model").replace(*change)
    problems = problems_of(tmp_path, {"relay.yaml": model + "---\n" + device_yaml("relay", model="relay-model"),
                                      "other.yaml": MODEL.format(model="dht22-model")})
    ref_line = len(model.splitlines()) + 1 + 8  # the device's deviceModelRef.name, after the `---`
    assert problems == [
        error,
        f"relay.yaml:{ref_line}: spec.deviceModelRef.name: DeviceModel default/relay-model (relay.yaml:4) has errors"
        " (above): its devices cannot start until it is fixed",
    ]


def test_a_device_of_a_missing_model_is_still_told_it_is_not_found(tmp_path):
    """The model with errors is named as such only for its own name (and namespace): a device of a
    model that no document defines is told it is not found, with the models that are known."""
    broken = MODEL.format(model="relay-model").replace("type: BOOLEAN", "type: BOOL")
    problems = problems_of(tmp_path, {"m.yaml": broken + "---\n" + MODEL.format(model="dht22-model"),
                                      "d.yaml": device_yaml("relay", model="relay-modle")})
    assert problems[-1] == ("d.yaml:8: spec.deviceModelRef.name: DeviceModel default/relay-modle not found"
                            " (known: default/dht22-model)")
    assert len(problems) == 2


@pytest.mark.parametrize("name", ["a+b", "a#b", "a/b", "a b", "UPPER", "-lead", ""])
def test_names_that_would_break_topics_are_rejected(tmp_path, name):
    """Device names become MQTT topic segments: +, #, / and spaces never pass."""
    text = device_yaml("placeholder").replace("name: placeholder", f"name: '{name}'")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert len(problems) == 1 and problems[0].startswith("d.yaml:4: metadata.name: ")


@pytest.mark.parametrize(("name", "fixed"), [("a..b", "a.b"), ("a.-b", "a.b"), ("a-.b", "a.b"), ("a-.-b.c", "a.b.c")])
def test_a_name_kubernetes_refuses_but_topics_take_is_a_warning_at_its_line(tmp_path, name, fixed):
    """Kubernetes names are RFC 1123 subdomains: each part between dots starts and ends with a
    letter or digit. `a..b`, `a.-b` and `a-.b` were taken silently; twins may already hold such a
    name, so it still loads, with a warning at its line (a Device's and a DeviceModel's)."""
    model_text = MODEL.format(model=name)
    text = device_yaml(name, model=name)
    (tmp_path / "m.yaml").write_text(model_text)
    (tmp_path / "d.yaml").write_text(text)
    result = load([tmp_path], base=tmp_path)
    assert DeviceId("default", name) in result.devices
    said = (f"metadata.name: {name!r}: each part between dots must start and end with a letter or digit for"
            " Kubernetes (an RFC 1123 subdomain): accepted here, but KubeEdge's API server (kubectl apply) refuses"
            " this {kind}; rename it, e.g. " + fixed)
    assert [str(w) for w in result.warnings if "RFC 1123" in str(w)] == [
        "d.yaml:4: " + said.format(kind="Device"), "m.yaml:4: " + said.format(kind="DeviceModel")]


def test_names_kubernetes_takes_get_no_name_warning(tmp_path):
    for name in ("a.b", "a-b.c-d", "a1.2b", "x"):
        (tmp_path / f"{name}.yaml").write_text(device_yaml(name))
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    assert not [w for w in load([tmp_path], base=tmp_path).warnings if "RFC 1123" in str(w)]


@pytest.mark.parametrize("prop", ["te+mp", "te#mp", "te/mp", "te mp", "state", "availability", "ts", "seq"])
def test_property_names_that_would_break_topics_are_rejected(tmp_path, prop):
    """Property names are topic segments too, and keys of the device's state view beside its
    own `ts`, `state` and `seq` (a property `ts` was overwritten there by the view's time)."""
    text = MODEL.format(model="thing-model").replace("name: temperature", f"name: '{prop}'")
    problems = problems_of(tmp_path, {"m.yaml": text})
    assert len(problems) == 1 and "m.yaml:9: spec.properties[0].name: " in problems[0]


def test_yaml_syntax_error_has_the_line(tmp_path):
    """A YAML syntax error names the line where the parser stopped."""
    problems = problems_of(tmp_path, {"broken.yaml": "apiVersion: x\nkind: [unclosed\nmetadata: {}\n"})
    assert len(problems) == 1
    assert problems[0].startswith("broken.yaml:3: invalid YAML")


@pytest.mark.parametrize(("slip", "edit", "expected"), [
    ("a key indented one space off", ("\n  protocol:\n", "\n   protocol:\n"),
     "d.yaml:9: invalid YAML: line 9 is indented 3 spaces; the lines before it are indented 2 (line 7) or 4 (line 8):"
     " indent it as the ones it belongs with (did not find expected key)\n"
     "  9 |    protocol:\n"
     "    |    ^"),
    ("a list item's key indented one space short", ("    - name: power\n      visitors:\n",
                                                    "    - name: power\n     visitors:\n"),
     "d.yaml:21: invalid YAML: line 21 is indented 5 spaces; line 20 has its '-' at 4 and its first key at 6:"
     " indent it 6 for a key of that item, or 4 for a new item (did not find expected '-' indicator)\n"
     "  21 |      visitors:\n"
     "     |      ^"),
    ("a key indented deeper than the key: value before it", ("\n  namespace: default\n", "\n   namespace: default\n"),
     "d.yaml:5: invalid YAML: line 5 is indented deeper than line 4 (3 spaces, not 2), so YAML reads it as the rest of"
     " line 4's value: indent it 2 spaces, as 'name' on line 4, if it is a key beside it (mapping values are not"
     " allowed in this context)\n"
     "  5 |    namespace: default\n"
     "    |    ^"),
    ("a key without its colon", ("\nspec:\n", "\nspec\n"),
     "d.yaml:6: invalid YAML: no ':' after 'spec' on line 6, so YAML reads it and the lines after it as one text:"
     " write 'spec:' (or quote a text that goes on over several lines) (could not find expected ':')\n"
     "  6 | spec\n"
     "    |     ^"),
    ("a tab", ("\n    protocolName: simulated\n", "\n\tprotocolName: simulated\n"),
     "d.yaml:10: invalid YAML: line 10 is indented with a tab: YAML indents with spaces only; replace the tab with"
     " spaces (found character that cannot start any token)\n"
     "  10 | \\tprotocolName: simulated\n"
     "     | ^"),
    ("an unclosed quote", ("  name: d\n", '  name: "d\n'),
     'd.yaml:4: invalid YAML: the " that opens this value is never closed (the file ends first): close it with "'
     " (found unexpected end of stream)\n"
     '  4 |   name: "d\n'
     "    |         ^"),
    ("an unclosed bracket", ("    configData: {}\n", "    configData: [a, b\n"),
     "d.yaml:12: invalid YAML: the [ opened on line 11 (column 17) is not closed before this: end it with ] (items"
     " inside are separated by commas) (did not find expected ',' or ']')\n"
     "  12 |   properties:\n"
     "     |             ^"),
    ("a bracket left open at the end of the file", ("{kind: counter}\n      collectCycle: 50\n      reportCycle: 50\n"
                                                    "      reportToCloud: true\n",
                                                    "{kind: counter}\n      collectCycle: 50\n      reportCycle: 50\n"
                                                    "      reportToCloud: true\n  methods: [\n"),
     "d.yaml:33: invalid YAML: the [ opened here is never closed (the file ends first): end it with ] (items inside"
     " are separated by commas) (did not find expected node content)\n"
     "  33 |   methods: [\n"
     "     |            ^"),
    ("an unclosed brace", ("noise: 0.1}", "noise: 0.1"),
     "d.yaml:17: invalid YAML: the { opened on line 16 (column 21) is not closed before this: end it with } (items"
     " inside are separated by commas) (did not find expected ',' or '}')\n"
     "  17 |       collectCycle: 50\n"
     "     |                   ^"),
])
def test_a_yaml_slip_is_said_at_its_line_quoted_with_what_to_do(tmp_path, slip, edit, expected):
    """YAML's own words (`d.yaml:9: invalid YAML: did not find expected key`) left the person to
    guess what was wrong with which line. Now the line is quoted with a caret under where the
    parser stopped, and the usual slips are said plainly, YAML's words in parentheses."""
    good = device_yaml("d")
    assert good.count(edit[0]) >= 1, f"helpers.DEVICE changed: {slip}"
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"),
                                      "d.yaml": good.replace(edit[0], edit[1], 1)})
    assert problems == [expected], problems[0]


def test_duplicate_device_names(tmp_path):
    """Two Devices with one namespace/name: the second is rejected and the first named."""
    problems = problems_of(tmp_path, {
        "m.yaml": MODEL.format(model="thing-model"), "a.yaml": device_yaml("same"), "b.yaml": device_yaml("same")})
    assert problems == ["b.yaml:4: metadata.name: duplicate Device default/same (first defined at a.yaml:4)"]


def test_duplicate_property_in_a_device(tmp_path):
    """A property listed twice in one device is rejected at the second entry."""
    text = device_yaml("d").replace("    - name: count", "    - name: power")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert any("spec.properties[2].name: duplicate property name 'power'" in p for p in problems)


def test_min_greater_than_max(tmp_path):
    """minimum > maximum is rejected at that property."""
    text = MODEL.format(model="thing-model").replace('minimum: "0"', 'minimum: "60"')
    problems = problems_of(tmp_path, {"m.yaml": text})
    assert problems == ["m.yaml:9: spec.properties[0]: minimum 60 is greater than maximum 50"]


def test_device_property_missing_from_model(tmp_path):
    """A device property its model does not declare is rejected."""
    text = device_yaml("d").replace("    - name: count", "    - name: pressure")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert any("spec.properties[2].name: property 'pressure' is not declared in DeviceModel default/thing-model" in p
               for p in problems)


def test_driver_config_is_validated_with_lines(tmp_path):
    """Driver configData is checked by the driver's own model, with FILE:LINE."""
    text = device_yaml("d", config="{failure_rate: 3}")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert problems == ["d.yaml:11: spec.protocol.configData.failure_rate: must be <= 1.0"]


def test_desired_value_of_wrong_type(tmp_path):
    """A desired value that does not fit the property type is rejected."""
    text = device_yaml("d").replace("    - name: count\n", "    - name: count\n      desired: {value: 'many'}\n")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert len(problems) == 1 and "spec.properties[2].desired.value: expected an integer, got 'many'" in problems[0]


def test_a_huge_wrong_value_is_named_not_copied_into_its_error(tmp_path):
    """A 100 kB text where a number is expected (a desired value over MQTT, a driver's reading):
    the error, which goes into a twin reply, a reading's quality detail and the log, quotes its
    first 80 characters and its length."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d"))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    with pytest.raises(ValueError) as refused:
        device.desired_value("count", "9" * 50 + "x" * 100_000)
    message = str(refused.value)
    assert message.endswith("... (100050 characters)") and len(message) < 200, message[:300]


def test_a_number_beyond_a_float_is_refused_as_a_desired_value(tmp_path):
    """An integer too large for a float (10**400, as YAML or Python's json read it) is a ValueError
    with a reason, like every other bad desired value; it was an OverflowError."""
    model = MODEL.format(model="thing-model").replace("type: INT", "type: DOUBLE")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device_yaml("d"))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    assert device.desired_value("count", 7) == 7.0
    with pytest.raises(ValueError, match=r"^property 'count': expected a finite number, "
                                         r"got an integer too large for a float$"):
        device.desired_value("count", 10**400)


def test_unknown_protocol_is_a_warning_not_an_error(tmp_path):
    """A protocol with no installed driver is valid YAML: a warning naming the protocol."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "n.yaml").write_text(MODEL.format(model="acme-model").replace("protocol: simulated",
                                                                              "protocol: acme-fieldbus"))
    (tmp_path / "d.yaml").write_text(device_yaml("fieldbus-thing", model="acme-model").replace(
        "protocolName: simulated", "protocolName: acme-fieldbus"))
    (tmp_path / "ok.yaml").write_text(device_yaml("fine"))
    result = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "fieldbus-thing") in result.unrunnable
    assert DeviceId("default", "fine") not in result.unrunnable
    (warning,) = result.warnings
    assert "d.yaml:10: spec.protocol.protocolName" in str(warning) and "'acme-fieldbus'" in str(warning)


def test_driver_registry_is_read_once_and_reread_for_a_new_protocol(tmp_path, monkeypatch):
    """Installed drivers are looked up once for many devices; one installed later is still found.

    The driver is a real distribution on sys.path (a .dist-info with an entry point), the
    way a third party would ship one.
    """
    import importlib.metadata

    from devices.drivers import base

    scans = []

    def counting(**kwargs):
        scans.append(kwargs)
        return importlib.metadata.entry_points(**kwargs)

    monkeypatch.setattr(base, "entry_points", counting)
    monkeypatch.setattr(base, "_registered", None)
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    for i in range(20):
        (tmp_path / f"d{i}.yaml").write_text(device_yaml(f"d{i}"))
    assert len(load([tmp_path], base=tmp_path).devices) == 20
    assert len(scans) == 1

    (tmp_path / "d0.yaml").write_text(device_yaml("d0").replace("protocolName: simulated", "protocolName: latecomer"))
    first = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "d0") in first.unrunnable

    plugin = tmp_path / "site"
    install_plugin(plugin, monkeypatch, "latecomer",
                   "from devices.drivers.simulated import SimulatedDriver\n\nclass Latecomer(SimulatedDriver):\n    pass\n")
    later = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "d0") not in later.unrunnable
    assert base.load_driver("latecomer").__name__ == "Latecomer"


def test_fields_we_do_not_use_are_kept(tmp_path):
    """pushMethod db methods, methods and stateReport are accepted and kept."""
    text = device_yaml("d").replace("      reportCycle: 50\n      reportToCloud: true\n    - name: power", """\
      reportCycle: 50
      reportToCloud: true
      pushMethod:
        mqtt: {address: tcp://127.0.0.1:1883, topic: t, qos: 1, retained: true}
        dbMethod:
          influxdb2:
            influxdb2ClientConfig: {url: http://127.0.0.1:8086, org: o, bucket: b}
            influxdb2DataConfig: {measurement: m, tag: {k: v}, fieldKey: f}
    - name: power""") + "  methods:\n    - {name: Reset, propertyNames: [count]}\n  stateReport: {reportToCloud: true, reportCycle: 0}\n  futureField: 1\n"
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    assert device.prop("temperature").push_mqtt.qos == 1
    assert device.device.spec.properties[0].push_method.db_method["influxdb2"]["influxdb2DataConfig"]["fieldKey"] == "f"
    assert device.device.spec.methods[0].property_names == ["count"]
    assert device.state_report_cycle_ms == 1000  # 0 means 1000 ms
    assert device.device.spec.model_extra == {"futureField": 1}


def test_zero_cycle_means_one_second(tmp_path):
    """KubeEdge's rule: a cycle of 0 means 1000 ms."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d", cycle=0))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    assert device.prop("temperature").collect_cycle_ms == 1000


def test_a_cycle_over_a_day_is_a_warning_at_its_line(tmp_path):
    """A cycle written in nanoseconds (10000000000 for 10 s, as older KubeEdge examples do) runs
    here as 115 days: it loads as written, with a warning at each such line saying what was
    probably meant. A day exactly is no warning; stateReport.reportCycle is checked too."""
    text = device_yaml("slow", cycle=86_400_000).replace(
        "collectCycle: 86400000\n      reportCycle: 86400000\n",
        "collectCycle: 10000000000\n      reportCycle: 86400001\n", 1)
    text += "  stateReport: {reportToCloud: true, reportCycle: 5000000000}\n"
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    result = load([tmp_path], base=tmp_path)
    assert result.devices[DeviceId("default", "slow")].prop("temperature").collect_cycle_ms == 10_000_000_000
    lines = {key: next(i for i, line in enumerate(text.splitlines(), 1) if key in line)
             for key in ("10000000000", "86400001", "stateReport")}
    warnings = [str(w) for w in result.warnings if "days" in str(w)]
    assert warnings == [
        f"d.yaml:{lines['10000000000']}: spec.properties[0].collectCycle: 10000000000 ms is 115.7 days: cycles are"
        " milliseconds (as in KubeEdge), and it runs as written; if it is nanoseconds, as some older KubeEdge"
        " examples write, 10000 ms is meant: write that",
        f"d.yaml:{lines['86400001']}: spec.properties[0].reportCycle: 86400001 ms is 1.0 days: cycles are"
        " milliseconds (as in KubeEdge), and it runs as written; if it is nanoseconds, as some older KubeEdge"
        " examples write, 86.4 ms is meant: write that",
        f"d.yaml:{lines['stateReport']}: spec.stateReport.reportCycle: 5000000000 ms is 57.9 days: cycles are"
        " milliseconds (as in KubeEdge), and it runs as written; if it is nanoseconds, as some older KubeEdge"
        " examples write, 5000 ms is meant: write that",
    ], [str(w) for w in result.warnings]


V122_STATUS = """\
status:
  reportToCloud: true
  reportCycle: {cycle}
  state: online
  lastOnlineTime: "2024-01-01T00:00:00Z"
  twins: [{{propertyName: temperature, reported: {{value: "21", metadata: {{type: float}}}}}}]
"""


@pytest.mark.parametrize("cycle, error", [
    ("99999999999999999999", "status.reportCycle: must be <= 9223372036854775807"),
    ("-5", "status.reportCycle: must be >= 0"),
    ('"10s"', "status.reportCycle: must be an integer, got '10s': cycles are milliseconds (as in KubeEdge): write 10000"),
])
def test_a_v1_22_status_report_cycle_is_checked_as_state_report_is(tmp_path, cycle, error):
    """KubeEdge v1.22's place of stateReport, a Device's `status.reportToCloud/reportCycle` (still in
    the CRD), was not checked at all: any value passed `mapper validate`, even one KubeEdge's API
    server refuses (beyond int64, negative, a string). Checked now as spec.stateReport is, at its line."""
    text = device_yaml("d") + V122_STATUS.format(cycle=cycle)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "  reportCycle: " + cycle in row)
    found = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert found == [f"d.yaml:{line}: {error}"], found


def test_a_v1_22_status_report_cycle_over_a_day_is_a_warning(tmp_path):
    """... and one over a day (edgecore would re-send the state every 115 days) is the long-cycle warning."""
    text = device_yaml("d") + V122_STATUS.format(cycle=10000000000)
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "  reportCycle: 10000000000" in row)
    warnings = [str(w) for w in load([tmp_path], base=tmp_path).warnings]
    assert warnings == [
        f"d.yaml:{line}: status.reportCycle: 10000000000 ms is 115.7 days: cycles are milliseconds (as in KubeEdge),"
        " and it runs as written; if it is nanoseconds, as some older KubeEdge examples write, 10000 ms is meant:"
        " write that"], warnings


def test_a_v1_22_status_loads_without_warnings(tmp_path):
    """A valid v1.22 status (reportToCloud, reportCycle, observed twins, state, lastOnlineTime) is no warning."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d") + V122_STATUS.format(cycle=10000))
    result = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "d") in result.devices and result.warnings == [], result.warnings


@pytest.mark.parametrize("topic, why", [
    ("lamp/+/count", "no wildcards"),
    ("lamp/#", "no wildcards"),
    ("$hw/events/device/default/d/twin/update", "starting with '$'"),
    ("mapper/test-node/default/d/power/set", "where desired values come in"),
])
def test_a_push_topic_the_mapper_cannot_or_must_not_publish_to_is_refused(tmp_path, topic, why):
    """pushMethod.mqtt.topic is published to as is: a wildcard would make paho refuse every message
    on it, and a `$`/`/set` topic would feed the mapper's own telemetry back in as commands."""
    text = device_yaml("d").replace("      reportCycle: 50\n      reportToCloud: true\n    - name: power", f"""\
      reportCycle: 50
      reportToCloud: true
      pushMethod:
        mqtt: {{topic: '{topic}', qos: 1}}
    - name: power""")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert len(problems) == 1
    assert "d.yaml" in problems[0] and "pushMethod.mqtt.topic" in problems[0] and why in problems[0]


@pytest.mark.parametrize("module_text, reason", [
    ("from smbus2 import SMBus\n", "ModuleNotFoundError: No module named 'smbus2'"),  # a dependency missing
    ("from devices.drivers.base import NoSuchThing\n", "ImportError: cannot import name 'NoSuchThing'"),
    ("class Broken:\n    pass\n", "'Broken' is not a devices.drivers.Driver"),
    # a hardware library that refuses to import off its board by exiting (a BaseException)
    ("import sys\nsys.exit('This library requires a Raspberry Pi')\n",
     "SystemExit: This library requires a Raspberry Pi"),
])
def test_a_driver_package_that_cannot_load_refuses_its_devices_only(tmp_path, monkeypatch, module_text, reason):
    """A third-party driver that is registered but broken: its devices are refused with the reason,
    like devices whose driver is not installed; the other devices load (the whole load used to
    fail, and with it `mapper run`, `validate` and every later SIGHUP)."""
    import importlib

    from devices.drivers import base

    install_plugin(tmp_path / "site", monkeypatch, "broken", module_text)
    monkeypatch.setattr(base, "_registered", None)
    importlib.invalidate_caches()
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (devices / "d0.yaml").write_text(device_yaml("d0").replace("protocolName: simulated", "protocolName: broken"))
    (devices / "d1.yaml").write_text(device_yaml("d1"))
    result = load([devices], base=devices)
    assert set(result.devices) - set(result.unrunnable) == {DeviceId("default", "d1")}
    problem = str(result.unrunnable[DeviceId("default", "d0")])
    assert "cannot be loaded" in problem and reason in problem
    monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


def _register_a_missing_driver(tmp_path, monkeypatch):  # noqa: ANN001, ANN202
    """An installed package whose `mapper.drivers` entry point `missingmod` names a module that is not
    there; returns devices.drivers.base with its registry to be read again (and again after the test)."""
    import importlib

    from devices.drivers import base

    site = tmp_path / "site"
    dist_info(site, "missing-driver", "1.0", entry_points_txt="[mapper.drivers]\nmissingmod = mapper_nosuchmodule:X\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(base, "_registered", None)
    importlib.invalidate_caches()
    return base


def test_a_driver_entry_point_whose_module_is_gone_names_the_entry_point_and_the_import_error(tmp_path, monkeypatch):
    """A package's entry point names a module that is not there (half uninstalled, or a typo in its
    pyproject): said as such, with the entry point, the package and the import error. It said "no
    driver installed for protocol 'missingmod' (installed: ..., missingmod, ...)"."""
    base = _register_a_missing_driver(tmp_path, monkeypatch)
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    text = device_yaml("d0").replace("protocolName: simulated\n    configData", "protocolName: missingmod\n    configData")
    (devices / "d0.yaml").write_text(text)
    result = load([devices], base=devices)
    line = text.splitlines().index("    protocolName: missingmod") + 1
    assert str(result.unrunnable[DeviceId("default", "d0")]) == (
        f"d0.yaml:{line}: spec.protocol.protocolName: device default/d0: the driver for protocol 'missingmod' is"
        " registered (mapper_nosuchmodule:X, from package missing-driver) but cannot be loaded: ModuleNotFoundError:"
        " No module named 'mapper_nosuchmodule'; reinstall or fix the package that provides it")
    monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


def test_a_driver_installed_with_a_pth_while_the_mapper_runs_loads(tmp_path, monkeypatch):
    """A driver package installed (`pip install -e`) after the process started: its entry point is
    found, but the path its .pth adds is added only at a Python start. The device that names it
    loads all the same (the package's own .pth is read then); it was refused with "No module named
    'mapper_late_driver'; reinstall or fix the package that provides it" until a restart."""
    import importlib
    import sys

    from devices.drivers import base

    site = tmp_path / "site"
    dist_info(site, "late-driver", "1.0", entry_points_txt="[mapper.drivers]\nlateproto = mapper_late_driver:LateDriver\n",
              RECORD="__editable__.late_driver-1.0.pth,,\nlate_driver-1.0.dist-info/RECORD,,\n")
    source = tmp_path / "src"
    source.mkdir()
    (source / "mapper_late_driver.py").write_text(
        "from devices.drivers import Driver\n\n\nclass LateDriver(Driver):\n    protocol = 'lateproto'\n\n"
        "    def read(self, prop):\n        return 1\n")
    (site / "__editable__.late_driver-1.0.pth").write_text(f"{source}\n")
    monkeypatch.syspath_prepend(str(site))  # site-packages as at the start: its .pth files were read then
    monkeypatch.setattr(base, "_registered", None)
    importlib.invalidate_caches()
    devices = tmp_path / "devices"
    devices.mkdir()
    model = MODEL.format(model="thing-model").replace("protocol: simulated", "protocol: lateproto")
    (devices / "m.yaml").write_text(model.replace("accessMode: ReadWrite", "accessMode: ReadOnly"))
    (devices / "d0.yaml").write_text(device_yaml("d0").replace("protocolName: simulated", "protocolName: lateproto"))
    try:
        result = load([devices], base=devices)
        assert not result.unrunnable, result.unrunnable
        assert base.load_driver("lateproto").__module__ == "mapper_late_driver"
        assert str(source) in sys.path
    finally:
        sys.modules.pop("mapper_late_driver", None)
        monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


def test_a_driver_that_cannot_load_is_not_listed_as_installed(tmp_path, monkeypatch):
    """A device naming a protocol nothing registers is told what is installed: a registered driver whose
    module cannot be imported is named apart, with its entry point and import error, not among the
    installed ones (available_protocols listed it as if it were)."""
    base = _register_a_missing_driver(tmp_path, monkeypatch)
    assert "missingmod" not in base.available_protocols() and "simulated" in base.available_protocols()
    assert set(base.broken_protocols()) == {"missingmod"}
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    text = device_yaml("d0").replace("protocolName: simulated\n    configData", "protocolName: nosuch\n    configData")
    (devices / "d0.yaml").write_text(text)
    problem = str(load([devices], base=devices).unrunnable[DeviceId("default", "d0")])
    installed = problem.partition("(installed: ")[2].partition(";")[0]
    assert "no driver installed for protocol 'nosuch'" in problem and "simulated" in installed, problem
    assert "missingmod" not in installed, problem
    assert ("registered but cannot be loaded: missingmod (mapper_nosuchmodule:X, from package missing-driver: "
            "ModuleNotFoundError: No module named 'mapper_nosuchmodule')") in problem, problem
    monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


READ_ONLY_DRIVER = """\
from devices.drivers import Driver


class Readonly(Driver):
    protocol = "readonly"

    def read(self, prop):
        return 1
"""


def loaded_read_only(directory: Path, files: dict[str, str]) -> tuple[list[str], dict[str, bool]]:
    """Load `files`: the warnings as text and, per property of the one device, whether it is writable."""
    for name, text in files.items():
        (directory / name).write_text(text)
    result = load([directory], base=directory)
    (definition,) = result.devices.values()
    return [str(w) for w in result.warnings], {p.name: p.writable for p in definition.properties}


def test_a_readwrite_property_of_a_driver_that_cannot_write_runs_read_only_with_a_warning(tmp_path, monkeypatch):
    """A third-party driver with read() only (Driver.write raises) and a model property ReadWrite: a
    warning at the model's accessMode line, naming the device and its protocol, and the property runs
    ReadOnly: the twin refuses a desired value for it. It used to load writable, take desired values
    (MQTT, REST) and fail each write at the device for ever. The device's readings go on (an error
    took a sensor whose model a cloud shares off the node)."""
    import importlib

    from devices.drivers import base
    from twin.store import NotWritable, TwinStore

    install_plugin(tmp_path / "site", monkeypatch, "readonly", READ_ONLY_DRIVER)
    monkeypatch.setattr(base, "_registered", None)
    importlib.invalidate_caches()
    model = MODEL.format(model="thing-model")
    lines = model.splitlines()
    rw = [i for i, line in enumerate(lines, 1) if "accessMode: ReadWrite" in line]
    device = device_yaml("d").replace("protocolName: simulated\n    configData", "protocolName: readonly\n    configData")
    at = device.splitlines().index("    protocolName: readonly") + 1
    devices = tmp_path / "devices"
    devices.mkdir()
    warnings, writable = loaded_read_only(devices, {"m.yaml": model, "d.yaml": device})
    assert [w for w in warnings if "accessMode" in w] == [
        f"m.yaml:{rw[0]}: spec.properties[1].accessMode: property 'power' is ReadWrite, but the driver for protocol"
        f" 'readonly' (device default/d, d.yaml:{at}) cannot write it: it runs as ReadOnly (desired values for it are refused); use accessMode: ReadOnly, or a protocol whose driver writes",
        f"m.yaml:{rw[1]}: spec.properties[2].accessMode: property 'count' is ReadWrite, but the driver for protocol"
        f" 'readonly' (device default/d, d.yaml:{at}) cannot write it: it runs as ReadOnly (desired values for it are refused); use accessMode: ReadOnly, or a protocol whose driver writes",
    ]
    assert writable == {"temperature": False, "power": False, "count": False}
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([devices], base=devices).devices.values())
        with pytest.raises(NotWritable):
            store.set_desired(DeviceId("default", "d"), "count", 5)
    # ReadOnly: the same device loads with no such warning
    (devices / "m.yaml").write_text(model.replace("accessMode: ReadWrite", "accessMode: ReadOnly"))
    assert not [w for w in loaded_read_only(devices, {})[0] if "accessMode" in w]
    monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


def test_a_readwrite_dht_property_runs_read_only_with_a_warning(tmp_path):
    """The built-in dht driver reads only: `accessMode: ReadWrite` on a DHT property is a warning at
    that line and the property runs ReadOnly (it passed `mapper validate` in silence, then every
    desired value failed at the device)."""
    text = (REPO / "devices/examples/pi/room-sensor-dht.yaml").read_text()
    text = text.replace("accessMode: ReadOnly", "accessMode: ReadWrite", 1)
    lines = text.splitlines()
    access = lines.index("      accessMode: ReadWrite") + 1
    protocol = lines.index("    protocolName: dht") + 1
    warnings, writable = loaded_read_only(tmp_path, {"dht.yaml": text})
    assert [w for w in warnings if "accessMode" in w] == [
        f"dht.yaml:{access}: spec.properties[0].accessMode: property 'temperature' is ReadWrite, but the driver for"
        f" protocol 'dht' (device default/room-sensor-pi, dht.yaml:{protocol}) cannot write it: it runs as ReadOnly (desired values for it are refused); use accessMode: ReadOnly, or a protocol whose driver writes"]
    assert writable["temperature"] is False


def test_a_readwrite_simulated_property_that_reads_what_it_generates_runs_read_only(tmp_path):
    """A simulated `temperature` (or `humidity`, `clock`) property reads its own signal whatever was
    written: ReadWrite on one is a warning at the model's accessMode and it runs ReadOnly (its desired
    value was taken, "written", never read back: a delta for ever). `counter` and `switch` stay writable."""
    model = MODEL.format(model="thing-model").replace(
        "    - name: temperature\n      type: FLOAT\n      accessMode: ReadOnly",
        "    - name: temperature\n      type: FLOAT\n      accessMode: ReadWrite")
    access = model.splitlines().index("      accessMode: ReadWrite") + 1
    device = device_yaml("d")
    protocol = next(i for i, line in enumerate(device.splitlines(), 1) if "protocolName: simulated" in line)
    warnings, writable = loaded_read_only(tmp_path, {"m.yaml": model, "d.yaml": device})
    assert [w for w in warnings if "accessMode" in w] == [
        f"m.yaml:{access}: spec.properties[0].accessMode: property 'temperature' is ReadWrite, but the driver for"
        f" protocol 'simulated' (device default/d, d.yaml:{protocol}) cannot write it: it runs as ReadOnly (desired values for it are refused); use accessMode: ReadOnly, or a protocol whose driver writes"]
    assert writable == {"temperature": False, "power": True, "count": True}


def test_can_write_is_whether_the_driver_overrides_write():
    """Driver.can_write: the built-ins that write say so, the read-only ones do not."""
    from devices.drivers.base import load_driver

    assert {p: load_driver(p).can_write(None) for p in ("simulated", "gpio", "replay", "dht")} == {
        "simulated": True, "gpio": True, "replay": False, "dht": False}


def test_a_misspelt_simulated_setting_is_an_error_at_its_line_with_the_setting_meant(tmp_path):
    """`{knd: temperature, bas: 22}` or `sed: 3` used to pass `mapper validate`, and the property read
    the defaults (a constant 0). Each unknown key is an error at its line, with the key it is close to;
    one close to none lists the known keys. In a model's protocolConfigData, it is the model's line."""
    device = device_yaml("d", config="{sed: 3, faults: {rat: 0.1}}").replace(
        "configData: {kind: temperature, base: 21,", "configData: {knd: temperature, bas: 21,").replace(
        "configData: {kind: counter}", "configData: {kind: counter, zzzzz: 1}")
    model = MODEL.format(model="thing-model").replace("  protocol: simulated\n",
                                                      "  protocol: simulated\n  protocolConfigData: {brokn: true}\n")
    lines, model_lines = device.splitlines(), model.splitlines()
    config = lines.index("    configData: {sed: 3, faults: {rat: 0.1}}") + 1
    visitor = next(i for i, line in enumerate(lines, 1) if "knd:" in line)
    counter = next(i for i, line in enumerate(lines, 1) if "zzzzz" in line)
    brokn = next(i for i, line in enumerate(model_lines, 1) if "brokn" in line)
    known = "amplitude, base, drift, kind, lag_ms, noise, period_s, resolution, start, step, value"
    assert problems_of(tmp_path, {"m.yaml": model, "d.yaml": device}) == [
        f"d.yaml:{config}: spec.protocol.configData.faults.rat: unknown field, did you mean rate?",
        f"d.yaml:{config}: spec.protocol.configData.sed: unknown field, did you mean seed?",
        f"d.yaml:{visitor}: spec.properties[0].visitors.configData.knd: unknown field, did you mean kind?",
        f"d.yaml:{visitor}: spec.properties[0].visitors.configData.bas: unknown field, did you mean base?",
        f"d.yaml:{counter}: spec.properties[2].visitors.configData.zzzzz: unknown field (known here: {known}): remove it",
        f"m.yaml:{brokn}: spec.protocolConfigData.brokn: unknown field, did you mean broken? (in device default/d)",
    ]


def test_recursive_alias_is_an_error_with_its_line(tmp_path):
    """An alias inside the value it names (`a: &a [*a]`) is reported at its line; it used to be a
    RecursionError traceback for the whole load."""
    problems = problems_of(tmp_path, {"a.yaml": "x: 1\na: &a [*a]\n", "b.yaml": device_yaml("d", model="nope")})
    assert problems[0] == "a.yaml:2: a[0]: an alias refers to a value that contains it (recursive)"
    assert len(problems) == 2 and problems[1].startswith("b.yaml:8: spec.deviceModelRef.name: ")


def test_deep_nesting_is_an_error_at_its_line_and_other_files_still_report(tmp_path):
    """A value nested thousands of levels deep is invalid YAML at its line (libyaml stops at 1,000
    levels), not a crash; one nested a few hundred levels is read, and its real problem told."""
    deep = "x: 1\na: " + "[" * 5000 + "]" * 5000 + "\n"
    nested = "".join("  " * i + f"k{i}:\n" for i in range(900)) + "  " * 900 + "x: 1\n"
    problems = problems_of(tmp_path, {"a.yaml": deep, "b.yaml": nested, "c.yaml": device_yaml("d", model="nope")})
    assert problems[0].startswith("a.yaml:2: invalid YAML: ") and "nest" in problems[0]
    assert problems[1] == "b.yaml:1: kind: None is not supported: use Device or DeviceModel"
    assert len(problems) == 3 and problems[2].startswith("c.yaml:8: spec.deviceModelRef.name: ")


def test_alias_bomb_is_refused_at_its_line(tmp_path):
    """A few hundred bytes of nested aliases expand to millions of values: refused at the first
    value that expands too far, instead of being walked value by value for seconds or minutes."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    problems = problems_of(tmp_path, {"bomb.yaml": "\n".join(levels) + "\n"})
    assert problems == ["bomb.yaml:6: f: expands to more than 100,000 values through aliases: refusing to read it"]


def test_huge_integer_is_an_error_with_its_line_and_other_files_are_checked(tmp_path):
    """An integer Python will not read (over 4300 digits) names its file, line and field; the
    other files are still checked (it used to end the whole check with no file or line)."""
    text = device_yaml("d").replace("    configData: {}", "    configData: {x: " + "9" * 5000 + "}")
    problems = problems_of(tmp_path, {"d.yaml": text, "e.yaml": device_yaml("e", model="nope")})
    assert problems[0] == "d.yaml:11: spec.protocol.configData.x: an integer of 5000 characters is too large"
    assert len(problems) == 2 and problems[1].startswith("e.yaml:8: spec.deviceModelRef.name: ")


def test_dates_are_read_as_strings(tmp_path):
    """Kubernetes reads an unquoted date as a string: `released: 2024-13-01` is an annotation, not
    a 'month must be in 1..12' error with no file or line, and a real date is a string too."""
    text = MODEL.format(model="thing-model").replace(
        "  namespace: default\n", "  namespace: default\n  annotations: {released: 2024-13-01, checked: 2024-01-31}\n", 1)
    (tmp_path / "m.yaml").write_text(text)
    model = load([tmp_path]).models[("default", "thing-model")]
    assert model.metadata.annotations == {"released": "2024-13-01", "checked": "2024-01-31"}


def test_a_key_given_twice_is_an_error_at_the_second(tmp_path):
    """A second `properties:` in one mapping used to replace the first without a word (YAML keeps
    the last); it is an error at the line of the duplicate, naming the line of the first."""
    text = device_yaml("d") + "  properties:\n    - name: count\n"
    first = text.splitlines().index("  properties:") + 1
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert problems == [f"d.yaml:{len(text.splitlines()) - 1}: spec.properties: duplicate key (first at line {first}): "
                        "only one of them would count"]


def test_keys_spelled_differently_but_equal_are_duplicates(tmp_path):
    """`1` and `0x1`, `false` and `False`, a date and the same date quoted: one key each once the
    mapping is built (the second would replace the first), so each second one is an error."""
    text = MODEL.format(model="thing-model").replace(
        "  namespace: default\n",
        "  namespace: default\n  labels:\n    1: a\n    0x1: b\n    false: c\n    False: d\n"
        "    2024-01-31: e\n    '2024-01-31': f\n    two: g\n", 1)
    lines = text.splitlines()
    quoted = "    '2024-01-31': f"
    problems = problems_of(tmp_path, {"m.yaml": text})
    assert [p.split(": duplicate key")[0] for p in problems if "duplicate key" in p] == [
        f"m.yaml:{lines.index('    0x1: b') + 1}: metadata.labels.0x1",
        f"m.yaml:{lines.index('    False: d') + 1}: metadata.labels.False",
        f"m.yaml:{lines.index(quoted) + 1}: metadata.labels.2024-01-31",
    ]


BUGGY_DRIVER = """\
from pydantic import BaseModel, field_validator

from devices.drivers.simulated import SimulatedDriver


class Config(BaseModel):
    baud: int = 9600

    @field_validator("baud")
    @classmethod
    def _known(cls, value):
        return {9600: 9600}[value]  # a KeyError for any other baud: a bug in the driver


class Buggy(SimulatedDriver):
    Config = Config

    @classmethod
    def claims(cls, device):
        if device.protocol_config.baud == 9600 and device.id.name == "d2":
            raise RuntimeError("claims exploded")
        return ()
"""


def test_a_driver_that_raises_while_checking_refuses_its_devices_with_file_and_line(tmp_path, monkeypatch):
    """A third-party driver whose Config validation or claims() raises something unexpected (not a
    ValidationError) used to be a traceback for the whole load; now each of its devices gets a
    FILE:LINE error naming the driver and the exception, and the other devices are checked as usual."""
    import importlib

    from devices.drivers import base

    install_plugin(tmp_path / "site", monkeypatch, "buggy", BUGGY_DRIVER)
    monkeypatch.setattr(base, "_registered", None)
    importlib.invalidate_caches()
    devices = tmp_path / "devices"
    devices.mkdir()
    buggy = device_yaml("d1", config="{baud: 19200}").replace("protocolName: simulated\n    configData",
                                                              "protocolName: buggy\n    configData")
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (devices / "d1.yaml").write_text(buggy)
    (devices / "d2.yaml").write_text(buggy.replace("name: d1", "name: d2").replace("19200", "9600"))
    (devices / "d3.yaml").write_text(device_yaml("d3", config="{failure_rate: 3}"))
    with pytest.raises(DefinitionError) as info:
        load([devices], base=devices)
    assert [str(p) for p in info.value.problems] == [
        "d1.yaml:11: spec.protocol.configData: the driver for protocol 'buggy' failed in its Config validation: "
        "KeyError: 19200 (a bug in the driver: report it to its authors)",
        "d2.yaml:10: spec.protocol.protocolName: device default/d2: the driver for protocol 'buggy' failed in its "
        "claims(): RuntimeError: claims exploded (a bug in the driver: report it to its authors)",
        "d3.yaml:11: spec.protocol.configData.failure_rate: must be <= 1.0",
    ]
    monkeypatch.setattr(base, "_registered", None)  # (the registry is read again without the plugin)


def test_a_bad_model_level_config_is_reported_in_the_model_at_its_line(tmp_path):
    """Model `protocolConfigData` and property `visitors` are defaults merged into each device; a
    bad value from the model is reported in the model's file at its own line (it used to be the
    device's file with a line of the model, which does not exist there). A value the device sets
    is still reported in the device."""
    model = MODEL.format(model="thing-model").replace(
        "  protocol: simulated\n", "  protocol: simulated\n  protocolConfigData:\n    failure_rate: 3\n").replace(
        "      unit: Celsius\n", "      unit: Celsius\n      visitors:\n        protocolName: simulated\n"
        "        configData: {noise: -1, lag_ms: 5}\n")
    device = device_yaml("d").replace("{kind: temperature, base: 21, amplitude: 1, noise: 0.1}",
                                      "{kind: temperature, lag_ms: -1}")
    problems = problems_of(tmp_path, {"m.yaml": model, "d.yaml": device})
    lines = model.splitlines()
    assert problems == [
        f"m.yaml:{lines.index('    failure_rate: 3') + 1}: spec.protocolConfigData.failure_rate: must be <= 1.0 "
        "(in device default/d)",
        f"m.yaml:{lines.index('        configData: {noise: -1, lag_ms: 5}') + 1}: "
        "spec.properties[0].visitors.configData.noise: must be >= 0.0 (in device default/d)",
        f"d.yaml:{device.splitlines().index('        configData: {kind: temperature, lag_ms: -1}') + 1}: "
        "spec.properties[0].visitors.configData.lag_ms: must be >= 0",
    ]


@pytest.mark.parametrize("old, new, message", [
    ("collectCycle: 50", "collectCycle: true", "spec.properties[0].collectCycle: must be an integer, got True"),
    ("reportCycle: 50", "reportCycle: 9223372036854775808",
     "spec.properties[0].reportCycle: must be <= 9223372036854775807"),  # int64, as the CRD and DMI carry it
    ("reportToCloud: true", 'reportToCloud: "yes"', "spec.properties[0].reportToCloud: must be true or false, got 'yes'"),
    ("reportToCloud: true", "reportToCloud: true\n      pushMethod: {mqtt: {topic: t, qos: true}}",
     "spec.properties[0].pushMethod.mqtt.qos: must be an integer, got True"),
    ("reportToCloud: true", "reportToCloud: true\n      pushMethod: {mqtt: {topic: t, retained: 1}}",
     "spec.properties[0].pushMethod.mqtt.retained: must be true or false, got 1"),
    ("reportToCloud: true", "reportToCloud: true\n      desired: {value: ON}",
     "spec.properties[0].desired.value: must be a string, got the boolean true: put the value in quotes "
     "(unquoted, YAML reads yes/no/on/off/true/false as a boolean)"),
])
def test_a_type_the_crd_refuses_is_refused(tmp_path, old, new, message):
    """KubeEdge's API server checks types strictly; pydantic's lax mode used to take `collectCycle:
    true` as 1 ms, `reportToCloud: "yes"` as true, an unquoted `ON` as the text 'true' and a cycle
    beyond int64 (which overflowed later in DMI)."""
    text = device_yaml("d").replace(old, new, 1)
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    line = next(i for i, l in enumerate(text.splitlines(), 1) if new.splitlines()[-1] in l)
    assert problems == [f"d.yaml:{line}: {message}"]


def test_a_whole_number_written_as_a_float_is_an_integer(tmp_path):
    """`collectCycle: 1000.0`, `qos: 1.0`, `pin: 17.0`: Kubernetes' validator takes a float without a
    fraction for an integer (and KubeEdge DMI sends every number as a float), so these load as
    ints; 1000.5 does not."""
    text = device_yaml("d").replace("collectCycle: 50", "collectCycle: 1000.0", 1).replace(
        "reportToCloud: true", "reportToCloud: true\n      pushMethod: {mqtt: {topic: t, qos: 1.0}}", 1)
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(text)
    prop = load([tmp_path], base=tmp_path).devices[DeviceId("default", "d")].properties[0]
    assert (prop.collect_cycle_ms, prop.push_mqtt.qos) == (1000, 1)
    assert type(prop.collect_cycle_ms) is int
    half = text.replace("collectCycle: 1000.0", "collectCycle: 1000.5", 1)
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": half})
    assert len(problems) == 1 and "spec.properties[0].collectCycle: must be an integer" in problems[0]


@pytest.mark.parametrize("bound, message", [
    ("minimum: .nan", "minimum 'nan' is not a number"),
    ('minimum: "1_0"', "minimum '1_0' is not a number"),  # Python's float() reads 10
    ('minimum: "inf"', "minimum 'inf' is not a number"),
    ('minimum: "1e999"', "minimum '1e999' is too large"),
])
def test_a_bound_that_is_not_a_plain_finite_number_is_refused(tmp_path, bound, message):
    """minimum/maximum are strings in the CRD that must read as a plain number: NaN used to switch
    the range check off and '1_0' used to mean 10."""
    text = MODEL.format(model="thing-model").replace('minimum: "0"', bound, 1)
    problems = problems_of(tmp_path, {"m.yaml": text})
    assert len(problems) == 1 and problems[0].startswith(f"m.yaml:12: spec.properties[0].minimum: {message}")


def test_a_bound_that_is_not_a_number_is_reported_at_its_own_field(tmp_path):
    """`maximum: "ten"` was reported at `spec.properties[1]` (the property's first line): it is at
    the bound's own line and field now."""
    text = MODEL.format(model="thing-model").replace(
        "      accessMode: ReadWrite\n    - name: count", '      accessMode: ReadWrite\n      maximum: "ten"\n    - name: count')
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"ten"' in l)
    assert problems_of(tmp_path, {"m.yaml": text}) == [
        f"m.yaml:{line}: spec.properties[1].maximum: maximum 'ten' is not a number: write a plain decimal such as"
        ' "0" or "-2.5"']


def test_a_bad_minimum_does_not_hide_a_bad_maximum(tmp_path):
    """Every problem of a file is listed: a bad minimum stopped the check of the property's bounds,
    so its bad maximum showed only once the minimum was fixed."""
    text = MODEL.format(model="thing-model").replace('minimum: "0"\n      maximum: "50"',
                                                     'minimum: "abc"\n      maximum: ".inf"', 1)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"abc"' in l)
    assert problems_of(tmp_path, {"m.yaml": text}) == [
        f"m.yaml:{line}: spec.properties[0].minimum: minimum 'abc' is not a number: write a plain decimal such as"
        ' "0" or "-2.5"',
        f"m.yaml:{line + 1}: spec.properties[0].maximum: maximum '.inf' is not a number: write a plain decimal such"
        ' as "0" or "-2.5"']


def test_plain_bounds_and_a_bare_number_desired_value_still_load(tmp_path):
    """Bare numbers stay accepted where they keep their text: bounds and a desired value."""
    model = MODEL.format(model="thing-model").replace('minimum: "0"', "minimum: -2.5e1", 1).replace(
        'maximum: "100000000"', "maximum: 1000")
    device = device_yaml("d").replace("    - name: count\n", "    - name: count\n      desired: {value: 7}\n")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    definition = load([tmp_path]).devices[DeviceId("default", "d")]
    assert definition.prop("temperature").minimum == -25.0
    assert definition.prop("count").desired == 7 and definition.prop("count").maximum == 1000


def test_empty_fields_are_read_as_not_given(tmp_path):
    """`configData:` with nothing after it is null; the API server drops nulls, so KubeEdge accepts
    such files, and so does the mapper (it used to refuse them with 'must be a mapping')."""
    model = MODEL.format(model="thing-model").replace(
        "  protocol: simulated\n", "  protocol: simulated\n  protocolConfigData:\n").replace(
        "      unit: Celsius\n", "      unit: Celsius\n      description:\n")
    device = device_yaml("d", config="").replace("configData: {kind: switch}", "configData:")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    definition = load([tmp_path]).devices[DeviceId("default", "d")]
    assert definition.protocol_config.failure_rate == 0.0
    assert definition.prop("temperature").description == ""
    assert definition.prop("power").visitor.kind == "constant"  # the driver's default


def test_a_third_party_driver_named_like_a_built_in_does_not_replace_it(tmp_path, monkeypatch, caplog):
    """A package registering a `mapper.drivers` entry point `gpio` used to take over every gpio
    device silently (an installed package could drive the relays with its own code). The
    built-in wins, and the clash is logged once, naming the package and what to do."""
    import logging

    from devices.drivers import base
    from devices.drivers.gpio import GpioDriver

    install_plugin(tmp_path, monkeypatch, "gpio",
                   "from devices.drivers import Driver\nclass Gpio(Driver):\n    protocol = 'gpio'\n")
    monkeypatch.setattr(base, "_registered", None)
    monkeypatch.setattr(base, "_clashes_logged", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="mapper.drivers"):
        assert base.load_driver("gpio") is GpioDriver
        assert base.load_driver("gpio") is GpioDriver
        assert [r.getMessage() for r in caplog.records if "built-in" in r.getMessage()]  # with no other lookup
        assert "gpio" in base.available_protocols()  # rereads the registry: not warned about again
    clashes = [r.getMessage() for r in caplog.records if "built-in" in r.getMessage()]
    assert len(clashes) == 1
    assert "gpio-driver" in clashes[0] and "gpio_driver:Gpio" in clashes[0]


def test_a_protocol_two_packages_register_is_said_naming_both_and_the_one_used(tmp_path, monkeypatch, caplog):
    """Two installed packages registering the same protocol (a fork next to the original): one of
    them drove its devices, picked by the order of the installed metadata, without a word. It is
    logged once, naming both packages and entry points and the one used."""
    import logging

    from devices.drivers import base

    install_plugin(tmp_path / "a", monkeypatch, "acme",
                   "from devices.drivers import Driver\nclass Acme(Driver):\n    protocol = 'acme'\n")
    fork = tmp_path / "b"
    (fork / "acme_fork").mkdir(parents=True)
    (fork / "acme_fork" / "__init__.py").write_text("from devices.drivers import Driver\nclass Acme(Driver):\n    pass\n")
    dist_info(fork, "acme-fork", "2.0", entry_points_txt="[mapper.drivers]\nacme = acme_fork:Acme\n")
    monkeypatch.syspath_prepend(str(fork))
    monkeypatch.setattr(base, "_registered", None)
    monkeypatch.setattr(base, "_clashes_logged", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="mapper.drivers"):
        used = base.load_driver("acme")
        base.available_protocols()  # rereads the registry: not warned about again
    twice = [r.getMessage() for r in caplog.records if "registered twice" in r.getMessage()]
    assert len(twice) == 1, [r.getMessage() for r in caplog.records]
    chosen = "acme-fork (acme_fork:Acme)" if used.__module__ == "acme_fork" else "acme-driver (acme_driver:Acme)"
    assert twice[0] == (
        "protocol 'acme' is registered twice, by acme-driver (acme_driver:Acme) and by acme-fork (acme_fork:Acme);"
        f" {chosen} is used: uninstall the other package, or register one under another name")


def test_a_name_ending_in_a_newline_is_refused(tmp_path):
    """A block scalar (`name: |`) or a quoted "\\n" ends a name in a newline, which would then be
    part of every MQTT topic and twin key of the device. Before, the checks matched with `$`,
    which also matches before a final newline, so `lamp\\n`, `default\\n` and `power\\n` passed."""
    text = device_yaml("placeholder").replace("  name: placeholder\n", "  name: |\n    lamp\n")
    text = text.replace("  namespace: default\n", '  namespace: "default\\n"\n', 1)
    model = MODEL.format(model="thing-model").replace("name: temperature", 'name: "temperature\\n"')
    problems = problems_of(tmp_path, {"m.yaml": model, "d.yaml": text})
    assert any(p.startswith("d.yaml:4: metadata.name: 'lamp\\n' is not a Kubernetes name") for p in problems), problems
    assert any(p.startswith("d.yaml:6: metadata.namespace: ") for p in problems), problems
    assert any(p.startswith("m.yaml:9: spec.properties[0].name: ") for p in problems), problems
    for text in ("lamp\n", "default/lamp\n", "default\n/lamp"):
        with pytest.raises(ValueError, match="not a valid"):
            DeviceId.parse(text)
    from eventbus.topics import Topics, parse

    topics = Topics("node")
    assert parse("$hw/events/device/default/lamp/twin/update", topics) is not None
    for topic in ("$hw/events/device/default/lamp\n/twin/update", "mapper/node/default/lamp/power\n/set"):
        assert parse(topic, topics) is None, f"{topic!r}: a reply topic would be built from it"


def test_a_file_named_twice_is_read_once(tmp_path):
    """`devices: [dev, dev/lamp.yaml]`, `dev` and `dev/` or a symlink to a file in the same
    directory name one file twice. Before, every device and model in it was a "duplicate ...
    (first defined at dev/lamp.yaml:4)" of itself, at that same place, and nothing started."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "model.yaml").write_text(MODEL.format(model="thing-model"))
    (dev / "lamp.yaml").write_text(device_yaml("lamp"))
    (dev / "lamp-link.yaml").symlink_to("lamp.yaml")
    result = load([dev, dev / "lamp.yaml", f"{dev}/", tmp_path / "dev" / ".." / "dev" / "model.yaml"], base=tmp_path)
    assert list(result.devices) == [DeviceId("default", "lamp")] and len(result.models) == 1
    assert result.devices[DeviceId("default", "lamp")].source == "dev/lamp.yaml:1"
    # Two different files defining one device are still a duplicate.
    (dev / "copy.yaml").write_text(device_yaml("lamp"))
    problems = problems_of(dev, {})
    assert problems == ["lamp.yaml:4: metadata.name: duplicate Device default/lamp (first defined at copy.yaml:4)"]


def test_an_unknown_field_is_a_warning_at_its_line_with_the_field_it_is_close_to(tmp_path):
    """A misspelt field used to pass silently (`acessMode` made the property ReadOnly, `colectCycle`
    fell back to 1000 ms): it is kept, as before, but warned about at its line, with a suggestion."""
    model = MODEL.format(model="thing-model").replace(
        "    - name: power\n      type: BOOLEAN\n      accessMode: ReadWrite",
        "    - name: power\n      type: BOOLEAN\n      acessMode: ReadWrite")
    device = device_yaml("d").replace("    - name: count\n", "    - name: count\n      colectCycle: 20\n      zzz: 1\n")
    device = device.replace("    - name: power\n", "    - name: power\n      desired: {value: \"true\"}\n")
    device = device.replace("  namespace: default\n", "  namespace: default\n  uid: 1234\n", 1)
    device = device.replace("configData: {}", "configData: {seed: 1}", 1) + "status: {whatever: 1}\n"
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = load([tmp_path], base=tmp_path)
    line = {key: next(i for i, l in enumerate(text.splitlines(), 1) if key in l)
            for key, text in (("acessMode", model), ("colectCycle", device), ("zzz", device), ("value:", device))}
    index = 2  # count
    kubeedge = "It is ignored here; KubeEdge's API server would drop it (kubectl refuses it)"
    warnings = [str(w) for w in result.warnings]
    assert f"m.yaml:{line['acessMode']}: spec.properties[1].acessMode: unknown field, did you mean accessMode? It is " \
           "ignored here, so the property stays ReadOnly: writes to it are refused (/set, twin and $hw updates); " \
           "KubeEdge's API server would drop it (kubectl refuses it)" in warnings
    assert f"d.yaml:{line['colectCycle']}: spec.properties[{index}].colectCycle: unknown field, did you mean " \
           f"collectCycle? {kubeedge}" in warnings
    assert f"d.yaml:{line['zzz']}: spec.properties[{index}].zzz: unknown field (known here: collectCycle, desired, " \
           f"name, pushMethod, reportCycle, reportToCloud, visitors). {kubeedge}" in warnings
    # The ReadOnly warning points at the model property that did not say ReadWrite.
    assert any(w.startswith(f"d.yaml:{line['value:']}: ") and "'power' is ReadOnly in its model "
               f"(m.yaml:{line['acessMode'] - 2}, which does not set accessMode: ReadWrite)" in w for w in warnings)
    # configData (its driver's to judge), status and Kubernetes' own metadata fields are not warned about.
    assert len(warnings) == 4, warnings
    definition = result.devices[DeviceId("default", "d")]
    assert not definition.prop("power").writable  # kept as the file says, only warned about


def test_a_bare_number_desired_for_a_string_property_keeps_its_text(tmp_path):
    """`value: 1.10` for a STRING property is "1.10" as written (it was applied as '1.1', and
    `0x05` as '5'), as MQTT's /set keeps it; a number property still gets YAML's number."""
    model = MODEL.format(model="thing-model") + (
        "    - {name: label, type: STRING, accessMode: ReadWrite}\n"
        "    - {name: code, type: STRING, accessMode: ReadWrite}\n")
    device = device_yaml("d").replace("    - name: count\n", "    - name: count\n      desired: {value: 0x05}\n") + (
        "    - {name: label, desired: {value: 1.10}, visitors: {configData: {kind: constant}}}\n"
        "    - {name: code, desired: {value: 0x05}, visitors: {configData: {kind: constant}}}\n")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    definition = load([tmp_path], base=tmp_path).devices[DeviceId("default", "d")]
    assert definition.prop("label").desired == "1.10"
    assert definition.prop("code").desired == "0x05"
    assert definition.prop("count").desired == 5


def _pushing_to(topic: str) -> str:
    """Device d whose temperature is pushed to `topic`, retained."""
    return device_yaml("d").replace(
        "reportToCloud: true", f"reportToCloud: true\n      pushMethod:\n        mqtt: {{topic: {topic}, retained: true}}", 1)


@pytest.mark.parametrize("topic", [
    "mapper/node-b/default/lamp/state",        # another node's retained state
    "mapper/node-b/default/d/temperature",     # this property's name, on another node
    "mapper/node-b/availability",
    "mapper",
])
def test_a_push_topic_in_the_mappers_topic_tree_is_a_definition_error(tmp_path, topic):
    """A push topic under `mapper/` let a device (from a file, or from edgecore) publish retained
    readings as another node's state, telemetry or availability: only the mapper's own `mapper/<node>/`
    was refused. Every topic under the prefix is refused now, at the field's line."""
    text = _pushing_to(topic)
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    line = next(i for i, l in enumerate(text.splitlines(), 1) if f"topic: {topic}," in l)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"d.yaml:{line}: spec.properties[0].pushMethod.mqtt.topic: topic '{topic}' is "
                                  "inside the mapper's topic tree (mapper/...)"), problems


def test_the_push_topic_tree_is_the_configs_prefix_and_the_own_topic_is_allowed(tmp_path):
    """With the config's node and `mqtt.topic_prefix`, the property's own telemetry topic may be
    named; anything else under that prefix is refused, and `mapper/` is no one's under another prefix."""
    from devices.loader import PushTopics

    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(_pushing_to("site/n1/default/d/temperature"))
    loaded = load([tmp_path], base=tmp_path, push_topics=PushTopics("site", "n1"))
    assert loaded.devices[DeviceId("default", "d")].properties[0].push_mqtt.topic == "site/n1/default/d/temperature"
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path, push_topics=PushTopics("site", "n2"))
    assert "pushMethod.mqtt.topic: topic 'site/n1/default/d/temperature' is inside the mapper's topic tree (site/...)" \
        in str(info.value.problems[0])
    (tmp_path / "d.yaml").write_text(_pushing_to("mapper/node-b/default/lamp/state"))
    assert load([tmp_path], base=tmp_path, push_topics=PushTopics("site", "n1")).devices


def test_a_push_topic_under_hw_is_refused(tmp_path):
    """KubeEdge's twin protocol ($hw/...) is no place for readings either (refused by the schema)."""
    text = _pushing_to("'$hw/events/device/default/lamp/twin/update/result'")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert len(problems) == 1 and "spec.properties[0].pushMethod.mqtt.topic:" in problems[0], problems
    assert "starting with '$' belong to the broker" in problems[0]


def test_a_device_for_another_node_is_not_run_here(tmp_path):
    """`spec.nodeName: other-node` in a file a mapper of node my-pi loads: under KubeEdge the device
    is other-node's (edgecore sends a node only its own devices), so one file would drive the
    hardware from two nodes. It is refused like a device without a driver: a warning at its
    line naming both nodes, not run by `mapper run` or a reload; the others run."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    text = device_yaml("d").replace("spec:\n", "spec:\n  nodeName: other-node\n", 1)
    (tmp_path / "d.yaml").write_text(text)
    (tmp_path / "mine.yaml").write_text(device_yaml("mine").replace("spec:\n", "spec:\n  nodeName: my-pi\n", 1))
    (tmp_path / "any.yaml").write_text(device_yaml("any"))
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "nodeName" in l)
    result = load([tmp_path], base=tmp_path, node="my-pi")
    assert set(result.unrunnable) == {DeviceId("default", "d")}
    problem = result.unrunnable[DeviceId("default", "d")]
    assert str(problem) == (
        f"d.yaml:{line}: spec.nodeName: device default/d: nodeName is 'other-node', but this mapper is node 'my-pi'"
        " (its config's `node`): not run here. Under KubeEdge only other-node's edgecore sends it to a mapper;"
        " set nodeName: my-pi (or remove nodeName) to run it on this node")
    assert problem in result.warnings
    # Without a config (`mapper validate`) the node is not known: nothing is said.
    assert not load([tmp_path], base=tmp_path).warnings


def test_the_configs_node_decides_which_devices_run(tmp_path):
    """`mapper run` and a reload load the device files through the config, with its `node`."""
    from helpers import write_config
    from mapper.config import load_config

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (devices / "d.yaml").write_text(device_yaml("d").replace("spec:\n", "spec:\n  nodeName: other-node\n", 1))
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", node="my-pi"))
    assert DeviceId("default", "d") in config.load_devices().unrunnable
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db", node="other-node"))
    assert not config.load_devices().unrunnable


def test_a_device_for_another_node_runs_when_the_node_is_only_the_host_name(tmp_path, monkeypatch):
    """A config without `node` runs as the host name, a guess at the node rather than the operator's
    word: a file copied from KubeEdge with `nodeName: pi-livingroom` on a host named otherwise was
    refused after the default became the host name. It runs, with a warning that says how to settle
    it; with `node` set (in the file or as MAPPER_NODE) it is refused as before."""
    import socket

    from mapper.config import load_config

    monkeypatch.setattr(socket, "gethostname", lambda: "raspberrypi")
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (devices / "d.yaml").write_text(device_yaml("d").replace("spec:\n", "spec:\n  nodeName: pi-livingroom\n", 1))
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"devices: [{devices}]\ntwin: {{path: {tmp_path / 'twin.db'}}}\n")
    config = load_config(config_file, env={})
    assert (config.node, config.node_chosen) == ("raspberrypi", False)
    result = config.load_devices()
    assert not result.unrunnable
    assert any("nodeName is 'pi-livingroom', but this mapper's node is the host name 'raspberrypi' (no `node` in its"
               " config): run here all the same; set `node: pi-livingroom`" in str(w) for w in result.warnings), \
        result.warnings
    config = load_config(config_file, env={"MAPPER_NODE": "kitchen"})
    assert config.node_chosen and DeviceId("default", "d") in config.load_devices().unrunnable


def test_protocol_names_that_disagree_are_warned_about_at_their_lines(tmp_path):
    """Model `spec.protocol: gpio`, device `protocolName: simulated`, a visitor `protocolName: dht`
    passed `mapper validate` without a word. KubeEdge refuses none of them, so they load, but each
    is a warning at its line: under KubeEdge the model goes only to the gpio mapper (the simulated
    one never gets it), and the visitor's configData is read by the device's driver whatever it says."""
    model = MODEL.format(model="thing-model").replace("  protocol: simulated\n", "  protocol: gpio\n")
    model = model.replace("    - name: count\n", "    - name: count\n      visitors: {protocolName: replay}\n")
    device = device_yaml("d").replace("        protocolName: simulated\n        configData: {kind: switch}",
                                      "        protocolName: dht\n        configData: {kind: switch}")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "d") in result.devices  # warnings only
    lines, model_lines = device.splitlines(), model.splitlines()
    visitor = lines.index("        protocolName: dht") + 1
    protocol = lines.index("    protocolName: simulated") + 1
    model_protocol = model_lines.index("  protocol: gpio") + 1
    model_visitor = model_lines.index("      visitors: {protocolName: replay}") + 1
    assert sorted(str(w) for w in result.warnings) == [
        f"d.yaml:{protocol}: spec.protocol.protocolName: device default/d: 'simulated' (the driver this device runs"
        f" with) is not its DeviceModel default/thing-model's spec.protocol 'gpio' (m.yaml:{model_protocol}): under"
        " KubeEdge, edgecore sends that model only to the mapper of protocol 'gpio', so the simulated mapper never"
        " gets it and the device does not start; make the two the same",
        f"d.yaml:{visitor}: spec.properties[1].visitors.protocolName: 'dht' is not the device's protocolName"
        " 'simulated': the simulated driver reads this configData whatever it says (KubeEdge passes"
        " visitors.protocolName on, unread); set it to simulated",
        f"m.yaml:{model_visitor}: spec.properties[2].visitors.protocolName: 'replay' is not the model's spec.protocol"
        " 'gpio': the gpio driver reads this configData whatever it says (KubeEdge passes visitors.protocolName on,"
        " unread); set it to gpio",
    ]


def test_a_misspelt_protocol_name_is_named_with_the_driver_meant(tmp_path):
    """A device's `protocolName: simulate` (for simulated): the missing driver's warning says which
    installed one it is close to, and the visitors (rightly `simulated`) are not told to take the
    misspelt name: the warning said "set it to simulate", spreading the typo to every property."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    device = device_yaml("d").replace("    protocolName: simulated\n    configData", "    protocolName: simulate\n"
                                      "    configData")
    (tmp_path / "d.yaml").write_text(device)
    result = load([tmp_path], base=tmp_path)
    problem = str(result.unrunnable[DeviceId("default", "d")])
    assert problem.endswith("did you mean 'simulated'? Fix spec.protocol.protocolName, or install the package that"
                            " provides 'simulate'"), problem
    visitors = [str(w) for w in result.warnings if ".visitors.protocolName" in str(w)]
    assert len(visitors) == 3, result.warnings  # noqa: PLR2004 - the device's three properties
    for warning in visitors:
        assert warning.endswith(": 'simulated' is not the device's protocolName 'simulate', for which no driver is"
                                " installed: if 'simulate' is misspelt, fix the device's protocolName (it picks the"
                                " driver that reads this configData); else set this to simulate"), warning


def test_an_unknown_protocol_name_close_to_none_is_not_given_a_guess(tmp_path):
    """A protocol close to no installed one (a driver not installed here) gets no `did you mean`."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    device = device_yaml("d").replace("    protocolName: simulated\n    configData", "    protocolName: acme-fieldbus\n"
                                      "    configData")
    (tmp_path / "d.yaml").write_text(device)
    problem = str(load([tmp_path], base=tmp_path).unrunnable[DeviceId("default", "d")])
    assert "did you mean" not in problem, problem
    assert problem.endswith("; install the package that provides it or fix spec.protocol.protocolName"), problem


def test_protocol_names_that_agree_or_are_left_out_are_not_warned_about(tmp_path):
    """The same protocol everywhere, or visitors without protocolName: no warning."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d").replace("        protocolName: simulated\n", ""))
    (tmp_path / "n.yaml").write_text(MODEL.format(model="other-model"))
    (tmp_path / "e.yaml").write_text(device_yaml("e", model="other-model"))
    result = load([tmp_path], base=tmp_path)
    assert len(result.devices) == 2 and result.warnings == []


def test_a_model_without_spec_protocol_is_warned_about_at_its_devices_protocolname(tmp_path):
    """The CRD makes a DeviceModel's spec.protocol optional, but edgecore sends a model only to the
    mapper registered for it: without one, the device's mapper never gets the model under KubeEdge
    (RegisterDevice waits for it, then fails) while it runs here standalone. It passed in silence."""
    model = MODEL.format(model="thing-model").replace("  protocol: simulated\n", "")
    device = device_yaml("d")
    at = next(i for i, line in enumerate(device.splitlines(), 1) if line.strip() == "protocolName: simulated")
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device)
    result = load([tmp_path], base=tmp_path)
    assert DeviceId("default", "d") in result.devices  # a warning: it runs
    assert [str(w) for w in result.warnings] == [
        f"d.yaml:{at}: spec.protocol.protocolName: device default/d: its DeviceModel default/thing-model (m.yaml:6)"
        " has no spec.protocol: under KubeEdge, edgecore sends a model only to the mapper of its spec.protocol, so"
        " the simulated mapper never gets it and the device does not start there; set the model's spec.protocol:"
        " simulated"]


def test_a_readwrite_property_that_cannot_be_written_runs_read_only_for_a_device_from_edgecore_too():
    """Documents from KubeEdge DMI (no lines) get the same warning, naming the documents."""
    import yaml

    from devices.loader import load_objects

    text = (REPO / "devices/examples/pi/room-sensor-dht.yaml").read_text()
    model, device = yaml.safe_load_all(text.replace("accessMode: ReadOnly", "accessMode: ReadWrite", 1))
    result = load_objects([("dmi:DeviceModel default/dht11-pi-model", model), ("dmi:Device default/room-sensor-pi", device)])
    assert [str(w) for w in result.warnings if "accessMode" in str(w)] == [
        "dmi:DeviceModel default/dht11-pi-model: spec.properties[0].accessMode: property 'temperature' is ReadWrite,"
        " but the driver for protocol 'dht' (device default/room-sensor-pi, dmi:Device default/room-sensor-pi) cannot"
        " write it: it runs as ReadOnly (desired values for it are refused); use accessMode: ReadOnly, or a protocol"
        " whose driver writes"]
    (definition,) = result.devices.values()
    assert not any(p.writable for p in definition.properties)


@pytest.mark.parametrize(("bounds", "value", "why"), [
    # Shortened with `:g`, the refusal named another limit than the model's (1.23457e+08 for 123456789).
    ('minimum: "0"\n      maximum: "123456789"', 123456790, "123456790 is above the maximum 123456789"),
    ('minimum: "-0.000001"\n      maximum: "50"', -1, "-1 is below the minimum -0.000001"),
    # Read as a float, a bound beyond 2^53 was another number: 9007199254740995 became ...996, and
    # 9007199254740996, above the model's maximum, was taken.
    ('minimum: "0"\n      maximum: "9007199254740995"', 9007199254740996,
     "9007199254740996 is above the maximum 9007199254740995"),
])
def test_a_value_out_of_range_is_refused_naming_the_bound_as_the_model_writes_it(tmp_path, bounds, value, why):
    model = MODEL.format(model="thing-model").replace('minimum: "0"\n      maximum: "100000000"', bounds)
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device_yaml("d"))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    with pytest.raises(ValueError) as refused:
        device.desired_value("count", value)
    assert str(refused.value) == f"property 'count': {why}"


def test_an_integer_bound_beyond_a_float_keeps_every_value_within_it(tmp_path):
    """maximum 9007199254740993 (2^53+1), read as a float, was 2^53: the maximum itself was refused."""
    model = MODEL.format(model="thing-model").replace('maximum: "100000000"', 'maximum: "9007199254740993"')
    (tmp_path / "m.yaml").write_text(model)
    (tmp_path / "d.yaml").write_text(device_yaml("d"))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    assert device.desired_value("count", 9007199254740993) == 9007199254740993


@pytest.mark.parametrize("raw", ["\n\n\r\n99999999999999999999999", "\n1e400", "99999999999999999999999\u2028"])
def test_an_integer_out_of_range_is_quoted_in_its_error_with_its_line_breaks_escaped(tmp_path, raw):
    """The reason goes into the log and a twin reply: text around the digits (whitespace, which the
    number's check strips) went in as it was, and a line break in it broke the log line."""
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device_yaml("d"))
    device = load([tmp_path]).devices[DeviceId("default", "d")]
    with pytest.raises(ValueError) as refused:
        device.desired_value("count", raw)
    message = str(refused.value)
    assert message == f"property 'count': expected an integer from -2^63 to 2^63-1, got {raw!r}", message
    assert message.isprintable()


@pytest.mark.parametrize(("change", "meant"), [
    (("type: BOOLEAN", "type: bool"), "type: unknown value 'bool': must be one of 'INT', 'FLOAT', 'DOUBLE', 'STRING',"
     " 'BOOLEAN', 'BYTES' or 'STREAM'; did you mean 'BOOLEAN'?"),
    (("type: FLOAT", "type: float"), "did you mean 'FLOAT'?"),
    (("accessMode: ReadWrite", "accessMode: readwrite"), "accessMode: 'readwrite' is not allowed: must be 'ReadWrite'"
     " or 'ReadOnly'; did you mean 'ReadWrite'?"),
])
def test_a_value_outside_a_fixed_set_names_the_one_meant(tmp_path, change, meant):
    """`type: float`, `type: bool`, `accessMode: readwrite`: the list of allowed values was given,
    but not which one was meant (the case, or a Python-ish short name)."""
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model").replace(*change, 1)})
    assert meant in problems[0]


def test_a_cycle_written_as_a_duration_says_it_is_milliseconds(tmp_path):
    """`collectCycle: 10s` (EdgeX's autoEvents and mqtt-io write intervals so) said only `must be an
    integer, got '10s'`; it now says cycles are milliseconds and what to write."""
    text = device_yaml("d").replace("collectCycle: 50\n", "collectCycle: 10s\n", 1).replace(
        "reportCycle: 50\n", "reportCycle: 500ms\n", 1)
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert any(p.endswith("spec.properties[0].collectCycle: must be an integer, got '10s': cycles are milliseconds"
                          " (as in KubeEdge): write 10000") for p in problems), problems
    assert any(p.endswith("reportCycle: must be an integer, got '500ms': cycles are milliseconds (as in KubeEdge):"
                          " write 500") for p in problems), problems


def test_a_device_property_missing_from_model_names_the_ones_declared(tmp_path):
    """`pwr` for `power`: the error named the model but not what it declares."""
    text = device_yaml("d").replace("    - name: power", "    - name: pwr")
    problems = problems_of(tmp_path, {"m.yaml": MODEL.format(model="thing-model"), "d.yaml": text})
    assert any("property 'pwr' is not declared in DeviceModel default/thing-model (it declares: temperature, power,"
               " count); did you mean 'power'?" in p for p in problems), problems


def test_a_key_indented_out_of_its_mapping_says_where_it_belongs(tmp_path):
    """`configData:` indented as the property's key instead of under `visitors:` (two spaces short):
    the warning listed the property's keys, and a simulated switch ran as a `constant` without a word
    about where the key went. It now names the mapping beside it that has such a key."""
    device = device_yaml("d").replace(
        "      visitors:\n        protocolName: simulated\n        configData: {kind: switch}\n",
        "      visitors:\n        protocolName: simulated\n      configData: {kind: switch}\n")
    (tmp_path / "m.yaml").write_text(MODEL.format(model="thing-model"))
    (tmp_path / "d.yaml").write_text(device)
    line = next(i for i, l in enumerate(device.splitlines(), 1) if l == "      configData: {kind: switch}")
    warnings = [str(w) for w in load([tmp_path], base=tmp_path).warnings]
    assert f"d.yaml:{line}: spec.properties[1].configData: unknown field here, but a key of visitors beside it:" \
           " indent it under visitors. It is ignored here; KubeEdge's API server would drop it (kubectl" \
           " refuses it)" in warnings, warnings


def test_a_schema_error_in_a_device_does_not_hide_its_driver_configdata_errors(tmp_path):
    """A device with `collectCycle: 1s` and `pin: GPIO17` was told only of the cycle: the schema refused
    the document, and its driver's configData was never looked at, so the pin came up only once the
    cycle was fixed. Both are listed now (the driver's settings read as written, the model's merged in);
    where the model cannot be read, the configData is left for later (its required keys may be there)."""
    text = (REPO / "devices/examples/pi/relay-gpio.yaml").read_text()
    bad = (text.replace("collectCycle: 1000", "collectCycle: 1s").replace("pin: 17 ", "pin: GPIO17 ")
           .replace("pins: rpi-gpio ", "pins: rpi "))
    lines = {key: next(i for i, line in enumerate(bad.splitlines(), 1) if key in line)
             for key in ("collectCycle: 1s", "pin: GPIO17", "pins: rpi ")}
    problems = problems_of(tmp_path, {"relay.yaml": bad})
    assert sorted(problems) == sorted([
        f"relay.yaml:{lines['collectCycle: 1s']}: spec.properties[0].collectCycle: must be an integer, got '1s':"
        " cycles are milliseconds (as in KubeEdge): write 1000",
        f"relay.yaml:{lines['pin: GPIO17']}: spec.properties[0].visitors.configData.pin: 'GPIO17' is a pin's name:"
        " write its BCM number, pin: 17",
        f"relay.yaml:{lines['pins: rpi ']}: spec.protocol.configData.pins: 'rpi' is not allowed: must be 'rpi-gpio'"
        " or 'fake'",
    ]), problems
    # The model refused too: only the schema's errors, no guess at the device's configData.
    model_bad = bad.replace("type: BOOLEAN", "type: BOOL")
    problems = problems_of(tmp_path, {"relay.yaml": model_bad})
    assert not any("configData" in p for p in problems), problems


def test_independent_mistakes_in_several_files_are_all_listed_in_one_run(tmp_path):
    """A person with several mistakes saw some only once others were fixed: a Device the schema
    refused (`collectCycle: fast`) was not told its DeviceModel does not exist, and a second Device
    of a name already taken was not checked at all (its misspelt `sede` came after the rename).
    Every mistake is listed in one run, each file's together, at its line and field."""
    expected = write_several_mistakes(tmp_path)
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert [str(p).splitlines()[0] for p in info.value.problems] == expected
