from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import storescp_running

pytest_plugins = ["tests.support.scp"]
"""Fixtures shared across folders: the TLS certificates (``pki``) and a Storage SCP alone
(``scp_node``)."""

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder beside the checkout (datasets and DICOM samples)."""
    if not SHARED.is_dir():
        raise RuntimeError(f"expected the shared data folder at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def samples_dir(shared_dir: Path) -> Path:
    return shared_dir / "dicom-samples"


@pytest.fixture(scope="session")
def dataset_dir(shared_dir: Path) -> Path:
    return shared_dir / "datasets" / "fracture-xr"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained model file (real format, real loading code) for pipeline mechanics."""
    from fracture_node.ml.model import build_model, save_model_file

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), {
        "name": "tiny-test-model", "version": "0.0", "architecture": "mobilenet_v3_small",
        "input_size": 64, "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.5, "std": 0.25},
    })
    return path


@pytest.fixture(scope="session")
def saliency_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_model`` with fixed weights (seeded), so its heat maps and regions are the
    same at every run; its probabilities sit near 0.5 (untrained), with test-time augmentation."""
    import torch

    from fracture_node.ml.model import build_model, save_model_file

    torch.manual_seed(20261122)
    path = tmp_path_factory.mktemp("model") / "saliency.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), {
        "name": "saliency-test-model", "version": "0.0", "architecture": "mobilenet_v3_small",
        "input_size": 64, "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3},
        "normalisation": {"mean": 0.5, "std": 0.25}, "tta": True,
    })
    return path


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp playing the PACS (AE title PACS); yields its port and its folder."""
    out = tmp_path / "pacs"
    with storescp_running(out) as port:
        yield port, out
