"""Helpers shared by the tests: databases, free ports, waiting for servers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.2) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` s; TimeoutError
    naming ``what`` when none comes within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not met within {timeout}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards; yields its URL."""
    name = f"fn_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def storescp_running(out: Path, aet: str = "PACS") -> Iterator[int]:
    """DCMTK storescp storing into ``out`` (created) on a free port; yields the port."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def migrated_database(backend: str, folder: Path) -> Iterator[str]:
    """A migrated, empty database of ``backend`` ("sqlite": a file in ``folder``; "postgres": a
    fresh database, dropped afterwards); yields its URL."""
    from fracture_node.db import migrate

    if backend == "sqlite":
        url = f"sqlite:///{folder / 'node.db'}"
        migrate.upgrade(url)
        yield url
        return
    with postgres_database() as url:
        migrate.upgrade(url)
        yield url
