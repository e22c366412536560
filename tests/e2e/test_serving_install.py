"""The serving install (`pip install fracture-node`, what scripts/setup.sh does without a GPU):
no torch, and the node still scores a study with the bundled model on openvino and reports
it; the commands that need torch say which install they need."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from fracture_node.dicom.report import algorithm_device_uid
from fracture_node.ml.infer import bundled_model_path
from fracture_node.ml.model import sha256_file
from tests.support.serve import ServeProcess, make_study, wait_until

REPO = Path(__file__).resolve().parents[2]
TORCH_SIDE = ("torch", "torchvision", "timm", "onnx", "tqdm", "matplotlib")


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with fracture-node installed from this tree, no extras."""
    venv = tmp_path_factory.mktemp("serving") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", str(REPO)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return venv


@pytest.fixture
def node(tmp_path: Path, serving_venv: Path,
         storescp: tuple[int, Path]) -> Iterator[ServeProcess]:
    serve = ServeProcess(tmp_path / "node", [("pacs", "PACS", storescp[0])],
                         program=serving_venv / "bin" / "fracture-node")
    serve.start()
    yield serve
    if serve.proc and serve.proc.poll() is None:
        serve.proc.kill()


def test_the_serving_install_has_no_torch(serving_venv: Path) -> None:
    """None of torch, torchvision, timm, onnx, tqdm or matplotlib is installed; openvino and
    onnxruntime are."""
    code = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) is not "
            f"None for n in {(*TORCH_SIDE, 'openvino', 'onnxruntime')!r}}}))")
    out = subprocess.run([str(serving_venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    found = json.loads(out)
    assert found.pop("openvino") is True
    assert found.pop("onnxruntime") is True
    assert found == {name: False for name in TORCH_SIDE}


def test_a_study_is_scored_on_openvino_and_reported(
        node: ServeProcess, storescp: tuple[int, Path], samples_dir: Path,
        tmp_path: Path) -> None:
    """A hip CR pushed by storescu comes back as an SR made by the bundled model (its sha256),
    scored on openvino from the graph that ships beside it."""
    files = make_study(samples_dir, tmp_path / "study", ["derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"])
    proc = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [received] = wait_until(lambda: list(storescp[1].iterdir()), timeout=240)
    sr = pydicom.dcmread(received)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True)\
        .StudyInstanceUID
    [loaded] = [json.loads(line) for line in node.log().splitlines()
                if line.startswith("{") and '"model_loaded"' in line]
    assert loaded["engine"] == "openvino"
    assert loaded["sha256"] == sha256_file(bundled_model_path())
    assert algorithm_device_uid(loaded["sha256"]) in [
        e.get("DeviceUID") for e in sr.ContributingEquipmentSequence]


@pytest.mark.parametrize("command", [["train", "--data", "x", "--out", "y"],
                                     ["evaluate", "--data", "x"],
                                     ["model", "export", "--out", "x.onnx"]])
def test_training_commands_name_the_install_they_need(
        serving_venv: Path, command: list[str], tmp_path: Path) -> None:
    """train, evaluate and model export exit 2 with a one-line pointer to the right extra,
    not a traceback."""
    proc = subprocess.run([str(serving_venv / "bin" / "fracture-node"), *command],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install 'fracture-node[" in proc.stderr
