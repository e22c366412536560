"""`fracture-node predict`: one CSV row per input, unreadable inputs reported, never a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fracture_node.cli.predict import COLUMNS, main
from fracture_node.ml.model import build_model, save_model_file


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), {
        "name": "tiny", "version": "0", "architecture": "mobilenet_v3_small", "input_size": 64,
        "normalisation": {"mean": 0.3, "std": 0.3},
        "thresholds": {"balanced": 0.5, "high_sensitivity": 0.3}, "tta": False})
    return path


@pytest.fixture()
def inputs(tmp_path: Path, dataset_dir: Path) -> Path:
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for name in ("fa_IMG0000000.jpg", "fa_IMG0000001.jpg", "fa_IMG0000002.jpg"):
        (folder / name).write_bytes((dataset_dir / "images" / name).read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return tmp_path / "in"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_one_row_per_input_with_a_not_processed_row(tmp_path: Path, inputs: Path,
                                                    tiny_model: Path) -> None:
    """A folder of three images and a corrupt file gives four rows; the corrupt one is flagged."""
    out = tmp_path / "out.csv"
    assert main([str(inputs), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu", "--batch-size", "2"]) == 0
    rows = _rows(out)
    assert len(rows) == 4
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["corrupt.jpg"]["status"] == "not_processed"
    assert by_name["corrupt.jpg"]["reason"] == "undecodable"
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in ok)
    assert all(r["label"] in ("fractured", "normal") for r in ok)


def test_without_output_the_csv_goes_to_stdout_and_the_log_to_stderr(
        inputs: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``predict PATH`` alone prints the CSV (nothing else) on stdout; the log is on stderr."""
    assert main([str(inputs), "--model", str(tiny_model), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(out.splitlines()))
    assert tuple(out.splitlines()[0].split(",")) == COLUMNS
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok", "not_processed"}
    assert "predict_done" in err and "predict_done" not in out


def test_csv_has_the_documented_columns(tmp_path: Path, inputs: Path, tiny_model: Path) -> None:
    """The CSV header is exactly the documented columns, with the model's sha256 on every row."""
    out = tmp_path / "out.csv"
    main([str(inputs), "--output", str(out), "--model", str(tiny_model), "--device", "cpu"])
    with out.open() as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS
    from fracture_node.ml.model import sha256_file

    assert {r["model_sha256"] for r in _rows(out)} == {sha256_file(tiny_model)}


def test_label_follows_the_numeric_operating_point(tmp_path: Path, inputs: Path,
                                                   tiny_model: Path) -> None:
    """With threshold 0 every readable image is called fractured, with 1 none is (p < 1)."""
    out0, out1 = tmp_path / "0.csv", tmp_path / "1.csv"
    common = [str(inputs), "--model", str(tiny_model), "--device", "cpu"]
    main([*common, "--output", str(out0), "--operating-point", "0"])
    main([*common, "--output", str(out1), "--operating-point", "1"])
    assert {r["label"] for r in _rows(out0) if r["status"] == "ok"} == {"fractured"}
    assert {r["label"] for r in _rows(out1) if r["status"] == "ok"} == {"normal"}


def test_missing_path_gets_a_row_not_a_crash(tmp_path: Path, tiny_model: Path) -> None:
    """A path that does not exist is reported as not processed (not_found)."""
    out = tmp_path / "out.csv"
    assert main([str(tmp_path / "ghost.png"), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    (row,) = _rows(out)
    assert (row["status"], row["reason"]) == ("not_processed", "not_found")


def test_dicom_input_gets_a_row(tmp_path: Path, samples_dir: Path, tiny_model: Path) -> None:
    """A DICOM file (sniffed by its preamble, whatever its name) gets a row and never a crash."""
    src = sorted(samples_dir.glob("CR_*.dcm"))[0]
    renamed = tmp_path / "no_suffix"
    renamed.write_bytes(src.read_bytes())
    out = tmp_path / "out.csv"
    assert main([str(renamed), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    (row,) = _rows(out)
    assert row["status"] in ("ok", "not_processed")
    assert row["status"] == "ok" or row["reason"] != "undecodable"


def test_unknown_operating_point_is_an_error_exit(tmp_path: Path, inputs: Path,
                                                 tiny_model: Path) -> None:
    """An operating point that is neither a name on the card nor a number exits with 2."""
    assert main([str(inputs), "--output", str(tmp_path / "o.csv"), "--model", str(tiny_model),
                 "--operating-point", "lenient"]) == 2


def test_saliency_folder_gets_an_overlay_per_readable_image(tmp_path: Path, tiny_model: Path,
                                                            dataset_dir: Path) -> None:
    """`predict --saliency DIR` writes one overlay PNG per readable input image."""
    from fracture_node.cli.predict import main as predict_main

    images = sorted((dataset_dir / "images").iterdir())[:2]
    out = tmp_path / "sal"
    assert predict_main([*map(str, images), "--output", str(tmp_path / "p.csv"),
                         "--model", str(tiny_model), "--saliency", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2


def test_locate_adds_peak_and_regions_inside_the_source_image(tmp_path: Path, inputs: Path,
                                                              tiny_model: Path) -> None:
    """`--locate` gives each scored row a peak and JSON boxes inside the source image's pixels."""
    from PIL import Image

    from fracture_node.cli.predict import LOCATION_COLUMNS

    out = tmp_path / "p.csv"
    assert main([str(inputs), "--output", str(out), "--model", str(tiny_model), "--locate"]) == 0
    rows = _rows(out)
    assert tuple(rows[0]) == COLUMNS + LOCATION_COLUMNS
    scored = [r for r in rows if r["status"] == "ok"]
    assert len(scored) == 3
    for row in scored:
        width, height = Image.open(row["path"]).size
        x, y = float(row["peak_x"]), float(row["peak_y"])
        assert 0 <= x <= width and 0 <= y <= height
        boxes = json.loads(row["regions"])
        assert boxes, "a map with a maximum has at least its hottest region"
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)
    bad = [r for r in rows if r["status"] != "ok"]
    assert bad and all(r["peak_x"] == r["regions"] == "" for r in bad)


def test_peak_columns_map_the_model_input_back_through_the_letterbox(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A map peaking at a known model-input cell comes out at that cell's source position."""
    import numpy as np
    from PIL import Image

    from fracture_node.ml import explain

    # A wide image (400 x 100): letterboxed to 64 px, it is scaled by 0.16 and centred
    # vertically (rows 24..40 of the 64 hold the image).
    image = tmp_path / "wide.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (100, 1))).save(image)
    calls = {"explain": 0}

    def fake_explain(self: explain.Explainer, batch: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        calls["explain"] += 1
        maps = np.zeros(batch.shape, dtype=np.float32)
        maps[:, 30, 48] = 1.0  # row 30, column 48 of the model input
        return np.full(len(batch), 0.9), maps

    monkeypatch.setattr(explain.Explainer, "explain_batch", fake_explain)
    out = tmp_path / "p.csv"
    assert main([str(image), "--output", str(out), "--model", str(tiny_model), "--locate"]) == 0
    (row,) = _rows(out)
    assert calls["explain"] == 1
    assert row["probability"] == "0.900000" and row["label"] == "fractured"
    # column 48 + 0.5 -> x = 48.5 / 0.16; row 30 + 0.5 - 24 -> y = 6.5 / 0.16
    assert float(row["peak_x"]) == pytest.approx(48.5 / 0.16, abs=0.1)
    assert float(row["peak_y"]) == pytest.approx(6.5 / 0.16, abs=0.1)
    ((x0, y0, x1, y1),) = json.loads(row["regions"])
    assert x0 <= float(row["peak_x"]) <= x1 and y0 <= float(row["peak_y"]) <= y1
    assert x1 - x0 == pytest.approx(1 / 0.16, abs=0.1)


def test_saliency_scores_and_draws_in_one_pass(tmp_path: Path, inputs: Path, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With `--saliency`, the probabilities come from the saliency pass: no second scoring."""
    from fracture_node.ml.infer import Classifier

    def no_second_pass(*_a: object, **_k: object) -> None:
        raise AssertionError("predict_batch called beside the saliency pass")

    monkeypatch.setattr(Classifier, "predict_batch", no_second_pass)
    out = tmp_path / "p.csv"
    assert main([str(inputs), "--output", str(out), "--model", str(tiny_model),
                 "--saliency", str(tmp_path / "sal")]) == 0
    rows = _rows(out)
    assert sum(r["status"] == "ok" for r in rows) == 3
    assert all(r["peak_x"] for r in rows if r["status"] == "ok")
    assert len(list((tmp_path / "sal").glob("*.png"))) == 3


def test_an_image_smaller_than_min_side_is_not_scored(tmp_path: Path, dataset_dir: Path,
                                                      tiny_model: Path) -> None:
    """As in the daemon ([scope] min_side): a thumbnail gets too_small and no probability, in an
    image file or a DICOM object; --min-side moves the line, and a bad value is refused."""
    import numpy as np
    import pydicom
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    radiograph = Image.open(dataset_dir / "images" / "fa_IMG0000000.jpg").convert("L")
    radiograph.save(folder / "full.png")
    radiograph.resize((63, 200)).save(folder / "narrow.png")  # one side under 64
    radiograph.resize((64, 64)).save(folder / "square64.png")  # exactly at the line
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CR", 32, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (32, 48), np.uint8).tobytes()
    ds.save_as(folder / "small.dcm", enforce_file_format=True)

    out = tmp_path / "out.csv"
    assert main([str(folder), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu"]) == 0
    by_name = {Path(r["path"]).name: r for r in _rows(out)}
    assert by_name["full.png"]["status"] == "ok"
    assert by_name["square64.png"]["status"] == "ok"
    for name in ("narrow.png", "small.dcm"):
        assert (by_name[name]["status"], by_name[name]["reason"], by_name[name]["probability"]
                ) == ("not_processed", "too_small", ""), name

    assert main([str(folder), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu", "--min-side", "16"]) == 0
    assert {Path(r["path"]).name: r["status"] for r in _rows(out)} == {
        "full.png": "ok", "narrow.png": "ok", "square64.png": "ok", "small.dcm": "ok"}
    with pytest.raises(SystemExit) as refused:
        main([str(folder), "--model", str(tiny_model), "--min-side", "0"])
    assert refused.value.code == 2


def test_a_blank_image_is_not_scored(tmp_path: Path, tiny_model: Path) -> None:
    """A picture whose pixels all have one grey level gets blank_image, never a probability;
    the same picture with a single brighter pixel is scored."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    blank = np.full((300, 200), 200, np.uint8)
    Image.fromarray(blank).save(folder / "blank.png")
    Image.fromarray(np.zeros((300, 200), np.uint16)).save(folder / "black16.png")
    blank[100, 50] = 201
    Image.fromarray(blank).save(folder / "one_pixel.png")
    out = tmp_path / "out.csv"
    assert main([str(folder), "--output", str(out), "--model", str(tiny_model),
                 "--device", "cpu", "--locate"]) == 0
    by_name = {Path(r["path"]).name: r for r in _rows(out)}
    for name in ("blank.png", "black16.png"):
        assert (by_name[name]["status"], by_name[name]["reason"], by_name[name]["probability"],
                by_name[name]["peak_x"]) == ("not_processed", "blank_image", "", ""), name
    assert by_name["one_pixel.png"]["status"] == "ok"
