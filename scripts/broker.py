"""A broker for trying the mapper on this machine: the shipped mosquitto/mosquitto.conf, unprivileged.

Run it with `scripts/broker.sh` (which sets things up first). The shipped config is written for an
install (/etc and /var paths, a TLS certificate, a pid file in /run, run as user `mosquitto`); this
renders it as the demo and the tests do (tests/brokers.py): its paths moved into a state directory
(`state/broker/`), a throwaway certificate for its TLS listener, run as yourself, on 127.0.0.1.
The passwords, the ACL (for `--node`), persistence and queue limits are the shipped ones. It writes
a password file for the mapper (user `mapper`) and for the ACL's example app (`app`), and the app's
mosquitto_sub/mosquitto_pub options files, all 0600; they are kept across runs, so a mapper config
naming them logs in again after a restart. Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from brokers import BrokerError, MosquittoBroker, ensure_mosquitto_installed, write_secret  # noqa: E402

LOOPBACK_LISTENER = 1883  # the shipped config's listener on 127.0.0.1 (its other one, 8883, has TLS)
CLIENTS = ("mapper", "app", "worker", "homeassistant")  # the password files written: the ACL's users a laptop runs


def default_node() -> str:
    """The mapper's own default (`node:` left out of its config): the ACL must name the same node."""
    try:
        from mapper.config import default_node as mappers
    except ImportError:  # (run outside the venv: the host's name, as the mapper takes it)
        import socket
        return socket.gethostname().split(".")[0].lower() or "edge-node"
    return mappers()


class Stopped(Exception):  # noqa: N818 - not an error: Ctrl-C or SIGTERM
    """Raised by the SIGINT and SIGTERM handler, out of the wait for the broker."""


def _stop(signum: int, frame: object) -> None:
    for stop in (signal.SIGINT, signal.SIGTERM):  # once: a second Ctrl-C must not cut the broker's stop short
        signal.signal(stop, signal.SIG_IGN)
    raise Stopped


def shown(path: Path) -> str:
    """A path as the user would type it from here."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None,
                        help="the port of the loopback listener (default: a free one, said at the start)")
    parser.add_argument("--node", default=None,
                        help="the node the ACL lets the app and the worker write to: the config's node: (default:"
                             " the mapper's default, this host's name)")
    parser.add_argument("--state", type=Path, default=ROOT / "state" / "broker",
                        help="where the rendered config, passwords, persistence and log go (default: state/broker)")
    args = parser.parse_args(argv)
    state = args.state.resolve()
    node = args.node or default_node()
    # The passwords and the broker's persistence are yours alone: a directory it makes is 0700; one
    # that is there already is not changed (`--state /tmp` must not close /tmp to everyone else) and
    # must be closed to others already.
    state.parent.mkdir(parents=True, exist_ok=True)
    try:
        state.mkdir(mode=0o700)
    except FileExistsError:
        if not state.is_dir():
            print(f"error: --state {shown(state)} is not a directory", file=sys.stderr)
            return 1
        if state.stat().st_mode & 0o077:
            print(f"error: --state {shown(state)} is open to other users (mode {state.stat().st_mode & 0o7777:o}), and"
                  " the broker's passwords would go there: give a new directory (it is made 0700), or `chmod 700` it",
                  file=sys.stderr)
            return 1
    lock = (state / "broker.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"error: another broker is running on {shown(state)} (pid {lock.read().strip() or '?'}): stop it, or"
              " give this one another --state", file=sys.stderr)
        return 1
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    kept = {user: (state / f"{user}.password").read_text() for user in CLIENTS
            if (state / f"{user}.password").is_file()}
    ensure_mosquitto_installed()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        broker = MosquittoBroker(node=node, workdir=state, passwords=kept,
                                 ports={LOOPBACK_LISTENER: args.port} if args.port is not None else None)
        with broker:
            url = f"mqtt://{broker.host}:{broker.port}"
            for user in CLIENTS:
                write_secret(state / f"{user}.password", broker.users[user])
            options = f"-h {broker.host}\n-p {broker.port}\n-u app\n-P {broker.users['app']}\n"
            for tool in ("mosquitto_sub", "mosquitto_pub"):
                write_secret(state / tool, options)
            xdg = f"XDG_CONFIG_HOME={shown(state)}"
            print(f"mosquitto (shipped mosquitto/mosquitto.conf: passwords, ACL for node {node}) on {url}\n"
                  f"  the mapper's config: node: {node}\n"
                  f"    mqtt: {{url: \"{url}\", username: mapper, password_file: {state / 'mapper.password'}}}\n"
                  f"  as the ACL's app (its login in the options files {shown(state)}/mosquitto_sub and mosquitto_pub):\n"
                  f"    {xdg} mosquitto_sub -v -t 'mapper/{node}/#'\n"
                  f"    {xdg} mosquitto_pub -t mapper/{node}/default/DEVICE/PROPERTY/set -m VALUE\n"
                  f"  a cloud worker: username: worker, password_file: {state / 'worker.password'}\n"
                  f"  Home Assistant's MQTT integration: username homeassistant, the password in"
                  f" {shown(state / 'homeassistant.password')}\n"
                  f"  TLS: 127.0.0.1:{broker.tls_port} (CA {shown(broker.ca_file)}); log: {shown(broker.log_path)}\n"
                  "Ctrl-C stops it.", flush=True)
            try:
                status = broker.wait()
            except Stopped:
                pass
            else:
                print(f"error: mosquitto exited ({status}); its log:\n{broker.log_tail()}", file=sys.stderr)
                return 1
    except Stopped:  # during the start
        return 0
    except BrokerError as exc:
        hint = (f" (is port {args.port} in use? give another --port, or none for a free one)"
                if args.port is not None and "Address already in use" in str(exc) else "")
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    print("broker stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
