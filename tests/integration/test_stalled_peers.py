"""Peers that hold a connection without using it: partial PDUs, silence, too many connections.

Probes are raw sockets (from other loopback addresses, 127.0.0.2 and up, so that the address
limits can be told apart from the legitimate sender on 127.0.0.1); the legitimate senders are
pynetdicom and DCMTK storescu.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from fracture_node import logs
from fracture_node.db import schema as s
from tests.support.node import SAMPLE as TINY
from tests.support.scp import Pki, client_context, tls_config


def _raw(port: int, source: str, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if payload:
        sock.sendall(payload)
    return sock


def _half_request() -> bytes:
    """The first half of an A-ASSOCIATE-RQ that declares 200 bytes."""
    body = struct.pack(">HH", 1, 0) + b"FRACTURE_NODE   " + b"STALLER         " + b"\x00" * 32
    return b"\x01\x00" + struct.pack(">L", 200) + body[:60]


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the node closes ``sock`` (fails if it stays open ``seconds``)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s") from None
    return time.monotonic() - start


def _associate(port: int, aet: str = "TEST_SCU", contexts: tuple[str, ...] = (Verification,),
               tls: ssl.SSLContext | None = None) -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE",
                        tls_args=(tls, "localhost") if tls is not None else None)


def _stalled_rows(node: Any, count: int, timeout: float = 15.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = node.store.rows(s.Association, s.Association.outcome == "aborted")
        if len(rows) >= count:
            break
        time.sleep(0.1)
    return rows


def _ended_rows(node: Any, aet: str, start: float, within: float) -> list[Any]:
    """The ended associations of ``aet``, polled until one shows or ``within`` s after ``start``."""
    rows: list[Any] = []
    while time.monotonic() - start < within:
        rows = node.store.rows(s.Association, s.Association.calling_ae_title == aet,
                               s.Association.ended_at.is_not(None))
        if rows:
            break
        time.sleep(0.05)
    return rows


def test_ten_stalled_connections_do_not_lock_out_storescu(scp_node: Any,
                                                          samples_dir: Path) -> None:
    """Ten peers sending 3 header bytes or half a request: storescu still stores, at once."""
    node = scp_node(acse_timeout_s=6.0)  # max_associations stays 10
    stallers = [_raw(node.port, f"127.0.0.{2 + i}", b"\x01\x00\x00" if i % 2 else
                     _half_request()) for i in range(10)]
    time.sleep(0.5)  # every staller is in the node's recv
    start = time.monotonic()
    proc = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1", str(node.port),
                           str(samples_dir / TINY)], capture_output=True, text=True, timeout=60)
    served_s = time.monotonic() - start
    print(f"\nstorescu beside 10 stalled peers: served in {served_s:.2f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_s < 5.0, served_s  # before any staller was cut: they do not hold its slot
    assert len(node.store.rows(s.Instance)) == 1
    for sock in stallers:
        _closed_within(sock, 10.0)
        sock.close()
    rows = _stalled_rows(node, 10)
    assert len(rows) == 10
    assert all(r.reason.startswith("stalled") and "acse_timeout_s" in r.reason for r in rows)
    assert sorted(r.peer_address for r in rows) == sorted(f"127.0.0.{2 + i}" for i in range(10))
    assert all(r.ended_at is not None for r in rows)
    assert node.rejected("stalled_connection") == 10


def test_stalled_request_is_cut_at_acse_timeout_from_connection(scp_node: Any) -> None:
    """Half an A-ASSOCIATE-RQ, then silence: closed about acse_timeout_s after connecting."""
    node = scp_node(acse_timeout_s=2.0)
    sock = _raw(node.port, "127.0.0.2", _half_request())
    took = _closed_within(sock, 8.0)
    sock.close()
    assert 1.5 < took < 4.0, took
    [row] = _stalled_rows(node, 1)
    assert row.reason == "stalled: 60 of 200 bytes of a PDU arrived by the deadline " \
                         "([node] acse_timeout_s)"


def test_silent_connection_is_closed_and_recorded(scp_node: Any) -> None:
    """A connection that sends nothing is closed at acse_timeout_s and leaves a row."""
    node = scp_node(acse_timeout_s=2.0)
    sock = _raw(node.port, "127.0.0.3")
    took = _closed_within(sock, 8.0)
    sock.close()
    assert took < 4.0
    [row] = _stalled_rows(node, 1)
    assert row.peer_address == "127.0.0.3" and row.reason.startswith("stalled: no A-ASSOCIATE-RQ")


def test_connect_and_close_leaves_no_row(scp_node: Any) -> None:
    """A port check (connect, close without a byte) is not an association: no row."""
    node = scp_node()
    _raw(node.port, "127.0.0.2").close()
    time.sleep(1.0)
    assoc = _associate(node.port)
    assert assoc.is_established
    assoc.release()
    rows = node.store.rows(s.Association)
    assert [r.outcome for r in rows] == ["released"]


def test_partial_p_data_after_association_is_cut(scp_node: Any) -> None:
    """After a good association, part of a P-DATA PDU and silence: cut at dimse_timeout_s."""
    node = scp_node(dimse_timeout_s=2.0)
    assoc = _associate(node.port, aet="HALF_PDATA")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    start = time.monotonic()
    raw.sendall(b"\x04\x00" + struct.pack(">L", 1000) + b"\x00" * 100)
    rows = _ended_rows(node, "HALF_PDATA", start, 15)
    took = time.monotonic() - start
    [row] = rows
    assert row.outcome == "aborted"
    assert row.reason.startswith("stalled: 100 of 1000 bytes") and "dimse_timeout_s" in row.reason
    assert 1.5 < took < 5.0, took
    assoc.abort()
    again = _associate(node.port)
    assert again.is_established
    again.release()


def test_slow_drip_of_a_pdu_is_cut_at_its_deadline(scp_node: Any) -> None:
    """One byte a second keeps no PDU alive: the deadline counts from the PDU's first byte."""
    node = scp_node(dimse_timeout_s=2.0)
    assoc = _associate(node.port, aet="DRIP")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00" + struct.pack(">L", 100))
    start = time.monotonic()
    try:
        for _ in range(10):  # 10 bytes over 5 s, more than the 2 s deadline
            time.sleep(0.5)
            raw.sendall(b"\x00")
    except OSError:
        pass  # the node closed the connection
    rows = _ended_rows(node, "DRIP", start, 10)
    assert rows and rows[0].outcome == "aborted" and rows[0].reason.startswith("stalled")
    cut_after = (rows[0].ended_at - rows[0].started_at).total_seconds()
    assert cut_after < 4.5, cut_after  # the deadline did not move with each byte
    assoc.abort()


def test_message_trickled_in_whole_pdus_is_cut(scp_node: Any) -> None:
    """Whole, valid P-DATA PDUs of a C-STORE command, one every half second, each in time:
    the message as a whole misses its deadline and the association is cut."""
    node = scp_node(dimse_timeout_s=2.0)
    assoc = _associate(node.port, aet="TRICKLE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket
    fragment = b"\x00" * 8  # part of a command set, never the last fragment
    pdv = struct.pack(">LBB", 2 + len(fragment), context_id, 0x01) + fragment
    pdu = b"\x04\x00" + struct.pack(">L", len(pdv)) + pdv
    start = time.monotonic()
    try:
        for _ in range(16):  # 8 s of trickle against a 2 s (+ 1 s per 8 KiB) deadline
            raw.sendall(pdu)
            time.sleep(0.5)
    except OSError:
        pass
    rows = _ended_rows(node, "TRICKLE", start, 12)
    assert rows and rows[0].outcome == "aborted"
    assert rows[0].reason.startswith("stalled: a message of") and "8 KiB" in rows[0].reason
    assert (rows[0].ended_at - rows[0].started_at).total_seconds() < 5.0
    assoc.abort()


def test_stall_after_tls_handshake_is_cut_and_recorded(scp_node: Any, pki: Pki) -> None:
    """A TLS handshake, then three bytes of a PDU header and silence: closed and recorded."""
    node = scp_node(tls=tls_config(pki), acse_timeout_s=2.0)
    raw = _raw(node.port, "127.0.0.4")
    ctx = client_context(pki, pki.client_cert, pki.client_key)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"\x01\x00\x00")
    start = time.monotonic()
    tls.settimeout(8.0)
    try:
        assert tls.recv(4096) == b""
    except (ConnectionResetError, ssl.SSLError):
        pass
    assert time.monotonic() - start < 5.0
    tls.close()
    [row] = _stalled_rows(node, 1)
    assert row.peer_address == "127.0.0.4" and row.reason.startswith("stalled: 3 of 6 bytes")
    good = _associate(node.port, tls=client_context(pki, pki.client_cert, pki.client_key))
    assert good.is_established
    good.release()


def test_one_address_over_its_share_is_refused_and_others_are_served(scp_node: Any) -> None:
    """Past max_connections_per_peer from one address, its next connection is closed and
    recorded while another address still associates."""
    node = scp_node(max_connections_per_peer=3, acse_timeout_s=30.0)
    held = [_raw(node.port, "127.0.0.2", b"\x01") for _ in range(3)]
    time.sleep(0.3)
    extra = _raw(node.port, "127.0.0.2")
    assert _closed_within(extra, 3.0) < 2.0
    extra.close()
    [row] = node.wait_rows(s.Association.outcome == "rejected")
    assert row.peer_address == "127.0.0.2" and "max_connections_per_peer" in row.reason
    assert node.rejected("too_many_connections_from_peer") == 1
    assoc = _associate(node.port)
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    for sock in held:
        sock.close()


def test_a_flood_of_refused_connections_is_counted_not_written_row_by_row(scp_node: Any
                                                                          ) -> None:
    """Fifty connections over one address's share: every one counted in the metric, one row
    in SQL, and the node still serves another address at once."""
    node = scp_node(max_connections_per_peer=2, acse_timeout_s=30.0)
    held = [_raw(node.port, "127.0.0.2", b"\x01") for _ in range(2)]
    time.sleep(0.3)
    for _ in range(50):
        extra = _raw(node.port, "127.0.0.2")
        _closed_within(extra, 3.0)
        extra.close()
    assoc = _associate(node.port)
    assert assoc.is_established
    assoc.release()
    time.sleep(0.5)
    rows = node.store.rows(s.Association, s.Association.outcome == "rejected")
    assert len(rows) == 1 and rows[0].peer_address == "127.0.0.2"
    assert node.rejected("too_many_connections_from_peer") == 50
    for sock in held:
        sock.close()


def test_connections_over_max_connections_are_refused(scp_node: Any) -> None:
    """Past max_connections in all, a new connection is closed at once and recorded."""
    node = scp_node(max_connections=4, max_connections_per_peer=4, acse_timeout_s=30.0)
    held = [_raw(node.port, f"127.0.0.{2 + i}", b"\x01") for i in range(4)]
    time.sleep(0.3)
    assoc = _associate(node.port, aet="LATE")
    assert not assoc.is_established
    [row] = node.wait_rows(s.Association.outcome == "rejected")
    assert row.peer_address == "127.0.0.1" and "max_connections" in row.reason
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # closed connections give their slots back
        again = _associate(node.port)
        if again.is_established:
            again.release()
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no slot came back after the held connections closed")


def test_stalled_requests_do_not_count_as_associations(scp_node: Any) -> None:
    """With max_associations = 1, a connection sending its request slowly does not take the
    one association slot."""
    node = scp_node(max_associations=1, acse_timeout_s=30.0)
    staller = _raw(node.port, "127.0.0.2", _half_request())
    time.sleep(0.3)
    assoc = _associate(node.port)
    assert assoc.is_established
    assoc.release()
    staller.close()


def test_storescu_store_is_unaffected_by_receive_deadlines(scp_node: Any,
                                                           samples_dir: Path) -> None:
    """A whole object in many PDUs, over a node with short deadlines, is stored intact."""
    node = scp_node(acse_timeout_s=2.0, dimse_timeout_s=2.0, max_pdu_bytes=4096)
    ds = pydicom.dcmread(samples_dir / TINY)
    assoc = _associate(node.port, contexts=(ds.SOPClassUID,))
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    [row] = node.store.rows(s.Instance)
    assert row.sop_instance_uid == ds.SOPInstanceUID


def test_metrics_port_closes_a_stalled_request_and_serves_others() -> None:
    """Half an HTTP request line, then silence, on the metrics port: closed at its read
    timeout, while /health answers meanwhile; connections past the cap are closed at once."""
    from fracture_node.metrics import Metrics, MetricsServer

    server = MetricsServer(Metrics(), lambda: {"ok": True}, "127.0.0.1", 0, read_timeout_s=4.0,
                           max_connections=3)
    server.start()
    try:
        staller = _raw(server.port, "127.0.0.2", b"GET /hea")
        second = _raw(server.port, "127.0.0.2", b"GET /hea")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as rsp:
            assert rsp.status == 200
        time.sleep(0.5)  # the /health connection's thread has ended
        third = _raw(server.port, "127.0.0.2", b"GET /hea")
        over = _raw(server.port, "127.0.0.2")
        assert _closed_within(over, 2.0) < 1.0  # fourth at once: the cap is 3
        for sock in (staller, second, third):
            assert _closed_within(sock, 8.0) < 6.0
            sock.close()
        over.close()
    finally:
        server.stop()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The node's JSON logging into a buffer (restored afterwards)."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure("info", json=True, stream=buf)
    yield buf
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_library_errors_from_bad_peers_are_bounded_json_lines(scp_node: Any,
                                                              json_log: io.StringIO) -> None:
    """A stalled peer and a 60 KB garbage request make pynetdicom log errors: every line is
    JSON, and none repeats more than a bounded part of what the peer sent."""
    node = scp_node(acse_timeout_s=2.0)
    staller = _raw(node.port, "127.0.0.2", b"\x01\x00\x00")
    garbage = b"\x01\x00" + struct.pack(">L", 60_000) + b"PHI-LIKE-PEER-TEXT " * 3158
    bad = _raw(node.port, "127.0.0.3", garbage[:60_006])
    for sock in (staller, bad):
        _closed_within(sock, 8.0)
        sock.close()
    _stalled_rows(node, 2)
    lines = [line for line in json_log.getvalue().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # fails on any plain-text line
    assert any(e["event"] == "library_log" and e["logger"].startswith("pynetdicom")
               for e in events)
    assert max(len(line) for line in lines) < 2000
    assert all(line.count("PHI-LIKE-PEER-TEXT") <= 16 for line in lines)
