#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# Two pytest-xdist workers: most tests wait on processes, brokers and timers, not on a CPU
# (13 min serially on a 2-core machine). Every test has its own ports and tmp_path; each worker
# takes whole files (--dist loadfile): tests/test_demo.py's two demos share the checkout's
# state/demo/. `scripts/test.sh -n 0` runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
