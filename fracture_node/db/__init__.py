"""SQL storage: the schema, the store, reporting and maintenance queries, migrations."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Result


def rowcount(result: Result[Any]) -> int:
    """The number of rows an ``UPDATE`` or ``DELETE`` matched.

    ``Session.execute`` is typed to return a plain :class:`~sqlalchemy.Result`. For a DML
    statement it returns a :class:`~sqlalchemy.CursorResult`, which is the type that carries
    ``rowcount``.
    """
    return int(cast("CursorResult[Any]", result).rowcount)
