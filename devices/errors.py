"""Errors raised by device definitions and drivers.

    DeviceError
     ├── DefinitionError (ValueError)   bad YAML or config: every problem, each FILE:LINE: FIELD: PROBLEM
     └── DriverError
          ├── DriverNotFound (LookupError)   no driver installed for a protocol
          │    └── DriverBroken                one is registered, but its module cannot be imported
          ├── DriverTimeout                   the device did not answer in time (or a call to it still runs)
          ├── ReadError                       a read failed
          └── WriteError                      a write failed (written again later), or `retryable=False`:
                                              the device can never take this value (not written again)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


class DeviceError(Exception):
    """Base of everything raised by `devices`."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a definition file."""

    file: str
    line: int | None
    field: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file  # no line for in-memory documents
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DefinitionError(DeviceError, ValueError):
    """One or more definition files are invalid; `problems` lists every one, `warnings` the
    warnings found alongside (still worth showing: "every problem is listed"). `result`: the devices
    that loaded without an error of their own (devices.loader.LoadResult; None when not known), for
    the checks made of each device alone (its anomalyDetection map's keys) to be made all the same."""

    def __init__(self, problems: list[Problem], warnings: list[Problem] | None = None, result: object = None) -> None:
        self.problems = problems
        self.warnings = list(warnings or ())
        self.result = result
        super().__init__("\n".join(str(p) for p in problems))


class FieldError(ValueError):
    """Raised by a validator of a whole section (a pydantic model_validator) about one of its
    fields: the problem is reported at that field's line (`path`, below the section), not at the
    section's (for the top level of a file: its first key, a line that has nothing to do with it)."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        self.path = path
        super().__init__(message)


def error_loc(error: dict) -> tuple[str | int, ...]:
    """A pydantic error's location, with the field a FieldError names."""
    ctx = error.get("ctx") or {}
    extra = ctx["error"].path if error.get("type") == "value_error" and isinstance(ctx.get("error"), FieldError) else ()
    return (*error["loc"], *extra)


class DriverError(DeviceError):
    """A driver could not be found, opened, read or written."""


class DriverTimeout(DriverError):
    """A driver call did not return in time, or cannot start because the previous one still runs
    (a hung bus): the device did not answer in time (the REST API's 504)."""


class DriverNotFound(DriverError, LookupError):
    def __init__(self, protocol: str, known: list[str], broken: dict[str, DriverBroken] | None = None) -> None:
        """`known`: the protocols whose driver loads; `broken`: those registered whose driver cannot
        be loaded, named apart with their error (listed as installed, they misled)."""
        self.protocol = protocol
        unloadable = "".join(f"; registered but cannot be loaded: {name} ({exc.why})"
                             for name, exc in sorted((broken or {}).items()))
        # A name close to an installed one is most likely misspelt (`simulate`): say which it meant.
        close = difflib.get_close_matches(protocol, known, n=1)
        fix = (f"did you mean {close[0]!r}? Fix spec.protocol.protocolName, or install the package that provides"
               f" {protocol!r}" if close else "install the package that provides it or fix spec.protocol.protocolName")
        super().__init__(
            f"no driver installed for protocol {protocol!r} (installed: {', '.join(sorted(known)) or 'none'}"
            f"{unloadable}); {fix}"
        )


class DriverBroken(DriverNotFound):
    """A driver is registered for the protocol but cannot be loaded (its package is broken or
    half installed): treated like a missing one, so only its devices are refused."""

    def __init__(self, protocol: str, target: str, exc: BaseException, package: str | None = None) -> None:
        self.protocol = protocol
        source = f", from package {package}" if package else ""
        # The entry point and the import error, as a list of the protocols shows them.
        self.error = f"{type(exc).__name__}: {exc}"
        self.why = f"{target}{source}: {self.error}"
        DriverError.__init__(
            self, f"the driver for protocol {protocol!r} is registered ({target}{source}) but cannot be loaded: "
            f"{type(exc).__name__}: {exc}; reinstall or fix the package that provides it")


class ReadError(DriverError):
    """A read failed: recorded as an error reading, counted towards `unhealthy`. The device loop
    reads again on its cycle (or back-off) whatever `retryable` says: it tells a caller of the
    driver (a test, a tool) whether the same read could succeed later."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class NotReady(ReadError):
    """No value yet, and no failure of its own: the driver may not measure again so soon after a
    failed attempt (a DHT needs 2 s between measurements), and does not repeat an older value.
    The read is recorded as an error reading with this message, but not counted towards
    `unhealthy`: the failed attempt was counted once already."""


class WriteError(DriverError):
    """A write failed. Retryable (the default: the bus did not answer), the desired value stays
    pending and is written again on a back-off. `retryable=False`: the device can never take this
    value (a setting it does not have), so it is refused for good, as a value outside the model's
    range is: its error is stored in the twin and told to the apply listeners once, and it is not
    written again."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)
