"""Orthanc as a real PACS: it pushes a study to the daemon and receives the SR in that study."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ServeProcess, make_study, wait_until
from tests.support import free_port, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    """A running Orthanc server (see :func:`_start_orthanc`)."""

    http: int
    dicom: int
    proc: subprocess.Popen[bytes]
    log: object

    def request(self, method: str, path: str, body: bytes | None = None) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method=method)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()  # type: ignore[attr-defined]


@pytest.fixture
def orthanc_and_node(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[Orthanc, ServeProcess]]:
    pacs_dicom = free_port()
    node = ServeProcess(tmp_path / "node", [("orthanc", "ORTHANC", pacs_dicom)],
                        model=tiny_model)
    orthanc = _start_orthanc(tmp_path / "orthanc", node.port, pacs_dicom)
    node.start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


def _start_orthanc(workdir: Path, node_port: int, dicom_port: int) -> Orthanc:
    """Start Orthanc on a fixed DICOM port (the node's configuration names it)."""
    orthanc = Orthanc.__new__(Orthanc)
    orthanc.http, orthanc.dicom = free_port(), dicom_port
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "test-pacs", "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"), "HttpPort": orthanc.http,
        "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
        "DicomModalities": {"fracture": ["FRACTURE_NODE", "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    orthanc.log = (workdir / "orthanc.log").open("wb")
    orthanc.proc = subprocess.Popen([ORTHANC, str(path)], stdout=orthanc.log,
                                    stderr=subprocess.STDOUT)
    wait_for_port(orthanc.http, timeout=60)
    wait_for_port(dicom_port, timeout=60)
    return orthanc


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
