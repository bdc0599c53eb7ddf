#!/usr/bin/env bash
# Render a shipped Mosquitto file for one Pi: the ACL and the bridge.
#
#   sudo mosquitto/render.sh -o /etc/mosquitto/acl -g mosquitto acl pi-livingroom
#   sudo mosquitto/render.sh -o /etc/mosquitto/conf.d/bridge.conf -g mosquitto \
#     bridge.conf pi-livingroom broker.example.com
#
# FILE: `acl` or `bridge.conf`, the file of that name next to this script; a
# path (with a `/`) is taken as given.
#
# -o OUTPUT: write OUTPUT (mode 0640; group GROUP with -g) through a temporary
# file in its directory, renamed over OUTPUT only once the whole file is
# written: a failing run (an invalid name, no openssl) leaves an existing
# OUTPUT as it was. (Piped into `install ... /dev/stdin`, a failure installed
# an empty file over the bridge, and the pipeline still exited 0.) Without
# -o, the file goes to standard output.
#
# Fills @NODE@ (the mapper's node name) in both, and @HA_NODE@ (the same as
# Home Assistant's discovery topics write it) in the ACL: the ACL grants writes only
# on this node's topics (see acl). In bridge.conf also @CLOUD_HOST@, which
# CLOUD_HOST gives (a file without it takes no CLOUD_HOST), and @RANDOM@: 16
# hex digits from `openssl rand -hex 8`, new at every run, the suffix of the
# bridge's client ids on both brokers. A user of either broker who knew a
# bridge client id could connect with it and throw the bridge off, wiping
# its subscriptions there (mosquitto/README.md, client ids). Leaves
# @BRIDGE_PASSWORD@ for sudoedit: a password never goes on a command line.
# The values reach sed through a script on its standard input, not argv.
#
# Render bridge.conf once per Pi and keep the file: a durable session is
# found again by its client id, so a new suffix starts new, empty sessions on
# both brokers. The ACL may be rendered again at any time (after editing
# mosquitto/acl); then `sudo systemctl reload mosquitto`.
set -euo pipefail

usage() {
  echo "usage: $0 [-o OUTPUT [-g GROUP]] acl NODE" >&2
  echo "       $0 [-o OUTPUT [-g GROUP]] bridge.conf NODE CLOUD_HOST" >&2
  exit 2
}
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
source=$1 node=$2 host=${3:-}
[[ $source == */* ]] || source="$(dirname "$0")/$source"
[ -f "$source" ] && [ -r "$source" ] || { echo "$0: cannot read $source" >&2; exit 2; }
# A file with @CLOUD_HOST@ (bridge.conf) needs CLOUD_HOST; one without (acl) takes none.
if grep -q "@CLOUD_HOST@" "$source"; then [ -n "$host" ] || usage; else [ -z "$host" ] || usage; fi
# The mapper's node names (devices/ids.py), and host names: nothing sed or a topic would read as syntax.
[[ $node =~ ^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$ ]] || { echo "$0: invalid node name: $node" >&2; exit 2; }
[ -z "$host" ] || [[ $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] \
  || { echo "$0: invalid host name: $host" >&2; exit 2; }
# @HA_NODE@: the node as Home Assistant's discovery topics name it (eventbus/topics.py, ha_id): as it
# is, unless it has a `.`, then with `_` for each `.` and 8 hex digits of its sha256.
ha_node=$node
if [[ ! $node =~ ^[A-Za-z0-9_-]+$ ]]; then
  digest=$(printf %s "$node" | sha256sum) || { echo "$0: sha256sum failed" >&2; exit 1; }
  ha_node="${node//[^A-Za-z0-9_-]/_}_${digest:0:8}"
fi
random=""
if grep -q "@RANDOM@" "$source"; then
  random=$(openssl rand -hex 8) || random=""  # (set -e would exit without a word)
  [[ $random =~ ^[0-9a-f]{16}$ ]] || { echo "$0: openssl rand failed" >&2; exit 1; }
fi
render() {
  sed -f /dev/stdin "$source" <<SED
s/@NODE@/$node/g
s/@HA_NODE@/$ha_node/g
s/@CLOUD_HOST@/$host/g
s/@RANDOM@/$random/g
SED
}
if [ -z "$output" ]; then
  render
  exit 0
fi
# A directory (conf.d/): mv would put the file inside it, under the temporary name Mosquitto ignores.
[ ! -d "$output" ] || { echo "$0: $output is a directory: give the file, e.g. $output/$(basename "$source")" >&2; exit 2; }
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
