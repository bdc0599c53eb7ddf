"""onnxruntime, imported with Microsoft's telemetry off.

Since 1.29 the official onnxruntime wheels for Linux send usage telemetry: at the first session
they start an uploader that looks up mobile.events.data.microsoft.com every few seconds (a
thread and a DNS query each time), and keep a device identifier and an offline event cache in
~/.cache/Microsoft/DeveloperTools/.onnxruntime/ (an SQLite file: more writes on a Pi's SD card).
An edge gateway must not talk to anyone its operator did not configure, so the mapper sets
`ORT_DISABLE_TELEMETRY=1` (onnxruntime's own switch, read once, when its environment is
created) before it imports onnxruntime, unless the variable is set already: an operator who
wants the telemetry sends it with `ORT_DISABLE_TELEMETRY=0`.
"""

from __future__ import annotations

import os
from types import ModuleType

TELEMETRY_SWITCH = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime() -> ModuleType:
    os.environ.setdefault(TELEMETRY_SWITCH, "1")
    import onnxruntime

    return onnxruntime
