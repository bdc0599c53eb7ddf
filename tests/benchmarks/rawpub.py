"""The raw baseline: one paho-mqtt client publishing the mapper's telemetry payloads, nothing else.

    python -m tests.benchmarks.rawpub --port P --password-file F --mode burst --count 100000 --window 100
    python -m tests.benchmarks.rawpub ... --mode rate --rate 1000 --duration 10
    python -m tests.benchmarks.rawpub ... --mode rate --rate 1000 --exact --ticks
    python -m tests.benchmarks.rawpub ... --mode rate --rate 1000 --exact --durable /tmp/raw.db
    python -m tests.benchmarks.rawpub ... --mode pi --duration 60        # 20 values/s
    python -m tests.benchmarks.rawpub ... --mode connect                 # connect and exit

Payloads are what the mapper publishes for a counter property: {"value", "ts", "seq"} encoded
once per message with orjson, on `mapper/bench/default/d<N>/p0`, QoS 1. Prints one JSON line.

`--ticks`: readings come in ticks of one per device (10 devices at 1,000/s: a tick every 10 ms,
all taken at the tick, like the mapper's latency scenario, where devices on the same cycle wake
together) and each tick is handed to paho at once: the same rate as `--mode rate` alone, which
spaces the messages evenly, in the mapper's pattern. Each payload also carries its tick's
index (`tick`), so the pattern can be checked without timing the arrivals.

`--durable` is a plain durable script: the same ticks, but each is committed to an SQLite table
(WAL, synchronous FULL: one fsync per tick) in the publishing thread, and only then handed to
paho (whose network thread sends, as in the other modes). No event loop, no outbox.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
import threading
import time

import orjson
import paho.mqtt.client as mqtt

TOPIC = "mapper/bench/default/d{}/p0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="mapper")
    p.add_argument("--password-file", required=True)
    p.add_argument("--mode", choices=["burst", "rate", "pi", "connect"], required=True)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="the mapper's default is MQTT 5")
    p.add_argument("--exact", action="store_true", help="also put the exact send time in the payload (`t`)")
    p.add_argument("--durable", metavar="DB", help="rate mode: commit each tick of readings to this SQLite file "
                   "(WAL, synchronous FULL) before publishing it; `t` is then the time the reading was taken")
    p.add_argument("--ticks", action="store_true", help="rate mode: a tick of one reading per device every "
                   "devices/rate seconds, published at once (`t` = the time the tick's readings were taken)")
    args = p.parse_args(argv)
    if (args.durable or args.ticks) and args.mode != "rate":
        p.error("--durable and --ticks go with --mode rate")
    if args.host != "127.0.0.1":
        raise SystemExit("benchmarks only talk to 127.0.0.1")
    t0 = time.monotonic()

    # paho keeps `--window` QoS 1 messages in flight and queues the rest; the publishing thread
    # only waits (coarsely) when more than HIGH are outstanding, so there is no per-message hand-off.
    high, low = max(5_000, 10 * args.window), max(2_500, 5 * args.window)
    lock = threading.Lock()
    room = threading.Event()
    room.set()
    acks = 0
    all_acked = threading.Event()
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rawpub-{time.time_ns()}",
                         protocol=mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311)
    client.username_pw_set(args.user, open(args.password_file).read().strip())  # noqa: PTH123, SIM115
    client.max_inflight_messages_set(args.window)
    client.max_queued_messages_set(0)
    client.on_connect = lambda c, u, f, rc, props: connected.set() if not rc.is_failure else None

    def on_publish(c, u, mid, rc, props) -> None:  # noqa: ANN001
        nonlocal acks
        with lock:
            acks += 1
            if sent - acks <= low:
                room.set()
            if finished and acks >= sent:
                all_acked.set()

    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    if args.mode == "connect":
        print(orjson.dumps({"connected_s": time.monotonic() - t0}).decode())
        client.disconnect()
        client.loop_stop()
        return 0

    seqs = [0] * args.devices
    sent = 0
    finished = False

    def publish(i: int, taken_ns: int | None = None, tick: int | None = None) -> None:
        nonlocal sent
        d = i % args.devices
        seqs[d] += 1
        now = time.time_ns() if taken_ns is None else taken_ns
        body = {"value": seqs[d], "ts": now // 1_000_000, "seq": seqs[d]}
        if args.exact:
            body["t"] = now / 1e9
        if tick is not None:
            body["tick"] = tick
        if sent - acks >= high:
            room.clear()
            if sent - acks >= high:
                room.wait(30)
        with lock:
            sent += 1
        client.publish(TOPIC.format(d), orjson.dumps(body), qos=1)

    start = time.monotonic()
    if args.mode == "burst":
        for i in range(args.count):
            publish(i)
    elif args.mode == "rate" and (args.durable or args.ticks):
        tick_s = args.devices / args.rate
        db = None
        if args.durable:
            db = sqlite3.connect(args.durable, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL,"
                       " property TEXT NOT NULL, value TEXT, ts INTEGER NOT NULL, quality TEXT NOT NULL)")
        for tick in range(int(args.duration / tick_s)):
            delay = start + tick * tick_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            taken = [time.time_ns() for _ in range(args.devices)]
            if db is not None:
                db.execute("BEGIN")
                db.executemany("INSERT INTO readings (device_id, property, value, ts, quality) VALUES (?,?,?,?,?)",
                               [(f"default/d{d}", "p0", str(t), t // 1_000_000, "good") for d, t in enumerate(taken)])
                db.execute("COMMIT")
            for d, t in enumerate(taken):
                publish(tick * args.devices + d, t, tick if args.ticks else None)
        if db is not None:
            db.close()
    elif args.mode == "rate":
        total = int(args.rate * args.duration)
        for i in range(total):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publish(i)
    else:  # pi: 20 values every second, like 20 sensors read at 1 Hz, on whole seconds of the
        # monotonic clock like the mapper's ticks (mapper/ticks.py), so that a window measured
        # between half seconds holds as many rounds for both
        second = 0
        while time.monotonic() - start < args.duration:
            for j in range(20):
                publish(second * 20 + j)
            second += 1
            now = time.monotonic()
            time.sleep(math.floor(now) + 1 - now)
    with lock:
        finished = True
        if acks >= sent:
            all_acked.set()
    all_acked.wait(60)
    elapsed = time.monotonic() - start
    client.disconnect()
    client.loop_stop()
    print(orjson.dumps({"sent": sent, "elapsed_s": elapsed, "rate": sent / elapsed}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
