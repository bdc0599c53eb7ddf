"""`python -m mapper.precompile --config FILE`: compile the bytecode `mapper run --config FILE`
will load, in a process of its own (the systemd unit's ExecStartPre=).

The unit runs the mapper with -OO and keeps that bytecode in /var/lib/mapper/pycache, so the
first start after an install or an upgrade finds none. A process that compiles what it imports
keeps the compiler's memory until it exits: 42.6 MiB instead of 36.0 for the benchmark's Pi
workload. Compiled here first, `mapper run` only loads it. Later starts find it up to date and
pay the imports only (0.4 s on the benchmark VM with onnxruntime).

It imports what `mapper run` imports for this config (the stdlib and third-party modules come
with them), and compiles every module of the mapper's own packages, some of which load only
later in a run. It never fails the start: on any error it says so and exits 0, and
`mapper run` compiles the rest itself.
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
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                compileall.compile_dir(location, quiet=2)
    from devices.drivers.base import load_driver
    from devices.loader import load
    from mapper.cli import _config
    from mapper.runtime import build_service

    config = _config(config_path)
    service = build_service(config)  # imports the extensions the config asks for
    if config.devices:
        for protocol in {d.protocol for d in load(config.devices).devices.values()}:
            load_driver(protocol)
    if config.mqtt is not None:
        importlib.import_module("encodings.idna")  # the socket module's, to connect to a host by name
    if any(type(e).__name__ == "InferenceExtension" for e in service.extensions):
        for module in ("numpy", "onnxruntime"):  # the pipelines import them when they are built
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)


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
