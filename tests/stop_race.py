"""Can a stop be swallowed? Stops timed at random moments of the MQTT connect, against a real Mosquitto.

Python 3.11's asyncio.wait_for (aiomqtt's wait for the CONNACK) drops a cancel that comes while the
CONNACK it waits for is being handed over; the task then goes on connected and its stop never ends.
Two ways to look for it, each counting the stops that did not end within a bound:

    .venv/bin/python tests/stop_race.py tasks --runs 2000      # in-process: a task group with the
        # bus (as EventBusExtension.run has it), or the cloud worker, cancelled at a random moment
        # of its first connect (the moment spread over the measured connect time)
    .venv/bin/python tests/stop_race.py processes --runs 50    # `mapper run` processes, SIGTERM at a
        # random moment of their start (before, while and after the broker's CONNACK)

Not part of the suite (it is a count, not a verdict); tests/test_mqtt_connection.py
test_a_stop_that_comes_with_the_connack_ends_the_connection_task makes the race on cue.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from brokers import MosquittoBroker, ensure_mosquitto_installed  # noqa: E402


async def _nothing(*_args: object) -> None:
    return None


def _connection_task(who: str, broker: MosquittoBroker, secret: Path, n: int):  # noqa: ANN202
    """(the coroutine to run, the event set once connected, the bus's task inside the task group)."""
    from eventbus.bus import MqttBus
    from eventbus.settings import MqttSettings

    user = "mapper" if who == "bus" else "worker"
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username=user, password_file=secret / user,
                            reconnect_min_s=5, reconnect_max_s=10)
    if who == "bus":
        bus = MqttBus(settings, client_id=f"race-{n}", will_topic="mapper/test-node/availability",
                      subscriptions=[("mapper/test-node/+/+/+/set", 1)], on_message=_nothing, on_connect=_nothing)

        async def in_a_task_group() -> None:  # as EventBusExtension.run: the group's cancel reaches the bus
            async with asyncio.TaskGroup() as tg:
                inner.append(tg.create_task(bus.run()))

        inner: list[asyncio.Task] = []
        return in_a_task_group(), bus.connected, inner
    from mapper.inference.worker import CloudWorker, WorkerSettings

    worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id=f"race-{n}"))
    return worker.run(), worker.ready, []


async def _tasks(who: str, runs: int, bound_s: float) -> None:
    ensure_mosquitto_installed()
    with MosquittoBroker("mosquitto.conf") as broker, tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp)
        for user in ("mapper", "worker"):
            (secret / user).write_text(broker.users[user])
        loop = asyncio.get_running_loop()
        connect_s = []
        for n in range(5):  # how long a connect takes here (to CONNACK and SUBACK): the stops spread over it
            run, connected, _ = _connection_task(who, broker, secret, n)
            task, began = asyncio.create_task(run), loop.time()
            await connected.wait()
            connect_s.append(loop.time() - began)
            task.cancel()
            await asyncio.wait({task})
        spread = 1.5 * max(connect_s)
        hung = ended = 0
        for n in range(runs):
            run, _, inner = _connection_task(who, broker, secret, n)
            task = asyncio.create_task(run)
            loop.call_later(random.uniform(0, spread), task.cancel)
            done, _ = await asyncio.wait({task}, timeout=spread + bound_s)
            if task in done:
                ended += 1
                continue
            hung += 1
            # Ended now, to go on: a cancel of the task again does not reach the bus (a task group
            # cancels its tasks once), the bus's own task is cancelled.
            while not task.done():
                for each in (*inner, task):
                    each.cancel()
                await asyncio.wait({task}, timeout=1)
            print(f"  run {n}: the stop did not end it", file=sys.stderr, flush=True)
        print(f"{who}: {runs} stops spread over {spread * 1000:.1f} ms of the connect (it took"
              f" {min(connect_s) * 1000:.1f}-{max(connect_s) * 1000:.1f} ms): {ended} ended within {bound_s:g} s,"
              f" {hung} did not (their cancel dropped)", flush=True)


def _processes(runs: int, bound_s: float) -> None:
    from helpers import write_config, write_devices
    from mapper_proc import mqtt_block

    ensure_mosquitto_installed()
    repo = Path(__file__).resolve().parents[1]
    with MosquittoBroker("mosquitto.conf") as broker, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        devices = write_devices(tmp_path / "dev", ["a", "b", "c"], cycle=10)
        config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db",
                              extra=mqtt_block(broker, tmp_path))
        log = tmp_path / "mapper.log"
        # When the CONNACK comes after the start, measured on a few runs: the SIGTERMs spread around it.
        connected_at = []
        hung = 0
        for n in range(runs):
            with log.open("wb") as out:
                began = time.monotonic()
                proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=repo,
                                        stdout=out, stderr=subprocess.STDOUT)
                if n < 3:
                    while b"connected to mqtt://" not in log.read_bytes():
                        if proc.poll() is not None:
                            raise SystemExit(f"the mapper ended at start:\n{log.read_text()}")
                        time.sleep(0.005)
                    connected_at.append(time.monotonic() - began)
                    when = None
                else:
                    at = sum(connected_at) / len(connected_at)
                    when = random.uniform(0.8 * at, 1.1 * at)
                    time.sleep(max(0.0, when - (time.monotonic() - began)))
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=bound_s)
                except subprocess.TimeoutExpired:
                    hung += 1
                    at_text = "once connected" if when is None else f"{when:.3f} s after the start"
                    print(f"run {n}: SIGTERM {at_text} did not end the mapper within {bound_s:g} s;"
                          f" its log:\n{log.read_text()[-3000:]}")
                    proc.kill()
                    proc.wait()
        print(f"`mapper run`: {runs} starts, SIGTERM around the CONNACK (connected {min(connected_at):.2f}-"
              f"{max(connected_at):.2f} s after the start): {runs - hung} ended within {bound_s:g} s, {hung} did not")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["tasks", "processes"])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--who", choices=["bus", "cloud worker", "both"], default="both")
    parser.add_argument("--bound-s", type=float, default=None,
                        help="a stop must end within this (tasks: 2, processes: 30)")
    args = parser.parse_args()
    if args.what == "tasks":
        for who in (["bus", "cloud worker"] if args.who == "both" else [args.who]):
            asyncio.run(_tasks(who, args.runs, args.bound_s or 2.0))
    else:
        _processes(args.runs, args.bound_s or 30.0)


if __name__ == "__main__":
    main()
