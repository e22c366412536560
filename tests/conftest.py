from __future__ import annotations

from pathlib import Path

import pytest

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
