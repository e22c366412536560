"""Who may use the HTTP server: Basic, console login, CSRF, roles, proxy header, TLS (real
uvicorn on loopback, real argon2 hashes)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fracture_node.config import Config, TlsConfig
from fracture_node.db import migrate
from fracture_node.errors import ConfigError
from fracture_node.web.auth import SESSION_COOKIE
from fracture_node.web.server import HttpServer
from tests.support.scp import Pki
from tests.support.web import PASSWORDS, basic, csrf_of, login, serving, web_config


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpServer]:
    """The HTTP server of a node with an empty database and the three test users."""
    config = web_config(tmp_path)
    migrate.upgrade(config.database_url)
    with serving(config) as srv:
        yield srv


@pytest.fixture
def client(server: HttpServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, follow_redirects=False) as c:
        yield c


def test_basic_with_right_password_names_user_and_role(client: httpx.Client) -> None:
    """A viewer's Basic credentials are accepted and the API names the user and role."""
    answer = client.get("/api/whoami", auth=basic("vera"))
    assert answer.status_code == 200
    assert answer.json() == {"user": "vera", "role": "viewer", "via": "basic"}


def test_wrong_password_is_refused(client: httpx.Client) -> None:
    """A known user with a wrong password gets 401 with a Basic challenge."""
    answer = client.get("/api/whoami", auth=("vera", "not-her-password"))
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Basic")


def test_unknown_user_is_refused(client: httpx.Client) -> None:
    """A user who is not in the users file gets 401."""
    assert client.get("/api/whoami", auth=("mallory", "whatever-pass")).status_code == 401


def test_no_credentials_is_refused(client: httpx.Client) -> None:
    """The API without credentials answers 401, never data."""
    assert client.get("/api/whoami").status_code == 401


def test_role_that_does_not_grant_reading_is_refused(client: httpx.Client) -> None:
    """The sender role (STOW-RS only) may not read the API: 403."""
    assert client.get("/api/whoami", auth=basic("sam")).status_code == 403


def test_console_without_login_redirects_to_login(client: httpx.Client) -> None:
    """A browser asking for the dashboard without a session is sent to the login page."""
    answer = client.get("/", headers={"Accept": "text/html"})
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/login?next=")


def test_console_login_sets_a_strict_http_only_session(client: httpx.Client) -> None:
    """Logging in through the form sets an HttpOnly, SameSite=Strict session cookie."""
    answer = login(client, "vera")
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"].lower()
    assert "fracture_node_session=" in cookie
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/whoami").json()["via"] == "session"


def test_console_login_with_wrong_password_is_refused(client: httpx.Client) -> None:
    """A wrong password on the login form gives no session cookie and says so."""
    answer = login(client, "vera", password="wrong-password")
    assert answer.status_code == 401
    assert "Wrong user name or password" in answer.text
    assert "fracture_node_session" not in client.cookies


def test_login_without_the_forms_token_is_refused(client: httpx.Client) -> None:
    """A login POST that does not carry the login form's token (login CSRF) is refused."""
    answer = client.post("/login", data={"username": "vera", "password": "viewer-pass-1",
                                         "login_token": "forged", "next": "/"})
    assert answer.status_code == 403
    assert "fracture_node_session" not in client.cookies


def test_post_with_session_but_without_csrf_token_is_refused(client: httpx.Client) -> None:
    """A state-changing POST carried only by the session cookie, without the CSRF token: 403."""
    login(client, "vera")
    answer = client.post("/logout", data={})
    assert answer.status_code == 403
    assert "CSRF" in answer.json()["detail"]


def test_post_with_session_and_csrf_token_is_accepted(client: httpx.Client) -> None:
    """The same POST with the page's CSRF token goes through (logout)."""
    login(client, "vera")
    token = csrf_of(client.get("/", headers={"Accept": "text/html"}).text)
    answer = client.post("/logout", data={"csrf_token": token})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login"


def test_post_from_another_site_is_refused_even_with_basic(client: httpx.Client) -> None:
    """A POST whose Origin is another site is refused whatever the credentials."""
    answer = client.post("/logout", auth=basic("otto"),
                         headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403


def test_pages_forbid_framing_and_foreign_content(client: httpx.Client) -> None:
    """Every answer carries a self-only Content-Security-Policy and refuses framing."""
    answer = client.get("/login")
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"


def test_proxy_header_from_an_untrusted_address_is_refused(tmp_path: Path) -> None:
    """The proxy's user header is not believed from an address outside trusted_proxies."""
    config = web_config(tmp_path, trusted_proxies=("10.9.9.9",),
                        proxy_user_header="X-Remote-User")
    with serving(config) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/api/whoami", headers={"X-Remote-User": "otto"}).status_code == 401


def test_proxy_header_from_a_trusted_address_names_the_user(tmp_path: Path) -> None:
    """From a trusted proxy address, the header names a user of the users file (and its role)."""
    config = web_config(tmp_path, trusted_proxies=("127.0.0.1",),
                        proxy_user_header="X-Remote-User")
    with serving(config) as srv, httpx.Client(base_url=srv.url) as c:
        answer = c.get("/api/whoami", headers={"X-Remote-User": "otto"})
        assert answer.json() == {"user": "otto", "role": "operator", "via": "proxy"}
        assert c.get("/api/whoami", headers={"X-Remote-User": "nobody"}).status_code == 401


def test_proxy_header_needs_trusted_proxies() -> None:
    """A proxy header without trusted proxy addresses is a configuration error."""
    with pytest.raises(ConfigError, match="go together"):
        web_config(Path("/nonexistent"), proxy_user_header="X-Remote-User")


def test_user_added_while_serving_can_log_in(server: HttpServer, client: httpx.Client,
                                              tmp_path: Path) -> None:
    """A user added to the file while the server runs is accepted at the next request."""
    from fracture_node.web.users import add_user, hash_password

    add_user(tmp_path / "users", "nina", "viewer", hash_password("nina-pass-123"))
    assert client.get("/api/whoami", auth=("nina", "nina-pass-123")).status_code == 200


def _tls_config(tmp_path: Path, certs: Pki, **http: object) -> Config:
    base = Config(tls=TlsConfig(certificate=certs.server_cert, private_key=certs.server_key,
                                ca_certificates=certs.ca))
    return web_config(tmp_path, base, tls=True, **http)


def test_https_with_the_tls_sections_certificate(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    """With [http] tls on, the server speaks HTTPS with the [tls] certificate."""
    with serving(_tls_config(tmp_path, pki)) as srv:
        assert srv.url.startswith("https://")
        with httpx.Client(base_url=srv.url, verify=ssl.create_default_context(
                cafile=str(pki.ca))) as c:
            assert c.get("/api/whoami", auth=basic("vera")).status_code == 200


def test_mutual_tls_refuses_a_client_without_certificate(tmp_path: Path,
                                                         pki: Pki) -> None:  # noqa: F811
    """With require_client_certificate, a client without a certificate fails the handshake."""
    with serving(_tls_config(tmp_path, pki, require_client_certificate=True)) as srv:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(base_url=srv.url, verify=ctx) as c, pytest.raises(httpx.HTTPError):
            c.get("/api/whoami", auth=basic("vera"))
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        with httpx.Client(base_url=srv.url, verify=ctx) as c:
            assert c.get("/api/whoami", auth=basic("vera")).status_code == 200


def test_daemon_stops_at_start_when_the_http_port_is_taken(tmp_path: Path) -> None:
    """A taken [http] port stops start-up before the model loads, naming the setting."""
    import dataclasses
    import socket

    from fracture_node.daemon import Daemon
    from fracture_node.errors import StartupError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    base = web_config(tmp_path / "state")
    config = dataclasses.replace(
        base, http=dataclasses.replace(base.http, port=holder.getsockname()[1]),
        metrics=dataclasses.replace(base.metrics, enabled=False),
        model=dataclasses.replace(base.model, path=tmp_path / "no-model.pt"))
    daemon = Daemon(config)
    try:
        with pytest.raises(StartupError, match=r"\[http\] port"):
            daemon.start()
    finally:
        daemon.stop(timeout_s=5)
        holder.close()


def test_missing_database_is_a_clear_503(tmp_path: Path) -> None:
    """With no database to read, the API answers 503 saying so (not a bare 500)."""
    with serving(web_config(tmp_path)) as srv, httpx.Client(base_url=srv.url) as c:
        answer = c.get("/api/status", auth=basic("vera"))
    assert answer.status_code == 503
    assert "no database file" in answer.json()["detail"]


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[HttpServer]:
    """A server that locks an address out for 1.5 s after 3 wrong passwords."""
    config = web_config(tmp_path, login_max_failures=3, login_window_s=60.0,
                        login_lockout_s=1.5)
    migrate.upgrade(config.database_url)
    with serving(config) as srv:
        yield srv


def test_repeated_wrong_passwords_lock_the_address_out(strict_server: HttpServer) -> None:
    """After 3 wrong Basic passwords even the right one gets 429 with Retry-After, until the
    lock-out ends; then the right one works."""
    with httpx.Client(base_url=strict_server.url) as c:
        for _ in range(3):
            assert c.get("/api/whoami", auth=("vera", "guess")).status_code == 401
        locked = c.get("/api/whoami", auth=basic("vera"))
        assert locked.status_code == 429
        assert 1 <= int(locked.headers["retry-after"]) <= 2
        assert c.get("/api/whoami", auth=("otto", "guess")).status_code == 429  # any user
        time.sleep(1.6)
        assert c.get("/api/whoami", auth=basic("vera")).status_code == 200


def test_a_right_password_clears_the_failure_count(strict_server: HttpServer) -> None:
    """Two wrong passwords, a right one, two wrong again: never locked out."""
    with httpx.Client(base_url=strict_server.url) as c:
        for password in ("guess", "guess", PASSWORDS["vera"], "guess", "guess"):
            c.get("/api/whoami", auth=("vera", password))
        assert c.get("/api/whoami", auth=basic("vera")).status_code == 200


def test_the_console_login_form_is_locked_out_too(strict_server: HttpServer) -> None:
    """Three wrong passwords on the login form, then the login page answers 429 and says why,
    and a session is not created even with the right password."""
    with httpx.Client(base_url=strict_server.url, follow_redirects=False) as c:
        for _ in range(3):
            assert login(c, "vera", "guess").status_code == 401
        page = login(c, "vera")
        assert page.status_code == 429 and "Too many failed logins" in page.text
        assert "retry-after" in page.headers
        assert SESSION_COOKIE not in c.cookies
