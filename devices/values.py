"""Property types and value conversion: pure functions, no I/O.

KubeEdge carries every twin value as a string; inside the mapper values are typed
(int, float, bool, str). These functions convert between the two and check ranges.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from enum import Enum
from typing import Any

from devices.ids import shown

Value = int | float | bool | str

# edgecore's ValidateTwinValue: what a twin value may be (an empty one is not validated). Use fullmatch.
TWIN_VALUE = re.compile(r"^[a-zA-Z0-9-_.,:/@#]{1,512}$")


def whole_number(value: Any) -> Any:
    """A float without a fraction as the int it is (`1000.0` -> 1000), for an integer field
    checked strictly: Kubernetes' validator takes it for an `integer`, kubectl sends it as 1000,
    and KubeEdge DMI carries every YAML number as a float. Anything else (a bool, 1000.5, a
    string) is left for the strict check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class PropertyType(str, Enum):
    INT = "INT"
    FLOAT = "FLOAT"
    DOUBLE = "DOUBLE"
    STRING = "STRING"
    BOOLEAN = "BOOLEAN"
    BYTES = "BYTES"
    STREAM = "STREAM"

    @property
    def numeric(self) -> bool:
        return self in (PropertyType.INT, PropertyType.FLOAT, PropertyType.DOUBLE)

    @property
    def twin_type(self) -> str:
        """The `metadata.type` edgecore's twin validation understands."""
        return {"INT": "int", "FLOAT": "float", "DOUBLE": "float", "BOOLEAN": "boolean"}.get(self.value, "string")


_TRUE = {"true", "on", "1", "yes"}
_FALSE = {"false", "off", "0", "no"}


def coerce(kind: PropertyType, raw: Any) -> Value:
    """Convert `raw` (a driver result, a YAML string, a JSON value) to the property's type.

    Raises ValueError with a message that names the expected type.
    """
    if kind is PropertyType.INT:
        return _to_int(raw)
    if kind in (PropertyType.FLOAT, PropertyType.DOUBLE):
        return _to_float(raw)
    if kind is PropertyType.BOOLEAN:
        return _to_bool(raw)
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float | str):
        return str(raw)
    raise ValueError(f"expected a string, got {type(raw).__name__}")


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # SQLite's and JSON consumers' (orjson's) integers
FLOAT_EXACT = 2**53 - 1  # the largest integer a float holds with its neighbours distinct
_INT_RANGE = "expected an integer from -2^63 to 2^63-1"


def _to_int(raw: Any) -> int:
    value = _integer(raw)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"{_INT_RANGE}, got {_given(raw)}")
    return value


def _given(raw: Any) -> str:
    """`raw` for a message: a number as it is, text quoted (its line breaks escaped: a reason goes into
    the log, where `"\n\n99..."` broke the line) and cut after 40 characters."""
    return shown(raw, 40) if isinstance(raw, str) else str(raw)[:40]


def _integer(raw: Any) -> int:
    """An integer exactly as sent, or ValueError. A float (a JSON `12.0`) or a numeral with a
    fraction or exponent (`"1.2e3"`) is taken only when it is a whole number no larger than 2^53-1:
    beyond that a float no longer tells neighbouring integers apart (`9007199254740993.0` reads as
    ...992), so the value stored would not be the one sent, or not the one a JSON reader sees."""
    if isinstance(raw, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"expected an integer, got {shown(raw)}")
        return int(_exact_whole(raw, raw))
    if isinstance(raw, str):
        text = _numeral(raw, "an integer")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = Decimal(text)
            finite = number.is_finite()
            whole = finite and number == number.to_integral_value()
        except ArithmeticError:  # decimal's InvalidOperation (not a numeral), Overflow
            raise ValueError(f"expected an integer, got {shown(raw)}") from None
        if not finite:
            raise ValueError(f"expected an integer, got {shown(raw)}")
        if not whole:
            raise ValueError(f"expected an integer, got {shown(raw)}: it is not a whole number")
        return int(_exact_whole(number, raw))
    raise ValueError(f"expected an integer, got {type(raw).__name__}")


def _exact_whole(number: float | Decimal, raw: Any) -> float | Decimal:
    """`number` (whole) when an integer written with a fraction or exponent is exact, else why not."""
    if not INT_MIN <= number <= INT_MAX:
        raise ValueError(f"{_INT_RANGE}, got {_given(raw)}")
    if abs(number) > FLOAT_EXACT:
        raise ValueError(
            f"expected an integer, got {shown(raw)}: written with a fraction or exponent, an integer is "
            f"exact only up to 2^53-1 ({FLOAT_EXACT}); send it as a plain integer (digits only)")
    return number


def _numeral(raw: str, what: str) -> str:
    """The text of a number as JSON and YAML write it. Python's int() and float() also take
    `1_000` and digits of other scripts (`١٢`): a value no other consumer of the twin reads the same."""
    text = raw.strip()
    if not text.isascii() or "_" in text:
        raise ValueError(f"expected {what}, got {raw[:40]!r}")
    return text


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(raw, int | float):
        try:
            number = float(raw)
        except OverflowError:  # an int beyond a float's range (about 1.8e308)
            raise ValueError("expected a finite number, got an integer too large for a float") from None
    elif isinstance(raw, str):
        try:
            number = float(_numeral(raw, "a number"))
        except ValueError:
            raise ValueError(f"expected a number, got {shown(raw)}") from None
    else:
        raise ValueError(f"expected a number, got {type(raw).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {shown(raw)}")
    return number


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected a boolean (true/false), got {shown(raw)}")


def to_twin_string(value: Value) -> str:
    """The string KubeEdge carries for a value; numbers never use exponent notation, and a
    float's string reads back as the same float (no rounding to a fixed number of decimals).

    edgecore validates twin values against `^[a-zA-Z0-9-_.,:/@#]{1,512}$`, which rejects `1e+05`.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            # The shortest digits that read back as this float, written out: 1e-11 -> 0.00000000001.
            text = format(Decimal(text), "f")
        return text
    return str(value)


def range_problem(value: Value, minimum: float | None, maximum: float | None) -> str | None:
    """Why `value` is out of the declared range, or None when it is inside (or not numeric)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if minimum is not None and value < minimum:
        return f"{value} is below the minimum {_bound_text(minimum)}"
    if maximum is not None and value > maximum:
        return f"{value} is above the maximum {_bound_text(maximum)}"
    return None


def _bound_text(bound: float) -> str:
    """A range bound as the model writes it: every digit, no exponent. Shortened (`:g`), a refusal
    named another limit than the model's: 1.23457e+08 for a maximum of 123456789."""
    if isinstance(bound, float) and bound.is_integer() and abs(bound) <= FLOAT_EXACT:
        return str(int(bound))  # "1e8" or "50.0": 100000000, 50
    return to_twin_string(bound)
