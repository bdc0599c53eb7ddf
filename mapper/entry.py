"""The `mapper` command (console script and `python -m mapper`): OpenSSL's hashes are kept out
before anything imports hashlib (mapper/openssl.py), then the CLI runs."""

from __future__ import annotations

from mapper.openssl import skip_hashlib_openssl


def main() -> int:
    skip_hashlib_openssl()  # before mapper.cli imports pydantic (-> secrets -> hmac -> _hashlib)
    from mapper.cli import main as cli_main

    return cli_main()
