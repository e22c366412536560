"""Intake: store one received object, the same way whether C-STORE or STOW-RS brought it.

:meth:`Intake.receive` checks the object (size, parse, the UIDs the report needs, the request's
SOP class and instance, the study a STOW-RS request names), writes its bytes to the spool with
fsync, records it in SQL (which queues it for the model), and only then answers ``0x0000``.
Every refusal is a status of PS3.4 B.2.3 (also the Failure Reason of a STOW-RS response,
PS3.18 Table 10.5.3-2), a ``store_failures`` row with a reason code, a log line and a metric.
An identical copy of an instance already held is acknowledged and counted, not stored twice;
a different object under a held SOP Instance UID supersedes it.

Nothing here decodes pixels: it runs on the association thread or an HTTP request.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import pydicom
from pynetdicom.presentation import StoragePresentationContexts

from fracture_node.config import Config
from fracture_node.db.store import NewInstance, Store, utcnow
from fracture_node.errors import DatabaseError, StorageError
from fracture_node.logs import get_logger
from fracture_node.spool import Spool

IPNetwork = IPv4Network | IPv6Network

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_TOO_LARGE = 0xA701
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122

STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(cx.abstract_syntax) for cx in StoragePresentationContexts)
"""The storage SOP classes the SCP accepts (pynetdicom's list); STOW-RS accepts the same."""

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "Modality"]


@dataclass(frozen=True)
class Received:
    """What :meth:`Intake.receive` did with one object."""

    status: int
    """``0x0000`` stored (or already held), else the PS3.4 B.2.3 failure status."""
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: str | None = None
    """The refusal's reason code (as in ``store_failures.reason``)."""


class Intake:
    """Stores received objects into the spool and SQL; shared by the SCP and STOW-RS.

    Parameters
    ----------
    on_stored:
        Called (with no arguments) after each newly stored instance: wakes the worker.
    component:
        The ``component`` of its log lines (``scp``, ``stow``).
    """

    def __init__(self, config: Config, store: Store, spool: Spool,
                 on_stored: Callable[[], None] | None = None, metrics: Any | None = None,
                 component: str = "scp") -> None:
        self.log = get_logger(component)
        self.config = config
        self.store = store
        self.spool = spool
        self.on_stored = on_stored or (lambda: None)
        self.metrics = metrics

    def fail(self, assoc_id: int | None, sop_uid: str | None, sop_class: str | None,
             status: int, reason: str, detail: str) -> int:
        """Record a refusal (log, metric, ``store_failures`` row); returns ``status``."""
        self.log.warning("instance_refused", status=f"0x{status:04X}", reason=reason,
                    sop_instance_uid=sop_uid, detail=detail)
        if self.metrics:
            self.metrics.store_failures.labels(reason).inc()
        try:
            self.store.add_store_failure(association_id=assoc_id, sop_instance_uid=sop_uid,
                                         sop_class_uid=sop_class, status=status, reason=reason,
                                         detail=detail[:2000])
        except DatabaseError as exc:
            self.log.error("store_failure_not_recorded", reason=reason, error=str(exc))
        return status

    def receive(self, data: bytes, *, assoc_id: int | None, sop_uid: str | None,
              sop_class: str | None, transfer_syntax: str | None,
              context_class: str | None = None, study_uid: str | None = None,
              supported_only: bool = False) -> Received:
        """Check and store one encoded object (PS3.10 with file meta); never raises.

        ``sop_uid`` and ``sop_class`` are the request's (C-STORE), ``None`` where the request
        names none (STOW-RS: the data set's own are used). ``transfer_syntax`` ``None``: the
        file meta's. ``context_class`` is the presentation context's abstract syntax;
        ``study_uid`` the study a STOW-RS request names (an object of another study is refused
        with ``0xA900``, PS3.18 10.5.2); ``supported_only`` refuses a SOP class that is not in
        :data:`STORAGE_SOP_CLASSES` with ``0x0122`` (the SCP's negotiation does that for DIMSE).
        """
        started = time.perf_counter()

        def fail(status: int, reason: str, detail: str) -> Received:
            self.fail(assoc_id, sop_uid, sop_class, status, reason, detail)
            return Received(status, sop_class, sop_uid, reason)

        if len(data) > self.config.node.max_object_bytes:
            return fail(OUT_OF_RESOURCES_TOO_LARGE, "too_large", f"{len(data)} bytes is more "
                        f"than [node] max_object_bytes = {self.config.node.max_object_bytes}")
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                     specific_tags=_HEADER_TAGS)
            ds_study_uid = clean_uid(header.get("StudyInstanceUID"))
            series_uid = clean_uid(header.get("SeriesInstanceUID"))
            ds_sop_uid = clean_uid(header.get("SOPInstanceUID"))
            ds_sop_class = clean_uid(header.get("SOPClassUID"))
            modality = str(header.get("Modality", "") or "")[:16] or None
            meta_syntax = clean_uid(header.file_meta.get("TransferSyntaxUID"))
        except Exception as exc:
            return fail(CANNOT_UNDERSTAND, "unparseable",
                        f"the data set cannot be parsed: {type(exc).__name__}")
        # PS3.4 B.2.3: 0xC000 when the data set cannot be understood at all, 0xA900 when it
        # can but does not match the request (every row the report needs is checked here, so
        # an accepted instance can always be reported).
        if not (ds_study_uid or ds_sop_uid or ds_sop_class):
            return fail(CANNOT_UNDERSTAND, "unparseable", "the data set has none of SOP Class, "
                        "SOP Instance and Study Instance UID: not a DICOM data set")
        if sop_class is None:  # STOW-RS: the request names no SOP class or instance
            sop_class, sop_uid = ds_sop_class, ds_sop_uid
        transfer_syntax = transfer_syntax or meta_syntax
        if context_class and context_class != sop_class:
            return fail(DATASET_MISMATCH, "sop_class_mismatch", "the request's Affected SOP "
                        "Class UID is not the presentation context's abstract syntax")
        if not ds_sop_class or ds_sop_class != sop_class:
            return fail(DATASET_MISMATCH, "sop_class_mismatch", "the data set's SOP Class UID "
                        "is " + ("missing" if not ds_sop_class else "not the request's"))
        if supported_only and ds_sop_class not in STORAGE_SOP_CLASSES:
            return fail(SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported",
                        f"SOP class {ds_sop_class} is not a storage SOP class this node accepts")
        if not ds_sop_uid:
            return fail(DATASET_MISMATCH, "missing_sop_instance_uid",
                        "the data set has no SOP Instance UID")
        if ds_sop_uid != sop_uid:
            return fail(DATASET_MISMATCH, "uid_mismatch",
                        "the data set's SOP Instance UID differs from the request's")
        if not ds_study_uid:
            return fail(DATASET_MISMATCH, "missing_study_uid",
                        "the data set has no Study Instance UID")
        if study_uid is not None and ds_study_uid != study_uid:
            return fail(DATASET_MISMATCH, "study_mismatch", "the data set's Study Instance UID "
                        "is not the one the request names")
        if not transfer_syntax:
            return fail(CANNOT_UNDERSTAND, "no_file_meta", "the object has no Transfer Syntax "
                        "UID in its file meta (not a PS3.10 file)")
        status, reason = self._keep(data, assoc_id, ds_sop_uid, ds_sop_class, ds_study_uid,
                                    series_uid, transfer_syntax, modality, started)
        return Received(status, ds_sop_class, ds_sop_uid, reason)

    def _keep(self, data: bytes, assoc_id: int | None, sop_uid: str, sop_class: str,
              study_uid: str, series_uid: str | None, transfer_syntax: str,
              modality: str | None, started: float) -> tuple[int, str | None]:
        """Spool (fsync) and SQL: the checked object is stored, or refused with 0xA700."""
        digest = hashlib.sha256(data).hexdigest()
        try:
            current = self.store.current_instance(sop_uid)
        except DatabaseError as exc:
            return self._out_of_resources(assoc_id, sop_uid, sop_class,
                                          "database_unavailable", str(exc))
        if current is not None and current.sha256 == digest:
            try:
                self.store.add_duplicate(current.id, assoc_id)
            except DatabaseError as exc:
                return self._out_of_resources(assoc_id, sop_uid, sop_class,
                                              "database_unavailable", str(exc))
            self.log.info("instance_duplicate", sop_instance_uid=sop_uid, instance_id=current.id)
            return SUCCESS, None
        relative = self.spool.relative_path(study_uid, sop_uid, digest)
        try:
            self.spool.write(relative, data)
        except StorageError as exc:
            full = "space" in str(exc) or "free" in str(exc)
            return self._out_of_resources(assoc_id, sop_uid, sop_class,
                                          "storage_full" if full else "storage_error", str(exc))
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
            return self._out_of_resources(assoc_id, sop_uid, sop_class,
                                          "database_unavailable", str(exc))
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.log.info("instance_stored", instance_id=instance_id, sop_instance_uid=sop_uid,
                 study_instance_uid=study_uid, transfer_syntax_uid=transfer_syntax,
                 bytes=len(data), supersedes=current.id if current else None,
                 ms=round(elapsed_ms, 1))
        if self.metrics:
            self.metrics.received.inc()
            self.metrics.received_bytes.inc(len(data))
        self.on_stored()
        return SUCCESS, None

    def _out_of_resources(self, assoc_id: int | None, sop_uid: str, sop_class: str,
                          reason: str, detail: str) -> tuple[int, str]:
        return self.fail(assoc_id, sop_uid, sop_class, OUT_OF_RESOURCES, reason, detail), reason


def clean_uid(value: Any) -> str | None:
    """A UID as text without padding, at most 64 characters; ``None`` when empty."""
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text[:64] or None


def peer_allowed(address: str, networks: Sequence[IPNetwork]) -> bool:
    """``[node] allowed_peers``: True when ``networks`` is empty or holds ``address`` (the
    same check for a C-STORE caller and a STOW-RS client)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
