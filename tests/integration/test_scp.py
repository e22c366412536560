"""The Storage SCP against real peers: pynetdicom and DCMTK on loopback, SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from fracture_node.db import schema as s
from tests.support.node import RunningReceiver, node_config

SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "dicom-samples"
ALL_SAMPLES = sorted(SAMPLES.rglob("*.dcm"))


def _send(port: int, datasets: list[pydicom.Dataset], aet: str = "TEST_SCU") -> list[int]:
    """C-STORE each dataset in its own transfer syntax over one association; return statuses."""
    ae = AE(ae_title=aet)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return statuses


def _dataset_bytes(path: Path) -> bytes:
    """The data set part of a DICOM file (everything after the preamble and file meta)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_length:]


def _read(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # the sample with no file meta
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=lambda p: p.name)
def test_pynetdicom_push_stores_every_sample_unchanged(receiver: RunningReceiver,
                                                        sample: Path) -> None:
    """Every sample file is answered 0x0000, stored byte for byte, and has its SQL row."""
    ds = _read(sample)
    assert _send(receiver.port, [ds]) == [0x0000]
    rows = receiver.store.rows(s.Instance, s.Instance.sop_instance_uid == ds.SOPInstanceUID)
    assert len(rows) == 1
    row = rows[0]
    stored = receiver.spool.path(row.spool_path)
    assert row.state == s.QUEUED
    assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert row.sop_class_uid == ds.SOPClassUID
    assert row.study_instance_uid == ds.StudyInstanceUID
    assert row.size_bytes == stored.stat().st_size
    if "FileMetaInformationGroupLength" in pydicom.dcmread(sample, stop_before_pixels=True,
                                                           force=True).file_meta:
        assert _dataset_bytes(stored) == _dataset_bytes(sample)
    again = pydicom.dcmread(stored)
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    assert oct(stored.stat().st_mode & 0o777) == "0o600"


def test_association_is_recorded(receiver: RunningReceiver, samples_dir: Path) -> None:
    """An association's calling AE, peer, times, count and outcome are in SQL."""
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    _send(receiver.port, [ds], aet="AUDIT_ME")
    [assoc] = receiver.store.rows(s.Association, s.Association.calling_ae_title == "AUDIT_ME")
    assert assoc.peer_address == "127.0.0.1"
    assert assoc.called_ae_title == "FRACTURE_NODE"
    assert assoc.outcome == "released"
    assert assoc.instances_stored == 1
    assert assoc.ended_at is not None and assoc.ended_at >= assoc.started_at


def test_identical_duplicate_is_acknowledged_once(receiver: RunningReceiver,
                                                  samples_dir: Path) -> None:
    """The same object twice is answered 0x0000 both times and stored once, counted."""
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    assert _send(receiver.port, [ds]) == [0]
    assert _send(receiver.port, [ds]) == [0]
    [row] = receiver.store.rows(s.Instance, s.Instance.sop_instance_uid == ds.SOPInstanceUID)
    assert row.duplicates == 1
    assert len(list(receiver.spool.root.rglob("*.dcm"))) == 1


def test_changed_duplicate_supersedes(receiver: RunningReceiver, samples_dir: Path) -> None:
    """A different object under a known SOP Instance UID supersedes the old row and is queued."""
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    assert _send(receiver.port, [ds]) == [0]
    ds.SeriesDescription = "corrected"
    assert _send(receiver.port, [ds]) == [0]
    rows = receiver.store.rows(s.Instance, s.Instance.sop_instance_uid == ds.SOPInstanceUID)
    states = sorted(r.state for r in rows)
    assert states == [s.QUEUED, s.SUPERSEDED]
    old = next(r for r in rows if r.state == s.SUPERSEDED)
    new = next(r for r in rows if r.state == s.QUEUED)
    assert old.superseded_by == new.id
    assert receiver.spool.path(old.spool_path).exists()
    assert receiver.spool.path(new.spool_path).exists()


def test_disk_full_answers_a700_and_leaves_no_file(receiver: RunningReceiver, samples_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC at the write gives 0xA700, a recorded reason, and no file in the spool."""
    def no_space(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("fracture_node.spool.os.write", no_space)
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    assert _send(receiver.port, [ds]) == [0xA700]
    assert [p for p in receiver.spool.root.rglob("*") if p.is_file()] == []
    assert receiver.store.rows(s.Instance) == []
    [failure] = receiver.store.rows(s.StoreFailure)
    assert failure.status == 0xA700
    assert failure.reason == "storage_full"
    assert failure.sop_instance_uid == ds.SOPInstanceUID


def test_database_unavailable_answers_a700_and_leaves_no_file(
        receiver: RunningReceiver, samples_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When SQL refuses the instance, the answer is 0xA700 and the spooled file is removed."""
    from fracture_node.errors import DatabaseError

    def refuse(*args: object, **kwargs: object) -> int:
        raise DatabaseError("database error: OperationalError: connection refused")

    monkeypatch.setattr(receiver.store, "add_instance", refuse)
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    assert _send(receiver.port, [ds]) == [0xA700]
    assert [p for p in receiver.spool.root.rglob("*") if p.is_file()] == []


def test_object_without_study_uid_is_refused_with_reason(receiver: RunningReceiver,
                                                         samples_dir: Path) -> None:
    """A data set with no Study Instance UID gets 0xA900 and a recorded reason."""
    ds = _read(samples_dir / "CR_cspine_tiny16x16_explicitVR.dcm")
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = generate_uid()
    assert _send(receiver.port, [ds]) == [0xA900]
    [failure] = receiver.store.rows(s.StoreFailure)
    assert failure.reason == "missing_study_uid"


def test_pynetdicom_echo(receiver: RunningReceiver) -> None:
    """A pynetdicom C-ECHO is answered with success."""
    ae = AE(ae_title="ECHO_TEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_dcmtk_echoscu(receiver: RunningReceiver) -> None:
    """DCMTK echoscu gets an answer."""
    proc = subprocess.run(["echoscu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(receiver.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_dcmtk_storescu_and_dcmsend(receiver: RunningReceiver) -> None:
    """DCMTK storescu (uncompressed) and dcmsend (compressed, own syntax) store every sample."""
    plain = [p for p in ALL_SAMPLES if "nometa" in p.name]
    others = [p for p in ALL_SAMPLES if p not in plain]
    proc = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(receiver.port), *map(str, plain)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["dcmsend", "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(receiver.port), *map(str, others)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sop_uids = {pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID
                for p in ALL_SAMPLES}
    current = {r.sop_instance_uid for r in receiver.store.rows(s.Instance)
               if r.state != s.SUPERSEDED}
    assert current == sop_uids
    assert receiver.store.rows(s.StoreFailure) == []


# Transfer syntax preference: store what the PACS sends, as it sends it -------------------------

LOSSLESS_SAMPLES = {
    "CR_hip_RG2_JLSL.dcm": ("1.2.840.10008.1.2.4.80", "-xt"),
    "CR_hip_RG2_JPLL.dcm": ("1.2.840.10008.1.2.4.70", "-xs"),
    "derived/CR_hip_RG2_RLE.dcm": ("1.2.840.10008.1.2.5", "-xr"),
    "CR_extremity_RG3_J2KR.dcm": ("1.2.840.10008.1.2.4.90", "-xv"),
}


@pytest.fixture
def sqlite_receiver(tmp_path: Path, sqlite_url: str) -> Iterator[RunningReceiver]:
    running = RunningReceiver(node_config(tmp_path, sqlite_url))
    yield running
    running.stop()


def _stored_syntax(receiver: RunningReceiver, sample: Path) -> tuple[str, int]:
    uid = pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID
    (row,) = [r for r in receiver.store.rows(s.Instance) if r.sop_instance_uid == uid]
    path = receiver.spool.path(row.spool_path)
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID), \
        path.stat().st_size


def test_lossless_compressed_is_preferred_over_uncompressed() -> None:
    """Offered JPEG-LS lossless with both uncompressed syntaxes, the SCP accepts JPEG-LS."""
    from pynetdicom.presentation import build_context, negotiate_as_acceptor

    from fracture_node.dicom.scp import preferred_transfer_syntaxes

    ours = [build_context("1.2.840.10008.5.1.4.1.1.1", preferred_transfer_syntaxes())]
    for offered, expected in [
        (["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"],
         "1.2.840.10008.1.2.4.80"),
        (["1.2.840.10008.1.2", "1.2.840.10008.1.2.5"], "1.2.840.10008.1.2.5"),
        (["1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.1"),
    ]:
        proposed = build_context("1.2.840.10008.5.1.4.1.1.1", offered)
        proposed.context_id = 1
        (accepted,), _ = negotiate_as_acceptor([proposed], ours)
        assert accepted.transfer_syntax[0] == expected


@pytest.mark.parametrize("name", sorted(LOSSLESS_SAMPLES))
def test_storescu_offering_lossless_and_uncompressed_stores_the_compressed_file(
    sqlite_receiver: RunningReceiver, name: str,
) -> None:
    """storescu -xs/-xt/-xr/-xv (lossless plus uncompressed): the spool keeps the sent file."""
    syntax, option = LOSSLESS_SAMPLES[name]
    sample = SAMPLES / name
    proc = subprocess.run(["storescu", option, "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(sqlite_receiver.port), str(sample)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stored, size = _stored_syntax(sqlite_receiver, sample)
    assert stored == syntax
    assert size <= sample.stat().st_size + 4096


def test_dcmsend_no_longer_decompresses(sqlite_receiver: RunningReceiver) -> None:
    """dcmsend offers the file's syntax with the uncompressed ones; nothing is decompressed."""
    samples = [SAMPLES / n for n in sorted(LOSSLESS_SAMPLES)]
    proc = subprocess.run(["dcmsend", "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(sqlite_receiver.port), *map(str, samples)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for sample in samples:
        stored, size = _stored_syntax(sqlite_receiver, sample)
        assert stored == LOSSLESS_SAMPLES[str(sample.relative_to(SAMPLES))][0]
        assert size < 1.01 * sample.stat().st_size + 4096


def test_orthanc_push_keeps_the_lossless_compressed_syntax(
        sqlite_receiver: RunningReceiver, tmp_path: Path) -> None:
    """Orthanc, holding JPEG-LS, JPEG lossless and RLE files, pushes them; none is decompressed."""
    import json

    from tests.support import free_port
    from tests.support.orthanc import start_orthanc

    orthanc = start_orthanc(tmp_path / "orthanc", sqlite_receiver.port, free_port())
    try:
        names = ["CR_hip_RG2_JLSL.dcm", "CR_hip_RG2_JPLL.dcm", "derived/CR_hip_RG2_RLE.dcm"]
        ids = []
        for name in names:
            sample = SAMPLES / name
            ds = pydicom.dcmread(sample)
            ds.SOPInstanceUID = generate_uid()  # the three share one SOP Instance UID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = tmp_path / f"{Path(name).stem}.dcm"
            ds.save_as(path, enforce_file_format=True)
            ids.append(orthanc.request("POST", "/instances", path.read_bytes())["ID"])  # type: ignore[index]
        result = orthanc.request("POST", "/modalities/fracture/store",
                                 json.dumps({"Resources": ids, "Synchronous": True}).encode())
        assert result["InstancesCount"] == 3  # type: ignore[index]
        assert result["FailedInstancesCount"] == 0  # type: ignore[index]
        for name in names:
            path = tmp_path / f"{Path(name).stem}.dcm"
            stored, size = _stored_syntax(sqlite_receiver, path)
            assert stored == LOSSLESS_SAMPLES[name][0]
            assert size < 1.01 * path.stat().st_size + 4096
    finally:
        orthanc.stop()
