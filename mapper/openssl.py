"""Keep OpenSSL out of a `mapper run` whose config uses no TLS.

libcrypto is ~4.5 MiB of the mapper's resident memory (benchmarks `cost`, Pi workload: VmRSS
42.0 -> 37.5 MiB without it), and nothing in a plain mqtt:// mapper uses it. Two modules map it:

* `_hashlib` (hashlib, and hmac <- secrets <- pydantic): both fall back to CPython's own
  hash implementations when it is missing; the mapper only ever hashes with sha256.
* `_ssl`: asyncio, paho-mqtt and aiomqtt all import `ssl` at import time, TLS or not. A
  stand-in takes its place, holding only what they name outside a TLS path: exception
  classes in `except` clauses (which a plain socket never raises) and classes for isinstance
  checks (nothing is an instance of them). Anything else asked of it, or making one of its
  classes, raises an error that says why and what to do: loading the real module then could
  not mend what asyncio and paho bound to the stand-in at import time.

A process that needs OpenSSL without TLS to the broker (a third-party driver calling an HTTPS
API) sets MAPPER_LOAD_OPENSSL=1. Both must be in place before the modules that import them
(mapper/entry.py and cli.cmd_run); when anything imported them earlier, these are no-ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator

OPT_OUT = "MAPPER_LOAD_OPENSSL"
_WHY = (f"the ssl module is not loaded, as this mapper's config uses no TLS (mapper/openssl.py); "
        f"configure TLS for the broker or set {OPT_OUT}=1 to load it")
# CPython's own hash modules, which hashlib uses when _hashlib (OpenSSL) is missing.
_BUILTIN_HASHES = ("_md5", "_sha1", "_sha3", "_blake2")


def wanted() -> bool:
    """Whether this process was asked to load OpenSSL anyway."""
    return os.environ.get(OPT_OUT, "") not in ("", "0")


def skip_hashlib_openssl() -> bool:
    """Make hashlib and hmac use CPython's built-in hashes (when this build has all of them)."""
    if wanted() or "_hashlib" in sys.modules or "hashlib" in sys.modules or "hmac" in sys.modules:
        return False
    sha2 = ("_sha2",) if importlib.util.find_spec("_sha2") else ("_sha256", "_sha512")  # 3.12+, 3.11
    if not all(importlib.util.find_spec(name) for name in _BUILTIN_HASHES + sha2):
        return False
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # `import _hashlib` -> ImportError
    return True


class SslError(OSError):
    """Stands in for ssl.SSLError and its subclasses: never raised, as no TLS socket exists."""


class _NotLoaded(type):
    """The stand-ins' SSLContext, SSLSocket and SSLObject: isinstance() is False, making one fails."""

    def __call__(cls, *args: object, **kwargs: object) -> object:
        raise RuntimeError(f"ssl.{cls.__name__}: {_WHY}")


class _SslStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        raise AttributeError(f"ssl.{name}: {_WHY}")


def ssl_placeholder() -> bool:
    """Put the stand-in in place of `ssl`, unless asked not to or something already imported the real one."""
    if wanted() or "ssl" in sys.modules:
        return False
    module = _SslStandIn("ssl", "stand-in: no TLS in this mapper's config (mapper/openssl.py)")
    module.SSLError = module.CertificateError = SslError
    for name in ("SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError",
                 "SSLEOFError", "SSLCertVerificationError"):
        setattr(module, name, type(name, (SslError,), {}))
    for name in ("SSLContext", "SSLSocket", "SSLObject"):
        setattr(module, name, _NotLoaded(name, (), {}))
    sys.modules["ssl"] = module
    return True


def placeholder_active() -> bool:
    """Whether `ssl` in this process is the stand-in (ssl_placeholder), not OpenSSL."""
    return isinstance(sys.modules.get("ssl"), _SslStandIn)


class _InertContext:
    """An SSLContext made at import time (pymodbus's TLS client has one as a default argument): made
    while the stand-in lends its names, it fails at its first use, saying why."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"ssl.SSLContext.{name}: {_WHY}")


@contextlib.contextmanager
def import_time_names() -> Iterator[None]:
    """While a library that reads a few of ssl's names at import time is imported, the stand-in holds
    them, then they go again (what asks for them later fails as before). prometheus_client's
    exposition (mapper/metrics.py) has them in the default arguments and annotations of its TLS
    helpers, which the mapper never calls; pymodbus's TLS client (devices/drivers/modbus.py) makes an
    SSLContext as a default argument, which its TCP and serial clients never use. No-op with the real ssl."""
    module = sys.modules.get("ssl")
    if not isinstance(module, _SslStandIn):
        yield
        return
    names = {"PROTOCOL_TLS_CLIENT": 16, "PROTOCOL_TLS_SERVER": 17, "TLSVersion": _NotLoaded("TLSVersion", (), {})}
    for name, value in names.items():
        setattr(module, name, value)
    not_loaded = module.SSLContext
    module.SSLContext = _InertContext
    try:
        yield
    finally:
        module.SSLContext = not_loaded
        for name in names:
            delattr(module, name)
