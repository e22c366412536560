"""ONNX export: the graph derived from a model file, its outputs and its recorded source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import structlog
import torch

from fracture_node import cli
from fracture_node.errors import ModelError
from fracture_node.ml import ort_engine as oe
from fracture_node.ml.model import build_model, load_model_file, save_model_file, sha256_file
from fracture_node.ml.onnx_export import ExportGraph, export_onnx


def _model(path: Path, arch: str, size: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model_file(path, build_model(arch), {
        "name": "onnx-test", "version": "0", "architecture": arch, "input_size": size,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.4, "std": 0.2}, "tta": True})
    return path


@pytest.fixture
def cli_logs() -> Iterator[None]:
    """The CLI configures logging onto the captured stderr, closed after the test: undo it."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("onnx") / "resnet.pt", "resnet18")


def test_export_writes_the_graph_beside_the_model_with_its_source(resnet: Path) -> None:
    """The graph lands at <model>.onnx and records the model file's sha256 and card."""
    written = export_onnx(resnet)
    assert written == resnet.with_suffix(".onnx")
    proto = onnx.load(str(written))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[oe.META_SHA256] == sha256_file(resnet)
    assert props[oe.META_FORMAT] == oe.FORMAT
    assert json.loads(props[oe.META_CARD])["architecture"] == "resnet18"
    assert [o.name for o in proto.graph.output] == [oe.LOGIT, oe.EVIDENCE]


def test_graph_logits_equal_the_networks_on_images_of_any_batch_size(resnet: Path) -> None:
    """onnxruntime's logits match torch's network (with the card's normalisation), batch 1 and 3."""
    path = export_onnx(resnet, resnet.with_name("batch.onnx"))
    runner = oe.OrtRunner(path)
    net = load_model_file(resnet).build()
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, 64, 64), dtype=np.float32)
        got, _ = runner.run(x, tta=False, evidence=False)
        with torch.no_grad():
            ref = net((torch.from_numpy(x)[:, None] - 0.4) / 0.2).squeeze(1).numpy()
        assert got.shape == (n,)
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_lite0"])
def test_evidence_map_is_trainings_map_without_the_bias(arch: str) -> None:
    """The exported evidence output is train.forward_with_map's map less the head's bias."""
    from fracture_node.ml.evidence import forward_with_map

    torch.manual_seed(1)
    net = build_model(arch).eval()
    graph = ExportGraph(net, arch, 0.0, 1.0).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logit, evidence = graph(x)
        ref_logit, ref_map = forward_with_map(net, arch, x)
        forward = net(x).squeeze(1)
    bias = net.get_submodule({"resnet18": "fc"}.get(arch, "classifier")).bias
    torch.testing.assert_close(evidence, ref_map - bias[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit, forward, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit, ref_logit, atol=1e-5, rtol=1e-5)


def test_architecture_without_a_pooling_head_exports_logits_only(tmp_path: Path) -> None:
    """MobileNetV3's two-layer head has no evidence map: the graph has the logit output only."""
    path = export_onnx(_model(tmp_path / "mobile.pt", "mobilenet_v3_small"))
    runner = oe.OrtRunner(path)
    assert runner.outputs == (oe.LOGIT,)
    assert not runner.has_evidence
    with pytest.raises(ModelError, match="no evidence output"):
        runner.run(np.zeros((1, 64, 64), np.float32), tta=False, evidence=True)


def test_cli_exports_to_the_given_path(resnet: Path, tmp_path: Path, cli_logs: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`fracture-node model export --model X --out Y` writes Y and says so."""
    out = tmp_path / "elsewhere" / "graph.onnx"
    assert cli.main(["model", "export", "--model", str(resnet), "--out", str(out)]) == 0
    assert out.is_file()
    assert str(out) in capsys.readouterr().out
    assert oe.OrtRunner(out).source_sha256 == sha256_file(resnet)


def test_cli_refuses_a_missing_model_file(tmp_path: Path, cli_logs: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A model file that does not exist exits 2 with its name, and writes nothing."""
    assert cli.main(["model", "export", "--model", str(tmp_path / "none.pt")]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.onnx").exists()


def test_graph_of_another_writer_is_refused(tmp_path: Path) -> None:
    """An ONNX file without fracture-node's metadata is not run."""
    net = torch.nn.Conv2d(1, 1, 3)
    path = tmp_path / "foreign.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["image"])
    with pytest.raises(ModelError, match="not written by fracture-node"):
        oe.OrtRunner(path)
