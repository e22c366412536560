"""Nodes that explain what they score (saliency on, every image positive or negative), their
studies, and dciodvfy on the objects they write."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pydicom

from fracture_node.config import Config, Destination
from tests.support.node import node_config, study_of

HIP = "derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm"  # 2140 x 1760


TINY = "CR_cspine_tiny16x16_explicitVR.dcm"  # 16 x 16


PATIENT = "Saliency^Secret"


def saliency_config(tmp_path: Path, db_url: str, model: Path, destinations: list[Destination],
            operating_point: str = "0.01", **saliency: Any) -> Config:
    """A node whose every image is positive (0.01) or negative (0.99): the test models score
    near 0.5."""
    config = node_config(tmp_path, db_url)
    return dataclasses.replace(
        config, destinations=tuple(destinations),
        model=dataclasses.replace(config.model, path=model, operating_point=operating_point),
        study=dataclasses.replace(config.study, stable_after_s=0.0),
        delivery=dataclasses.replace(config.delivery, first_retry_s=0.2, max_retry_s=0.4,
                                     timeout_s=5.0),
        saliency=dataclasses.replace(config.saliency, **saliency),
    ).validate()


def saliency_study(samples_dir: Path, names: list[str], study_uid: str | None = None
                   ) -> list[pydicom.Dataset]:
    """Copies of the named samples made into one study of the patient :data:`PATIENT`."""
    return study_of(samples_dir, names, study_uid, PatientName=PATIENT)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's Error and Warning lines for one file."""
    run = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                         timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning")])
