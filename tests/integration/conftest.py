from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fracture_node.db import migrate
from tests.support import migrated_database
from tests.support.node import Node, RunningReceiver, make_node, node_config


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a real SQLite file, then a real PostgreSQL database."""
    with migrated_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate.upgrade(url)
    return url








@pytest.fixture
def receiver(tmp_path: Path, db_url: str) -> Iterator[RunningReceiver]:
    """A running Storage SCP on a free port over the database of ``db_url``."""
    running = RunningReceiver(node_config(tmp_path, db_url))
    yield running
    running.stop()


@pytest.fixture
def pacs(storescp: tuple[int, Path]) -> tuple[int, Path]:
    """The PACS of these tests: DCMTK storescp (see tests/conftest.py)."""
    return storescp


@pytest.fixture
def node(tmp_path: Path, db_url: str, tiny_model: Path, pacs: tuple[int, Path]
         ) -> Iterator[Node]:
    n = make_node(tmp_path, db_url, tiny_model, pacs[0])
    yield n
    n.close()
