"""The headline figures of several benchmark runs side by side: `python -m tests.benchmarks.summary RUN.json...`.

A markdown table, a column per run (the README's table of runs is its output): each ratio is the run's
own median of per-run ratios, so rows from different machines compare as ratios only. A figure a
run did not measure shows as `-`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

P99 = "p99 [shipped (group commit)]"
TWIN = "readings/s [FULL, batch 100]"
PI = "CPU-s/hour [20 props @ 1 Hz]"

# (row heading, scenario, metric, what of it: "ratio" or "median")
FIGURES = (
    ("throughput", "throughput", "delivered readings/s", "ratio"),
    ("p99 ms", "latency", P99, "median"),
    ("p99 / raw evenly", "latency", P99, "ratio"),
    ("p99 / raw in ticks", "latency", f"{P99} against raw in ticks", "ratio"),
    ("p99 / raw durable", "latency", f"{P99} against raw durable", "ratio"),
    ("twin / raw readings alone", "twin", TWIN, "ratio"),
    ("twin / raw like for like", "twin", f"{TWIN} against raw with outbox rows", "ratio"),
    ("Pi CPU-s/h", "cost", PI, "median"),
    ("bare paho CPU-s/h", "cost", PI, "baseline"),
    ("RSS MiB", "cost", "RSS [20 props]", "median"),
    ("RSS MiB, onnxruntime", "cost", "RSS [+inference]", "median"),
    ("+1 inference window/s, with a worker (CPU-s/h)", "cost", "CPU-s/hour [+1 inference window/s]", "median"),
    ("+1 inference window/s, all at the edge (CPU-s/h)", "cost", "CPU-s/hour [+1 inference window/s, all decided at the edge]", "median"),
    ("devices at 1 Hz", "scale", "devices sustained", "median"),
    ("ready, 1,000 devices", "startup", "ready [1,000 devices]", "median"),
    ("lost in outage", "recovery", "readings lost", "median"),
)


def figure(run: dict[str, Any], scenario: str, metric: str, what: str) -> float | None:
    for s in run["scenarios"]:
        if s["name"] != scenario:
            continue
        for m in s["metrics"]:
            if m["name"] == metric:
                if what == "ratio":
                    return m.get("ratio")
                summary = m.get("baseline_summary" if what == "baseline" else "summary")
                return summary["median"] if summary else None
    return None


def _shown(value: float | None, what: str) -> str:
    if value is None:
        return "-"
    if what == "ratio":
        return f"{value:.2f}x"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(paths: list[Path]) -> str:
    """A figure per row, a run per column (the runs in the order given)."""
    runs = [json.loads(path.read_text()) for path in paths]
    heads = []
    for path, run in zip(paths, runs, strict=True):
        cpu = run.get("machine", {}).get("cpu", "")
        machine = "AMD EPYC" if "AMD" in cpu else "Intel Xeon" if "Intel" in cpu else cpu or "?"
        commit = run.get("commit") or ""
        commit = f", {commit[:7]}{'+changes' if commit.endswith('+changes') else ''}" if commit else ""
        heads.append(f"[{path.name.removeprefix('benchmarks-').removesuffix('.json')}](docs/{path.name}) ({machine}{commit})")
    lines = ["| figure | " + " | ".join(heads) + " |", "|---|" + "---|" * len(runs)]
    for heading, scenario, metric, what in FIGURES:
        cells = [_shown(figure(run, scenario, metric, what), what) for run in runs]
        lines.append(f"| {heading} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.summary", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by `python -m tests.benchmarks --json`")
    args = p.parse_args(argv)
    print(table(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
