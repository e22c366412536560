"""Engines: torch, openvino or onnxruntime chosen for a model file, the graph's source checked,
same output."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from fracture_node.config import ModelConfig
from fracture_node.errors import ConfigError, ModelError
from fracture_node.ml import ort_engine as oe
from fracture_node.ml.explain import Explainer, upsample
from fracture_node.ml.infer import GRAPH_ENGINES, Classifier, open_graph
from fracture_node.ml.model import (
    ARCHITECTURES,
    build_model,
    load_model_file,
    save_model_file,
    sha256_file,
)
from fracture_node.ml.onnx_export import export_onnx

CARD = {"name": "engine-test", "version": "0", "architecture": "resnet18", "input_size": 64,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.4, "std": 0.2}, "tta": True,
        "calibration": {"method": "platt", "slope": 1.3, "intercept": -0.2}}
HIRESCAM = ("hirescam", "last")
each_graph_engine = pytest.mark.parametrize("engine", GRAPH_ENGINES)


def _save(path: Path, seed: int, arch: str = "resnet18") -> Path:
    torch.manual_seed(seed)
    save_model_file(path, build_model(arch), dict(CARD, architecture=arch))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 model file (64 px, TTA, calibrated) with its graph beside it."""
    path = _save(tmp_path_factory.mktemp("engine") / "model.pt", 3)
    export_onnx(path)
    return path


def _copy(exported: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".pt", ".json", ".onnx"):
        shutil.copy(exported.with_suffix(suffix), folder / f"model{suffix}")
    return folder / "model.pt"


def _images(n: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(7).random((n, size, size), dtype=np.float32)


def test_auto_on_the_cpu_runs_openvino_with_the_model_files_identity(exported: Path) -> None:
    """auto picks openvino on the CPU; the classifier's sha256 stays the .pt's."""
    with capture_logs() as logs:
        clf = Classifier.load(exported, "cpu", engine="auto", saliency=HIRESCAM)
    assert clf.engine == "openvino"
    assert clf.onnx_path == exported.with_suffix(".onnx")
    assert clf.sha256 == sha256_file(exported)
    [loaded] = [e for e in logs if e["event"] == "model_loaded"]
    assert (loaded["engine"], loaded["engine_requested"]) == ("openvino", "auto")


def test_auto_on_the_cpu_runs_onnxruntime_without_openvino(
        exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where openvino cannot be imported, auto picks onnxruntime; asking for openvino then
    is refused, naming the missing package."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    clf = Classifier.load(exported, "cpu", engine="auto", saliency=HIRESCAM)
    assert clf.engine == "onnxruntime"
    assert clf.onnx_path == exported.with_suffix(".onnx")
    with pytest.raises(ModelError, match="openvino is not installed"):
        Classifier.load(exported, "cpu", engine="openvino")


@each_graph_engine
def test_graph_engine_probabilities_equal_torchs(exported: Path, engine: str) -> None:
    """Both engines give the same calibrated, TTA-averaged probabilities."""
    ort = Classifier.load(exported, "cpu", engine=engine)
    assert ort.engine == engine
    ref = Classifier.load(exported, "cpu", engine="torch")
    batch = _images(5)
    np.testing.assert_allclose(ort.predict_batch(batch), ref.predict_batch(batch), atol=1e-5)


@each_graph_engine
def test_graph_engine_saliency_maps_equal_torchs_hirescam(exported: Path, engine: str) -> None:
    """The graph's evidence output gives torch's HiResCAM (and Grad-CAM) maps at the last stage."""
    ort = Explainer(Classifier.load(exported, "cpu", engine=engine), method="hirescam")
    ref = Explainer(Classifier.load(exported, "cpu", engine="torch"), method="hirescam")
    batch = _images(4)
    p_ort, maps_ort = ort.explain_methods(batch, ("hirescam", "gradcam"))
    p_ref, maps_ref = ref.explain_methods(batch, ("hirescam", "gradcam"))
    np.testing.assert_allclose(p_ort, p_ref, atol=1e-5)
    assert ort.layer_name == ref.layer_name == "layer4"
    for method in ("hirescam", "gradcam"):
        np.testing.assert_allclose(maps_ort[method], maps_ref[method], atol=1e-3)
        assert [int(np.argmax(m)) for m in maps_ort[method]] == \
            [int(np.argmax(m)) for m in maps_ref[method]]


def test_upsampling_without_torch_equals_torchs_bicubic() -> None:
    """ort_engine's matrix upsampling equals F.interpolate bicubic, clipped and normalised."""
    grid = np.random.default_rng(1).random((3, 7, 5), dtype=np.float32) - 0.3
    grid[2] = -1.0  # no positive evidence: an all-zero map
    up = torch.relu(upsample(torch.from_numpy(grid), 40))
    peak = up.amax(dim=(1, 2), keepdim=True)
    ref = torch.where(peak > 0, up / torch.where(peak > 0, peak, 1.0), 0.0).numpy()
    np.testing.assert_allclose(oe.upsample_cams(grid, 40), ref, atol=1e-5)
    assert not oe.upsample_cams(grid, 40)[2].any()


def test_auto_falls_back_to_torch_for_saliency_the_graph_cannot_give(exported: Path) -> None:
    """LayerCAM needs gradients: auto runs torch and logs why."""
    with capture_logs() as logs:
        clf = Classifier.load(exported, "cpu", engine="auto", saliency=("layercam", "last"))
    assert clf.engine == "torch"
    [fallback] = [e for e in logs if e["event"] == "engine_fallback"]
    assert "layercam@last" in fallback["reason"]


@each_graph_engine
def test_graph_engine_refuses_saliency_it_cannot_give(exported: Path, engine: str) -> None:
    """Asked for explicitly, a graph engine with a stride-16 map is refused, not degraded."""
    with pytest.raises(ModelError, match="hirescam@stride16 needs the torch engine"):
        Classifier.load(exported, "cpu", engine=engine, saliency=("hirescam", "stride16"))


def test_missing_graph_is_exported_at_load(exported: Path, tmp_path: Path) -> None:
    """No .onnx beside the model file: auto exports it and uses it."""
    path = _copy(exported, tmp_path)
    path.with_suffix(".onnx").unlink()
    with capture_logs() as logs:
        clf = Classifier.load(path, "cpu", engine="auto")
    assert clf.engine == "openvino"
    assert oe.OrtRunner(path.with_suffix(".onnx")).source_sha256 == sha256_file(path)
    assert any(e["event"] == "onnx_exported" for e in logs)


@each_graph_engine
def test_graph_of_changed_weights_is_exported_again(exported: Path, tmp_path: Path,
                                                    engine: str) -> None:
    """New weights in the model file: the old graph is logged with both hashes, re-exported,
    and the scores are the new weights' scores."""
    path = _copy(exported, tmp_path)
    old = sha256_file(path)
    _save(path, seed=99)  # the model file drifts from its graph
    new = sha256_file(path)
    assert old != new
    with capture_logs() as logs:
        clf = Classifier.load(path, "cpu", engine=engine)
    [stale] = [e for e in logs if e["event"] == "onnx_stale"]
    assert (stale["onnx_source_sha256"], stale["model_sha256"]) == (old, new)
    assert open_graph(engine, path.with_suffix(".onnx")).source_sha256 == new
    batch = _images(3)
    expected = Classifier.load(path, "cpu", engine="torch").predict_batch(batch)
    np.testing.assert_allclose(clf.predict_batch(batch), expected, atol=1e-5)


@each_graph_engine
def test_graph_of_changed_weights_is_refused_when_it_cannot_be_exported(
        exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Without the exporter (an install without torch), a stale graph is refused, naming both
    hashes; auto then scores with torch rather than with the stale graph."""
    path = _copy(exported, tmp_path)
    old = sha256_file(path)
    _save(path, seed=98)
    new = sha256_file(path)
    monkeypatch.setitem(sys.modules, "fracture_node.ml.onnx_export", None)
    with pytest.raises(ModelError) as refused:
        Classifier.load(path, "cpu", engine=engine)
    assert old in str(refused.value) and new in str(refused.value)
    with capture_logs() as logs:
        clf = Classifier.load(path, "cpu", engine="auto")
    assert clf.engine == "torch"
    assert any(e["event"] == "onnx_stale" and e["onnx_source_sha256"] == old for e in logs)


@each_graph_engine
def test_graph_of_another_model_file_is_never_run(exported: Path, tmp_path: Path,
                                                  engine: str) -> None:
    """A classifier handed a graph whose recorded source is another file refuses it."""
    other = _save(tmp_path / "other.pt", seed=5)
    runner = open_graph(engine, exported.with_suffix(".onnx"))
    with pytest.raises(ModelError, match=sha256_file(other)):
        Classifier(load_model_file(other), torch.device("cpu"), engine, runner)


@each_graph_engine
def test_a_file_that_is_not_our_graph_is_refused(tmp_path: Path, engine: str) -> None:
    """An unreadable file, and a valid ONNX graph without fracture-node's format, are refused
    with a ModelError naming the file."""
    import onnx
    from onnx import TensorProto, helper

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="junk.onnx cannot be loaded"):
        open_graph(engine, junk)
    node = helper.make_node("Identity", ["image"], ["logit"])
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logit", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ModelError, match="foreign.onnx was not written by fracture-node"):
        open_graph(engine, foreign)


@each_graph_engine
def test_graph_is_written_to_the_cache_folder_when_needed(exported: Path, tmp_path: Path,
                                                          engine: str) -> None:
    """When the model's folder cannot take the graph, it goes to the cache folder."""
    path = _copy(exported, tmp_path / "ro")
    path.with_suffix(".onnx").unlink()
    path.with_suffix(".onnx").mkdir()  # something that is not a graph is in the way
    clf = Classifier.load(path, "cpu", engine=engine, cache_dir=tmp_path / "cache")
    assert clf.engine == engine
    assert clf.onnx_path == tmp_path / "cache" / "model.onnx"


def test_evidence_architectures_are_trainings() -> None:
    """The graph carries an evidence map exactly for the architectures training makes one for."""
    from fracture_node.ml.evidence import supports_evidence_map

    for arch in ARCHITECTURES:
        assert oe.has_evidence_map(arch) == supports_evidence_map(arch), arch


@pytest.mark.parametrize(("engine", "device", "threads"),
                         [("tensorrt", "auto", 0), ("onnxruntime", "cuda", 0),
                          ("openvino", "cuda:0", 0), ("auto", "auto", -1)])
def test_config_refuses_impossible_engines(engine: str, device: str, threads: int) -> None:
    """Unknown engines, a graph engine on a GPU and negative threads are configuration errors."""
    with pytest.raises(ConfigError, match="unknown|runs on the CPU|threads"):
        ModelConfig(engine=engine, device=device, threads=threads).validate()


@pytest.mark.parametrize("engine", ["auto", "torch", *GRAPH_ENGINES])
def test_config_accepts_every_engine_on_the_cpu(engine: str) -> None:
    """Every engine of the classifier is a valid [model] engine on the CPU."""
    ModelConfig(engine=engine, device="cpu").validate()


@each_graph_engine
def test_predict_gives_the_same_rows_on_both_engines(exported: Path, samples_dir: Path,
                                                     tmp_path: Path, engine: str) -> None:
    """`predict --locate` writes the same labels, probabilities (1e-5) and peaks on torch and on
    a graph engine."""
    import csv

    from fracture_node.cli.predict import main as predict

    inputs = [str(samples_dir / n) for n in ("CR_hip_RG2_JLSL.dcm", "CR_chest_RG1_J2KI.dcm",
                                             "CR_extremity_RG3_J2KR.dcm")]
    rows = {}
    for name in ("torch", engine):
        out = tmp_path / f"{name}.csv"
        assert predict([*inputs, "--model", str(exported), "--engine", name, "--locate",
                        "--operating-point", "0.5", "--output", str(out)]) == 0
        with out.open() as fh:
            rows[name] = list(csv.DictReader(fh))
    assert len(rows["torch"]) == 3
    for ref, got in zip(rows["torch"], rows[engine], strict=True):
        assert got["status"] == ref["status"] == "ok"
        assert got["label"] == ref["label"]
        assert abs(float(got["probability"]) - float(ref["probability"])) <= 1e-5
        assert (got["peak_x"], got["peak_y"]) == (ref["peak_x"], ref["peak_y"])
        assert got["model_sha256"] == ref["model_sha256"] == sha256_file(exported)


# --- passes of sub_batch images -------------------------------------------------------------


def _pass_sizes(clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of network inputs of every pass the classifier's engine runs."""
    sizes: list[int] = []
    if clf._runner is not None:
        runner = clf._runner
        infer = runner._infer

        def spy(x: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
            sizes.append(int(x.shape[0]))
            return infer(x, wanted)

        monkeypatch.setattr(runner, "_infer", spy)
    else:
        clf._net.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    return sizes


@pytest.mark.parametrize("engine", ["torch", *GRAPH_ENGINES])
def test_sub_batches_give_the_whole_batchs_results(exported: Path, engine: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the network runs passes of sub_batch images (2 by default): probabilities and
    saliency maps equal one pass of the whole batch, in the batch's order, an odd batch
    included; sub_batch 0 runs the whole batch at once."""
    whole = Classifier.load(exported, "cpu", engine=engine, sub_batch=0)
    split = Classifier.load(exported, "cpu", engine=engine)
    assert split.sub_batch == 2 and whole.sub_batch == 0
    batch = _images(7)
    whole_sizes, split_sizes = _pass_sizes(whole, monkeypatch), _pass_sizes(split, monkeypatch)
    np.testing.assert_allclose(split.predict_batch(batch), whole.predict_batch(batch),
                               atol=1e-6)
    views = 2  # the model file asks for flip TTA
    if engine == "torch":  # one pass per view
        assert whole_sizes == [7, 7] and split_sizes == [2, 2, 2, 2, 2, 2, 1, 1]
    else:  # both views in one run of the graph
        assert whole_sizes == [7 * views] and split_sizes == [2 * views] * 3 + [views]
    p_whole, maps_whole = Explainer(whole, "hirescam").explain_methods(batch, ("hirescam",))
    p_split, maps_split = Explainer(split, "hirescam").explain_methods(batch, ("hirescam",))
    np.testing.assert_allclose(p_split, p_whole, atol=1e-6)
    np.testing.assert_allclose(maps_split["hirescam"], maps_whole["hirescam"], atol=1e-5)
    assert maps_split["hirescam"].shape == (7, 64, 64)
    assert max(split_sizes) <= 2 * views


def test_sub_batch_defaults_and_refusals(exported: Path) -> None:
    """The whole batch on a GPU, 2 images on a CPU; a negative size is refused by the loader
    and by the configuration, which takes 0 (automatic) or a size."""
    from fracture_node.ml.infer import CPU_SUB_BATCH, default_sub_batch

    assert default_sub_batch("cpu") == CPU_SUB_BATCH == 2
    assert default_sub_batch("cuda:0") == default_sub_batch("cuda") == 0
    assert Classifier.load(exported, "cpu", engine="torch", sub_batch=5).sub_batch == 5
    with pytest.raises(ModelError, match="sub_batch"):
        Classifier.load(exported, "cpu", engine="openvino", sub_batch=-1)
    ModelConfig(sub_batch=0).validate()
    ModelConfig(sub_batch=4).validate()
    with pytest.raises(ConfigError, match="sub_batch"):
        ModelConfig(sub_batch=-2).validate()
