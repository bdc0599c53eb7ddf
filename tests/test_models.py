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
