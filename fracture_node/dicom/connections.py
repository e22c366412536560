"""The Storage SCP's connections: how many may be open, and how long a PDU may take to arrive.

pynetdicom's threaded server accepts every connection and reads each PDU with a blocking
``recv``, where none of its timers can fire. :class:`ConnectionServer` counts connections from
the moment they are accepted (in all and per address), moves the TLS handshake off the accept
loop and keeps each connection counted until its association's thread ends;
:class:`ReceiveGuard` gives every PDU a size limit and a deadline, so a peer that sends part of a
PDU and goes quiet is cut off instead of holding its thread and its slot for ever.
"""

from __future__ import annotations

import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from fracture_node.logs import get_logger

log = get_logger("scp")


class Handler(RequestHandler):
    """pynetdicom's request handler, kept until its association's thread ends (so that the
    server counts the connection for as long as it is open)."""

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        self.server.on_finished(assoc)  # type: ignore[attr-defined]


class ConnectionServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with connection limits and the TLS handshake moved off the
    accept loop.

    Connections are counted from the moment they are accepted: over ``max_connections`` in all,
    or ``max_per_peer`` from one address, a new connection is closed at once and reported to
    ``on_refused`` (nothing of it is read). pynetdicom wraps an accepted socket in the accepting
    thread, so one caller that never finishes its handshake would stop every other caller. Here
    the handshake runs in the connection's own thread, limited to ``acse_timeout_s``, and a
    failure is reported to ``on_tls_failure`` (the connection is then closed without an
    association).
    """

    daemon_threads = True
    block_on_close = False  # stop() drains associations itself, within its timeout
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    max_connections: int = 1 << 30
    max_per_peer: int = 1 << 30
    on_tls_failure: Callable[[tuple[str, int], str], None] = staticmethod(lambda a, r: None)
    on_refused: Callable[[tuple[str, int], str, str], None] = staticmethod(
        lambda a, c, r: None)
    on_finished: Callable[[Any], None] = staticmethod(lambda a: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._count_lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._total = 0
        super().__init__(*args, **kwargs)

    @property
    def connections(self) -> int:
        """Connections open now (accepted and not yet closed)."""
        return self._total

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._count_lock:
            if self._total >= self.max_connections:
                code = "too_many_connections"
                reason = f"more than [node] max_connections = {self.max_connections} open"
            elif self._per_peer.get(host, 0) >= self.max_per_peer:
                code = "too_many_connections_from_peer"
                reason = (f"more than [node] max_connections_per_peer = {self.max_per_peer} "
                          "open from this address")
            else:
                self._total += 1
                self._per_peer[host] = self._per_peer.get(host, 0) + 1
                return True
        try:
            self.on_refused(client_address, code, reason)
        except Exception as exc:  # the accept loop must go on
            log.error("connection_refusal_not_recorded", error=type(exc).__name__)
        return False

    def _release(self, client_address: Any) -> None:
        host = str(client_address[0])
        with self._count_lock:
            self._total -= 1
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls_context is not None:
                try:
                    request.settimeout(self.handshake_timeout_s)
                    request = self.tls_context.wrap_socket(request, server_side=True)
                    request.settimeout(None)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    reason = getattr(exc, "reason", None) or type(exc).__name__
                    try:
                        self.on_tls_failure(client_address, str(reason))
                    finally:
                        self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address)


class ReceiveGuard:
    """Limits what one connection may send and how long it may take, checked as bytes arrive.

    Installed over the association socket's ``recv``: the DUL reads each PDU as a 6-byte
    header and then its declared length, so a declared length over the limit is refused
    before any of it is held in memory. Each PDU must also arrive whole by a deadline: the
    first one (the A-ASSOCIATE-RQ) within ``acse_timeout_s`` of the connection opening, every
    later one within ``pdu_timeout_s`` of its first byte plus one second per 8 KiB it declares,
    and each message (the P-DATA PDUs up to the end of a C-STORE or C-ECHO) within
    ``pdu_timeout_s`` of its first PDU plus one second per 8 KiB received (whole PDUs trickled one
    at a time would otherwise keep an association for ever).
    Without it a peer that sends part of a PDU and goes quiet holds its thread and its slot for
    ever (the DUL blocks in ``recv``, where none of pynetdicom's timers can fire). A refusal or
    a missed deadline closes the connection (pynetdicom treats it as a transport failure: the
    association ends as aborted) and is kept in ``refused`` for the record.
    """

    BYTES_PER_SECOND = 8192
    """The slowest rate a PDU or a message may arrive at, past the first ``pdu_timeout_s``
    (64 kbit/s: a slow teleradiology link still gets its 10 MB radiograph through)."""

    def __init__(self, sock: Any, max_pdu: int, max_message: int,
                 request_timeout_s: float = 30.0, pdu_timeout_s: float = 60.0) -> None:
        self.sock = sock
        self.max_pdu = max_pdu
        self.max_message = max_message
        self.request_timeout_s = request_timeout_s
        self.pdu_timeout_s = pdu_timeout_s
        self.opened = time.monotonic()
        self.message_bytes = 0
        self.bytes_received = 0
        self.pdus = 0
        self.refused: str | None = None
        self.stalled = False
        self._pdu_type = 0
        self._header_next = True
        self._deadline = 0.0
        self._message_started = 0.0
        self._timeout_name = ""

    def __call__(self, nr_bytes: int) -> bytearray:
        # The DUL alternates: a 6-byte header read, then one read of the declared length.
        if not self._header_next:
            self._header_next = True
            body = self._read(nr_bytes, "bytes of a PDU")
            self.pdus += 1
            return body
        if self.pdus == 0:
            self._deadline = self.opened + self.request_timeout_s
            self._timeout_name = "[node] acse_timeout_s"
        else:
            self._deadline = time.monotonic() + self.pdu_timeout_s
            self._timeout_name = "[node] dimse_timeout_s"
        header = self._read(nr_bytes, "bytes of a PDU header")
        if nr_bytes == 6 and len(header) == 6:
            self._header_next = False
            self._pdu_type, _, length = struct.unpack(">BBL", bytes(header))
            self._check(length)
            if self.pdus > 0:
                self._deadline += length / self.BYTES_PER_SECOND
        return header

    def _read(self, nr_bytes: int, what: str) -> bytearray:
        """Read ``nr_bytes`` (fewer when the peer closes) by the current deadline."""
        raw = self.sock.socket
        if raw is None:
            raise OSError("the connection is closed")
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                raw.settimeout(left)
                chunk = raw.recv(min(nr_bytes - len(data), 65536))
                if not chunk:
                    break
                data.extend(chunk)
                self.bytes_received += len(chunk)
        except TimeoutError:
            self.stalled = True
            self.refused = (f"stalled: {len(data)} of {nr_bytes} {what} arrived by the deadline "
                            f"({self._timeout_name})")
            raise
        finally:
            try:
                raw.settimeout(None)
            except OSError:
                pass
        return data

    def _check(self, length: int) -> None:
        if self._pdu_type == 0x04:  # P-DATA-TF
            if self.max_pdu and length > self.max_pdu + 6:
                self.refused = (f"a P-DATA PDU of {length} bytes is longer than "
                                f"[node] max_pdu_bytes = {self.max_pdu}")
            else:
                now = time.monotonic()
                if self.message_bytes == 0:
                    self._message_started = now
                self.message_bytes += length
                allowed_s = self.pdu_timeout_s + self.message_bytes / self.BYTES_PER_SECOND
                if self.message_bytes > self.max_message:
                    self.refused = (f"a message grew past {self.max_message} bytes "
                                    "([node] max_object_bytes + 1 MiB)")
                elif now - self._message_started > allowed_s:
                    self.stalled = True  # whole PDUs, each in time, but a trickle
                    self.refused = (f"stalled: a message of {self.message_bytes} bytes so far "
                                    f"took {now - self._message_started:.0f} s "
                                    f"([node] dimse_timeout_s + 1 s per "
                                    f"{self.BYTES_PER_SECOND // 1024} KiB)")
        elif length > (1 << 20):  # association, release and abort PDUs are small
            self.refused = f"a PDU of type 0x{self._pdu_type:02X} declares {length} bytes"
        if self.refused:
            raise OSError(self.refused)

    def message_done(self) -> None:
        self.message_bytes = 0


__all__ = ["ConnectionServer", "Handler", "ReceiveGuard"]
