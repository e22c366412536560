"""A small local DICOMweb origin server whose STOW-RS answer each test chooses.

It parses the request with python-multipart (the parser FastAPI uses), keeps what it received,
checks a bearer token when given one, and answers with what ``answer`` returns for the datasets.
"""

from __future__ import annotations

import contextlib
import io
import json
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom
from python_multipart.multipart import MultipartParser, parse_options_header

Answer = Callable[[list[pydicom.Dataset]], tuple[int, dict[str, Any] | None]]


def item(ds: pydicom.Dataset, reason: int | None = None) -> dict[str, Any]:
    """One DICOM JSON item naming ``ds`` (with a FailureReason when ``reason`` is given)."""
    out: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                           "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}}
    if reason is not None:
        out["00081197"] = {"vr": "US", "Value": [reason]}
    return out


def response(referenced: Sequence[pydicom.Dataset],
             failed: Sequence[tuple[pydicom.Dataset, int]] = ()) -> dict[str, Any]:
    """A PS3.18 store response document in DICOM JSON."""
    out: dict[str, Any] = {}
    if referenced:
        out["00081199"] = {"vr": "SQ", "Value": [item(ds) for ds in referenced]}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [item(ds, r) for ds, r in failed]}
    return out


def all_stored(datasets: list[pydicom.Dataset]) -> tuple[int, dict[str, Any] | None]:
    return 200, response(datasets)


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a ``multipart/related`` body."""
    _, params = parse_options_header(content_type)
    parts: list[bytes] = []
    current = bytearray()

    def on_part_begin() -> None:
        current.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.extend(data[start:end])

    def on_part_end() -> None:
        parts.append(bytes(current))

    parser = MultipartParser(params[b"boundary"], {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end})
    parser.write(body)
    parser.finalize()
    return parts


@dataclass
class FakeStow:
    """The server's state: what it should answer, and what it received."""

    answer: Answer = all_stored
    token: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    https: bool = False

    @property
    def url(self) -> str:
        host = "localhost" if self.https else "127.0.0.1"
        return f"{'https' if self.https else 'http'}://{host}:{self.port}/dicom-web"


@contextlib.contextmanager
def fake_stow(answer: Answer = all_stored, token: str | None = None,
              tls: ssl.SSLContext | None = None) -> Iterator[FakeStow]:
    """Run a :class:`FakeStow` on a free loopback port (over TLS with ``tls``)."""
    state = FakeStow(answer=answer, token=token, https=tls is not None)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            auth = self.headers.get("Authorization")
            if state.token is not None and auth != f"Bearer {state.token}":
                self._send(401, None)
                return
            parts = parse_multipart(self.headers["Content-Type"], body)
            datasets = [pydicom.dcmread(io.BytesIO(p)) for p in parts]
            state.received.append({"path": self.path, "authorization": auth,
                                   "datasets": datasets})
            status, doc = state.answer(datasets)
            self._send(status, doc)

        def _send(self, status: int, doc: dict[str, Any] | None) -> None:
            data = json.dumps(doc).encode() if doc is not None else b""
            self.send_response(status)
            if doc is not None:
                self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
