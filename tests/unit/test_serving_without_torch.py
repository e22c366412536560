"""Serving without torch: with its graph in place, a model file is scored and explained on
openvino (or on onnxruntime where openvino is missing too) in a process where torch,
torchvision, timm and onnx cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fracture_node.ml.explain import Explainer
from fracture_node.ml.infer import GRAPH_ENGINES, Classifier
from fracture_node.ml.model import build_model, save_model_file, sha256_file
from fracture_node.ml.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[2]
WITHOUT_TORCH = """
import json, sys
BLOCKED = {"torch", "torchvision", "timm", "onnx", *sys.argv[3:]}
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, Blocked())
import numpy as np
import fracture_node.daemon, fracture_node.stages.score  # what serve imports
from fracture_node.errors import ModelError
from fracture_node.ml.explain import Explainer
from fracture_node.ml.infer import Classifier
try:
    clf = Classifier.load(sys.argv[1], "auto", engine="auto", saliency=("hirescam", "last"))
except ModelError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(2)
p, maps = Explainer(clf, "hirescam", "last").explain_batch(np.load(sys.argv[2]))
print(json.dumps({"engine": clf.engine, "sha256": clf.sha256, "p": p.tolist(),
                  "peaks": [int(m.argmax()) for m in maps], "torch": "torch" in sys.modules}))
"""


def _model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_model_file(path, build_model("resnet18"), {
        "name": "no-torch-test", "version": "0", "architecture": "resnet18", "input_size": 64,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.4, "std": 0.2}, "tta": True})
    return path


def _missing(engine: str) -> list[str]:
    """The graph engines that must be missing too for ``auto`` to take ``engine``."""
    return list(GRAPH_ENGINES[:GRAPH_ENGINES.index(engine)])


def _run(model: Path, batch: Path, blocked: list[str]) -> tuple[int, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(model), str(batch),
                           *blocked],
                          capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "batch.npy"
    np.save(path, np.random.default_rng(3).random((3, 64, 64), dtype=np.float32))
    return path


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_exported_model_is_served_without_torch(tmp_path: Path, batch: Path, engine: str) -> None:
    """No torch in the process: openvino (onnxruntime where openvino is missing too) scores and
    explains as torch does, with the .pt's sha256."""
    model = _model(tmp_path / "model.pt", seed=11)
    export_onnx(model)
    code, out = _run(model, batch, _missing(engine))
    assert code == 0, out
    assert out["engine"] == engine and out["torch"] is False
    assert out["sha256"] == sha256_file(model)
    p_ref, maps_ref = Explainer(Classifier.load(model, "cpu"), "hirescam", "last").explain_batch(
        np.load(batch))
    np.testing.assert_allclose(np.asarray(out["p"], dtype=np.float64), p_ref, atol=1e-5)
    assert out["peaks"] == [int(m.argmax()) for m in maps_ref]


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_stale_graph_is_refused_without_torch_naming_both_hashes(tmp_path: Path, batch: Path,
                                                                 engine: str) -> None:
    """Without torch a graph of earlier weights cannot be re-exported: start is refused with
    both hashes in the message."""
    model = _model(tmp_path / "model.pt", seed=12)
    export_onnx(model)
    old = sha256_file(model)
    _model(model, seed=13)
    code, out = _run(model, batch, _missing(engine))
    assert code == 2
    assert old in str(out["error"]) and sha256_file(model) in str(out["error"])
    assert "without torch" in str(out["error"])


def test_model_export_without_torch_says_what_is_missing(tmp_path: Path) -> None:
    """`fracture-node model export` where torch is not installed exits 2 with a clear message."""
    blocker = WITHOUT_TORCH.split("import numpy as np")[0]
    script = blocker + ("from fracture_node import cli\n"
                        "raise SystemExit(cli.main(['model', 'export', '--model', sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "model export needs torch and onnx" in proc.stderr
    assert "Traceback" not in proc.stderr


TORCH_INSTALLED = """
import json, sys
import fracture_node.ml.infer as infer
infer.GPU_DEVICE_FILES = tuple(sys.argv[2:])
clf = infer.Classifier.load(sys.argv[1], "auto", engine="auto")
print(json.dumps({"engine": clf.engine, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("driver", [False, True])
def test_auto_on_a_cpu_server_with_torch_installed_leaves_torch_out(tmp_path: Path,
                                                                    driver: bool) -> None:
    """torch installed (a training or GPU install) but no GPU driver's device file: `auto`
    serves the graph on openvino without importing torch (hundreds of MiB, seconds of
    start-up); where a driver's file exists, torch is asked whether CUDA works."""
    model = _model(tmp_path / "model.pt", seed=14)
    export_onnx(model)
    device_file = tmp_path / ("nvidiactl" if driver else "absent")
    if driver:
        device_file.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", TORCH_INSTALLED, str(model), str(device_file)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["torch"] is driver
    if not torch.cuda.is_available():
        assert out["engine"] == "openvino"
