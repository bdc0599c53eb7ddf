"""The demo: a local Mosquitto (shipped config), the mapper on simulated devices, a cloud worker, a live view.

Run it with `scripts/demo.sh` (which sets things up first). Ctrl-C stops everything;
`--duration SECONDS` stops by itself (used by the demo's own test).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from brokers import MosquittoBroker, die_with_parent, ensure_mosquitto_installed, write_secret  # noqa: E402

STATE = ROOT / "state" / "demo"
NODE = "demo-node"


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


def write_worker_config(broker: MosquittoBroker) -> Path:
    """The cloud worker, here on the local broker as user `worker` (a LAN box in real life)."""
    secret = STATE / "worker.password"
    write_secret(secret, broker.users["worker"])
    path = STATE / "worker.yaml"
    path.write_text(yaml.safe_dump({
        "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "username": "worker", "password_file": str(secret)},
        "models": ["sensor_faults"], "worker_id": "demo-worker"}, sort_keys=False))
    return path


def write_app_password(broker: MosquittoBroker) -> Path:
    """The password of user `app` (mosquitto/acl's example app), for the user's own mosquitto_sub/_pub,
    and their options files (STATE/mosquitto_sub, STATE/mosquitto_pub: read where XDG_CONFIG_HOME
    points), so that the printed commands never put the password on a command line (`ps` shows
    those to every local user). All owner-only from the moment they exist."""
    secret = STATE / "app.password"
    write_secret(secret, broker.users["app"])
    options = f"-h {broker.host}\n-p {broker.port}\n-u app\n-P {broker.users['app']}\n"
    for tool in ("mosquitto_sub", "mosquitto_pub"):
        write_secret(STATE / tool, options)
    return secret


def hints(broker: MosquittoBroker, secret: Path) -> list[str]:
    """What to try from another terminal while the demo runs (the README's "Use it" commands)."""
    options = f"XDG_CONFIG_HOME={STATE.relative_to(ROOT)}"  # its mosquitto_sub / mosquitto_pub options files
    return [
        "try, in another terminal (here, Ctrl-C stops the demo):",
        "  .venv/bin/mapper devices --config examples/demo.yaml",
        "  .venv/bin/mapper twin set fan-relay power false --config examples/demo.yaml",
        f"  {options} mosquitto_sub -v -t 'mapper/{NODE}/#'",
        f"  {options} mosquitto_pub -t mapper/{NODE}/default/fan-relay/power/set -m true",
    ]


def write_config(broker: MosquittoBroker) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    config["devices"] = [str((ROOT / "examples" / d).resolve()) for d in config["devices"]]
    config["twin"]["path"] = str(STATE / "twin.db")
    secret = STATE / "mapper.password"
    write_secret(secret, broker.users["mapper"])
    config["mqtt"] = {"url": f"mqtt://{broker.host}:{broker.port}", "username": "mapper",
                      "password_file": str(secret)}
    path = STATE / "mapper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A mapper process in a process group of its own: Ctrl-C reaches the demo alone, which stops
    the worker, then the mapper (it hands its last messages to the broker), then the broker. It
    still dies with the demo (PR_SET_PDEATHSIG) if the demo is killed."""
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "mapper", *args], stdout=handle, stderr=subprocess.STDOUT,
                                cwd=ROOT, process_group=0, preexec_fn=die_with_parent())  # noqa: PLW1509


class LiveView:
    """Subscribes like an app would (user `app`) and prints what arrives, compactly."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.seen: dict[str, int] = {}
        self.decisions: dict[str, int] = {}
        self.events: list[str] = []
        self.applied = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-view", protocol=mqtt.MQTTv5)
        self.client.username_pw_set("app", broker.users["app"])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, code, properties) -> None:  # noqa: ANN001
        client.subscribe([(f"mapper/{NODE}/#", 1), ("$hw/events/device/default/+/twin/update/#", 1)])

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        topic = message.topic
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = message.payload.decode(errors="replace")
        if topic.startswith("$hw/"):
            device = topic.split("/")[4]
            kind = topic.split("/", 6)[-1]
            if "delta" in kind:
                say(f"  twin   {device}: delta {json.dumps(body.get('delta'))}")  # as the protocol carries it
            elif kind.endswith("document"):
                for name, doc in body.get("twin", {}).items():
                    current = doc.get("current") or {}
                    desired = (current.get("expected") or {}).get("value")
                    reported = (current.get("actual") or {}).get("value")
                    say(f"  twin   {device}.{name}: desired={desired} reported={reported}")
                    if (device, name, desired, reported) == ("fan-relay", "power", "true", "true"):
                        self.applied.set()
            elif kind.endswith("result"):
                say(f"  twin   {device}: {kind} {('error ' + str(body['code'])) if 'code' in body else 'ok'}")
            return
        parts = topic.split("/")
        if len(parts) == 5 and parts[4] == "alert" and isinstance(body, dict):
            say(f"  alert  {parts[3]}: {body.get('label')} (on the alert topic)")
        elif len(parts) == 5 and parts[4] == "decision" and isinstance(body, dict):
            self.decisions[body.get("exit")] = self.decisions.get(body.get("exit"), 0) + 1
            how = "provisional, asked the worker" if body.get("provisional") else "final"
            say(f"  infer  {parts[3]}: {body.get('label')} ({body.get('exit')} exit, "
                f"confidence {body.get('confidence')}, {how})")
        elif len(parts) == 5 and isinstance(body, dict) and "value" in body:
            device, prop = parts[3], parts[4]
            self.seen[topic] = self.seen.get(topic, 0) + 1
            unit = f" {body['unit']}" if body.get("unit") else ""
            say(f"  data   {device}.{prop} = {body['value']}{unit}  (seq {body['seq']})")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: Ctrl-C)")
    args = parser.parse_args()
    STATE.mkdir(parents=True, exist_ok=True)
    # Private: it holds the broker passwords, the twin and the logs (mkdir made it 0755, for everyone).
    STATE.chmod(0o700)
    # One demo at a time per checkout: a second one would delete the first's live twin and
    # overwrite its logs and config. The lock goes with this process (its children do not inherit it).
    lock = (STATE / "demo.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        print(f"demo: another demo is running from this checkout (pid {owner}, state in "
              f"{STATE.relative_to(ROOT)}): stop it first (Ctrl-C in its terminal)", file=sys.stderr)
        return 1
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for old in STATE.glob("twin.db*"):
        old.unlink()
    ensure_mosquitto_installed()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    processes: list[subprocess.Popen[bytes]] = []
    with MosquittoBroker(node=NODE) as broker:  # the ACL rendered for NODE, as mosquitto/render.sh installs it
        say(f"mosquitto (shipped mosquitto/mosquitto.conf, auth + ACL for node {NODE}) on {broker.host}:{broker.port}")
        config = write_config(broker)
        view = LiveView(broker)
        try:
            worker = write_worker_config(broker)
            processes.append(start(["cloud-worker", "--config", str(worker)], STATE / "worker.log"))
            # Requests sent before the worker subscribed would wait for the mapper's resend (10 s).
            deadline = time.monotonic() + 30
            while (time.monotonic() < deadline and not stop.is_set()
                   and "subscribed to" not in (STATE / "worker.log").read_text(errors="replace")):
                stop.wait(0.1)
            say(f"cloud worker running (deep half of models/sensor_faults, log {(STATE / 'worker.log').relative_to(ROOT)})")
            processes.append(start(["run", "--config", str(config)], STATE / "mapper.log"))
            say(f"mapper running (config {config.relative_to(ROOT)}, log {(STATE / 'mapper.log').relative_to(ROOT)})")
            for line in hints(broker, write_app_password(broker)):
                say(line)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and not stop.is_set() and not view.seen:
                stop.wait(0.1)
            stop.wait(4)
            if not stop.is_set():
                say("app: set fan-relay.power = true over KubeEdge's twin protocol ($hw/.../twin/update)")
                view.client.publish("$hw/events/device/default/fan-relay/twin/update",
                                    json.dumps({"event_id": "demo-1", "twin": {"power": {"expected": {"value": "true"}}}}),
                                    qos=1)
                if view.applied.wait(10):
                    say("fan-relay: the desired value reached the driver and came back as reported")
            started = time.monotonic()
            while not stop.is_set() and (not args.duration or time.monotonic() - started < args.duration):
                stop.wait(0.2)
        finally:
            view.close()
            for process in processes:  # the worker first: no answer comes while the mapper stops
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
        devices = subprocess.run([sys.executable, "-m", "mapper", "devices", "--config", str(config)],
                                 capture_output=True, text=True, cwd=ROOT)
        print(devices.stdout, end="")
        twin = subprocess.run([sys.executable, "-m", "mapper", "twin", "get", "room-sensor", "--config", str(config)],
                              capture_output=True, text=True, cwd=ROOT)
        print(twin.stdout, end="")
        derived = subprocess.run([sys.executable, "-m", "mapper", "twin", "get", "room-sensor-faulty-sensor-faults",
                                  "--config", str(config)], capture_output=True, text=True, cwd=ROOT)
        print(derived.stdout, end="")
        if view.decisions:
            say("inference decisions seen: " + ", ".join(f"{n} at the {k} exit" for k, n in sorted(view.decisions.items())))
    say("demo stopped: mapper, worker and broker stopped; the twin stays in state/demo/twin.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
