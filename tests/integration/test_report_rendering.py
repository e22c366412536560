"""What a reader sees: the SR rendered by DCMTK's dsr2html and shown in headless Chromium.

The screenshot is kept as a test artefact in ``build/test-artefacts/`` (ignored by git).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from fracture_node.dicom.report import (
    NOT_FOR_DIAGNOSIS,
    AlgorithmInfo,
    ImageFinding,
    Unprocessed,
    build_report,
    write_report,
)
from fracture_node.saliency import Region

ALGORITHM = AlgorithmInfo("fracture-densenet", "1.4.0", "ab" * 32, 0.22, "balanced")
ARTEFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artefacts"


@pytest.fixture(scope="module")
def html(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A positive image with regions, a negative one and one not assessed, as dsr2html HTML."""
    hip = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)
    hand = pydicom.dcmread(samples_dir / "CR_hand_J2KR_Kakadu_SOTmarker.dcm",
                           stop_before_pixels=True)
    tiny = pydicom.dcmread(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm",
                           stop_before_pixels=True)
    for ds, number in ((hand, 2), (tiny, 3)):
        ds.StudyInstanceUID = hip.StudyInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = number
    region = Region.from_box(400, 600, 720, 900, 1.0)
    sr = build_report(
        [hip, hand, tiny],
        [ImageFinding(hip.SOPInstanceUID, hip.SOPClassUID, 0.37431461579215, True, (region,)),
         ImageFinding(hand.SOPInstanceUID, hand.SOPClassUID, 0.0772, False)],
        [Unprocessed(tiny.SOPInstanceUID, tiny.SOPClassUID, "too_small")],
        ALGORITHM, version=1, series_instance_uid=generate_uid(),
        station_ae_title="FRACTURE_NODE", software_version="0.1.0")
    folder = tmp_path_factory.mktemp("render")
    write_report(sr, folder / "sr.dcm")
    run = subprocess.run(["dsr2html", str(folder / "sr.dcm"), str(folder / "sr.html")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return folder / "sr.html"


def _text(html: Path) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html.read_text()).split())


def test_the_statement_and_each_decision_are_plain_sentences(html: Path) -> None:
    """The reader meets the not-for-diagnosis statement and one sentence per image."""
    text = _text(html)
    assert NOT_FOR_DIAGNOSIS in text
    assert ("suspected fracture: 37%, at or above the 22% decision threshold of the balanced "
            "operating point.") in text
    assert ("no fracture suspected: 7.7%, below the 22% decision threshold of the balanced "
            "operating point.") in text
    assert "image too small to be a radiograph the model was trained on" in text


def test_numbers_are_rounded_and_counts_are_whole(html: Path) -> None:
    """No probability with more than three significant digits, no count written 2.0."""
    text = _text(html)
    assert "0.374" not in text and "37.43" not in text
    assert re.search(r"Number of images processed: 2 ", text)
    assert re.search(r"Number of images not processed: 1 ", text)
    assert "2.0" not in text


def test_chromium_renders_the_report(html: Path) -> None:
    """Headless Chromium draws the page; the screenshot is kept in build/test-artefacts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/setup.sh --test"
    shot = html.with_suffix(".png")
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--hide-scrollbars", "--window-size=1100,3200",
                          f"--screenshot={shot}", html.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    picture = np.asarray(Image.open(shot).convert("L"))
    assert picture.shape == (3200, 1100)
    dark = picture < 128
    assert dark.mean() > 0.005  # text was drawn, not a blank page
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTEFACTS / "sr-dsr2html-chromium.png")
    shutil.copy(html, ARTEFACTS / "sr-dsr2html.html")
