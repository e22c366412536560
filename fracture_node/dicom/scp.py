"""The Storage SCP: receives objects from the PACS (C-STORE) and answers C-ECHO.

The C-STORE handler never raises: every failure becomes a DICOM status and a recorded reason.
Success (0x0000) is answered only once the bytes are fsynced in the spool and the instance is
committed in SQL. Nothing heavy runs on the association thread: no pixel decoding, no model.

Statuses (PS3.4 B.2.3):

- ``0x0000`` stored (or an identical copy already held: see below);
- ``0xA700`` out of resources: the spool or the database cannot take it (nothing is kept);
- ``0xA900`` the data set does not match the SOP class or the request (no SOP Instance or
  Study Instance UID; SOP Class or Instance UID not the request's; the request's SOP class not
  its presentation context's);
- ``0xC000`` cannot understand: the data set cannot be parsed, or holds none of the UIDs;
- ``0xA701`` the object is larger than ``[node] max_object_bytes``.

Access (PS3.8 9.3.4): a caller whose address is not in ``[node] allowed_peers`` or whose calling
AE title is not in ``[node] allowed_calling_ae_titles`` gets an A-ASSOCIATE-RJ (rejected
permanent, service user; reason "no reason given" for an address, "calling AE title not
recognised" for an AE title); pynetdicom itself rejects a wrong called AE title (when required)
and associations over ``max_associations`` (rejected transient, service provider presentation
related, local limit exceeded). With ``[tls] enabled`` the TLS handshake runs first, in the
connection's own thread, within ``acse_timeout_s``. Every rejection and failed handshake is an
``associations`` row (outcome ``rejected`` and a reason), a log line and a metric.

Limits while receiving: a PDU longer than ``max_pdu_bytes`` (what we announced) or a message
that grows past ``max_object_bytes`` + 1 MiB aborts the association at once, before the bytes
are held in memory (recorded as outcome ``aborted`` with the reason); an object slightly over
``max_object_bytes`` is answered ``0xA701``.

Connections (:mod:`fracture_node.dicom.connections`): at most ``max_connections`` open, and
``max_connections_per_peer`` from one address, counted from accept; a connection still sending
its A-ASSOCIATE-RQ does not count against ``max_associations``; the request must arrive whole
within ``acse_timeout_s`` of connecting and every later PDU within ``dimse_timeout_s`` of its
first byte (plus 1 s per 8 KiB), else the connection is closed. Every connection we cut or
refuse is an ``associations`` row (``aborted`` or ``rejected``, reason), a log line and a metric.

Duplicates: an object whose SOP Instance UID we hold with identical bytes is acknowledged with
success and counted (``instances.duplicates``), not stored twice. A different object under the same
SOP Instance UID is stored as a new row that supersedes the old one (state ``superseded``); it is
processed again and its study gets a new report version.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.utils import make_target

from fracture_node.config import Config, TlsConfig
from fracture_node.db.store import Store, utcnow
from fracture_node.dicom.connections import ConnectionServer, Handler, ReceiveGuard
from fracture_node.dicom.intake import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    SUCCESS,
    Intake,
)
from fracture_node.dicom.intake import clean_uid as _clean_uid
from fracture_node.errors import ConfigError, DatabaseError, describe
from fracture_node.logs import get_logger
from fracture_node.spool import Spool

log = get_logger("scp")

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_ACSE = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
NO_REASON_GIVEN = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
LOCAL_LIMIT_EXCEEDED = 0x02

# (result source, diagnostic) of a rejection -> the reason code in metrics and SQL.
_REJECT_REASONS = {
    (SOURCE_SERVICE_USER, NO_REASON_GIVEN): "peer_not_allowed",
    (SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED): "calling_ae_not_allowed",
    (SOURCE_SERVICE_USER, CALLED_AE_NOT_RECOGNISED): "called_ae_not_recognised",
    (SOURCE_PROVIDER_ACSE, NO_REASON_GIVEN): "user_identity_refused",
    (SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED): "too_many_associations",
    (SOURCE_PROVIDER_PRESENTATION, NO_REASON_GIVEN): "congestion",
}

ASSOCIATION_END_RETRY_S = 2.0

REFUSAL_ROW_EVERY_S = 10.0
"""At most one ``associations`` row per address and reason this often for connections refused
over the connection limits (the metric counts every one)."""

OBJECT_SLACK_BYTES = 1 << 20
"""How far past ``max_object_bytes`` a message may grow before the association is aborted."""


def node_name(port: int) -> str:
    """This process's name in SQL rows (host and port; several nodes may share one database)."""
    return f"{socket.gethostname()}:{port}:{os.getpid()}"


def server_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SSL context of the SCP: our certificate, TLS 1.2 or later, mutual when required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates:
            ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config: [tls] certificate/private_key/ca_certificates cannot be loaded "
            f"({type(exc).__name__}: {exc}); fix: give PEM files, the key matching the "
            "certificate and not encrypted") from exc
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


LOSSLESS_COMPRESSED = (
    UID("1.2.840.10008.1.2.4.80"),  # JPEG-LS Lossless
    UID("1.2.840.10008.1.2.4.90"),  # JPEG 2000 Lossless Only
    UID("1.2.840.10008.1.2.4.201"),  # HTJ2K Lossless
    UID("1.2.840.10008.1.2.4.202"),  # HTJ2K Lossless RPCL
    UID("1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1 (Process 14, first-order prediction)
    UID("1.2.840.10008.1.2.4.57"),  # JPEG Lossless (Process 14)
    UID("1.2.840.10008.1.2.5"),  # RLE Lossless
)
"""Lossless compressed syntaxes, preferred in this order when the node can decode them."""
UNCOMPRESSED = (
    UID("1.2.840.10008.1.2.1"),  # Explicit VR Little Endian
    UID("1.2.840.10008.1.2"),  # Implicit VR Little Endian
    UID("1.2.840.10008.1.2.1.99"),  # Deflated Explicit VR Little Endian
    UID("1.2.840.10008.1.2.2"),  # Explicit VR Big Endian (retired)
)


def _decodable(ts: UID) -> bool:
    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:
        return False


def preferred_transfer_syntaxes() -> list[str]:
    """Every transfer syntax, in the order the SCP prefers them (pynetdicom accepts, for each
    proposed presentation context, the first of these that the requestor also proposed).

    Store what the PACS sends as it sends it: a lossless compressed syntax the node can decode
    comes first (the sender then need not decompress: the spool keeps the smaller file), then
    the uncompressed ones, then the rest (lossy compressed, video, undecodable lossless): a
    lossy syntax is accepted only when nothing else is proposed with it.
    """
    first = [ts for ts in LOSSLESS_COMPRESSED if _decodable(ts)]
    chosen = [*first, *UNCOMPRESSED]
    rest = [ts for ts in AllTransferSyntaxes if ts not in chosen]
    return [str(ts) for ts in (*chosen, *rest)]


class _Connection:
    """What the receiver tracks for one connection, from open to close."""

    def __init__(self, guard: ReceiveGuard | None) -> None:
        self.guard = guard
        self.started_at = utcnow()
        self.requested = False
        """An A-ASSOCIATE-RQ arrived whole (from then on its row is written by accept/reject)."""
        self.assoc_id: int | None = None
        self.accept_recorded = False
        self.ended: str | None = None
        """Set when the connection ended before its row was written (a race with the peer)."""


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
        self.intake = Intake(config, store, spool, on_stored=self.on_stored, metrics=metrics)
        self.node = ""
        self._server: Any = None
        self._serving = False
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scp-refusals")
        self._conns: dict[int, _Connection] = {}
        self._unrecorded_ends: list[tuple[int, str, str | None]] = []
        self._retry_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._networks = [ipaddress.ip_network(p, strict=False)
                          for p in config.node.allowed_peers]
        self._allowed_aets = {a.strip() for a in config.node.allowed_calling_ae_titles}
        self._tls = server_tls_context(config.tls) if config.tls.enabled else None
        self.ae = self._make_ae()

    # Set-up -------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        # Connections and negotiated associations are limited here (ConnectionServer, _on_requested):
        # pynetdicom counts a connection that has not finished its request as an association.
        ae.maximum_associations = node.max_connections + 1
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = node.require_called_ae_title
        # Calling AE titles and peer addresses are checked in _on_requested (to record why).
        transfer_syntaxes = preferred_transfer_syntaxes()
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), transfer_syntaxes)
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
        self.bind()
        self.serve()

    def bind(self) -> None:
        """Take the port (bound and listening; callers wait in the backlog until
        :meth:`serve`). Raises OSError when the port is taken."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (self.config.node.bind_address, self.config.node.port)
        server = cast(ConnectionServer, self.ae.make_server(address, evt_handlers=handlers,
                                                   server_class=ConnectionServer,
                                                   request_handler=Handler))
        server.tls_context = self._tls
        server.handshake_timeout_s = self.config.node.acse_timeout_s
        server.max_connections = self.config.node.max_connections
        server.max_per_peer = self.config.node.max_connections_per_peer
        server.on_tls_failure = self._on_tls_failure
        server.on_refused = self._on_refused
        server.on_finished = self._on_finished
        self._server = server
        self.node = node_name(self.port)

    def serve(self) -> None:
        """Accept associations (the port is bound by :meth:`bind`)."""
        server = self._server
        assert server is not None, "bind() first"
        thread = threading.Thread(target=make_target(server.serve_forever), name="scp",
                                  daemon=True)
        thread.start()
        self._serving = True
        self.ae._servers.append(server)
        log.info("scp_listening", ae_title=self.config.node.ae_title,
                 address=self.config.node.bind_address, port=self.port,
                 tls=self._tls is not None,
                 mutual_tls=self._tls is not None and self.config.tls.require_client_certificate)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting associations, let the ones in flight finish, then close."""
        server = self._server
        if server is None:
            return
        if not self._serving:  # bound, never served: socketserver's shutdown() would wait
            server.server_close()
            self._server = None
            self._recorder.shutdown(wait=False)
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
        with self._lock:
            timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.cancel()
        self._recorder.shutdown(wait=False)
        self._record_ends()  # last try; what still fails is closed as interrupted at next start

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
        """Install the receive limits on the new connection's socket."""
        node = self.config.node
        guard = None
        try:
            sock = event.assoc.dul.socket
            guard = ReceiveGuard(sock, node.max_pdu_bytes,
                                  node.max_object_bytes + OBJECT_SLACK_BYTES,
                                  request_timeout_s=node.acse_timeout_s,
                                  pdu_timeout_s=node.dimse_timeout_s)
            sock.recv = guard
        except Exception as exc:  # a handler must not raise into pynetdicom
            log.error("receive_guard_not_installed", error=describe(exc))
        with self._lock:
            self._conns[id(event.assoc)] = _Connection(guard)

    def _on_requested(self, event: Any) -> None:
        """Check the caller's address and AE title; reject with A-ASSOCIATE-RJ if not allowed."""
        assoc = event.assoc
        try:
            request = assoc.requestor.primitive
            calling = _ae(request.calling_ae_title)
            called = _ae(request.called_ae_title)
            address = str(assoc.requestor.address)
            with self._lock:
                conn = self._conns.setdefault(id(assoc), _Connection(None))
                conn.requested = True
                negotiating = sum(1 for c in self._conns.values() if c.requested)
            result, source = REJECTED_PERMANENT, SOURCE_SERVICE_USER
            if not self._peer_allowed(address):
                reason = f"peer address {address} is not in [node] allowed_peers"
                diagnostic = NO_REASON_GIVEN
            elif self._allowed_aets and calling not in self._allowed_aets:
                reason = f"calling AE title {calling!r} is not in [node] allowed_calling_ae_titles"
                diagnostic = CALLING_AE_NOT_RECOGNISED
            elif negotiating > self.config.node.max_associations:
                reason = (f"more than [node] max_associations = "
                          f"{self.config.node.max_associations} at once")
                result, source = REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION
                diagnostic = LOCAL_LIMIT_EXCEEDED
            else:
                return
            assoc.acse.send_reject(result, source, diagnostic)
            self._rejected(calling, called, address, int(assoc.requestor.port or 0),
                           _REJECT_REASONS[(source, diagnostic)], reason)
            assoc.kill()  # wait until the A-ASSOCIATE-RJ is sent and the peer closed
        except Exception as exc:  # never let a caller in because a check failed
            log.error("association_check_failed", error=describe(exc))
            if not assoc.is_rejected:
                assoc.abort()

    def _on_refused(self, address: tuple[str, int], code: str, reason: str) -> None:
        """A connection over the connection limits, closed before anything of it was read.

        Runs in the accept loop, which must never wait on the database: the row is written by a
        background thread, and for one address and reason at most one row every
        ``REFUSAL_ROW_EVERY_S`` (a flood of connections must not become a flood of rows); the
        others are counted in the metric and in the next row's reason.
        """
        host = str(address[0])
        now = time.monotonic()
        with self._lock:
            last, skipped = self._refusals.get((host, code), (-REFUSAL_ROW_EVERY_S, 0))
            if now - last < REFUSAL_ROW_EVERY_S:
                self._refusals[(host, code)] = (last, skipped + 1)
                if self.metrics:
                    self.metrics.associations_rejected.labels(code).inc()
                return
            if len(self._refusals) > 1024:
                self._refusals.clear()
            self._refusals[(host, code)] = (now, 0)
        if skipped:
            reason = f"{reason} (+{skipped} refused since the last row)"
        self._recorder.submit(self._rejected, "", self.config.node.ae_title, host,
                              int(address[1]), code, reason)

    def _on_tls_failure(self, address: tuple[str, int], reason: str) -> None:
        self._rejected("", self.config.node.ae_title, str(address[0]), int(address[1]),
                       "tls_handshake_failed", f"TLS handshake failed: {reason}"[:128])

    def _rejected(self, calling: str, called: str, address: str, port: int, code: str,
                  reason: str) -> None:
        """Record, log and count one refused association."""
        log.warning("association_rejected", reason=code, detail=reason,
                    calling_ae_title=calling, peer_address=address)
        if self.metrics:
            self.metrics.associations_rejected.labels(code).inc()
        try:
            self.store.open_association(
                node=self.node, calling_ae_title=calling[:16], called_ae_title=called[:16],
                peer_address=address[:64], peer_port=port, outcome="rejected",
                reason=reason[:128])
        except DatabaseError as exc:
            log.error("association_not_recorded", error=str(exc))

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
        with self._lock:
            conn = self._conns.setdefault(id(event.assoc), _Connection(None))
            conn.assoc_id = assoc_id
            conn.accept_recorded = True
            ended = conn.ended
        if ended:  # the peer was faster than our INSERT: close the row now
            self._end(event, ended)
        if self.metrics:
            self.metrics.associations.inc()
        log.info("association_accepted", association_id=assoc_id,
                 calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
                 peer_address=event.assoc.requestor.address)

    def _on_rejected(self, event: Any) -> None:
        """A rejection made by pynetdicom (called AE title, association limit)."""
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        source = int(getattr(rj, "result_source", 0) or 0)
        diagnostic = int(getattr(rj, "diagnostic", 0) or 0)
        code = _REJECT_REASONS.get((source, diagnostic), "rejected")
        reason = {
            "too_many_associations": f"more than [node] max_associations = "
                                     f"{self.config.node.max_associations} at once",
            "called_ae_not_recognised": "called AE title is not [node] ae_title",
        }.get(code, f"rejected (source {source}, reason {diagnostic})")
        self._rejected(_ae(assoc.requestor.ae_title), _ae(assoc.acceptor.ae_title),
                       str(assoc.requestor.address), int(assoc.requestor.port or 0), code,
                       reason)

    def _end(self, event: Any, outcome: str) -> None:
        assoc = event.assoc
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is None:
                return
            rsp = assoc.acceptor.primitive
            accepted = rsp is not None and getattr(rsp, "result", None) == 0x00
            if accepted and not conn.accept_recorded:
                conn.ended = conn.ended or outcome  # _on_accepted is still writing the row
                return
            self._conns.pop(id(assoc), None)
        assoc_id = conn.assoc_id
        reason = conn.guard.refused if conn.guard is not None else None
        if not conn.requested:
            # pynetdicom's acceptor waits acse_timeout_s for a request that cannot come now:
            # wake it (None reads as that timeout), so that the thread and its slot go at once.
            assoc.dul.to_user_queue.put(None)
            self._end_without_request(assoc, conn)
            return
        if reason:
            outcome = "aborted"
            stalled = conn.guard is not None and conn.guard.stalled
            log.warning("association_stalled" if stalled else "association_limit_exceeded",
                        association_id=assoc_id, detail=reason,
                        peer_address=str(assoc.requestor.address))
            if self.metrics:
                self.metrics.store_failures.labels(
                    "stalled" if stalled else "limit_exceeded").inc()
        if assoc_id is None:
            return
        log.info("association_ended", association_id=assoc_id, outcome=outcome)
        with self._lock:
            self._unrecorded_ends.append((assoc_id, outcome, reason[:128] if reason else None))
        self._record_ends()

    def _end_without_request(self, assoc: Any, conn: _Connection) -> None:
        """A connection closed before a whole A-ASSOCIATE-RQ arrived.

        One we cut (stalled, over a limit), one that sent bytes that were not a request, or one
        held until the ACSE timeout gets a row (outcome ``aborted``) with the reason; one that
        opened and closed without a byte (a port check) only a debug line.
        """
        guard = conn.guard
        sent = guard.bytes_received if guard is not None else 0
        held_s = (utcnow() - conn.started_at).total_seconds()
        reason = guard.refused if guard is not None else None
        if reason is None and held_s >= self.config.node.acse_timeout_s * 0.9:
            reason = "stalled: no A-ASSOCIATE-RQ by the deadline ([node] acse_timeout_s)"
        elif reason is None and sent:
            reason = f"closed after {sent} bytes without a whole A-ASSOCIATE-RQ"
        address = str(assoc.requestor.address)
        if reason is None:
            log.debug("connection_closed_without_request", peer_address=address)
            return
        code = "stalled_connection" if reason.startswith("stalled") else "no_request"
        log.warning("connection_closed", reason=code, detail=reason, peer_address=address,
                    bytes_received=sent, held_s=round(held_s, 1))
        if self.metrics:
            self.metrics.associations_rejected.labels(code).inc()
        try:
            assoc_id = self.store.open_association(
                node=self.node, calling_ae_title="", called_ae_title="",
                peer_address=address[:64], peer_port=int(assoc.requestor.port or 0),
                outcome="aborted", reason=reason[:128], started_at=conn.started_at)
        except DatabaseError as exc:
            log.error("association_not_recorded", error=str(exc))
            return
        log.info("association_ended", association_id=assoc_id, outcome="aborted")

    def _record_ends(self) -> None:
        """Write the ends of associations to SQL; retry those the database refused.

        An association left ``open`` in SQL would hold back the report of every study it
        brought, so an end that could not be written (database down) is retried every few
        seconds until it is.
        """
        with self._lock:
            pending, self._unrecorded_ends = self._unrecorded_ends, []
            self._retry_timer = None
        failed = []
        for i, (assoc_id, outcome, reason) in enumerate(pending):
            try:
                self.store.close_association(assoc_id, outcome, reason)
            except DatabaseError as exc:
                log.error("association_end_not_recorded", association_id=assoc_id,
                          error=str(exc), retry_in_s=ASSOCIATION_END_RETRY_S)
                failed = pending[i:]
                break
        if not failed:
            return
        with self._lock:
            self._unrecorded_ends[:0] = failed
            if self._retry_timer is None and self._server is not None:
                self._retry_timer = threading.Timer(ASSOCIATION_END_RETRY_S, self._record_ends)
                self._retry_timer.daemon = True
                self._retry_timer.start()

    def _on_acse_sent(self, event: Any) -> None:
        """Record a release before the A-RELEASE-RP leaves (pynetdicom fires EVT_RELEASED only
        after sending it), so a peer that sees its release confirmed finds it in SQL."""
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is not None:
            self._end(event, "released")

    def _on_released(self, event: Any) -> None:
        self._end(event, "released")

    def _on_aborted(self, event: Any) -> None:
        self._end(event, "aborted")

    def _on_conn_close(self, event: Any) -> None:
        self._end(event, "closed")

    def _on_finished(self, assoc: Any) -> None:
        """The association's thread ended: end what no event ended (pynetdicom may stop the
        DUL without a closing event when its own ACSE timer and a read deadline meet)."""
        try:
            self._end(_Ended(assoc), "closed")
        except Exception as exc:  # the server's thread must not die with it
            log.error("association_end_failed", error=type(exc).__name__)

    def _message_done(self, event: Any) -> None:
        with self._lock:
            conn = self._conns.get(id(event.assoc))
        if conn is not None and conn.guard is not None:
            conn.guard.message_done()

    def _association_id(self, event: Any) -> int | None:
        with self._lock:
            conn = self._conns.get(id(event.assoc))
        return conn.assoc_id if conn is not None else None

    # DIMSE --------------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        self._message_done(event)
        log.info("echo_answered", calling_ae_title=str(event.assoc.requestor.ae_title).strip())
        return SUCCESS

    def _fail(self, assoc_id: int | None, sop_uid: str | None, sop_class: str | None,
              status: int, reason: str, detail: str) -> int:
        return self.intake.fail(assoc_id, sop_uid, sop_class, status, reason, detail)

    def _on_store(self, event: Any) -> int:
        """Handle one C-STORE request. Never raises."""
        assoc_id = self._association_id(event)
        request = event.request
        sop_uid = _clean_uid(getattr(request, "AffectedSOPInstanceUID", None))
        sop_class = _clean_uid(getattr(request, "AffectedSOPClassUID", None))
        try:
            return self._store(event, assoc_id, sop_uid, sop_class)
        except Exception as exc:  # the handler must answer, whatever happened
            # The exception's text may quote a data set value: keep only its type.
            return self._fail(assoc_id, sop_uid, sop_class, CANNOT_UNDERSTAND, "internal_error",
                              f"unexpected {type(exc).__name__} while storing")
        finally:
            self._message_done(event)

    def _store(self, event: Any, assoc_id: int | None, sop_uid: str | None,
               sop_class: str | None) -> int:
        if not sop_uid or not sop_class:
            return self._fail(assoc_id, sop_uid, sop_class, DATASET_MISMATCH, "missing_uid",
                              "the C-STORE request has no Affected SOP Instance/Class UID")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            return self._fail(assoc_id, sop_uid, sop_class, CANNOT_UNDERSTAND, "unreadable",
                              f"cannot encode the received data set: {type(exc).__name__}")
        return self.intake.receive(
            data, assoc_id=assoc_id, sop_uid=sop_uid, sop_class=sop_class,
            transfer_syntax=str(event.context.transfer_syntax),
            context_class=_clean_uid(getattr(event.context, "abstract_syntax", None))).status


class _Ended:
    """Stands for a pynetdicom event where only its association is needed."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc


def _ae(value: Any) -> str:
    """An AE title as text (pynetdicom gives str; older peers' values may be bytes)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()[:16]
