"""The one way SQL runs: a function of a :class:`~sqlalchemy.orm.Session`, in one transaction.

Every query in :mod:`fracture_node.db` is written as ``fn(session) -> value`` and run by
:meth:`Database.run`, which opens the transaction, commits or rolls back, and turns any
SQLAlchemy error into a :class:`~fracture_node.errors.DatabaseError` with a short, value-free
text. :class:`~fracture_node.db.store.Store` runs on the node's read-write engine; the audit
(:class:`~fracture_node.db.audit.Audit`) on a read-only one
(:func:`~fracture_node.db.audit.read_only_engine`), deliberately: the quality officer's
questions can never write, nor take SQLite's write lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fracture_node.errors import DatabaseError

T = TypeVar("T")


class Database:
    """An engine and the transaction runner every query goes through."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def run(self, fn: Callable[[Session], T], what: str = "database error") -> T:
        """``fn(session)`` in one transaction (committed when it returns).

        Raises
        ------
        DatabaseError
            ``"<what>: <SQLAlchemy error class>: <first line of the driver's message>"``.
        """
        try:
            with self._sessions.begin() as session:
                return fn(session)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{what}: {type(exc).__name__}: {short(exc)}") from exc

    def upkeep(self, fn: Callable[[Any], T], what: str = "database upkeep failed") -> T:
        """``fn(cursor)`` on a DB-API connection in autocommit mode, outside any transaction:
        for the statements that cannot run in one (SQLite's WAL checkpoint, ``ANALYZE`` and
        ``PRAGMA optimize``; PostgreSQL's ``ANALYZE``). Errors as in :meth:`run`."""
        dbapi_error: type[BaseException] = getattr(self.engine.dialect.loaded_dbapi, "Error",
                                                   SQLAlchemyError)
        try:
            raw = self.engine.raw_connection()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{what}: {type(exc).__name__}: {short(exc)}") from exc
        driver: Any = raw.driver_connection
        postgres = self.dialect == "postgresql"
        try:
            if postgres:
                driver.autocommit = True  # the store's SQLite connections already are
            cur = raw.cursor()
            try:
                return fn(cur)
            finally:
                cur.close()
        except (SQLAlchemyError, dbapi_error) as exc:
            raise DatabaseError(f"{what}: {type(exc).__name__}: {short(exc)}") from exc
        finally:
            if postgres:
                driver.autocommit = False
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()


def short(exc: BaseException) -> str:
    """The first line of the driver's message (at most 300 characters)."""
    return (str(getattr(exc, "orig", exc)).splitlines() or [""])[0][:300]
