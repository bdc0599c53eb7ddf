"""Keep OpenSSL out of a `mapper run` whose config uses no TLS.

libcrypto is ~4.5 MiB of the mapper's resident memory (benchmarks `cost`, Pi workload: VmRSS
42.0 -> 37.5 MiB without it), and nothing in a plain mqtt:// mapper uses it. Two modules map it:

* `_hashlib` (hashlib, and hmac <- secrets <- pydantic): both fall back to CPython's own
  hash implementations when it is missing; the mapper only ever hashes with sha256.
* `_ssl`: asyncio, paho-mqtt and aiomqtt all import `ssl` at import time, TLS or not. A
  stand-in takes its place, holding only what they name outside a TLS path: exception
  classes in `except` clauses (which a plain socket never raises) and classes for isinstance
  checks. Anything else asked of it loads the real `ssl` there and then, into the same module
  object, so a library that needs more than that still works; it only costs the memory again
  (`real_ssl_loaded_by` says who asked, and the mapper logs it).

Both must be in place before the modules that import them (mapper/entry.py and cli.cmd_run);
when anything imported them earlier, these are no-ops.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# What asked the stand-in for something it does not have (the real ssl was loaded then).
real_ssl_loaded_by: str | None = None


def skip_hashlib_openssl() -> bool:
    """Make hashlib and hmac use CPython's built-in hashes (when this build has them)."""
    if "_hashlib" in sys.modules or "hashlib" in sys.modules or "hmac" in sys.modules:
        return False
    if not any(importlib.util.find_spec(name) for name in ("_sha2", "_sha256")):  # 3.12+, 3.11
        return False
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # `import _hashlib` -> ImportError
    return True


class SslError(OSError):
    """Stands in for ssl.SSLError and its subclasses until the real module is loaded."""


class _SslStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # import machinery and introspection probing: not a use of ssl
            raise AttributeError(name)
        global real_ssl_loaded_by
        real_ssl_loaded_by = f"ssl.{name}"
        # Load the real module under its name, then make this object it: modules that imported
        # the stand-in see the real classes and functions from now on.
        del sys.modules["ssl"]
        try:
            real = importlib.import_module("ssl")
        finally:
            sys.modules["ssl"] = self
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def ssl_placeholder() -> bool:
    """Put the stand-in in place of `ssl`, unless something already imported the real one."""
    if "ssl" in sys.modules:
        return False
    module = _SslStandIn("ssl", "stand-in: no TLS in this mapper's config (mapper/openssl.py)")
    module.SSLError = module.CertificateError = SslError
    for name in ("SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError",
                 "SSLEOFError", "SSLCertVerificationError"):
        setattr(module, name, type(name, (SslError,), {}))
    for name in ("SSLContext", "SSLSocket", "SSLObject"):
        setattr(module, name, type(name, (), {}))
    sys.modules["ssl"] = module
    return True
