"""The test drivers of tests/plugin_site, installed the way a third party installs a driver.

tests/plugin_site holds a package and its .dist-info with a `mapper.drivers` entry point, as
`pip install` would leave them in site-packages. `installed()` puts that directory on sys.path
for one test and makes the driver registry read the entry points again, then takes both back,
so no other test sees the drivers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import device_yaml

SITE = Path(__file__).resolve().parent / "plugin_site"
PACKAGE = "mapper_test_drivers"


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """The plugin distribution on sys.path, and the registry reread, for the `with` block only."""
    from devices.drivers import base

    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    base._registered = None  # noqa: SLF001 - the registry is read once per process: read it with the plugin
    try:
        yield
    finally:
        sys.path.remove(str(SITE))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        base._registered = None  # noqa: SLF001 - ... and without it again


def write_device(directory: Path, name: str, protocol: str, config: dict[str, Any] | None = None, *,
                 cycle: int = 50) -> Path:
    """A device of the plugin's `protocol` in a directory made by helpers.write_devices (which has the model)."""
    text = device_yaml(name, cycle=cycle, config=json.dumps(config or {}))
    spec = "protocolName: simulated\n    configData"
    assert spec in text, "helpers.DEVICE changed: update plugin_drivers.write_device"
    text = text.replace(spec, f"protocolName: {protocol}\n    configData")
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path
