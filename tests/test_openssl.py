"""mapper/openssl.py: a mapper without TLS runs without OpenSSL (~4.5 MiB of resident memory), and
whatever asks for more of `ssl` than the stand-in holds gets the real module, not an error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys
from mapper import openssl
assert openssl.skip_hashlib_openssl()
assert openssl.ssl_placeholder()
import asyncio, hashlib, hmac, secrets
import aiomqtt, paho.mqtt.client, eventbus.extension, mapper.runtime

def openssl_mapped():
    maps = open("/proc/self/maps").read()
    return "libcrypto" in maps or "libssl" in maps
"""


def run(check: str) -> None:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(check)], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


def test_no_openssl_without_tls() -> None:
    """Everything a mapper run imports, imported: hashes and hmac work, and OpenSSL is not in memory."""
    run("""
        assert hashlib.sha256(b"x").hexdigest() == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
        assert hmac.new(b"k", b"m", "sha256").hexdigest().startswith("b60090e3052297ae")  # as with OpenSSL
        assert len(secrets.token_hex(4)) == 8
        asyncio.run(asyncio.sleep(0))
        assert not openssl_mapped(), "OpenSSL mapped"
        assert openssl.real_ssl_loaded_by is None
        print("ok")
    """)


def test_asking_the_stand_in_for_more_loads_the_real_ssl() -> None:
    """A TLS call through the stand-in works: the real module loads into it, with its own exception
    classes, also for the modules that imported the stand-in; and it says who asked."""
    run("""
        import ssl
        context = ssl.create_default_context()
        assert openssl.real_ssl_loaded_by == "ssl.create_default_context"
        assert openssl_mapped()
        assert context.verify_mode == ssl.CERT_REQUIRED
        import _ssl
        assert paho.mqtt.client.ssl.SSLWantReadError is _ssl.SSLWantReadError
        assert sys.modules["ssl"] is ssl and ssl.SSLError is _ssl.SSLError
        print("ok")
    """)


def test_the_stand_in_is_never_put_over_the_real_ssl() -> None:
    import ssl  # noqa: F401 - the test process has it

    from mapper import openssl

    assert not openssl.ssl_placeholder()
    assert not openssl.skip_hashlib_openssl()
    assert sys.modules["ssl"].create_default_context is ssl.create_default_context
