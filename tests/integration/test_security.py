"""Access control, limits and TLS of the Storage SCP and the SCU, against real peers.

Certificates are made in the test with the ``openssl`` command: a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a rogue CA with its own client certificate.
Peers: pynetdicom (as SCU and SCP) and DCMTK's TLS-enabled echoscu, storescu and storescp.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from fracture_node.config import Destination, TlsConfig
from fracture_node.db import schema as s
from fracture_node.dicom.scp import server_tls_context
from fracture_node.dicom.send import echo, store
from fracture_node.errors import ConfigError
from tests.support import free_port, wait_for_port
from tests.support.scp import Pki, client_context, tls_config

TINY = "CR_cspine_tiny16x16_explicitVR.dcm"


# Certificates -------------------------------------------------------------------------------












# A receiver with its metrics ----------------------------------------------------------------






def _associate(port: int, aet: str = "TEST_SCU", tls: ssl.SSLContext | None = None,
               contexts: tuple[str, ...] = (Verification,)) -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    tls_args = (tls, "localhost") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE", tls_args=tls_args)


def _rj(assoc: Any) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


# Allow-lists and limits ---------------------------------------------------------------------


def test_unknown_calling_ae_title_gets_rj_recorded_and_counted(scp_node: Any) -> None:
    """A calling AE title outside the allow-list gets A-ASSOCIATE-RJ (1, 1, 3), an SQL row and a metric."""
    node = scp_node(allowed_calling_ae_titles=("PACS",))
    assoc = _associate(node.port, aet="ROGUE")
    assert assoc.is_rejected
    assert _rj(assoc) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
    [row] = node.wait_rows(s.Association.calling_ae_title == "ROGUE")
    assert row.outcome == "rejected"
    assert "allowed_calling_ae_titles" in row.reason
    assert row.peer_address == "127.0.0.1" and row.ended_at is not None
    assert node.rejected("calling_ae_not_allowed") == 1
    ok = _associate(node.port, aet="PACS")
    assert ok.is_established
    assert int(ok.send_c_echo().Status) == 0
    ok.release()


def test_peer_outside_allowed_peers_gets_rj_recorded_and_counted(scp_node: Any) -> None:
    """A peer address outside allowed_peers gets A-ASSOCIATE-RJ (1, 1, 1), an SQL row and a metric."""
    node = scp_node(allowed_peers=("10.77.0.0/16",))
    assoc = _associate(node.port, aet="SOMEONE")
    assert assoc.is_rejected
    assert _rj(assoc) == (0x01, 0x01, 0x01)  # permanent, service user, no reason given
    [row] = node.wait_rows(s.Association.calling_ae_title == "SOMEONE")
    assert row.outcome == "rejected"
    assert "allowed_peers" in row.reason and "127.0.0.1" in row.reason
    assert node.rejected("peer_not_allowed") == 1


def test_allowed_peer_network_is_accepted(scp_node: Any) -> None:
    """A peer inside an allowed network (CIDR) associates normally."""
    node = scp_node(allowed_peers=("127.0.0.0/8",), allowed_calling_ae_titles=("TEST_SCU",))
    assoc = _associate(node.port)
    assert assoc.is_established
    assoc.release()


def test_dcmtk_echoscu_with_wrong_ae_title_is_rejected(scp_node: Any) -> None:
    """DCMTK echoscu with a calling AE title outside the allow-list fails and is recorded."""
    node = scp_node(allowed_calling_ae_titles=("PACS",))
    proc = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    [row] = node.wait_rows(s.Association.calling_ae_title == "INTRUDER")
    assert row.outcome == "rejected"


def test_association_limit_rejects_transient_local_limit(scp_node: Any) -> None:
    """Past max_associations a caller gets A-ASSOCIATE-RJ (2, 3, 2), recorded and counted."""
    node = scp_node(max_associations=1)
    first = _associate(node.port, aet="FIRST")
    assert first.is_established
    try:
        second = _associate(node.port, aet="SECOND")
        assert second.is_rejected
        assert _rj(second) == (0x02, 0x03, 0x02)  # transient, presentation, local limit
    finally:
        first.release()
    [row] = node.wait_rows(s.Association.calling_ae_title == "SECOND")
    assert row.outcome == "rejected" and "max_associations" in row.reason
    assert node.rejected("too_many_associations") == 1
    third = _associate(node.port, aet="THIRD")
    assert third.is_established
    third.release()


def test_maximum_pdu_is_announced(scp_node: Any) -> None:
    """The A-ASSOCIATE-AC announces [node] max_pdu_bytes as our maximum PDU length."""
    node = scp_node(max_pdu_bytes=16384)
    assoc = _associate(node.port)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()


def test_pdu_longer_than_announced_aborts_before_it_is_read(scp_node: Any) -> None:
    """A P-DATA PDU declared longer than max_pdu_bytes closes the association at its header."""
    node = scp_node(max_pdu_bytes=16384)
    assoc = _associate(node.port, aet="BIG_PDU")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00" + struct.pack(">L", 500_000_000) + b"\x00" * 1024)
    deadline = time.monotonic() + 30  # generous: CI machines can be busy
    rows: list[Any] = []
    while time.monotonic() < deadline:
        # The peer may see the association accepted before the node's INSERT of its row commits.
        rows = node.store.rows(s.Association, s.Association.calling_ae_title == "BIG_PDU")
        if rows and rows[0].ended_at is not None:
            break
        time.sleep(0.05)
    [row] = rows
    assert row.outcome == "aborted"
    assert "max_pdu_bytes" in row.reason
    assoc.abort()
    again = _associate(node.port)
    assert again.is_established  # the node carries on
    again.release()


def _padded(samples_dir: Path, extra_bytes: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(samples_dir / TINY)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x00091010, "LO", "FRACTURE TEST")
    ds.add_new(0x00091011, "OB", b"\x00" * extra_bytes)  # private padding
    return ds


def test_object_over_max_object_bytes_gets_a701(scp_node: Any, samples_dir: Path) -> None:
    """An object a little over max_object_bytes is answered 0xA701 with a reason and no file."""
    node = scp_node(max_object_bytes=20_000)
    ds = _padded(samples_dir, 40_000)
    assoc = _associate(node.port, contexts=(ds.SOPClassUID,))
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert int(status.Status) == 0xA701
    [failure] = node.store.rows(s.StoreFailure)
    assert failure.reason == "too_large" and failure.sop_instance_uid == ds.SOPInstanceUID
    assert node.store.rows(s.Instance) == []
    assert [p for p in node.spool.root.rglob("*") if p.is_file()] == []


def test_object_far_over_max_object_bytes_aborts_while_arriving(scp_node: Any,
                                                                samples_dir: Path) -> None:
    """An object more than 1 MiB over max_object_bytes aborts the association mid-transfer."""
    node = scp_node(max_object_bytes=20_000)
    ds = _padded(samples_dir, 3 << 20)
    assoc = _associate(node.port, aet="HUGE", contexts=(ds.SOPClassUID,))
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert "Status" not in status  # no answer: the association was aborted
    rows = node.wait_rows(s.Association.calling_ae_title == "HUGE",
                          s.Association.ended_at.is_not(None))
    assert rows[0].outcome == "aborted" and "max_object_bytes" in rows[0].reason
    assert node.store.rows(s.Instance) == []


# TLS on the SCP ------------------------------------------------------------------------------




def test_tls_scp_accepts_a_client_with_a_trusted_certificate(scp_node: Any, pki: Pki,
                                                            samples_dir: Path) -> None:
    """Over mutual TLS, a pynetdicom caller with a CA-signed certificate echoes and stores."""
    node = scp_node(tls=tls_config(pki))
    ds = pydicom.dcmread(samples_dir / TINY)
    assoc = _associate(node.port, tls=client_context(pki, pki.client_cert, pki.client_key),
                       contexts=(Verification, ds.SOPClassUID))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    [row] = node.store.rows(s.Instance)
    assert row.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("caller", ["plain_tcp", "no_certificate", "rogue_certificate"])
def test_tls_scp_refuses_callers_without_a_trusted_certificate(scp_node: Any, pki: Pki,
                                                               caller: str) -> None:
    """Plain TCP, TLS without a certificate, or a certificate of another CA: refused and recorded."""
    node = scp_node(tls=tls_config(pki))
    tls = {"plain_tcp": None,
           "no_certificate": client_context(pki, None, None),
           "rogue_certificate": client_context(pki, pki.rogue_cert, pki.rogue_key)}[caller]
    assoc = _associate(node.port, tls=tls)
    assert not assoc.is_established
    [row] = node.wait_rows(s.Association.outcome == "rejected")
    assert row.reason.startswith("TLS handshake failed")
    assert node.rejected("tls_handshake_failed") == 1
    good = _associate(node.port, tls=client_context(pki, pki.client_cert, pki.client_key))
    assert good.is_established  # one failed handshake does not stop the server
    good.release()


def test_tls_key_that_does_not_match_is_a_config_error(pki: Pki) -> None:
    """A private key that does not belong to the certificate stops start-up with a [tls] error."""
    with pytest.raises(ConfigError, match=r"\[tls\].*fix:"):
        server_tls_context(TlsConfig(enabled=True, certificate=pki.server_cert,
                                     private_key=pki.client_key, ca_certificates=pki.ca))


def test_tls_handshake_does_not_block_other_callers(scp_node: Any, pki: Pki) -> None:
    """A caller that connects and says nothing does not hold up other TLS callers."""
    node = scp_node(tls=tls_config(pki))
    with socket.create_connection(("127.0.0.1", node.port)):
        assoc = _associate(node.port, tls=client_context(pki, pki.client_cert, pki.client_key))
        assert assoc.is_established
        assoc.release()


def test_dcmtk_echoscu_and_storescu_over_tls(scp_node: Any, pki: Pki, samples_dir: Path) -> None:
    """DCMTK echoscu and storescu with +tls and the CA file reach the TLS SCP."""
    node = scp_node(tls=tls_config(pki))
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    proc = subprocess.run(["echoscu", *tls, "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(["storescu", *tls, "-aec", "FRACTURE_NODE", "127.0.0.1",
                           str(node.port), str(samples_dir / TINY)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(node.store.rows(s.Instance)) == 1
    plain = subprocess.run(["echoscu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0


# TLS on the SCU -------------------------------------------------------------------------------


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    """A small object of the SR storage SOP class to send."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def pynetdicom_tls_scp(pki: Pki) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP requiring a CA-signed client certificate; yields port and received UIDs."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, received
    server.shutdown()


def _dest(port: int, host: str = "127.0.0.1") -> Destination:
    return Destination(name="pacs", ae_title="PACS", host=host, port=port, tls=True)


def test_scu_sends_over_mutual_tls_to_pynetdicom(pki: Pki, sr_file: Path,
                                                 pynetdicom_tls_scp: tuple[int, list[str]]
                                                 ) -> None:
    """store() to a TLS destination verifies it and presents our client certificate."""
    port, received = pynetdicom_tls_scp
    tls = TlsConfig(certificate=pki.client_cert, private_key=pki.client_key,
                    ca_certificates=pki.ca)
    outcome = store(sr_file, _dest(port), calling_ae_title="FRACTURE_NODE", timeout_s=10,
                    tls=tls)
    assert outcome.ok, outcome.error
    assert received == [pydicom.dcmread(sr_file).SOPInstanceUID]
    assert echo("127.0.0.1", port, called_ae_title="PACS", tls=tls, timeout_s=10).ok


def test_scu_refuses_a_destination_with_an_untrusted_certificate(
        pki: Pki, sr_file: Path, pynetdicom_tls_scp: tuple[int, list[str]]) -> None:
    """A destination whose certificate our CAs did not sign fails with a TLS message."""
    port, received = pynetdicom_tls_scp
    tls = TlsConfig(certificate=pki.client_cert, private_key=pki.client_key,
                    ca_certificates=pki.rogue_cert)
    outcome = store(sr_file, _dest(port), calling_ae_title="FRACTURE_NODE", timeout_s=10,
                    tls=tls)
    assert not outcome.ok
    assert "TLS" in (outcome.error or "")
    assert received == []


def test_scu_never_falls_back_to_plain_tcp(sr_file: Path,
                                           pynetdicom_tls_scp: tuple[int, list[str]]) -> None:
    """A tls = true destination without [tls] CA certificates fails instead of sending in clear."""
    port, received = pynetdicom_tls_scp
    outcome = store(sr_file, _dest(port), calling_ae_title="FRACTURE_NODE", timeout_s=10)
    assert not outcome.ok and "ca_certificates" in (outcome.error or "")
    assert received == []


def test_scu_sends_over_tls_to_dcmtk_storescp(pki: Pki, sr_file: Path, tmp_path: Path) -> None:
    """store() reaches DCMTK storescp +tls, which requires and verifies our certificate."""
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "+tls", str(pki.server_key), str(pki.server_cert),
                             "+cf", str(pki.ca), "-rc", "-aet", "PACS", "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        tls = TlsConfig(certificate=pki.client_cert, private_key=pki.client_key,
                        ca_certificates=pki.ca)
        outcome = store(sr_file, _dest(port), calling_ae_title="FRACTURE_NODE", timeout_s=20,
                        tls=tls)
        assert outcome.ok, outcome.error
        assert len(list(out.iterdir())) == 1
        anonymous = TlsConfig(ca_certificates=pki.ca)
        refused = store(sr_file, _dest(port), calling_ae_title="FRACTURE_NODE", timeout_s=20,
                        tls=anonymous)
        assert not refused.ok  # storescp -rc wants our certificate
    finally:
        proc.terminate()
        proc.wait(10)
