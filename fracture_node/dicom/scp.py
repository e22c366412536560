"""The Storage SCP: receives objects from the PACS (C-STORE) and answers C-ECHO.

The C-STORE handler never raises: every failure becomes a DICOM status and a recorded reason.
Success (0x0000) is answered only once the bytes are fsynced in the spool and the instance is
committed in SQL. Nothing heavy runs on the association thread: no pixel decoding, no model.

Statuses (PS3.4 B.2.3):

- ``0x0000`` stored (or an identical copy already held: see below);
- ``0xA700`` out of resources: the spool or the database cannot take it (nothing is kept);
- ``0xA900`` the data set does not match the SOP class (no Study Instance UID, UIDs disagree);
- ``0xC000`` cannot understand: the data set cannot be parsed;
- ``0xA701`` the object is larger than ``[node] max_object_bytes``.

Duplicates: an object whose SOP Instance UID we hold with identical bytes is acknowledged with
success and counted (``instances.duplicates``), not stored twice. A different object under the same
SOP Instance UID is stored as a new row that supersedes the old one (state ``superseded``); it is
processed again and its study gets a new report version.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

from fracture_node.config import Config
from fracture_node.db.store import NewInstance, Store, utcnow
from fracture_node.errors import DatabaseError, StorageError
from fracture_node.logs import get_logger
from fracture_node.spool import Spool

log = get_logger("scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_TOO_LARGE = 0xA701
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "Modality"]


def node_name(port: int) -> str:
    """This process's name in SQL rows (host and port; several nodes may share one database)."""
    return f"{socket.gethostname()}:{port}:{os.getpid()}"


class Receiver:
    """The C-STORE/C-ECHO SCP of one node.

    Parameters
    ----------
    config:
        The node's configuration.
    store:
        The SQL store.
    spool:
        Where received bytes go.
    on_stored:
        Called (with no arguments) after each newly stored instance: wakes the worker.
    """

    def __init__(self, config: Config, store: Store, spool: Spool,
                 on_stored: Callable[[], None] | None = None,
                 metrics: Any | None = None) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.on_stored = on_stored or (lambda: None)
        self.metrics = metrics
        self.node = ""
        self._server: Any = None
        self._assoc_ids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._networks = [ipaddress.ip_network(p, strict=False)
                          for p in config.node.allowed_peers]
        self.ae = self._make_ae()

    # Set-up -------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = node.require_called_ae_title
        if node.allowed_calling_ae_titles:
            ae.require_calling_aet = list(node.allowed_calling_ae_titles)
        transfer_syntaxes = list(AllTransferSyntaxes)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
        ae.add_supported_context(Verification)
        return ae

    @property
    def port(self) -> int:
        """The port actually listened on (useful when configured as 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen for associations (in background threads)."""
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (self.config.node.bind_address, self.config.node.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        self.node = node_name(self.port)
        log.info("scp_listening", ae_title=self.config.node.ae_title,
                 address=self.config.node.bind_address, port=self.port)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting associations, let the ones in flight finish, then close."""
        server = self._server
        if server is None:
            return
        server.shutdown()  # no new connections from here on
        deadline = time.monotonic() + drain_timeout_s
        # Wait for established associations only: a connection still negotiating carries no
        # store and is dropped with the process.
        while time.monotonic() < deadline:
            if not any(a.is_established for a in server.active_associations):
                break
            time.sleep(0.05)
        left = [a for a in server.active_associations if a.is_established]
        for assoc in left:
            assoc.abort(block=False)
        log.info("scp_stopped", aborted_associations=len(left))
        self._server = None

    # Associations -------------------------------------------------------------------------
    def _peer_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def _on_conn_open(self, event: Any) -> None:
        address = event.address[0]
        if not self._peer_allowed(address):
            log.warning("peer_refused", peer_address=address)
            if self.metrics:
                self.metrics.associations_rejected.labels("peer_not_allowed").inc()
            self._record_association(event, outcome="rejected", reason="peer address not allowed")
            event.assoc.abort()

    def _record_association(self, event: Any, outcome: str, reason: str | None = None
                            ) -> int | None:
        assoc = event.assoc
        try:
            calling = assoc.requestor.ae_title or ""
            called = assoc.acceptor.ae_title or ""
            return self.store.open_association(
                node=self.node, calling_ae_title=str(calling).strip()[:16],
                called_ae_title=str(called).strip()[:16],
                peer_address=str(assoc.requestor.address)[:64],
                peer_port=int(assoc.requestor.port or 0), outcome=outcome, reason=reason)
        except DatabaseError as exc:
            log.error("association_not_recorded", error=str(exc))
            return None

    def _on_accepted(self, event: Any) -> None:
        assoc_id = self._record_association(event, "open")
        if assoc_id is not None:
            with self._lock:
                self._assoc_ids[id(event.assoc)] = assoc_id
        if self.metrics:
            self.metrics.associations.inc()
        log.info("association_accepted", association_id=assoc_id,
                 calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
                 peer_address=event.assoc.requestor.address)

    def _on_rejected(self, event: Any) -> None:
        self._record_association(event, "rejected", reason="association rejected")
        if self.metrics:
            self.metrics.associations_rejected.labels("rejected").inc()
        log.warning("association_rejected",
                    calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
                    peer_address=event.assoc.requestor.address)

    def _end(self, event: Any, outcome: str) -> None:
        with self._lock:
            assoc_id = self._assoc_ids.pop(id(event.assoc), None)
        if assoc_id is None:
            return
        try:
            self.store.close_association(assoc_id, outcome)
        except DatabaseError as exc:
            log.error("association_end_not_recorded", association_id=assoc_id, error=str(exc))
        log.info("association_ended", association_id=assoc_id, outcome=outcome)

    def _on_released(self, event: Any) -> None:
        self._end(event, "released")

    def _on_aborted(self, event: Any) -> None:
        self._end(event, "aborted")

    def _on_conn_close(self, event: Any) -> None:
        self._end(event, "closed")

    def _association_id(self, event: Any) -> int | None:
        with self._lock:
            return self._assoc_ids.get(id(event.assoc))

    # DIMSE --------------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        log.info("echo_answered", calling_ae_title=str(event.assoc.requestor.ae_title).strip())
        return SUCCESS

    def _fail(self, assoc_id: int | None, sop_uid: str | None, sop_class: str | None,
              status: int, reason: str, detail: str) -> int:
        log.warning("instance_refused", status=f"0x{status:04X}", reason=reason,
                    sop_instance_uid=sop_uid, detail=detail)
        if self.metrics:
            self.metrics.store_failures.labels(reason).inc()
        try:
            self.store.add_store_failure(association_id=assoc_id, sop_instance_uid=sop_uid,
                                         sop_class_uid=sop_class, status=status, reason=reason,
                                         detail=detail[:2000])
        except DatabaseError as exc:
            log.error("store_failure_not_recorded", reason=reason, error=str(exc))
        return status

    def _on_store(self, event: Any) -> int:
        """Handle one C-STORE request. Never raises."""
        assoc_id = self._association_id(event)
        request = event.request
        sop_uid = _clean_uid(getattr(request, "AffectedSOPInstanceUID", None))
        sop_class = _clean_uid(getattr(request, "AffectedSOPClassUID", None))
        try:
            return self._store(event, assoc_id, sop_uid, sop_class)
        except Exception as exc:  # the handler must answer, whatever happened
            return self._fail(assoc_id, sop_uid, sop_class, CANNOT_UNDERSTAND, "internal_error",
                              f"{type(exc).__name__}: {str(exc)[:200]}")

    def _store(self, event: Any, assoc_id: int | None, sop_uid: str | None,
               sop_class: str | None) -> int:
        started = time.perf_counter()
        if not sop_uid or not sop_class:
            return self._fail(assoc_id, sop_uid, sop_class, DATASET_MISMATCH, "missing_uid",
                              "the C-STORE request has no Affected SOP Instance/Class UID")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            return self._fail(assoc_id, sop_uid, sop_class, CANNOT_UNDERSTAND, "unreadable",
                              f"cannot encode the received data set: {type(exc).__name__}")
        if len(data) > self.config.node.max_object_bytes:
            return self._fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES_TOO_LARGE,
                              "too_large", f"{len(data)} bytes is more than "
                              f"[node] max_object_bytes = {self.config.node.max_object_bytes}")
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                     specific_tags=_HEADER_TAGS)
            study_uid = _clean_uid(header.get("StudyInstanceUID"))
            series_uid = _clean_uid(header.get("SeriesInstanceUID"))
            ds_sop_uid = _clean_uid(header.get("SOPInstanceUID"))
            modality = str(header.get("Modality", "") or "")[:16] or None
        except Exception as exc:
            return self._fail(assoc_id, sop_uid, sop_class, CANNOT_UNDERSTAND, "unparseable",
                              f"the data set cannot be parsed: {type(exc).__name__}")
        if not study_uid:
            return self._fail(assoc_id, sop_uid, sop_class, DATASET_MISMATCH,
                              "missing_study_uid", "the data set has no Study Instance UID")
        if ds_sop_uid and ds_sop_uid != sop_uid:
            return self._fail(assoc_id, sop_uid, sop_class, DATASET_MISMATCH, "uid_mismatch",
                              "the data set's SOP Instance UID differs from the request's")
        digest = hashlib.sha256(data).hexdigest()
        try:
            current = self.store.current_instance(sop_uid)
        except DatabaseError as exc:
            return self._fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES,
                              "database_unavailable", str(exc))
        if current is not None and current.sha256 == digest:
            try:
                self.store.add_duplicate(current.id, assoc_id)
            except DatabaseError as exc:
                return self._fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES,
                                  "database_unavailable", str(exc))
            log.info("instance_duplicate", sop_instance_uid=sop_uid, instance_id=current.id)
            return SUCCESS
        relative = self.spool.relative_path(study_uid, sop_uid, digest)
        try:
            self.spool.write(relative, data)
        except StorageError as exc:
            return self._fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES, "storage_full"
                              if "space" in str(exc) or "free" in str(exc) else "storage_error",
                              str(exc))
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            instance_id = self.store.add_instance(NewInstance(
                sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_instance_uid=study_uid,
                series_instance_uid=series_uid, transfer_syntax_uid=transfer_syntax,
                modality=modality, size_bytes=len(data), sha256=digest, spool_path=relative,
                received_at=utcnow(), association_id=assoc_id),
                supersedes=current.id if current is not None else None)
        except DatabaseError as exc:
            if current is None or current.spool_path != relative:
                self.spool.remove(relative)
            return self._fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES,
                              "database_unavailable", str(exc))
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info("instance_stored", instance_id=instance_id, sop_instance_uid=sop_uid,
                 study_instance_uid=study_uid, transfer_syntax_uid=transfer_syntax,
                 bytes=len(data), supersedes=current.id if current else None,
                 ms=round(elapsed_ms, 1))
        if self.metrics:
            self.metrics.received.inc()
            self.metrics.received_bytes.inc(len(data))
        self.on_stored()
        return SUCCESS


def _clean_uid(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text[:64] or None

