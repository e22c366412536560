"""A node that received real studies, one in every state, for the API and console tests.

Built with the real pipeline (worker with the seeded saliency model, reporter, deliverer, DCMTK
storescp as the PACS) on a real database; only the parked study's report failure is recorded
through the store directly, as the reporter records one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fracture_node.config import Config, Destination
from tests.support import free_port
from tests.support.node import Node, node_config, study_of

HIP = "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"  # 2140 x 1760
TINY = "CR_cspine_tiny16x16_explicitVR.dcm"  # 16 x 16
OUT_OF_SCOPE = "negative_controls/CT_small.dcm"
PATIENT_NAME = "Webconsole^Secretname"
PATIENT_ID = "PID-4242-SECRET"
ACCESSION = "ACC-1001"


@dataclass(frozen=True)
class Studies:
    """The Study Instance UIDs of the populated node, by state."""

    reported: str
    """Two images (hip with regions, tiny), delivered to ``pacs``, dead at ``down``."""
    not_assessed: str
    parked: str
    waiting: str
    hip_sop_uid: str


def _datasets(samples_dir: Path, names: list[str], study_uid: str) -> list[pydicom.Dataset]:
    return study_of(samples_dir, names, study_uid, PatientName=PATIENT_NAME,
                    PatientID=PATIENT_ID, AccessionNumber=ACCESSION)


def populated_config(state: Path, db_url: str, model: Path, pacs_port: int) -> Config:
    """Destinations ``pacs`` (up) and ``down`` (nothing listens; a failed attempt is dead at
    once); every scored image positive (operating point 0.01) so that regions are drawn."""
    config = node_config(state, db_url)
    return dataclasses.replace(
        config,
        destinations=(Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                  port=pacs_port),
                      Destination(name="down", ae_title="DOWN", host="127.0.0.1",
                                  port=free_port())),
        model=dataclasses.replace(config.model, path=model, operating_point="0.01"),
        study=dataclasses.replace(config.study, stable_after_s=0.0),
        delivery=dataclasses.replace(config.delivery, first_retry_s=0.2, max_retry_s=0.4,
                                     timeout_s=3.0, deadline_s=0.1),
    ).validate()


def populate(node: Node, samples_dir: Path) -> Studies:
    """Receive, score, report and deliver: one study in each state."""
    uids = {k: generate_uid() for k in ("reported", "not_assessed", "parked", "waiting")}
    reported = _datasets(samples_dir, [HIP, TINY], uids["reported"])
    for ds in reported:
        node.add(ds)
    for ds in _datasets(samples_dir, [OUT_OF_SCOPE], uids["not_assessed"]):
        node.add(ds)
    for ds in _datasets(samples_dir, [TINY], uids["parked"]):
        node.add(ds)
    node.drain()
    cfg = node.config.study
    node.store.record_report_failure(uids["parked"], "ReportError: simulated failure",
                                     max_attempts=1, first_retry_s=cfg.report_first_retry_s,
                                     max_retry_s=cfg.report_max_retry_s)
    while node.reporter.run_once():
        pass
    node.deliverer.run_once()
    # pacs delivered; down dead at its first failure (deadline 0.1 s)
    assert node.store.delivery_states() == {"delivered": 1, "dead": 1}
    for ds in _datasets(samples_dir, [TINY], uids["waiting"]):
        node.add(ds)  # queued, never scored
    return Studies(**uids, hip_sop_uid=str(reported[0].SOPInstanceUID))
