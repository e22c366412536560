"""PostgreSQL unavailable for a while: stores are refused with 0xA700 and resume by themselves.

The node reaches PostgreSQL through a small TCP proxy of the test's own; cutting the proxy
closes every live connection and refuses new ones, as a database restart or a network cut does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from structlog.testing import capture_logs

from fracture_node.db import migrate
from fracture_node.db import schema as s
from tests.support import free_port, postgres_database
from tests.support.node import RunningReceiver, node_config

TINY = "CR_cspine_tiny16x16_explicitVR.dcm"


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops everything, ``restore()`` heals."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[RunningReceiver, TcpProxy]]:
    """A receiver whose PostgreSQL connections all pass through a TcpProxy."""
    with postgres_database() as url:
        migrate.upgrade(url)
        proxy = TcpProxy(("127.0.0.1", 5432))
        running = RunningReceiver(node_config(tmp_path, url.replace(":5432/", f":{proxy.port}/")))
        yield running, proxy
        running.stop()
        proxy.cut()


def _push(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="OUTAGE_SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _new(samples_dir: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(samples_dir / TINY)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_database_outage_gives_a700_then_recovers_without_restart(
        proxied: tuple[RunningReceiver, TcpProxy], samples_dir: Path) -> None:
    """While PostgreSQL is cut off every store gets 0xA700 and leaves no file; once it is back,
    stores succeed again on the same running receiver."""
    node, proxy = proxied
    before = _new(samples_dir)
    assert _push(node.port, before) == 0x0000

    proxy.cut()
    during = [_new(samples_dir) for _ in range(3)]
    with capture_logs() as logs:
        statuses = [_push(node.port, ds) for ds in during]
    assert statuses == [0xA700] * 3
    refused = [e for e in logs if e["event"] == "instance_refused"]
    assert {e["reason"] for e in refused} == {"database_unavailable"}
    assert {e["sop_instance_uid"] for e in refused} == {ds.SOPInstanceUID for ds in during}
    assert any(e["event"] == "store_failure_not_recorded" for e in logs)

    proxy.restore()
    after = [_new(samples_dir) for _ in range(3)]
    assert [_push(node.port, ds) for ds in after] == [0x0000] * 3

    rows = {r.sop_instance_uid: r for r in node.store.rows(s.Instance)}
    assert set(rows) == {ds.SOPInstanceUID for ds in [before, *after]}
    files = sorted(p.relative_to(node.spool.root).as_posix()
                   for p in node.spool.root.rglob("*") if p.is_file())
    assert files == sorted(r.spool_path for r in rows.values())  # nothing partial, no orphan
    # The association that was open when the database went away is closed in SQL too (its
    # end is retried), so its study is not held back from reporting.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows_a = node.store.rows(s.Association)
        if all(a.ended_at is not None for a in rows_a):
            break
        time.sleep(0.2)
    assert [a.outcome for a in rows_a if a.ended_at is None] == []
