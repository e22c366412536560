"""`fracture-node serve` as a process: DCMTK in, SR out to DCMTK storescp, clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.support.serve import ServeProcess, make_study, wait_until

NAMES = ["derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm", "CR_cspine_tiny16x16_explicitVR.dcm",
         "negative_controls/CT_small.dcm"]


@pytest.fixture
def node(tmp_path: Path, storescp: tuple[int, Path], tiny_model: Path) -> ServeProcess:
    serve = ServeProcess(tmp_path, [("pacs", "PACS", storescp[0])], model=tiny_model)
    serve.start()
    yield serve
    if serve.proc and serve.proc.poll() is None:
        serve.proc.kill()


def test_echoscu_is_answered(node: ServeProcess) -> None:
    """DCMTK echoscu gets a successful C-ECHO answer from the running daemon."""
    proc = subprocess.run(["echoscu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_study_pushed_with_storescu_comes_back_as_valid_sr(
        node: ServeProcess, storescp: tuple[int, Path], samples_dir: Path, tmp_path: Path) -> None:
    """A study pushed by storescu returns to the PACS as one SR that passes dciodvfy."""
    files = make_study(samples_dir, tmp_path / "study", NAMES)
    proc = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [received] = wait_until(lambda: list(storescp[1].iterdir()), timeout=120)
    sr = pydicom.dcmread(received)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.VerificationFlag == "UNVERIFIED"
    check = subprocess.run(["dciodvfy", str(received)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == []
    dump = subprocess.run(["dsrdump", str(received)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Fracture" in dump.stdout
    for ds in sources:
        assert ds.SOPInstanceUID in dump.stdout or ds.SOPInstanceUID in str(sr)


def test_sigterm_stops_cleanly_with_exit_0(node: ServeProcess) -> None:
    """SIGTERM makes the daemon stop accepting, finish, and exit 0."""
    assert node.stop(signal.SIGTERM, timeout=60) == 0
    assert "node_stopped" in node.log()


def test_logs_are_json_lines_with_event_names(node: ServeProcess, samples_dir: Path,
                                              tmp_path: Path) -> None:
    """Not on a terminal, every log line is a JSON object with an event name."""
    files = make_study(samples_dir, tmp_path / "study", NAMES[1:2])
    subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                    *map(str, files)], capture_output=True, timeout=60, check=True)
    wait_until(lambda: "instance_stored" in node.log())
    node.stop()
    events = [json.loads(line) for line in node.log().splitlines() if line.strip()]
    assert all("event" in e and "timestamp" in e for e in events)
    assert {"node_started", "instance_stored", "node_stopped"} <= {e["event"] for e in events}


def test_no_patient_data_in_logs_or_metrics(node: ServeProcess, samples_dir: Path,
                                            tmp_path: Path, storescp: tuple[int, Path]) -> None:
    """Known patient names, IDs and birth dates appear in no log line and no metric."""
    files = make_study(samples_dir, tmp_path / "study", NAMES, patient="Zyxwv^Quentin",
                       patient_id="PIDSECRET77")
    subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                    *map(str, files)], capture_output=True, timeout=120, check=True)
    wait_until(lambda: list(storescp[1].iterdir()), timeout=120)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics",
                                     timeout=10).read().decode()
    node.stop()
    text = node.log() + metrics
    for secret in ("Zyxwv", "Quentin", "PIDSECRET77", "19700101"):
        assert secret not in text


def test_daemon_notifies_systemd_ready_watchdog_and_stopping(
        tmp_path: Path, tiny_model: Path) -> None:
    """Under a NOTIFY_SOCKET of the test's own, the daemon sends READY=1, watchdog pings and
    STOPPING=1."""
    import socket

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    serve = ServeProcess(tmp_path / "node", [], model=tiny_model)
    serve.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
        assert serve.stop() == 0
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()
        if serve.proc and serve.proc.poll() is None:
            serve.proc.kill()


def test_the_node_logs_its_allocator(node: ServeProcess) -> None:
    """`serve` stays on glibc's malloc (measured the faster one for inference) and says so."""
    assert node.proc is not None
    assert "libjemalloc" not in Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert '"allocator": "system"' in node.log()
