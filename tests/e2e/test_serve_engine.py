"""`fracture-node serve` on a CPU picks OpenVINO, exports the graph, and keeps the .pt's identity."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch

from fracture_node.ml.model import build_model, save_model_file, sha256_file
from tests.support.serve import ServeProcess, make_study, wait_until

NAMES = ["derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm", "CR_cspine_tiny16x16_explicitVR.dcm"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small resnet18 model file (its head has a class-evidence map) without a graph."""
    torch.manual_seed(25)
    path = tmp_path / "models" / "resnet.pt"
    save_model_file(path, build_model("resnet18"), {
        "name": "serve-engine-test", "version": "0", "architecture": "resnet18",
        "input_size": 64, "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.5, "std": 0.25}, "tta": True})
    return path


def test_serve_scores_on_openvino_with_the_model_files_sha256(
        tmp_path: Path, model: Path, storescp: tuple[int, Path], samples_dir: Path) -> None:
    """With the default engine (auto) and saliency on, serve exports <model>.onnx at start,
    scores on OpenVINO with saliency, and records the model file's sha256."""
    node = ServeProcess(tmp_path / "node", [("pacs", "PACS", storescp[0])], model=model)
    node.start()
    try:
        files = make_study(samples_dir, tmp_path / "study", NAMES)
        proc = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                               *map(str, files)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: list(storescp[1].iterdir()), timeout=120)
    finally:
        node.stop()
    events = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    [loaded] = [e for e in events if e["event"] == "model_loaded"]
    assert loaded["engine"] == "openvino" and loaded["engine_requested"] == "auto"
    assert loaded["sub_batch"] == 2  # [model] sub_batch = 0: the CPU's passes of 2 images
    assert any(e["event"] == "onnx_exported" for e in events)
    assert model.with_suffix(".onnx").is_file()
    with sqlite3.connect(tmp_path / "node" / "state" / "fracture-node.db") as conn:
        rows = conn.execute("SELECT model_sha256, saliency FROM results").fetchall()
    assert len(rows) == 2
    assert {sha for sha, _ in rows} == {sha256_file(model)}
    assert all(saliency is not None for _, saliency in rows)
