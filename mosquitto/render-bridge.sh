#!/usr/bin/env bash
# Render bridge.conf for one Pi, with its client ids made unguessable.
#
#   sudo mosquitto/render-bridge.sh -o /etc/mosquitto/conf.d/bridge.conf -g mosquitto \
#     pi-livingroom broker.example.com
#
# -o OUTPUT: write OUTPUT (mode 0640; group GROUP with -g) through a temporary
# file in its directory, renamed over OUTPUT only once the whole file is
# written: a failing run (an invalid name, no openssl) leaves an existing
# OUTPUT as it was. (Piped into `install ... /dev/stdin`, a failure installed
# an empty file over the bridge, and the pipeline still exited 0.) Without
# -o, the file goes to standard output.
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

usage() { echo "usage: $0 [-o OUTPUT [-g GROUP]] NODE CLOUD_HOST [BRIDGE_CONF]" >&2; exit 2; }
output="" group=""
while getopts "o:g:" opt; do
  case $opt in
    o) output=$OPTARG ;;
    g) group=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] && [ $# -le 3 ] || usage
[ -z "$group" ] || [ -n "$output" ] || usage
node=$1 host=$2 source=${3:-"$(dirname "$0")/bridge.conf"}
# The mapper's node names (devices/ids.py), and host names: nothing sed or a topic would read as syntax.
[[ $node =~ ^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$ ]] || { echo "$0: invalid node name: $node" >&2; exit 2; }
[[ $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || { echo "$0: invalid host name: $host" >&2; exit 2; }
random=$(openssl rand -hex 8) || random=""  # (set -e would exit without a word)
[[ $random =~ ^[0-9a-f]{16}$ ]] || { echo "$0: openssl rand failed" >&2; exit 1; }
render() {
  sed -f /dev/stdin "$source" <<SED
s/@NODE@/$node/g
s/@CLOUD_HOST@/$host/g
s/@RANDOM@/$random/g
SED
}
if [ -z "$output" ]; then
  render
  exit 0
fi
# A directory (conf.d/): mv would put the file inside it, under the temporary name Mosquitto ignores.
[ ! -d "$output" ] || { echo "$0: $output is a directory: give the file, e.g. $output/bridge.conf" >&2; exit 2; }
# The temporary file is made 0600 (mktemp), in OUTPUT's directory so that the rename is atomic;
# its name does not end in .conf, which Mosquitto's include_dir would read.
tmp=$(mktemp "$(dirname "$output")/.$(basename "$output").XXXXXX")
trap 'rm -f "$tmp"' EXIT
render >"$tmp"
[ -s "$tmp" ] || { echo "$0: rendered nothing from $source" >&2; exit 1; }
[ -z "$group" ] || chgrp "$group" "$tmp"
chmod 0640 "$tmp"
mv -fT "$tmp" "$output"
trap - EXIT
