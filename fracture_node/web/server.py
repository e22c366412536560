"""The HTTP server: uvicorn serving the FastAPI app in a thread of the daemon.

The port is bound when the server is built (before the model loads, like the SCP and the metrics
port), so a port that is taken stops start-up at once; requests wait in the backlog until
:meth:`HttpServer.start`. :meth:`HttpServer.stop` lets requests in flight finish (up to a
timeout) and closes the port.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

import uvicorn

from fracture_node.config import Config
from fracture_node.errors import ConfigError
from fracture_node.logs import get_logger

log = get_logger("http")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's SSL context (TLS 1.2 or later, mutual when configured), or None for HTTP."""
    http = config.http
    if not http.tls:
        return None
    cert, key, ca = http.tls_files(config.tls.certificate, config.tls.private_key,
                                   config.tls.ca_certificates)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if ca is not None:
            ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config: [http] certificate/private_key/ca_certificates cannot be loaded "
            f"({type(exc).__name__}: {exc}); fix: give PEM files, the key matching the "
            "certificate and not encrypted") from exc
    if http.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); raises OSError when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the daemon owns SIGTERM) and with a started flag."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpServer:
    """Serves an ASGI app on a port bound at construction."""

    port: int
    """The port it listens on (the one asked for, or the one given for port 0)."""

    def __init__(self, app: Any, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None,
                 graceful_timeout_s: int = 10, on_stop: Any = None) -> None:
        self._sock = bind_socket(host, port)
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self.tls = ssl_context is not None
        self._on_stop = on_stop

        def context_factory(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
            assert ssl_context is not None
            return ssl_context

        cfg = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=graceful_timeout_s,
            limit_concurrency=64, timeout_keep_alive=5,
            ssl_context_factory=context_factory if ssl_context is not None else None)
        self._server = _Server(cfg)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception as exc:  # the daemon keeps running; the console is gone
            log.error("http_server_failed", error=f"{type(exc).__name__}: {exc}")

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve; returns once uvicorn accepts requests."""
        self._thread.start()
        if not self._server.ready.wait(timeout_s):
            log.warning("http_start_slow", timeout_s=timeout_s)
        log.info("http_listening", host=self.host, port=self.port, tls=self.tls)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self, timeout_s: float = 15.0) -> None:
        """Finish requests in flight, stop, close the port (also when never started)."""
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2.0)
        self._sock.close()
        if self._on_stop is not None:
            self._on_stop()
        log.info("http_stopped", port=self.port)



def node_server(config: Config, store: Any, on_change: Any = None,
                routers: Any = (), extra: dict[str, Any] | None = None) -> HttpServer:
    """The node's HTTP server for ``config``, bound (not yet serving); raises OSError when the
    port is taken and :class:`ConfigError` for TLS files that cannot be loaded."""
    from fracture_node.web import api, console
    from fracture_node.web.app import WebContext, create_app, make_authenticator

    context = WebContext(config=config, authenticator=make_authenticator(config), store=store,
                         on_change=on_change or (lambda: None), extra=dict(extra or {}))
    if not len(context.authenticator.users):
        log.warning("http_no_users", users_file=str(context.authenticator.users.path),
                    fix="add one with 'fracture-node user add NAME --role operator'")
    app = create_app(context, [api.router, console.router, *routers])
    return HttpServer(app, config.http.host, config.http.port,
                      ssl_context=tls_context(config), on_stop=context.close)
