#!/usr/bin/env bash
# Set up (if needed) and run the demo: a local Mosquitto with the shipped config, the mapper with
# simulated devices, a cloud worker for the offloaded inference, and a live view. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
