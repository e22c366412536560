"""Send: C-STORE (and C-ECHO) towards a destination, as an SCU, with pynetdicom.

:func:`store` (one object) and :func:`store_many` (several over one association) never raise
for a network or peer problem (refused connection, rejected or
aborted association, timeout, failure status): it returns a :class:`StoreOutcome` whose
``error`` says what happened, so that the export step can record the attempt and retry.
Only a local problem (the file to send cannot be read) raises
:class:`~fracture_node.errors.DeliveryError`.

TLS: a destination with ``tls = true`` is reached over TLS 1.2 or later with the ``[tls]``
CA certificates (and our certificate and key as the client certificate, when set); without a
``tls`` configuration such a destination fails every attempt rather than fall back to plain TCP.

Statuses follow PS3.4 B.2.3: ``0x0000`` success; ``0xB000``, ``0xB006``, ``0xB007`` warnings
(stored, counted as delivered, reported in ``warning``); anything else a failure.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, VERIFICATION_SERVICE_CLASS_STATUS

from fracture_node.config import Destination, TlsConfig
from fracture_node.errors import ConfigError, DeliveryError
from fracture_node.logs import get_logger

log = get_logger("send")

STORE_SOP_CLASSES: tuple[UID, ...] = (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)
"""The storage SOP classes we propose: the SR, and the saliency overlays (Secondary Capture,
Grayscale Softcopy Presentation State) for destinations with ``overlays``."""

TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

VERIFICATION = UID("1.2.840.10008.1.1")

_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE (or C-ECHO) attempt."""

    ok: bool
    """Delivered: success or warning status."""
    status: int | None
    """The DIMSE status the peer answered, ``None`` if it never answered."""
    error: str | None
    """Why it failed, for people and the audit trail; ``None`` when ``ok``."""
    duration_s: float
    warning: str | None = field(default=None)
    """The warning status and its comment when the peer stored with a warning."""


@dataclass(frozen=True)
class EchoOutcome(StoreOutcome):
    """What happened to one C-ECHO (same fields as :class:`StoreOutcome`)."""


def store(
    path_or_dataset: str | os.PathLike[str] | pydicom.Dataset,
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_s: float,
    tls: TlsConfig | None = None,
) -> StoreOutcome:
    """Send one object to ``destination`` with C-STORE over a new association.

    Parameters
    ----------
    path_or_dataset:
        A DICOM file (Part 10) or a dataset with file meta (as :func:`build_report` returns).
    destination:
        The peer; its ``calling_ae_title``, when set, overrides ``calling_ae_title``.
    calling_ae_title:
        Our AE title (usually ``[node] ae_title``).
    timeout_s:
        Limit for the TCP connect, the association answer and the C-STORE answer, each.
    tls:
        The ``[tls]`` settings, used when ``destination.tls`` is true.

    Raises
    ------
    DeliveryError
        The file cannot be read (a local problem that no retry mends).
    """
    return store_many([path_or_dataset], destination, calling_ae_title=calling_ae_title,
                      timeout_s=timeout_s, tls=tls)[0]


def store_many(
    objects: Sequence[str | os.PathLike[str] | pydicom.Dataset],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_s: float,
    tls: TlsConfig | None = None,
) -> list[StoreOutcome]:
    """Send several objects to ``destination``, one C-STORE each, over one new association.

    Like :func:`store` (same parameters, same statuses), with one outcome per object in order.
    A refused C-STORE does not stop the others; a failure of the association (refused,
    aborted, timed out) fails the object in hand and every object after it with that error.

    Raises
    ------
    DeliveryError
        A file cannot be read (before anything is sent).
    """
    started = time.monotonic()
    datasets = [load_object(item) for item in objects]
    if not datasets:
        return []
    calling = destination.calling_ae_title or calling_ae_title
    sop_classes = list(STORE_SOP_CLASSES)
    for ds in datasets:
        sop_class = UID(str(ds.get("SOPClassUID", "")))
        if sop_class and sop_class not in sop_classes:
            sop_classes.append(sop_class)
    outcomes: list[StoreOutcome] = []

    def fail(ds: pydicom.Dataset, message: str, status: int | None = None) -> StoreOutcome:
        elapsed = time.monotonic() - started
        log.warning("store_failed", error=message, status=status, duration_s=elapsed,
                    destination=destination.name, sop_instance_uid=str(ds.SOPInstanceUID))
        return StoreOutcome(ok=False, status=status, error=message, duration_s=elapsed)

    def fail_rest(message: str) -> list[StoreOutcome]:
        return outcomes + [fail(ds, message) for ds in datasets[len(outcomes):]]

    tls_args = None
    if destination.tls:
        try:
            tls_args = (client_tls_context(tls), destination.host)
        except ConfigError as exc:
            return fail_rest(str(exc))
    try:
        assoc, problem = _associate(
            destination.host, destination.port, destination.ae_title, calling, sop_classes,
            timeout_s, tls_args,
        )
        if assoc is None:
            return fail_rest(problem or f"no association with {_peer(destination)}")
        try:
            for ds in datasets:
                outcomes.append(_send_one(assoc, ds, destination, timeout_s, started, fail))
                if not assoc.is_established:
                    break
        finally:
            _close(assoc)
    except (OSError, RuntimeError, ValueError, AttributeError) as exc:
        # pynetdicom raises these for sockets that die or data it cannot encode.
        return fail_rest(
            f"C-STORE to {_peer(destination)} failed: {type(exc).__name__}: {exc}")
    return fail_rest(f"{_peer(destination)} ended the association before every object was sent")


def _send_one(assoc: Association, ds: pydicom.Dataset, destination: Destination,
              timeout_s: float, started: float,
              fail: Callable[..., StoreOutcome]) -> StoreOutcome:
    """One C-STORE on an established association."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    fields = {"destination": destination.name, "sop_instance_uid": str(ds.SOPInstanceUID)}
    if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
        return fail(ds,
                    f"{_peer(destination)} accepted no presentation context for "
                    f"{sop_class.name or sop_class}; fix: configure the PACS to accept it")
    rsp = assoc.send_c_store(ds)
    if "Status" not in rsp:
        return fail(ds,
                    f"{_peer(destination)} gave no C-STORE response within {timeout_s:g}s "
                    "(timeout or association aborted)")
    status = int(rsp.Status)
    text = _status_text(status, rsp, STORAGE_SERVICE_CLASS_STATUS)
    elapsed = time.monotonic() - started
    if status == 0x0000:
        log.info("store_succeeded", duration_s=elapsed, **fields)
        return StoreOutcome(ok=True, status=status, error=None, duration_s=elapsed)
    if status in _WARNING_STATUSES:
        log.warning("store_warning", status=status, warning=text, duration_s=elapsed, **fields)
        return StoreOutcome(ok=True, status=status, error=None, duration_s=elapsed, warning=text)
    return fail(ds, f"{_peer(destination)} refused the C-STORE: {text}", status)


def echo(
    host: str,
    port: int,
    *,
    called_ae_title: str = "ANY-SCP",
    calling_ae_title: str = "FRACTURE_NODE",
    timeout_s: float = 10,
    tls: TlsConfig | None = None,
) -> EchoOutcome:
    """C-ECHO a peer (``fracture-node echo``); never raises for network or peer problems.

    With ``tls`` the association runs over TLS (see :func:`client_tls_context`).
    """
    started = time.monotonic()
    peer = f"{called_ae_title}@{host}:{port}"

    def done(ok: bool, status: int | None, error: str | None) -> EchoOutcome:
        elapsed = time.monotonic() - started
        if ok:
            log.info("echo_succeeded", peer=peer, duration_s=elapsed)
        else:
            log.warning("echo_failed", peer=peer, error=error, status=status, duration_s=elapsed)
        return EchoOutcome(ok=ok, status=status, error=error, duration_s=elapsed)

    try:
        tls_args = (client_tls_context(tls), host) if tls is not None else None
    except ConfigError as exc:
        return done(False, None, str(exc))
    try:
        assoc, problem = _associate(
            host, port, called_ae_title, calling_ae_title, [VERIFICATION], timeout_s, tls_args
        )
        if assoc is None:
            return done(False, None, problem or f"no association with {peer}")
        try:
            rsp = assoc.send_c_echo()
        finally:
            _close(assoc)
    except (OSError, RuntimeError, ValueError) as exc:
        return done(False, None, f"C-ECHO to {peer} failed: {type(exc).__name__}: {exc}")
    if "Status" not in rsp:
        return done(False, None, f"{peer} gave no C-ECHO response within {timeout_s:g}s")
    status = int(rsp.Status)
    if status != 0x0000:
        return done(False, status,
                    f"{peer} answered C-ECHO with "
                    f"{_status_text(status, rsp, VERIFICATION_SERVICE_CLASS_STATUS)}")
    return done(True, status, None)


# Helpers -----------------------------------------------------------------------------------


def client_tls_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """The SSL context of the SCU: TLS 1.2 or later, the peer verified against our CAs.

    Raises
    ------
    ConfigError
        No ``[tls]`` CA certificates are configured, or the files cannot be loaded.
    """
    if tls is None or tls.ca_certificates is None:
        raise ConfigError(
            "config: a destination has tls = true but [tls] ca_certificates is not set; "
            "fix: give the CA bundle that signs the destination's certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.verify_destination_hostname
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        if tls.certificate and tls.private_key:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config: [tls] files cannot be loaded ({type(exc).__name__}: {exc}); "
            "fix: give PEM files, the key matching the certificate and not encrypted") from exc
    return ctx


def load_object(path_or_dataset: str | os.PathLike[str] | pydicom.Dataset) -> pydicom.Dataset:
    if isinstance(path_or_dataset, pydicom.Dataset):
        ds = path_or_dataset
    else:
        try:
            ds = pydicom.dcmread(path_or_dataset)
        except (OSError, InvalidDicomError) as exc:
            raise DeliveryError(
                f"cannot read {os.fspath(path_or_dataset)} to send it: {exc}; "
                "fix: check the reports folder (the file may have been purged)"
            ) from exc
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise DeliveryError("the object to send has no SOP Class UID or SOP Instance UID")
    return ds


def _peer(destination: Destination) -> str:
    return f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"


def _associate(
    host: str,
    port: int,
    called: str,
    calling: str,
    sop_classes: list[UID],
    timeout_s: float,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[Association | None, str | None]:
    """Request an association; return it when established, else a sentence saying why not."""
    ae = AE(ae_title=calling)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
    seen: set[str] = set()

    def mark(name: str) -> Callable[[Any], None]:
        return lambda _event: seen.add(name)

    handlers: list[Any] = [(evt.EVT_CONN_OPEN, mark("connected"))]
    assoc = ae.associate(host, port, ae_title=called, evt_handlers=handlers, tls_args=tls_args)
    peer = f"{called}@{host}:{port}"
    if assoc.is_established:
        return assoc, None
    if "connected" not in seen and tls_args is not None:
        return None, (
            f"cannot connect to {peer} over TLS: connection refused, no answer within "
            f"{timeout_s:g}s, or the TLS handshake failed (its certificate is not signed by "
            "[tls] ca_certificates or does not name the host, or it refused our certificate); "
            "fix: check the peer's TLS port and both certificates"
        )
    if "connected" not in seen:
        return None, (
            f"cannot connect to {peer}: connection refused, host unreachable or no answer "
            f"within {timeout_s:g}s; fix: check that the peer is running and the host/port"
        )
    primitive = assoc.acceptor.primitive if assoc.acceptor else None
    if assoc.is_rejected and primitive is not None:
        return None, (
            f"{peer} rejected the association ({primitive.result_str}, "
            f"source: {primitive.source_str}, reason: {primitive.reason_str}); "
            f"fix: check that the peer knows our AE title {calling!r} and its own is {called!r}"
        )
    if primitive is not None and primitive.result == 0x00:
        return None, (
            f"{peer} accepted the association but none of the proposed presentation contexts "
            "(SOP class / transfer syntax); fix: configure the peer to accept them"
        )
    if primitive is None and not assoc.is_aborted:
        return None, f"{peer} did not answer the association request within {timeout_s:g}s"
    return None, (
        f"{peer} aborted the association request or did not answer it within {timeout_s:g}s"
    )


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _status_text(status: int, rsp: pydicom.Dataset, table: dict[int, tuple[str, str]]) -> str:
    category, meaning = table.get(status, ("Unknown", "unknown status"))
    comment = rsp.get("ErrorComment")
    text = f"0x{status:04X} {category}: {meaning or category}"
    return f"{text} ({comment})" if comment else text
