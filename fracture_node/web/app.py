"""The FastAPI application: one per node, built from the configuration, routers mounted here.

The routers are given by the caller (:func:`fracture_node.web.server.node_server`:
:mod:`~fracture_node.web.api`, the JSON API under ``/api``, OpenAPI at ``/openapi.json``;
:mod:`~fracture_node.web.console`, the server-rendered console and its login; STOW-RS).
Every answer carries a strict Content-Security-Policy (nothing from another origin, no inline
script) and is not cached.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from fracture_node import __version__
from fracture_node.config import Config
from fracture_node.errors import FractureNodeError, describe
from fracture_node.logs import get_logger
from fracture_node.web.auth import Authenticator, LoginRequired, session_secret
from fracture_node.web.pages import HERE, render
from fracture_node.web.users import UserDirectory

log = get_logger("http")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on the
    # console's own form posts, which the cross-site check must refuse
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class WebContext:
    """What the routers need from the node: its configuration and where its data is."""

    config: Config
    authenticator: Authenticator
    store: Any = None
    """The node's :class:`~fracture_node.db.store.Store` (actions and STOW-RS write through it)."""
    on_change: Callable[[], None] = lambda: None
    """Called after an action made work due (wakes the deliverer and reporter)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Whatever another router needs (e.g. the STOW-RS service)."""
    audit: Any = None
    """The read-only :class:`~fracture_node.db.audit.Audit` of the API and console (made at the
    first read, closed when the server stops)."""

    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
            self.audit = None


def make_authenticator(config: Config) -> Authenticator:
    """The users file and session key of ``config`` (the key is made on first use)."""
    state = config.node.state_dir
    return Authenticator(config.http, UserDirectory(config.http.users_path(state)),
                         session_secret(state / "http-session.key"))


def create_app(context: WebContext, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The node's web application with ``routers`` mounted (static files at ``/static``)."""
    app = FastAPI(title="fracture-node", version=__version__,
                  description="Studies, results, reports, deliveries and the queue of one "
                              "fracture-node; actions need the operator role.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.web = context
    app.state.authenticator = context.authenticator
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired) -> Response:
        if _wants_html(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return JSONResponse({"detail": "authentication required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="fracture-node", '
                                                         'charset="UTF-8"'})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_page(request):
            principal = getattr(request.state, "principal", None)
            return render(request, "error.html", principal, status_code=exc.status_code,
                          code=exc.status_code, detail=exc.detail)
        return await http_exception_handler(request, exc)

    @app.exception_handler(FractureNodeError)
    async def node_error(request: Request, exc: FractureNodeError) -> Response:
        # e.g. the database is down: say so (messages name UIDs, never patient data)
        log.error("http_request_failed", path=request.url.path, error=describe(exc))
        return await http_error(request, StarletteHTTPException(503, str(exc)))

    @app.middleware("http")
    async def security_headers(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/api", "/openapi", "/dicom-web")):
        return False
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def _is_page(request: Request) -> bool:
    """A console request from a browser (errors then come as a page, not JSON)."""
    path = request.url.path
    return not path.startswith(("/api", "/openapi", "/dicom-web", "/static")) and \
        "text/html" in request.headers.get("accept", "")


def context_of(request: Request) -> WebContext:
    web = request.app.state.web
    assert isinstance(web, WebContext)
    return web
