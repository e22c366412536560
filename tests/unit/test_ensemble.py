"""Ensembles of EfficientNet-Lite model files: one model file whose logit is the mean of its
members', with the class-evidence map, the exported graph and the saliency of one network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch

from fracture_node import cli
from fracture_node.errors import ModelError
from fracture_node.ml import ort_engine as oe
from fracture_node.ml.ensemble import join_members
from fracture_node.ml.evidence import forward_with_map
from fracture_node.ml.explain import Explainer, target_layer
from fracture_node.ml.infer import Classifier
from fracture_node.ml.model import (
    Ensemble,
    build_model,
    check_architecture,
    load_model_file,
    save_model_file,
)
from fracture_node.ml.onnx_export import export_onnx

SIZE = 64


def _member(path: Path, arch: str, seed: int, size: int = SIZE,
            norm: tuple[float, float] = (0.449, 0.226)) -> Path:
    """A model file of ``arch`` with random weights and BatchNorm statistics (so that members
    differ and their logits spread)."""
    torch.manual_seed(seed)
    net = build_model(arch)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
        net.classifier.weight.normal_(0, 0.5)  # type: ignore[union-attr,operator]
    save_model_file(path, net, {
        "name": f"member-{seed}", "version": str(seed), "architecture": arch, "input_size": size,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": norm[0], "std": norm[1]}, "tta": False,
        "training_data": "test data", "val_metrics": {"auroc": 0.5 + seed / 100}})
    return path


def _ensemble(path: Path, members: list[Path]) -> Path:
    state, card = join_members([load_model_file(m) for m in members], "ens-test", "1")
    save_model_file(path, state, card)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("members")
    return [_member(d / "l0.pt", "efficientnet_lite0", 1), _member(d / "l1.pt", "efficientnet_lite1", 2)]


@pytest.fixture(scope="module")
def ensemble(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ensemble(tmp_path_factory.mktemp("ens") / "ens.pt", members)


@pytest.fixture
def cli_logs() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, SIZE, SIZE), np.float32))


def test_the_ensembles_logit_and_map_are_the_mean_of_its_members(members: list[Path],
                                                                  ensemble: Path) -> None:
    """Logit and class-evidence map equal the members' mean; the logit is the map's mean plus
    the joined bias, as for one pooling + linear network."""
    mf = load_model_file(ensemble)
    assert mf.card["architecture"] == "efficientnet_lite0+efficientnet_lite1"
    assert [m["sha256"] for m in mf.card["members"]] == [load_model_file(p).sha256 for p in members]
    net = mf.build()
    assert isinstance(net, Ensemble)
    x = _images(3)
    with torch.no_grad():
        nets: list[Any] = [load_model_file(p).build() for p in members]
        per = [n(x).squeeze(1) for n in nets]
        maps = [forward_with_map(n, load_model_file(p).card["architecture"], x)[1]
                for n, p in zip(nets, members, strict=True)]
        logit, emap = forward_with_map(net, mf.card["architecture"], x)
        whole = net(x).squeeze(1)
    expected = (per[0] + per[1]) / 2
    assert float(per[0].sub(per[1]).abs().min()) > 1e-3  # the members disagree
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit, expected, atol=1e-5, rtol=1e-5)
    # the map without bias: each member's map is its logit minus its bias at every cell
    biases = [float(n.classifier.bias.detach()) for n in nets]
    mean_map = ((maps[0] - biases[0]) + (maps[1] - biases[1])) / 2
    torch.testing.assert_close(emap - float(net.classifier.bias.detach()), mean_map, atol=1e-5, rtol=1e-5)


def test_the_exported_graph_gives_the_ensembles_logits_and_evidence(ensemble: Path,
                                                                    tmp_path: Path) -> None:
    """The ONNX graph of an ensemble carries the evidence output, and onnxruntime's logits and
    maps agree with torch's."""
    graph = export_onnx(ensemble, tmp_path / "ens.onnx")
    runner = oe.OrtRunner(graph)
    assert runner.has_evidence and runner.evidence_layer == "bn2"
    mf = load_model_file(ensemble)
    net: Any = mf.build()
    x = _images(2, seed=3)
    norm = mf.card["normalisation"]
    with torch.no_grad():
        logit, emap = forward_with_map(net, mf.card["architecture"], (x - norm["mean"]) / norm["std"])
    got_logit, got_map = runner.run(x.numpy()[:, 0], tta=False, evidence=True)
    np.testing.assert_allclose(got_logit, logit.numpy(), atol=1e-4, rtol=1e-4)
    bias = float(net.classifier.bias.detach())
    assert got_map is not None
    np.testing.assert_allclose(got_map, np.maximum(emap.numpy() - bias, 0), atol=1e-4, rtol=1e-4)


def test_torch_and_graph_saliency_of_an_ensemble_peak_at_the_same_place(ensemble: Path,
                                                                        tmp_path: Path) -> None:
    """HiResCAM at layer last through torch (hooks on the joined features) and the graph's
    evidence output give the same probabilities and the same peaks."""
    graph = export_onnx(ensemble, tmp_path / "sal.onnx")
    torch_clf = Classifier.load(ensemble, device="cpu", engine="torch")
    graph_clf = Classifier(load_model_file(ensemble), device=torch.device("cpu"),
                           engine="onnxruntime", runner=oe.OrtRunner(graph))
    batch = _images(4, seed=5).numpy()[:, 0]
    p_torch, m_torch = Explainer(torch_clf, "hirescam", "last").explain_batch(batch)
    p_graph, m_graph = Explainer(graph_clf, "hirescam", "last").explain_batch(batch)
    np.testing.assert_allclose(p_torch, p_graph, atol=1e-5)
    assert (m_torch.reshape(4, -1).max(axis=1) > 0).all()
    np.testing.assert_allclose(m_torch, m_graph, atol=1e-3)
    assert (m_torch.reshape(4, -1).argmax(axis=1) == m_graph.reshape(4, -1).argmax(axis=1)).all()


def test_an_ensemble_is_explained_at_its_last_layer_only(ensemble: Path) -> None:
    """stride16 has no single layer in an ensemble: refused by name, not a crash."""
    net = load_model_file(ensemble).build()
    assert target_layer(net, "efficientnet_lite0+efficientnet_lite1", "last")[0] == "bn2"
    with pytest.raises(ModelError, match="layer last"):
        target_layer(net, "efficientnet_lite0+efficientnet_lite1", "stride16")


@pytest.mark.parametrize("name", ["efficientnet_lite0+resnet18", "efficientnet_lite0+",
                                  "efficientnet_lite9+efficientnet_lite0", "resnet18+resnet34"])
def test_an_ensemble_name_of_other_networks_is_refused(name: str) -> None:
    with pytest.raises(ModelError, match="ensemble"):
        check_architecture(name)


def test_members_must_be_lite_networks_of_one_input(members: list[Path], tmp_path: Path) -> None:
    """A ResNet member, a member of another input size or normalisation, and a single member are
    each refused with the reason."""
    lite0 = load_model_file(members[0])
    torch.manual_seed(0)
    save_model_file(tmp_path / "r.pt", build_model("resnet18"), {
        "name": "r", "version": "0", "architecture": "resnet18", "input_size": SIZE,
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3}})
    with pytest.raises(ModelError, match="EfficientNet-Lite"):
        join_members([lite0, load_model_file(tmp_path / "r.pt")], "x")
    big = load_model_file(_member(tmp_path / "big.pt", "efficientnet_lite1", 3, size=96))
    with pytest.raises(ModelError, match="input_size"):
        join_members([lite0, big], "x")
    other = load_model_file(_member(tmp_path / "n.pt", "efficientnet_lite1", 4, norm=(0.5, 0.25)))
    with pytest.raises(ModelError, match="normalisation"):
        join_members([lite0, other], "x")
    with pytest.raises(ModelError, match="two or more"):
        join_members([lite0], "x")


def test_an_ensemble_file_whose_head_is_not_its_members_is_refused(ensemble: Path,
                                                                   tmp_path: Path) -> None:
    """Weights edited so that the head no longer averages the members: refused on load."""
    mf = load_model_file(ensemble)
    state = dict(mf.state_dict)
    state["classifier.weight"] = state["classifier.weight"] * 1.5
    save_model_file(tmp_path / "bad.pt", state, mf.card)
    with pytest.raises(ModelError, match="mean of its members"):
        load_model_file(tmp_path / "bad.pt").build()


def test_cli_joins_members_and_fixes_thresholds_on_val(members: list[Path], tmp_path: Path,
                                                       dataset_dir: Path, cli_logs: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`model ensemble` writes one model file, finalized on val (thresholds, TTA decision,
    val metrics), that loads and scores like any model file; too few members is exit 2."""
    out = tmp_path / "ens" / "fracture-model.pt"
    rc = cli.main(["model", "ensemble", str(members[0]), str(members[1]), "--out", str(out),
                   "--data", str(dataset_dir), "--val-limit", "24",
                   "--cache-dir", str(tmp_path / "cache"), "--version", "2026.12.06-test"])
    assert rc == 0, capsys.readouterr().err
    mf = load_model_file(out)
    card = mf.card
    assert card["version"] == "2026.12.06-test"
    assert card["val_metrics"]["n"] == 24
    assert card["weights_dtype"] == "float16"
    assert card["thresholds"] == card["val_metrics"]["thresholds"]
    assert isinstance(card["tta"], bool)
    assert mf.sha256 in capsys.readouterr().out
    clf = Classifier.load(out, device="cpu")
    probs = clf.predict_batch(_images(2).numpy()[:, 0])
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
    assert cli.main(["model", "ensemble", str(members[0]), "--out", str(out),
                     "--data", str(dataset_dir)]) == 2
    assert "two or more" in capsys.readouterr().err


def test_the_loss_curves_of_an_ensemble_show_each_member(tmp_path: Path) -> None:
    """An ensemble's card has no history of its own: the figure draws each member's."""
    from fracture_node.ml.evaluate import loss_curves

    def history(auc: float) -> list[dict[str, float]]:
        return [{"epoch": e, "train_loss": 0.6 / e, "val_loss": 0.5 / e, "val_auroc": auc + e / 100}
                for e in (1, 2)]

    card = {"members": [{"architecture": "efficientnet_lite0", "version": "a", "history": history(0.9)},
                        {"architecture": "efficientnet_lite1", "version": "b", "history": history(0.8)}]}
    data = loss_curves(tmp_path, card)
    assert [m["name"] for m in data["members"]] == ["efficientnet_lite0 a", "efficientnet_lite1 b"]
    assert data["members"][1]["history"][1]["val_auroc"] == pytest.approx(0.82)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert loss_curves(tmp_path, {"history": history(0.7)}) == {"history": history(0.7)}
