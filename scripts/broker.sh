#!/usr/bin/env bash
# Set up (if needed) and run a local Mosquitto from the shipped mosquitto/mosquitto.conf, as you, from
# state/broker/ (passwords, ACL, persistence as shipped), and print how to connect. Ctrl-C stops it.
# Options: --port N (default: a free one), --node NAME (the config's node:), --state DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/broker.py "$@"
