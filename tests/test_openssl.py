"""mapper/openssl.py: a mapper without TLS runs without OpenSSL (~4.5 MiB of resident memory); what
would need it fails with an error that says how to get it; MAPPER_LOAD_OPENSSL=1 loads it anyway."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import wait_for, write_devices
from mapper_proc import MapperProcess

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys
from mapper import openssl
loaded = (openssl.skip_hashlib_openssl(), openssl.ssl_placeholder())
import asyncio, hashlib, hmac, secrets
import aiomqtt, paho.mqtt.client, eventbus.extension, mapper.runtime

def openssl_mapped():
    maps = open("/proc/self/maps").read()
    return "libcrypto" in maps or "libssl" in maps
"""


def run(check: str, **env: str) -> None:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(check)], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


def mapped(pid: int) -> list[str]:
    """The OpenSSL libraries in a process's memory map."""
    with open(f"/proc/{pid}/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "libcrypto" in line or "libssl" in line})


def test_mapper_run_without_tls_has_no_openssl_in_memory(broker, tmp_path: Path) -> None:
    """`python -m mapper run` on a plain mqtt:// broker: connected, publishing, and OpenSSL never mapped."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    with MapperProcess(tmp_path, devices, broker) as mapper, broker.client("app") as app:
        app.subscribe("mapper/test-node/default/lamp/count")
        mapper.wait_log("connected to mqtt://")
        assert app.next_message(timeout=10).topic == "mapper/test-node/default/lamp/count"
        assert mapped(mapper.process.pid) == []
        assert mapper.stop() == 0


def test_mapper_load_openssl_opts_out(broker, tmp_path: Path, monkeypatch) -> None:
    """MAPPER_LOAD_OPENSSL=1: the same mapper with OpenSSL loaded (for a plugin that needs it)."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    monkeypatch.setenv("MAPPER_LOAD_OPENSSL", "1")  # MapperProcess passes its environment on
    with MapperProcess(tmp_path, devices, broker) as mapper:
        mapper.wait_log("connected to mqtt://")
        wait_for(lambda: mapped(mapper.process.pid) != [], timeout=5, what="OpenSSL mapped")
        assert mapper.stop() == 0


def test_hashes_work_without_openssl() -> None:
    """hashlib and hmac on CPython's own hashes give OpenSSL's results (computed in this process)."""
    import hashlib
    import hmac

    digest = hashlib.sha256(b"x").hexdigest()
    mac = hmac.new(b"k", b"m", "sha256").hexdigest()
    run(f"""
        assert loaded == (True, True)
        assert hashlib.sha256(b"x").hexdigest() == {digest!r}
        assert hmac.new(b"k", b"m", "sha256").hexdigest() == {mac!r}
        assert len(secrets.token_hex(4)) == 8
        asyncio.run(asyncio.sleep(0))
        assert not openssl_mapped(), "OpenSSL mapped"
        print("ok")
    """)


def test_what_needs_openssl_says_how_to_get_it() -> None:
    """Asking the stand-in for TLS fails at once with the reason and the fix; nothing is an SSLContext."""
    run("""
        import ssl
        for attempt in (lambda: ssl.create_default_context(), lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
                        lambda: ssl.SSLContext()):
            try:
                attempt()
            except (AttributeError, RuntimeError) as exc:
                assert "uses no TLS" in str(exc) and "MAPPER_LOAD_OPENSSL=1" in str(exc), exc
            else:
                raise AssertionError("the stand-in let a TLS call through")
        assert not hasattr(ssl, "PROTOCOL_TLS_CLIENT") and not isinstance(object(), ssl.SSLContext)
        assert not openssl_mapped()
        print("ok")
    """)


def test_opt_out_keeps_openssl() -> None:
    run("""
        assert loaded == (False, False)
        import ssl
        assert ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED
        assert openssl_mapped()
        print("ok")
    """, MAPPER_LOAD_OPENSSL="1")


def test_the_stand_in_is_never_put_over_the_real_ssl() -> None:
    import ssl

    from mapper import openssl

    assert not openssl.ssl_placeholder()
    assert not openssl.skip_hashlib_openssl()
    assert sys.modules["ssl"].create_default_context is ssl.create_default_context
