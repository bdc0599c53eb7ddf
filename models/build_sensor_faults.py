"""Rebuild the sensor-fault early-exit pair (models/sensor_faults/{edge.onnx,cloud.onnx,model.json}).

Data: a real indoor temperature + relative-humidity series (UCI Occupancy, an office room,
4-10 February 2015, one reading every 16 minutes), as shipped in the ``river``
0.26.1 wheel (``river/drift/datasets/occupancy.csv``, 509 rows).  The file is found with
``importlib.util.find_spec`` and read with ``csv``; nothing of river is imported, so
``pip install --no-deps river==0.26.1`` is enough.

The series is cut into time-ordered train / validation / test blocks first.  Labelled sensor
faults (``models/faults.py``: spike, stuck, drift, noise) are then *injected* into each block,
many times over with independent seeds ("passes"), readings are rounded to DHT22 resolution
(0.1), and every window of W consecutive readings that lies inside one block is labelled
``normal`` or with the kind of the fault it holds.

Model: the edge graph computes cheap per-window features inside the graph (values centred on
the window mean, first differences and their absolute values, each scaled by a constant from
the training block), one narrow hidden layer, the cut, and a linear first exit.  The cloud graph
continues from the cut with two wide hidden layers.  Both exits are trained jointly
(BranchyNet-style weighted cross-entropies) with numpy, deterministically.

Usage::

    python -m models.build_sensor_faults            # rewrite models/sensor_faults/*
    python -m models.build_sensor_faults --check    # rebuild in memory, compare with shipped files

Build-time dependencies: numpy, onnx, and the river wheel for its CSV only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import early_exit, faults  # noqa: E402
from models.early_exit import IR_VERSION, OPSET, Schedule  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "sensor_faults"
DATA_PACKAGE = "river"
DATA_VERSION = "0.26.1"
DATA_FILE = ("drift", "datasets", "occupancy.csv")
CSV_COLUMNS = {"temperature": "V1", "humidity": "V2"}  # V3 light, V4 CO2 are not used

SEED = 20_240_614
WINDOW = 16  # readings per window (16 x 16 min = 4 h 16 min)
STEP_MINUTES = 16
PROPERTIES = ("temperature", "humidity")
FAULT_KINDS = faults.KINDS  # injected kinds, one class each
CLASSES = ("normal",) + FAULT_KINDS
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
PASSES = {"train": 80, "validation": 30, "test": 30}  # independent injections per block
GAP = (WINDOW, 3 * WINDOW)  # normal readings between two events (>= W-1: one event per window)
RESOLUTION = 0.1  # DHT22 / AM2302 output resolution, C and %RH
AUGMENT = ("train", "validation")  # blocks whose passes use augment(); never the test block
AUGMENT_SCALE = (0.6, 1.6)

HIDDEN = 16  # edge trunk width (narrow: the edge is one small hidden layer before the cut)
CUT = 32  # width of the cut tensor sent to the cloud
CLOUD_HIDDEN = 128
# (first exit, final exit).  BranchyNet's 1.0/0.3 made the cut linearly separable enough that
# the linear edge exit matched the deep part on validation, so nothing was ever offloaded;
# weighting the final exit makes the cut serve the deep part first (see the card).
SCHEDULE = Schedule(loss_weights=(0.1, 1.0), epochs=60, batch=128, learning_rate=5e-4,
                    weight_decay=1e-3)

THRESHOLD_SWEEP = np.round(np.arange(0.20, 1.0001, 0.01), 2)  # max_prob >= 1/C always
CALIBRATION_MARGIN = 0.005  # system accuracy may trail cloud-only by at most 0.5 point
WILSON_TARGET = 0.90  # alternative rule: Wilson 95% lower bound on exited-window accuracy
N_SELF_TEST = 5


# ---------------------------------------------------------------- data


def data_path() -> Path:
    """Locate the CSV inside the installed data package without importing it."""
    return early_exit.data_file(DATA_PACKAGE, DATA_VERSION, DATA_FILE)


def load_series(path: Path | None = None) -> np.ndarray:
    """Return the recorded readings [509, 2] (temperature C, humidity %RH), float64."""
    with open(path or data_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[CSV_COLUMNS[p]]) for p in PROPERTIES] for r in rows])


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    a = int(round(SPLIT_FRACTIONS[0] * n))
    b = int(round((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * n))
    return {"train": (0, a), "validation": (a, b), "test": (b, n)}


def augment(block: np.ndarray, rng: random.Random) -> np.ndarray:
    """Training passes only: a plausible variant of the recorded block.

    Time reversal with probability 1/2, then per property the deviations from the block mean
    are multiplied by a log-uniform factor in AUGMENT_SCALE and a random sign.  Without it
    the 305 recorded training readings are the background of every training window and the
    network learns them by heart (validation loss rises after 2-8 epochs).
    """
    out = block[::-1] if rng.random() < 0.5 else block
    mean = out.mean(axis=0)
    factors = [math.exp(rng.uniform(*map(math.log, AUGMENT_SCALE))) * rng.choice((-1.0, 1.0))
               for _ in PROPERTIES]
    out = mean + (out - mean) * np.array(factors)
    out[:, 1] = np.clip(out[:, 1], 0.0, 100.0)
    return out


def inject_block(block: np.ndarray, rng: random.Random, augmented: bool = False):
    """One pass over a block: (augment,) schedule fault events, inject them, quantise.

    Returns (readings [n, 2], events [(kind, start, stop)]).
    """
    if augmented:
        block = augment(block, rng)
    series = [tuple(r) for r in block.tolist()]
    events = []
    i = rng.randint(0, WINDOW)
    while True:
        start = i + rng.randint(*GAP)
        kind = rng.choice(FAULT_KINDS)
        params = faults.sample_params(kind, rng)
        stop = start + params["length"]
        if stop > len(series):
            break
        series = faults.inject(series, kind, rng, start=start, **params)
        events.append((kind, start, stop))
        i = stop
    readings = np.array([faults.quantise(r, RESOLUTION) for r in series])
    return readings, events


def label_windows(n: int, events) -> tuple[np.ndarray, np.ndarray]:
    """(window end index [m], class index [m]) for every unambiguous window in n readings."""
    ends, labels = [], []
    for end in range(WINDOW - 1, n):
        lo, hi = end - WINDOW + 1, end + 1
        label = 0
        for kind, start, stop in events:
            overlap = min(hi, stop) - max(lo, start)
            if overlap > 0:
                visible = overlap >= faults.MIN_OVERLAP[kind]
                if kind == "drift":
                    visible = visible and lo <= start + (stop - start - 1) // 2 < hi
                label = CLASSES.index(kind) if visible else -1
                break
        if label >= 0:
            ends.append(end)
            labels.append(label)
    return np.array(ends, dtype=np.int64), np.array(labels, dtype=np.int64)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [n, W*2], physical units, time-major oldest first
    y: np.ndarray  # int64 [n]
    days: np.ndarray  # index (in the recorded series) of each window's last reading
    passes: np.ndarray  # injection pass of each window
    n_ambiguous: int = 0
    n_events: int = 0


def pass_seed(split_index: int, p: int) -> int:
    return SEED * 1000 + split_index * 100 + p


def load_splits(path: Path | None = None) -> dict[str, Split]:
    series = load_series(path)
    out = {}
    for s, (name, (start, stop)) in enumerate(split_bounds(len(series)).items()):
        xs, ys, ends_all, passes = [], [], [], []
        ambiguous = n_events = 0
        for p in range(PASSES[name]):
            readings, events = inject_block(series[start:stop], random.Random(pass_seed(s, p)),
                                            augmented=name in AUGMENT)
            ends, labels = label_windows(len(readings), events)
            idx = ends[:, None] + np.arange(-WINDOW + 1, 1)[None, :]
            xs.append(readings[idx].reshape(len(ends), -1))
            ys.append(labels)
            ends_all.append(ends + start)
            passes.append(np.full(len(ends), p))
            ambiguous += (len(readings) - WINDOW + 1) - len(ends)
            n_events += len(events)
        out[name] = Split(np.vstack(xs).astype(np.float32), np.concatenate(ys),
                          np.concatenate(ends_all), np.concatenate(passes), ambiguous, n_events)
    return out


# ---------------------------------------------------------------- in-graph features


def feature_matrices(scales: np.ndarray | None = None):
    """Fixed matrices of the in-graph features, for the interleaved input [t0_T, t0_H, ...].

    lin = window @ M_lin: [T - mean(T), H - mean(H), diff(T), diff(H)]   (2W + 2(W-1))
    dif = window @ M_dif: [diff(T), diff(H)]                               (2(W-1))
    features = [lin, |dif|], each column divided by its scale.
    """
    W, P = WINDOW, len(PROPERTIES)
    centre = np.eye(W) - 1.0 / W  # [W, W]
    diff = np.zeros((W, W - 1))
    diff[np.arange(1, W), np.arange(W - 1)] = 1.0
    diff[np.arange(W - 1), np.arange(W - 1)] = -1.0
    blocks_lin, blocks_dif = [], []
    for c in range(P):  # centred parts
        m = np.zeros((W * P, W))
        m[c::P, :] = centre
        blocks_lin.append(m)
    for c in range(P):
        m = np.zeros((W * P, W - 1))
        m[c::P, :] = diff
        blocks_dif.append(m)
    m_lin = np.hstack(blocks_lin + blocks_dif)
    m_dif = np.hstack(blocks_dif)
    if scales is not None:
        n_lin = m_lin.shape[1]
        m_lin = m_lin / scales[:n_lin]
        m_dif = m_dif / scales[n_lin:]
    return m_lin, m_dif


def features(x: np.ndarray, m_lin: np.ndarray, m_dif: np.ndarray) -> np.ndarray:
    return np.hstack([x @ m_lin, np.abs(x @ m_dif)])


def feature_scales(x_train: np.ndarray) -> np.ndarray:
    """One scale per feature group (centred T, centred H, dT, dH, |dT|, |dH|) from training."""
    m_lin, m_dif = feature_matrices()
    f = features(x_train.astype(np.float64), m_lin, m_dif)
    W = WINDOW
    sizes = [W, W, W - 1, W - 1, W - 1, W - 1]
    out, i = [], 0
    for k in sizes:
        block = f[:, i:i + k]
        out.append(np.full(k, np.sqrt((block ** 2).mean())))  # RMS, about 0 for centred/diffs
        i += k
    return np.concatenate(out)


# ---------------------------------------------------------------- float32 inference, metrics


def run_pair(p32, m_lin32, m_dif32, x):
    """What edge.onnx + cloud.onnx compute, in float32 numpy: (exit, cut, final)."""
    x = x.astype(np.float32)
    a = early_exit.forward(p32, np.hstack([x @ m_lin32, np.abs(x @ m_dif32)]))
    return a["exit"], a["cut"], a["final"]


def macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int = len(CLASSES)) -> float:
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


def wilson_lower(correct: int, n: int, z: float = 1.959964) -> float:
    """Lower end of the Wilson score interval (95%) for a proportion correct/n."""
    if n == 0:
        return 0.0
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)


def calibrate(exit_logits, final_logits, y):
    """Smallest threshold whose system accuracy is within the margin of cloud-only.

    Also reports the smallest threshold whose exited-window accuracy has a Wilson 95% lower
    bound >= WILSON_TARGET.  Returns (threshold, sweep table, wilson threshold).
    """
    cloud_acc = float((final_logits.argmax(1) == y).mean())
    sweep, chosen, wilson_t = [], None, None
    for t in THRESHOLD_SWEEP:
        pred, at_edge = early_exit.system_predictions(exit_logits, final_logits, float(t))
        acc = float((pred == y).mean())
        k, n = int((pred[at_edge] == y[at_edge]).sum()), int(at_edge.sum())
        lb = wilson_lower(k, n)
        sweep.append({"threshold": float(t), "system_accuracy": round(acc, 4),
                      "edge_share": round(float(at_edge.mean()), 4),
                      "edge_subset_wilson_lower": round(lb, 4)})
        if chosen is None and acc >= cloud_acc - CALIBRATION_MARGIN:
            chosen = float(t)
        if wilson_t is None and n and lb >= WILSON_TARGET:
            wilson_t = float(t)
    return (chosen if chosen is not None else 1.0), sweep, wilson_t


def summary(exit_logits, final_logits, y, threshold) -> dict:
    """The shared accuracies plus macro-F1 of each predictor and the class counts."""
    pred, _ = early_exit.system_predictions(exit_logits, final_logits, threshold)
    counts = np.bincount(y, minlength=len(CLASSES))
    return {
        **early_exit.summary(exit_logits, final_logits, y, threshold, len(CLASSES)),
        "edge_macro_f1": round(macro_f1(exit_logits.argmax(1), y), 4),
        "cloud_macro_f1": round(macro_f1(final_logits.argmax(1), y), 4),
        "system_macro_f1": round(macro_f1(pred, y), 4),
        "class_counts": {c: int(k) for c, k in zip(CLASSES, counts)},
    }


# ---------------------------------------------------------------- ONNX export


EXPORT = early_exit.Export(graph="sensor_faults", title="Sensor-fault",
                          producer="mapper.models.build_sensor_faults",
                          props=early_exit.graph_props(WINDOW, PROPERTIES, CLASSES))


def edge_graph(p32, m_lin32, m_dif32):
    """Input stage: the in-graph window features, [window @ lin, |window @ diff|]."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(m_lin32, "features.lin"),
             numpy_helper.from_array(m_dif32, "features.diff")]
    nodes = [
        helper.make_node("Gemm", ["window", "features.lin"], ["feat.lin"], name="feat_lin"),
        helper.make_node("Gemm", ["window", "features.diff"], ["feat.diff"], name="feat_diff"),
        helper.make_node("Abs", ["feat.diff"], ["feat.absdiff"], name="feat_abs"),
        helper.make_node("Concat", ["feat.lin", "feat.absdiff"], ["features"], axis=1,
                         name="feat_concat"),
    ]
    return early_exit.edge_graph(EXPORT, p32, WINDOW * len(PROPERTIES), nodes, inits,
                                 "features")


# ---------------------------------------------------------------- metadata


def metadata(bounds, threshold, sweep, wilson_t, metrics, scales, shas, self_test, training,
             splits) -> dict:
    n_lin = 2 * WINDOW + 2 * (WINDOW - 1)
    return {
        "name": "sensor-faults-early-exit",
        "format_version": 1,
        "task": f"classify the last {WINDOW} readings of a temperature + humidity sensor as "
                f"normal or as one of the injected fault kinds {list(FAULT_KINDS)}",
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
            "step": f"one sensor reading every {STEP_MINUTES} minutes (the recorded series' "
                    f"cadence); readings at {RESOLUTION} resolution (DHT22/AM2302)",
            "derived": {
                "in_graph_features": "computed inside edge.onnx from the raw window: values "
                                     "minus the window mean per property, first differences "
                                     "per property, absolute first differences; each group "
                                     "divided by its RMS on the training block",
                "feature_scales": {k: round(float(v), 6) for k, v in zip(
                    ("centred_temperature", "centred_humidity", "diff_temperature",
                     "diff_humidity", "absdiff_temperature", "absdiff_humidity"),
                    scales[[0, WINDOW, 2 * WINDOW, 3 * WINDOW - 1, n_lin, n_lin + WINDOW - 1]])},
            },
            "units": "physical: temperature in degrees C, relative humidity in %RH",
            "site_scaling": {
                "required": False,
                "formula": "none: feed raw readings",
                "why": "the graph only looks at changes within the window (values minus the "
                       "window mean, differences), so the absolute level of the site does not "
                       "enter"},
            "normalisation": {"baked_into_graph": True,
                              "formula": "fixed Gemm matrices (centring, differencing) with "
                                         "each feature group divided by its training RMS",
                              "mean": [0.0, 0.0],
                              "std": [round(float(scales[0]), 6),
                                      round(float(scales[WINDOW]), 6)]},
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
            "calibration": {"split": "validation", "sweep": [0.2, 1.0, 0.01],
                            "margin": CALIBRATION_MARGIN,
                            "criterion": "smallest threshold with system accuracy >= "
                                         "cloud-only accuracy - margin",
                            "wilson_target": WILSON_TARGET,
                            "wilson_threshold": wilson_t,
                            "wilson_criterion": "smallest threshold whose exited windows' "
                                                "accuracy has a Wilson 95% lower bound >= "
                                                "wilson_target (reported, not used)",
                            "table": sweep},
        },
        "data": {"package": f"{DATA_PACKAGE}=={DATA_VERSION}",
                 "file": "river/drift/datasets/occupancy.csv",
                 "columns": [CSV_COLUMNS[p] for p in PROPERTIES],
                 "splits_days": {k: list(v) for k, v in bounds.items()},
                 "split_rule": "time-ordered blocks of the recorded readings (indices above) "
                               "cut before fault injection; windows never cross a block edge",
                 "faults": {"injected": True, "module": "models/faults.py",
                            "kinds": list(FAULT_KINDS),
                            "ranges": {k: {p: list(r) for p, r in v.items()}
                                       for k, v in faults.RANGES.items()},
                            "min_overlap": faults.MIN_OVERLAP,
                            "gap_readings": list(GAP), "passes": PASSES,
                            "seed": SEED, "resolution": RESOLUTION,
                            "events": {k: s.n_events for k, s in splits.items()},
                            "ambiguous_windows_left_out": {k: s.n_ambiguous
                                                           for k, s in splits.items()}}},
        "training": training,
        "metrics": metrics,
        "self_test": self_test,
    }


# ---------------------------------------------------------------- build


def build(data: Path | None = None, verbose: bool = False) -> dict[str, bytes]:
    splits = load_splits(data)
    tr, va = splits["train"], splits["validation"]
    scales = feature_scales(tr.x)
    m_lin, m_dif = feature_matrices(scales)
    f = lambda x: features(x.astype(np.float64), m_lin, m_dif)  # noqa: E731
    rng = np.random.default_rng(SEED)
    shapes = early_exit.layer_shapes(len(scales), HIDDEN, CUT, CLOUD_HIDDEN, len(CLASSES))
    params, best_epoch = early_exit.train(f(tr.x), tr.y, f(va.x), va.y, shapes, SCHEDULE, rng)
    p32 = early_exit.float32_params(params)
    m_lin32, m_dif32 = m_lin.astype(np.float32), m_dif.astype(np.float32)

    logits = {k: run_pair(p32, m_lin32, m_dif32, s.x) for k, s in splits.items()}
    threshold, sweep, wilson_t = calibrate(logits["validation"][0], logits["validation"][2],
                                           va.y)
    metrics = {k: summary(logits[k][0], logits[k][2], splits[k].y, threshold)
               for k in ("train", "validation", "test")}
    if verbose:
        print(f"best epoch {best_epoch}, threshold {threshold}, wilson {wilson_t}")
        for k, v in metrics.items():
            print(k, v)

    files = {"edge.onnx": edge_graph(p32, m_lin32, m_dif32).SerializeToString(),
             "cloud.onnx": early_exit.cloud_graph(EXPORT, p32).SerializeToString()}
    shas = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}

    te = splits["test"]
    rows = np.linspace(0, len(te.y) - 1, N_SELF_TEST).astype(int)
    e, _, fl = run_pair(p32, m_lin32, m_dif32, te.x[rows])
    self_test = [{"split": "test", "day": int(te.days[r]), "pass": int(te.passes[r]),
                  "label": CLASSES[int(te.y[r])], "window": te.x[r].tolist(),
                  "exit_logits": e[i].tolist(), "final_logits": fl[i].tolist()}
                 for i, r in enumerate(rows)]
    bounds = split_bounds(len(load_series(data)))
    doc = metadata(bounds, threshold, sweep, wilson_t, metrics, scales, shas, self_test,
                   early_exit.training_card(SEED, SCHEDULE, best_epoch, shapes), splits)
    files["model.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = early_exit.arg_parser(__doc__, OUT_DIR)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    files = build(verbose=args.verbose)
    return early_exit.check(files, args.out) if args.check else early_exit.write(files, args.out)


if __name__ == "__main__":
    sys.exit(main())
