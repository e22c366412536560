"""The graph engines (openvino, onnxruntime) against torch on real radiographs: logits,
decisions and saliency peaks agree.

Three model files of the kinds the project ships, built with its own helpers (not the bundled
weights, which change): EfficientNet-Lite0 at 384 px from its ImageNet weights (the grey stem
folded in), the ensemble of that Lite0 and a Lite1 from its ImageNet weights (one model file,
``model ensemble``'s join, the kind of the bundled model), and ResNet-18 at 256 px whose
BatchNorm statistics are fitted on train radiographs (so that its activations and logits have
the scale of a trained network). Each is exported
and scored by torch and by each graph engine on a few dozen val radiographs and on every DICOM sample that
decodes (every transfer syntax of ``dicom-samples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fracture_node.errors import NotProcessable
from fracture_node.images import letterbox, load_image_file
from fracture_node.inputs import is_dicom, load_any
from fracture_node.ml.data import load_records, split_records
from fracture_node.ml.ensemble import join_members
from fracture_node.ml.explain import Explainer
from fracture_node.ml.infer import GRAPH_ENGINES, Classifier
from fracture_node.ml.model import (
    IMAGENET,
    IMAGENET_GREY,
    build_model,
    load_model_file,
    save_model_file,
)
from fracture_node.ml.onnx_export import export_onnx
from fracture_node.saliency.geometry import peak_point

pytestmark = pytest.mark.slow

LOGIT_TOLERANCE = 1e-4
ENSEMBLE = "efficientnet_lite0+efficientnet_lite1"


@dataclass
class Scored:
    """What one engine made of the images: logits, probabilities, maps, source shapes."""

    logits: np.ndarray
    probabilities: np.ndarray
    maps: np.ndarray
    shapes: list[tuple[int, int]]


def _val_images(dataset_dir: Path, n_each: int = 18) -> list[Path]:
    val = split_records(load_records(dataset_dir), "val")
    rng = np.random.default_rng(25)
    pos = [r.path for r in val if r.label == 1]
    neg = [r.path for r in val if r.label == 0]
    return ([pos[i] for i in rng.permutation(len(pos))[:n_each]]
            + [neg[i] for i in rng.permutation(len(neg))[:n_each]])


def _dicom_samples(samples_dir: Path) -> list[Path]:
    files = sorted(samples_dir.glob("*.dcm")) + sorted((samples_dir / "derived").glob("*.dcm"))
    readable = []
    for f in files:
        try:
            load_any(f)
        except NotProcessable:
            continue  # out of scope (MG, multi-frame XA): the pixel path's own tests cover them
        readable.append(f)
    return readable


def _card(arch: str, size: int, mean: float, std: float) -> dict[str, object]:
    return {"name": f"parity-{arch}", "version": "0", "architecture": arch, "input_size": size,
            "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
            "normalisation": {"mean": mean, "std": std}, "tta": True}


def _lite(folder: Path, arch: str = "efficientnet_lite0") -> Path:
    torch.manual_seed(0)
    path = folder / f"{arch}.pt"
    save_model_file(path, build_model(arch, pretrained=IMAGENET), _card(arch, 384, *IMAGENET_GREY))
    return path


def _ensemble(folder: Path) -> Path:
    """Lite0 and Lite1 joined as `model ensemble` joins them (one model file, the mean logit)."""
    members = [load_model_file(_lite(folder, a)) for a in ("efficientnet_lite0", "efficientnet_lite1")]
    state, card = join_members(members, "parity-ensemble", "0")
    path = folder / "ensemble.pt"
    save_model_file(path, state, dict(card, thresholds={"balanced": 0.5, "high_sensitivity": 0.3},
                                      tta=True))
    return path


def _resnet(folder: Path, dataset_dir: Path, size: int = 256) -> Path:
    """ResNet-18 with BatchNorm statistics fitted on 24 train radiographs."""
    torch.manual_seed(0)
    net = build_model("resnet18")
    train = split_records(load_records(dataset_dir), "train")[:24]
    images = np.stack([letterbox(load_image_file(r.path), size) for r in train])
    mean, std = float(images.mean()), float(images.std())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the fitting batches
    net.train()
    with torch.no_grad():
        net((torch.from_numpy(images)[:, None] - mean) / std)
    path = folder / "resnet18.pt"
    save_model_file(path, net.eval(), _card("resnet18", size, mean, std))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> dict[str, Path]:
    """Model files by architecture, built and exported when first asked for."""
    folder = tmp_path_factory.mktemp("parity")

    class Lazy(dict[str, Path]):
        def __missing__(self, arch: str) -> Path:
            path = (_lite(folder) if arch == "efficientnet_lite0"
                    else _ensemble(folder) if arch == ENSEMBLE
                    else _resnet(folder, dataset_dir))
            export_onnx(path)
            self[arch] = path
            return path
    return Lazy()


def _score(path: Path, engine: str, files: list[Path]) -> Scored:
    clf = Classifier.load(path, "cpu", engine=engine, saliency=("hirescam", "last"))
    assert clf.engine == engine
    explainer = Explainer(clf, method="hirescam", layer="last")
    images = [load_any(f) for f in files]
    batch = np.stack([clf.prepare(img) for img in images])
    probabilities, maps = [], []
    for start in range(0, len(batch), 8):  # the serving batch size
        p, heat = explainer.explain_batch(batch[start : start + 8])
        probabilities.append(p)
        maps.append(heat)
    p = np.concatenate(probabilities)
    # the TTA-averaged logits (the card has no calibration: p = sigmoid(logit))
    return Scored(np.log(p) - np.log1p(-p), p, np.concatenate(maps),
                  [(int(i.shape[0]), int(i.shape[1])) for i in images])


@pytest.fixture(scope="module")
def torch_scores() -> dict[tuple[str, str], Scored]:
    """torch's scores by (architecture, source), kept for every graph engine's comparison."""
    return {}


@pytest.fixture(scope="module", params=[
    (arch, source, engine) for engine in GRAPH_ENGINES
    for arch, source in (("efficientnet_lite0", "val"), ("efficientnet_lite0", "dicom"),
                         (ENSEMBLE, "val"), (ENSEMBLE, "dicom"),
                         ("resnet18", "val"), ("resnet18", "dicom"))], ids="-".join)
def scores(request: pytest.FixtureRequest, models: dict[str, Path], dataset_dir: Path,
           samples_dir: Path, torch_scores: dict[tuple[str, str], Scored]
           ) -> tuple[Scored, Scored]:
    """torch's and a graph engine's scores of one model on val radiographs or DICOM samples."""
    arch, source, engine = request.param
    files = _val_images(dataset_dir) if source == "val" else _dicom_samples(samples_dir)
    if (arch, source) not in torch_scores:
        torch_scores[arch, source] = _score(models[arch], "torch", files)
    return torch_scores[arch, source], _score(models[arch], engine, files)


def test_dicom_samples_cover_the_transfer_syntaxes(samples_dir: Path) -> None:
    """The DICOM parity set spans at least the lossless, lossy, JPEG-LS, RLE and native files."""
    import pydicom

    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True, force=True).file_meta.get(
        "TransferSyntaxUID", "implicit")) for f in _dicom_samples(samples_dir) if is_dicom(f)}
    assert len(syntaxes) >= 8


def test_logits_agree_within_1e4(scores: tuple[Scored, Scored]) -> None:
    """Every image's logit from the graph engine is within 1e-4 of torch's."""
    ref, ort = scores
    assert len(ref.logits) >= 14
    assert np.max(np.abs(ort.logits - ref.logits)) < LOGIT_TOLERANCE
    assert np.ptp(ref.logits) > 0.05  # real spread: the images are not all scored alike


def test_decisions_agree_at_both_operating_points(scores: tuple[Scored, Scored]) -> None:
    """At thresholds that split the images (about a quarter and a half positive), both engines
    decide every image alike.

    Each threshold lies between two neighbouring scores that differ by more than the logit
    tolerance: the DICOM samples hold one radiograph in several transfer syntaxes, whose scores
    tie to 1e-5, and a threshold inside such a tie would test rounding, not the engines."""
    ref, ort = scores
    order = np.argsort(ref.probabilities)
    ranked = ref.probabilities[order]
    gaps = np.diff(ref.logits[order])  # calibration is monotone: logits rank alike
    splits = [k for k in range(1, len(ranked)) if gaps[k - 1] > 2 * LOGIT_TOLERANCE]
    for quantile in (0.5, 0.75):  # balanced, high-sensitivity-like
        k = min(splits, key=lambda j: abs(j - int(len(ranked) * quantile)))
        threshold = (ranked[k - 1] + ranked[k]) / 2
        decided = ref.probabilities >= threshold
        assert 0 < decided.sum() < len(decided)
        np.testing.assert_array_equal(ort.probabilities >= threshold, decided)


def test_saliency_peaks_agree(scores: tuple[Scored, Scored]) -> None:
    """The hottest point of every image's map, in source pixels, is the same for both engines."""
    ref, ort = scores
    for a, b, shape in zip(ref.maps, ort.maps, ref.shapes, strict=True):
        assert peak_point(b, shape) == peak_point(a, shape)
        assert float(np.max(np.abs(a - b))) < 1e-3
