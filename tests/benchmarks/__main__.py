"""`python -m tests.benchmarks [--quick] [--json out.json] [--only NAME[,NAME]]`: see docs/benchmarks.md."""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import orjson

from .common import REPO, Metric, ScenarioResult, bench_broker, machine_info
from .scenarios import SCENARIOS, Context, Plan


def _fmt(value: float | None) -> str:
    if value is None or value != value:  # noqa: PLR0124 - NaN
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(values: list[float]) -> str:
    s = Metric.summary(values)
    if s is None:
        return "-"
    if s["n"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]"


def table(results: list[ScenarioResult]) -> str:
    """A markdown table: median [min-max] over the repetitions, baseline, ratio (median of the
    per-run ratios [min-max]), target."""
    lines = ["| scenario | metric | mapper: median [min-max] | baseline (same run) | ratio [min-max] | target |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} | | | | |")
            continue
        for m in r.metrics:
            base = f"{m.baseline_name}: {_cell(m.baseline)}" if m.baseline else ""
            ratio = m.ratio()
            runs = m.run_ratios()
            shown = "" if ratio is None else f"{ratio:.2f}x" + (
                f" [{min(runs):.2f}-{max(runs):.2f}]" if len(runs) > 1 else "")
            unit = f" ({m.unit})" if m.unit else ""
            lines.append(f"| {r.name} | {m.name}{unit} | {_cell(m.values) if m.values else m.note or '-'} | {base} | "
                         f"{shown} | {m.target} |")
    return "\n".join(lines)


def source_commit() -> str | None:
    """The commit the benchmarked code is at, with `+changes` when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an sdist) or no git
    return head + ("+changes" if dirty else "")


def compile_sources() -> None:
    """Byte-compile the mapper's own sources once, as `pip install` does for an installed package.

    Python reads a cached .pyc even under PYTHONDONTWRITEBYTECODE (which some CI images and this
    sandbox set), but never writes one; without this, every mapper the benchmarks start would
    compile its ~12k lines first and keep ~2 MiB more RSS for good (the compiler's garbage
    stays in the heap): the Pi workload's mapper measured 43.7 MiB that way, 42.0 compiled."""
    for package in ("mapper", "devices", "twin", "eventbus", "tests/benchmarks"):
        compileall.compile_dir(REPO / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs (about a minute and a quarter)")
    p.add_argument("--json", type=Path, help="write every figure, the details and the machine here")
    p.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    p.add_argument("--side-figures", action="store_true",
                   help="full mode: also the side figures, in the first run (about two minutes more): the Pi cost "
                   "with a full history, with no cloud worker and as a plain `mapper run`; the latency with "
                   "twin.synchronous NORMAL")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, twin files, arrivals)")
    p.add_argument("--repeats", type=int, help="runs per scenario (default: 3 full, 1 quick)")
    p.add_argument("--latency-s", type=float, help="latency run length, e.g. 300 for a soak (default: 15 full, 3 quick)")
    args = p.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.quick and args.side_figures:
        p.error("--side-figures is for a full run (a quick one has no inference cost variants to compare)")
    plan = Plan.make(args.quick, args.side_figures)
    if args.repeats is not None:
        plan = dataclasses.replace(plan, repeats=max(1, args.repeats))
    if args.latency_s is not None:
        plan = dataclasses.replace(plan, latency_s=args.latency_s)
    compile_sources()
    workdir = Path(tempfile.mkdtemp(prefix="mapper-bench-"))
    started = time.monotonic()
    results: list[ScenarioResult] = []
    seconds: dict[str, float] = {}  # each scenario's wall time, so a plan change shows where the run's time goes
    broker = bench_broker()
    try:
        with broker:
            ctx = Context(broker, plan, workdir)
            for name in names:
                t = time.monotonic()
                print(f"== {name} ...", file=sys.stderr, flush=True)
                try:
                    result = SCENARIOS[name](ctx)
                except Exception as exc:  # noqa: BLE001 - report it and go on with the others
                    traceback.print_exc()
                    result = ScenarioResult(name, name, "", skipped=f"failed: {exc}")
                results.append(result)
                seconds[name] = round(time.monotonic() - t, 1)
                print(f"   {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}", file=sys.stderr)
    info = machine_info()
    print()
    print(f"mapper benchmarks ({'quick' if args.quick else 'full'}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{info['cpu']} x{info['cores']}, Python {info['python']}, Mosquitto {info['mosquitto']}, "
          f"{time.monotonic() - started:.0f} s ({', '.join(f'{n} {s:.0f}' for n, s in seconds.items())})")
    print()
    print(table(results))
    print()
    for r in results:
        if r.how:
            print(f"- {r.name}: {r.how}")
    for r in results:
        for d in r.details:
            if r.name == "scale":
                print(f"  scale step: {d}")
    if args.json:
        doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": "python -m tests.benchmarks" + (" --quick" if args.quick else "")
               + (" --side-figures" if args.side_figures else "") + (f" --only {args.only}" if args.only else ""),
               "mode": "quick" if args.quick else "full", "duration_s": time.monotonic() - started,
               "machine": info, "commit": source_commit(),
               "scenarios": [{"name": r.name, "title": r.title, "seconds": seconds.get(r.name), "how": r.how,
                              "skipped": r.skipped,
                              "metrics": [m.as_json() for m in r.metrics], "details": r.details} for r in results]}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"\nJSON: {args.json}")
    failed = [r.name for r in results if r.skipped and r.skipped.startswith("failed")]
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see the tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
