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
    driver = namespace["ModbusDriver"]
    assert driver.protocol == "modbus"
    for model in (driver.Config, driver.Visitor):
        assert issubclass(model, BaseModel)
        assert [n for n, f in model.model_fields.items() if f.is_required()], f"{model.__name__} requires nothing"
    try:
        driver.Visitor.model_validate({})
    except ValidationError:
        pass
    else:
        raise AssertionError("a visitor without its register address validated")
