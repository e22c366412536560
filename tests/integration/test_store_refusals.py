"""C-STORE requests whose data set could not be reported are refused, with a status and a reason.

The requests are built at the DIMSE level (pynetdicom's ``C_STORE`` primitive with the data set
encoded by hand), so that the request and its data set can disagree as a careless or hostile
sender's would.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from fracture_node.db import schema as s
from tests.support.node import RunningReceiver, node_config

TINY = "CR_cspine_tiny16x16_explicitVR.dcm"


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str) -> Iterator[RunningReceiver]:
    running = RunningReceiver(node_config(tmp_path, sqlite_url))
    yield running
    running.stop()


@pytest.fixture
def sample(samples_dir: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(samples_dir / TINY)
    ds.SOPInstanceUID = generate_uid()
    return ds


def _store(port: int, context_class: str, request_class: str, request_uid: str,
           body: bytes) -> int:
    """One C-STORE on a context of ``context_class`` naming ``request_class``; the status."""
    ae = AE(ae_title="CARELESS")
    ae.dimse_timeout = 20
    ae.add_requested_context(context_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = request_class
        req.AffectedSOPInstanceUID = request_uid
        req.Priority = 2
        req.DataSet = io.BytesIO(body)
        # Pause the association's reactor as its own send_c_store does, or it takes the answer.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no answer"
        return int(rsp.Status)
    finally:
        assoc.release()


def _body(ds: pydicom.Dataset) -> bytes:
    body = encode(ds, False, True)
    assert body is not None
    return body


def _refusal(node: RunningReceiver, status: int, reason: str, uid: str) -> Any:
    [failure] = node.store.rows(s.StoreFailure)
    assert (failure.status, failure.reason, failure.sop_instance_uid) == (status, reason, uid)
    assert node.store.rows(s.Instance) == []
    return failure


def test_data_set_without_sop_instance_uid_is_refused(node: RunningReceiver,
                                                      sample: pydicom.Dataset) -> None:
    """The request names a SOP Instance UID its data set lacks: 0xA900, reason recorded."""
    uid = sample.SOPInstanceUID
    del sample.SOPInstanceUID
    status = _store(node.port, sample.SOPClassUID, sample.SOPClassUID, uid, _body(sample))
    assert status == 0xA900
    _refusal(node, 0xA900, "missing_sop_instance_uid", uid)


def test_data_set_of_another_sop_class_is_refused(node: RunningReceiver,
                                                  sample: pydicom.Dataset) -> None:
    """A CR request carrying a data set that says CT: 0xA900, sop_class_mismatch."""
    request_class = sample.SOPClassUID
    sample.SOPClassUID = CTImageStorage
    status = _store(node.port, request_class, request_class, sample.SOPInstanceUID,
                    _body(sample))
    assert status == 0xA900
    failure = _refusal(node, 0xA900, "sop_class_mismatch", sample.SOPInstanceUID)
    assert "data set" in failure.detail


def test_request_naming_another_class_than_its_context_is_refused(
        node: RunningReceiver, sample: pydicom.Dataset) -> None:
    """A request naming CT on a CR context with a CR data set is refused, not stored as CT."""
    status = _store(node.port, sample.SOPClassUID, CTImageStorage, sample.SOPInstanceUID,
                    _body(sample))
    assert status == 0xA900
    failure = _refusal(node, 0xA900, "sop_class_mismatch", sample.SOPInstanceUID)
    assert "presentation context" in failure.detail


def test_garbage_bytes_get_cannot_understand(node: RunningReceiver,
                                             sample: pydicom.Dataset) -> None:
    """Bytes that are no data set get 0xC000 (cannot understand), as the conformance says."""
    status = _store(node.port, sample.SOPClassUID, sample.SOPClassUID, sample.SOPInstanceUID,
                    bytes(range(256)) * 8)
    assert status == 0xC000
    _refusal(node, 0xC000, "unparseable", sample.SOPInstanceUID)


def test_matching_request_and_data_set_are_stored(node: RunningReceiver,
                                                  sample: pydicom.Dataset) -> None:
    """The same path with everything in agreement stores the instance (the checks can pass)."""
    status = _store(node.port, sample.SOPClassUID, sample.SOPClassUID, sample.SOPInstanceUID,
                    _body(sample))
    assert status == 0x0000
    [row] = node.store.rows(s.Instance)
    assert row.sop_instance_uid == sample.SOPInstanceUID
    assert row.sop_class_uid == sample.SOPClassUID
