"""Offload messages: what the mapper sends to a cloud worker and what it accepts back.

Request (mapper -> `<prefix>/<node>/offload/request`, QoS 1), JSON::

    {"v": 1, "id": "3f9c0a1b2c3d4e5f", "node": "pi-1", "device": "default/room-sensor",
     "pipeline": "default/room-sensor-faults", "model": "sensor-faults-early-exit",
     "cloud_sha256": "4dfa18f937b48a00", "created": 1718000000000, "audit": false,
     "enc": "int8", "n": 32, "payload": "<base64>"}

`payload` is the cut tensor: `int8` = a little-endian float32 scale followed by n int8
values (value = q * scale, symmetric, 4 + n bytes); `float16` = n little-endian float16
values (2n bytes). The cut of the shipped models is a ReLU output, so int8 keeps 127 levels.

Result (worker -> `<prefix>/<node>/offload/result`, QoS 1), JSON::

    {"v": 1, "id": "3f9c0a1b2c3d4e5f", "node": "pi-1", "model": "sensor-faults-early-exit",
     "created": 1718000000000, "logits": [0.1, -2.0, 3.2, 0.0, -1.0], "worker": "w-1",
     "ts": 1718000000042}

or, when the worker cannot serve the request, `{"v": 1, "id": ..., "node": ..., "model": ...,
"created": ..., "error": "unknown model"}`. The mapper computes the label and confidence from
`logits` itself. Anything else (extra keys, wrong types, non-finite numbers, wrong sizes) is
refused by `decode_result` with CodecError.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

VERSION = 1
Encoding = Literal["int8", "float16"]
ENCODINGS: tuple[str, ...] = ("int8", "float16")
REQUEST_ID = re.compile(r"[0-9a-f]{16}")  # fullmatch: `$` would also allow a trailing newline
MAX_MESSAGE = 16_384
MAX_CUT = 4_096
MAX_CLASSES = 1_024


class CodecError(ValueError):
    """A message that does not follow the format above (`reason` says which check failed)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


# -- the cut tensor ---------------------------------------------------------------------

def encode_cut(cut: np.ndarray, enc: Encoding = "int8") -> bytes:
    """The cut as the payload's bytes. int8 is plain Python on purpose: it runs once per
    offloaded window on cold caches, where half a dozen numpy calls on 32 floats cost ~10x more."""
    x = np.asarray(cut, dtype=np.float32).ravel()
    values = x.tolist()
    if not all(map(math.isfinite, values)):
        raise ValueError("the cut holds non-finite values")
    if enc == "float16":
        return x.astype("<f2").tobytes()
    if enc == "int8":
        peak = max(map(abs, values), default=0.0)
        scale = struct.unpack("<f", struct.pack("<f", peak / 127.0))[0] if peak > 0 else 1.0  # as sent
        q = [max(-127, min(127, round(v / scale))) for v in values]
        return struct.pack(f"<f{len(q)}b", scale, *q)
    raise ValueError(f"unknown encoding {enc!r}; expected one of {ENCODINGS}")


def decode_cut(blob: bytes, enc: str, n: int) -> np.ndarray:
    if enc == "float16":
        if len(blob) != 2 * n:
            raise CodecError("malformed", f"float16 cut of {n} values needs {2 * n} bytes, got {len(blob)}")
        x = np.frombuffer(blob, dtype="<f2").astype(np.float32)
    elif enc == "int8":
        if len(blob) != 4 + n:
            raise CodecError("malformed", f"int8 cut of {n} values needs {4 + n} bytes, got {len(blob)}")
        (scale,) = struct.unpack("<f", blob[:4])
        if not math.isfinite(scale) or scale <= 0:
            raise CodecError("malformed", "int8 scale must be a positive finite number")
        x = np.frombuffer(blob[4:], dtype=np.int8).astype(np.float32) * np.float32(scale)
    else:
        raise CodecError("malformed", f"unknown encoding {enc!r}")
    if not np.all(np.isfinite(x)):
        raise CodecError("malformed", "the cut holds non-finite values")
    return x


# -- requests ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OffloadRequest:
    id: str
    node: str
    device: str
    pipeline: str
    model: str
    cloud_sha256: str
    created: int
    audit: bool
    enc: str
    cut: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "id": self.id, "node": self.node, "device": self.device, "pipeline": self.pipeline,
                "model": self.model, "cloud_sha256": self.cloud_sha256, "created": self.created,
                "audit": self.audit, "enc": self.enc, "n": int(self.cut.size),
                "payload": base64.b64encode(encode_cut(self.cut, self.enc)).decode("ascii")}  # type: ignore[arg-type]


_REQUEST_KEYS = {"v": int, "id": str, "node": str, "device": str, "pipeline": str, "model": str,
                 "cloud_sha256": str, "created": int, "audit": bool, "enc": str, "n": int, "payload": str}


def _object(payload: bytes, keys: dict[str, type], optional: dict[str, type] | None = None) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE:
        raise CodecError("too_large", f"{len(payload)} bytes (at most {MAX_MESSAGE})")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CodecError("malformed", f"not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CodecError("malformed", "not a JSON object")
    optional = optional or {}
    unknown = set(body) - set(keys) - set(optional)
    if unknown:
        raise CodecError("malformed", f"unexpected keys {sorted(unknown)[:5]}")
    for key, kind in {**keys, **optional}.items():
        if key not in body:
            if key in keys:
                raise CodecError("malformed", f"missing {key!r}")
            continue
        value = body[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is bool:
            ok = isinstance(value, bool)
        if not ok:
            raise CodecError("malformed", f"{key!r} must be {kind.__name__}")
        if kind is str and len(value) > 256 and key != "payload":
            raise CodecError("malformed", f"{key!r} is too long")
    if body["v"] != VERSION:
        raise CodecError("malformed", f"version {body['v']} (this side speaks {VERSION})")
    if not REQUEST_ID.fullmatch(body["id"]):
        raise CodecError("malformed", "id must be 16 lower-case hex digits")
    if body["created"] < 0:
        raise CodecError("malformed", "created must be a time in ms")
    return body


def decode_request(payload: bytes) -> OffloadRequest:
    body = _object(payload, _REQUEST_KEYS)
    n = body["n"]
    if not 0 < n <= MAX_CUT:
        raise CodecError("malformed", f"n must be 1..{MAX_CUT}")
    try:
        blob = base64.b64decode(body["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise CodecError("malformed", "payload is not base64") from None
    cut = decode_cut(blob, body["enc"], n)
    return OffloadRequest(body["id"], body["node"], body["device"], body["pipeline"], body["model"],
                          body["cloud_sha256"], body["created"], body["audit"], body["enc"], cut)


# -- results ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OffloadResult:
    id: str
    node: str
    model: str
    created: int
    logits: tuple[float, ...] | None = None
    error: str | None = None
    worker: str | None = None
    ts: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"v": VERSION, "id": self.id, "node": self.node, "model": self.model,
                                "created": self.created}
        if self.error is not None:
            body["error"] = self.error
        else:
            body["logits"] = list(self.logits or ())
        if self.worker is not None:
            body["worker"] = self.worker
        if self.ts is not None:
            body["ts"] = self.ts
        return body


_RESULT_KEYS = {"v": int, "id": str, "node": str, "model": str, "created": int}
_RESULT_OPTIONAL = {"logits": list, "error": str, "worker": str, "ts": int}


def decode_result(payload: bytes, *, n_classes: int | None = None) -> OffloadResult:
    """Validate a result strictly; `n_classes` (when known) must match the logits' length."""
    body = _object(payload, _RESULT_KEYS, _RESULT_OPTIONAL)
    has_logits, has_error = "logits" in body, "error" in body
    if has_logits == has_error:
        raise CodecError("malformed", "exactly one of 'logits' and 'error' is required")
    logits = None
    if has_logits:
        raw = body["logits"]
        if not 2 <= len(raw) <= MAX_CLASSES:
            raise CodecError("malformed", f"logits must hold 2..{MAX_CLASSES} numbers")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in raw):
            raise CodecError("malformed", "logits must be finite numbers")
        if n_classes is not None and len(raw) != n_classes:
            raise CodecError("mismatch", f"{len(raw)} logits for a model with {n_classes} classes")
        logits = tuple(float(v) for v in raw)
    return OffloadResult(body["id"], body["node"], body["model"], body["created"], logits,
                         body.get("error"), body.get("worker"), body.get("ts"))
