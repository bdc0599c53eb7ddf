"""The shipped rain early-exit pair loads, matches its model.json and reproduces its card."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'ml') is not installed")

from models import build_models, evaluate  # noqa: E402

MODEL_DIR = evaluate.MODEL_DIR


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((MODEL_DIR / "model.json").read_text())


@pytest.fixture(scope="module")
def sessions():
    return evaluate.open_sessions(MODEL_DIR)


@pytest.fixture(scope="module")
def splits():
    try:
        build_models.data_path()
    except FileNotFoundError as exc:
        pytest.skip(f"rainfall data not available: {exc}")
    return build_models.load_splits()


@pytest.fixture(scope="module")
def test_run(splits, sessions):
    edge, cloud = sessions
    return evaluate.run_pair(edge, cloud, splits["test"].x)


def test_sha256_in_model_json_matches_files(meta):
    """model.json pins the exact bytes of both graphs."""
    for part in ("edge", "cloud"):
        name = meta["files"][part]
        digest = hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest()
        assert digest == meta["sha256"][name], name


def test_opset_and_ir_version_are_pinned(meta):
    """Both graphs use the default domain at opset 13 and IR version 8, as model.json says."""
    onnx = pytest.importorskip("onnx", reason="onnx (build extra) is not installed")
    for part in ("edge", "cloud"):
        model = onnx.load(MODEL_DIR / meta["files"][part])
        assert model.ir_version == meta["ir_version"] == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
        assert meta["opset"] == 13
        onnx.checker.check_model(model)


def test_inputs_and_outputs_are_as_documented(meta, sessions):
    """Names, dtypes and shapes of edge and cloud graphs follow model.json."""
    edge, cloud = sessions
    width = meta["input"]["window_length"] * len(meta["input"]["properties"])
    assert meta["input"]["shape"] == ["N", width]
    assert len(meta["input"]["feature_names"]) == width
    [inp] = edge.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("window", "tensor(float)", ["N", width])
    cut = meta["cut"]["width"]
    assert {o.name: o.shape for o in edge.get_outputs()} == {
        "exit_logits": ["N", len(meta["classes"])], "cut": ["N", cut]}
    assert [(i.name, i.shape) for i in cloud.get_inputs()] == [("cut", ["N", cut])]
    assert [o.name for o in cloud.get_outputs()] == ["final_logits"]

    x = np.random.default_rng(0).normal(size=(5, width)).astype(np.float32)
    exit_logits, cut_t, final = evaluate.run_pair(edge, cloud, x)
    assert exit_logits.shape == (5, 2) and cut_t.shape == (5, cut) and final.shape == (5, 2)
    assert (cut_t >= 0).all()  # the cut is a ReLU output, so uint8/int8 quantisation is simple


def test_self_test_rows_reproduce_build_logits(meta, sessions):
    """onnxruntime gives the logits the numpy build computed for the rows kept in model.json."""
    edge, cloud = sessions
    rows = meta["self_test"]
    assert rows
    x = np.array([r["window"] for r in rows], dtype=np.float32)
    exit_logits, _, final = evaluate.run_pair(edge, cloud, x)
    np.testing.assert_allclose(exit_logits, [r["exit_logits"] for r in rows], atol=1e-4)
    np.testing.assert_allclose(final, [r["final_logits"] for r in rows], atol=1e-4)


def test_session_options_do_not_spin():
    """The sessions the runtime uses are single-threaded, sequential and never spin."""
    so = evaluate.session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_decision_rule_uses_max_probability():
    """A window leaves at the edge exactly when max softmax probability reaches the threshold."""
    exit_logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)], [2.0, 0.0]], dtype=np.float32)
    final = np.array([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    pred, at_edge = evaluate.decide(exit_logits, final, 0.75)  # probs 0.5, 0.75, 0.88
    assert at_edge.tolist() == [False, True, True]
    assert pred.tolist() == [0, 1, 0]


def test_self_test_rows_are_real_test_windows(meta, splits):
    """The windows kept in model.json are the recorded test-block windows of the days named."""
    te = splits["test"]
    for row in meta["self_test"]:
        [i] = np.flatnonzero(te.days == row["day"])
        np.testing.assert_array_equal(te.x[i], np.float32(row["window"]))


def test_composition_matches_evaluate_on_known_rows(meta, sessions, splits, test_run):
    """Edge then cloud, one window at a time, gives the answer evaluate's batch run reports."""
    edge, cloud = sessions
    te, t = splits["test"], meta["exit"]["threshold"]
    pred, _ = evaluate.decide(test_run[0], test_run[2], t)
    for i in (0, 17, len(te.y) // 2, len(te.y) - 1):
        exit_logits, cut = edge.run(["exit_logits", "cut"], {"window": te.x[i : i + 1]})
        (final,) = cloud.run(["final_logits"], {"cut": cut})
        prob = evaluate.max_prob(exit_logits)[0]
        single = exit_logits.argmax() if prob >= t else final.argmax()
        assert single == pred[i]
        np.testing.assert_allclose(final[0], test_run[2][i], atol=1e-5)


def test_threshold_reproduces_documented_test_figures(meta, splits):
    """model.json's threshold gives the documented edge share and accuracies on the test block."""
    r = evaluate.evaluate(splits["test"], MODEL_DIR, latency_samples=0)
    doc = meta["metrics"]["test"]
    assert r["n"] == doc["n"]
    assert r["edge_share"] == pytest.approx(doc["edge_share"], abs=0.005)
    assert r["early_exit"]["accuracy"] == pytest.approx(doc["system_accuracy"], abs=0.002)
    assert r["edge_only"]["accuracy"] == pytest.approx(doc["edge_accuracy"], abs=0.002)
    assert r["cloud_only"]["accuracy"] == pytest.approx(doc["cloud_accuracy"], abs=0.002)
    assert r["early_exit"]["accuracy"] > doc["majority_accuracy"]


def test_calibration_is_reproduced_from_validation(meta, sessions, splits):
    """Recalibrating on the validation block with onnxruntime picks model.json's threshold."""
    edge, cloud = sessions
    va = splits["validation"]
    exit_logits, _, final = evaluate.run_pair(edge, cloud, va.x)
    threshold, sweep = build_models.calibrate(exit_logits, final, va.y)
    assert threshold == meta["exit"]["threshold"]
    for ours, doc in zip(sweep, meta["exit"]["calibration"]["table"], strict=True):
        assert ours["threshold"] == doc["threshold"]
        assert ours["edge_share"] == pytest.approx(doc["edge_share"], abs=0.005)


# ---------------------------------------------------------------- sensor_faults pair
# The model the demo runs: a DHT-style temperature + humidity fault detector (models/README.md).

from models import build_sensor_faults, faults  # noqa: E402

SF_DIR = evaluate.MODEL_DIRS["sensor_faults"]


@pytest.fixture(scope="module")
def sf_meta() -> dict:
    return json.loads((SF_DIR / "model.json").read_text())


@pytest.fixture(scope="module")
def sf_sessions():
    return evaluate.open_sessions(SF_DIR)


@pytest.fixture(scope="module")
def sf_splits():
    try:
        build_sensor_faults.data_path()
    except FileNotFoundError as exc:
        pytest.skip(f"occupancy data (river wheel) not available: {exc}")
    return build_sensor_faults.load_splits()


def test_sf_model_json_has_the_rain_layout(meta, sf_meta):
    """One runtime reads both: same top-level keys, same input/exit/cut/outputs keys."""
    assert sf_meta.keys() == meta.keys()
    for key in ("input", "exit", "cut", "outputs", "files", "sha256"):
        assert sf_meta[key].keys() == meta[key].keys(), key
    assert set(meta["exit"]["calibration"]) <= set(sf_meta["exit"]["calibration"])
    for row in sf_meta["self_test"]:
        assert {"window", "exit_logits", "final_logits"} <= row.keys()
    assert sf_meta["input"]["properties"] == ["temperature", "humidity"]
    assert sf_meta["classes"] == ["normal", "spike", "stuck", "drift", "noise"]
    assert sf_meta["exit"]["score"] == "max_prob"
    assert sf_meta["data"]["faults"]["injected"] is True


def test_sf_sha256_and_pinned_opset(sf_meta):
    onnx = pytest.importorskip("onnx", reason="onnx (build extra) is not installed")
    for part in ("edge", "cloud"):
        name = sf_meta["files"][part]
        blob = (SF_DIR / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == sf_meta["sha256"][name], name
        assert len(blob) < 128 * 1024
        model = onnx.load_from_string(blob)
        assert model.ir_version == sf_meta["ir_version"] == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
        onnx.checker.check_model(model)


def test_sf_inputs_and_outputs_are_as_documented(sf_meta, sf_sessions):
    edge, cloud = sf_sessions
    width = sf_meta["input"]["window_length"] * 2
    assert sf_meta["input"]["shape"] == ["N", width] and width == 32
    [inp] = edge.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("window", "tensor(float)", ["N", width])
    cut, k = sf_meta["cut"]["width"], len(sf_meta["classes"])
    assert {o.name: o.shape for o in edge.get_outputs()} == {
        "exit_logits": ["N", k], "cut": ["N", cut]}
    assert [(i.name, i.shape) for i in cloud.get_inputs()] == [("cut", ["N", cut])]
    # raw physical units go in: a flat room (21.0 C, 40 %RH) is "normal"
    flat = np.tile(np.float32([21.0, 40.0]), (1, 16)) + np.float32(
        np.random.default_rng(1).integers(-1, 2, (1, 32)) * 0.1)
    exit_logits, cut_t, final = evaluate.run_pair(edge, cloud, flat)
    assert (cut_t >= 0).all()
    assert final.argmax() == sf_meta["classes"].index("normal")


def test_sf_self_test_rows_reproduce(sf_meta, sf_sessions):
    """edge then cloud in onnxruntime gives the logits the numpy build wrote down."""
    edge, cloud = sf_sessions
    rows = sf_meta["self_test"]
    assert len(rows) >= 3
    x = np.array([r["window"] for r in rows], dtype=np.float32)
    exit_logits, _, final = evaluate.run_pair(edge, cloud, x)
    np.testing.assert_allclose(exit_logits, [r["exit_logits"] for r in rows], atol=1e-4)
    np.testing.assert_allclose(final, [r["final_logits"] for r in rows], atol=1e-4)


def test_sf_self_test_rows_are_test_windows(sf_meta, sf_splits):
    te = sf_splits["test"]
    for row in sf_meta["self_test"]:
        [i] = np.flatnonzero((te.days == row["day"]) & (te.passes == row["pass"]))
        np.testing.assert_array_equal(te.x[i], np.float32(row["window"]))
        assert sf_meta["classes"][te.y[i]] == row["label"]


def test_sf_threshold_reproduces_documented_test_figures(sf_meta, sf_splits):
    """The documented edge share, accuracies, and the cloud's margin over the edge, on test."""
    r = evaluate.evaluate(sf_splits["test"], SF_DIR, latency_samples=0)
    doc = sf_meta["metrics"]["test"]
    assert r["n"] == doc["n"]
    assert r["edge_share"] == pytest.approx(doc["edge_share"], abs=0.01)
    assert 0.5 < r["edge_share"] < 0.95
    assert r["early_exit"]["accuracy"] == pytest.approx(doc["system_accuracy"], abs=0.003)
    assert r["edge_only"]["accuracy"] == pytest.approx(doc["edge_accuracy"], abs=0.003)
    assert r["cloud_only"]["accuracy"] == pytest.approx(doc["cloud_accuracy"], abs=0.003)
    assert r["cloud_only"]["macro_f1"] == pytest.approx(doc["cloud_macro_f1"], abs=0.005)
    # the deep part genuinely helps here, unlike the rain pair
    assert r["cloud_only"]["accuracy"] >= r["edge_only"]["accuracy"] + 0.02
    assert r["cloud_only"]["macro_f1"] >= r["edge_only"]["macro_f1"] + 0.05
    assert r["early_exit"]["accuracy"] > r["edge_only"]["accuracy"] > doc["majority_accuracy"]


def test_sf_calibration_is_reproduced_from_validation(sf_meta, sf_sessions, sf_splits):
    edge, cloud = sf_sessions
    va = sf_splits["validation"]
    exit_logits, _, final = evaluate.run_pair(edge, cloud, va.x)
    threshold, sweep, wilson = build_sensor_faults.calibrate(exit_logits, final, va.y)
    cal = sf_meta["exit"]["calibration"]
    assert threshold == sf_meta["exit"]["threshold"]
    assert wilson == cal["wilson_threshold"]
    for ours, doc in zip(sweep, cal["table"], strict=True):
        assert ours["threshold"] == doc["threshold"]
        assert ours["edge_share"] == pytest.approx(doc["edge_share"], abs=0.005)


def test_sf_splits_are_time_ordered_blocks(sf_meta, sf_splits):
    """Windows end inside their block and start after its first reading (never cross)."""
    w = sf_meta["input"]["window_length"]
    for name, (start, stop) in sf_meta["data"]["splits_days"].items():
        days = sf_splits[name].days
        assert days.min() >= start + w - 1 and days.max() < stop, name
    bounds = [tuple(v) for v in sf_meta["data"]["splits_days"].values()]
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


# ---------------------------------------------------------------- faults.py


def test_faults_module_is_dependency_free():
    """The driver can import it without numpy: only the standard library is imported."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(faults))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "math"}


def test_fault_kinds_behave_as_documented():
    import random

    series = [(20.0 + 0.1 * i, 40.0 - 0.2 * i) for i in range(20)]
    rng = random.Random(0)
    spike = faults.inject(series, "spike", rng, start=5, length=1, channels="temperature",
                          amplitude_t=2.0)
    assert spike[5] == pytest.approx((22.5, 39.0)) and spike[:5] == series[:5]
    assert spike[6:] == series[6:]
    stuck = faults.inject(series, "stuck", rng, start=5, length=4)
    assert stuck[5:9] == [series[4]] * 4 and stuck[9] == series[9]
    drift = faults.inject(series, "drift", rng, start=2, length=9, channels="humidity",
                          peak_h=3.0)
    offsets = [d[1] - s[1] for d, s in zip(drift, series)]
    assert offsets[6] == pytest.approx(3.0) and offsets[2] > 0 and offsets[11] == 0
    assert all(d[0] == s[0] for d, s in zip(drift, series))
    noisy = faults.inject(series, "noise", random.Random(1), start=0, length=20,
                          channels="both", sigma_t=0.5, sigma_h=1.0)
    assert sum(n != s for n, s in zip(noisy, series)) == 20
    with pytest.raises(ValueError):
        faults.inject(series, "melted", rng)


def test_fault_state_is_deterministic_per_seed():
    import random

    for kind in faults.KINDS:
        a = faults.sample_params(kind, random.Random(7))
        assert a == faults.sample_params(kind, random.Random(7))
        lo, hi = faults.RANGES[kind]["length"]
        assert lo <= a["length"] <= hi
        state = faults.FaultState(kind, random.Random(3), last=(20.0, 40.0), **a)
        out = [state.apply(20.0, 40.0) for _ in range(a["length"] + 2)]
        assert state.done and out[-1] == (20.0, 40.0)
