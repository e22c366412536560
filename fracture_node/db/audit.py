"""The quality officer's questions, as SQL for SQLite and PostgreSQL.

Each question is one :class:`Question`: plain SQL per backend (the same text is printed in
``docs/audit.md``, so it can be pasted into ``sqlite3`` or ``psql``), parameters ``:since`` and
``:until`` (a half-open UTC interval ``[since, until)``). :class:`Audit` runs them on a read-only
connection: on SQLite the file is opened with ``mode=ro`` and no write lock is taken, so a long
audit query never holds up the receiver.

Definitions (also in ``docs/audit.md``):

- a *day* is a UTC calendar day;
- *positives* count every result produced that day (a superseded copy's result included);
- *turnaround* is per study: from its first instance's arrival to its first report (version 1),
  and to the first successful delivery of that report; p50/p95 are nearest-rank percentiles;
- *deliveries* lists every delivery that is dead or had at least one failed attempt, with the
  overlays it carries (Secondary Captures, presentation states) and how many of them were stored;
- *objects* lists every object of every delivery made in the window (the SR, then its overlays),
  with the destination, when it was stored and, for an overlay, when retention deleted its file;
- *sources* counts associations per calling AE title (``instances_stored`` includes identical
  copies acknowledged without being stored again);
- *unprocessed* counts instances not processed or failed, by reason, and C-STORE requests we
  refused (``refused``), by reason;
- *actions* lists what users of the web console and API did (retries, re-processing) and which
  pages with patient data they were shown, with who, how authenticated and from where.

The web console and the JSON API read through the same :class:`Audit` (its questions, its
``status``, and the study-by-study views of :mod:`fracture_node.db.browse`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import bindparam

from fracture_node.db import browse, maintenance
from fracture_node.db import schema as s
from fracture_node.db.database import Database
from fracture_node.errors import DatabaseError


@dataclass(frozen=True)
class Question:
    """One audit question and its SQL on each backend."""

    name: str
    title: str
    columns: tuple[str, ...]
    timestamps: tuple[str, ...]
    sqlite: str
    postgresql: str
    derived: tuple[str, ...] = ()
    """Columns :meth:`Audit.ask` adds to each row from the SQL's own (not in the SQL)."""
    shown: tuple[str, ...] = ()
    """The columns of the table for people (default: every column); ``--json`` has them all."""

    def sql(self, dialect: str) -> str:
        return self.postgresql if dialect == "postgresql" else self.sqlite

    @property
    def table_columns(self) -> tuple[str, ...]:
        return self.shown or self.columns + self.derived


_MACROS = {
    "sqlite": {
        "DAY": lambda col: f"date({col})",
        "SECONDS": lambda a, b: f"(julianday({b}) - julianday({a})) * 86400.0",
    },
    "postgresql": {
        "DAY": lambda col: f"to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "SECONDS": lambda a, b: f"extract(epoch FROM ({b} - {a}))::float8",
    },
}
_MACRO_RE = re.compile(r"\b(DAY|SECONDS)\(")


def _render(template: str, dialect: str) -> str:
    """Expand ``DAY(col)`` and ``SECONDS(from, to)`` (arguments may nest) for a backend."""
    out, pos = [], 0
    while (match := _MACRO_RE.search(template, pos)) is not None:
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(template[end], 0)
            end += 1
        args = _split_args(_render(template[match.end():end - 1], dialect))
        out.append(template[pos:match.start()])
        out.append(_MACROS[dialect][match.group(1)](*args))  # type: ignore[operator]
        pos = end
    out.append(template[pos:])
    return "".join(out).strip()


def _split_args(inner: str) -> list[str]:
    depth, start, out = 0, 0, []
    for i, ch in enumerate(inner):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(inner[start:i].strip())
            start = i + 1
    out.append(inner[start:].strip())
    return out


def _question(name: str, title: str, columns: str, timestamps: str, template: str,
              sqlite: str | None = None, postgresql: str | None = None, derived: str = "",
              shown: str = "") -> Question:
    return Question(name=name, title=title, columns=tuple(columns.split()),
                    timestamps=tuple(timestamps.split()),
                    sqlite=_render(sqlite or template, "sqlite"),
                    postgresql=_render(postgresql or template, "postgresql"),
                    derived=tuple(derived.split()), shown=tuple(shown.split()))


_POSITIVES = """
SELECT DAY(r.created_at) AS day,
       count(*) AS instances,
       sum(CASE WHEN r.positive THEN 1 ELSE 0 END) AS positive,
       avg(CASE WHEN r.positive THEN 1.0 ELSE 0.0 END) AS positive_rate,
       count(DISTINCT i.study_instance_uid) AS studies,
       count(DISTINCT CASE WHEN r.positive THEN i.study_instance_uid END) AS positive_studies
FROM results r
JOIN instances i ON i.id = r.instance_id
WHERE r.created_at >= :since AND r.created_at < :until
GROUP BY 1
ORDER BY 1
"""

_TURNAROUND_TIMES = """
WITH firsts AS MATERIALIZED (
  SELECT s.first_received_at,
         r.created_at AS reported_at,
         (SELECT min(d.report_delivered_at) FROM deliveries d WHERE d.report_id = r.id) AS delivered_at
  FROM studies s
  LEFT JOIN reports r ON r.study_instance_uid = s.study_instance_uid AND r.version = 1
  WHERE s.first_received_at >= :since AND s.first_received_at < :until
), t AS MATERIALIZED (
  SELECT DAY(first_received_at) AS day,
         SECONDS(first_received_at, reported_at) AS report_s,
         SECONDS(first_received_at, delivered_at) AS delivered_s
  FROM firsts
)"""

_TURNAROUND_SQLITE = _TURNAROUND_TIMES + """, ranked AS (
  SELECT day, report_s, delivered_s,
         row_number() OVER (PARTITION BY day, report_s IS NULL ORDER BY report_s) AS report_rank,
         count(*) OVER (PARTITION BY day, report_s IS NULL) AS report_n,
         row_number() OVER (PARTITION BY day, delivered_s IS NULL ORDER BY delivered_s)
           AS delivered_rank,
         count(*) OVER (PARTITION BY day, delivered_s IS NULL) AS delivered_n
  FROM t
)
SELECT day,
       count(*) AS studies,
       count(report_s) AS reported,
       min(CASE WHEN report_s IS NOT NULL AND report_rank >= (50 * report_n + 99) / 100
                THEN report_s END) AS report_p50_s,
       min(CASE WHEN report_s IS NOT NULL AND report_rank >= (95 * report_n + 99) / 100
                THEN report_s END) AS report_p95_s,
       max(report_s) AS report_max_s,
       count(delivered_s) AS delivered,
       min(CASE WHEN delivered_s IS NOT NULL AND delivered_rank >= (50 * delivered_n + 99) / 100
                THEN delivered_s END) AS delivered_p50_s,
       min(CASE WHEN delivered_s IS NOT NULL AND delivered_rank >= (95 * delivered_n + 99) / 100
                THEN delivered_s END) AS delivered_p95_s,
       max(delivered_s) AS delivered_max_s
FROM ranked
GROUP BY day
ORDER BY day
"""

_TURNAROUND_POSTGRESQL = _TURNAROUND_TIMES + """
SELECT day,
       count(*) AS studies,
       count(report_s) AS reported,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY report_s) AS report_p50_s,
       percentile_disc(0.95) WITHIN GROUP (ORDER BY report_s) AS report_p95_s,
       max(report_s) AS report_max_s,
       count(delivered_s) AS delivered,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY delivered_s) AS delivered_p50_s,
       percentile_disc(0.95) WITHIN GROUP (ORDER BY delivered_s) AS delivered_p95_s,
       max(delivered_s) AS delivered_max_s
FROM t
GROUP BY day
ORDER BY day
"""

_MODELS = """
SELECT r.model_sha256, r.model_name, r.model_version, r.operating_point, r.threshold,
       count(*) AS results,
       sum(CASE WHEN r.positive THEN 1 ELSE 0 END) AS positive,
       avg(CASE WHEN r.positive THEN 1.0 ELSE 0.0 END) AS positive_rate,
       avg(r.probability) AS mean_probability,
       min(r.created_at) AS first_used_at,
       max(r.created_at) AS last_used_at
FROM results r
WHERE r.created_at >= :since AND r.created_at < :until
GROUP BY r.model_sha256, r.model_name, r.model_version, r.operating_point, r.threshold
ORDER BY first_used_at, r.model_sha256
"""

_DELIVERIES = """
SELECT d.id AS delivery_id,
       rp.study_instance_uid,
       rp.version AS report_version,
       rp.sop_instance_uid AS report_sop_instance_uid,
       d.destination, d.state, d.attempts,
       (SELECT count(*) FROM delivery_attempts a
        WHERE a.delivery_id = d.id AND NOT a.ok) AS failed_attempts,
       d.created_at,
       (SELECT max(a.attempted_at) FROM delivery_attempts a
        WHERE a.delivery_id = d.id) AS last_attempt_at,
       d.report_delivered_at,
       (SELECT count(*) FROM delivery_objects x JOIN report_objects o ON o.id = x.object_id
        WHERE x.delivery_id = d.id AND o.kind = 'sc') AS sc_objects,
       (SELECT count(*) FROM delivery_objects x JOIN report_objects o ON o.id = x.object_id
        WHERE x.delivery_id = d.id AND o.kind = 'sc' AND x.delivered_at IS NOT NULL)
         AS sc_stored,
       (SELECT count(*) FROM delivery_objects x JOIN report_objects o ON o.id = x.object_id
        WHERE x.delivery_id = d.id AND o.kind = 'gsps') AS gsps_objects,
       (SELECT count(*) FROM delivery_objects x JOIN report_objects o ON o.id = x.object_id
        WHERE x.delivery_id = d.id AND o.kind = 'gsps' AND x.delivered_at IS NOT NULL)
         AS gsps_stored,
       d.delivered_at, d.deadline_at, d.last_status, d.last_error
FROM deliveries d
JOIN reports rp ON rp.id = d.report_id
WHERE d.created_at >= :since AND d.created_at < :until
  AND (d.state = 'dead'
       OR EXISTS (SELECT 1 FROM delivery_attempts a WHERE a.delivery_id = d.id AND NOT a.ok))
ORDER BY d.created_at, d.id
"""

_OBJECTS = """
SELECT * FROM (
  SELECT d.id AS delivery_id, rp.study_instance_uid, rp.version AS report_version,
         d.destination, d.state AS delivery_state, d.created_at,
         'sr' AS kind, rp.sop_instance_uid, NULL AS source_sop_instance_uid,
         d.report_delivered_at AS delivered_at, NULL AS file_purged_at,
         CASE WHEN d.report_delivered_at IS NULL THEN d.last_status END AS last_status,
         CASE WHEN d.report_delivered_at IS NULL THEN d.last_error END AS last_error
  FROM deliveries d
  JOIN reports rp ON rp.id = d.report_id
  WHERE d.created_at >= :since AND d.created_at < :until
  UNION ALL
  SELECT d.id, rp.study_instance_uid, rp.version, d.destination, d.state, d.created_at,
         o.kind, o.sop_instance_uid, o.source_sop_instance_uid,
         x.delivered_at, o.purged_at, x.last_status, x.last_error
  FROM delivery_objects x
  JOIN deliveries d ON d.id = x.delivery_id
  JOIN report_objects o ON o.id = x.object_id
  JOIN reports rp ON rp.id = d.report_id
  WHERE d.created_at >= :since AND d.created_at < :until
) t
ORDER BY created_at, delivery_id, CASE kind WHEN 'sr' THEN 0 WHEN 'sc' THEN 1 ELSE 2 END,
         source_sop_instance_uid, sop_instance_uid
"""

_SOURCES = """
SELECT DAY(a.started_at) AS day,
       a.calling_ae_title,
       count(*) AS associations,
       sum(CASE WHEN a.outcome = 'rejected' THEN 1 ELSE 0 END) AS rejected,
       sum(CASE WHEN a.outcome IN ('aborted', 'interrupted') THEN 1 ELSE 0 END) AS aborted,
       sum(a.instances_stored) AS instances_stored,
       sum(a.instances_failed) AS instances_failed,
       PEERS AS peer_addresses,
       min(a.started_at) AS first_at,
       max(a.started_at) AS last_at
FROM associations a
WHERE a.started_at >= :since AND a.started_at < :until
GROUP BY 1, 2
ORDER BY 1, 2
"""

_UNPROCESSED = """
SELECT i.state, coalesce(i.reason, 'unknown') AS reason, count(*) AS instances,
       min(i.received_at) AS first_at, max(i.received_at) AS last_at
FROM instances i
WHERE i.state IN ('not_processed', 'failed')
  AND i.received_at >= :since AND i.received_at < :until
GROUP BY i.state, coalesce(i.reason, 'unknown')
UNION ALL
SELECT 'refused' AS state, f.reason, count(*) AS instances,
       min(f.at) AS first_at, max(f.at) AS last_at
FROM store_failures f
WHERE f.at >= :since AND f.at < :until
GROUP BY f.reason
ORDER BY 3 DESC, 1, 2
"""

_REPORTS_FAILED = """
SELECT st.study_instance_uid,
       CASE WHEN st.report_parked_at IS NOT NULL THEN 'parked' ELSE 'retrying' END AS state,
       st.report_attempts AS attempts, st.instances_received AS instances,
       st.first_received_at, st.last_received_at, st.report_retry_at AS next_attempt_at,
       st.report_parked_at AS parked_at, st.report_error AS error
FROM studies st
WHERE st.report_attempts > 0
  AND st.last_received_at >= :since AND st.last_received_at < :until
ORDER BY 2, st.last_received_at
"""

_ACTIONS = """
SELECT o.at, o.user_name, o.role, o.via, o.peer_address, o.action, o.target, o.affected
FROM operator_actions o
WHERE o.at >= :since AND o.at < :until
ORDER BY o.at, o.id
"""

QUESTIONS: dict[str, Question] = {q.name: q for q in (
    _question("positives", "Positive results per day",
              "day instances positive positive_rate studies positive_studies", "", _POSITIVES),
    _question("turnaround", "Time from receipt to report and to delivery, per day of receipt",
              "day studies reported report_p50_s report_p95_s report_max_s delivered "
              "delivered_p50_s delivered_p95_s delivered_max_s", "", "",
              sqlite=_TURNAROUND_SQLITE, postgresql=_TURNAROUND_POSTGRESQL),
    _question("models", "Results per model version",
              "model_sha256 model_name model_version operating_point threshold results positive "
              "positive_rate mean_probability first_used_at last_used_at",
              "first_used_at last_used_at", _MODELS),
    _question("deliveries", "Failed and dead-letter deliveries",
              "delivery_id study_instance_uid report_version report_sop_instance_uid destination "
              "state attempts failed_attempts created_at last_attempt_at report_delivered_at "
              "sc_objects sc_stored gsps_objects gsps_stored delivered_at deadline_at "
              "last_status last_error",
              "created_at last_attempt_at report_delivered_at delivered_at deadline_at",
              _DELIVERIES, derived="objects",
              shown="delivery_id study_instance_uid report_version report_sop_instance_uid "
                    "destination state objects attempts failed_attempts created_at "
                    "last_attempt_at report_delivered_at delivered_at deadline_at last_status "
                    "last_error"),
    _question("objects", "Objects of each delivery: the SR and its overlays, where and when stored",
              "delivery_id study_instance_uid report_version destination delivery_state "
              "created_at kind sop_instance_uid source_sop_instance_uid delivered_at "
              "file_purged_at last_status last_error",
              "created_at delivered_at file_purged_at", _OBJECTS),
    _question("sources", "What came from which calling AE title, per day",
              "day calling_ae_title associations rejected aborted instances_stored "
              "instances_failed peer_addresses first_at last_at", "first_at last_at", "",
              sqlite=_SOURCES.replace("PEERS", "group_concat(DISTINCT a.peer_address)"),
              postgresql=_SOURCES.replace(
                  "PEERS", "string_agg(DISTINCT a.peer_address, ',' ORDER BY a.peer_address)")),
    _question("unprocessed", "Instances not processed, by reason (and C-STORE requests refused)",
              "state reason instances first_at last_at", "first_at last_at", _UNPROCESSED),
    _question("reports_failed", "Studies whose report failed: retrying, or parked",
              "study_instance_uid state attempts instances first_received_at last_received_at "
              "next_attempt_at parked_at error",
              "first_received_at last_received_at next_attempt_at parked_at", _REPORTS_FAILED),
    _question("actions", "What users of the web console and API did, and patient data shown",
              "at user_name role via peer_address action target affected", "at", _ACTIONS),
)}


def objects_summary(row: Mapping[str, Any]) -> str:
    """What a ``deliveries`` row carries and what of it is not stored yet, for people.

    ``SR+2 SC+2 GSPS, all stored``; ``SR+1 SC+1 GSPS, 1 GSPS not stored``; ``SR, none stored``.
    The SR counts as stored when ``report_delivered_at`` is set.
    """
    counts = {"SC": int(row["sc_objects"] or 0), "GSPS": int(row["gsps_objects"] or 0)}
    left = {"SC": counts["SC"] - int(row["sc_stored"] or 0),
            "GSPS": counts["GSPS"] - int(row["gsps_stored"] or 0)}
    sr_left = row["report_delivered_at"] is None
    carried = ["SR"] + [f"{n} {kind}" for kind, n in counts.items() if n]
    if not sr_left and not any(left.values()):
        status = "all stored"
    elif sr_left and left == counts:
        status = "none stored"
    else:
        status = "+".join(["SR"] * sr_left + [f"{n} {kind}" for kind, n in left.items() if n]) \
            + " not stored"
    return "+".join(carried) + ", " + status


def read_only_engine(url: str) -> Engine:
    """An engine for reading: SQLite opened ``mode=ro`` (no write lock), PostgreSQL read-only.

    On PostgreSQL the JIT compiler is turned off for these sessions: the audit queries are large
    enough for the planner to JIT-compile them, which cost more than the queries themselves in
    ``benchmarks/audit_million.py`` (1.2 s of 2.5 s for ``turnaround``).

    Raises :class:`DatabaseError` when a SQLite file does not exist (rather than creating one).
    """
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:" or not Path(path).is_file():
            raise DatabaseError(f"there is no database file at {path or url!r}; fix: give the "
                                "node's configuration with --config, or run the node once")
        return create_engine(f"sqlite:///file:{Path(path).resolve()}?mode=ro&uri=true",
                             connect_args={"timeout": 30})
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, connect_args={
        "connect_timeout": 5, "options": "-c jit=off -c default_transaction_read_only=on"})


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


T = TypeVar("T")


class _Browse:
    """The study-by-study views (:mod:`fracture_node.db.browse`) on :class:`Audit`'s
    read-only connection."""

    db: Database

    def _read(self, what: str, fn: Callable[[Session], T]) -> T:
        return self.db.run(fn, what=f"{what} failed")

    def studies(self, flt: browse.StudyFilter, limit: int = 50, offset: int = 0) -> browse.Page:
        return self._read("studies", lambda ses: browse.studies(ses, flt, limit, offset))

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return self._read("study", lambda ses: browse.study(ses, study_uid))

    def instance_file(self, study_uid: str, sop_uid: str) -> dict[str, Any] | None:
        return self._read("instance", lambda ses: browse.instance_file(ses, study_uid, sop_uid))

    def instances(self, *, state: str | None = None, reason: str | None = None,
                  since: dt.datetime | None = None, until: dt.datetime | None = None,
                  limit: int = 50, offset: int = 0) -> browse.Page:
        return self._read("instances", lambda ses: browse.instances(
            ses, state=state, reason=reason, since=since, until=until, limit=limit,
            offset=offset))

    def queue(self, limit: int = 50, offset: int = 0) -> browse.Page:
        return self._read("queue", lambda ses: browse.queue(ses, limit, offset))

    def destinations(self, configured: Sequence[str]) -> list[dict[str, Any]]:
        return self._read("destinations", lambda ses: browse.destinations(ses, configured))

    def dead_letters(self, *, destination: str | None = None, since: dt.datetime | None = None,
                     until: dt.datetime | None = None, limit: int = 50,
                     offset: int = 0) -> browse.Page:
        return self._read("dead letters", lambda ses: browse.dead_letters(
            ses, destination=destination, since=since, until=until, limit=limit, offset=offset))

    def activity(self, since: dt.datetime) -> dict[str, int]:
        return self._read("activity", lambda ses: browse.activity(ses, since))


class Audit(_Browse):
    """Runs the audit questions, the status figures and the study-by-study views on a read-only
    connection."""

    def __init__(self, url: str) -> None:
        self.db = Database(read_only_engine(url))
        self.dialect = self.db.dialect

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Audit:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ask(self, name: str, since: dt.datetime, until: dt.datetime) -> list[dict[str, Any]]:
        """The rows answering question ``name`` for ``[since, until)`` (aware datetimes)."""
        question = QUESTIONS[name]
        stmt = text(question.sql(self.dialect)).bindparams(
            bindparam("since", type_=s.UTCDateTime()), bindparam("until", type_=s.UTCDateTime()))
        stmt = stmt.columns(**{c: s.UTCDateTime() for c in question.timestamps})  # type: ignore[assignment]
        rows = self.db.run(
            lambda ses: ses.execute(stmt, {"since": since, "until": until}).mappings().all(),
            what=f"audit {name} failed")
        out = []
        for row in rows:
            item = {c: _plain(row[c]) for c in question.columns}
            if "peer_addresses" in item and item["peer_addresses"]:
                item["peer_addresses"] = ",".join(sorted(set(item["peer_addresses"].split(","))))
            if "objects" in question.derived:
                item["objects"] = objects_summary(item)
            out.append(item)
        return out

    def status(self, now: dt.datetime, last_reports: int = 5) -> dict[str, Any]:
        """The node's figures: the same as the gauges, plus states and the latest reports."""
        def read(ses: Session) -> tuple[Any, ...]:
            g = maintenance.gauges_in(ses, now)
            states = {k: int(v) for k, v in ses.execute(
                select(s.Instance.state, func.count()).group_by(s.Instance.state)).all()}
            deliveries = {k: int(v) for k, v in ses.execute(
                select(s.Delivery.state, func.count()).group_by(s.Delivery.state)).all()}
            reports = ses.execute(
                select(s.Report.created_at, s.Report.study_instance_uid, s.Report.version,
                       s.Report.instances_total, s.Report.instances_positive,
                       s.Report.instances_unprocessed)
                .order_by(s.Report.created_at.desc(), s.Report.id.desc()).limit(last_reports)
            ).all()
            runs = ses.execute(
                select(s.HousekeepingRun.job, func.max(s.HousekeepingRun.started_at))
                .group_by(s.HousekeepingRun.job)).all()
            parked = ses.execute(
                select(s.Study.report_parked_at, s.Study.study_instance_uid,
                       s.Study.report_attempts, s.Study.report_error)
                .where(s.Study.report_parked_at.is_not(None))
                .order_by(s.Study.report_parked_at.desc()).limit(last_reports)).all()
            # closed without an SR: no image of the study was assessed ([scope])
            not_assessed = int(ses.execute(
                select(func.count()).select_from(s.Study).where(
                    s.Study.report_due.is_(False), s.Study.reported_version == 0,
                    s.Study.report_parked_at.is_(None))
            ).scalar_one())
            return g, states, deliveries, reports, runs, parked, not_assessed

        g, states, deliveries, reports, runs, parked, not_assessed = self.db.run(
            read, what="status failed")
        return {
            "at": now,
            "queue_depth": g.queue_depth,
            "claimed": g.claimed,
            "instance_states": dict(sorted(states.items())),
            "dead_deliveries": g.dead_deliveries,
            "pending_deliveries": g.pending_deliveries,
            "delivery_states": dict(sorted(deliveries.items())),
            "unreported_studies": g.unreported_studies,
            "studies_not_assessed": not_assessed,
            "oldest_unreported_study_seconds": round(g.oldest_unreported_study_seconds, 1),
            "retrying_studies": g.retrying_studies,
            "parked_studies": g.parked_studies,
            "parked": [
                {"parked_at": maintenance._as_utc(r[0]), "study_instance_uid": r[1],
                 "attempts": r[2], "error": r[3]} for r in parked],
            "last_reports": [
                {"created_at": r[0], "study_instance_uid": r[1], "version": r[2],
                 "instances": r[3], "positive": r[4], "unprocessed": r[5]} for r in reports],
            "housekeeping_last_run": {job: maintenance._as_utc(at) for job, at in sorted(runs)},
        }


def sql_for_docs(dialects: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Every question's SQL per backend (used to write and to check ``docs/audit.md``)."""
    names = dialects or {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    return {q.name: {d: q.sql(d) for d in names} for q in QUESTIONS.values()}
