from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from fracture_node.config import TRAINED_BODY_PARTS, Config, NodeConfig, ScopeConfig
from fracture_node.db import migrate
from fracture_node.db.store import Store
from fracture_node.dicom.scp import Receiver
from fracture_node.spool import Spool
from tests.support import postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a real SQLite file, then a real PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
        migrate.upgrade(url)
        yield url
    else:
        with postgres_database() as url:
            migrate.upgrade(url)
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate.upgrade(url)
    return url


TEST_SCOPE = ScopeConfig(body_parts=(*TRAINED_BODY_PARTS, "CSPINE", "CHEST"), min_side=8)
"""The suites' fast stand-in radiograph is the 16 x 16 C-spine CR sample, and several decoding
tests use the chest samples; the default ``[scope]`` (min_side 64, limbs only) assesses neither.
Tests of the scope itself use the default (tests/unit/test_scope.py, test_pipeline.py)."""


def node_config(tmp_path: Path, url: str, **node: object) -> Config:
    """A configuration for an in-process node on a free port with its state under tmp_path
    (scope: :data:`TEST_SCOPE`)."""
    base = Config(node=NodeConfig(state_dir=tmp_path / "state", port=0), scope=TEST_SCOPE)
    base = dataclasses.replace(
        base, node=dataclasses.replace(base.node, **node),  # type: ignore[arg-type]
        database=dataclasses.replace(base.database, url=url),
    )
    return base.validate()


class RunningReceiver:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.database_url)
        self.spool = Spool(config.spool_dir, fsync=True, min_free_bytes=0)
        self.receiver = Receiver(config, self.store, self.spool)
        self.receiver.start()
        self.port = self.receiver.port

    def stop(self) -> None:
        self.receiver.stop(drain_timeout_s=5)
        self.store.dispose()


@pytest.fixture
def receiver(tmp_path: Path, db_url: str) -> Iterator[RunningReceiver]:
    """A running Storage SCP on a free port over the database of ``db_url``."""
    running = RunningReceiver(node_config(tmp_path, db_url))
    yield running
    running.stop()
