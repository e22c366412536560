"""The Alembic migrations produce exactly the schema declared in fracture_node.db.schema."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from fracture_node.db import migrate
from fracture_node.db.schema import Base
from fracture_node.db.store import make_engine
from tests.support import postgres_database


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


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    else:
        with postgres_database() as url:
            yield url


def test_first_schema_with_rows_upgrades_to_current(empty_url: str) -> None:
    """A database made by the first migration and filled with rows upgrades to head, rows kept."""
    migrate.upgrade(empty_url, "0001")
    engine = make_engine(empty_url)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO associations (id, node, calling_ae_title, called_ae_title, peer_address,"
            " peer_port, started_at, ended_at, outcome, instances_stored, instances_failed)"
            " VALUES (1, 'n', 'PACS', 'FN', '10.0.0.1', 104, :t, :t, 'released', 1, 0)"),
            {"t": now})
        conn.execute(text(
            "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, study_instance_uid,"
            " transfer_syntax_uid, size_bytes, sha256, spool_path, received_at, association_id,"
            " state, attempts, duplicates) VALUES (1, '1.2.3', '1.2.840.10008.5.1.4.1.1.1',"
            " '1.2', '1.2.840.10008.1.2', 10, 'ab', 'x.dcm', :t, 1, 'processed', 1, 0)"),
            {"t": now})
        conn.execute(text(
            "INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at,"
            " instances_received, report_due, reported_version) VALUES (1, '1.2', :t, :t, 1,"
            " false, 1)"), {"t": now})
        conn.execute(text(
            "INSERT INTO results (id, instance_id, probability, positive, threshold,"
            " operating_point, model_name, model_version, model_sha256, decode_ms, infer_ms,"
            " batch_size, worker, created_at) VALUES (1, 1, 0.7, true, 0.5, 'balanced', 'm',"
            " '1', 'ff', 1, 2, 1, 'w', :t)"), {"t": now})
    engine.dispose()
    assert migrate.upgrade(empty_url) == migrate.head()
    engine = make_engine(empty_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT probability FROM results")).scalar_one() == 0.7
        assert conn.execute(text("SELECT state FROM instances")).scalar_one() == "processed"
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_0004_adds_purged_at_to_existing_overlays(empty_url: str) -> None:
    """A database at 0003 with a report and its overlays upgrades to 0004: the rows are kept,
    ``purged_at`` is NULL (the files are still there) and the partial index is there; 0004
    downgrades to 0003 (rows kept) and upgrades again."""
    from alembic import command

    migrate.upgrade(empty_url, "0003")
    engine = make_engine(empty_url)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO reports (id, study_instance_uid, version, sop_instance_uid,"
            " series_instance_uid, path, created_at, instances_total, instances_positive,"
            " instances_unprocessed, made_by) VALUES (1, '1.2', 1, '9.1', '9', '1.2/9.1.dcm',"
            " :t, 1, 1, 0, 'n')"), {"t": now})
        conn.execute(text(
            "INSERT INTO report_objects (id, report_id, kind, sop_class_uid, sop_instance_uid,"
            " series_instance_uid, source_sop_instance_uid, path, created_at) VALUES"
            " (1, 1, 'sc', '1.2.840.10008.5.1.4.1.1.7', '8.1', '8', '1.2.3',"
            " '1.2/9.1.overlays/sc-8.1.dcm', :t)"), {"t": now})
    engine.dispose()
    assert migrate.upgrade(empty_url, "0004") == "0004"
    engine = make_engine(empty_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT kind, purged_at FROM report_objects")).one() == \
            ("sc", None)
        indexes = {i["name"]: i for i in inspect(conn).get_indexes("report_objects")}
        assert indexes["ix_report_objects_unpurged_created_at"]["column_names"] == ["created_at"]
    engine.dispose()

    command.downgrade(migrate.alembic_config(empty_url), "0003")
    assert migrate.current(empty_url) == "0003"
    engine = make_engine(empty_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT kind FROM report_objects")).scalar_one() == "sc"
        assert "purged_at" not in {c["name"] for c in inspect(conn).get_columns("report_objects")}
    engine.dispose()
    assert migrate.upgrade(empty_url, "0004") == "0004"
