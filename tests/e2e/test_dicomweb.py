"""DICOMweb both ways with a real node process: Orthanc stores a study into the node over
STOW-RS, and the node reports the SR back into that study in Orthanc over STOW-RS."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import free_port, wait_for_port, wait_until
from tests.support.orthanc import orthanc_web
from tests.support.serve import ServeProcess, make_study

ORTHANC_PASSWORD = "orthanc-Pa55-e2e"
SENDER_PASSWORD = "sender-Pa55-e2e"


def test_study_in_over_stow_rs_and_sr_out_over_stow_rs(tmp_path: Path, tiny_model: Path,
                                                       samples_dir: Path) -> None:
    """Orthanc's STOW-RS client stores a two-image study into `fracture-node serve`
    ([http] stow_rs), whose SR then arrives in the same study in Orthanc by STOW-RS; neither
    password nor the patient's name appears in the node's log."""
    from fracture_node.web.users import add_user, hash_password

    orthanc_http, node_http = free_port(), free_port()
    extra = (f"[http]\nenabled = true\nport = {node_http}\nstow_rs = true\n"
             'users_file = "users"\n'
             "[[destinations]]\nname = \"orthanc-web\"\n"
             f'dicomweb_url = "http://127.0.0.1:{orthanc_http}/dicom-web"\n'
             'auth = "basic"\nusername = "fn"\nsecret_env = "ORTHANC_PASSWORD"\n')
    node = ServeProcess(tmp_path / "node", [], model=tiny_model, extra=extra)
    add_user(node.workdir / "users", "modality", "sender", hash_password(SENDER_PASSWORD))
    files = make_study(samples_dir, tmp_path / "study",
                       ["CR_cspine_tiny16x16_explicitVR.dcm",
                        "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"],
                       patient="Stow^Secret")
    node.start(env={"ORTHANC_PASSWORD": ORTHANC_PASSWORD})
    try:
        wait_for_port(node_http)
        servers = {"fracture": {"Url": f"http://127.0.0.1:{node_http}/dicom-web/",
                                "Username": "modality", "Password": SENDER_PASSWORD}}
        with orthanc_web(tmp_path / "orthanc", users={"fn": ORTHANC_PASSWORD},
                         dicomweb_servers=servers, http=orthanc_http) as orthanc:
            for f in files:
                orthanc.request("POST", "/instances", f.read_bytes())
            [study_id] = orthanc.request("GET", "/studies")
            orthanc.request("POST", "/dicom-web/servers/fracture/stow",
                            json.dumps({"Resources": [study_id], "Synchronous": True}).encode())

            def sr_series() -> list[dict]:  # type: ignore[type-arg]
                series = orthanc.request("GET", f"/studies/{study_id}/series")
                return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]

            [sr] = wait_until(sr_series, timeout=180)
            assert len(orthanc.request("GET", "/studies")) == 1
            tags = orthanc.request("GET", f"/instances/{sr['Instances'][0]}/simplified-tags")
            assert tags["VerificationFlag"] == "UNVERIFIED"
    finally:
        node.stop()
    log = node.log()
    assert "stow_request" in log and "report_delivered" in log
    for secret in (ORTHANC_PASSWORD, SENDER_PASSWORD, "Stow^Secret", "Stow"):
        assert secret not in log
