"""Schema migrations with Alembic, usable from an installed package (``fracture-node db ...``).

The migration scripts ship inside the wheel as ``fracture_node._migrations`` (the repository's
``migrations/`` folder), so no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fracture_node.db.store import make_engine
from fracture_node.errors import DatabaseError

_LOCK_KEY = 0x46524E31  # "FRN1": the advisory lock taken while upgrading on PostgreSQL


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("fracture_node._migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the database at ``url`` to ``revision``; returns the revision it is at afterwards."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several nodes starting at once: one upgrades, the others wait, then find it done.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return current(url) or ""
    except SQLAlchemyError as exc:
        raise DatabaseError(f"schema upgrade failed: {type(exc).__name__}: "
                            f"{str(getattr(exc, 'orig', exc)).splitlines()[0]}") from exc
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision: {type(exc).__name__}") from exc
    finally:
        engine.dispose()


def head() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head() or ""
