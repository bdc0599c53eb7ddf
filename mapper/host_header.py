"""The `Host` header of a request to a local HTTP listener (the REST API, the metrics endpoint):
whether it names this machine, against DNS rebinding.

A page of evil.example whose name then resolves to 127.0.0.1 is same-origin with whatever listens
there, so it may read the answers; its requests still carry `Host: evil.example`. A request naming
an IP address (with its port; IPv6 in brackets) or `localhost` is taken, and any name the listener
allows besides."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def host_name(header: str) -> str:
    """The host a `Host` header names, without its port, lower case, no trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):  # [IPv6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def names_this_machine(header: str, allowed: Iterable[str] = ()) -> bool:
    """Whether a (non-empty) `Host` header names this machine: an IP address, `localhost`, or one of
    `allowed` (names the listener's settings give)."""
    name = host_name(header)
    if name == "localhost" or name in {a.lower().rstrip(".") for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
