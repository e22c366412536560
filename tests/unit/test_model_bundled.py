"""The bundled model: it loads, scores real radiographs in [0, 1], and ranks fractures higher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fracture_node.images import load_image_file
from fracture_node.ml import ort_engine as oe
from fracture_node.ml.data import load_records, split_records
from fracture_node.ml.infer import Classifier, bundled_model_path


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load(device="cpu")


@pytest.fixture(scope="module")
def val_sample(dataset_dir: Path) -> tuple[list[Path], np.ndarray]:
    val = split_records(load_records(dataset_dir), "val")
    rng = np.random.default_rng(20261122)
    pos = [r for r in val if r.label == 1]
    neg = [r for r in val if r.label == 0]
    picked = [pos[i] for i in rng.permutation(len(pos))[:20]] + \
             [neg[i] for i in rng.permutation(len(neg))[:20]]
    return [r.path for r in picked], np.array([r.label for r in picked])


def test_bundled_model_file_is_present_with_its_card() -> None:
    """The package ships fracture-model.pt with its JSON card beside it."""
    path = bundled_model_path()
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert path.stat().st_size < 100 * 2**20


def test_bundled_model_loads_with_card_fields(classifier: Classifier) -> None:
    """The bundled model exposes its name, version, sha256, input size and both thresholds."""
    assert classifier.name and classifier.version and len(classifier.sha256) == 64
    assert classifier.input_size >= 224
    for point in ("balanced", "high_sensitivity"):
        assert 0.0 < classifier.threshold(point) < 1.0
    assert classifier.threshold("high_sensitivity") <= classifier.threshold("balanced")


def test_bundled_model_gives_probabilities_for_real_images(
    classifier: Classifier, val_sample: tuple[list[Path], np.ndarray]
) -> None:
    """Real val radiographs get finite probabilities in [0, 1], one per image."""
    paths, _ = val_sample
    batch = np.stack([classifier.prepare(load_image_file(p)) for p in paths[:8]])
    probs = classifier.predict_batch(batch)
    assert probs.shape == (8,)
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()


def test_fractured_images_score_higher_than_normal_ones(
    classifier: Classifier, val_sample: tuple[list[Path], np.ndarray]
) -> None:
    """On 20 fractured and 20 normal val images the fractured ones score higher on average."""
    paths, labels = val_sample
    batch = np.stack([classifier.prepare(load_image_file(p)) for p in paths])
    probs = np.concatenate([classifier.predict_batch(batch[i : i + 8]) for i in range(0, 40, 8)])
    assert probs[labels == 1].mean() > probs[labels == 0].mean()


def test_prepare_matches_the_input_size(classifier: Classifier) -> None:
    """prepare() letterboxes any aspect ratio to the model's square input."""
    out = classifier.prepare(np.random.default_rng(0).random((300, 120), dtype=np.float32))
    assert out.shape == (classifier.input_size, classifier.input_size)
    assert out.dtype == np.float32


def test_the_shipped_graph_is_the_bundled_model_files(
    classifier: Classifier, val_sample: tuple[list[Path], np.ndarray]
) -> None:
    """fracture-model.onnx ships beside the model file, records its sha256, and scores val
    radiographs as the model file does on torch (logit-level agreement, identical decisions):
    a retrained model without a fresh graph fails here, not in a hospital."""
    graph = oe.onnx_path_for(bundled_model_path())
    assert graph.is_file()
    runner = oe.OrtRunner(graph)
    assert runner.source_sha256 == classifier.sha256
    served = Classifier.load(device="cpu", engine="onnxruntime")
    assert served.engine == "onnxruntime" and served.onnx_path == graph
    paths, _ = val_sample
    batch = np.stack([classifier.prepare(load_image_file(p)) for p in paths[:16]])
    torch_p = np.concatenate([classifier.predict_batch(batch[i : i + 8]) for i in (0, 8)])
    ort_p = np.concatenate([served.predict_batch(batch[i : i + 8]) for i in (0, 8)])
    np.testing.assert_allclose(ort_p, torch_p, atol=1e-4)
    threshold = classifier.threshold("balanced")
    assert ((ort_p >= threshold) == (torch_p >= threshold)).all()
