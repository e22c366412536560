"""Training: one tiny epoch on real images ends in a loadable model file; data loading rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracture_node.cli.train import main
from fracture_node.ml.data import (
    DatasetError,
    cache_split,
    load_records,
    split_records,
)
from fracture_node.ml.infer import Classifier


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


def test_boxes_map_to_model_pixels_like_letterbox(dataset_dir: Path) -> None:
    """A box in stored-image pixels lands where `letterbox` puts those pixels."""
    from fracture_node.images import letterbox, load_image_file
    from fracture_node.ml.data import box_masks, load_boxes, model_boxes

    table = load_boxes(dataset_dir / "boxes.csv")
    records = [r for r in load_records(dataset_dir) if r.path.name in table][:3]
    assert records
    size = 256
    for rec, boxes in zip(records, model_boxes(records, size, table), strict=True):
        img = load_image_file(rec.path)
        h, w = img.shape
        assert (h, w) == (int(rec.extra["height"]), int(rec.extra["width"]))
        # paint the source box white on black: letterbox must put it under the mapped box
        x0, y0, x1, y1 = table[rec.path.name][0]
        painted = np.zeros_like(img)
        painted[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1.0
        boxed = letterbox(painted, size) > 0.5
        mask = box_masks([boxes[:1]], size)[0] > 0
        assert boxed.sum() > 0
        assert (boxed & ~mask).sum() == 0  # nothing of the painted box falls outside the mask
        assert (mask & boxed).sum() / mask.sum() > 0.5


def test_evidence_map_mean_is_the_logit_and_box_loss_rewards_the_box() -> None:
    """forward_with_map equals the model's forward; box_loss is lower for a map peaking in the box."""
    import torch

    from fracture_node.ml.evidence import box_loss, forward_with_map, pointing_hits
    from fracture_node.ml.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logit, emap = forward_with_map(model, "resnet18", x)
        assert torch.allclose(logit, model(x).squeeze(1), atol=1e-5)
    assert emap.shape == (2, 2, 2)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, :32, :32] = 1.0  # box in the top-left cell
    inside = torch.tensor([[[5.0, 0.0], [0.0, 0.0]]] * 2)
    outside = torch.tensor([[[0.0, 0.0], [0.0, 5.0]]] * 2)
    good, bad = box_loss(inside, masks), box_loss(outside, masks)
    assert good is not None and bad is not None and float(good) < 0.1 < float(bad)
    assert box_loss(inside, torch.zeros(2, 1, 64, 64)) is None
    assert pointing_hits(inside, [[(0, 0, 31, 31)], []], 64) == [True]
    assert pointing_hits(outside, [[(0, 0, 31, 31)], []], 64) == [False]
    # Two hot neighbours (cells of 32 px): the peak lies between their centres (columns 48 and
    # 80), nearer the hotter one, as in the daemon's maps; a box there is hit, one on the
    # hotter cell's centre is not.
    pair = torch.zeros(1, 4, 4)
    pair[0, 1, 1], pair[0, 1, 2] = 1.0, 0.9
    assert pointing_hits(pair, [[(54, 40, 70, 56)]], 128) == [True]
    assert pointing_hits(pair, [[(40, 40, 52, 56)]], 128) == [False]


def test_tiny_epoch_with_box_supervision_records_box_figures(tmp_path: Path,
                                                             dataset_dir: Path) -> None:
    """With boxes.csv present, a ResNet run records its box loss and val pointing game."""
    from fracture_node.ml.data import load_boxes

    table = load_boxes(dataset_dir / "boxes.csv")
    records = [r for r in load_records(dataset_dir) if r.split in ("train", "val")]
    boxed = [r for r in records if r.path.name in table]
    others = [r for r in records if r.path.name not in table]
    chosen = [r for r in boxed if r.split == "train"][:6] + [r for r in boxed if r.split == "val"][:3]
    chosen += [r for r in others if r.split == "train"][:6] + [r for r in others if r.split == "val"][:5]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,split,width,height\n" + "".join(
        f"{r.path},{'fractured' if r.label else 'normal'},{r.split},{r.extra['width']},"
        f"{r.extra['height']}\n" for r in chosen))
    out = tmp_path / "run"
    rc = main(["--data", str(csv_path), "--boxes", str(dataset_dir / "boxes.csv"),
               "--arch", "resnet18", "--input-size", "64", "--epochs", "1", "--batch-size", "6",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "1",
               "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    card = json.loads((out / "fracture-model.json").read_text())
    epoch = card["history"][0]
    assert epoch["box_loss"] > 0
    assert 0.0 <= epoch["val_pointing_game"] <= 1.0
    assert "6 boxed train images" in card["training"]["box_supervision"]


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without native bf16, autocast emulates it about 12x slower than fp32: auto
    picks fp32 there and bf16 where AVX512-BF16 or AMX is present; an explicit choice stands."""
    import torch

    from fracture_node.ml.train import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"


def test_default_time_budget_is_an_hour_on_a_cpu_and_none_on_a_gpu() -> None:
    """A plain ``train`` on a CPU anneals and stops within an hour; on a GPU the epochs bound
    it; an explicit budget (0 included) stands and a negative one is refused."""
    import torch

    from fracture_node.cli.train import parse_args
    from fracture_node.errors import FractureNodeError
    from fracture_node.ml.train import resolve_time_budget

    args = parse_args(["--data", "d", "--out", "o"])
    assert args.time_budget_min is None
    assert resolve_time_budget(args.time_budget_min, torch.device("cpu")) == 60.0
    assert resolve_time_budget(None, torch.device("cuda")) == 0.0
    assert resolve_time_budget(0, torch.device("cpu")) == 0.0
    assert resolve_time_budget(15, torch.device("cuda")) == 15.0
    with pytest.raises(FractureNodeError, match="time-budget-min"):
        resolve_time_budget(-1, torch.device("cpu"))


@pytest.mark.parametrize("ranks", [True, False])
def test_finalize_calibrates_a_model_that_ranks_val_and_not_one_that_does_not(
    tmp_path: Path, ranks: bool
) -> None:
    """finalize fits Platt scaling where the model ranks val (labels follow its scores) and
    stores it; where the labels run against its scores the fitted slope is negative, and the
    calibration is skipped rather than written (a file that would reverse the ranking)."""
    import torch

    from fracture_node.ml.data import CachedSplit
    from fracture_node.ml.finalize import finalize
    from fracture_node.ml.model import build_model, save_model_file

    torch.manual_seed(3)
    path = tmp_path / "m.pt"
    save_model_file(path, build_model("resnet18"), {  # its untrained output varies by image
        "name": "m", "version": "0", "architecture": "resnet18", "input_size": 48,
        "normalisation": {"mean": 0.5, "std": 0.25},
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3}})
    rng = np.random.default_rng(0)
    levels = np.linspace(0.05, 0.95, 40)[:, None, None]  # images that differ, scores that do
    images = np.clip((levels + 0.2 * rng.random((40, 48, 48))) * 255, 0, 255).astype(np.uint8)
    raw = Classifier.load(path, device="cpu").predict_batch(images.astype(np.float32) / 255.0)
    assert len(np.unique(raw)) == 40
    order = np.argsort(raw)
    labels = np.zeros(40, np.float32)
    labels[order[20:] if ranks else order[:20]] = 1.0
    finalize(path, CachedSplit(images, labels, []), "cpu", [], {}, None)
    clf = Classifier.load(path, device="cpu")
    if ranks:
        assert clf.card["calibration"]["slope"] > 0
        assert clf.calibration is not None
    else:
        assert "calibration" not in clf.card and clf.calibration is None
