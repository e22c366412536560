"""store()/echo() against real peers on loopback: DCMTK storescp and pynetdicom SCPs."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage, generate_uid
from pynetdicom import AE, evt

from fracture_node.config import Destination
from fracture_node.dicom.report import AlgorithmInfo, ImageFinding, build_report, write_report
from fracture_node.dicom.send import echo, store
from fracture_node.errors import DeliveryError

CALLING = "FRACTURE_NODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"storescp did not listen on {port} within {limit_s}s")


def run_storescp(out: Path, *args: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "PACS", *args, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A DCMTK storescp (AE title PACS) writing what it receives to a folder."""
    out = tmp_path / "received"
    out.mkdir()
    for port in run_storescp(out):
        yield port, out


@pytest.fixture
def refusing_storescp(tmp_path: Path) -> Iterator[int]:
    """A DCMTK storescp that refuses every association."""
    yield from run_storescp(tmp_path, "--refuse")


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """Start pynetdicom SCPs on free ports; ``start()`` takes the answer status and options."""
    servers: list[Any] = []

    def start(status: int = 0x0000, sop_class: str = Comprehensive3DSRStorage,
              delay_s: float = 0.0, **options: Any) -> int:
        ae = AE(ae_title="PACS")
        for key, value in options.items():
            setattr(ae, key, value)
        ae.add_supported_context(sop_class)

        def handle_store(event: Any) -> int:
            time.sleep(delay_s)
            return status

        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        assert server is not None
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def sr_file(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report built from a real CR header and written to disk."""
    src = pydicom.dcmread(samples_dir / "CR_hip_RG2_JLSL.dcm", stop_before_pixels=True)
    sr = build_report(
        [src], [ImageFinding(src.SOPInstanceUID, src.SOPClassUID, 0.9, True)], [],
        AlgorithmInfo("fracture-densenet", "1.4.0", "ab" * 32, 0.42, "balanced"),
        version=1, series_instance_uid=generate_uid(), device_observer_uid=generate_uid(),
        station_ae_title=CALLING, software_version="0.1.0",
    )
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    write_report(sr, path)
    return path


def pacs(port: int, ae_title: str = "PACS") -> Destination:
    return Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def test_store_delivers_the_sr_to_storescp(storescp: tuple[int, Path], sr_file: Path) -> None:
    """A C-STORE to DCMTK storescp succeeds and the same instance arrives on its disk."""
    port, out = storescp
    outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=10)
    assert outcome.ok, outcome.error
    assert outcome.status == 0x0000 and outcome.error is None and outcome.warning is None
    uid = pydicom.dcmread(sr_file).SOPInstanceUID
    (received,) = [p for p in out.iterdir() if p.name.endswith(uid)]
    back = pydicom.dcmread(received)
    assert back.SOPInstanceUID == uid
    assert back.SOPClassUID == Comprehensive3DSRStorage


def test_store_accepts_a_dataset(storescp: tuple[int, Path], sr_file: Path) -> None:
    """A dataset in memory is sent like a file."""
    port, out = storescp
    ds = pydicom.dcmread(sr_file)
    outcome = store(ds, pacs(port), calling_ae_title=CALLING, timeout_s=10)
    assert outcome.ok, outcome.error
    assert any(p.name.endswith(ds.SOPInstanceUID) for p in out.iterdir())


def test_stopped_peer_gives_a_clear_failure(sr_file: Path) -> None:
    """Nobody listening: ok=False, no status, an error that says it could not connect."""
    outcome = store(sr_file, pacs(free_port()), calling_ae_title=CALLING, timeout_s=5)
    assert not outcome.ok
    assert outcome.status is None
    assert outcome.error is not None and "cannot connect" in outcome.error


def test_refused_association_gives_a_clear_failure(refusing_storescp: int, sr_file: Path) -> None:
    """storescp --refuse refuses us: ok=False with a clear error, no exception.

    DCMTK sends the A-ASSOCIATE-RJ and closes at once, so pynetdicom sometimes sees the close
    before the reject; both are named clearly (the reject text itself is checked against a
    pynetdicom peer in test_wrong_called_ae_title_is_rejected)."""
    outcome = store(sr_file, pacs(refusing_storescp), calling_ae_title=CALLING, timeout_s=10)
    assert not outcome.ok
    assert outcome.error is not None
    assert ("rejected the association" in outcome.error
            or "aborted the association request" in outcome.error)


def test_wrong_called_ae_title_is_rejected(pynetdicom_scp: Callable[..., int],
                                          sr_file: Path) -> None:
    """A peer that checks its AE title rejects us, and the error names the reason."""
    port = pynetdicom_scp(require_called_aet=True)
    outcome = store(sr_file, pacs(port, ae_title="NOT_PACS"), calling_ae_title=CALLING,
                    timeout_s=10)
    assert not outcome.ok
    assert outcome.error is not None
    assert "rejected the association" in outcome.error
    assert "Called AE title not recognised" in outcome.error


def test_failure_status_is_not_ok(pynetdicom_scp: Callable[..., int], sr_file: Path) -> None:
    """A 0xA700 answer is a failure that carries the status and its meaning."""
    port = pynetdicom_scp(status=0xA700)
    outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=10)
    assert not outcome.ok
    assert outcome.status == 0xA700
    assert outcome.error is not None and "Out of Resources" in outcome.error


def test_warning_status_counts_as_delivered(pynetdicom_scp: Callable[..., int],
                                            sr_file: Path) -> None:
    """A 0xB000 answer is delivered, with the warning reported."""
    port = pynetdicom_scp(status=0xB000)
    outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=10)
    assert outcome.ok
    assert outcome.status == 0xB000
    assert outcome.warning is not None and "Coercion" in outcome.warning


def test_peer_without_the_sr_sop_class_is_a_failure(pynetdicom_scp: Callable[..., int],
                                                    sr_file: Path) -> None:
    """A peer that accepts none of our presentation contexts gives ok=False."""
    port = pynetdicom_scp(sop_class=CTImageStorage)
    outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=10)
    assert not outcome.ok
    assert outcome.error is not None and "presentation context" in outcome.error


def test_silent_peer_times_out(sr_file: Path) -> None:
    """A peer that accepts TCP but never answers the association request fails after the limit."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=1)
    assert not outcome.ok
    assert outcome.status is None
    assert outcome.error is not None and "within 1s" in outcome.error
    assert outcome.duration_s < 10


def test_peer_that_never_answers_the_store_times_out(pynetdicom_scp: Callable[..., int],
                                                     sr_file: Path) -> None:
    """A C-STORE left unanswered past the limit fails with no status."""
    port = pynetdicom_scp(delay_s=3)
    outcome = store(sr_file, pacs(port), calling_ae_title=CALLING, timeout_s=1)
    assert not outcome.ok
    assert outcome.status is None
    assert outcome.error is not None and "no C-STORE response within 1s" in outcome.error


def test_unreadable_file_raises_delivery_error(tmp_path: Path) -> None:
    """A missing file is a local problem: DeliveryError, not an outcome."""
    with pytest.raises(DeliveryError):
        store(tmp_path / "gone.dcm", pacs(free_port()), calling_ae_title=CALLING, timeout_s=1)


def test_echo_reaches_storescp(storescp: tuple[int, Path]) -> None:
    """C-ECHO to storescp succeeds."""
    port, _ = storescp
    outcome = echo("127.0.0.1", port, called_ae_title="PACS", timeout_s=10)
    assert outcome.ok and outcome.status == 0x0000


def test_echo_to_stopped_peer_fails_without_raising() -> None:
    """C-ECHO to a closed port returns ok=False with the reason."""
    outcome = echo("127.0.0.1", free_port(), timeout_s=5)
    assert not outcome.ok
    assert outcome.error is not None and "cannot connect" in outcome.error
