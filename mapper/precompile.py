"""`python -m mapper.precompile --config FILE`: compile the bytecode `mapper run --config FILE`
will load, in a process of its own (the systemd unit's ExecStartPre=).

The unit runs the mapper with -OO and keeps that bytecode in /var/lib/mapper/pycache, so the
first start after an install or an upgrade finds none. A process that compiles what it imports
keeps the compiler's memory until it exits: 42.6 MiB instead of 36.0 for the benchmark's Pi
workload. Compiled here first, `mapper run` only loads it. Later starts find it up to date and
pay the imports only (0.4 s on the benchmark VM with onnxruntime).

It imports what `mapper run` imports for this config (the stdlib and third-party modules come
with them). It compiles every module of the mapper's own packages, some of which load only
later in a run, and the hardware libraries the configured drivers load when a device opens
(`Driver.lazy_modules`: compiled, not imported, as importing them may probe the board). It
never fails the start: on any error it says so and exits 0, and `mapper run` compiles the
rest itself.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import importlib.util
import logging
import sys

OWN_PACKAGES = ("mapper", "devices", "twin", "eventbus", "models")


def precompile(config_path: str) -> None:
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # what building the service logs is `mapper run`'s to say
    try:
        _precompile(config_path)
    finally:
        logging.disable(previous)


def _precompile(config_path: str) -> None:
    for name in OWN_PACKAGES:
        _compile_module(name)
    from devices.drivers.base import load_driver
    from devices.errors import DriverNotFound
    from mapper.cli import _config
    from mapper.inference.extension import InferenceExtension, collect_settings
    from mapper.runtime import build_service

    config = _config(config_path)
    service = build_service(config)  # imports the extensions the config asks for
    definitions = config.load_devices().devices
    for protocol in sorted({d.protocol for d in definitions.values()}):
        try:
            driver = load_driver(protocol)
        except DriverNotFound:
            continue  # `mapper run` refuses those devices and says why
        for name in driver.lazy_modules:
            _compile_module(name)
    if config.mqtt is not None:
        importlib.import_module("encodings.idna")  # the socket module's, to connect to a host by name
    inference = next((e for e in service.extensions if isinstance(e, InferenceExtension)), None)
    if inference is not None and collect_settings(inference.settings, definitions)[0]:
        for module in ("numpy", "onnxruntime"):  # the pipelines import them when they are built
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)


def _compile_module(name: str) -> None:
    """Compile a top-level module or package, if installed, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            compileall.compile_dir(location, quiet=2)
    elif spec.origin and spec.origin.endswith(".py"):
        compileall.compile_file(spec.origin, quiet=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapper.precompile",
                                     description="compile the bytecode `mapper run --config FILE` will load")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    try:
        precompile(args.config)
    except Exception as exc:  # noqa: BLE001 - an optimisation: `mapper run` reports real problems itself
        print(f"mapper.precompile: stopped early ({type(exc).__name__}: {exc}); `mapper run` compiles the rest",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
