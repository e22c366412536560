"""Audit and housekeeping queries on a million instances, as JSON on stdout.

Usage::

    .venv/bin/python benchmarks/audit_million.py [--instances 1000000] [--sqlite PATH]
        [--postgres auto|none|URL] [--keep]

Fills a database with a year of synthetic traffic (``--instances`` instances in studies of 1-4,
one association per study from five calling AEs, results from three model versions, reports,
deliveries with failures and dead letters, refused stores; the spool of everything older than
30 days already purged, as in a node that has run for a year) using bulk inserts (``executemany``
on SQLite, ``COPY`` on PostgreSQL). The schema is first brought to revision ``0001`` and every
question is timed ("before"), then upgraded to the head revision (``0002`` adds indexes) and
timed again ("after"). Each figure is the best of ``--repeat`` runs after one warm-up run, in
milliseconds, for a 30-day window and for the whole year; ``gauges`` and ``purge_select`` are the
queries housekeeping runs every 30 s and every hour.

``--postgres auto`` creates a database ``fn_bench_<random>`` on 127.0.0.1:5432 (trust auth, user
postgres) when a server answers there, and drops it afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy

from fracture_node.db import audit, maintenance, migrate
from fracture_node.db.store import Store
from fracture_node.errors import DatabaseError
from fracture_node.logs import configure
from fracture_node.stages.housekeeping import PURGE_BATCH

END = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
START = END - dt.timedelta(days=365)
RETENTION = dt.timedelta(days=30)
AES = ["PACS_MAIN", "PACS_MAIN", "PACS_MAIN", "PACS_ED", "CR_ROOM2"]
MODELS = [("a" * 64, "1.0"), ("b" * 64, "1.1"), ("c" * 64, "2.0")]
REASONS = ["out_of_scope_modality", "undecodable", "multi_frame", "colour", "no_pixel_data"]
EPOCH = np.datetime64("1970-01-01T00:00:00", "us")


# Synthetic data --------------------------------------------------------------------------------

def _ts(us: np.ndarray) -> list[str]:
    """Microseconds since the epoch as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC) strings."""
    text = np.datetime_as_string(EPOCH + us.astype("timedelta64[us]"), unit="us")
    return [t.replace("T", " ") for t in text.tolist()]


def _ts_or_none(us: np.ndarray, present: np.ndarray) -> list[str | None]:
    text = _ts(np.where(present, us, 0))
    return [t if p else None for t, p in zip(text, present.tolist(), strict=True)]


def generate(n_instances: int, seed: int = 7) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Rows per table as (columns, tuples), timestamps as UTC text."""
    rng = np.random.default_rng(seed)
    start_us = int(START.timestamp() * 1e6)
    span_us = int((END - START).total_seconds() * 1e6) - 3_600_000_000
    sizes = rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15], size=n_instances)
    sizes = sizes[np.cumsum(sizes) <= n_instances]
    if sizes.sum() < n_instances:
        sizes = np.append(sizes, n_instances - sizes.sum())
    n_studies = len(sizes)
    study_start = np.sort(start_us + rng.integers(0, span_us, n_studies))
    study_of = np.repeat(np.arange(n_studies), sizes)
    offset_in_study = np.arange(n_instances) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    received = study_start[study_of] + offset_in_study * 2_000_000 + rng.integers(0, 999_999,
                                                                                   n_instances)
    study_uid = [f"1.2.826.0.1.3680043.10.1.{i}" for i in range(n_studies)]
    last_received = study_start + (sizes - 1) * 2_000_000 + 999_999

    # Associations: one per study.
    ae = rng.choice(len(AES), n_studies)
    assoc_fail = rng.random(n_studies) < 0.004
    assoc_rows = list(zip(
        range(1, n_studies + 1), ["bench:11112:1"] * n_studies, [AES[i] for i in ae],
        ["FRACTURE_NODE"] * n_studies, [f"10.20.{i}.{i * 7 % 5}" for i in ae.tolist()],
        rng.integers(1024, 65535, n_studies).tolist(), _ts(study_start),
        _ts(last_received + 500_000), ["released"] * n_studies, [None] * n_studies,
        sizes.tolist(), assoc_fail.astype(int).tolist(), strict=True))

    # Instance states: the newest few are still queued; the rest final.
    u = rng.random(n_instances)
    state = np.where(u < 0.93, "processed", np.where(u < 0.97, "not_processed",
                     np.where(u < 0.985, "failed", "superseded"))).astype(object)
    state[-200:] = "queued"
    reason = np.where(state == "not_processed", rng.choice(REASONS, n_instances),
                      np.where(state == "failed", "too_many_attempts", None)).astype(object)
    finished = received + rng.integers(1_000_000, 20_000_000, n_instances)
    final = state != "queued"
    # Steady state: the hourly purge has done everything but the last day's worth.
    purged = received < int((END - RETENTION - dt.timedelta(days=1)).timestamp() * 1e6)
    purged &= final
    inst_cols = ["id", "sop_instance_uid", "sop_class_uid", "study_instance_uid",
                 "series_instance_uid", "transfer_syntax_uid", "modality", "size_bytes", "sha256",
                 "spool_path", "received_at", "association_id", "state", "reason", "attempts",
                 "finished_at", "duplicates", "spool_purged_at"]
    sop = [f"{study_uid[st]}.{k}" for st, k in zip(study_of.tolist(), offset_in_study.tolist(),
                                                     strict=True)]
    purged_at = _ts_or_none(received + 31 * 86_400_000_000, purged)
    inst_rows = list(zip(
        range(1, n_instances + 1), sop, ["1.2.840.10008.5.1.4.1.1.1.1"] * n_instances,
        [study_uid[i] for i in study_of.tolist()], [study_uid[i] + ".1" for i in study_of.tolist()],
        ["1.2.840.10008.1.2.4.90"] * n_instances, ["DX"] * n_instances,
        rng.integers(2_000_000, 30_000_000, n_instances).tolist(), ["0" * 64] * n_instances,
        [f"{study_uid[st]}/{x}.0000.dcm" for st, x in zip(study_of.tolist(), sop, strict=True)],
        _ts(received), (study_of + 1).tolist(), state.tolist(), reason.tolist(),
        np.where(final, 1, 0).tolist(), _ts_or_none(finished, final), [0] * n_instances,
        purged_at, strict=True))

    # Results for processed and superseded instances.
    has_result = np.isin(state, ["processed", "superseded"])
    rid = np.nonzero(has_result)[0]
    prob = rng.beta(0.6, 2.0, len(rid))
    model = np.minimum((received[rid] - start_us) * 3 // (span_us + 1), 2)
    res_rows = list(zip(
        range(1, len(rid) + 1), (rid + 1).tolist(), prob.tolist(), (prob >= 0.5).tolist(),
        [0.5] * len(rid), ["balanced"] * len(rid), ["densenet121"] * len(rid),
        [MODELS[m][1] for m in model.tolist()], [MODELS[m][0] for m in model.tolist()],
        rng.normal(12, 3, len(rid)).tolist(), rng.normal(40, 8, len(rid)).tolist(),
        [8] * len(rid), ["bench:11112:1"] * len(rid), _ts(finished[rid]), strict=True))

    # Reports: version 1 for every study but the newest; 5 % get a version 2.
    reported = np.arange(n_studies) < n_studies - 100
    v1_at = last_received + 30_000_000 + rng.integers(0, 90_000_000, n_studies)
    v2 = reported & (rng.random(n_studies) < 0.05)
    v2_at = v1_at + rng.integers(60_000_000, 3_600_000_000, n_studies)
    rep_study = np.concatenate([np.nonzero(reported)[0], np.nonzero(v2)[0]])
    rep_version = np.concatenate([np.ones(reported.sum(), int), np.full(v2.sum(), 2)])
    rep_at = np.concatenate([v1_at[reported], v2_at[v2]])
    n_rep = len(rep_study)
    rep_rows = list(zip(
        range(1, n_rep + 1), [study_uid[i] for i in rep_study.tolist()], rep_version.tolist(),
        [f"2.25.{i}" for i in range(n_rep)], [f"2.25.9{i}" for i in range(n_rep)],
        [f"r/{i}.dcm" for i in range(n_rep)], _ts(rep_at), sizes[rep_study].tolist(),
        [0] * n_rep, [0] * n_rep, [0.3] * n_rep, ["a" * 64] * n_rep, ["bench:11112:1"] * n_rep,
        strict=True))

    # Deliveries: one per report; 2 % fail first and then succeed, 1 % die, the newest pend.
    du = rng.random(n_rep)
    d_state = np.where(du < 0.01, "dead", "delivered").astype(object)
    d_state[rep_at > int((END - dt.timedelta(minutes=30)).timestamp() * 1e6)] = "pending"
    failures = np.where(d_state == "dead", 5, np.where(du < 0.03, rng.integers(1, 4, n_rep), 0))
    attempts = failures + (d_state == "delivered")
    delivered_at = rep_at + failures * 30_000_000 + 2_000_000
    del_rows = list(zip(
        range(1, n_rep + 1), range(1, n_rep + 1), ["pacs"] * n_rep, d_state.tolist(),
        attempts.tolist(), _ts(rep_at), _ts(rep_at + 86_400_000_000),
        _ts(rep_at + 86_400_000_000), _ts_or_none(delivered_at, d_state == "delivered"),
        np.where(failures > 0, 0xA700, 0).tolist(),
        [("association rejected" if f else None) for f in failures.tolist()], strict=True))
    att_delivery = np.repeat(np.arange(n_rep), attempts)
    att_k = np.arange(len(att_delivery)) - np.repeat(np.cumsum(attempts) - attempts, attempts)
    att_ok = att_k == failures[att_delivery]
    att_rows = list(zip(
        range(1, len(att_delivery) + 1), (att_delivery + 1).tolist(),
        _ts(rep_at[att_delivery] + att_k * 30_000_000), [120.0] * len(att_delivery),
        att_ok.tolist(), np.where(att_ok, 0, 0xA700).tolist(),
        [None if ok else "association rejected" for ok in att_ok.tolist()],
        ["bench:11112:1"] * len(att_delivery), strict=True))

    # Refused stores.
    fail_assoc = np.nonzero(assoc_fail)[0]
    fail_rows = list(zip(
        range(1, len(fail_assoc) + 1), (fail_assoc + 1).tolist(), _ts(study_start[fail_assoc]),
        [f"9.9.{i}" for i in range(len(fail_assoc))], ["1.2.840.10008.5.1.4.1.1.1.1"] *
        len(fail_assoc), [0xC000] * len(fail_assoc), ["cannot_understand"] * len(fail_assoc),
        ["unparsable"] * len(fail_assoc), strict=True))

    due = np.zeros(n_studies, bool)
    due[~reported] = True
    study_rows = list(zip(
        range(1, n_studies + 1), study_uid, _ts(study_start), _ts(last_received), sizes.tolist(),
        due.tolist(), (reported.astype(int) + v2).tolist(),
        _ts_or_none(np.where(v2, v2_at, v1_at), reported), strict=True))

    return {
        "associations": (["id", "node", "calling_ae_title", "called_ae_title", "peer_address",
                          "peer_port", "started_at", "ended_at", "outcome", "reason",
                          "instances_stored", "instances_failed"], assoc_rows),
        "studies": (["id", "study_instance_uid", "first_received_at", "last_received_at",
                     "instances_received", "report_due", "reported_version", "last_reported_at"],
                    study_rows),
        "instances": (inst_cols, inst_rows),
        "store_failures": (["id", "association_id", "at", "sop_instance_uid", "sop_class_uid",
                            "status", "reason", "detail"], fail_rows),
        "results": (["id", "instance_id", "probability", "positive", "threshold",
                     "operating_point", "model_name", "model_version", "model_sha256",
                     "decode_ms", "infer_ms", "batch_size", "worker", "created_at"], res_rows),
        "reports": (["id", "study_instance_uid", "version", "sop_instance_uid",
                     "series_instance_uid", "path", "created_at", "instances_total",
                     "instances_positive", "instances_unprocessed", "max_probability",
                     "model_sha256", "made_by"], rep_rows),
        "deliveries": (["id", "report_id", "destination", "state", "attempts", "created_at",
                        "next_attempt_at", "deadline_at", "delivered_at", "last_status",
                        "last_error"], del_rows),
        "delivery_attempts": (["id", "delivery_id", "attempted_at", "duration_ms", "ok", "status",
                               "error", "node"], att_rows),
    }


# Loading ---------------------------------------------------------------------------------------

def load_sqlite(url: str, data: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> None:
    import sqlite3

    conn = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    for table, (cols, rows) in data.items():
        marks = ",".join("?" * len(cols))
        conn.executemany(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({marks})", rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def load_postgres(url: str, data: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> None:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        for table, (cols, rows) in data.items():
            with cur.copy(f"COPY {table} ({','.join(cols)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        for table in data:
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))")
        conn.commit()


# Timing ----------------------------------------------------------------------------------------

def best_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(min(times), 1), result


def time_all(url: str, repeat: int) -> dict[str, Any]:
    store = Store(url)
    try:
        maintenance.optimize(store)  # what housekeeping does hourly (ANALYZE / PRAGMA optimize)
    except DatabaseError:  # an older revision lacks tables that the head schema ANALYZEs
        store.run(lambda ses: ses.execute(sqlalchemy.text("ANALYZE")))
    out: dict[str, Any] = {}
    windows = {"30d": (END - dt.timedelta(days=30), END), "365d": (START, END)}
    with audit.Audit(url) as auditor:
        for name in audit.QUESTIONS:
            for label, (since, until) in windows.items():
                try:
                    ms, rows = best_ms(lambda n=name, a=since, b=until: auditor.ask(n, a, b),
                                       repeat)
                except DatabaseError:
                    # e.g. `deliveries`/`objects` read the overlay tables of revision 0003
                    out[f"{name}_{label}"] = {"skipped": "not answerable at this revision"}
                    continue
                out[f"{name}_{label}"] = {"ms": ms, "rows": len(rows)}
        ms, _ = best_ms(lambda: auditor.status(END), repeat)
        out["status"] = {"ms": ms}
    ms, g = best_ms(lambda: maintenance.gauges(store, END), repeat)
    out["gauges"] = {"ms": ms, "queue_depth": g.queue_depth,
                     "unreported_studies": g.unreported_studies}
    def purge_select() -> list[int]:
        stmt = maintenance.purge_candidates(END - RETENTION, PURGE_BATCH)
        return list(store.run(lambda ses: ses.execute(stmt).scalars().all()))

    ms, ids = best_ms(purge_select, repeat)
    out["purge_select"] = {"ms": ms, "rows": len(ids)}
    store.dispose()
    return out


def run_backend(name: str, url: str, data: dict[str, Any], repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {"url": url.split("@")[-1]}
    t0 = time.perf_counter()
    migrate.upgrade(url, "0001")
    (load_sqlite if name == "sqlite" else load_postgres)(url, data)
    result["load_s"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: loaded in {result['load_s']} s", file=sys.stderr)
    result["before"] = {"revision": migrate.current(url), **time_all(url, repeat)}
    print(f"{name}: timed at 0001", file=sys.stderr)
    if migrate.head() != "0001":
        t0 = time.perf_counter()
        migrate.upgrade(url)
        result["upgrade_s"] = round(time.perf_counter() - t0, 1)
        result["after"] = {"revision": migrate.current(url), **time_all(url, repeat)}
        print(f"{name}: timed at {migrate.head()}", file=sys.stderr)
    return result


def postgres_reachable() -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", 5432)) == 0


def postgres_database(keep: bool) -> Iterator[str]:
    import psycopg

    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    name = f"fn_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        if not keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--sqlite", default="/tmp/fn-audit-million.db")
    parser.add_argument("--postgres", default="auto", help="auto, none or a database URL")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    args = parser.parse_args(argv)
    configure("warning", json=True)

    t0 = time.perf_counter()
    data = generate(args.instances)
    report: dict[str, Any] = {
        "instances": args.instances,
        "rows": {table: len(rows) for table, (_cols, rows) in data.items()},
        "generate_s": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "head": migrate.head(),
    }
    print(f"generated {report['rows']} in {report['generate_s']} s", file=sys.stderr)
    if args.only in (None, "sqlite"):
        path = Path(args.sqlite)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        report["sqlite"] = run_backend("sqlite", f"sqlite:///{path}", data, args.repeat)
        report["sqlite"]["file_mb"] = round(path.stat().st_size / 1e6, 1)
        if not args.keep:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    if args.only in (None, "postgres") and args.postgres != "none":
        if args.postgres != "auto":
            report["postgresql"] = run_backend("postgresql", args.postgres, data, args.repeat)
        elif postgres_reachable():
            gen = postgres_database(args.keep)
            url = next(gen)
            try:
                report["postgresql"] = run_backend("postgresql", url, data, args.repeat)
            finally:
                gen.close()
        else:
            report["postgresql"] = "not reachable on 127.0.0.1:5432"
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
