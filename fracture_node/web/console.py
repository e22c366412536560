"""The web console: server-rendered pages (Jinja2) over the same queries as the JSON API.

Read-only for the viewer role; the operator also gets the action buttons (each a form that
POSTs with the session's CSRF token). Nothing is fetched from another origin.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from fracture_node.logs import get_logger
from fracture_node.web.app import HERE
from fracture_node.web.auth import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Principal,
    Viewer,
    same_origin,
)

log = get_logger("http")
router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))


def render(request: Request, template: str, principal: Principal | None, status: int = 200,
           **values: Any) -> HTMLResponse:
    """A page, with the user and the CSRF token its forms need."""
    values.update(user=principal, csrf_field=CSRF_FIELD,
                  csrf=principal.csrf if principal else None,
                  operator=bool(principal and principal.may("operator")))
    return templates.TemplateResponse(request, template, values, status_code=status)


def _safe_next(target: str | None) -> str:
    """A local path to go to after login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, next=_safe_next(next), login_token=token)
    _set_cookie(request, response, LOGIN_COOKIE, token, max_age=600)
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, username: str = Form(""), password: str = Form(""),
                login_token: str = Form(""), next: str = Form("/")) -> Response:  # noqa: A002
    auth = request.app.state.authenticator
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not same_origin(request) or not cookie or not secrets.compare_digest(cookie, login_token):
        log.warning("login_refused", reason="csrf", peer=_peer(request))
        return _login_again(request, next, "The login form expired; please try again.", 403)
    principal = auth.login(username, password)
    if principal is None:
        log.warning("login_failed", peer=_peer(request))
        return _login_again(request, next, "Wrong user name or password.", 401)
    if not principal.may("viewer"):
        log.warning("login_refused", reason="role", user=principal.name, role=principal.role)
        return _login_again(request, next, "This account may not use the console.", 403)
    value, _csrf = auth.new_session(principal.name)
    response = RedirectResponse(_safe_next(next), status_code=303)
    _set_cookie(request, response, SESSION_COOKIE, value,
                max_age=int(auth.config.session_timeout_s))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    log.info("login", user=principal.name, role=principal.role, peer=_peer(request))
    return response


def _login_again(request: Request, next_path: str, message: str, status: int) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, status=status, next=_safe_next(next_path),
                      login_token=token, error=message)
    _set_cookie(request, response, LOGIN_COOKIE, token, max_age=600)
    return response


@router.post("/logout")
async def logout(principal: Viewer) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    log.info("logout", user=principal.name)
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str,
                max_age: int) -> None:
    secure = request.app.state.authenticator.secure_cookies
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, secure=secure,
                        samesite="strict")


def _peer(request: Request) -> str:
    return request.client.host if request.client else "-"


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request,
                    principal: Viewer) -> Response:
    return render(request, "dashboard.html", principal)
