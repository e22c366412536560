"""Training: one tiny epoch on real images ends in a loadable model file; data loading rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracture_node.ml.data import (
    DatasetError,
    cache_split,
    load_records,
    split_records,
)
from fracture_node.ml.infer import Classifier
from fracture_node.ml.train import main


def test_one_tiny_epoch_writes_a_loadable_model(tmp_path: Path, dataset_dir: Path) -> None:
    """`train` runs one epoch on 16 real images at 64 px and writes a model file that loads."""
    out = tmp_path / "run"
    rc = main(["--data", str(dataset_dir), "--arch", "mobilenet_v3_small", "--input-size", "64",
               "--epochs", "1", "--batch-size", "8", "--limit", "16", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--device", "cpu"])
    assert rc == 0
    clf = Classifier.load(out / "fracture-model.pt", device="cpu")
    assert clf.input_size == 64 and clf.card["architecture"] == "mobilenet_v3_small"
    assert set(clf.card["thresholds"]) == {"balanced", "high_sensitivity"}
    assert len(clf.card["history"]) == 1
    assert json.loads((out / "fracture-model.json").read_text())["name"] == "fracture-model"
    probs = clf.predict_batch(np.zeros((2, 64, 64), np.float32))
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()


def test_training_resumes_from_its_checkpoint(tmp_path: Path, dataset_dir: Path) -> None:
    """A second run given --resume continues at the next epoch and keeps the history."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--data", str(dataset_dir), "--arch", "mobilenet_v3_small", "--input-size", "48",
              "--batch-size", "8", "--limit", "16", "--out", str(out), "--cache-dir", str(cache),
              "--workers", "1", "--device", "cpu", "--patience", "5"]
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--epochs", "2", "--resume", str(out / "last-checkpoint.pt")]) == 0
    card = Classifier.load(out / "fracture-model.pt", device="cpu").card
    assert [h["epoch"] for h in card["history"]] == [1, 2]


def test_labels_csv_keeps_group_aware_splits(dataset_dir: Path) -> None:
    """The fracture-xr labels.csv gives the documented split sizes and no group in two splits."""
    records = load_records(dataset_dir)
    sizes = {s: len(split_records(records, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3070, "val": 657, "test": 656}
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in groups.values())


def test_folder_per_label_layout(tmp_path: Path) -> None:
    """<root>/<label>/*.png is read with labels from the folder names."""
    for label in ("fractured", "normal"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    records = load_records(tmp_path)
    assert sorted(r.label for r in records) == [0, 0, 0, 1, 1, 1]
    assert {r.split for r in records} <= {"train", "val", "test"}


def test_csv_layout_with_unknown_label_is_refused(tmp_path: Path) -> None:
    """A CSV with a label that is neither fractured nor normal raises DatasetError."""
    (tmp_path / "l.csv").write_text("path,label\na.png,maybe\n")
    with pytest.raises(DatasetError, match="maybe"):
        load_records(tmp_path / "l.csv")


def test_corrupt_image_is_skipped_and_logged_by_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An undecodable image is left out of the cache and logged with its file name."""
    good = tmp_path / "normal" / "good.png"
    good.parent.mkdir()
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).save(good)
    bad = tmp_path / "normal" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from structlog.testing import capture_logs

    records = load_records(tmp_path)
    with capture_logs() as events:
        cached = cache_split(records, 32, cache_dir=None)
    assert [r.path.name for r in cached.records] == ["good.png"]
    assert cached.images.shape == (1, 32, 32)
    [event] = [e for e in events if e["event"] == "image_skipped"]
    line = str(event)
    assert "bad.png" in line and str(tmp_path) not in line
