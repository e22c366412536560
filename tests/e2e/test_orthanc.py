"""Orthanc as a real PACS: it pushes a study to the daemon and receives the SR in that study."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.serve import ServeProcess, make_study, wait_until


@pytest.fixture
def orthanc_and_node(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[Orthanc, ServeProcess]]:
    pacs_dicom = free_port()
    node = ServeProcess(tmp_path / "node", [("orthanc", "ORTHANC", pacs_dicom)],
                        model=tiny_model)
    orthanc = start_orthanc(tmp_path / "orthanc", node.port, pacs_dicom)
    node.start()
    yield orthanc, node
    node.stop()
    orthanc.stop()




def test_orthanc_push_gets_sr_back_in_the_same_study(
        orthanc_and_node: tuple[Orthanc, ServeProcess], samples_dir: Path, tmp_path: Path) -> None:
    """Orthanc stores a study, pushes it with its own C-STORE, and receives the SR into it."""
    orthanc, node = orthanc_and_node
    files = make_study(samples_dir, tmp_path / "study",
                       ["CR_cspine_tiny16x16_explicitVR.dcm",
                        "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"])
    for f in files:
        orthanc.request("POST", "/instances", f.read_bytes())
    [study_id] = orthanc.request("GET", "/studies")  # type: ignore[misc]
    result = orthanc.request("POST", "/modalities/fracture/store",
                             json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    assert result["InstancesCount"] == 2 and result["FailedInstancesCount"] == 0  # type: ignore[index]

    def sr_series() -> list[dict]:  # type: ignore[type-arg]
        series = orthanc.request("GET", f"/studies/{study_id}/series")
        return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]  # type: ignore[union-attr]

    [sr] = wait_until(sr_series, timeout=120)
    assert len(orthanc.request("GET", "/studies")) == 1  # type: ignore[arg-type]
    [instance] = sr["Instances"]
    tags = orthanc.request("GET", f"/instances/{instance}/simplified-tags")
    assert tags["VerificationFlag"] == "UNVERIFIED"  # type: ignore[index]
    assert "UNVERIFIED" in tags["SeriesDescription"]  # type: ignore[index]


@pytest.fixture
def orthanc_and_overlay_node(tmp_path: Path, saliency_model: Path
                             ) -> Iterator[tuple[Orthanc, ServeProcess]]:
    """Orthanc and a node that sends it the SR with both overlays, regions for every image."""
    pacs_dicom = free_port()
    # `overlays` lands in the [[destinations]] table that ServeProcess writes last.
    extra = 'overlays = "both"\n[saliency]\npositive_only = false\n'
    node = ServeProcess(tmp_path / "node", [("orthanc", "ORTHANC", pacs_dicom)],
                        model=saliency_model, extra=extra)
    orthanc = start_orthanc(tmp_path / "orthanc", node.port, pacs_dicom)
    node.start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


def test_orthanc_gets_sr_secondary_capture_and_gsps_in_the_same_study(
        orthanc_and_overlay_node: tuple[Orthanc, ServeProcess], samples_dir: Path,
        tmp_path: Path) -> None:
    """With overlays = "both", the SR, a Secondary Capture and a GSPS per image land in the
    pushed study in Orthanc, and every object the node wrote passes dciodvfy."""
    orthanc, node = orthanc_and_overlay_node
    files = make_study(samples_dir, tmp_path / "study",
                       ["CR_cspine_tiny16x16_explicitVR.dcm",
                        "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"])
    for f in files:
        orthanc.request("POST", "/instances", f.read_bytes())
    [study_id] = orthanc.request("GET", "/studies")  # type: ignore[misc]
    result = orthanc.request("POST", "/modalities/fracture/store",
                             json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    assert result["FailedInstancesCount"] == 0  # type: ignore[index]

    def by_modality() -> dict[str, int] | None:
        counts: dict[str, int] = {}
        for series in orthanc.request("GET", f"/studies/{study_id}/series"):  # type: ignore[union-attr]
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
        done = counts.get("SR") == 1 and counts.get("PR") == 2 and counts.get("OT", 0) + \
            counts.get("CR", 0) >= 2 + 2
        return counts if done else None

    counts = wait_until(by_modality, timeout=180)
    assert len(orthanc.request("GET", "/studies")) == 1  # type: ignore[arg-type]
    assert counts["SR"] == 1 and counts["PR"] == 2
    classes = []
    for series in orthanc.request("GET", f"/studies/{study_id}/series"):  # type: ignore[union-attr]
        for instance in series["Instances"]:
            tags = orthanc.request("GET", f"/instances/{instance}/simplified-tags")
            classes.append(tags["SOPClassUID"])  # type: ignore[index]
            if tags["SOPClassUID"] != "1.2.840.10008.5.1.4.1.1.1":  # type: ignore[index]
                assert "UNVERIFIED" in tags["SeriesDescription"]  # type: ignore[index]
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 2  # Secondary Capture
    assert classes.count("1.2.840.10008.5.1.4.1.1.11.1") == 2  # GSPS
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1  # Comprehensive 3D SR

    written = sorted((node.workdir / "state" / "reports").rglob("*.dcm"))
    assert len(written) == 5
    for path in written:
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                               timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], (path.name, errors)
