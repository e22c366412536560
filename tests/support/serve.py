"""A real ``fracture-node serve`` process with its own configuration, and studies to push at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fracture_node.config import TRAINED_BODY_PARTS
from tests.support import free_port, wait_for_port, wait_until

BIN = Path(sys.executable).with_name("fracture-node")


class ServeProcess:
    """``fracture-node serve`` as a real process with its own configuration and state."""

    def __init__(self, workdir: Path, destinations: list[tuple[str, str, int]],
                 extra: str = "", model: Path | None = None, program: Path = BIN) -> None:
        self.workdir = workdir
        self.program = program
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = workdir / "serve.log"
        lines = [
            "[node]", f"port = {self.port}", 'bind_address = "127.0.0.1"', 'state_dir = "state"',
            "[study]", "stable_after_s = 1.0",
            "[metrics]", f"port = {self.metrics_port}",
            "[model]", "max_wait_ms = 50",
        ]
        if model is not None:
            lines.append(f'path = "{model}"')
        if "[scope]" not in extra:
            # The 16 x 16 C-spine CR is the suites' fast stand-in radiograph (see
            # tests/integration/conftest.py TEST_SCOPE): admit it.
            parts = ", ".join(f'"{p}"' for p in (*TRAINED_BODY_PARTS, "CSPINE", "CHEST"))
            lines += ["[scope]", "min_side = 8", f"body_parts = [{parts}]"]
        for name, aet, port in destinations:
            lines += ["[[destinations]]", f'name = "{name}"', f'ae_title = "{aet}"',
                      'host = "127.0.0.1"', f"port = {port}"]
        self.config = workdir / "config.toml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(self.program), "serve", "--config", str(self.config)],
                                     cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        try:
            wait_for_port(self.port, timeout=90)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError("the node did not start:\n"
                                 + self.log_path.read_text()[-4000:]) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the node did not stop within {timeout} s of signal {sig}:\n"
                                 + self.log()[-4000:]) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_study(samples_dir: Path, out: Path, names: list[str], patient: str = "Doe^Jane",
               patient_id: str = "PID-0001") -> list[Path]:
    """Copies of sample files made into one study with a known patient, written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = generate_uid()
    paths = []
    for i, name in enumerate(names):
        ds = pydicom.dcmread(samples_dir / name)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = patient
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.InstanceNumber = i + 1
        path = out / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["BIN", "ServeProcess", "make_study", "wait_until"]
