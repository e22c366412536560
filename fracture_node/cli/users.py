"""The administrator's user commands for the HTTP server.

::

    fracture-node user add NAME --role viewer|operator|sender [--config F] [--password-stdin]
    fracture-node user list [--config F]
    fracture-node hash-password [--password-stdin]

``user add`` writes ``name role argon2-hash`` into ``[http] users_file`` (default
``<state_dir>/users``, mode 0600), replacing the user when present; a running node sees the change
at its next request. The password is asked twice on a terminal, or read from the first line of
standard input with ``--password-stdin``; it is never an argument (it would be in ``ps``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from fracture_node.config_http import ROLES
from fracture_node.errors import FractureNodeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fracture-node")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    user = sub.add_parser("user", help="users of the web console, API and STOW-RS")
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user or change one's role and password")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--config", "-c")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    lst = actions.add_parser("list", help="the users and their roles (no hashes)")
    lst.add_argument("--config", "-c")
    hp = sub.add_parser("hash-password", help="print an argon2 hash of a password")
    hp.add_argument("--password-stdin", action="store_true")
    return parser


def read_password(from_stdin: bool) -> str:
    """The new password: stdin's first line, or asked twice on the terminal."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise FractureNodeError("the two passwords differ; nothing was changed")
    if len(password) < 8:
        raise FractureNodeError("the password is shorter than 8 characters; fix: use a longer one")
    return password


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``user add|list`` or ``hash-password``; ``argv`` starts with the command name."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from fracture_node.web.users import UserDirectory, add_user, hash_password

    try:
        if args.command == "hash-password":
            print(hash_password(read_password(args.password_stdin)))
            return 0
        from fracture_node import config as cfg

        config = cfg.load(args.config)
        path = config.http.users_path(config.node.state_dir)
        if args.action == "list":
            for user in UserDirectory(path).all():
                print(f"{user.name} {user.role}")
            return 0
        new = add_user(path, args.name, args.role, hash_password(read_password(
            args.password_stdin)))
    except FractureNodeError as exc:
        print(f"fracture-node {args.command}: {exc}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'updated'} {args.name} ({args.role}) in {path}")
    return 0
