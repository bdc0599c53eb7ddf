"""An early-exit model pair on onnxruntime: `edge.onnx` (window -> exit logits + cut) and
`cloud.onnx` (cut -> final logits), described by `model.json`.

Sessions are created once per model directory (`load_model` caches them), after the sha256
of each graph was checked against model.json, with one intra-op and one inter-op thread,
sequential execution and thread spinning off: at sensor rates a spinning pool burns more
than a core for microseconds of work (shared/research/edge-inference.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mapper.inference.ort import import_onnxruntime

log = logging.getLogger("mapper.inference")


class ModelError(Exception):
    """A model directory is missing, damaged, or does not compute what model.json says."""


def session_options():  # noqa: ANN201 - onnxruntime.SessionOptions
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs from model.json."""

    name: str
    directory: Path
    classes: tuple[str, ...]
    properties: tuple[str, ...]
    window_length: int
    input_name: str
    cut_name: str
    cut_width: int
    threshold: float
    score: str
    cloud_sha256: str
    meta: dict[str, Any]

    @classmethod
    def read(cls, directory: Path) -> ModelInfo:
        path = directory / "model.json"
        try:
            meta = json.loads(path.read_text())
            inp = meta["input"]
            return cls(
                name=str(meta["name"]), directory=directory, classes=tuple(meta["classes"]),
                properties=tuple(inp["properties"]), window_length=int(inp["window_length"]),
                input_name=str(inp.get("name", "window")), cut_name=str(meta["cut"]["name"]),
                cut_width=int(meta["cut"]["width"]), threshold=float(meta["exit"]["threshold"]),
                score=str(meta["exit"].get("score", "max_prob")),
                cloud_sha256=str(meta["sha256"][meta["files"]["cloud"]]), meta=meta,
            )
        except FileNotFoundError:
            raise ModelError(f"{path}: not found (a model directory holds model.json, edge.onnx, cloud.onnx)") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: not a usable model description ({type(exc).__name__}: {exc})") from None

    @property
    def width(self) -> int:
        return self.window_length * len(self.properties)


class EarlyExitModel:
    """Both graphs of one model. `edge` and `cloud` run one window / one cut (or a batch)."""

    def __init__(self, info: ModelInfo, edge, cloud) -> None:  # noqa: ANN001 - InferenceSession
        self.info = info
        self._edge = edge
        self._cloud = cloud

    @classmethod
    def load(cls, directory: str | Path, *, parts: tuple[str, ...] = ("edge", "cloud")) -> EarlyExitModel:
        """Open the sessions after checking each graph's sha256 against model.json."""
        ort = import_onnxruntime()
        directory = Path(directory)
        info = ModelInfo.read(directory)
        sessions: dict[str, Any] = {}
        for part in parts:
            name = info.meta["files"][part]
            path = directory / name
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                raise ModelError(f"{path}: not found; copy it from the same build as {path.parent.name}/model.json "
                                 f"(the model's directory as shipped, or as models/README.md rebuilds it)") from None
            digest = hashlib.sha256(blob).hexdigest()
            if digest != info.meta["sha256"].get(name):
                raise ModelError(f"{path}: sha256 {digest[:16]}... does not match model.json; refusing to load it: the "
                                 f"file is damaged or from another build than model.json; copy the model's directory "
                                 f"whole, from one build")
            sessions[part] = ort.InferenceSession(blob, session_options(), providers=["CPUExecutionProvider"])
        return cls(info, sessions.get("edge"), sessions.get("cloud"))

    def edge(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window(s) [W*P] or [N, W*P] -> (exit_logits [N, K], cut [N, C])."""
        x = np.asarray(window, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.info.width:
            raise ValueError(f"window has {x.shape[1]} values; model {self.info.name} takes {self.info.width}")
        exit_logits, cut = self._edge.run(["exit_logits", self.info.cut_name], {self.info.input_name: x})
        return exit_logits, cut

    def edge_runner(self) -> EdgeRunner:
        """A runner of one window at a time through the edge graph, for one thread (a pipeline's)."""
        return EdgeRunner(self)

    def cloud(self, cut: np.ndarray) -> np.ndarray:
        """Cut(s) [C] or [N, C] -> final logits [N, K]."""
        c = np.asarray(cut, dtype=np.float32)
        if c.ndim == 1:
            c = c[None]
        if c.shape[1] != self.info.cut_width:
            raise ValueError(f"cut has {c.shape[1]} values; model {self.info.name} takes {self.info.cut_width}")
        (final,) = self._cloud.run(["final_logits"], {self.info.cut_name: c})
        return final

    def self_test(self, atol: float = 1e-3) -> int:
        """Run model.json's self-test rows through the loaded graphs; returns how many passed.

        Raises ModelError when any output differs from the recorded one by more than `atol`.
        """
        rows = self.info.meta.get("self_test") or []
        for i, row in enumerate(rows):
            window = np.asarray(row["window"], dtype=np.float32)
            if self._edge is not None:
                exit_logits, cut = self.edge(window)
                if not np.allclose(exit_logits[0], row["exit_logits"], atol=atol):
                    raise ModelError(f"{self.info.directory}: self-test row {i}: edge exit logits differ from model.json")
                if window.ndim == 1:  # what a pipeline runs: the same numbers through its bound buffers
                    one_logits, one_cut = self.edge_runner()(window.tolist())
                    if not (np.allclose(one_logits, exit_logits[0], atol=atol) and np.allclose(one_cut, cut[0], atol=atol)):
                        raise ModelError(f"{self.info.directory}: self-test row {i}: the edge graph gives other "
                                         "numbers through bound buffers than through run()")
                if self._cloud is not None:
                    final = self.cloud(cut)
                    if not np.allclose(final[0], row["final_logits"], atol=atol):
                        raise ModelError(f"{self.info.directory}: self-test row {i}: final logits differ from model.json")
        return len(rows)


class EdgeRunner:
    """One window at a time through the edge graph, into buffers bound to the session once
    (onnxruntime's IOBinding): no input dict, no output arrays allocated and converted per run.
    At one window a second, on cold caches, that took the edge call from ~225 to ~145 us
    (/tmp/h8x/ortbench.py, not in the repo; ~175 through the public wrapper). Its buffers are its
    own: one runner per thread (a pipeline's, on the event loop); runners of one session may run
    concurrently."""

    def __init__(self, model: EarlyExitModel) -> None:
        info = model.info
        session = model._edge
        if session is None:
            raise ModelError(f"{info.directory}: the edge graph is not loaded")
        self._window = np.zeros((1, info.width), dtype=np.float32)
        self._logits = np.zeros((1, len(info.classes)), dtype=np.float32)
        self._cut = np.zeros((1, info.cut_width), dtype=np.float32)
        binding = session.io_binding()
        binding.bind_cpu_input(info.input_name, self._window)
        for name, buffer in (("exit_logits", self._logits), (info.cut_name, self._cut)):
            binding.bind_output(name, "cpu", 0, np.float32, buffer.shape, buffer.ctypes.data)
        # The session's own run_with_iobinding under onnxruntime's Python wrapper: the wrapper's checks
        # (WebGPU graph capture, in 1.32) cost ~30 us a window on cold caches. Tried once here; the
        # public wrapper if that private layer is not there or not called so in another version.
        self._run: Callable[[], object] = functools.partial(session.run_with_iobinding, binding)
        inner, inner_binding = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
        if inner is not None and inner_binding is not None:
            direct = functools.partial(inner.run_with_iobinding, inner_binding, None)
            try:
                direct()
            except Exception:  # noqa: BLE001 - another onnxruntime's internals: the public call
                log.debug("onnxruntime %s: IOBinding run through its public wrapper", getattr(
                    import_onnxruntime(), "__version__", "?"))
            else:
                self._run = direct

    def __call__(self, values: Sequence[float]) -> tuple[list[float], np.ndarray]:
        """A window's [W*P] values -> (its exit logits, its cut [C], a copy of its own)."""
        self._window[0] = values
        self._run()
        return self._logits[0].tolist(), self._cut[0].copy()


# What a mapper loads: it runs only the shallow exit. The deep part is the cloud worker's
# (cloud.onnx need not be on the device); its sha256 in model.json is what requests name.
# Loading it too cost a session the mapper never ran (~0.3 MiB of RSS on the Pi workload).
EDGE_ONLY = ("edge",)

_CACHE: dict[tuple[Path, tuple[str, ...]], EarlyExitModel] = {}
_LOCK = threading.Lock()


def load_model(directory: str | Path, *, parts: tuple[str, ...] = ("edge", "cloud")) -> EarlyExitModel:
    """Load (once per process and directory) and self-test a model."""
    key = (Path(directory).resolve(), parts)
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = EarlyExitModel.load(key[0], parts=parts)
            model.self_test()
            _CACHE[key] = model
        return model
