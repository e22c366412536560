"""The users file: one user a line, ``name role argon2-hash``; ``#`` starts a comment.

Written by ``fracture-node user add``; read by the HTTP server, again whenever the file changes,
so that a user added or removed takes effect without a restart. The file holds no plain password;
keep it mode 0600 all the same (a hash can be attacked offline).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fracture_node.config_http import ROLES
from fracture_node.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
NO_PASSWORD = "-"
"""The hash of a user who may log in only through the trusted reverse proxy's header."""

_HASHER = PasswordHasher()
# A hash to verify against for unknown users, so that an unknown name takes as long as a wrong
# password (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (the library's current parameters)."""
    if not password:
        raise ConfigError("an empty password cannot be hashed; fix: give a password")
    return _HASHER.hash(password)


def parse(text: str, source: str) -> dict[str, User]:
    """The users in a users file's text; a bad line is a :class:`ConfigError` naming it."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not NAME_RE.match(parts[0]) or parts[1] not in ROLES or not (
                parts[2] == NO_PASSWORD or parts[2].startswith("$argon2")):
            raise ConfigError(
                f"users file {source} line {number} is not 'name role argon2-hash'; fix: "
                "write it with 'fracture-node user add NAME --role viewer|operator|sender'")
        if parts[0] in users:
            raise ConfigError(f"users file {source} line {number}: user {parts[0]!r} is there "
                              "twice; fix: keep one line per user")
        users[parts[0]] = User(parts[0], parts[1], parts[2])
    return users


def render(users: dict[str, User]) -> str:
    lines = ["# fracture-node HTTP users: name role argon2-hash (fracture-node user add)"]
    lines += [f"{u.name} {u.role} {u.password_hash}" for u in users.values()]
    return "\n".join(lines) + "\n"


def add_user(path: Path, name: str, role: str, password_hash: str) -> bool:
    """Add or replace a user in the file (created mode 0600); True when the user was new."""
    if not NAME_RE.match(name):
        raise ConfigError(f"user name {name!r} is not allowed; fix: use 1 to 64 letters, "
                          "digits, '_', '.', '@' or '-'")
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is unknown; fix: use {', '.join(ROLES)}")
    users = parse(path.read_text("utf-8"), str(path)) if path.exists() else {}
    new = name not in users
    users[name] = User(name, role, password_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(render(users))
    os.replace(tmp, path)
    return new


class UserDirectory:
    """The users of one server, re-read when the file's modification time or size changes.

    A file that does not exist means no users (every request is refused); a file that turns
    bad keeps the users last read (and :meth:`reload` raises, for the caller to log).

    An argon2 verification costs about 0.1-0.2 s of CPU, and API clients send their password
    with every request: a right password is remembered for ``remember_s`` as a keyed hash
    (never the password), for as long as the user's stored hash is unchanged. Wrong passwords
    are never remembered: each one costs a full verification.
    """

    def __init__(self, path: Path, remember_s: float = 300.0, remember_max: int = 256) -> None:
        self.path = path
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._remembered: dict[bytes, tuple[str, float]] = {}
        self._remember_s = remember_s
        self._remember_max = remember_max
        self.reload()

    def reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            with self._lock:
                self._users, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        users = parse(self.path.read_text("utf-8"), str(self.path))
        with self._lock:
            self._users, self._stamp = users, stamp

    def get(self, name: str) -> User | None:
        with self._lock:
            return self._users.get(name)

    def all(self) -> list[User]:
        with self._lock:
            return list(self._users.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._users)

    def verify(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (same work either way)."""
        user = self.get(name)
        stored = user.password_hash if user and user.password_hash != NO_PASSWORD else None
        key = hmac.new(self._key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._remembered.get(key)
        if user is not None and stored and hit and hit[0] == stored and hit[1] > now:
            return user
        try:
            _HASHER.verify(stored or _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if not stored:
            return None
        with self._lock:
            if len(self._remembered) >= self._remember_max:
                self._remembered = {k: v for k, v in self._remembered.items() if v[1] > now}
                if len(self._remembered) >= self._remember_max:
                    self._remembered.clear()
            self._remembered[key] = (stored, now + self._remember_s)
        return user
