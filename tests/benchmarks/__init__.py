"""Benchmarks: what a reading costs, side by side with the raw limits of the same machine.

Run with ``python -m tests.benchmarks [--quick] [--json out.json] [--only NAME]``; see
docs/benchmarks.md. Nothing here asserts a time; tests/test_benchmarks_smoke.py runs one
tiny scenario for correctness only.
"""

from __future__ import annotations

import sys
from pathlib import Path

# tests/brokers.py, tests/helpers.py and tests/mapper_proc.py import each other as top-level
# modules (pytest puts tests/ on sys.path); do the same when run as `python -m tests.benchmarks`.
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
