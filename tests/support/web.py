"""Helpers for the HTTP server tests: a configuration with users, a served node, a client."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from fracture_node.config import Config
from fracture_node.config_http import HttpConfig
from fracture_node.web.server import HttpServer, node_server
from fracture_node.web.users import add_user, hash_password

PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1", "sam": "sender-pass-1"}
ROLES = {"vera": "viewer", "otto": "operator", "sam": "sender"}


def web_config(state_dir: Path, base: Config | None = None, **http: Any) -> Config:
    """``base`` (default: the defaults) with ``[http]`` on, port 0, and the three test users."""
    base = base or Config.defaults()
    users = state_dir / "users"
    if not users.exists():
        for name, role in ROLES.items():
            add_user(users, name, role, hash_password(PASSWORDS[name]))
    settings: dict[str, Any] = {"enabled": True, "port": 0, "users_file": users, **http}
    return dataclasses.replace(
        base, node=dataclasses.replace(base.node, state_dir=state_dir),
        http=HttpConfig(**settings)).validate()


@contextmanager
def serving(config: Config, store: Any = None, on_change: Any = None) -> Iterator[HttpServer]:
    """The node's HTTP server for ``config``, serving on loopback until the block ends."""
    server = node_server(config, store, on_change)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def basic(name: str) -> tuple[str, str]:
    return name, PASSWORDS[name]


def login(client: httpx.Client, name: str, password: str | None = None) -> httpx.Response:
    """Log in through the console's form, as a browser does (cookies kept by ``client``)."""
    page = client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post("/login", data={
        "username": name, "password": PASSWORDS[name] if password is None else password,
        "login_token": token.group(1), "next": "/"})


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)
