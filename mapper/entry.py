"""The `mapper` command (console script and `python -m mapper`): `mapper run` notes a SIGHUP or a
SIGTERM from here on (mapper/early_signals.py), OpenSSL's hashes are kept out before anything imports hashlib
(mapper/openssl.py), modules paho imports but seldom uses are loaded on first use
(mapper/deferred_imports.py), then the CLI runs."""

from __future__ import annotations

import sys

from mapper import early_signals
from mapper.deferred_imports import defer_imports
from mapper.openssl import skip_hashlib_openssl


def main() -> int:
    if sys.argv[1:2] == ["run"]:  # (before anything else: a SIGHUP or SIGTERM while it starts must not end it)
        early_signals.hold()
    skip_hashlib_openssl()  # before mapper.cli imports pydantic (-> secrets -> hmac -> _hashlib)
    defer_imports()  # before the event bus imports paho (-> urllib.request)
    from mapper.cli import main as cli_main

    return cli_main()
