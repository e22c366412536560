"""The Alembic migrations produce exactly the schema declared in fracture_node.db.schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from fracture_node.db import migrate
from fracture_node.db.schema import Base
from fracture_node.db.store import make_engine


def test_migrations_match_declared_schema(db_url: str) -> None:
    """After upgrade to head, autogenerate finds no difference from the models."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []
    assert migrate.current(db_url) == migrate.head()


def test_upgrade_is_idempotent(db_url: str) -> None:
    """Running the upgrade on a current database changes nothing and keeps the revision."""
    assert migrate.upgrade(db_url) == migrate.head()
