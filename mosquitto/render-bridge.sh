#!/usr/bin/env bash
# Print bridge.conf for one Pi, with its client ids made unguessable.
#
#   mosquitto/render-bridge.sh pi-livingroom broker.example.com |
#     sudo install -m 0640 -o root -g mosquitto /dev/stdin /etc/mosquitto/conf.d/bridge.conf
#
# Fills @NODE@ (the mapper's node name), @CLOUD_HOST@ and @RANDOM@: 16 hex
# digits from `openssl rand -hex 8`, new at every run, the suffix of the
# bridge's client ids on both brokers. A user of either broker who knew a
# bridge client id could connect with it and throw the bridge off, wiping
# its subscriptions there (mosquitto/README.md, client ids). Leaves
# @BRIDGE_PASSWORD@ for sudoedit: a password never goes on a command line.
# The suffix reaches sed through a script on its standard input, not argv.
#
# Run it once per Pi and keep the file: a durable session is found again by
# its client id, so a new suffix starts new, empty sessions on both brokers.
set -euo pipefail

usage() { echo "usage: $0 NODE CLOUD_HOST [BRIDGE_CONF]" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 3 ] || usage
node=$1 host=$2 source=${3:-"$(dirname "$0")/bridge.conf"}
# The mapper's node names (devices/ids.py), and host names: nothing sed or a topic would read as syntax.
[[ $node =~ ^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$ ]] || { echo "$0: invalid node name: $node" >&2; exit 2; }
[[ $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || { echo "$0: invalid host name: $host" >&2; exit 2; }
random=$(openssl rand -hex 8)
[[ $random =~ ^[0-9a-f]{16}$ ]] || { echo "$0: openssl rand failed" >&2; exit 1; }
sed -f /dev/stdin "$source" <<SED
s/@NODE@/$node/g
s/@CLOUD_HOST@/$host/g
s/@RANDOM@/$random/g
SED
