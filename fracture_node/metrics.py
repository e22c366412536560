"""Prometheus metrics and the health endpoint.

One :class:`Metrics` object per process holds its own registry (no module globals). Labels are
reasons, states and destination names: never anything that identifies a patient.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fracture_node.logs import get_logger

log = get_logger("metrics")


class Metrics:
    """The node's metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "fracture_node_"
        self.received = Counter(p + "instances_received",
                                "Instances stored (C-STORE or STOW-RS)", registry=r)
        self.received_bytes = Counter(p + "received_bytes", "Bytes stored (C-STORE or STOW-RS)",
                                      registry=r)
        self.store_failures = Counter(p + "store_failures",
                                      "Objects refused (C-STORE or STOW-RS part)", ["reason"],
                                      registry=r)
        self.associations = Counter(p + "associations", "Associations accepted", registry=r)
        self.associations_rejected = Counter(p + "associations_rejected",
                                             "Associations rejected", ["reason"], registry=r)
        self.processed = Counter(p + "instances_processed", "Instances given a result",
                                 registry=r)
        self.not_processed = Counter(p + "instances_not_processed",
                                     "Instances that could not be processed", ["reason"],
                                     registry=r)
        self.batch_size = Histogram(p + "batch_size", "Instances per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.inference_seconds = Histogram(p + "inference_seconds", "Model time per batch",
                                           registry=r)
        self.decode_seconds = Histogram(p + "decode_seconds", "Decode time per instance",
                                        registry=r)
        self.reports = Counter(p + "reports", "Structured Reports produced", registry=r)
        self.report_failures = Counter(p + "report_failures",
                                       "Failed attempts to report a study", registry=r)
        self.parked_studies = Gauge(p + "parked_studies",
                                    "Studies whose report is parked after repeated failures",
                                    registry=r)
        self.deliveries = Counter(p + "delivery_attempts", "Delivery attempts",
                                  ["destination", "outcome"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Instances waiting for the model",
                                 registry=r)
        self.oldest_unreported_study_seconds = Gauge(
            p + "oldest_unreported_study_seconds",
            "Age of the oldest study with instances that no report covers", registry=r)
        self.dead_deliveries = Gauge(p + "dead_deliveries", "Deliveries in the dead-letter state",
                                     registry=r)
        self.up = Gauge(p + "up", "1 while the node runs", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LimitedHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that closes connections over ``max_connections`` at once."""

    max_connections = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open = 0
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            if self._open >= self.max_connections:
                return False
            self._open += 1
            return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open -= 1


class MetricsServer:
    """Serves ``/metrics`` (Prometheus) and ``/health`` (JSON) over HTTP."""

    port: int
    """The port it listens on (the one asked for, or the one given for port 0)."""

    def __init__(self, metrics: Metrics, health: Callable[[], dict[str, Any]], host: str,
                 port: int, read_timeout_s: float = 10.0, max_connections: int = 16) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout_s  # a client that goes quiet mid-request is closed

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/metrics"):
                    body, ctype, code = metrics.render(), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/health"):
                    state = health()
                    code = 200 if state.get("ok") else 503
                    body, ctype = json.dumps(state).encode(), "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = _LimitedHTTPServer((host, port), Handler)
        self._httpd.max_connections = max_connections
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)
        self.port = int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", port=self.port)

    def stop(self) -> None:
        """Stop serving and close the port (also when it was bound but never served)."""
        if self._thread.is_alive():
            self._httpd.shutdown()  # waits for serve_forever: only when it runs
        self._httpd.server_close()
