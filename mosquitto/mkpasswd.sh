#!/usr/bin/env bash
# Create or update Mosquitto's password file for the given users.
#
#   sudo mosquitto/mkpasswd.sh mapper app                 # prompts for each
#   MOSQ_PASSWORD_MAPPER=... sudo -E mosquitto/mkpasswd.sh mapper
#   mosquitto/mkpasswd.sh -f ./passwd bridge worker app   # another file
#
# Password of user NAME: environment variable MOSQ_PASSWORD_<NAME> (NAME
# upper-cased, every character other than A-Z 0-9 turned into _), else a
# silent prompt (asked twice) on the terminal. Passwords are never accepted
# as command-line arguments: those end up in `ps` output and shell history.
# They reach mosquitto_passwd on its standard input for the same reason
# (its -b option would put them on its command line) and are never printed.
#
# Existing users not named keep their entries; named users are added or
# get their password replaced. The file ends up (an existing one before any
# hash is written) root:mosquitto 0640 when run
# as root on a system with a mosquitto group (the broker drops privileges to
# that user before it reads the file), else owned by the caller with 0600.
# A symbolic link given as the file is refused (see refuse_symlink).
set -euo pipefail

file=/etc/mosquitto/passwd
usage() { echo "usage: $0 [-f PASSWORD_FILE] USER..." >&2; exit 2; }
while getopts "f:h" opt; do
  case "$opt" in
    f) file=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
command -v mosquitto_passwd >/dev/null ||
  { echo "$0: mosquitto_passwd not found: sudo apt install mosquitto" >&2; exit 1; }

# Nothing created from here on is readable by others, not even for a moment.
umask 077

# A symbolic link at the file's path would carry the chown/chmod below, and mosquitto_passwd's
# write, to whatever it points to: one planted in a directory others can write (-f /tmp/passwd,
# say) would have root take over or open up any file. Checked before every step that touches the
# file; keep password files in a directory only root can write, which also closes the gap
# between a check and the step after it.
refuse_symlink() {
  if [ -L "$file" ]; then
    echo "$0: $file is a symbolic link (to $(readlink -- "$file")): refusing to follow it, since" \
      "chown, chmod and the new hashes would go to the file it points to; give that file's real path with -f" >&2
    exit 2
  fi
}
refuse_symlink

restrict() {  # the file's final owner and mode
  refuse_symlink
  if [ "$(id -u)" -eq 0 ] && getent group mosquitto >/dev/null; then
    chown -h root:mosquitto "$file"
    chmod 0640 "$file"
  else
    chmod 0600 "$file"
  fi
}
# An existing file that others can read (made by hand, say) is locked down before any new
# hash goes in, not after: a run that stops half-way (a user without a password) would
# otherwise leave the hashes it has already written readable by everyone.
[ ! -e "$file" ] || restrict

password_for() {  # $1 = user name; prints the password on stdout
  local var="MOSQ_PASSWORD_$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]' | tr -c 'A-Z0-9' '_')"
  local pw="${!var-}" again=""
  if [ -z "$pw" ]; then
    # A terminal we can actually open (not just a /dev/tty node), or give up.
    { : </dev/tty; } 2>/dev/null || { echo "$0: set $var or run on a terminal" >&2; return 1; }
    read -rs -p "Password for $1: " pw </dev/tty; echo >/dev/tty
    read -rs -p "Again: " again </dev/tty; echo >/dev/tty
    [ "$pw" = "$again" ] || { echo "$0: passwords for $1 differ" >&2; return 1; }
    [ -n "$pw" ] || { echo "$0: empty password for $1" >&2; return 1; }
  fi
  printf '%s' "$pw"
}

for user in "$@"; do
  case "$user" in
    *:* | *[[:space:]]* | "") echo "$0: invalid user name '$user'" >&2; exit 2 ;;
    */* | *+* | *#*) echo "$0: invalid user name '$user': '/', '+' and '#' would let an ACL pattern (%u in a topic) reach other topics" >&2; exit 2 ;;
  esac
  # -c creates (and would truncate) the file, so only when it does not exist.
  create=()
  [ -e "$file" ] || create=(-c)
  # Fetch first, so a missing password stops the script before the file is touched.
  pw=$(password_for "$user")
  refuse_symlink
  # printf is a shell builtin: the password is in no process's arguments.
  # mosquitto_passwd asks twice; its prompts on stdout mean nothing here.
  printf '%s\n%s\n' "$pw" "$pw" | mosquitto_passwd "${create[@]}" "$file" "$user" >/dev/null
done

restrict
echo "$file: updated $* (reload the broker: sudo systemctl reload mosquitto)" >&2
