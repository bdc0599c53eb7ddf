"""Plot the latency distributions of a benchmark run: `python -m tests.benchmarks.plot RUN.json OUT.svg`.

Reads the quantiles the latency scenario keeps in its details (one set per run) and draws, for
the mapper, raw paho (evenly spaced and in ticks), the raw durable script and the mapper on
`synchronous: NORMAL`, the median over the runs of each quantile: a cumulative distribution on
a log time axis. Needs matplotlib
(`pip install matplotlib`; not a dependency of the mapper or of the tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SERIES = (  # key in the JSON, label, line style
    ("raw", "raw paho-mqtt, QoS 1, evenly spaced", "-"),
    ("raw_ticks", "raw paho-mqtt, QoS 1, 10 readings every 10 ms (the mapper's pattern)", "-."),
    ("normal", "mapper, twin synchronous NORMAL (no fsync)", "--"),
    ("mapper", "mapper as shipped (synchronous FULL)", "-"),
    ("raw_durable", "raw durable: paho + sqlite3, each tick committed FULL", ":"),
)


def latency_series(run: dict[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """(quantiles, {series: median over the runs of each quantile in ms}) of a benchmark JSON."""
    scenario = next((s for s in run["scenarios"] if s["name"] == "latency"), None)
    runs = [d for d in (scenario or {}).get("details", []) if "quantiles_ms" in d]
    if not runs:
        raise SystemExit("this JSON holds no latency quantiles: run `python -m tests.benchmarks --only latency --json FILE`"
                         " (runs since 2026-11-29 13:50 keep them)")
    quantiles = runs[0]["quantiles"]
    series = {}
    for key, _, _ in SERIES:
        samples = [d["quantiles_ms"][key] for d in runs if key in d["quantiles_ms"]]
        if samples:
            series[key] = [statistics.median(values) for values in zip(*samples, strict=True)]
    return quantiles, series


def plot(run: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "mapper"  # stable element ids: the same input, the same file
    import matplotlib.pyplot as plt

    quantiles, series = latency_series(run)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key, label, style in SERIES:
        if key in series:
            ax.plot(series[key], [100 * q for q in quantiles], style, label=label, linewidth=2)
    if "raw" in series and 0.99 in quantiles:
        target = 3 * series["raw"][quantiles.index(0.99)]
        ax.axvline(target, color="grey", linewidth=1)
        ax.annotate("target: p99 within 3x raw ", (target, 50), color="grey", fontsize=8, ha="right")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax.xaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("reading taken -> received by a subscriber (ms, log scale)")
    ax.set_ylabel("percentile")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    machine = run.get("machine", {})
    ax.set_title(f"Latency at 1,000 readings/s, {run.get('date', '?')[:16].replace('T', ' ')} UTC, "
                 f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, metadata={"Date": None})  # no timestamp: the same input gives the same file
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("run", type=Path, help="JSON written by `python -m tests.benchmarks --json`")
    parser.add_argument("out", type=Path, help="image to write (.svg or .png)")
    args = parser.parse_args()
    plot(json.loads(args.run.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
