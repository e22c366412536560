"""The SCP's association bookkeeping: every connection counted and recorded, from first byte to close.

:class:`Associations` holds the pynetdicom event handlers that concern connections and
associations (not the DIMSE services): it installs the receive limits on each new connection
(:mod:`fracture_node.dicom.connections`), checks the caller's address and calling AE title
(A-ASSOCIATE-RJ with the reason, PS3.8 9.3.4), writes one ``associations`` row per connection
(accepted, rejected, aborted, released; refused connections at most once per address and reason
every :data:`REFUSAL_ROW_EVERY_S`), and retries the rows it could not write while the database
was away. :class:`~fracture_node.dicom.scp.Receiver` owns one.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pynetdicom.pdu_primitives import A_RELEASE

from fracture_node.config import Config
from fracture_node.db.store import Store, utcnow
from fracture_node.dicom.connections import ReceiveGuard
from fracture_node.dicom.intake import Intake, peer_allowed
from fracture_node.errors import DatabaseError, describe
from fracture_node.logs import get_logger

log = get_logger("scp")

OBJECT_SLACK_BYTES = 1 << 20
"""How far past ``max_object_bytes`` a message may grow before the association is aborted."""

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




class Associations:
    """Connections and associations of one SCP, as rows in SQL, log lines and metrics.

    Parameters
    ----------
    config, store, metrics:
        The node's.
    intake:
        Records refused objects (:meth:`Intake.fail`).
    running:
        Whether the SCP still serves (a failed row is retried only then).
    """

    def __init__(self, config: Config, store: Store, metrics: Any | None, intake: Intake,
                 running: Callable[[], bool]) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.intake = intake
        self.running = running
        self.node = ""
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scp-refusals")
        self._conns: dict[int, _Connection] = {}
        self._unrecorded_ends: list[tuple[int, str, str | None]] = []
        self._retry_timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._networks = [ipaddress.ip_network(p, strict=False)
                          for p in config.node.allowed_peers]
        self._allowed_aets = {a.strip() for a in config.node.allowed_calling_ae_titles}

    def close(self) -> None:
        """No more retries; one last try at the rows not yet written (what still fails is
        closed as interrupted at the next start)."""
        with self._lock:
            timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.cancel()
        self._recorder.shutdown(wait=False)
        self._record_ends()

    def discard(self) -> None:
        """Bound, never served: nothing to record."""
        self._recorder.shutdown(wait=False)

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
            if not peer_allowed(address, self._networks):
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
            if self._retry_timer is None and self.running():
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


class _Ended:
    """Stands for a pynetdicom event where only its association is needed."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc


def _ae(value: Any) -> str:
    """An AE title as text (pynetdicom gives str; older peers' values may be bytes)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()[:16]
