"""Validated identifiers.

Device, namespace and property names end up as MQTT topic segments and SQLite keys,
so they are checked once, here, and everything downstream accepts only these types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Kubernetes object names (DNS-1123 subdomain) and namespaces (DNS-1123 label). Matched with
# fullmatch: `$` alone also matches before a final newline (`lamp\n` would pass).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# What Kubernetes takes (an RFC 1123 subdomain): each dot-separated part also starts and ends
# with a letter or digit. _NAME takes `a..b`, `a.-b` and `a-.b` too, which twins may hold: the
# loader warns about them (KubeEdge's API server refuses them) rather than refusing them.
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Property names: KubeEdge allows `/`, `#` and `,` too, but those break MQTT topics.
_PROPERTY = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,126})$")

NAME_RULE = "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
NAMESPACE_RULE = "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
PROPERTY_RULE = "letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 127 characters"


def is_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value))


def is_kubernetes_name(value: object) -> bool:
    """A name Kubernetes' API server takes for an object: a valid name whose dot-separated parts
    each start and end with a letter or digit (not `a..b`, `a.-b`, `a-.b`)."""
    return is_name(value) and bool(_SUBDOMAIN.fullmatch(value))


def is_namespace(value: object) -> bool:
    return isinstance(value, str) and bool(_NAMESPACE.fullmatch(value))


def is_property_name(value: object) -> bool:
    return isinstance(value, str) and bool(_PROPERTY.fullmatch(value))


def clipped(text: str, limit: int = 200) -> str:
    """`text` for a message or a log line: cut after `limit` characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: object, limit: int = 80) -> str:
    """`value` for an error message: its repr, cut after `limit` characters (a name may be any
    length when it comes from outside, and the message goes into logs and gRPC status details)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def check_name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"{shown(value)} is not a valid name: use {NAME_RULE}")
    return value


def check_namespace(value: str) -> str:
    if not is_namespace(value):
        raise ValueError(f"{shown(value)} is not a valid namespace: use {NAMESPACE_RULE}")
    return value


def check_property_name(value: str) -> str:
    if not is_property_name(value):
        raise ValueError(f"{shown(value)} is not a valid property name: use {PROPERTY_RULE}")
    return value


@dataclass(frozen=True, slots=True, order=True)
class DeviceId:
    """`namespace/name` of a device; both parts validated when built."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_name(self.name)

    @classmethod
    def parse(cls, text: str, default_namespace: str = "default") -> DeviceId:
        """Parse `namespace/name` or `name` (in `default_namespace`)."""
        if not isinstance(text, str):
            raise ValueError(f"device id must be a string, got {type(text).__name__}")
        namespace, sep, name = text.partition("/")
        if not sep:
            return cls(default_namespace, namespace)
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"
