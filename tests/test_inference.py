"""Early-exit inference: the decision rule, the codec, windows, settings, the shipped models on
real onnxruntime, and the extension inside a running MapperService on the session's Mosquitto:
an app user sees decisions and alerts, a worker user sees offload requests and publishes the
answers the worker's own code computes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import queue
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from devices.ids import DeviceId
from eventbus.settings import MqttSettings
from eventbus.topics import Topics
from mapper.config import DeviceLoopSettings, MapperConfig, TwinSettings, load_config
from mapper.inference import codec, policy, records
from mapper.inference.codec import CodecError
from mapper.inference.extension import TIMER_GRACE_S, InferenceExtension
from mapper.inference.model import EarlyExitModel, ModelError, load_model, session_options
from mapper.inference.settings import InferenceSettings, PipelineSettings, from_anomaly_detection
from mapper.inference.window import Window, WindowBuilder
from mapper.inference.worker import CloudWorker, WorkerSettings
from mapper.runtime import build_service
from twin.records import ERROR, Reading
from twin.store import TwinStore
from brokers import MosquittoBroker, MqttProbe
from helpers import async_wait_for, wait_for

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SENSOR = DeviceId("default", "probe")
RELAY = DeviceId("default", "relay")

# --- the decision rule -------------------------------------------------------------------


def test_softmax_is_a_distribution_and_stable():
    """softmax sums to 1, keeps the order, survives huge logits, and agrees with numpy's."""
    p = policy.softmax(np.array([1000.0, 999.0, -1000.0], dtype=np.float32))
    assert sum(p) == pytest.approx(1.0) and all(math.isfinite(v) for v in p)
    assert p[0] > p[1] > p[2] and policy.argmax(p) == 0
    assert policy.softmax([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)
    logits = np.array([0.3, -1.2, 2.5, 0.0])
    e = np.exp(logits - logits.max())
    assert policy.softmax(logits.tolist()) == pytest.approx((e / e.sum()).tolist())
    assert policy.argmax([0.2, 0.4, 0.4]) == 1  # the first on a tie, like numpy.argmax


def test_scores():
    """max_prob is the top probability; normalised entropy is 0 for one-hot and 1 for uniform."""
    assert policy.max_prob(np.array([0.1, 0.7, 0.2])) == pytest.approx(0.7)
    assert policy.normalised_entropy(np.array([0.0, 1.0, 0.0])) == 0.0
    assert policy.normalised_entropy(np.full(5, 0.2)) == pytest.approx(1.0)
    two = policy.normalised_entropy(np.array([0.5, 0.5]))
    skew = policy.normalised_entropy(np.array([0.9, 0.1]))
    assert two == pytest.approx(1.0) and 0 < skew < two


def test_should_exit_both_scores_at_the_boundary():
    """max_prob exits at >= threshold; entropy exits at <= threshold (DDNN's direction)."""
    p = np.array([0.6, 0.3, 0.1])
    assert policy.should_exit(p, 0.6, "max_prob")
    assert not policy.should_exit(p, 0.61, "max_prob")
    h = policy.normalised_entropy(p)
    assert policy.should_exit(p, h, "entropy")
    assert not policy.should_exit(p, h - 0.01, "entropy")
    with pytest.raises(ValueError, match="unknown score"):
        policy.should_exit(p, 0.5, "margin")  # type: ignore[arg-type]


class _FixedRng:
    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_audit_sampling_uses_the_injected_rng():
    """The audit draws from the RNG it is given: below the share audits, at or above does not."""
    rng = _FixedRng([0.01, 0.05, 0.049])
    assert [policy.should_audit(rng, 0.05) for _ in range(3)] == [True, False, True]
    assert not policy.should_audit(_FixedRng([]), 0.0)   # never draws
    assert policy.should_audit(_FixedRng([]), 1.0)
    seeded = random.Random(42)
    share = sum(policy.should_audit(seeded, 0.1) for _ in range(20_000)) / 20_000
    assert 0.09 < share < 0.11


# --- the shipped models on onnxruntime ---------------------------------------------------


@pytest.mark.parametrize("name", ["sensor_faults", "rain"])
def test_shipped_models_load_and_pass_their_self_test(name):
    """Both shipped pairs load with their sha256 checked and reproduce model.json's self-test rows."""
    model = EarlyExitModel.load(MODELS / name)
    assert model.self_test() >= 1
    row = model.info.meta["self_test"][0]
    exit_logits, cut = model.edge(np.array(row["window"]))
    assert cut.shape == (1, model.info.cut_width)
    assert np.allclose(model.cloud(cut)[0], row["final_logits"], atol=1e-4)
    assert np.allclose(exit_logits[0], row["exit_logits"], atol=1e-4)


def test_a_pipelines_windows_get_the_numbers_of_run_and_keep_their_own_cut(tmp_path):
    """A pipeline runs its windows through buffers bound to the session once (EdgeRunner): each
    outcome has the exit and cut that `run()` gives for its window, and the cut kept for an offload
    is its own (the next window must not overwrite it)."""
    from devices.loader import load
    from mapper.inference.pipeline import Pipeline

    definitions = load([_devices(tmp_path)]).devices
    settings = PipelineSettings(device="probe", model="sensor_faults", threshold=0.0)
    p = Pipeline(settings, load_model(MODELS / "sensor_faults"), definitions[SENSOR], definitions=definitions)
    rows = p.model.info.meta["self_test"][:2]
    windows = [Window(tuple(float(v) for v in row["window"]), 1000 * i, 1000 * i + 999) for i, row in enumerate(rows)]
    outcomes = [p.edge(w) for w in windows]
    for outcome, row in zip(outcomes, rows, strict=True):
        exit_logits, cut = p.model.edge(np.array(row["window"], dtype=np.float32))
        assert np.array_equal(outcome.cut, cut[0])
        probs = policy.softmax(exit_logits[0].tolist())
        assert outcome.label == p.model.info.classes[policy.argmax(probs)]
        assert outcome.confidence == pytest.approx(max(probs), abs=1e-6)
    assert not np.array_equal(outcomes[0].cut, outcomes[1].cut)


def test_session_options_are_single_threaded_without_spinning():
    """One intra-op and one inter-op thread, sequential, spinning off."""
    import onnxruntime as ort

    so = session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_loading_a_model_leaves_onnxruntimes_telemetry_off(tmp_path):
    """The official onnxruntime wheels (1.29 and later) start a telemetry uploader at the first
    session: a device id and an event cache under ~/.cache/Microsoft/, and a DNS lookup of
    Microsoft's collector every few seconds. Loading a model as `mapper run` and the cloud worker
    do, with ORT_DISABLE_TELEMETRY unset, creates none of it: the mapper turns it off."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    script = ("import os; from mapper.inference.model import load_model; "
              "model = load_model('models/sensor_faults'); "
              "print(model.info.name, os.environ.get('ORT_DISABLE_TELEMETRY', 'unset'))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".cache" / "Microsoft").exists(), sorted(str(p) for p in tmp_path.rglob("*"))
    assert done.stdout.split() == ["sensor-faults-early-exit", "1"]


def test_an_operator_may_turn_onnxruntimes_telemetry_on():
    """ORT_DISABLE_TELEMETRY set by the operator (0: send it) is left as it is."""
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "0"}
    script = "import os; from mapper.inference.ort import import_onnxruntime; import_onnxruntime(); " \
             "print(os.environ['ORT_DISABLE_TELEMETRY'])"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_a_tampered_graph_is_refused(tmp_path):
    """A graph whose sha256 differs from model.json is not loaded."""
    copy = tmp_path / "sf"
    shutil.copytree(MODELS / "sensor_faults", copy)
    blob = bytearray((copy / "cloud.onnx").read_bytes())
    blob[-1] ^= 0x01
    (copy / "cloud.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="sha256") as refused:
        EarlyExitModel.load(copy)
    assert "damaged or from another build than model.json; copy the model's directory whole" in str(refused.value)
    with pytest.raises(ModelError, match="not found"):
        EarlyExitModel.load(tmp_path / "nothing")
    (copy / "cloud.onnx").unlink()  # a graph missing: it said only "not found"
    with pytest.raises(ModelError, match="cloud.onnx: not found; copy it from the same build as sf/model.json"):
        EarlyExitModel.load(copy)


def test_edge_decisions_match_the_model_card_rule():
    """On the self-test windows, policy.should_exit agrees with the card's rule (max_prob >= T)."""
    model = load_model(MODELS / "sensor_faults")
    windows = np.array([r["window"] for r in model.info.meta["self_test"]], dtype=np.float32)
    exit_logits, cut = model.edge(windows)
    final = model.cloud(cut)
    for logits in exit_logits:
        p = policy.softmax(logits)
        assert policy.should_exit(p, model.info.threshold) == (max(p) >= model.info.threshold)
    assert final.shape == (len(windows), len(model.info.classes))


# --- the codec ---------------------------------------------------------------------------


def test_cut_round_trip_int8_and_float16():
    """int8 + scale is within half a step of the original; float16 within its precision."""
    cut = np.abs(np.random.default_rng(1).normal(0, 2, 32)).astype(np.float32)
    i8 = codec.encode_cut(cut, "int8")
    assert len(i8) == 4 + 32
    scale = float(np.frombuffer(i8[:4], "<f4")[0])
    assert np.max(np.abs(codec.decode_cut(i8, "int8", 32) - cut)) <= scale / 2 + 1e-6
    f16 = codec.encode_cut(cut, "float16")
    assert len(f16) == 64
    assert np.allclose(codec.decode_cut(f16, "float16", 32), cut, rtol=1e-3)
    zero = codec.decode_cut(codec.encode_cut(np.zeros(8), "int8"), "int8", 8)
    assert np.all(zero == 0)


def test_request_round_trip():
    """A request survives JSON and base64, ids are 16 hex digits."""
    cut = np.linspace(0, 3, 32).astype(np.float32)
    req = codec.OffloadRequest("0123456789abcdef", "pi-1", "default/probe", "default/probe-x", "m", "abc", 5,
                               False, "float16", cut)
    back = codec.decode_request(orjson.dumps(req.to_json()))
    assert (back.id, back.node, back.model, back.created, back.enc) == ("0123456789abcdef", "pi-1", "m", 5, "float16")
    assert np.allclose(back.cut, cut, atol=2e-3)


GOOD = {"v": 1, "id": "0123456789abcdef", "node": "pi-1", "model": "m", "created": 5, "logits": [0.1, 2.0, -1.0]}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b"{}", "malformed"),
    (orjson.dumps({**GOOD, "extra": 1}), "malformed"),
    (orjson.dumps({**GOOD, "id": "../../etc"}), "malformed"),
    (orjson.dumps({**GOOD, "id": "0123456789ABCDEF"}), "malformed"),
    (orjson.dumps({**GOOD, "created": True}), "malformed"),
    (orjson.dumps({**GOOD, "created": "5"}), "malformed"),
    (orjson.dumps({**GOOD, "v": 2}), "malformed"),
    (orjson.dumps({**GOOD, "logits": [1.0]}), "malformed"),
    (orjson.dumps({**GOOD, "logits": [1.0, "2"]}), "malformed"),
    (orjson.dumps({**GOOD, "logits": [1.0, True]}), "malformed"),
    (orjson.dumps({**GOOD, "logits": [1.0, 2.0], "error": "x"}), "malformed"),
    (orjson.dumps({k: v for k, v in GOOD.items() if k != "logits"}), "malformed"),
    (b"[1e999]", "malformed"),
    (b'{"v": 1, "id": "0123456789abcdef", "node": "pi-1", "model": "m", "created": 5, "logits": [NaN, 1]}',
     "malformed"),
    (orjson.dumps({**GOOD, "logits": [0.0] * 4}), "mismatch"),
    (orjson.dumps({**GOOD, "worker": "w" * 1000}), "malformed"),
    (b" " * (codec.MAX_MESSAGE + 1), "too_large"),
])
def test_hostile_results_are_refused_with_a_reason(payload, reason):
    """Every malformed result raises CodecError with the reason the mapper counts."""
    with pytest.raises(CodecError) as info:
        codec.decode_result(payload, n_classes=3)
    assert info.value.reason == reason


def test_a_good_result_decodes():
    """The reference result decodes; an error result too."""
    r = codec.decode_result(orjson.dumps(GOOD), n_classes=3)
    assert r.logits == (0.1, 2.0, -1.0) and r.error is None
    e = codec.decode_result(orjson.dumps({**{k: v for k, v in GOOD.items() if k != "logits"}, "error": "nope"}))
    assert e.error == "nope" and e.logits is None


def test_hostile_requests_are_refused():
    """The worker's decoder refuses bad base64, wrong sizes and non-finite scales."""
    req = codec.OffloadRequest("0123456789abcdef", "n", "d", "p", "m", "s", 1, False, "int8",
                               np.ones(4, np.float32)).to_json()
    for bad in ({**req, "payload": "!!!"}, {**req, "n": 5}, {**req, "n": 0}, {**req, "enc": "int4"},
                {**req, "payload": base64.b64encode(b"\x00\x00\xc0\x7f" + b"\x01" * 4).decode()}):
        with pytest.raises(CodecError):
            codec.decode_request(orjson.dumps(bad))


# --- windows -----------------------------------------------------------------------------

PROPS = ("temperature", "humidity")


def _step(builder, ts, t, h, *, quality_t="good"):
    out = builder.add(Reading(SENSOR, "temperature", t, ts, quality_t))
    assert out is None
    return builder.add(Reading(SENSOR, "humidity", h, ts + 1))


def test_windows_are_time_major_oldest_first_with_stride():
    """A window is W steps of every property, oldest first; then one per `stride` steps."""
    b = WindowBuilder(PROPS, length=3, stride=2)
    got = [_step(b, 1000 * i, float(i), 50.0 + i) for i in range(8)]
    windows = [w for w in got if w is not None]
    assert [i for i, w in enumerate(got) if w is not None] == [2, 4, 6]
    assert windows[0].values == (0.0, 50.0, 1.0, 51.0, 2.0, 52.0)
    assert (windows[0].start_ms, windows[0].end_ms) == (1, 2001)  # a step is stamped with its newest reading


def test_bad_readings_are_skipped_and_gaps_restart_the_window():
    """An error reading delays the step; a gap longer than max_gap_ms starts a new window."""
    b = WindowBuilder(PROPS, length=2, stride=1, max_gap_ms=5000)
    assert b.add(Reading(SENSOR, "temperature", None, 0, ERROR, "checksum")) is None
    assert _step(b, 0, 20.0, 50.0) is None
    assert _step(b, 1000, 20.1, 50.1) is not None
    assert _step(b, 60_000, 20.2, 50.2) is None          # gap: the buffer starts over
    assert b.gaps == 1 and b.skipped == 1
    assert _step(b, 61_000, 20.3, 50.3).values == (20.2, 50.2, 20.3, 50.3)


def test_min_step_subsamples():
    """Steps closer than min_step_ms to the previous one are dropped."""
    b = WindowBuilder(PROPS, length=2, min_step_ms=10_000)
    results = [_step(b, 1000 * i, float(i), 0.0) for i in range(25)]
    w = [r for r in results if r is not None]
    assert w[0].values == (0.0, 0.0, 10.0, 0.0) and w[1].values == (10.0, 0.0, 20.0, 0.0)


def test_a_seeded_window_decides_on_the_next_live_step_unless_the_history_is_stale():
    """seed(): earlier readings fill the buffer without yielding windows; the next live step
    closes a window that starts in them. History older than max_gap_ms is not used."""
    history = [Reading(SENSOR, name, v, 1000 * i + k) for i in range(5)
               for k, (name, v) in enumerate((("temperature", 20.0 + i), ("humidity", 50.0 + i)))]
    b = WindowBuilder(PROPS, length=3, stride=1, max_gap_ms=5000)
    assert b.seed(history, now_ms=6000) == 3
    window = _step(b, 5000, 25.0, 55.0)
    assert window is not None and window.values == (23.0, 53.0, 24.0, 54.0, 25.0, 55.0)
    assert window.start_ms == 3001  # the oldest step is from the history
    assert (b.gaps, b.skipped) == (0, 0)
    stale = WindowBuilder(PROPS, length=3, stride=1, max_gap_ms=5000)
    assert stale.seed(history, now_ms=60_000) == 0
    assert _step(stale, 60_000, 25.0, 55.0) is None
    # A clock that went back (a Pi without a real-time clock, before its time sync): history
    # "from the future" is not used either.
    behind = WindowBuilder(PROPS, length=3, stride=1, max_gap_ms=5000)
    assert behind.seed(history, now_ms=3000) == 0
    # A step the history left unfinished (a temperature without its humidity) stays unfinished.
    partial = WindowBuilder(PROPS, length=3, stride=1, max_gap_ms=5000)
    assert partial.seed([*history[:6], Reading(SENSOR, "temperature", 99.0, 4000)], now_ms=6000) == 3
    window = partial.add(Reading(SENSOR, "humidity", 55.0, 5000))
    assert window is None  # the live humidity waits for a live temperature


# --- settings ----------------------------------------------------------------------------


def test_anomaly_detection_flat_map_becomes_pipeline_settings():
    """KubeEdge's flat data map (numbers arrive as floats, lists as comma strings) maps onto the settings."""
    s = from_anomaly_detection(SENSOR, "temperature", {
        "model": "sensor_faults", "properties": "temperature, humidity", "window": 16.0, "stride": 2.0,
        "threshold": 0.7, "auditShare": 0.05, "deadlineS": 3.0, "alertOn": "spike,stuck",
        "setDevice": "default/relay", "setProperty": "power", "setValue": True, "setOtherwise": False})
    assert (s.device, s.properties, s.window, s.stride, s.threshold, s.audit_share, s.deadline_s) == (
        "default/probe", ["temperature", "humidity"], 16, 2, 0.7, 0.05, 3.0)
    kinds = [a.type for a in s.actions]
    assert kinds == ["publish", "alert", "set_desired"]
    assert s.actions[1].when == ["spike", "stuck"] and s.actions[2].otherwise is False
    with pytest.raises(ValueError, match="unknown key"):
        from_anomaly_detection(SENSOR, "temperature", {"model": "x", "treshold": 0.5})
    with pytest.raises(ValueError, match="model"):
        from_anomaly_detection(SENSOR, "temperature", {"window": 16})
    # In a local file the lists may be YAML lists (they were read as "['temperature'", "'humidity']").
    listed = from_anomaly_detection(SENSOR, "temperature", {
        "model": "sensor_faults", "properties": ["temperature", "humidity"], "alertOn": ["spike", "stuck"],
        "setDevice": "default/relay", "setProperty": "power", "setValue": True, "setOn": ["drift"]})
    assert listed.properties == ["temperature", "humidity"]
    assert listed.actions[1].when == ["spike", "stuck"] and listed.actions[2].when == ["drift"]


def test_a_devices_map_may_set_only_devices_of_its_namespace_and_name_only_shipped_models():
    """A Device's anomalyDetection map is written by whoever may write that Device: a bare setDevice is a
    device of its own namespace (it was default/<name>), another namespace is refused naming the key, and
    `model` is a name under models_dir, never a path. The mapper config's pipelines keep both."""
    team = DeviceId("team-a", "probe")
    base = {"model": "sensor_faults", "setProperty": "power", "setValue": True}
    s = from_anomaly_detection(team, "temperature", {**base, "setDevice": "heater"})
    assert (s.device, s.actions[-1].device) == ("team-a/probe", "team-a/heater")
    assert from_anomaly_detection(team, "t", {**base, "setDevice": "team-a/heater"}).actions[-1].device == \
        "team-a/heater"
    for target in ("kube-system/door", "default/heater"):
        with pytest.raises(ValueError, match=f"setDevice {target}: .*own namespace \\(team-a\\)"):
            from_anomaly_detection(team, "temperature", {**base, "setDevice": target})
    for model in ("/etc/mapper/evil", "../models/sensor_faults", "..", "./sensor_faults", "sub/dir", "a\\b",
                  ".hidden", "~root"):
        with pytest.raises(ValueError, match="model .*not a path"):
            from_anomaly_detection(team, "temperature", {"model": model})
    # the operator's own config: any namespace and paths, as before
    own = PipelineSettings.model_validate({"device": "team-a/probe", "model": "/opt/models/mine", "actions": [
        {"type": "set_desired", "device": "kube-system/door", "property": "open", "value": True}]})
    assert own.actions[0].device == "kube-system/door"
    # The operator's own device files (not a Device edgecore sent): as before, a bare name is default/.
    yaml = from_anomaly_detection(team, "temperature", {**base, "model": "/opt/models/mine", "setDevice": "heater"},
                                  confined=False)
    assert (yaml.model, yaml.actions[-1].device) == ("/opt/models/mine", "default/heater")
    assert InferenceSettings().resolve_model(own.model) == Path("/opt/models/mine")


def test_the_maps_of_device_files_are_config_problems_at_their_lines_edgecores_are_not(tmp_path):
    """A local device file's anomalyDetection map with a mistake is a problem at its file, line and key
    (`mapper run` refuses to start with it: test_reload.py); the same Device sent by edgecore is not (its
    mistakes are logged and its pipeline left out: a cloud object must not stop the node's mapper), nor a
    local one with `from_devices: false` (the maps are not read). A right map on a device with the model's
    properties is no problem."""
    import yaml

    from devices.loader import load, load_objects
    from mapper.inference.extension import config_problems

    push = ("      pushMethod:\n        anomalyDetection:\n          data:\n            model: sensor_faults\n"
            "            {}\n")
    devices = _devices(tmp_path, push=push.format("treshold: 0.5"))
    file = devices / "devices.yaml"
    line = next(n for n, text in enumerate(file.read_text().splitlines(), 1) if "treshold" in text)
    config = MapperConfig(node="n", devices=[devices], twin=TwinSettings(path=tmp_path / "t.db"))
    problems = config_problems(config, load([devices]).devices)
    assert [(p.file.endswith("devices.yaml"), p.line, p.field) for p in problems] == [
        (True, line, "spec.properties[0].pushMethod.anomalyDetection.data.treshold")], problems
    assert "unknown key(s) treshold (did you mean threshold?)" in problems[0].message
    off = config.model_copy(update={"inference": InferenceSettings(from_devices=False)})
    assert config_problems(off, load([devices]).devices) == []

    sent = load_objects([(f"dmi:{i}", doc) for i, doc in enumerate(yaml.safe_load_all(file.read_text()))]).devices
    assert sent[SENSOR].origin == "edgecore" and sent[SENSOR].properties[0].anomaly_detection
    assert config_problems(config, sent) == []

    _devices(tmp_path, push=push.format("name: probe-ad"))
    assert config_problems(config, load([devices]).devices) == []
    _devices(tmp_path, push=push.format("window: 8"))  # a mistake only the model tells
    [problem] = config_problems(config, load([devices]).devices)
    assert (problem.line, problem.field) == (line, "spec.properties[0].pushMethod.anomalyDetection.data.window")
    assert "window 8 but model" in problem.message
    # ... but not for a device this mapper does not run (another node's, no driver here: the
    # loader's unrunnable): no pipeline of it runs here, and its model may be on its node only.
    assert config_problems(config, load([devices]).devices, unrunnable={SENSOR}) == []
    _devices(tmp_path, push=push.format("treshold: 0.5"))  # its own keys are still checked
    assert len(config_problems(config, load([devices]).devices, unrunnable={SENSOR})) == 1


def test_a_maps_action_problems_are_at_their_own_keys_lines(tmp_path):
    """A problem with a map's setValue, setOtherwise or setOn (found once the model and the target are
    known) is at that key's line of the device file, a target property that is not writable at
    setProperty's: all of them were at setDevice's line."""
    from devices.loader import load
    from mapper.inference.extension import config_problems

    config = MapperConfig(node="n", devices=[tmp_path / "devices"], twin=TwinSettings(path=tmp_path / "t.db"))
    head = ("      pushMethod:\n        anomalyDetection:\n          data:\n            model: sensor_faults\n"
            "            setDevice: relay\n")
    cases = {
        "setValue": "            setProperty: power\n            setValue: banana\n",
        "setOtherwise": "            setProperty: power\n            setValue: true\n            setOtherwise: 7\n",
        "setOn": "            setProperty: power\n            setValue: true\n            setOn: spike,nonsense\n",
        "setProperty": "            setProperty: powre\n            setValue: true\n",
    }
    for key, tail in cases.items():
        devices = _devices(tmp_path, push=head + tail.rstrip("\n"))
        lines = (devices / "devices.yaml").read_text().splitlines()
        line = next(n for n, text in enumerate(lines, 1) if text.strip().startswith(f"{key}:"))
        [problem] = config_problems(config, load([devices]).devices)
        assert (problem.line, problem.field) == (line, f"spec.properties[0].pushMethod.anomalyDetection.data.{key}"), \
            (key, str(problem))


def test_config_file_inference_section(tmp_path):
    """`inference:` may be a bare list; model paths are relative to the config file, names to models_dir."""
    path = tmp_path / "m.yaml"
    path.write_text("inference:\n  - {device: probe, model: sensor_faults}\n  - {device: probe, model: ./mine}\n")
    config = load_config(path, env={})
    assert isinstance(config.inference, InferenceSettings)
    first, second = config.inference.pipelines
    assert config.inference.resolve_model(first.model) == MODELS / "sensor_faults"
    assert config.inference.resolve_model(second.model) == tmp_path / "mine"
    path.write_text("inference:\n  pipelines: [{device: probe, model: x, audit_share: 2}]\n")
    with pytest.raises(Exception, match="audit_share"):
        load_config(path, env={})


def test_config_pipeline_problems_name_their_line_and_field_and_wait_for_edgecores_devices(tmp_path):
    """The config's pipelines checked against the devices (what `mapper run` and a SIGHUP reload refuse),
    each at its line and field, in the bare-list form too; under `mode: kubeedge` a device the files do
    not define is no problem (edgecore sends its devices after the start), a model that is not there is."""
    from devices.loader import load
    from mapper.inference.extension import config_problems

    definitions = load([_devices(tmp_path)]).devices
    path = tmp_path / "m.yaml"
    path.write_text("inference:\n"
                    "  - {device: probe, model: sensor_faults, window: 3}\n"
                    "  - device: probe\n    name: relay\n    model: sensor_faults\n"
                    "  - device: probe\n    model: sensor_faults\n    name: probe-b\n    actions:\n"
                    "      - {type: publish}\n"
                    "      - {type: set_desired, device: relay, property: power, value: banana}\n"
                    "  - {device: edge-only, model: sensor_faults}\n"
                    "  - {device: probe, model: sensor_faults}\n"
                    "  - {device: probe, model: sensor_faults}\n")
    found = [str(p) for p in config_problems(load_config(path, env={}), definitions)]
    assert found[0].startswith(f"{path}:2: inference.pipelines[0].window: pipeline default/probe-sensor-faults: "
                               "window 3"), found
    assert found[1].startswith(f"{path}:4: inference.pipelines[1].name: pipeline default/relay: its derived "
                               "device"), found
    assert found[2].startswith(f"{path}:11: inference.pipelines[2].actions[1].value: pipeline default/probe-b: set_desired "
                               "value for default/relay/power: property 'power': expected a boolean"), found
    assert found[3] == (f"{path}:12: inference.pipelines[3].device: no device default/edge-only in the device files "
                        "(`devices:`); devices here: default/probe, default/relay"), found
    assert found[4].startswith(f"{path}:14: inference.pipelines[5].name: pipeline default/probe-sensor-faults is "
                               "configured twice (also inference.pipelines[4])"), found
    assert len(found) == 5, found

    path.write_text("mode: kubeedge\nkubeedge: {name: m, protocol: simulated}\ninference:\n  pipelines:\n"
                    "    - {device: edge-only, model: sensor_faults}\n    - {device: edge-only, model: ./nowhere}\n")
    found = [str(p) for p in config_problems(load_config(path, env={}), definitions)]
    assert len(found) == 1 and found[0].startswith(f"{path}:6: inference.pipelines[1].model: {tmp_path}/nowhere/"
                                                   "model.json: not found"), found


def test_a_model_that_fails_to_load_in_any_way_is_a_problem_at_its_line(tmp_path):
    """A model.json without `files.edge` (KeyError) or an edge.onnx onnxruntime refuses (its own
    exception class) is a problem at the pipeline's `model` line, like a model not found: both
    escaped the check, a traceback at the start and at a SIGHUP instead of FILE:LINE."""
    import json

    from devices.loader import load
    from mapper.inference.extension import config_problems

    definitions = load([_devices(tmp_path)]).devices
    keyless = tmp_path / "models" / "keyless"
    shutil.copytree(REPO / "models" / "sensor_faults", keyless)
    card = json.loads((keyless / "model.json").read_text())
    del card["files"]["edge"]
    (keyless / "model.json").write_text(json.dumps(card))
    garbled = tmp_path / "models" / "garbled"
    shutil.copytree(REPO / "models" / "sensor_faults", garbled)
    (garbled / "edge.onnx").write_bytes(b"not an onnx graph")
    card = json.loads((garbled / "model.json").read_text())
    card["sha256"]["edge.onnx"] = hashlib.sha256(b"not an onnx graph").hexdigest()  # its checksum matches
    (garbled / "model.json").write_text(json.dumps(card))
    path = tmp_path / "m.yaml"
    path.write_text(f"inference:\n  models_dir: {tmp_path / 'models'}\n  pipelines:\n"
                    "    - {device: probe, model: keyless}\n"
                    "    - {device: probe, model: garbled, name: probe-g}\n")
    found = [str(p) for p in config_problems(load_config(path, env={}), definitions)]
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:4: inference.pipelines[0].model: "), found
    assert found[1].startswith(f"{path}:5: inference.pipelines[1].model: "), found
    assert str(keyless) in found[0] and str(garbled) in found[1], found


def test_mapper_runs_without_onnxruntime_when_no_pipeline(tmp_path):
    """With numpy and onnxruntime unimportable, a mapper without pipelines starts and stops."""
    devices = _devices(tmp_path)
    script = textwrap.dedent(f"""
        import sys, asyncio
        sys.modules['onnxruntime'] = None
        sys.modules['numpy'] = None
        from mapper.config import MapperConfig
        from mapper.runtime import build_service
        config = MapperConfig.model_validate({{'devices': [{str(devices)!r}], 'twin': {{'path': {str(tmp_path / 't.db')!r}}}}})
        service = build_service(config)
        async def main():
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            await asyncio.wait_for(service.ready.wait(), 10)
            stop.set()
            await task
        asyncio.run(main())
        print('ran', [type(e).__name__ for e in service.extensions])
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ran" in done.stdout


# --- the extension in a running service, on the broker ------------------------------------

DEVICES = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {{name: dht-model, namespace: default}}
spec:
  protocol: simulated
  properties:
    - {{name: temperature, type: FLOAT, accessMode: ReadOnly, unit: Celsius}}
    - {{name: humidity, type: FLOAT, accessMode: ReadOnly, unit: Percent}}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {{name: probe, namespace: default}}
spec:
  deviceModelRef: {{name: dht-model}}
  protocol:
    protocolName: simulated
    configData: {{seed: 3, faults: {{rate: {rate}, seed: 5}}{probe}}}
  properties:
    - name: temperature
      visitors: {{protocolName: simulated, configData: {{kind: temperature, base: 21.5, noise: 0.05, resolution: 0.1}}}}
      collectCycle: {cycle}
{push}
    - name: humidity
      visitors: {{protocolName: simulated, configData: {{kind: humidity, base: 48, noise: 0.1, resolution: 0.1}}}}
      collectCycle: {cycle}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {{name: relay-model, namespace: default}}
spec:
  protocol: simulated
  properties:
    - {{name: power, type: BOOLEAN, accessMode: ReadWrite}}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {{name: relay, namespace: default}}
spec:
  deviceModelRef: {{name: relay-model}}
  protocol: {{protocolName: simulated, configData: {{}}}}
  properties:
    - name: power
      visitors: {{protocolName: simulated, configData: {{kind: switch}}}}
      collectCycle: 1000
"""


def _devices(tmp_path: Path, *, rate: float = 0.05, cycle: int = 10, push: str = "", probe: str = "") -> Path:
    """The devices file; `probe`: more of the probe's configData (`, key: value`)."""
    d = tmp_path / "devices"
    d.mkdir(exist_ok=True)
    (d / "devices.yaml").write_text(DEVICES.format(rate=rate, cycle=cycle, push=push, probe=probe))
    return d


class Listener:
    """What one probe receives, collected without blocking the event loop (paho's thread queues it)."""

    def __init__(self, probe: MqttProbe, *topic_filters: str) -> None:
        """Subscribe `probe` to `topic_filters`; the probe is closed if that fails (else by its owner)."""
        self.probe = probe
        self.messages: list[tuple[str, bytes]] = []
        try:
            for topic_filter in topic_filters:
                code = probe.subscribe(topic_filter)
                assert not code.is_failure, (topic_filter, code)
        except BaseException:
            probe.close()
            raise

    def _collect(self) -> list[tuple[str, bytes]]:
        while True:
            try:
                message = self.probe.messages.get_nowait()
            except queue.Empty:
                return self.messages
            self.messages.append((message.topic, bytes(message.payload)))

    def payloads(self, topic: str) -> list[bytes]:
        """The payloads received on `topic`, in arrival order."""
        return [p for t, p in self._collect() if t == topic]

    def bodies(self, suffix: str) -> list[dict]:
        """The JSON payloads received on topics ending in `suffix`, in arrival order."""
        return [orjson.loads(p) for t, p in self._collect() if t.endswith(suffix)]


class Running:
    """A MapperService in this event loop and, with a running broker, what an app (decisions, alerts, the node's
    availability) and a cloud worker (offload requests) receive from it, each as its user of the shipped ACL."""

    def __init__(self, service, ext, task, stop, app: Listener | None = None, cloud: Listener | None = None):
        self.service, self.ext, self.task, self.stop = service, ext, task, stop
        self.app, self.cloud = app, cloud
        self.topics = Topics(service.config.node)
        self.broker: MosquittoBroker | None = None  # where a worker's results are published (send_result)

    async def outbox(self, suffix: str):
        rows = await self.service.twin(lambda s: s.outbox_pending(limit=100_000))
        return [(r.topic, orjson.loads(r.payload)) for r in rows if r.topic.endswith(suffix)]

    async def decisions(self, pipeline: str = "default/probe-sensor-faults"):
        return await self.service.twin(lambda s: records.recent(s, pipeline, 100_000))

    def pipeline(self):
        return next(iter(self.ext.pipelines.values()))

    def requests(self) -> list[dict]:
        """The offload requests the worker received, in arrival order."""
        assert self.cloud is not None
        return self.cloud.bodies("/offload/request")

    def published(self, suffix: str = "/decision") -> list[dict]:
        """The decisions (or alerts) the app received, in arrival order."""
        assert self.app is not None
        return self.app.bodies(suffix)

    async def send_result(self, *payloads: bytes) -> None:
        """Publish on the mapper's result topic as the worker does (QoS 1, each acknowledged by the broker).
        As user `mapper`: the ACL lets `worker` write only the result topic of the node it is rendered for
        (broker.node), and each test's mapper has a node of its own (tests/test_mosquitto.py checks `worker`)."""
        assert self.broker is not None
        topic = self.topics.offload_result()

        def publish() -> None:
            with self.broker.client("mapper") as probe:
                for payload in payloads:
                    code = probe.publish(topic, payload)
                    assert code is not None and not code.is_failure, code

        await asyncio.to_thread(publish)


def _mqtt(tmp_path: Path, broker: MosquittoBroker) -> MqttSettings:
    """The mapper's `mqtt:` section for `broker`, as its `mapper` user (no session left behind on the broker)."""
    secret = tmp_path / "mapper.password"
    secret.write_text(broker.users["mapper"])
    secret.chmod(0o600)
    return MqttSettings(url=f"mqtt://{broker.host}:{broker.port}", username="mapper", password_file=secret,
                        reconnect_min_s=0.2, reconnect_max_s=1.0, session_expiry_s=0)


async def _start(tmp_path, pipeline: dict, *, broker: MosquittoBroker | None = None, push: str = "",
                 inference: dict | None = None, cycle: int = 10, probe: str = "",
                 loop: DeviceLoopSettings | None = None, node: str | None = None) -> Running:
    """The mapper as `mapper run` assembles it. Without `broker` there is no `mqtt:` section; with one, the node
    name is new (nothing of an earlier test reaches it) unless given, and if the broker runs, the app and the worker listen
    before the mapper starts and it returns once the app saw the node come online."""
    node = node or f"n{secrets.token_hex(4)}"
    settings = InferenceSettings.model_validate(inference if inference is not None else {"pipelines": [pipeline]})
    config = MapperConfig(node=node, devices=[_devices(tmp_path, cycle=cycle, push=push, probe=probe)],
                          twin=TwinSettings(path=tmp_path / "twin.db", batch_delay_ms=5), inference=settings,
                          loop=loop or DeviceLoopSettings(),
                          mqtt=_mqtt(tmp_path, broker) if broker is not None else None)
    service = build_service(config)
    ext = next(e for e in service.extensions if isinstance(e, InferenceExtension))
    listeners: list[Listener] = []
    try:
        if broker is not None and broker.running:
            base = f"mapper/{node}"
            listeners.append(Listener(broker.client("app"), f"{base}/availability", f"{base}/default/+/decision",
                                      f"{base}/default/+/alert"))
            listeners.append(Listener(broker.client("worker"), f"{base}/offload/request"))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        r = Running(service, ext, task, stop, *listeners)
        r.broker = broker
        try:
            # Ready, or the start refused (a config mistake raises at once: not after the 10 s).
            ready = asyncio.ensure_future(service.ready.wait())
            await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()
            if not service.ready.is_set():
                raise TimeoutError("the mapper not ready within 10 s")
            if r.app is not None:
                await async_wait_for(lambda: b"online" in r.app.payloads(f"{base}/availability"), timeout=10,
                                     what="the node online (the mapper connected and subscribed)")
        except BaseException:
            stop.set()
            await asyncio.wait_for(task, 20)
            raise
    except BaseException:
        for listener in listeners:
            listener.probe.close()
        raise
    return r


async def _stop(r: Running):
    """Stop the mapper and close the probes. With a broker, first wait until the app saw the node go offline:
    the mapper says so after its outbox drained, so by then everything it published has arrived."""
    r.stop.set()
    try:
        await asyncio.wait_for(r.task, 20)
        if r.app is not None:
            await async_wait_for(lambda: r.app.payloads(r.topics.node_availability())[-1:] == [b"offline"],
                                 timeout=10, what="the node offline")
    finally:
        for listener in (r.app, r.cloud):
            if listener is not None:
                listener.probe.close()


def _assert_derived_shows_the_newest_decision(store, pipeline: str = "default/probe-sensor-faults") -> None:
    """The derived device's properties are the decision of the newest decided window (runs on the twin thread)."""
    decided = [x for x in records.recent(store, pipeline, 100_000) if x["label"] is not None]
    assert decided, "nothing decided yet"
    newest = max(decided, key=lambda x: x["window_end_ts"])
    twin = store.device(DeviceId.parse(pipeline))
    shown = {name: p.reported for name, p in twin.properties.items()}
    assert shown == {"label": newest["label"], "confidence": newest["confidence"], "exit": newest["exit"],
                     "provisional": newest["status"] == records.PROVISIONAL, "window_end": newest["window_end_ts"]}
    assert twin.protocol == "derived" and twin.state == "ok"
    assert not any(p.writable for p in twin.properties.values())


def _answer(worker: CloudWorker, body: dict, **change) -> bytes:
    """The worker's answer to a request the mapper sent (its own code and cloud graph), with `change`s."""
    node = body["node"]
    topic, payload = worker.answer(f"mapper/{node}/offload/request", orjson.dumps(body))
    assert topic == f"mapper/{node}/offload/result"
    return orjson.dumps({**orjson.loads(payload), **change}) if change else payload


def _now_ms() -> int:
    """The mapper's clock (wall time in ms, as in a request's `created`)."""
    return time.time_ns() // 1_000_000


async def _row(r: Running, request_id: str) -> dict:
    """The twin's decision row of one offload request."""
    return next(x for x in await r.decisions() if x["request_id"] == request_id)


async def _until(fetch, ok, timeout: float = 20.0, what: str = "condition"):
    """async_wait_for for a check that needs the twin (polls; no sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def worker():
    return CloudWorker(WorkerSettings(models=["sensor_faults"], worker_id="t"))


async def test_offload_provisional_final_and_rejections(tmp_path, broker, worker, caplog):
    """Uncertain windows are offloaded; after the deadline the edge answer stands provisionally; the
    cloud answer replaces it; duplicates, unknown, wrong-node, mismatched and malformed results are counted."""
    import logging

    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.3, "resend_s": 60},
                     broker=broker)
    try:
        ext = r.ext
        stats = lambda: ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        await async_wait_for(lambda: stats()["provisional"] >= 2 and stats()["edge_exits"] >= 2, timeout=20,
                             what="provisional decisions and edge exits")
        # A request reaches the worker through the outbox and the broker a moment after its row is in the
        # twin: what the worker received is read once two requests given up (provisional rows) have arrived.
        await _until(r.decisions, lambda rows: len({x["request_id"] for x in rows if x["status"] == "provisional"}
                                                   & {b["id"] for b in r.requests()}) >= 2,
                     what="two requests given up, at the worker")
        requests = r.requests()
        assert requests and all(not b["audit"] and b["node"] == r.topics.node and b["enc"] == "int8"
                                for b in requests)
        rows = {row["request_id"]: row for row in await r.decisions()}
        provisional = [b for b in requests if rows[b["id"]]["status"] == "provisional"]
        assert provisional, "deadline passed but no row is provisional"
        edge_rows = [row for row in rows.values() if row["exit"] == "edge" and row["status"] == "final"]
        assert all(row["request_id"] is None for row in edge_rows)

        target = provisional[0]
        before = stats()["replaced"]
        await r.send_result(_answer(worker, target))
        await async_wait_for(lambda: stats()["results_ok"] == 1, what="the cloud answer accepted")
        assert stats()["replaced"] == before + 1
        # Its round trip is measured (how long is the clock's business, not this test's).
        assert stats()["mean_round_trip_ms"] > 0 and stats()["round_trip_ms_p50"] > 0
        # It commits with the next batch of readings (or on its own within TIMER_GRACE_S).
        row = await _until(lambda: _row(r, target["id"]), lambda x: x["exit"] == "cloud",
                           what="the answer committed")
        assert row["status"] == "final"
        expected_cloud = r.pipeline().cloud_answer(tuple(orjson.loads(_answer(worker, target))["logits"]))
        assert (row["label"], row["cloud_label"]) == (expected_cloud[0], expected_cloud[0])
        mine = lambda: [b for b in r.published() if b["request_id"] == target["id"]]  # noqa: E731
        await async_wait_for(lambda: len(mine()) == 2, what="the cloud decision at the app")
        assert [(b["exit"], b["provisional"], b["label"]) for b in mine()] == [
            ("edge", True, rows[target["id"]]["edge_label"]), ("cloud", False, expected_cloud[0])]
        await r.service.twin(_assert_derived_shows_the_newest_decision)

        # hostile or stray results: counted, never applied
        other = provisional[1] if len(provisional) > 1 else requests[-1]
        for payload in (_answer(worker, target),                         # duplicate
                        _answer(worker, other, node="n2"),               # wrong node
                        _answer(worker, other, model="x"),               # mismatch
                        _answer(worker, other, id="f" * 16),             # unknown
                        b"\xff\x00garbage",                              # malformed
                        _answer(worker, other, logits=[1.0, 2.0])):      # mismatch (number of logits)
            await r.send_result(payload)
        await async_wait_for(lambda: ext.status()["results_rejected"] == {"duplicate": 1, "wrong_node": 1,
                                                                           "unknown": 1, "malformed": 1}
                             and stats()["results_rejected"] == {"mismatch": 2}, what="the rejections counted")
        assert stats()["results_ok"] == 1
        assert (await _row(r, other["id"]))["exit"] != "cloud"
        assert stats()["mean_edge_latency_us"] > 0
        # The log says what did not match (it said "x 1718000000000" and "number of logits").
        mismatched = [x for x in caplog.records if "result refused (mismatch)" in x.getMessage()]
        assert {x.levelno for x in mismatched} == {logging.WARNING}  # another version of the model: look at it
        mismatches = [x.getMessage() for x in mismatched]
        assert f"answer for model 'x' created {other['created']}, the request was for '{other['model']}'" \
            in mismatches[0], mismatches
        assert "2 logits, model 'sensor-faults-early-exit' has 5 classes; the worker runs another version of the " \
            "model: give it the node's (sensor_faults)" in mismatches[1], mismatches
    finally:
        await _stop(r)
    # Everything the mapper published has arrived: no second answer for the target, none for the other.
    assert [b["exit"] for b in r.published() if b["request_id"] == target["id"]] == ["edge", "cloud"]
    assert all(b["exit"] != "cloud" for b in r.published() if b["request_id"] == other["id"])


def test_recorded_decisions_are_the_derived_devices_properties(tmp_path):
    """Recording a decision reports it, in the same transaction, as the derived device's read-only properties:
    an edge exit; an offload (nothing yet); its provisional edge answer; the cloud's final answer replacing it.
    A late answer for an older window than the one shown updates its row, not the properties."""
    from devices.loader import load
    from twin.store import NotWritable, TwinStore

    pid = "default/probe-sensor-faults"
    derived = DeviceId.parse(pid)

    def decision(end: int, status: str, label: str | None, exit: str | None, request_id: str | None = None):
        return records.NewDecision(pid, "default/probe", end - 100, end, request_id, False, status, label,
                                   0.9 if label else None, exit, "normal", 0.55)

    def report(end: int, label: str, exit: str, provisional: bool = False, confidence: float = 0.9):
        return records.Report(pid, label, confidence, exit, provisional, end)

    def shown(store):
        twin = store.device(derived)
        return {name: p.reported for name, p in twin.properties.items()}

    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(load([_devices(tmp_path)]).devices.values())
        assert records.sync_derived(store, [records.derived_device(pid, "sensor-faults-early-exit",
                                                                   "default/probe")]) == []
        assert shown(store) == dict.fromkeys(["confidence", "exit", "label", "provisional", "window_end"])

        records.insert(store, [decision(1000, records.FINAL, "spike", "edge")], [], [report(1000, "spike", "edge")])
        assert shown(store) == {"label": "spike", "confidence": 0.9, "exit": "edge", "provisional": False,
                                "window_end": 1000}
        (pending,), _ = records.insert(store, [decision(2000, records.PENDING, None, None, "a" * 16)], [])
        assert shown(store)["window_end"] == 1000                       # offloaded: nothing decided yet
        records.update(store, [records.DecisionUpdate(pending, status=records.PROVISIONAL, label="normal",
                                                      confidence=0.55, exit="edge")], [],
                       [report(2000, "normal", "edge", True, 0.55)])
        assert shown(store) == {"label": "normal", "confidence": 0.55, "exit": "edge", "provisional": True,
                                "window_end": 2000}
        records.update(store, [records.DecisionUpdate(pending, status=records.FINAL, label="stuck", confidence=0.7,
                                                      exit="cloud", cloud_label="stuck", cloud_confidence=0.7)],
                       [], [report(2000, "stuck", "cloud", False, 0.7)])
        assert shown(store) == {"label": "stuck", "confidence": 0.7, "exit": "cloud", "provisional": False,
                                "window_end": 2000}
        assert [(v, q) for _, v, q in store.history(derived, "label")] == [
            ("spike", "good"), ("normal", "good"), ("stuck", "good")]
        assert store.device(derived).properties["label"].reported_version == 3

        # an older window (3000) still waits while a newer one (4000) is decided at the edge
        (older,), _ = records.insert(store, [decision(3000, records.PENDING, None, None, "b" * 16)], [])
        records.insert(store, [decision(4000, records.FINAL, "drift", "edge")], [], [report(4000, "drift", "edge")])
        records.update(store, [records.DecisionUpdate(older, status=records.FINAL, label="noise", confidence=0.8,
                                                      exit="cloud", cloud_label="noise", cloud_confidence=0.8)],
                       [], [report(3000, "noise", "cloud", False, 0.8)])
        assert shown(store)["label"] == "drift" and shown(store)["window_end"] == 4000
        assert {x["id"]: x for x in records.recent(store, pid)}[older]["label"] == "noise"   # the row has it
        _assert_derived_shows_the_newest_decision(store, pid)

        with pytest.raises(NotWritable):
            store.set_desired(derived, "label", "normal")
        assert records.sync_derived(store, []) == []                     # the pipeline is gone
        assert derived not in store.device_ids() and store.device(derived).state == "offline"
        assert shown(store)["label"] == "drift"


async def test_cloud_answers_ride_with_readings_else_commit_on_their_own(tmp_path, broker, worker, monkeypatch):
    """While readings flow, a cloud answer commits in the next batch's transaction (no transaction of
    its own); with no readings it commits within TIMER_GRACE_S; one still waiting at a stop is
    committed before the mapper exits, and the app gets its decision before the node goes offline."""
    from mapper.inference import extension

    # A spy, not a stand-in: which transaction a row was updated in leaves no trace in the twin file,
    # so the transactions of their own (records.update) are counted where they are made.
    own_transactions: list[int] = []
    real_update = records.update

    def counting_update(store, updates, *args, **kwargs):  # noqa: ANN001, ANN202
        own_transactions.append(len(updates))
        return real_update(store, updates, *args, **kwargs)

    monkeypatch.setattr(records, "update", counting_update)
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0,
                                "deadline_s": 60, "resend_s": 60}, broker=broker)
    try:
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        await async_wait_for(lambda: len(r.requests()) >= 3, timeout=20, what="offload requests at the worker")
        first, second, third = r.requests()[:3]
        cloud = lambda x: x["exit"] == "cloud"  # noqa: E731

        await r.send_result(_answer(worker, first))
        row = await _until(lambda: _row(r, first["id"]), cloud, what="the first answer committed")
        assert row["status"] == "final"
        assert own_transactions == []  # it rode with a batch of readings

        for device in list(r.service.runners):  # no more readings, from any device
            await r.service.stop_device(device)
        await r.service.recorder.flush()  # and none still queued behind a commit under way
        await r.send_result(_answer(worker, second))
        await _until(lambda: _row(r, second["id"]), cloud, timeout=5, what="the second answer committed")
        assert own_transactions == [1]

        # The third waits at the stop: the timer's grace made long, not raced (a loaded machine can take
        # TIMER_GRACE_S between its acceptance and the look at its row, and the timer commits it).
        monkeypatch.setattr(extension, "TIMER_GRACE_S", 600.0)
        await r.send_result(_answer(worker, third))
        await async_wait_for(lambda: stats()["results_ok"] == 3, what="the third answer accepted")
        assert (await _row(r, third["id"]))["status"] == "pending"  # not committed yet (TIMER_GRACE_S)
    finally:
        await _stop(r)  # well within the timer's grace of the third answer
    with TwinStore.open(tmp_path / "twin.db") as store:
        row = {x["request_id"]: x for x in records.recent(store, "default/probe-sensor-faults", 100_000)}[third["id"]]
    assert (row["status"], row["exit"]) == ("final", "cloud")
    assert [(b["exit"], b["label"]) for b in r.published() if b["request_id"] == third["id"]] == [
        ("cloud", row["label"])]


async def test_resends_wait_quietly_while_the_bus_is_down(tmp_path):
    """A resend that falls due while the broker is unreachable is not queued (it would only pile up in the
    outbox behind the request itself) and does not make the timer task spin: it waits for the next resend
    time. Once the broker is up, the queued requests go out and the resends resume."""
    own = MosquittoBroker()  # rendered but not started: nothing listens on its port yet
    worker_sees: Listener | None = None
    try:
        r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0,
                                    "deadline_s": 600, "resend_s": 0.2}, broker=own)
        try:
            stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
            await async_wait_for(lambda: stats()["offloads"] >= 3, timeout=20, what="offloaded windows")
            for device in list(r.service.runners):  # no more windows: only the timer task is left
                await r.service.stop_device(device)
            await r.service.recorder.flush()
            queued = sorted(b["id"] for _, b in await r.outbox("/offload/request"))
            assert len(queued) == stats()["offloads"] >= 3 and not r.service.bus.bus.connected.is_set()
            # A spy, not a stand-in: a timer that spins without sending anything leaves no trace in the
            # twin or on the broker, so its scans are counted where they happen, each with the time on the
            # clock its due times are on (the `now` it scans at, _mono_ms).
            scans: list[int] = []
            real = r.ext._collect_due

            def counting(now, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
                scans.append(now)
                return real(now, *args, **kwargs)

            r.ext._collect_due = counting
            newest = max(b["created"] for _, b in await r.outbox("/offload/request"))
            overdue_ms = int((0.2 + TIMER_GRACE_S) * 1000) + 300
            await async_wait_for(lambda: _now_ms() > newest + overdue_ms, timeout=10,
                                 what="every first resend overdue by more than TIMER_GRACE_S")
            seen = len(scans)
            await async_wait_for(lambda: len(scans) >= seen + 4, timeout=20, what="the timer scanning on its own")
            # Each scan moves the resends it found due to a resend period later, sent or not: a scan per
            # resend period at most (else the due time stayed behind and the timer spins on it).
            after = scans[seen:]
            assert all(b - a >= 200 for a, b in zip(after, after[1:], strict=False)), (
                f"scans {[b - a for a, b in zip(after, after[1:], strict=False)]} ms apart, resends due every 200 ms")
            assert stats()["resent"] == 0  # the bus is down: nothing was queued twice
            assert sorted(b["id"] for _, b in await r.outbox("/offload/request")) == queued

            own.start()
            worker_sees = Listener(own.client("worker"), r.topics.offload_request())
            seen = lambda: Counter(b["id"] for b in worker_sees.bodies("/offload/request"))  # noqa: E731
            await async_wait_for(lambda: set(seen()) == set(queued) and max(seen().values()) >= 2, timeout=20,
                                 what="every queued request at the worker, and one of them again")
        finally:
            await _stop(r)
    finally:
        if worker_sees is not None:
            worker_sees.probe.close()
        own.close()


async def test_on_demand_reads_are_recorded_but_are_no_window_steps(tmp_path):
    """A dashboard polling REST `GET /api/v1/device/...` (or a DMI GetDevice) reads the device on demand:
    those readings go into the twin like any other, but are not steps of the pipeline's windows, which
    stay at the collect cycle's cadence the model was trained on. They used to be steps: here 20 polls
    between two collect reads made a full window of 16 steps 0.1 s apart instead of 10 minutes."""
    from mapper.dmi.rest import RestApi
    from mapper.dmi.settings import ApiSettings

    # Every poll reads the device (by default, one within 1 s of the property's last reading is
    # answered with it and records nothing).
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults"}, cycle=600_000,
                     loop=DeviceLoopSettings(on_demand_min_interval_s=0))
    try:
        pipeline = r.pipeline()
        # The collect loop's first round (both properties) is the window's first step.
        await async_wait_for(lambda: len(pipeline.builder._steps) == 1, what="the first collect step")
        api = RestApi(ApiSettings(), r.service, asyncio.get_running_loop())
        for _ in range(20):
            for prop in ("temperature", "humidity"):
                got = await asyncio.to_thread(api.read_property, "default", "probe", prop)
                assert got["Data"]["PropertyName"] == prop
        await r.service.recorder.flush()
        history = await r.service.twin(lambda s: s.history(SENSOR, "temperature", 100))
        assert len(history) >= 21  # recorded: the collect read and the 20 polls
        # No steps from the polls (a collect round may have come meanwhile: cycles align to the clock's grid).
        assert len(pipeline.builder._steps) <= 2
        assert r.ext.status()["pipelines"]["default/probe-sensor-faults"]["windows"] == 0
        assert r.service.recorder.on_demand == {}  # nothing held once their batches were through the hooks
    finally:
        await _stop(r)


async def test_an_on_demand_read_whose_caller_gave_up_is_no_window_step(tmp_path, monkeypatch):
    """A REST read of a device that was failing: the read succeeds, and the device's return to `ok`
    waits for the twin (another process holds its lock). The caller gives up (the API's timeout; a
    client gone, a DMI GetDevice past its deadline alike); the reading already taken is still
    recorded, but it was recorded as the device's own sampling: a step of the pipeline's window
    at a time the collect cycle never chose. It is recorded as the on-demand reading it is."""
    from mapper.dmi import rest
    from mapper.dmi.rest import ApiError, RestApi
    from mapper.dmi.settings import ApiSettings

    unplugged = tmp_path / "unplugged"
    unplugged.touch()  # the first collect round fails: the device is not `ok`
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults"}, cycle=600_000,
                     probe=f", fail_while_exists: '{unplugged}'", loop=DeviceLoopSettings(on_demand_min_interval_s=0))
    lock = sqlite3.connect(tmp_path / "twin.db", isolation_level=None)
    try:
        pipeline = r.pipeline()
        runner = r.service.runners[SENSOR]
        await async_wait_for(lambda: runner.read_errors >= 2, what="the failed first collect round")
        lock.execute("BEGIN IMMEDIATE")
        unplugged.unlink()
        monkeypatch.setattr(rest, "CALL_TIMEOUT_S", 0.5)
        api = RestApi(ApiSettings(), r.service, asyncio.get_running_loop())
        with pytest.raises(ApiError, match="no answer within"):
            await asyncio.to_thread(api.read_property, "default", "probe", "temperature")
        assert runner.state == "ok"  # (in memory: its write waits for the lock)
        lock.execute("ROLLBACK")
        history = await _until(lambda: r.service.twin(lambda s: s.history(SENSOR, "temperature", 100)),
                               lambda rows: any(value is not None for _, value, _ in rows),
                               what="the read recorded")
        assert [value is not None for _, value, _ in history].count(True) == 1
        # Not a step, not even half of one (temperature waiting for humidity).
        assert pipeline.builder._current == {} and len(pipeline.builder._steps) == 0  # noqa: SLF001
        assert r.service.recorder.on_demand == {}
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        await _stop(r)


async def test_a_flood_of_garbage_results_is_counted_but_logged_a_few_times(tmp_path, broker, caplog):
    """1,000 malformed results: every one is counted, ten are logged (mapper.logs.Throttle)."""
    import logging

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults"}, broker=broker)
    try:
        with caplog.at_level(logging.INFO, logger="mapper.inference"):
            await r.send_result(*[b"\xff\x00garbage"] * 1000)
            await async_wait_for(lambda: r.ext.status()["results_rejected"].get("malformed") == 1000,
                                 what="every result counted")
        assert r.ext.status()["results_rejected"] == {"malformed": 1000}
        refused = [x for x in caplog.records if "result refused (malformed)" in x.getMessage()]
        assert len(refused) == 10
        # A worker that speaks another format is for someone to look at: WARNING (throttled, above), not INFO.
        assert {x.levelno for x in refused} == {logging.WARNING}
    finally:
        await _stop(r)


async def test_a_worker_without_the_model_is_a_warning_that_says_what_to_do(tmp_path, broker, worker, caplog):
    """A worker's `error` answer (it lacks the model or has another version of it) leaves the windows
    provisional for good: the mapper's log says so at WARNING, naming the model, its cloud graph and the fix."""
    import logging

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.05, "resend_s": 60},
                     broker=broker)
    try:
        request = await async_wait_for(lambda: next(iter(r.requests()), None), timeout=20, what="an offload")
        error = {k: v for k, v in orjson.loads(_answer(worker, request)).items() if k != "logits"}
        with caplog.at_level(logging.INFO, logger="mapper.inference"):
            await r.send_result(orjson.dumps({**error, "error": "unknown model"}))
            await async_wait_for(lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]
                                 ["results_rejected"].get("worker_error") == 1, what="the error counted")
        [line] = [x for x in caplog.records if "result refused (worker_error)" in x.getMessage()]
        sha = r.ext.pipelines[next(iter(r.ext.pipelines))].model.info.cloud_sha256[:16]
        assert line.levelno == logging.WARNING
        assert "worker 't' says 'unknown model'" in line.getMessage()
        assert f"'{request['model']}' with cloud graph sha256 {sha}" in line.getMessage()
        assert "give the worker the same version of the model (sensor_faults)" in line.getMessage()
    finally:
        await _stop(r)


def test_the_worker_logs_requests_for_models_it_lacks(worker, caplog):
    """The worker answers `unknown model` / `different cloud graph`: its own log says which node asked
    for what, and what to do, not only a count at its stop."""
    import logging

    info = worker.models["sensor-faults-early-exit"].info
    body = codec.OffloadRequest("0123456789abcdef", "n1", "d", "p", info.name, info.cloud_sha256[:16], 1, False,
                                "int8", np.ones(32, np.float32)).to_json()
    with caplog.at_level(logging.INFO, logger="mapper.worker"):
        worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "model": "other"}))
        worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "cloud_sha256": "f" * 16}))
    lines = [x for x in caplog.records if x.levelno == logging.WARNING]
    assert len(lines) == 2
    assert "node n1 asks for model 'other', which this worker does not have (it has: sensor-faults-early-exit)" \
        in lines[0].getMessage() and "put the node's model directory into models_dir" in lines[0].getMessage()
    assert f"sha256 ffffffffffffffff..., this worker has {info.cloud_sha256[:16]}..." in lines[1].getMessage()
    assert "give the node and the worker the same version of the model" in lines[1].getMessage()


async def test_late_results_are_refused_after_max_age(tmp_path, broker, worker):
    """A result after result_max_age_s is refused as late and the provisional answer stays."""
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.05,
                                "result_max_age_s": 0.4, "resend_s": 60}, broker=broker)
    try:
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        await async_wait_for(lambda: stats()["expired"] >= 1, timeout=20, what="an expired request")
        expired = await async_wait_for(lambda: next((b for b in r.requests() if _now_ms() - b["created"] > 400),
                                                    None), what="a request older than result_max_age_s")
        await r.send_result(_answer(worker, expired))
        await async_wait_for(lambda: r.ext.status()["results_rejected"] == {"late": 1}, what="the result refused")
        assert (await _row(r, expired["id"]))["status"] == "provisional"
        assert stats()["results_ok"] == 0
    finally:
        await _stop(r)
    assert [(b["exit"], b["provisional"]) for b in r.published() if b["request_id"] == expired["id"]] == [
        ("edge", True)]


async def test_a_late_answer_to_a_still_pending_offload_leaves_it_its_edge_answer(tmp_path, broker, worker,
                                                                                 monkeypatch):
    """An answer that comes after result_max_age_s, before the timer stood the request's edge answer
    (it runs a little after each due time): refused as late, and the edge answer stands at once,
    provisional and published. The request used to be forgotten, its row pending for good."""
    from mapper.inference import extension

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600,
                                "result_max_age_s": 60, "resend_s": 600}, broker=broker)
    try:
        request = await async_wait_for(lambda: next(iter(r.requests()), None), timeout=20, what="an offload")
        for device in list(r.service.runners):  # no more batches: what falls due is the timer's
            await r.service.stop_device(device)
        await r.service.recorder.flush()
        assert (await _row(r, request["id"]))["status"] == "pending"
        real = extension._mono_ms
        monkeypatch.setattr(extension, "_mono_ms", lambda: real() + 61_000)  # past expiry; the timer sleeps on
        await r.send_result(_answer(worker, request))
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        late = lambda: stats()["results_rejected"].get("late", 0) + r.ext.status()["results_rejected"].get("late", 0)  # noqa: E731
        await async_wait_for(lambda: late() == 1, what="the answer refused")
        row = await _until(lambda: _row(r, request["id"]), lambda row: row["status"] != "pending",
                           timeout=10, what="the edge answer standing")
        assert (row["status"], row["exit"], row["label"]) == ("provisional", "edge", row["edge_label"])
        assert stats()["waiting"] == 0 and stats()["results_ok"] == 0
        await r.send_result(_answer(worker, request))  # and it is remembered as expired
        await async_wait_for(lambda: late() == 2, what="the second answer refused")
    finally:
        await _stop(r)
    assert [(b["exit"], b["provisional"]) for b in r.published() if b["request_id"] == request["id"]] == [
        ("edge", True)]


async def test_a_forward_step_of_the_wall_clock_expires_nothing(tmp_path, broker, worker, monkeypatch):
    """timesyncd steps the wall clock an hour ahead (a Pi without RTC) while an offload waits: its deadline
    and expiry do not move, so no provisional answer comes before deadline_s and the worker's answer, sent
    at once, is accepted. On the wall clock every waiting request expired at once: the edge answers were
    published as provisional and acted on, and the cloud's answer was refused as late."""
    from mapper.inference import extension

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600,
                                "result_max_age_s": 1200, "resend_s": 600}, broker=broker)
    try:
        request = await async_wait_for(lambda: next(iter(r.requests()), None), timeout=20, what="an offload")
        real = extension._now_ms
        monkeypatch.setattr(extension, "_now_ms", lambda: real() + 3_600_000)
        r.ext._wake.set()  # the timer rescans what waits, on the stepped clock
        await r.send_result(_answer(worker, request))
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        handled = lambda: (stats()["results_ok"] + stats()["results_rejected"].get("late", 0)  # noqa: E731
                           + r.ext.status()["results_rejected"].get("late", 0))
        await async_wait_for(lambda: handled() >= 1, what="the answer handled")
        assert stats()["results_ok"] == 1 and stats()["results_rejected"] == {}
        row = await _until(lambda: _row(r, request["id"]), lambda x: x["status"] != "pending", what="decided")
        assert (row["status"], row["exit"]) == ("final", "cloud")
        assert stats()["provisional"] == 0 and stats()["expired"] == 0
        assert stats()["round_trip_ms_p50"] < 600_000  # measured on the monotonic clock, not the step
    finally:
        await _stop(r)
    assert [(b["exit"], b["provisional"]) for b in r.published() if b["request_id"] == request["id"]] == [
        ("cloud", False)]


async def test_a_backward_step_of_the_wall_clock_holds_nothing_back(tmp_path, broker, worker, monkeypatch):
    """The wall clock steps an hour back while offloads wait: their deadlines and resends still fall due
    after deadline_s and resend_s (not an hour later), and the answer afterwards is accepted."""
    from mapper.inference import extension

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 0.5,
                                "result_max_age_s": 600, "resend_s": 0.5}, broker=broker)
    try:
        request = await async_wait_for(lambda: next(iter(r.requests()), None), timeout=20, what="an offload")
        real = extension._now_ms
        monkeypatch.setattr(extension, "_now_ms", lambda: real() - 3_600_000)
        r.ext._wake.set()
        row = await _until(lambda: _row(r, request["id"]), lambda x: x["status"] != "pending", timeout=10,
                           what="the edge answer standing after deadline_s")
        assert (row["status"], row["exit"]) == ("provisional", "edge")
        await async_wait_for(lambda: Counter(b["id"] for b in r.requests())[request["id"]] >= 2, timeout=10,
                             what="the request sent again after resend_s")
        await r.send_result(_answer(worker, request))
        row = await _until(lambda: _row(r, request["id"]), lambda x: x["exit"] == "cloud", what="the answer")
        assert row["status"] == "final"
    finally:
        await _stop(r)
    assert [(b["exit"], b["provisional"]) for b in r.published() if b["request_id"] == request["id"]] == [
        ("edge", True), ("cloud", False)]


async def _run_until_offloads_pend(tmp_path, pipeline: dict) -> list[dict]:
    """Run the mapper until two or more offloads are pending, stop it, and return the pending rows."""
    r = await _start(tmp_path, pipeline)
    try:
        await _until(r.decisions, lambda rows: sum(x["status"] == "pending" for x in rows) >= 2,
                     what="pending offloads")
    finally:
        await _stop(r)
    with TwinStore.open(tmp_path / "twin.db") as store:
        return [x for x in records.recent(store, "default/probe-sensor-faults", 100_000) if x["status"] == "pending"]


async def test_offloads_pending_past_max_age_at_a_restart_get_their_edge_answer(tmp_path, monkeypatch, caplog):
    """The mapper stopped with offloads pending and stayed down longer than result_max_age_s: at the
    restart their edge answers stand, provisional, recorded (not published or acted on: windows
    that old). They used to stay pending in the twin for good."""
    from mapper.inference import extension

    pipeline = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600}
    pending = await _run_until_offloads_pend(tmp_path, pipeline)
    assert len(pending) >= 2
    real = extension._now_ms
    monkeypatch.setattr(extension, "_now_ms", lambda: real() + 601_000)  # down for more than result_max_age_s
    with caplog.at_level(logging.INFO, logger="mapper.inference"):
        r = await _start(tmp_path, pipeline)
        try:
            await async_wait_for(lambda: "past result_max_age_s" in caplog.text, what="the restart's log line")
            after = {x["id"]: x for x in await r.decisions()}
        finally:
            await _stop(r)
    assert f"{len(pending)} offload(s) from the previous run are past result_max_age_s" in caplog.text
    for old in pending:
        row = after[old["id"]]
        assert (row["status"], row["exit"], row["label"]) == ("provisional", "edge", old["edge_label"])
    assert "still wait for a result" not in caplog.text


async def test_offloads_restored_after_the_clock_went_back_wait_no_longer_than_their_deadline(tmp_path,
                                                                                               monkeypatch):
    """The mapper restarts with the wall clock an hour behind the one its pending rows were made with (rows
    "from the future"): what remains of their deadline is clamped to deadline_s, so their edge answers stand
    within it. Due times taken from the wall clock kept them pending for the hour."""
    from mapper.inference import extension

    pipeline = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 1, "resend_s": 600}
    pending = await _run_until_offloads_pend(tmp_path, pipeline)
    assert len(pending) >= 2
    real = extension._now_ms
    monkeypatch.setattr(extension, "_now_ms", lambda: real() - 3_600_000)
    r = await _start(tmp_path, pipeline)
    try:
        ids = {x["request_id"] for x in pending}
        async def restored():  # noqa: ANN202
            return {x["request_id"]: x["status"] for x in await r.decisions() if x["request_id"] in ids}

        rows = await _until(restored, lambda rows: set(rows.values()) == {"provisional"}, timeout=10,
                            what="the restored offloads' edge answers standing")
        assert set(rows) == ids
    finally:
        await _stop(r)


async def test_offloads_of_another_model_are_not_waited_for_after_a_restart(tmp_path):
    """The mapper restarts with another model under the pipeline (another name or cloud graph): the
    requests waiting from the previous run were cut by the old edge graph, so no answer for them can be
    used. Their edge answers stand at once (provisional) and they are not sent again. They used to wait
    (and be sent again, with the old model's name) until result_max_age_s, pending past their deadline."""
    pipeline = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600}
    pending = await _run_until_offloads_pend(tmp_path, pipeline)
    models = tmp_path / "models"
    shutil.copytree(MODELS / "sensor_faults", models / "sensor_faults")
    meta = orjson.loads((models / "sensor_faults" / "model.json").read_bytes())
    meta["name"] = "sensor-faults-v2"
    (models / "sensor_faults" / "model.json").write_bytes(orjson.dumps(meta))
    r = await _start(tmp_path, pipeline, inference={"models_dir": str(models), "pipelines": [pipeline]})
    try:
        assert r.pipeline().model.info.name == "sensor-faults-v2"
        rows = await _until(r.decisions, lambda rows: all(x["status"] != "pending" for x in rows
                                                        if x["id"] in {p["id"] for p in pending}),
                            what="the old offloads' edge answers")
        by_id = {x["id"]: x for x in rows}
        for old in pending:
            row = by_id[old["id"]]
            assert (row["status"], row["exit"], row["label"]) == ("provisional", "edge", old["edge_label"])
            assert old["request_id"] not in r.ext._waiting
    finally:
        await _stop(r)


async def test_a_late_cloud_answer_is_published_but_does_not_drive_the_actuator(tmp_path):
    """An answer for window A that arrives after a later window B was decided: it is published,
    but the relay follows B (the newest window wins, as on the derived device), and a later
    decision with B's label counts as no change. It used to switch the relay to A's label."""
    from mapper.inference.pipeline import Decision
    from mapper.inference.window import Window

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0, "actions": [
        {"type": "publish"},
        {"type": "set_desired", "device": "relay", "property": "power", "value": True, "otherwise": False}]},
        cycle=1000)
    try:
        p = r.pipeline()
        normal, fault = p.model.info.classes[0], p.model.info.classes[1]
        _, desired = p.act(Decision(normal, 0.9, "edge", False, Window((), 1000, 2000)), None)
        assert [d.value for d in desired] == [False]
        messages, desired = p.act(Decision(fault, 0.8, "cloud", False, Window((), 500, 1500), "req-a"), r.topics)
        assert desired == [] and [m.body["label"] for m in messages] == [fault]  # published, not acted on
        messages, desired = p.act(Decision(fault, 0.9, "edge", False, Window((), 2000, 3000)), r.topics)
        assert [d.value for d in desired] == [True]  # a newer window with that label: acted on
    finally:
        await _stop(r)



async def test_a_window_the_model_cannot_compute_is_a_counted_error_logged_a_few_times(tmp_path, caplog):
    """Readings that are good for the device (no minimum/maximum) but beyond float32 (1e39): the
    edge graph's output is NaN. Each such window is an `errors` count of its pipeline, logged a few
    times a minute with what it held; it used to reach the offload, whose encoder refused the NaN
    cut inside the recorder's pre-commit hook: a traceback per window, and every decision of that
    batch (other pipelines' too) lost."""
    import logging

    from devices.loader import load

    caplog.set_level(logging.INFO, logger="mapper")
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults"})
    try:
        devices = tmp_path / "devices"
        text = (devices / "devices.yaml").read_text()
        (devices / "devices.yaml").write_text(text.replace("base: 21.5", "base: 1.0e+39"))
        await r.service.update_devices(load([devices]))
        await async_wait_for(lambda: r.ext.pipelines and r.pipeline().stats.counts["errors"] >= 25, timeout=20,
                             what="windows of huge readings counted as errors")
        assert "pre-commit hook" not in caplog.text
        lines = [m for m in caplog.messages if "not decided" in m]
        assert 1 <= len(lines) <= 10, lines
        assert "the model's output is not finite" in lines[0] and "1e+39" in lines[0]
    finally:
        await _stop(r)

async def test_a_clean_stop_first_acts_on_the_last_decisions(tmp_path):
    """A closed-loop action still to be taken when a stop comes is taken before the mapper exits (the stop
    waits for it, bounded), not cancelled. The twin is slow for real: another writer (as `mapper twin set`
    would be) holds its write lock, so the first windows are decided only when the stop commits the readings.
    No event bus: its drain at a stop would give the action time of its own, so only the inference's wait
    could be missed."""
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 0.0, "actions": [
        {"type": "set_desired", "device": "relay", "property": "power", "value": True, "otherwise": False}]},
        cycle=20)
    writer: sqlite3.Connection | None = None
    try:
        faults = set(r.pipeline().model.info.classes[1:])  # the labels that set `value`; the others `otherwise`
        # The probe's first reading turned its state `ok` in the twin: from then on its reads need no twin call.
        await _until(lambda: r.service.twin(lambda s: s.device(SENSOR).state), lambda state: state == "ok",
                     what="the probe ok in the twin")
        writer = sqlite3.connect(tmp_path / "twin.db", timeout=10, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # from now on every twin write of the mapper waits
        assert writer.execute("SELECT COUNT(*) FROM inference_decisions").fetchone() == (0,), \
            "a window was decided before the twin was locked: the first action would not come at the stop"
        probe = r.service.runners[SENSOR]
        await async_wait_for(lambda: probe.reads >= 2 * 24, what="readings for a window, waiting for the twin")
        r.stop.set()
        await async_wait_for(lambda: not r.service.runners, what="the devices stopped")
        writer.execute("ROLLBACK")  # the stop commits the last readings: their windows are decided and acted on
    finally:
        if writer is not None:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            writer.close()
        await _stop(r)
    with TwinStore.open(tmp_path / "twin.db") as store:
        decided = [x for x in records.recent(store, "default/probe-sensor-faults", 100_000) if x["label"]]
        power = store.device(RELAY).properties["power"]
    assert decided, "the stop did not commit the last readings' decisions"
    newest = max(decided, key=lambda x: x["window_end_ts"])
    assert power.desired is not None, "the action on the decisions made at the stop was cancelled"
    assert power.desired is (newest["label"] in faults)


async def test_audits_closed_loop_and_alerts(tmp_path, broker, worker):
    """With audit_share 1 every edge exit is offloaded as an audit (compared, not replaced); decisions set the
    relay's desired value (only when it changes) and raise alerts for fault labels; the app gets a decision
    only when the label changes, and an alert for every fault."""
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "audit_share": 1.0, "deadline_s": 30,
                                "threshold": 0.5, "actions": [
                                    {"type": "publish", "only_changes": True},
                                    {"type": "alert"},
                                    {"type": "set_desired", "device": "relay", "property": "power",
                                     "value": True, "otherwise": False}]}, broker=broker)
    try:
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        audited = lambda: [b for b in r.requests() if b["audit"]]  # noqa: E731
        await async_wait_for(lambda: len(audited()) >= 3, timeout=20, what="audits at the worker")
        audits = audited()[:3]
        rows = {x["request_id"]: x for x in await r.decisions() if x["request_id"]}
        await r.send_result(*(_answer(worker, body) for body in audits))
        ids = {body["id"] for body in audits}
        after = await _until(r.decisions, lambda xs: all(x["cloud_label"] is not None for x in xs
                                                         if x["request_id"] in ids), what="the cloud answers committed")
        after = {x["request_id"]: x for x in after if x["request_id"]}
        for body in audits:
            cloud_label, _ = r.pipeline().cloud_answer(tuple(orjson.loads(_answer(worker, body))["logits"]))
            row = after[body["id"]]
            assert (row["exit"], row["label"], row["cloud_label"]) == ("edge", rows[body["id"]]["edge_label"],
                                                                       cloud_label)
        assert stats()["audit_agree"] + stats()["audit_disagree"] == 3

        await async_wait_for(lambda: stats()["windows"] >= 60, timeout=20, what="more windows")
    finally:
        await _stop(r)

    with TwinStore.open(tmp_path / "twin.db") as store:
        labels = [x["label"] for x in records.recent(store, "default/probe-sensor-faults", 100_000) if x["label"]]
        power = store.device(RELAY).properties["power"]
    alerts = r.published("/alert")
    published = [b["label"] for b in r.published("/decision")]
    faulty = [label != "normal" for label in labels]
    flips = sum(1 for a, b in zip(faulty, faulty[1:]) if a != b)
    assert power.desired is faulty[-1]
    assert power.desired_version == 1 + flips        # set once, then only when the answer flips
    assert len(alerts) == sum(faulty) and all(b["label"] != "normal" for b in alerts)
    assert any(faulty) and not all(faulty), labels
    assert published == [b for a, b in zip([None, *labels], labels) if a != b]   # only changes


async def test_pipeline_from_anomaly_detection_and_bad_targets_are_refused(tmp_path, broker):
    """A pipeline configured on the device (pushMethod.anomalyDetection) runs and publishes; a read-only target
    of a pipeline of the config refuses the start with a message at its field instead of crashing the mapper
    (it used to disable that pipeline and run the rest)."""
    from devices.errors import DefinitionError

    push = ("      pushMethod:\n        anomalyDetection:\n          data: {model: sensor_faults, deadlineS: 0.0,"
            " name: probe-ad}\n")
    with pytest.raises(DefinitionError, match=r"inference\.pipelines\[0\]\.actions\[0\]\.property: .* is ReadOnly"):
        await _start(tmp_path, {}, push=push, broker=broker, inference={"pipelines": [
            {"device": "probe", "model": "sensor_faults", "actions": [
                {"type": "set_desired", "device": "probe", "property": "temperature", "value": 1}]}]})
    r = await _start(tmp_path, {}, push=push, broker=broker, inference={"pipelines": []})
    try:
        assert list(map(str, r.ext.pipelines)) == ["default/probe-ad"]
        stats = lambda: r.ext.status()["pipelines"]["default/probe-ad"]  # noqa: E731
        await async_wait_for(lambda: stats()["windows"] >= 3, timeout=20, what="windows")
        rows = await r.decisions("default/probe-ad")
        assert rows and all(x["label"] is not None for x in rows if x["status"] != "pending")
        await async_wait_for(lambda: r.published("/probe-ad/decision"), what="a decision at the app")
        assert not r.published("/probe-sensor-faults/decision")
    finally:
        await _stop(r)


async def test_a_decision_for_a_locked_device_is_not_set_and_is_sent_again_once_unlocked(tmp_path, caplog):
    """`mapper lock`: a closed loop's set_desired is refused (logged a few lines a minute, not one a
    decision), and the next decision that wants the value after the unlock sets it."""
    from devices.loader import load

    relay_id = DeviceId("default", "relay")
    with TwinStore.open(tmp_path / "twin.db") as store:  # locked before the mapper starts, as `mapper lock` does
        store.sync_devices(load([_devices(tmp_path)]).devices.values())
        store.lock_device(relay_id, "ann", "pump rewiring")
    caplog.set_level(logging.INFO, logger="mapper.inference")
    refused = "inference: default/relay/power = True not set: refused: default/relay is locked for maintenance"
    classes = ["normal", "spike", "stuck", "drift", "noise"]
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 0.0, "actions": [
        {"type": "set_desired", "device": "relay", "property": "power", "value": True, "when": classes}]})
    try:
        relay = lambda s: s.device(relay_id).properties["power"]  # noqa: E731
        await async_wait_for(lambda: r.ext.counts["desired_refused"] >= 12, timeout=30, what="decisions refused")
        said = [m for m in caplog.messages if m.startswith(refused)]
        assert 1 <= len(said) <= 10, said  # (Throttle: 10 lines a minute)
        assert (await r.service.twin(relay)).desired is None
        await r.service.twin(lambda s: s.unlock_device(relay_id))
        await _until(lambda: r.service.twin(relay), lambda p: p.desired is True,
                     what="the relay's desired value set after the unlock")
    finally:
        await _stop(r)


async def test_a_desired_value_the_twin_could_not_take_is_sent_again(tmp_path, caplog):
    """The closed loop's set_desired fails (the twin refuses the write): the next decision that
    wants the same value sends it again. It used to count as sent, so the relay was never set
    while the label stayed the same.

    The refusal is SQLite's own, from a trigger on the relay's row while a marker row exists: a
    lock held by another connection, or a full disk, would refuse the decision's own commit just
    before it as well (the same twin connection, moments earlier), so it cannot be timed to hit
    this one write alone."""
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.conn.executescript("""
            CREATE TABLE test_refuse_relay (x);
            INSERT INTO test_refuse_relay VALUES (1);
            CREATE TRIGGER test_refuse_relay BEFORE UPDATE OF desired ON properties
            WHEN new.device_id = 'default/relay' AND new.name = 'power' AND EXISTS (SELECT 1 FROM test_refuse_relay)
            BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END;
        """)
    caplog.set_level(logging.INFO, logger="mapper.inference")
    refused = "inference: cannot set default/relay/power = True: the twin refused the write (test trigger)"
    classes = ["normal", "spike", "stuck", "drift", "noise"]
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 0.0, "actions": [
        {"type": "set_desired", "device": "relay", "property": "power", "value": True, "when": classes}]})
    try:
        await async_wait_for(lambda: refused in caplog.messages, timeout=20, what="the refused set_desired")
        relay = lambda s: s.device(DeviceId("default", "relay")).properties["power"]  # noqa: E731
        assert (await r.service.twin(relay)).desired is None
        with contextlib.closing(sqlite3.connect(tmp_path / "twin.db", timeout=10)) as conn, conn:
            conn.execute("DELETE FROM test_refuse_relay")  # the twin takes writes again
        power = await _until(lambda: r.service.twin(relay), lambda p: p.desired is True,
                             what="the relay's desired value set after all")
        assert power.desired_version == 1
        assert "inference: set default/relay/power = True" in caplog.messages
    finally:
        await _stop(r)


async def test_a_set_desired_value_the_target_cannot_take_refuses_the_start(tmp_path):
    """`value: banana` for a BOOLEAN property is found when the pipeline is built, as a problem
    naming the field, not at the first decision that would set it (the pipeline used to run and
    log a failed set each time)."""
    from devices.errors import DefinitionError

    # A pipeline of the config: the start is refused, naming the action (see test_config_pipeline_problems_...).
    with pytest.raises(DefinitionError, match=r"inference\.pipelines\[0\]\.actions\[0\]\.value: .*set_desired value for "
                       r"default/relay/power: .*expected a boolean"):
        await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "actions": [
            {"type": "set_desired", "device": "relay", "property": "power", "value": "banana", "otherwise": False}]})


async def test_a_set_desired_target_of_another_node_refuses_the_start(tmp_path):
    """A set_desired target whose file names another node (spec.nodeName): that node's device, which
    takes no desired value here (LoadResult.other_node: MQTT, $hw, the REST API and `twin set`
    refuse it). The pipeline's check took it as a device like any other, so its decisions wrote
    desired values into the twin for another node's device; now it is refused at the action's
    `device` line, as a target that does not exist is."""
    from devices.errors import DefinitionError

    devices = _devices(tmp_path)
    (devices / "far.yaml").write_text(
        "apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\nmetadata: {name: far-relay, namespace: default}\n"
        "spec:\n  nodeName: pi-far\n  deviceModelRef: {name: relay-model}\n"
        "  protocol: {protocolName: simulated, configData: {}}\n"
        "  properties:\n    - {name: power, visitors: {protocolName: simulated, configData: {kind: switch}}}\n")
    with pytest.raises(DefinitionError, match=r"inference\.pipelines\[0\]\.actions\[0\]\.device: .*set_desired "
                       r"target default/far-relay/power: .*nodeName is 'pi-far'.*this mapper is node 'pi-here'"):
        r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "actions": [
            {"type": "set_desired", "device": "far-relay", "property": "power", "value": True}]}, node="pi-here")
        await _stop(r)  # (it started: the test fails)
    # The same pipeline with this node's relay starts (the refusal is the target's node, nothing else).
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "actions": [
        {"type": "set_desired", "device": "relay", "property": "power", "value": True}]}, node="pi-here")
    await _stop(r)


@pytest.mark.parametrize("age_s", [0.0, 3600.0])
async def test_a_restarted_pipeline_fills_its_window_from_the_twins_history(tmp_path, age_s, caplog):
    """A mapper that restarts (here: a twin already holding 20 steps of the probe, as a previous run
    left them) decides on its first new step, with a window that starts in the history; history
    older than the pipeline's gap limit (max_gap_s) is not used, and the window fills anew."""
    from devices.loader import load

    definitions = load([_devices(tmp_path)]).devices
    probe = DeviceId.parse("default/probe")
    last_ms = _now_ms() - int(age_s * 1000)
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(definitions.values())
        store.record([Reading(probe, name, value + 0.01 * i, last_ms - 10 * (19 - i))
                      for i in range(20) for name, value in (("temperature", 21.5), ("humidity", 48.0))])
    started_ms = _now_ms()
    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0, "max_gap_s": 60})
    try:
        first = await _until(r.decisions, lambda rows: len(rows) >= 1, what="a decision")
        first = min(first, key=lambda x: x["window_end_ts"])
        assert first["window_end_ts"] >= started_ms  # decided on a live step
        filled = [m for m in caplog.messages if "from the twin's history" in m]
        if age_s:
            assert first["window_start_ts"] >= started_ms
            assert filled == []
        else:
            assert first["window_start_ts"] <= last_ms  # ... with a window that starts in the history
            assert filled == ["inference pipeline default/probe-sensor-faults: window filled with 16 of 16 steps"
                              " from the twin's history"]
    finally:
        await _stop(r)


async def test_a_decisions_created_ts_is_its_requests_created(tmp_path, monkeypatch):
    """The row of an offloaded window keeps the `created` its request carries (and the worker
    echoes): a restarted mapper matches answers to the requests it restored by it. The row used
    to take its own clock reading in the transaction, a millisecond or more later now and then,
    and every answer to that request was then refused as `mismatch`."""
    real = records.now_ms
    monkeypatch.setattr(records, "now_ms", lambda: real() + 7)  # the transaction runs a little later
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0, "threshold": 1.0})
    try:
        rows = await _until(r.decisions, lambda rows: len([x for x in rows if x["request"]]) >= 3,
                            what="offloaded windows")
    finally:
        await _stop(r)
    offloaded = [x for x in rows if x["request"]]
    assert offloaded and all(x["created_ts"] == orjson.loads(x["request"])["created"] for x in offloaded)


def _awaits(task: asyncio.Task, name: str) -> bool:
    """Whether `task` is suspended inside a coroutine function called `name` (its await chain)."""
    coro = task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        if coro.cr_code.co_name == name:
            return True
        coro = coro.cr_await
    return False


async def _offloaded_then_timer_alone(r) -> None:  # noqa: ANN001
    """Two windows offloaded, then the devices stopped and their readings committed: no more
    batches, so what falls due from here on is the timer's alone."""
    stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
    await async_wait_for(lambda: stats()["offloads"] >= 2, timeout=20, what="offloaded windows")
    for device in list(r.service.runners):
        await r.service.stop_device(device)
    await r.service.recorder.flush()


async def test_a_failed_timer_transaction_is_retried_and_stops_nothing(tmp_path, caplog):
    """Readings have stopped, deadlines fall due, and the timer's own transaction fails (another
    connection holds the twin's write lock past the busy timeout): the mapper keeps running and
    the provisional answers are recorded on the next try. (The error used to end the mapper, with
    the answers changed in memory only.)"""
    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0,
                                "deadline_s": 1.0, "resend_s": 60})
    lock = sqlite3.connect(tmp_path / "twin.db", isolation_level=None)
    try:
        await _offloaded_then_timer_alone(r)
        await r.service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
        lock.execute("BEGIN IMMEDIATE")  # the twin's writer from here on is the timer alone
        pending = lock.execute("SELECT count(*) FROM inference_decisions WHERE status = 'pending'").fetchone()[0]
        assert pending > 0  # what falls due while the lock is held
        await async_wait_for(lambda: any(m.startswith("inference: cannot record what fell due") and "locked" in m
                                         for m in caplog.messages), timeout=20, what="the timer's failed transaction")
        assert lock.execute("SELECT count(*) FROM inference_decisions WHERE status = 'pending'").fetchone()[0] == pending
        lock.execute("ROLLBACK")
        await r.service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=30000"))
        rows = await _until(r.decisions, lambda rows: all(x["status"] != "pending" for x in rows),
                            what="every pending window given its provisional answer")
        assert not r.task.done()
        assert all(x["label"] is not None for x in rows)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        await _stop(r)


async def test_a_timer_transaction_the_stop_cancels_midway_is_committed_once(tmp_path, broker):
    """The stop cancels the timer task while its transaction (edge answers standing, provisional) waits in
    the twin thread for another connection's lock. The cancel does not stop the twin thread: the
    transaction commits once the lock is free. The timer used to take the cancel as a failure and keep
    what it had collected for the next try, which the stop's commit_results then committed again: every
    provisional decision was queued twice in the outbox (an app saw each one twice after the next start)."""
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0,
                                "deadline_s": 1.0, "resend_s": 60}, broker=broker)
    lock = sqlite3.connect(tmp_path / "twin.db", isolation_level=None)
    try:
        await _offloaded_then_timer_alone(r)
        lock.execute("BEGIN IMMEDIATE")
        pending = [row[0] for row in lock.execute(
            "SELECT request_id FROM inference_decisions WHERE status = 'pending'").fetchall()]
        assert pending  # what falls due while the lock is held
        # Not "the twin thread is in the timer's update": other work (the publisher's acks, a device's
        # offline state) may be the one blocked on the lock, with the timer's transaction queued behind.
        timers = next(t for t in asyncio.all_tasks() if t.get_name() == "inference-timers")
        await async_wait_for(lambda: _awaits(timers, "_due"), timeout=20,
                             what="the timer awaiting its transaction, held up by the lock")
        r.stop.set()
        await async_wait_for(lambda: timers.cancelling() > 0 or timers.done(), timeout=20,
                             what="the stop cancelling the timer task")
        lock.execute("ROLLBACK")
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        await _stop(r)
    store = TwinStore.open(tmp_path / "twin.db")
    try:
        queued = [orjson.loads(row.payload) for row in store.outbox_pending(limit=100_000)
                  if row.topic.endswith("/decision")]
        rows = {x["request_id"]: x for x in records.recent(store, "default/probe-sensor-faults", 100_000)}
    finally:
        store.close()
    assert all(rows[request_id]["status"] == "provisional" for request_id in pending)
    provisional = Counter(b["request_id"] for b in [*r.published(), *queued] if b["provisional"])
    assert {request_id: provisional[request_id] for request_id in pending} == {request_id: 1 for request_id in pending}


async def test_a_cloud_answer_in_a_batch_whose_decisions_were_given_up_is_still_committed(tmp_path, broker, worker,
                                                                                            monkeypatch, caplog):
    """A cloud answer rides with a batch of readings whose decisions' work keeps failing, until the recorder
    commits the readings without it (EXTRA_TRIES): the answer is still committed (by the timer), published and
    acted on, and a repeat is refused as a duplicate. It used to be dropped with the work: the row stayed
    pending and the worker's repeat was refused as a duplicate, so it never could be.

    The refusal is SQLite's own: a trigger aborts every update of a decision row while a marker row exists.
    The batches' new decisions are inserts and still commit; the one batch that carries the answer (its row
    update) is refused each try, and then given up while its readings commit alone."""
    from mapper.inference import extension

    # The answer rides with a batch, not with the timer's fallback (batches wait 1 s between failed tries).
    monkeypatch.setattr(extension, "TIMER_GRACE_S", 600.0)
    caplog.set_level(logging.INFO)
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "threshold": 1.0,
                                "deadline_s": 600, "resend_s": 600}, broker=broker)
    refuse = sqlite3.connect(tmp_path / "twin.db", timeout=10, isolation_level=None)
    try:
        refuse.executescript("""
            CREATE TABLE test_refuse_updates (x);
            CREATE TRIGGER test_refuse_updates BEFORE UPDATE ON inference_decisions
            WHEN EXISTS (SELECT 1 FROM test_refuse_updates)
            BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END;
        """)
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        request = await async_wait_for(lambda: next(iter(r.requests()), None), timeout=20, what="an offload")
        await _until(lambda: _row(r, request["id"]), lambda x: x["status"] == "pending", what="its row")
        refuse.execute("INSERT INTO test_refuse_updates VALUES (1)")
        await r.send_result(_answer(worker, request))
        await async_wait_for(lambda: any(m.startswith("gave up") and "refused the write (test trigger)" in m
                                         for m in caplog.messages), timeout=20,
                             what="the batch that carried the answer given up")
        assert (await _row(r, request["id"]))["status"] == "pending"   # the readings committed without it
        refuse.execute("DELETE FROM test_refuse_updates")  # the twin takes writes again
        row = await _until(lambda: _row(r, request["id"]), lambda x: x["status"] != "pending", timeout=10,
                           what="the answer committed")
        assert (row["status"], row["exit"]) == ("final", "cloud")
        # (Counted once the timer's transaction is back on the loop, a few turns after the row shows it.)
        await async_wait_for(lambda: r.ext.results_applied == 1, what="the answer counted as applied")
        assert stats()["results_ok"] == 1
        await r.send_result(_answer(worker, request))
        await async_wait_for(lambda: r.ext.status()["results_rejected"].get("duplicate") == 1, what="the repeat")
    finally:
        with contextlib.suppress(sqlite3.Error):
            refuse.execute("DELETE FROM test_refuse_updates")
        refuse.close()
        await _stop(r)
    assert [(b["exit"], b["provisional"]) for b in r.published() if b["request_id"] == request["id"]] == [
        ("cloud", False)]


async def test_without_a_bus_decisions_stay_in_the_twin(tmp_path):
    """No `mqtt:` section: windows are still decided and recorded, nothing is queued for publishing."""
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0})
    try:
        assert r.service.bus is None
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731
        await async_wait_for(lambda: stats()["windows"] >= 5, timeout=20, what="windows")
        assert await r.outbox("") == []
        rows = await r.decisions()
        assert len(rows) >= 5
    finally:
        await _stop(r)


async def test_the_device_needs_only_the_edge_graph_of_a_model(tmp_path):
    """A Pi holds model.json and edge.onnx only: cloud.onnx is the cloud worker's. The mapper checks
    and decides with the edge graph, and its requests still name the cloud graph model.json describes.
    (It used to load and self-test cloud.onnx too, a session it never ran: without the file, the
    pipeline was refused as `cloud.onnx: not found`.)"""
    from devices.loader import load
    from mapper.inference.extension import config_problems

    models = tmp_path / "models"
    (models / "sensor_faults").mkdir(parents=True)
    for name in ("model.json", "edge.onnx"):
        shutil.copy(MODELS / "sensor_faults" / name, models / "sensor_faults" / name)
    pipeline = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 0.0}
    inference = {"models_dir": str(models), "pipelines": [pipeline]}
    path = tmp_path / "m.yaml"
    path.write_text(f"inference:\n  models_dir: {models}\n  pipelines:\n    - {{device: probe, model: sensor_faults}}\n")
    assert config_problems(load_config(path, env={}), load([_devices(tmp_path)]).devices) == []
    r = await _start(tmp_path, pipeline, inference=inference)
    try:
        await _until(r.decisions, lambda rows: len([x for x in rows if x["request_id"]]) >= 3, what="offloads")
        requests = [orjson.loads(x["request"]) for x in await r.decisions() if x["request"]]
        card = orjson.loads((MODELS / "sensor_faults" / "model.json").read_bytes())
        assert {q["cloud_sha256"] for q in requests} == {card["sha256"][card["files"]["cloud"]][:16]}
    finally:
        await _stop(r)


async def test_a_clean_stop_marks_the_derived_device_offline_and_a_restart_ok_again(tmp_path):
    """README: a clean stop marks offline every device it ran. The pipeline's derived device stayed
    `ok` (`inference pipeline on ...`) beside its source's `offline`; now it is `offline` with the same
    detail, and `ok` again once the pipeline runs after a restart."""
    from mapper.service import STOPPED_DETAIL

    derived, probe = DeviceId.parse("default/probe-sensor-faults"), DeviceId.parse("default/probe")
    pipeline = {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0}
    for run in range(2):
        r = await _start(tmp_path, pipeline)
        try:
            stats = lambda: r.ext.status()["pipelines"][str(derived)]  # noqa: E731, B023
            await async_wait_for(lambda: stats()["windows"] >= 1, timeout=20, what="a window")  # noqa: B023
            running = await r.service.twin(lambda s: s.device(derived))  # noqa: B023
            assert (running.state, running.state_detail) == ("ok", "inference pipeline on default/probe"), run
        finally:
            await _stop(r)
        with TwinStore.open(tmp_path / "twin.db") as store:
            states = {d: (store.device(d).state, store.device(d).state_detail) for d in (probe, derived)}
        assert states == {probe: ("offline", STOPPED_DETAIL), derived: ("offline", STOPPED_DETAIL)}, run


async def test_the_derived_device_is_never_writable_and_the_cli_shows_it(tmp_path, broker_for, capsys):
    """A desired value for the derived device over KubeEdge's twin protocol or a /set topic, sent by the app
    through the broker, is refused (404: the router serves the devices of the YAML only) and nothing changes.
    `mapper twin get`, `twin history` and `devices` show it; `mapper twin set` refuses it (ReadOnly)."""
    from helpers import write_config
    from mapper import cli
    from twin.store import NotWritable

    node = f"n{secrets.token_hex(4)}"
    broker = broker_for(node)  # its ACL lets the app write this node's /set topics
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0}, broker=broker,
                     node=node)
    derived = DeviceId("default", "probe-sensor-faults")
    hw = "$hw/events/device/default/probe-sensor-faults/twin/update"
    app: Listener | None = None
    try:
        app = Listener(broker.client("app"), f"{hw}/result")
        sets = r.topics.device_base(derived)
        for topic, payload in ((hw, b'{"event_id":"d1","twin":{"label":{"expected":{"value":"normal"}}}}'),
                               (f"{sets}/label/set", b'"normal"'), (f"{sets}/decision/set", b'"normal"')):
            code = await asyncio.to_thread(app.probe.publish, topic, payload)
            assert code is not None and not code.is_failure, code
        router = r.service.bus.router
        await async_wait_for(lambda: router.counts["rejected_404"] == 3, what="the three desired values refused")
        await async_wait_for(lambda: app.bodies("/twin/update/result"), what="the twin update's result")
        assert [(b["event_id"], b["code"]) for b in app.bodies("/twin/update/result")] == [("d1", 404)]
        assert router.counts["internal_error"] == 0
        with pytest.raises(NotWritable):
            await r.service.twin(lambda s: s.set_desired(derived, "label", "normal"))
        twin = await r.service.twin(lambda s: s.device(derived))
        assert all(p.desired is None and not p.writable for p in twin.properties.values())
        await async_wait_for(lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]["windows"] >= 2,
                             timeout=20, what="decisions")
    finally:
        if app is not None:
            app.probe.close()
        await _stop(r)

    config = str(write_config(tmp_path / "c.yaml", tmp_path / "devices", tmp_path / "twin.db"))
    capsys.readouterr()
    assert cli.main(["twin", "get", "probe-sensor-faults", "--config", config]) == 0
    out = capsys.readouterr().out
    # (after the clean stop above: offline, as every device the mapper ran)
    assert out.startswith("default/probe-sensor-faults  model=sensor-faults-early-exit  protocol=derived  "
                          "state=offline (stopped: the mapper stopped)"), out
    assert all(f"\n{name} " in out for name in ("label", "confidence", "exit", "provisional", "window_end"))
    assert cli.main(["twin", "get", "probe-sensor-faults", "--config", config, "--json"]) == 0
    shown = orjson.loads(capsys.readouterr().out)["properties"]
    assert shown["exit"]["reported"] in ("edge", "cloud") and shown["label"]["writable"] is False
    assert cli.main(["twin", "history", "probe-sensor-faults", "label", "--config", config, "--json"]) == 0
    assert len(orjson.loads(capsys.readouterr().out)) >= 1
    assert cli.main(["devices", "--config", config]) == 0
    assert "default/probe-sensor-faults" in capsys.readouterr().out
    assert cli.main(["twin", "set", "probe-sensor-faults", "label", "normal", "--config", config]) == 1
    assert "ReadOnly" in capsys.readouterr().err


def test_a_pipeline_named_like_a_device_is_refused(tmp_path):
    """The derived device must not take a device's name."""
    from devices.loader import load
    from mapper.inference.pipeline import Pipeline, PipelineError

    definitions = load([_devices(tmp_path)]).devices
    settings = PipelineSettings(device="probe", model="sensor_faults", name="relay")
    with pytest.raises(PipelineError, match="name of a device"):
        Pipeline(settings, load_model(MODELS / "sensor_faults"), definitions[SENSOR], definitions=definitions)


def test_a_derived_device_that_takes_a_removed_devices_name_has_only_its_own_properties(tmp_path):
    """A pipeline named like a device that was removed (inactive in the twin) takes over its row: the
    removed device's properties leave the twin (it is a derived device now, never writable, with no
    desired value). They used to stay, `power` writable with its desired value, shown as current."""
    from devices.loader import load

    relay = DeviceId.parse("default/relay")
    definitions = load([_devices(tmp_path)]).devices
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_devices(definitions.values())
        store.set_desired(relay, "power", True)
        store.deactivate_devices([d for d in definitions if d != relay])  # the relay is removed
        assert store.sync_derived([records.derived_device("default/relay", "m", "default/probe")]) == []
        twin = store.device(relay)
        assert twin.protocol == "derived"
        assert set(twin.properties) == {name for name, _, _ in records.DERIVED_PROPERTIES}
        assert not any(p.writable or p.desired is not None for p in twin.properties.values())


def test_a_clock_that_goes_back_restarts_the_window_and_newer_decisions_still_win(tmp_path):
    """The clock goes back an hour (a Pi without a real-time clock, corrected by its time sync): the
    window restarts (no window mixes both sides of the jump), the windows after it are decided and
    acted on, and the derived device shows them. Before, with min_step_s every step after the jump was
    dropped for an hour, and without it the actuator and the derived device ignored every decision
    until the clock had caught up (their window_end was older than the one shown)."""
    from devices.loader import load
    from mapper.inference.pipeline import Decision, Pipeline

    definitions = load([_devices(tmp_path)]).devices
    settings = PipelineSettings(device="probe", model="sensor_faults", threshold=0.0, min_step_s=0.5, actions=[
        {"type": "set_desired", "device": "relay", "property": "power", "value": True, "otherwise": False}])
    p = Pipeline(settings, load_model(MODELS / "sensor_faults"), definitions[SENSOR], definitions=definitions)
    normal, fault = p.model.info.classes[0], p.model.info.classes[1]
    length = p.builder.length

    def fill(start: int):
        got = [_step(p.builder, start + 1000 * i, 21.0 + 0.01 * i, 48.0) for i in range(length)]
        assert got[:-1] == [None] * (length - 1)
        assert got[-1] is not None, "no window after the clock went back"
        return p.edge(got[-1])

    t0 = 1_800_000_000_000
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.sync_derived([records.derived_device(str(p.id), p.model.info.name, str(p.source))])
        before = fill(t0)
        d1 = Decision(normal, 0.9, "edge", False, before.window)
        assert [x.value for x in p.act(d1, None)[1]] == [False]
        with store.transaction():
            records.report(store, [p.report(d1)])
        after = fill(t0 + 1000 * length - 3_600_000)  # an hour back
        assert after.window.start_ms >= t0 - 3_600_000  # nothing from before the jump
        d2 = Decision(fault, 0.9, "edge", False, after.window)
        assert [x.value for x in p.act(d2, None)[1]] == [True]
        with store.transaction():
            records.report(store, [p.report(d2)])
        shown = store.device(p.id).properties
        assert (shown["label"].reported, shown["window_end"].reported) == (fault, after.window.end_ms)
    assert p.builder.gaps == 1


def test_worker_refuses_bad_topics_and_unknown_models(worker):
    """The worker answers only on a valid node's result topic, and says so when it lacks the model."""
    body = codec.OffloadRequest("0123456789abcdef", "n1", "d", "p", "sensor-faults-early-exit",
                                worker.models["sensor-faults-early-exit"].info.cloud_sha256[:16], 1, False, "int8",
                                np.ones(32, np.float32)).to_json()
    assert worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "node": "n2"})) is None
    assert worker.answer("mapper/N1!/offload/request", orjson.dumps(body)) is None
    assert worker.answer("mapper/n1/offload/other", orjson.dumps(body)) is None
    _, payload = worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "model": "other"}))
    assert orjson.loads(payload)["error"] == "unknown model"
    _, payload = worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "cloud_sha256": ""}))
    assert orjson.loads(payload)["error"] == "different cloud graph (sha256)"  # "" is a prefix of any graph's
    assert worker.answer("mapper/n1/offload/request", orjson.dumps({**body, "id": body["id"] + "\n"})) is None
    _, payload = worker.answer("mapper/n1/offload/request", orjson.dumps(body))
    result = codec.decode_result(payload, n_classes=5)
    assert result.id == body["id"] and len(result.logits) == 5



def test_worker_counts_every_dropped_request_and_logs_a_few(caplog):
    """A client flooding the worker with requests it must drop (malformed, on odd topics): every
    one is counted, but the log gets a few lines a minute per reason, not one per request."""
    worker = CloudWorker(WorkerSettings(models=["sensor_faults"], worker_id="flooded"))
    caplog.set_level(logging.INFO, logger="mapper.worker")
    for i in range(500):
        assert worker.answer("mapper/n1/offload/request", b"not json %d" % i) is None
        assert worker.answer("mapper/n1/offload/other", b"{}") is None
    assert worker.refused == 1000
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped a request")]
    assert len(lines) == 20, lines[:3]  # 10 a minute for each of the two reasons


def test_worker_answers_a_cut_its_graph_cannot_score_with_an_error(worker):
    """A cut of finite but huge values (int8 with a scale of 1e36) overflows the cloud graph: the
    worker answers with an `error` result, which the mapper accepts as one, not with logits the
    JSON encoder writes as `null` (counted as served, refused by every mapper as malformed)."""
    import base64
    import struct

    info = worker.models["sensor-faults-early-exit"].info
    body = codec.OffloadRequest("0123456789abcdef", "n1", "d", "p", info.name, info.cloud_sha256[:16], 1, False,
                                "int8", np.ones(32, np.float32)).to_json()
    body["payload"] = base64.b64encode(struct.pack("<f", 1e36) + bytes([127] * 32)).decode("ascii")
    served, refused = worker.served, worker.refused
    _, payload = worker.answer("mapper/n1/offload/request", orjson.dumps(body))
    result = codec.decode_result(payload, n_classes=5)
    assert result.logits is None and "not finite" in result.error
    assert (worker.served, worker.refused) == (served, refused + 1)

# --- device updates (SIGHUP reload, KubeEdge DMI), max_pending, the counters in the log ----

AD_PUSH = ("      pushMethod:\n        anomalyDetection:\n          data: {model: sensor_faults, deadlineS: 0.0,"
           " name: probe-ad}\n")

RELAY2 = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: relay2, namespace: default}
spec:
  deviceModelRef: {name: relay-model}
  protocol: {protocolName: simulated, configData: {}}
  properties:
    - name: power
      visitors: {protocolName: simulated, configData: {kind: switch}}
      collectCycle: 1000
"""


async def _update(r: Running, tmp_path: Path, *, push: str, extra: bool = False, probe: str = "") -> None:
    from devices.loader import load

    devices = _devices(tmp_path, push=push, probe=probe)
    if extra:
        (devices / "relay2.yaml").write_text(RELAY2)
    else:
        (devices / "relay2.yaml").unlink(missing_ok=True)
    before = r.ext.reloads
    await r.service.update_devices(load([devices]))
    await async_wait_for(lambda: r.ext.reloads > before, timeout=20, what="the pipelines rebuilt")


async def test_device_updates_build_keep_and_drop_pipelines(tmp_path, broker):
    """Devices that arrive after setup (KubeEdge DMI, SIGHUP reload) get their anomalyDetection pipeline;
    an update that leaves the device alone keeps the pipeline with its window; removing the map drops it."""
    r = await _start(tmp_path, {}, broker=broker, inference={"pipelines": []})
    try:
        assert r.ext.pipelines == {}
        await _update(r, tmp_path, push=AD_PUSH)
        assert list(map(str, r.ext.pipelines)) == ["default/probe-ad"]
        stats = lambda: r.ext.status()["pipelines"]["default/probe-ad"]  # noqa: E731
        await async_wait_for(lambda: stats()["windows"] >= 3, timeout=20, what="windows of the new pipeline")
        rows = await r.decisions("default/probe-ad")
        assert rows and all(x["label"] is not None for x in rows if x["status"] != "pending")
        await async_wait_for(lambda: r.published("/probe-ad/decision"), what="the new pipeline's decision at the app")

        kept = r.pipeline()
        windows = stats()["windows"]
        await _update(r, tmp_path, push=AD_PUSH, extra=True)     # another device added, probe unchanged
        assert r.pipeline() is kept and stats()["windows"] >= windows
        await async_wait_for(lambda: stats()["windows"] > windows, timeout=20, what="windows after the update")

        derived = DeviceId("default", "probe-ad")
        assert derived in await r.service.twin(lambda s: s.device_ids())
        await r.service.twin(lambda s: _assert_derived_shows_the_newest_decision(s, "default/probe-ad"))

        await _update(r, tmp_path, push="")                     # the map is gone: so is the pipeline
        assert r.ext.pipelines == {} and r.ext.status()["pipelines"] == {}
        assert not any(w.pipeline is kept for w in r.ext._waiting.values())
        ids = await r.service.twin(lambda s: s.device_ids())
        assert derived not in ids and SENSOR in ids, "a dropped pipeline's derived device is inactive"
        assert (await r.service.twin(lambda s: s.device(derived))).state == "offline"
    finally:
        await _stop(r)


async def test_a_cloud_answer_not_yet_committed_is_not_waited_for_again_after_a_rebuild(tmp_path, broker, worker,
                                                                                      monkeypatch):
    """A cloud answer is accepted, and before a batch of readings commits it the pipeline is rebuilt (its
    device changed): the rebuilt pipeline must not wait for that request again (its row still looks
    pending in the twin). It used to: the request was sent again, and the worker's second answer was
    accepted as well, a second final decision published and acted on."""
    from devices.loader import load
    from mapper.inference import extension

    pipeline = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600, "resend_s": 600}
    r = await _start(tmp_path, pipeline, broker=broker)
    try:
        ext, pid = r.ext, "default/probe-sensor-faults"
        await async_wait_for(lambda: r.requests(), what="an offload request at the worker")
        request = r.requests()[0]
        answer = _answer(worker, request)
        recorder = r.service.recorder
        # No batch of readings (and no timer) takes the answer along for now.
        monkeypatch.setattr(extension, "TIMER_GRACE_S", 600.0)
        recorder.pre_commit.remove(ext._decide)
        try:
            await ext.handle_result(r.topics.offload_result(), answer)
            assert ext.status()["pipelines"][pid]["results_ok"] == 1
            old, before = r.pipeline(), ext.reloads
            await r.service.update_devices(load([_devices(tmp_path, rate=0.07)]))  # the probe changed
            await async_wait_for(lambda: ext.reloads > before, timeout=20, what="the pipeline rebuilt")
            assert r.pipeline() is not old
        finally:
            recorder.pre_commit.append(ext._decide)
        await _until(lambda: _row(r, request["id"]), lambda x: x["exit"] == "cloud", what="the answer committed")
        await ext.handle_result(r.topics.offload_result(), answer)  # the worker answers a resend
        assert ext.status()["results_rejected"].get("duplicate") == 1
        assert ext.status()["pipelines"][pid]["results_ok"] == 0
    finally:
        await _stop(r)
    assert [b["exit"] for b in r.published() if b["request_id"] == request["id"]] == ["cloud"]


AD_OFFLOAD = ("      pushMethod:\n        anomalyDetection:\n          data: {model: sensor_faults, threshold: 1.0,"
              " deadlineS: 1, name: probe-ad}\n")


async def _left_pending(tmp_path: Path, older_s: list[float] = ()) -> list[dict]:
    """A run of the probe with its map (AD_OFFLOAD, no broker) until it left at least two offloads pending (and
    as many as `older_s`), stopped: their rows, the first ones made older by `older_s` seconds each."""
    pid = "default/probe-ad"
    r = await _start(tmp_path, {}, inference={"pipelines": []}, push=AD_OFFLOAD)
    try:
        await _until(lambda: r.decisions(pid),
                     lambda rows: sum(x["status"] == "pending" for x in rows) >= max(2, len(older_s) + 1),
                     what="pending offloads")
    finally:
        await _stop(r)
    with TwinStore.open(tmp_path / "twin.db") as store:
        pending = [x for x in records.recent(store, pid, 100_000) if x["status"] == "pending"]
        with store.transaction():
            for row, s in zip(pending, older_s):
                store.conn.execute("UPDATE inference_decisions SET created_ts = created_ts - ? WHERE id = ?",
                                   (int(s * 1000), row["id"]))
    return pending


class _TwinHooks:
    """Test triggers on the mapper's own twin connection whose condition is an SQL function of the test, run on
    the twin thread: an update of a decision row (`row:<id>`) or of a device's registration (`device:<id>`) is
    counted, refused by SQLite's own RAISE (as a full disk would refuse it) while its key is in `refuse`, and
    held at that point (the twin thread waits: the twin calls behind it queue up) once, when `hold` armed it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.refuse: set[str] = set()
        self.calls: Counter[str] = Counter()
        self._holds: dict[str, tuple[asyncio.Event, threading.Event]] = {}
        self._released: list[threading.Event] = []

    def __call__(self, key: str) -> int:  # the twin thread
        self.calls[key] += 1
        hold = self._holds.pop(key, None)
        if hold is not None:
            entered, release = hold
            self.loop.call_soon_threadsafe(entered.set)
            release.wait(30)
        return int(key in self.refuse)

    def hold(self, key: str) -> tuple[asyncio.Event, threading.Event]:
        """The next update of `key` waits in the twin thread: (set when it got there, set to let it go on)."""
        hold = self._holds[key] = (asyncio.Event(), threading.Event())
        self._released.append(hold[1])
        return hold

    def release_all(self) -> None:
        self._holds.clear()
        for release in self._released:
            release.set()

    async def install(self, r: Running) -> _TwinHooks:
        def create(store) -> None:  # noqa: ANN001
            store.conn.create_function("test_hook", 1, self)
            store.conn.execute("CREATE TRIGGER test_hook_rows BEFORE UPDATE ON inference_decisions"
                               " WHEN test_hook('row:' || old.id)"
                               " BEGIN SELECT RAISE(ABORT, 'the twin refused the restore (test trigger)'); END")
            store.conn.execute("CREATE TRIGGER test_hook_devices BEFORE UPDATE OF origin ON devices"
                               " WHEN test_hook('device:' || old.id) BEGIN SELECT 1; END")

        await r.service.twin(create)
        return self


async def test_offloads_left_from_the_previous_run_wait_again_once_the_twin_takes_their_restore(tmp_path, caplog):
    """A device update brings back a pipeline whose offloads the previous run left pending, and the twin
    refuses their restore: it is tried again, and once the twin takes it they wait again (their deadline
    stands their edge answers). The error used to end the update's rebuild, and they stayed pending, never
    waited for, until the mapper restarted.

    The refusal is SQLite's own, from a trigger on one of those rows (made older than result_max_age_s, so
    the restore's first write stands it) while a marker row exists: a lock held by another connection would
    refuse the update's own writes of the devices just before it."""
    pid = "default/probe-ad"
    pending = await _left_pending(tmp_path, [3600])
    stale = pending[0]["id"]
    with TwinStore.open(tmp_path / "twin.db") as store:
        store.conn.executescript(f"""
            CREATE TABLE test_refuse_restore (x);
            INSERT INTO test_refuse_restore VALUES (1);
            CREATE TRIGGER test_refuse_restore BEFORE UPDATE ON inference_decisions
            WHEN old.id = {stale} AND EXISTS (SELECT 1 FROM test_refuse_restore)
            BEGIN SELECT RAISE(ABORT, 'the twin refused the restore (test trigger)'); END;
        """)
    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {}, inference={"pipelines": []})  # the probe without its map: no pipeline yet
    try:
        assert r.ext.pipelines == {}
        await _update(r, tmp_path, push=AD_OFFLOAD)
        assert list(map(str, r.ext.pipelines)) == [pid]
        assert "the twin refused the restore (test trigger)" in caplog.text
        ids = {x["request_id"] for x in pending}
        assert not ids & set(r.ext._waiting)
        with contextlib.closing(sqlite3.connect(tmp_path / "twin.db", timeout=10)) as conn, conn:
            conn.execute("DELETE FROM test_refuse_restore")  # the twin takes the restore now

        async def left() -> dict[str, str]:
            return {x["request_id"]: x["status"] for x in await r.decisions(pid) if x["request_id"] in ids}

        await _until(left, lambda rows: set(rows.values()) == {"provisional"},
                     what="the previous run's offloads stood (the stale one) or past their deadline")
        assert ids - {pending[0]["request_id"]} <= set(r.ext._waiting)
    finally:
        await _stop(r)


async def test_a_lasting_refusal_of_the_restore_is_logged_a_few_lines_a_minute(tmp_path, caplog, monkeypatch):
    """The twin keeps refusing the restore (a full disk): it is tried again every RESTORE_RETRY_S, but logged
    a few lines a minute (the throttle's burst), not one ERROR line each try (86,400 a day at 1 s). The tries
    are counted by the twin's trigger, the refusal's own; the interval shortened so that 30 come quickly."""
    from mapper.inference import extension

    pending = await _left_pending(tmp_path, [3600])
    monkeypatch.setattr(extension, "RESTORE_RETRY_S", 0.02)
    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {}, inference={"pipelines": []})
    hooks = _TwinHooks()
    try:
        await hooks.install(r)
        stale = f"row:{pending[0]['id']}"
        hooks.refuse.add(stale)
        await _update(r, tmp_path, push=AD_OFFLOAD)
        await async_wait_for(lambda: hooks.calls[stale] >= 30, timeout=20, what="30 tries of the restore")
        errors = [x for x in caplog.records if x.levelno == logging.ERROR and "cannot restore" in x.getMessage()]
        assert 1 <= len(errors) <= r.ext._log_throttle.burst < 30, len(errors)
        assert "the twin refused the restore (test trigger)" in errors[0].getMessage()
        hooks.refuse.clear()  # the twin takes it now
        await async_wait_for(lambda: not r.ext._unrestored, timeout=20, what="the restore taken")
        assert {x["request_id"] for x in pending[1:]} <= set(r.ext._waiting)
    finally:
        hooks.release_all()
        await _stop(r)


async def _update_with_its_restore_refused(r, tmp_path, hooks: _TwinHooks, pending, probe: str) -> str:  # noqa: ANN001
    """Install the test's twin triggers, have the twin refuse the previous run's first pending row,
    and apply the device update that builds the pipeline (deadlines and resends far off: nothing
    falls due): its restore is refused there. Returns the refused row's trigger key."""
    await hooks.install(r)
    stale = f"row:{pending[0]['id']}"
    hooks.refuse.add(stale)
    await _update(r, tmp_path, push=AD_OFFLOAD.replace("deadlineS: 1", "deadlineS: 600, resendS: 600"), probe=probe)
    return stale


async def test_a_restore_refused_by_a_device_update_is_retried_with_nothing_else_waking_the_timer(tmp_path):
    """A device update's restore is refused while the timer task waits for nothing (60 s at most): nothing
    waits, the probe is stopped at the hardware boundary (no window, no request), and no bus. The refusal
    itself has the timer retry within RESTORE_RETRY_S (1 s), so once the twin takes the restore the previous
    run's offloads are restored within a few seconds, not after the timer's 60 s wait (a bounded wait of 15 s,
    no time measured)."""
    pid = "default/probe-ad"
    pending = await _left_pending(tmp_path, [3600])
    stopped = tmp_path / "probe-unplugged"
    stopped.touch()
    probe = f", fail_while_exists: '{stopped}'"
    r = await _start(tmp_path, {}, inference={"pipelines": []}, probe=probe)
    hooks = _TwinHooks()
    try:
        stale = await _update_with_its_restore_refused(r, tmp_path, hooks, pending, probe)
        assert hooks.calls[stale] >= 1 and r.ext.status()["restore"]["unrestored"] == [pid]
        hooks.refuse.clear()  # the twin takes the restore now
        async def statuses() -> dict[int, str]:
            return {x["id"]: x["status"] for x in await r.decisions(pid)}

        rows = await _until(statuses, lambda rows: rows[pending[0]["id"]] == "provisional", timeout=15,
                            what="the restore retried and taken: the stale row stood")
        assert [rows[x["id"]] for x in pending[1:]] == ["pending"] * len(pending[1:])  # waiting again
        # (The stale row stands in the restore's first twin call; the restore ends a call or two later.)
        await async_wait_for(lambda: r.ext.status()["restore"]["unrestored"] == [], timeout=10,
                             what="the restore ended")
        assert r.ext.status()["pipelines"][pid]["windows"] == 0  # nothing decided: the probe was stopped
    finally:
        hooks.release_all()
        await _stop(r)


async def test_a_request_given_up_while_the_twin_refuses_the_restore_is_not_waited_for_again(tmp_path, broker):
    """While the twin refuses the restore of a pipeline built by a device update, the pipeline's own new
    requests go beyond max_pending and the oldest are given up (their edge answer stands). Once the twin takes
    the restore, those must not wait again: their rows still have no cloud answer and look open, and the
    restore used to skip only the requests waiting or answered, not those this run gave up (they were sent
    again, waited for, counted and given up a second time).

    What the worker sees: each of this run's requests once on the offload request topic, the previous run's
    sent again once the restore is taken (in the same pass as the given-up ones would be). The probe is then
    stopped at the hardware boundary (the simulated driver's fail_while_exists), so no new window gives up
    more; deadlines and resends far off, so nothing else is sent again."""
    pid = "default/probe-ad"
    pending = await _left_pending(tmp_path, [3600])
    earlier = {x["request_id"] for x in await _rows_after_stop(tmp_path, pid)}  # the previous run's requests
    stopped = tmp_path / "probe-unplugged"
    probe = f", fail_while_exists: '{stopped}'"
    r = await _start(tmp_path, {}, broker=broker, inference={"pipelines": [], "max_pending": 2}, probe=probe)
    hooks = _TwinHooks()
    ext = r.ext
    stats = lambda: ext.status()["pipelines"][pid]  # noqa: E731
    try:
        stale = await _update_with_its_restore_refused(r, tmp_path, hooks, pending, probe)
        assert ext.status()["restore"]["unrestored"] == [pid]
        await async_wait_for(lambda: stats()["expired"] >= 2, timeout=20, what="requests given up at max_pending")
        stopped.touch()  # the probe stops answering: no new window
        runner = r.service.runners[SENSOR]
        errors = runner.read_errors
        await async_wait_for(lambda: runner.read_errors > errors, what="a read of the stopped probe failed")
        await r.service.recorder.flush()  # the readings taken before it: their windows decided
        await asyncio.wait_for(ext.idle.wait(), 20)  # and the requests they gave up answered at the edge
        # Each request this run made is in the twin by now, but reaches the worker through the outbox and
        # the broker a moment later: what the worker received is read once all of them arrived.
        made = {x["request_id"] for x in await r.decisions(pid) if x["request_id"]} - earlier
        await async_wait_for(lambda: made <= {x["id"] for x in r.requests()}, timeout=20,
                             what="this run's requests at the worker")
        sent = [x["id"] for x in r.requests()]
        given_up = stats()["expired"]
        assert given_up >= 2 and stats()["waiting"] == 2, stats()
        assert ext.status()["restore"]["unrestored"] == [pid]
        previous = {x["request_id"] for x in pending[1:]}
        assert not previous & set(sent)

        hooks.refuse.clear()  # the twin takes the restore now
        await _until(lambda: r.decisions(pid), lambda rows: next(x for x in rows if x["id"] == pending[0]["id"])[
            "status"] == "provisional", what="the restore taken: the stale row stood")
        await async_wait_for(lambda: previous <= {x["id"] for x in r.requests()}, timeout=20,
                             what="the previous run's requests sent again")
        assert ext.status()["restore"]["unrestored"] == []
        assert stats()["expired"] == given_up  # diagnostics: none given up again (nothing new waits)
    finally:
        hooks.release_all()
        await _stop(r)  # returns once the app saw the node offline: all it published has arrived
    requests = [x["id"] for x in r.requests()]
    assert len(set(sent)) == len(sent) >= given_up + 2
    assert {rid: requests.count(rid) for rid in sent} == dict.fromkeys(sent, 1), "a request given up was sent again"
    assert {rid: requests.count(rid) for rid in previous} == dict.fromkeys(previous, 1)
    rows = {x["request_id"]: x for x in await _rows_after_stop(tmp_path, pid)}
    assert sorted(rows[rid]["status"] for rid in sent) == ["pending"] * 2 + ["provisional"] * given_up, \
        "the requests given up keep their edge answer; the two still waiting are pending"


async def _rows_after_stop(tmp_path: Path, pid: str) -> list[dict]:
    with TwinStore.open(tmp_path / "twin.db") as store:
        return records.recent(store, pid, 100_000)


async def test_a_pipeline_rebuilt_while_the_twin_refuses_the_restore_picks_up_its_own_requests(tmp_path):
    """A pipeline whose restore the twin refuses is rebuilt by another device update (its map changed): the
    requests it was waiting for are dropped with the old pipeline, and the rebuilt one picks them up again from
    the twin once the twin takes its restore (they are handed over, not given up: a restore skips the requests
    this run gave up)."""
    pid = "default/probe-ad"
    pending = await _left_pending(tmp_path, [3600])
    r = await _start(tmp_path, {}, inference={"pipelines": []})
    hooks = _TwinHooks()
    ext = r.ext
    try:
        await hooks.install(r)
        stale = f"row:{pending[0]['id']}"
        hooks.refuse.add(stale)
        await _update(r, tmp_path, push=AD_OFFLOAD)
        old = r.pipeline()
        own = await async_wait_for(lambda: [rid for rid, w in ext._waiting.items() if w.pipeline is old][:2] or None,
                                   timeout=20, what="requests of the pipeline built")
        await _update(r, tmp_path, push=AD_OFFLOAD.replace("deadlineS: 1", "deadlineS: 2"))
        new = r.pipeline()
        assert new is not old and ext.status()["restore"]["unrestored"] == [pid]
        assert not set(own) & set(ext._waiting)
        hooks.refuse.clear()  # the twin takes the restore now
        # What the twin shows: the stale row stood, the previous run's others waited for again by the rebuilt
        # pipeline (their deadline, counted from their creation, is past: their edge answer stands).
        await _until(lambda: r.decisions(pid),
                     lambda rows: {x["id"]: x["status"] for x in rows if x["id"] in {y["id"] for y in pending}}
                     == {x["id"]: "provisional" for x in pending},
                     what="the restore taken: the previous run's offloads stood")
        assert ext.status()["restore"]["unrestored"] == []
        # Diagnostics: this run's requests of the old pipeline are the rebuilt one's now.
        assert all(rid in ext._waiting and ext._waiting[rid].pipeline is new for rid in own)
        assert {x["request_id"] for x in pending[1:]} <= set(ext._waiting)
    finally:
        hooks.release_all()
        await _stop(r)


async def test_a_restore_retried_while_a_device_update_rebuilds_the_pipeline_leaves_the_rebuilt_one_to_retry(
        tmp_path):
    """The timer task's retry of a pipeline's restore is under way when a device update rebuilds that pipeline
    (its map changed) and the rebuilt one's own restore is refused; the timer's retry then succeeds. The
    rebuilt pipeline must still be tried again: the retry used to take the id off _unrestored (it restored the
    old pipeline, under the same id), and the rebuilt pipeline's restore was never tried again (the previous
    run's offloads it has to stand stayed pending until a restart).

    The order is the twin's own, from test triggers that hold the twin thread (one call at a time, in order):
    the update's registration of the derived device is held until the timer's retry started (the extension's
    public `restore.tries`: a restore starts with its first twin call, so that call is queued behind the
    registration), and the retry's first write is held until the update went on: the update's next twin call
    is handed to the thread as soon as the registration's result reaches the loop, which is before the retry's
    first write (behind it in the thread) can tell the test it got there. So the update swaps the pipelines
    while the retry waits for its second call. The old pipeline keeps results 600 s, the rebuilt one 120 s: a
    row 300 s old is left alone by the retry and refuses the rebuilt pipeline's restore."""
    pid = "default/probe-ad"
    pending = await _left_pending(tmp_path, [3600, 300])
    stale_old, stale_new = (f"row:{x['id']}" for x in pending[:2])
    r = await _start(tmp_path, {}, inference={"pipelines": []})
    hooks = _TwinHooks()
    ext = r.ext
    update: asyncio.Task | None = None
    try:
        await hooks.install(r)
        hooks.refuse |= {stale_old, stale_new}
        # Deadlines far off: nothing falls due, the timer task has no twin call of its own between its retries.
        await _update(r, tmp_path, push=AD_OFFLOAD.replace("deadlineS: 1", "deadlineS: 600"))  # its restore refused
        old = r.pipeline()
        assert pid in map(str, ext._unrestored)

        registered, go_on_registering = hooks.hold(f"device:{pid}")
        rebuilt = AD_OFFLOAD.replace("deadlineS: 1", "deadlineS: 100, resultMaxAgeS: 120")
        update = asyncio.create_task(_update(r, tmp_path, push=rebuilt))
        await asyncio.wait_for(registered.wait(), 20)  # the update's sync_derived holds the twin thread
        # Every retry before this one was refused at its first write, which the twin thread ran before the
        # registration: the next one to start is queued behind it.
        tries = ext.status()["restore"]["tries"]
        hooks.refuse.discard(stale_old)  # the timer's next retry is taken, once it went on
        retried, go_on_retrying = hooks.hold(stale_old)
        await async_wait_for(lambda: ext.status()["restore"]["tries"] > tries, timeout=20,
                             what="the timer's retry queued behind the update's registration")
        go_on_registering.set()
        await asyncio.wait_for(retried.wait(), 20)  # the retry's stand_stale holds the twin thread
        assert r.pipeline() is old, "the retry's first write came before the update swapped the pipelines"
        go_on_retrying.set()
        await asyncio.wait_for(update, 20)
        assert r.pipeline() is not old
        assert ext.status()["restore"]["unrestored"] == [pid], \
            "the rebuilt pipeline, its restore refused, is tried again"

        hooks.refuse.clear()  # the twin takes the rebuilt pipeline's restore now
        rows = await _until(lambda: r.decisions(pid),
                            lambda rows: {x["id"]: x for x in rows}[pending[1]["id"]]["status"] == "provisional",
                            what="the rebuilt pipeline's restore: the row past its 120 s stood")
        assert {x["id"]: x for x in rows}[pending[0]["id"]]["status"] == "provisional"
        # (The row stands in the restore's first twin call; the restore ends a call or two later.)
        await async_wait_for(lambda: ext.status()["restore"]["unrestored"] == [], timeout=10,
                             what="the rebuilt pipeline's restore ended")
        # Diagnostics: the previous run's other offloads wait for the rebuilt pipeline.
        assert all(ext._waiting[x["request_id"]].pipeline is r.pipeline() for x in pending[2:])
    finally:
        hooks.release_all()
        if update is not None and not update.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(update, 20)
        await _stop(r)


async def test_max_pending_gives_up_the_oldest_with_a_provisional_edge_answer(tmp_path, broker):
    """Beyond max_pending the oldest request is given up: a still-pending one gets its edge answer,
    provisional, in the twin and on the decision topic (as at expiry), instead of staying unlabelled."""
    r = await _start(tmp_path, {}, broker=broker, inference={"max_pending": 2, "pipelines": [
        {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600,
         "result_max_age_s": 1200, "resend_s": 600}]})
    try:
        stats = lambda: r.ext.status()["pipelines"]["default/probe-sensor-faults"]  # noqa: E731

        async def given_up():
            return [x for x in await r.decisions() if x["status"] == "provisional"]

        await async_wait_for(lambda: stats()["provisional"] >= 3, timeout=20, what="requests given up")
        await _until(lambda: given_up(), lambda rows: len(rows) >= 3, what="their rows provisional")
        assert stats()["waiting"] <= 2
        assert stats()["edge_exits"] == 0 and stats()["provisional"] >= 3 and stats()["expired"] >= 3
        rows = await given_up()
        assert all((x["label"], x["confidence"], x["exit"]) == (x["edge_label"], x["edge_confidence"], "edge")
                   for x in rows)
        at_app = lambda: {b["request_id"]: b for b in r.published()}  # noqa: E731
        await async_wait_for(lambda: {x["request_id"] for x in rows} <= set(at_app()), what="their decisions at the app")
        published = at_app()
        for x in rows:
            assert published[x["request_id"]]["provisional"] is True
            assert published[x["request_id"]]["label"] == x["edge_label"]
    finally:
        await _stop(r)


async def test_counters_are_logged_when_they_change_and_at_shutdown(tmp_path, broker, caplog):
    """One INFO line with the counters (rejections included) every log_counters_s when they changed,
    and one at shutdown."""
    import logging

    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, {}, broker=broker, inference={"log_counters_s": 0.05, "pipelines": [
        {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0}]})
    lines = lambda: [x.getMessage() for x in caplog.records if x.getMessage().startswith("inference counters")]  # noqa: E731
    try:
        await async_wait_for(lambda: any("windows=" in x and "edge_us_p99=" in x for x in lines()), timeout=20,
                             what="a counters line")
        await r.send_result(b"garbage")
        await async_wait_for(lambda: any("unmatched results rejected=malformed:1" in x for x in lines()),
                             timeout=20, what="the rejection in the counters line")
    finally:
        await _stop(r)
    assert lines()[-1].startswith("inference counters at shutdown: default/probe-sensor-faults: windows=")
    assert len(set(lines())) == len(lines()) or lines()[-1] == lines()[-2]  # a periodic line only on a change
    assert not r.ext.report()                                               # nothing changed since


def test_latency_percentiles_nearest_rank():
    from mapper.inference.pipeline import Stats, percentile

    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile(range(1, 101), 50) == 50 and percentile(range(1, 101), 99) == 99
    s = Stats()
    s.edge_us.extend(float(x) for x in range(1, 10_001))
    assert len(s.edge_us) == 4096 and s.latency()["edge_latency_us_p50"] == percentile(range(5905, 10_001), 50)



def _run_with_sockdir(scenario) -> None:  # noqa: ANN001
    """asyncio.run(scenario(sockdir)) with a short directory for the DMI socket (a unix socket path
    is limited to 108 bytes; pytest's tmp_path may be longer), removed after."""
    import shutil as _shutil
    import tempfile

    sockdir = Path(tempfile.mkdtemp(prefix="dmi-", dir="/tmp"))
    try:
        asyncio.run(scenario(sockdir))
    finally:
        _shutil.rmtree(sockdir, ignore_errors=True)

def test_kubeedge_device_with_anomaly_detection_gets_a_pipeline():
    """mode: kubeedge: a Device with pushMethod.anomalyDetection that edgecore sends after the mapper
    started (RegisterDevice over DMI, numbers as FloatValue) gets its pipeline and decisions; an update
    that drops the map drops the pipeline."""
    from dmi_edgecore import FakeEdgecore, packed
    from mapper.dmi import api_pb2 as pb
    from test_dmi import TEMP, registered, room, running_mapper

    def with_map(dev: pb.Device) -> pb.Device:
        data = dev.spec.properties[0].pushMethod.anomalyDetection.data
        for key, value in {"model": "sensor_faults", "deadlineS": 0.0, "name": "room-ad"}.items():
            data[key].CopyFrom(packed(value))
        return dev

    async def scenario(sockdir: Path) -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, running_mapper(sockdir) as mapper:
            ext = next(e for e in mapper.service.extensions if isinstance(e, InferenceExtension))
            await registered(mapper)
            assert ext.pipelines == {}
            await edgecore.add(with_map(room("room-a", cycle_ms=10)), TEMP)
            await async_wait_for(lambda: "default/room-ad" in ext.status()["pipelines"], timeout=20,
                                 what="the pipeline of the DMI device")
            stats = lambda: ext.status()["pipelines"]["default/room-ad"]  # noqa: E731
            await async_wait_for(lambda: stats()["windows"] >= 3, timeout=20, what="windows")
            rows = await mapper.service.twin(lambda s: records.recent(s, "default/room-ad", 1000))
            assert len(rows) >= 3 and all(x["label"] is not None for x in rows if x["status"] != "pending")
            await edgecore.call_mapper("UpdateDevice", pb.UpdateDeviceRequest(device=room("room-a", cycle_ms=10)))
            await async_wait_for(lambda: not ext.pipelines, timeout=20, what="the pipeline dropped")

    _run_with_sockdir(scenario)



def test_an_edgecore_devices_map_cannot_drive_a_local_yaml_device():
    """mode: kubeedge with a local default/lamp (temperature ReadWrite, the operator's YAML). edgecore sends
    default/room-a whose anomalyDetection map says setDevice: lamp (its own namespace, so the namespace
    confinement lets it through): the pipeline is refused with a problem naming the key and the local
    device, and the lamp's desired temperature is never set. A desired value such a pipeline asked for
    before its target became local (a SIGHUP) is refused when it would be set. (The pipeline ran and
    drove the operator's lamp: whoever may create Devices decided what a local device was driven to.)"""
    from dmi_edgecore import FakeEdgecore, packed
    from helpers import one_property_device
    from mapper.dmi import api_pb2 as pb
    from mapper.inference.pipeline import DesiredSet
    from test_dmi import LAMP_LOCAL_RW, TEMP, mapper_with_local, registered, room

    lamp = DeviceId("default", "lamp")
    every = "normal,spike,stuck,drift,noise"

    def with_map(dev: pb.Device) -> pb.Device:
        data = dev.spec.properties[0].pushMethod.anomalyDetection.data
        for key, value in {"model": "sensor_faults", "deadlineS": 0.0, "name": "room-ad", "setDevice": "lamp",
                           "setProperty": "temperature", "setValue": 30.0, "setOn": every}.items():
            data[key].CopyFrom(packed(value))
        return dev

    async def scenario(sockdir: Path) -> None:
        local = sockdir / "yaml"
        local.mkdir()
        lamp_file = local / "lamp.yaml"
        lamp_file.write_text(one_property_device("lamp", *LAMP_LOCAL_RW, settings="collectCycle: 50"))
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                mapper_with_local(sockdir, local) as (mapper, _):
            ext = next(e for e in mapper.service.extensions if isinstance(e, InferenceExtension))
            await registered(mapper)
            assert mapper.service.definitions.devices[lamp].origin == "local"
            await edgecore.add(with_map(room("room-a", cycle_ms=10)), TEMP)
            await async_wait_for(lambda: mapper.runner("room-a") is not None, timeout=20, what="room-a running")
            await async_wait_for(lambda: any("setDevice default/lamp" in p for p in ext.status()["problems"]),
                                 timeout=20, what="the refused pipeline's problem")
            problem = next(p for p in ext.status()["problems"] if "setDevice default/lamp" in p)
            assert "default/room-a/temperature pushMethod.anomalyDetection" in problem, problem
            assert f"local device of the node's operator ({lamp_file}:" in problem, problem
            assert ext.pipelines == {} and "default/room-ad" not in ext.status()["pipelines"]
            await asyncio.sleep(1.0)  # room-a reads every 10 ms: a pipeline would have decided by now
            desired = lambda: mapper.service.twin(  # noqa: E731
                lambda s: s.device(lamp).properties["temperature"].desired)
            assert await desired() is None

            # At set time too: the target's definition may have become local since the decision.
            await ext._set_desired([DesiredSet(lamp, "temperature", 30.0, confined=True)])  # noqa: SLF001
            assert await desired() is None
            assert ext.counts["desired_refused"] == 1
            # The operator's own pipelines (not confined) still may.
            await ext._set_desired([DesiredSet(lamp, "temperature", 25.0)])  # noqa: SLF001
            assert await desired() == 25.0

    _run_with_sockdir(scenario)


def test_a_confined_pipeline_is_rebuilt_when_its_device_or_target_changes_origin():
    """The pipeline key holds each device's origin: equal documents from another origin rebuild the
    pipeline (or refuse it), they do not keep the one built for the other origin."""
    class Def:
        def __init__(self, source: str) -> None:
            self.source, self.fingerprint, self.properties = source, "same", []

        @property
        def origin(self) -> str:
            return "edgecore" if self.source.startswith("dmi:") else "local"

    s = PipelineSettings.model_validate({"device": "probe", "model": "sensor_faults", "actions": [
        {"type": "set_desired", "device": "relay", "property": "power", "value": True}]})
    edge = {SENSOR: Def("dmi:default/probe"), RELAY: Def("dmi:default/relay")}
    local = {SENSOR: Def("dmi:default/probe"), RELAY: Def("/etc/mapper/devices/relay.yaml:3")}
    assert InferenceExtension._depends(s, edge) != InferenceExtension._depends(s, local)  # noqa: SLF001
    # The same map from a Device edgecore sent and from the operator's file: not the same pipeline.
    data = {"model": "sensor_faults", "setDevice": "default/relay", "setProperty": "power", "setValue": True}
    confined, own = (from_anomaly_detection(SENSOR, "temperature", data, confined=c) for c in (True, False))
    assert confined.confined and not own.confined and confined != own


def _without_ml(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess that cannot import numpy or onnxruntime (a core-only install)."""
    site = tmp_path / "no-ml"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\nsys.modules['onnxruntime'] = None\n")
    return {"PYTHONPATH": str(site)}


def test_without_the_ml_extra_configured_pipelines_are_a_config_error(tmp_path):
    """A core-only install (`pip install .`) and a config with inference pipelines: `mapper run` and
    `mapper install-service` refuse it at once, saying which extra to install. It used to start
    and die with a ModuleNotFoundError traceback."""
    from devices.extras import install_extra
    from helpers import write_config

    config = write_config(tmp_path / "c.yaml", _devices(tmp_path), tmp_path / "twin.db",
                          extra="inference:\n  pipelines:\n    - {device: probe, model: sensor_faults}\n")
    env = {**os.environ, **_without_ml(tmp_path)}
    for args in (("run",), ("install-service", "--dry-run")):
        done = subprocess.run([sys.executable, "-m", "mapper", *args, "--config", str(config)], capture_output=True,
                              text=True, timeout=30, cwd=REPO, env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "inference.pipelines: need numpy and onnxruntime, not installed here" in done.stderr
        assert f"install the `ml` extra ({install_extra('ml')})" in done.stderr, done.stderr
    assert not (tmp_path / "twin.db").exists()


def test_mapper_devices_shows_a_derived_devices_last_decision_as_its_last_reading(tmp_path):
    """`mapper devices` while a real pipeline decides (and after its stop): the derived device's `last
    reading` is the time of its newest decision (its decisions are its readings: report_derived records
    them, which sets last_reading_ts), not `-`. (Reported as showing `-`: it does only before the first
    decision, while every window so far is an offload waiting for its answer or its deadline_s.)"""
    from datetime import UTC, datetime

    from mapper_proc import MapperProcess

    def shown(config: Path) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-m", "mapper", "devices", "--config", str(config)], capture_output=True,
                             text=True, timeout=30, cwd=REPO)
        assert out.returncode == 0, out.stderr
        row = next(line.split() for line in out.stdout.splitlines() if line.startswith("default/probe-ad "))
        return row[1], f"{row[2]} {row[3]}"

    def newest(db: sqlite3.Connection) -> str | None:
        try:  # the derived device's readings: its decisions (the history, before any checkpoint)
            ts = db.execute("SELECT max(ts) FROM readings WHERE device_id='default/probe-ad'").fetchone()[0]
        except sqlite3.OperationalError:  # (the twin's tables not made yet)
            return None
        return None if ts is None else datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"

    with MapperProcess(tmp_path, _devices(tmp_path, push=AD_PUSH), None) as m:
        with contextlib.closing(sqlite3.connect(m.twin_path)) as db:
            wait_for(lambda: newest(db), timeout=30, what="a decision of the pipeline")
            state, last = shown(m.config)
            assert state == "ok" and last != "- inference", last
            assert last <= newest(db), (last, newest(db))  # (a decision may come between the two)
        assert m.stop() == 0
    with contextlib.closing(sqlite3.connect(m.twin_path)) as db:
        assert shown(m.config) == ("offline", newest(db))


def test_without_the_ml_extra_a_devices_pipeline_is_disabled_and_the_device_runs(tmp_path):
    """A device file asks for a pipeline (pushMethod.anomalyDetection, as under KubeEdge) on a
    core-only install: the pipeline is disabled, saying why, and the device is read as usual."""
    from mapper_proc import MapperProcess

    with MapperProcess(tmp_path, _devices(tmp_path, push=AD_PUSH), None, env=_without_ml(tmp_path)) as m:
        m.wait_log("1 pipeline(s) disabled: numpy and onnxruntime not installed here")
        with contextlib.closing(sqlite3.connect(m.twin_path)) as db:
            wait_for(lambda: db.execute("SELECT count(*) FROM readings WHERE device_id='default/probe'").fetchone()[0] >= 20,
                     what="readings of the probe")
        assert m.stop() == 0
    assert "Traceback" not in m.log()


# The closed loop of the tests below: the relay on for a spike, off otherwise; every window is offloaded and
# waits for its cloud answer (no deadline falls due), whose logits the tests choose.
RELAY_LOOP = {"device": "probe", "model": "sensor_faults", "threshold": 1.0, "deadline_s": 600, "resend_s": 600,
              "actions": [{"type": "publish"}, {"type": "set_desired", "device": "relay", "property": "power", "value": True,
                           "when": ["spike"], "otherwise": False}]}
SPIKE = [0.0, 8.0, 0.0, 0.0, 0.0]    # sensor_faults' classes: normal, spike, stuck, drift, noise
NORMAL = [8.0, 0.0, 0.0, 0.0, 0.0]


def _relay_power(store: TwinStore):
    return store.device(RELAY).properties["power"]


async def _two_pending(r: Running) -> tuple[dict, dict, dict, dict]:
    """The first two offload requests and their rows, pending (the first one's window the older)."""
    first, second = await async_wait_for(lambda: r.requests()[:2] if len(r.requests()) >= 2 else None, timeout=20,
                                         what="two offload requests at the worker")
    rows = [await _until(lambda b=b: _row(r, b["id"]), lambda x: x["status"] == "pending", what="its row")
            for b in (first, second)]
    assert rows[0]["window_end_ts"] < rows[1]["window_end_ts"]
    return first, second, rows[0], rows[1]


class _RowGate:
    """A SQLite function the mapper's own twin connection calls from a trigger on every update of a decision
    row: the update is refused (RAISE(ABORT)) while `refusing`, and the twin thread can be held inside a
    chosen update (its `nth` for a row) until the test lets it go. The interleavings of the tests below need
    one transaction held while another is queued behind it; the twin's own thread is where it is held."""

    def __init__(self) -> None:
        self.refusing: set[int] = set()   # row ids whose updates are refused
        self.calls: Counter[int] = Counter()
        self.holds: dict[tuple[int, int], tuple[threading.Event, threading.Event]] = {}

    def hold(self, row_id: int, nth: int):
        """Hold the `nth` update of `row_id` (in the twin thread): (reached, release) events."""
        events = self.holds[(row_id, nth)] = (threading.Event(), threading.Event())
        return events

    def __call__(self, row_id: int) -> int:
        self.calls[row_id] += 1
        held = self.holds.get((row_id, self.calls[row_id]))
        if held is not None:
            held[0].set()
            held[1].wait(30)
        return int(row_id in self.refusing)

    def release_all(self) -> None:
        self.refusing.clear()
        for _, release in self.holds.values():
            release.set()

    async def install(self, r: Running) -> None:
        def install(store: TwinStore) -> None:
            store.conn.create_function("test_row_gate", 1, self)
            store.conn.execute("CREATE TRIGGER test_row_gate BEFORE UPDATE ON inference_decisions"
                               " WHEN test_row_gate(new.id)"
                               " BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END")
        await r.service.twin(install)

    async def remove(self, r: Running) -> None:
        await r.service.twin(lambda store: store.conn.execute("DROP TRIGGER IF EXISTS test_row_gate"))


async def test_what_a_given_up_batch_kept_survives_a_timer_transaction_failing_meanwhile(tmp_path, broker, worker,
                                                                                        caplog):
    """A batch carries cloud answer R1 (relay on); while the recorder retries it, the timer's transaction takes
    answer R2 (off, collected later) and waits for the twin. The batch is given up (its readings commit
    alone: R1 kept for the next try), then the timer's transaction is refused too. The failing transaction
    used to put back only its own items, replacing R1 (never committed, a repeat refused as a duplicate).
    Both are kept, in the order they were collected: the next transaction records both answers and sets
    `on`, then `off` (R2's, the later answer's, is the value that stays).

    Through real parts: a trigger on the decision rows refuses R1's and R2's updates and holds the twin
    thread inside the batch's last try until the timer's transaction is queued behind it, and inside the
    timer's until the batch was given up. A spy (not a stand-in) on _collect_due tells when the timer took
    R2: nothing outside the process shows it before its transaction ends."""
    from mapper.recorder import EXTRA_TRIES

    caplog.set_level(logging.INFO)
    r = await _start(tmp_path, RELAY_LOOP, broker=broker)
    gate = _RowGate()
    try:
        first, second, row1, row2 = await _two_pending(r)
        taken: list[int] = []  # cloud answers each scan took
        real = r.ext._collect_due

        def collect_due(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            due = real(*args, **kwargs)
            taken.append(due[4])
            return due

        r.ext._collect_due = collect_due
        await gate.install(r)
        gate.refusing |= {row1["id"], row2["id"]}
        batch_last_try, let_batch_go = gate.hold(row1["id"], EXTRA_TRIES + 1)  # readings alone, then the work
        timer_try, let_timer_go = gate.hold(row2["id"], 1)

        await r.send_result(_answer(worker, first, logits=SPIKE))  # R1: rides with the next batch
        await async_wait_for(batch_last_try.is_set, timeout=20, what="the batch's last try (held in the twin)")
        taken.clear()  # (R1's batch took it) from here on no batch comes while the twin thread is held
        await r.send_result(_answer(worker, second, logits=NORMAL))  # R2: no batch comes: the timer's
        await async_wait_for(lambda: sum(taken) == 1, timeout=20, what="the timer taking R2")
        let_batch_go.set()
        await async_wait_for(lambda: any(m.startswith("gave up") and "test trigger" in m for m in caplog.messages)
                             and timer_try.is_set(), timeout=20,
                             what="the batch given up, the timer's transaction reaching the twin after it")
        let_timer_go.set()
        await async_wait_for(lambda: any(m.startswith("inference: cannot record what fell due") for m in
                                         caplog.messages), timeout=20, what="the timer's transaction refused")
        gate.refusing.clear()  # the twin takes writes again: the timer's next try
        rows = await _until(lambda: asyncio.gather(_row(r, first["id"]), _row(r, second["id"])),
                            lambda rows: all(x["status"] != "pending" for x in rows), what="both answers committed")
        assert [(x["status"], x["exit"], x["label"]) for x in rows] == [("final", "cloud", "spike"),
                                                                        ("final", "cloud", "normal")]
        power = await _until(lambda: r.service.twin(_relay_power), lambda p: p.desired_version >= 2,
                             what="the relay set twice")
        assert (power.desired, power.desired_version) == (False, 2)  # on, then off: the later answer's
        assert r.ext.results_applied == 2
    finally:
        gate.release_all()
        with contextlib.suppress(Exception):
            await gate.remove(r)
        await _stop(r)


async def test_what_was_kept_for_the_next_try_is_committed_at_the_stop(tmp_path, broker, worker, caplog):
    """The timer's transaction failed (kept for the next try, a second later) and the mapper stops
    meanwhile with no new cloud answer: the stop committed only when answers were waiting, so the
    kept ones (accepted answers, provisional edge answers) were never recorded nor acted on.

    The twin refuses through a trigger on the decision rows while a marker row exists; the marker goes
    the moment the stop is asked for, just after a refused try (the next one is a second away)."""
    caplog.set_level(logging.INFO, logger="mapper.inference")
    r = await _start(tmp_path, RELAY_LOOP, broker=broker)
    refuse = sqlite3.connect(tmp_path / "twin.db", timeout=10, isolation_level=None)
    try:
        first, _, _, _ = await _two_pending(r)
        for device in list(r.service.runners):  # no more batches: the answer is the timer's
            await r.service.stop_device(device)
        await r.service.recorder.flush()
        refuse.executescript("""
            CREATE TABLE test_refuse_updates (x);
            INSERT INTO test_refuse_updates VALUES (1);
            CREATE TRIGGER test_refuse_updates BEFORE UPDATE ON inference_decisions
            WHEN EXISTS (SELECT 1 FROM test_refuse_updates)
            BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END;
        """)
        await r.send_result(_answer(worker, first, logits=SPIKE))
        failure = "inference: cannot record what fell due"
        refused = lambda: sum(m.startswith(failure) for m in caplog.messages)  # noqa: E731
        await async_wait_for(lambda: refused() >= 1, timeout=20, what="the timer's transaction refused")
        seen = refused()
        await async_wait_for(lambda: refused() > seen, timeout=20, what="its next try refused (a second begins)")
        refuse.execute("DELETE FROM test_refuse_updates")  # the twin takes writes again ...
        r.stop.set()                                       # ... and the stop comes before the timer's next try
    finally:
        with contextlib.suppress(sqlite3.Error):
            refuse.execute("DELETE FROM test_refuse_updates")
        refuse.close()
        await _stop(r)
    with TwinStore.open(tmp_path / "twin.db") as store:
        row = {x["request_id"]: x for x in records.recent(store, "default/probe-sensor-faults", 100_000)}[first["id"]]
        power = _relay_power(store)
    assert (row["status"], row["exit"], row["label"]) == ("final", "cloud", "spike")
    assert (power.desired, power.desired_version) == (True, 1)  # and acted on
    assert [(b["exit"], b["label"]) for b in r.published() if b["request_id"] == first["id"]] == [("cloud", "spike")]


async def test_a_desired_value_asked_for_earlier_is_not_set_after_a_later_one(tmp_path, broker, worker, caplog):
    """Cloud answer R1 (relay on) rode in a batch whose transaction the recorder kept retrying; the later
    answer R2 (off) committed in the timer's transaction and set `off`; R1, kept and committed after, set
    `on`: the actuator ended on the older decision (and the pipeline, which last asked for `off`, held
    `off` back as already sent). A value asked for before one already set is skipped.

    The twin refuses R1's row update (a trigger on that row while a marker row exists) until `off` is set
    and R1's batch was given up; R2's row is not refused."""
    caplog.set_level(logging.INFO)
    r = await _start(tmp_path, RELAY_LOOP, broker=broker)
    refuse = sqlite3.connect(tmp_path / "twin.db", timeout=10, isolation_level=None)
    try:
        first, second, row1, _ = await _two_pending(r)
        refuse.executescript(f"""
            CREATE TABLE test_refuse_updates (x);
            INSERT INTO test_refuse_updates VALUES (1);
            CREATE TRIGGER test_refuse_updates BEFORE UPDATE ON inference_decisions
            WHEN new.id = {int(row1["id"])} AND EXISTS (SELECT 1 FROM test_refuse_updates)
            BEGIN SELECT RAISE(ABORT, 'the twin refused the write (test trigger)'); END;
        """)
        await r.send_result(_answer(worker, first, logits=SPIKE))  # R1: rides with the next batch, refused
        await async_wait_for(lambda: any(m.startswith("cannot commit") and "test trigger" in m
                                         for m in caplog.messages), timeout=20, what="R1's batch refused")
        await r.send_result(_answer(worker, second, logits=NORMAL))  # R2: collected after R1
        power = await _until(lambda: r.service.twin(_relay_power), lambda p: p.desired is not None,
                             what="R2's `off` set")
        assert (power.desired, power.desired_version) == (False, 1)
        await async_wait_for(lambda: any(m.startswith("gave up") and "test trigger" in m for m in caplog.messages),
                             timeout=20, what="R1's batch given up (R1 kept for the next try)")
        refuse.execute("DELETE FROM test_refuse_updates")  # the twin takes R1 again
        row = await _until(lambda: _row(r, first["id"]), lambda x: x["status"] != "pending", what="R1 committed")
        assert (row["status"], row["exit"], row["label"]) == ("final", "cloud", "spike")
        await async_wait_for(lambda: any("default/relay/power = True" in m for m in caplog.messages), timeout=10,
                             what="R1's `on` dealt with")
        power = await r.service.twin(_relay_power)
        assert (power.desired, power.desired_version) == (False, 1)  # the later answer's value stays
        assert "inference: default/relay/power = True not set: a later decision's value was set already" in (
            caplog.messages)
    finally:
        with contextlib.suppress(sqlite3.Error):
            refuse.execute("DELETE FROM test_refuse_updates")
        refuse.close()
        await _stop(r)


async def test_a_silent_cloud_worker_is_a_warning_once_and_shown_until_one_answers(tmp_path, broker, worker, caplog,
                                                                                   capsys):
    """Offloads unanswered for resend_s with no result of any kind since: one WARNING, the silence in STATUS=
    and on the derived device (`mapper devices`); the first result clears it, with one WARNING that says so.
    (It was visible only in the INFO counters line.)"""
    from helpers import write_config
    from mapper import cli
    from mapper.systemd import Notifier, SystemdExtension

    caplog.set_level(logging.INFO, logger="mapper.inference")
    derived = DeviceId.parse("default/probe-sensor-faults")
    systemd = SystemdExtension(Notifier(str(tmp_path / "notify")))  # (its STATUS= line, without a systemd)
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.1, "resend_s": 1.0},
                     broker=broker)
    silent = lambda: [x for x in caplog.records if "no cloud worker answers" in x.getMessage()]  # noqa: E731
    back = lambda: [x for x in caplog.records if "a cloud worker answers again" in x.getMessage()]  # noqa: E731
    health = Listener(broker.client("app"), r.topics.health())  # the node's retained health (a fleet's view)
    answering: asyncio.Task | None = None
    try:
        await async_wait_for(lambda: silent(), timeout=20, what="the worker's silence noticed")
        assert [x.levelno for x in silent()] == [logging.WARNING]
        said = silent()[0].getMessage()
        assert "offload(s) on mapper/" in said and "`mapper cloud-worker`" in said, said
        assert r.ext.cloud_silence() is not None and r.ext.cloud_silence().startswith("since ")
        status = await systemd._summary(r.service)
        assert f"; no cloud worker answers {r.ext.cloud_silence()} (see the log)" in status, status
        shown = await _until(lambda: r.service.twin(lambda s: s.device(derived)),
                             lambda d: "no cloud worker answers" in (d.state_detail or ""),
                             what="the silence on the derived device")
        assert shown.state == "ok"  # its edge answers stand: it still decides
        config = str(write_config(tmp_path / "c.yaml", tmp_path / "devices", tmp_path / "twin.db"))
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["devices", "--config", config]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(str(derived)))
        assert "no cloud worker answers (since" in row, row
        await async_wait_for(lambda: any("cloud_worker" in b for b in health.bodies("/health")),
                             what="the silence on the health topic")
        said = next(b for b in health.bodies("/health") if "cloud_worker" in b)
        assert said["cloud_worker"] == {"answering": False, "since": r.ext.cloud_silent_since_ms,
                                        "unanswered": said["cloud_worker"]["unanswered"]}, said
        assert said["cloud_worker"]["unanswered"] >= 1 and said["twin"] == "ok"
        # More unanswered resends are no news: still the one line.
        resent = r.ext.status()["pipelines"][str(derived)]["resent"]
        await async_wait_for(lambda: r.ext.status()["pipelines"][str(derived)]["resent"] > resent, what="a resend")
        assert len(silent()) == 1

        async def answer_every_request() -> None:
            """A worker comes: it answers every request (the worker's own code), as `mapper cloud-worker` would."""
            answered: set[str] = set()
            while True:
                fresh = [b for b in r.requests() if b["id"] not in answered]
                if fresh:
                    await r.send_result(*(_answer(worker, b) for b in fresh))
                    answered |= {b["id"] for b in fresh}
                await asyncio.sleep(0.05)

        answering = asyncio.create_task(answer_every_request())
        await async_wait_for(lambda: back(), what="the worker's answer noticed")
        assert [x.levelno for x in back()] == [logging.WARNING] and r.ext.cloud_silence() is None
        await _until(lambda: r.service.twin(lambda s: s.device(derived)),
                     lambda d: (d.state, d.state_detail) == ("ok", "inference pipeline on default/probe"),
                     what="the derived device's plain detail again")
        status = await systemd._summary(r.service)
        assert "cloud worker" not in status, status
        await async_wait_for(lambda: "cloud_worker" not in health.bodies("/health")[-1],
                             what="the health topic without the silence")
        assert len(silent()) == 1 and len(back()) == 1
    finally:
        if answering is not None:
            answering.cancel()
        health.probe.close()
        systemd.notifier.close()
        await _stop(r)


async def test_the_cloud_workers_silence_is_counted_on_the_monotonic_clock(tmp_path, broker, monkeypatch):
    """/metrics' mapper_inference_cloud_worker_silent_seconds: a Pi without a real-time clock has its
    wall clock stepped by timesyncd, often by hours; the silence's length must not move with it."""
    from mapper.inference import extension

    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.1, "resend_s": 1.0},
                     broker=broker)
    try:
        await async_wait_for(lambda: r.ext.cloud_silent_since_ms is not None, timeout=20,
                             what="the worker's silence noticed")
        before = r.ext.silent_for_s()
        wall = extension._now_ms
        monkeypatch.setattr(extension, "_now_ms", lambda: wall() + 3 * 3_600_000)  # stepped 3 h forward
        assert before <= r.ext.silent_for_s() < before + 3600
        monkeypatch.setattr(extension, "_now_ms", lambda: wall() - 3 * 3_600_000)  # and back
        assert r.ext.silent_for_s() >= before
    finally:
        await _stop(r)


async def test_the_derived_device_goes_offline_while_its_source_gives_no_steps_and_back(tmp_path, caplog):
    """The source device unplugged mid-window: no fresh window can be built, so the derived device says
    `offline` with why (it stayed `ok` with its last label for good); `ok` again at the source's first step."""
    caplog.set_level(logging.INFO, logger="mapper.inference")
    unplug = tmp_path / "unplugged"
    derived = DeviceId.parse("default/probe-sensor-faults")
    r = await _start(tmp_path, {"device": "probe", "model": "sensor_faults", "deadline_s": 0.0},
                     probe=f", fail_while_exists: {unplug}", loop=DeviceLoopSettings(max_backoff_s=0.2))
    device = lambda: r.service.twin(lambda s: s.device(derived))  # noqa: E731
    try:
        await async_wait_for(lambda: r.ext.status()["pipelines"][str(derived)]["windows"] >= 1, timeout=20,
                             what="a window")
        assert ((await device()).state, (await device()).state_detail) == ("ok", "inference pipeline on default/probe")
        unplug.touch()
        offline = await _until(device, lambda d: d.state == "offline", what="the derived device offline")
        assert offline.state_detail.startswith("no fresh window: default/probe is unhealthy and gave no step (a good "
                                               "reading of temperature, humidity) for more than 1.03 s (max_gap_s)"), \
            offline.state_detail
        assert any(x.levelno == logging.WARNING and f"derived device {derived}: offline" in x.getMessage()
                   for x in caplog.records)
        unplug.unlink()
        await _until(device, lambda d: (d.state, d.state_detail) == ("ok", "inference pipeline on default/probe"),
                     what="the derived device ok again")
    finally:
        await _stop(r)
