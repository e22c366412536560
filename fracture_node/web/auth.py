"""Who is asking, and may they: HTTP Basic, the console's session cookie, a trusted proxy's header.

- API and STOW-RS clients send HTTP Basic credentials on every request (argon2 hashes in the
  users file, :mod:`fracture_node.web.users`).
- The console logs in once and then carries a signed session cookie (``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` over HTTPS) that also holds a CSRF token; every state-changing
  request made with the cookie must send that token back (form field ``csrf_token`` or header
  ``X-CSRF-Token``).
- A reverse proxy's header (``[http] proxy_user_header``) names the user only when the request
  comes from an address in ``[http] trusted_proxies``; the user must be in the users file, which
  gives the role.
- Any POST whose ``Origin`` names another site is refused, whatever the credentials (a browser
  that cached Basic credentials cannot be made to act by another site).

Roles: ``viewer`` reads, ``operator`` reads and acts, ``sender`` only stores over STOW-RS.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.concurrency import run_in_threadpool

from fracture_node.config_http import HttpConfig
from fracture_node.errors import LoginRequired
from fracture_node.logs import get_logger
from fracture_node.web.throttle import LoginThrottle
from fracture_node.web.users import UserDirectory

log = get_logger("http")

SESSION_COOKIE = "fracture_node_session"
LOGIN_COOKIE = "fracture_node_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"viewer"}),
    "operator": frozenset({"viewer", "operator"}),
    "sender": frozenset({"sender"}),
}
"""What each role may do: an operator may everything a viewer may."""


@dataclass(frozen=True)
class Principal:
    """An authenticated user and how they proved it."""

    name: str
    role: str
    via: str
    """``basic``, ``session`` or ``proxy``."""
    csrf: str | None = None
    """The session's CSRF token (``session`` only)."""

    def may(self, role: str) -> bool:
        return role in GRANTS.get(self.role, frozenset())


def session_secret(path: Path) -> bytes:
    """The key that signs session cookies: read, or made (32 random bytes, mode 0600)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        return key


class Authenticator:
    """Turns a request into a :class:`Principal` (or None); one per server."""

    def __init__(self, config: HttpConfig, users: UserDirectory, secret: bytes) -> None:
        self.config = config
        self.users = users
        self._signer = URLSafeTimedSerializer(secret, salt="fracture-node-session")
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self.throttle = LoginThrottle(config.login_max_failures, config.login_window_s,
                                      config.login_lockout_s)

    @property
    def secure_cookies(self) -> bool:
        c = self.config
        return c.tls if c.secure_cookies is None else c.secure_cookies

    # Sessions -----------------------------------------------------------------------------
    def new_session(self, name: str) -> tuple[str, str]:
        """A signed cookie value for ``name`` and its CSRF token."""
        csrf = secrets.token_urlsafe(24)
        return self._signer.dumps({"u": name, "c": csrf}), csrf

    def _session(self, value: str) -> Principal | None:
        try:
            data = self._signer.loads(value, max_age=int(self.config.session_timeout_s))
        except BadSignature:
            return None
        user = self.users.get(str(data.get("u", ""))) if isinstance(data, dict) else None
        if user is None:  # removed from the users file since the login
            return None
        return Principal(user.name, user.role, "session", csrf=str(data.get("c", "")))

    # Requests -----------------------------------------------------------------------------
    def _from_trusted_proxy(self, request: Request) -> bool:
        if not self._proxies or request.client is None:
            return False
        try:
            address = ipaddress.ip_address(request.client.host)
        except ValueError:
            return False
        return any(address in net for net in self._proxies)

    def identify(self, request: Request) -> Principal | None:
        """Who sent ``request``: proxy header (trusted address only), Basic, or session."""
        self._reload_users()
        header = self.config.proxy_user_header
        if header and request.headers.get(header) is not None:
            if not self._from_trusted_proxy(request):
                log.warning("proxy_header_refused", peer=_peer(request), header=header)
                return None
            user = self.users.get(request.headers[header].strip())
            return Principal(user.name, user.role, "proxy") if user else None
        auth = request.headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            peer = _peer(request)
            self.refuse_if_locked(peer)
            principal = self._basic(auth[6:].strip())
            if principal is None:
                self.throttle.failed(peer)
            else:
                self.throttle.succeeded(peer)
            return principal
        cookie = request.cookies.get(SESSION_COOKIE)
        return self._session(cookie) if cookie else None

    def _basic(self, token: str) -> Principal | None:
        try:
            name, _, password = base64.b64decode(token, validate=True).decode("utf-8") \
                .partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user = self.users.verify(name, password)
        return Principal(user.name, user.role, "basic") if user else None

    def login(self, name: str, password: str, peer: str = "-") -> Principal | None:
        """The user when the password is right (the console's login form).

        Raises HTTPException 429 while ``peer`` is locked out (:class:`LoginThrottle`).
        """
        self.refuse_if_locked(peer)
        self._reload_users()
        user = self.users.verify(name, password)
        if user is None:
            self.throttle.failed(peer)
            return None
        self.throttle.succeeded(peer)
        return Principal(user.name, user.role, "session")

    def refuse_if_locked(self, peer: str) -> None:
        """HTTP 429 with ``Retry-After`` while ``peer`` is locked out after failed logins."""
        wait = self.throttle.retry_after(peer)
        if wait > 0:
            raise HTTPException(429, "too many failed logins from this address; try again "
                                     f"in {int(wait) + 1} s",
                                headers={"Retry-After": str(int(wait) + 1)})

    def _reload_users(self) -> None:
        try:
            self.users.reload()
        except Exception as exc:  # a bad edit keeps the users last read
            log.error("users_file_unreadable", error=str(exc))


def _peer(request: Request) -> str:
    return request.client.host if request.client else "-"


def same_origin(request: Request) -> bool:
    """False when the request says it comes from a page of another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if not origin:
        return True  # not sent by a browser (API clients), or a same-origin GET-like request
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def csrf_ok(principal: Principal, supplied: str | None) -> bool:
    if principal.via != "session":
        return True  # Basic and proxy requests carry no ambient credential a form could reuse
    return bool(supplied) and bool(principal.csrf) and hmac.compare_digest(
        str(supplied), str(principal.csrf))


def principal_of(request: Request) -> Principal:
    """The request's principal (set by :func:`require_role`)."""
    found = getattr(request.state, "principal", None)
    if not isinstance(found, Principal):
        raise LoginRequired()
    return found


def require_role(role: str) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the principal, who must hold ``role``; for POST, PUT, PATCH and
    DELETE also a same-origin request and, with a session cookie, the CSRF token.

    No credentials: :class:`LoginRequired` (401 for the API, the login page for the console);
    a role that does not grant ``role``: 403.
    """
    async def dependency(request: Request) -> Principal:
        auth: Authenticator = request.app.state.authenticator
        # a Basic password is checked with argon2 (a fifth of a second): off the event loop
        principal = await run_in_threadpool(auth.identify, request)
        if principal is None:
            raise LoginRequired()
        if not principal.may(role):
            log.warning("http_forbidden", user=principal.name, role=principal.role,
                        needed=role, path=request.url.path)
            raise HTTPException(403, f"the {principal.role} role may not do this "
                                     f"({role} needed)")
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            await _check_unsafe(request, principal)
        request.state.principal = principal
        return principal

    return dependency


async def _check_unsafe(request: Request, principal: Principal) -> None:
    if not same_origin(request):
        log.warning("http_cross_origin_refused", user=principal.name, path=request.url.path,
                    origin=request.headers.get("origin"), host=request.headers.get("host"),
                    fetch_site=request.headers.get("sec-fetch-site"))
        raise HTTPException(403, "cross-site request refused")
    supplied = request.headers.get(CSRF_HEADER)
    if supplied is None and principal.via == "session":
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value: Any = form.get(CSRF_FIELD)
            supplied = value if isinstance(value, str) else None
    if not csrf_ok(principal, supplied):
        log.warning("http_csrf_refused", user=principal.name, path=request.url.path)
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")


Viewer = Annotated[Principal, Depends(require_role("viewer"))]
"""A route parameter: the principal, who may read (viewer or operator)."""
Operator = Annotated[Principal, Depends(require_role("operator"))]
"""A route parameter: the principal, who may act (operator)."""
Sender = Annotated[Principal, Depends(require_role("sender"))]
"""A route parameter: the principal, who may store over STOW-RS (sender)."""
