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

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.utils import make_target

from fracture_node.config import Config, TlsConfig
from fracture_node.db.store import Store
from fracture_node.dicom.associations import Associations
from fracture_node.dicom.connections import ConnectionServer, Handler
from fracture_node.dicom.intake import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    SUCCESS,
    Intake,
)
from fracture_node.dicom.intake import clean_uid as _clean_uid
from fracture_node.errors import ConfigError
from fracture_node.logs import get_logger
from fracture_node.spool import Spool

log = get_logger("scp")




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
        self._tls = server_tls_context(config.tls) if config.tls.enabled else None
        self.book = Associations(config, store, metrics, self.intake,
                                 running=lambda: self._server is not None)
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
            (evt.EVT_CONN_OPEN, self.book._on_conn_open),
            (evt.EVT_REQUESTED, self.book._on_requested),
            (evt.EVT_ACCEPTED, self.book._on_accepted),
            (evt.EVT_REJECTED, self.book._on_rejected),
            (evt.EVT_ACSE_SENT, self.book._on_acse_sent),
            (evt.EVT_RELEASED, self.book._on_released),
            (evt.EVT_ABORTED, self.book._on_aborted),
            (evt.EVT_CONN_CLOSE, self.book._on_conn_close),
        ]
        address = (self.config.node.bind_address, self.config.node.port)
        server = cast(ConnectionServer, self.ae.make_server(address, evt_handlers=handlers,
                                                   server_class=ConnectionServer,
                                                   request_handler=Handler))
        server.tls_context = self._tls
        server.handshake_timeout_s = self.config.node.acse_timeout_s
        server.max_connections = self.config.node.max_connections
        server.max_per_peer = self.config.node.max_connections_per_peer
        server.on_tls_failure = self.book._on_tls_failure
        server.on_refused = self.book._on_refused
        server.on_finished = self.book._on_finished
        self._server = server
        self.node = node_name(self.port)
        self.book.node = self.node

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
            self.book.discard()
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
        self.book.close()

    # DIMSE --------------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        self.book._message_done(event)
        log.info("echo_answered", calling_ae_title=str(event.assoc.requestor.ae_title).strip())
        return SUCCESS

    def _fail(self, assoc_id: int | None, sop_uid: str | None, sop_class: str | None,
              status: int, reason: str, detail: str) -> int:
        return self.intake.fail(assoc_id, sop_uid, sop_class, status, reason, detail)

    def _on_store(self, event: Any) -> int:
        """Handle one C-STORE request. Never raises."""
        assoc_id = self.book._association_id(event)
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
            self.book._message_done(event)

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
