"""The benchmark harness, run tiny, for correctness only: no time is asserted here.

200 readings go the whole way (simulated devices -> twin -> outbox -> QoS 1 -> PUBACK -> outbox
cleared) to a mosquitto_sub process; every one arrives and the outbox is empty after a clean stop.
The benchmarks themselves run with `python -m tests.benchmarks` (docs/benchmarks.md).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from benchmarks.common import Metric
from benchmarks.scenarios import Context, Plan, smoke, telemetry


@pytest.mark.timeout(60)
def test_two_hundred_readings_end_to_end(broker, tmp_path: Path) -> None:
    result = smoke(broker, tmp_path, readings=200)
    assert result["exit_code"] == 0
    assert result["committed"] >= 200
    assert result["lost"] == 0, result
    assert result["received"] == result["committed"], result
    assert result["outbox_depth"] == 0, result


@pytest.mark.timeout(60)
def test_raw_durable_baseline_publishes_exactly_what_it_committed(broker, tmp_path: Path) -> None:
    """The latency scenario's `raw durable` script: every reading it publishes is a row it committed."""
    ctx = Context(broker, Plan.make(True), tmp_path)
    db = tmp_path / "raw-durable.db"
    sub = ctx.subscriber("raw-durable")
    try:
        out = ctx.rawpub("--mode", "rate", "--rate", "1000", "--duration", "0.3", "--exact", "--durable", str(db))
        deadline = time.monotonic() + 10
        while len(telemetry(sub.arrivals())) < out["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.stop()
    with sqlite3.connect(db) as conn:
        committed = [int(v) / 1e9 for (v,) in conn.execute("SELECT value FROM readings")]
    published = [a.t for a in telemetry(sub.arrivals())]
    assert out["sent"] == len(committed) == 300
    assert sorted(published) == sorted(committed)


@pytest.mark.timeout(60)
def test_raw_ticks_baseline_publishes_in_the_mappers_pattern(broker, tmp_path: Path) -> None:
    """`--ticks`: the same rate, but 10 readings taken together every 10 ms (as 10 devices on a
    10 ms cycle are), where `--mode rate` alone spaces them 1 ms apart. (A pattern, not a speed:
    evenly spaced readings would make one long run here.)"""
    ctx = Context(broker, Plan.make(True), tmp_path)

    sub = ctx.subscriber("raw-ticks")
    try:
        out = ctx.rawpub("--mode", "rate", "--rate", "1000", "--duration", "0.3", "--exact", "--ticks")
        deadline = time.monotonic() + 10
        while len(telemetry(sub.arrivals())) < out["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.stop()
    arrivals = telemetry(sub.arrivals())
    assert len(arrivals) == 300
    # Whole ticks of one reading per device, 30 of them (the tick each reading was taken in is in
    # its payload: grouping by arrival gaps would depend on the machine's timing).
    ticks: dict[int | None, list[str]] = {}
    for a in arrivals:
        ticks.setdefault(a.tick, []).append(a.topic)
    assert set(ticks) == set(range(30)), set(ticks)
    devices = sorted(f"mapper/bench/default/d{d}/p0" for d in range(10))
    assert all(sorted(topics) == devices for topics in ticks.values()), ticks


def test_summary_reports_median_and_spread() -> None:
    m = Metric("x", "1/s", values=[3.0, 1.0, 2.0], baseline=[4.0, 4.0])
    s = m.summary(m.values)
    assert s is not None and (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert m.ratio() == 0.5  # not paired (two baseline runs for three): the ratio of the medians
    # Paired runs: each run against its own baseline, then the median (not median / median).
    paired = Metric("twin", "1/s", values=[120.0, 90.0, 120.0], baseline=[270.0, 189.0, 220.0])
    assert paired.run_ratios() == pytest.approx([120 / 270, 90 / 189, 120 / 220])
    assert paired.ratio() == pytest.approx(90 / 189)  # the median ratio; median/median would say 120/220


def test_latency_plot_takes_the_median_of_each_quantile_over_the_runs() -> None:
    """The plot's data: per series, the median over the runs of each quantile; a JSON without
    quantiles (an older run) is refused with the command that makes one."""
    from benchmarks.plot import latency_series

    run = {"scenarios": [{"name": "latency", "details": [
        {"quantiles": [0.5, 0.99], "quantiles_ms": {"mapper": [1.0, 2.0], "raw": [0.1, 0.3]}},
        {"quantiles": [0.5, 0.99], "quantiles_ms": {"mapper": [3.0, 6.0], "raw": [0.2, 0.2]}},
        {"quantiles": [0.5, 0.99], "quantiles_ms": {"mapper": [2.0, 9.0], "raw": [0.3, 0.4]}},
    ]}]}
    quantiles, series = latency_series(run)
    assert quantiles == [0.5, 0.99]
    assert series == {"mapper": [2.0, 6.0], "raw": [0.2, 0.3]}
    with pytest.raises(SystemExit, match="--only latency --json"):
        latency_series({"scenarios": [{"name": "latency", "details": [{"run": 0}]}]})


def test_summary_puts_runs_side_by_side(tmp_path: Path) -> None:
    """`python -m tests.benchmarks.summary`: a figure per row, a run per column, read from each
    run's JSON; a figure a run lacks shows as `-`."""
    import orjson

    from benchmarks.summary import table

    def run(ratio: float, lost: int | None) -> dict:
        metrics = [{"name": "delivered readings/s", "ratio": ratio, "summary": {"median": 1.0}}]
        scenarios = [{"name": "throughput", "metrics": metrics}]
        if lost is not None:
            scenarios.append({"name": "recovery", "metrics": [{"name": "readings lost", "summary": {"median": lost}}]})
        return {"machine": {"cpu": "AMD EPYC 7B13"}, "commit": "0123456789abcdef+changes", "scenarios": scenarios}

    a, b = tmp_path / "benchmarks-a.json", tmp_path / "benchmarks-b.json"
    a.write_bytes(orjson.dumps(run(1.234, 0)))
    b.write_bytes(orjson.dumps(run(0.5, None)))
    lines = table([a, b]).splitlines()
    assert lines[0] == ("| figure | [a](docs/benchmarks-a.json) (AMD EPYC, 0123456+changes) | "
                        "[b](docs/benchmarks-b.json) (AMD EPYC, 0123456+changes) |")
    assert "| throughput | 1.23x | 0.50x |" in lines
    assert "| lost in outage | 0 | - |" in lines
