"""The README's examples stay true: the driver a third party copies from "Adding a driver"."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from pydantic import BaseModel, ValidationError

README = Path(__file__).resolve().parents[1] / "README.md"


def _driver_example() -> str:
    section = README.read_text().split("## Adding a driver", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_driver_example_defines_its_models_without_warnings_and_requires_its_fields():
    """The example's visitor field was `register: int`, a name pydantic's BaseModel already has:
    every `mapper` command then printed `UserWarning: Field name "register" in "ModbusVisitor"
    shadows an attribute in parent "BaseModel"`, and the field became optional with a method as
    its default, so a property without it validated."""
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(_driver_example(), "README.md (Adding a driver)", "exec"), namespace)  # noqa: S102
    driver = namespace["BacnetDriver"]
    assert driver.protocol == "bacnet"
    for model in (driver.Config, driver.Visitor):
        assert issubclass(model, BaseModel)
        assert [n for n, f in model.model_fields.items() if f.is_required()], f"{model.__name__} requires nothing"
    try:
        driver.Visitor.model_validate({})
    except ValidationError:
        pass
    else:
        raise AssertionError("a visitor without its register address validated")


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_readme_states_the_name_rule_the_loader_applies(tmp_path):
    """The README said `+`, `#`, `/` and spaces are rejected in names, but the rule is ASCII letters,
    digits and a few marks: `温度` and `température` are refused too, and the README must say so."""
    from devices import ids

    for refused in ("温度", "température", "a b", "a+b", "a#b", "a/b"):
        assert not ids.is_property_name(refused) and not ids.is_name(refused)
    assert ids.is_property_name("Temp_1.a-b") and ids.is_name("room-1.a")
    rule = " ".join(_section(README.read_text(), "Errors and warnings:", "## Config file").split())
    assert "ASCII only" in rule and "`温度`" in rule, rule[:600]
    for part in ("lower-case ASCII letters, digits, `-` and `.`", "ASCII letters, digits, `_`, `-` and `.`"):
        assert part in rule, part


def test_the_readme_lists_every_refusal_of_a_twin_update_among_its_400s():
    """A legacy KubeEdge twin client that publishes `actual` values gets 400 `actual values are reported
    by the device, not set` here, where edgecore takes them: the README's list of 400 reasons says it."""
    from eventbus import router

    source = Path(router.__file__).read_text()
    assert "actual values are reported by the device, not set" in source  # the refusal stays
    reasons = " ".join(_section(README.read_text(), "- 400:", "- 409:").split())
    assert "actual values are reported by the device, not set" in reasons, reasons
    assert '{"twin":{"ro":{"actual":{"value":"9"}}}}' in reasons, reasons


def test_the_readme_own_device_steps_validate_as_written(tmp_path):
    """"Your own device, on your machine": the Device YAML example saved as the steps say and the
    config they give pass `mapper validate --config`, and the commands name the example's device."""
    import subprocess
    import sys

    text = README.read_text()
    steps = text.split("## Your own device, on your machine", 1)[1].split("\n## ", 1)[0]
    config = re.search(r"```yaml\n(.*?)```", steps, flags=re.S).group(1)
    device = re.search(r"```yaml\n(.*?)```", text.split("\n## Device YAML", 1)[1], flags=re.S).group(1)
    (tmp_path / "my-devices").mkdir()
    (tmp_path / "my-devices" / "fan.yaml").write_text(device)
    (tmp_path / "my.yaml").write_text("\n".join(line.removeprefix("   ") for line in config.splitlines()))
    (tmp_path / "state" / "broker").mkdir(parents=True)  # step 2: scripts/broker.py writes the mapper's password
    (tmp_path / "state" / "broker" / "mapper.password").write_text("s3cret")
    (tmp_path / "state" / "broker" / "mapper.password").chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "mapper", "validate", "--config", str(tmp_path / "my.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=README.parent)
    assert done.returncode == 0 and done.stdout.startswith("ok: "), done
    assert "name: fan-relay" in device and "twin set fan-relay power true --config my.yaml" in steps


def test_the_readme_says_what_a_readwrite_property_of_a_driver_that_cannot_write_does(tmp_path):
    """The README called a ReadWrite property of a driver that cannot write (a DHT) an error, while
    `mapper validate` passes it with a warning and the mapper runs it ReadOnly (the Pi guide and
    "Adding a driver" said so): an engineer expecting validation to stop such a file was misled."""
    from devices.loader import load

    device = re.search(r"```yaml\n(.*?)```", README.read_text().split("\n## Device YAML", 1)[1], flags=re.S).group(1)
    (tmp_path / "fan.yaml").write_text(device.replace("kind: switch", "kind: temperature"))
    result = load([tmp_path], base=tmp_path)  # (raises on an error)
    said = [str(w) for w in result.warnings if "accessMode" in str(w)]
    assert said and "runs as ReadOnly" in said[0], result.warnings
    rule = " ".join(_section(README.read_text(), "**ReadWrite needs a driver that writes.**", "\n- ").split())
    assert "runs as ReadOnly, with a warning at the model's `accessMode`" in rule, rule
    assert "is an error" not in rule, rule


def test_the_readme_driver_test_runs_against_the_example_driver(tmp_path, monkeypatch):
    """A driver's author had no word on how to test a driver without running the mapper. The
    README's test, run as written against examples/drivers/mapper-bme280 installed as pip lays it out."""
    import sys

    from devices.drivers import base
    from test_example_driver import EXAMPLE, install_example

    section = README.read_text().split("## Adding a driver", 1)[1]
    code = re.search(r"```python\n(# test_bme280.py.*?)```", section, flags=re.S).group(1)
    site = Path(install_example(tmp_path / "site")["PYTHONPATH"])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(base, "_registered", None)  # read the registry with the example in it
    monkeypatch.chdir(EXAMPLE)
    namespace: dict = {}
    try:
        exec(compile(code, "README.md (a driver's own tests)", "exec"), namespace)  # noqa: S102
        namespace["test_reads_and_writes"]()
    finally:
        sys.modules.pop("mapper_bme280", None)
