"""The web console: server-rendered pages (Jinja2) over the same queries as the JSON API.

Read-only for the viewer role; the operator also gets the action buttons (each a form that
POSTs with the session's CSRF token). Nothing is fetched from another origin.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from fracture_node.db import actions, browse
from fracture_node.logs import get_logger
from fracture_node.web.api import actor_of, audit_of, parse_bound, study_view
from fracture_node.web.app import context_of
from fracture_node.web.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Operator,
    Viewer,
    same_origin,
)
from fracture_node.web.pages import render

log = get_logger("http")
router = APIRouter(include_in_schema=False)


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
    try:
        # argon2 takes a fifth of a second: off the event loop, so other requests go on
        principal = await run_in_threadpool(auth.login, username, password, _peer(request))
    except HTTPException as exc:
        if exc.status_code != 429:
            raise
        response = _login_again(request, next, f"Too many failed logins from this address: "
                                f"{exc.detail}.", 429)
        response.headers.update(exc.headers or {})
        return response
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
    response = render(request, "login.html", None, status_code=status, next=_safe_next(next_path),
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


PAGE = 50
HOURS = (1, 6, 24, 168)


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, principal: Viewer,
              hours: Annotated[int, Query(ge=1, le=24 * 366)] = 24) -> Response:
    """Activity in the last hours, queue depth, failures, destinations."""
    web = context_of(request)
    audit = audit_of(web)
    now = dt.datetime.now(dt.UTC)
    return render(request, "dashboard.html", principal, hours=hours, choices=HOURS,
                  activity=audit.activity(now - dt.timedelta(hours=hours)),
                  status=audit.status(now),
                  destinations=audit.destinations([d.name for d in web.config.destinations]))


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request, principal: Viewer, state: str | None = None,
            destination: str | None = None, delivery_state: str | None = None,
            since: str | None = None, until: str | None = None,
            offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    """The study list, filtered and paged."""
    filters = {k: v for k, v in (("state", state), ("destination", destination),
                                 ("delivery_state", delivery_state), ("since", since),
                                 ("until", until)) if v}
    if state and state not in browse.STUDY_STATES or \
            delivery_state and delivery_state not in browse.DELIVERY_STATES:
        raise HTTPException(422, "unknown state")
    web = context_of(request)
    page = audit_of(web).studies(browse.StudyFilter(
        since=parse_bound(since, end=False), until=parse_bound(until, end=True), state=state,
        destination=destination, delivery_state=delivery_state), PAGE, offset)

    def link(at: int) -> str:
        return "/studies?" + urlencode({**filters, "offset": at})

    return render(request, "studies.html", principal, page=page, filters=filters,
                  states=browse.STUDY_STATES, delivery_states=browse.DELIVERY_STATES,
                  destinations=[d.name for d in web.config.destinations],
                  previous=link(max(0, offset - PAGE)) if offset else None,
                  next=link(offset + PAGE) if offset + PAGE < page.total else None)


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(request: Request, principal: Viewer, study_uid: str) -> Response:
    """One study: images with probability, status, reason and overlay; reports; deliveries."""
    found = study_view(request, principal, study_uid)
    return render(request, "study.html", principal, study=found,
                  retried=request.query_params.get("done"))


@router.get("/destinations", response_class=HTMLResponse)
def destinations(request: Request, principal: Viewer) -> Response:
    web = context_of(request)
    configured = {d.name: d for d in web.config.destinations}
    return render(request, "destinations.html", principal, configured=configured,
                  destinations=audit_of(web).destinations(list(configured)))


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters(request: Request, principal: Viewer,
                 offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    page = audit_of(context_of(request)).dead_letters(limit=PAGE, offset=offset)
    return render(request, "dead_letters.html", principal, page=page,
                  done=request.query_params.get("done"),
                  previous=f"/dead-letters?offset={max(0, offset - PAGE)}" if offset else None,
                  next=f"/dead-letters?offset={offset + PAGE}"
                  if offset + PAGE < page.total else None)


@router.post("/dead-letters/{delivery_id}/retry")
def retry(request: Request, principal: Operator, delivery_id: int) -> Response:
    """The retry button: queue the dead delivery again (recorded with the user)."""
    web = context_of(request)
    if web.store is None:
        raise HTTPException(503, "this server cannot change state")
    count = actions.retry_delivery(web.store, delivery_id, web.config.delivery.deadline_s,
                                   actor_of(principal, request))
    log.info("delivery_retry_asked", user=principal.name, delivery_id=delivery_id,
             queued=count)
    if count:
        web.on_change()
    return RedirectResponse(f"/dead-letters?done={delivery_id if count else 'none'}",
                            status_code=303)


@router.post("/studies/{study_uid}/reprocess")
def reprocess(request: Request, principal: Operator, study_uid: str) -> Response:
    """The re-process button of a study whose report failed."""
    web = context_of(request)
    if web.store is None:
        raise HTTPException(503, "this server cannot change state")
    count = actions.reprocess_study(web.store, study_uid, actor_of(principal, request))
    log.info("study_reprocess_asked", user=principal.name, study_instance_uid=study_uid,
             due=count)
    if count:
        web.on_change()
    return RedirectResponse(f"/studies/{study_uid}?done={'reprocess' if count else 'none'}",
                            status_code=303)
