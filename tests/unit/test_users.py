"""The HTTP users file and the `user` / `hash-password` commands."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from fracture_node.cli import users as user_cli
from fracture_node.errors import ConfigError
from fracture_node.web.users import UserDirectory, parse


def _add(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, role: str,
         password: str) -> int:
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    return user_cli.main(["user", "add", name, "--role", role, "--config", str(config),
                          "--password-stdin"])


def test_user_add_writes_an_argon2_hash_owner_only(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`user add` writes the user with an argon2id hash (not the password), mode 0600."""
    assert _add(tmp_path, monkeypatch, "alice", "operator", "correct-horse") == 0
    users = tmp_path / "state" / "users"
    text = users.read_text()
    assert "correct-horse" not in text and "alice operator $argon2id$" in text
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert UserDirectory(users).verify("alice", "correct-horse") is not None


def test_user_add_again_replaces_role_and_password(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a user again changes the role and password, keeping one line for the user."""
    _add(tmp_path, monkeypatch, "alice", "operator", "first-password")
    _add(tmp_path, monkeypatch, "alice", "viewer", "second-password")
    directory = UserDirectory(tmp_path / "state" / "users")
    assert len(directory) == 1
    assert directory.verify("alice", "first-password") is None
    user = directory.verify("alice", "second-password")
    assert user is not None and user.role == "viewer"


def test_short_password_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A password under 8 characters is refused with exit 2 and no file written."""
    assert _add(tmp_path, monkeypatch, "alice", "viewer", "short") == 2
    assert "shorter than 8" in capsys.readouterr().err
    assert not (tmp_path / "state" / "users").exists()


def test_hash_password_prints_a_verifiable_hash(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`hash-password` prints an argon2 hash that verifies the password given."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert user_cli.main(["hash-password", "--password-stdin"]) == 0
    assert PasswordHasher().verify(capsys.readouterr().out.strip(), "a-long-password")


def test_bad_users_file_line_names_the_line() -> None:
    """A line that is not 'name role hash' is a ConfigError naming the file and line."""
    with pytest.raises(ConfigError, match="users line 2"):
        parse("# users\nbob admin $argon2id$x\n", "users")


def test_user_without_password_cannot_log_in_with_one(tmp_path: Path) -> None:
    """A user whose hash is '-' (reverse proxy only) is refused every password."""
    users = tmp_path / "users"
    users.write_text("carol viewer -\n")
    directory = UserDirectory(users)
    assert directory.get("carol") is not None
    assert directory.verify("carol", "") is None and directory.verify("carol", "-") is None


def test_remembered_password_is_forgotten_when_the_hash_changes(tmp_path: Path) -> None:
    """A password verified once stops working as soon as the user's password is changed."""
    from fracture_node.web.users import add_user, hash_password

    users = tmp_path / "users"
    add_user(users, "dave", "viewer", hash_password("old-password"))
    directory = UserDirectory(users)
    assert directory.verify("dave", "old-password") is not None
    assert directory.verify("dave", "old-password") is not None  # remembered
    add_user(users, "dave", "viewer", hash_password("new-password"))
    directory.reload()
    assert directory.verify("dave", "old-password") is None
    assert directory.verify("dave", "new-password") is not None
