"""The operator's commands: ``audit``, ``status`` and ``housekeeping``.

::

    fracture-node audit <question> [--config F] [--since DATE] [--until DATE] [--json]
    fracture-node status [--config F] [--json]
    fracture-node housekeeping <job> [--config F] [--json]

Questions: ``positives``, ``turnaround``, ``models``, ``deliveries``, ``objects``,
``sources``, ``unprocessed``, ``reports_failed``, ``actions`` (see :mod:`fracture_node.db.audit` and
``docs/audit.md``).
``--since`` and ``--until`` take UTC dates (``2026-11-01``; both days included) or ISO date-times
(``--until`` then excluded); the default is the last 30 days. People get an aligned table,
scripts ``--json``.

``audit`` and ``status`` only read (SQLite is opened read-only), so they are safe beside a running
node. ``housekeeping`` runs one job now, exactly as the node's scheduler would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from fracture_node.errors import FractureNodeError

QUESTION_NAMES = ("positives", "turnaround", "models", "deliveries", "objects", "sources",
                  "unprocessed", "reports_failed", "actions")
DEFAULT_DAYS = 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fracture-node")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    aud = sub.add_parser("audit", help="answer an audit question from the SQL audit trail")
    aud.add_argument("question", choices=QUESTION_NAMES)
    aud.add_argument("--config", "-c", help="TOML configuration file (default: embedded defaults)")
    aud.add_argument("--since", help="first UTC day (YYYY-MM-DD) or date-time; default: 30 days ago")
    aud.add_argument("--until", help="last UTC day (included) or date-time (excluded); default: now")
    aud.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")

    st = sub.add_parser("status", help="queue depth, states, last reports, dead deliveries")
    st.add_argument("--config", "-c")
    st.add_argument("--json", action="store_true")

    from fracture_node.stages.housekeeping import JOBS

    hk = sub.add_parser("housekeeping", help="run one housekeeping job now")
    hk.add_argument("job", choices=JOBS)
    hk.add_argument("--config", "-c")
    hk.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``audit``, ``status`` or ``housekeeping``; ``argv`` starts with the command name."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "audit":
            return _audit(args)
        if args.command == "status":
            return _status(args)
        return _housekeeping(args)
    except FractureNodeError as exc:
        print(f"fracture-node {args.command}: {exc}", file=sys.stderr)
        return 2


# Commands -------------------------------------------------------------------------------------

def _audit(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.db.audit import QUESTIONS, Audit

    now = dt.datetime.now(dt.UTC)
    since = parse_bound(args.since, end=False) if args.since else \
        dt.datetime.combine(now.date() - dt.timedelta(days=DEFAULT_DAYS), dt.time(), dt.UTC)
    until = parse_bound(args.until, end=True) if args.until else now
    if until <= since:
        raise FractureNodeError(f"--until ({until.isoformat()}) is not after --since "
                                f"({since.isoformat()}); fix: swap or widen them")
    config = cfg.load(args.config)
    with Audit(config.database_url) as auditor:
        rows = auditor.ask(args.question, since, until)
    question = QUESTIONS[args.question]
    if args.json:
        print(json.dumps({"question": args.question, "since": since, "until": until,
                          "rows": rows}, default=_json_default, indent=2))
    else:
        print(f"{question.title}, {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC")
        print()
        print(table(list(question.table_columns), rows) if rows else "(no rows)")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.db.audit import Audit

    config = cfg.load(args.config)
    with Audit(config.database_url) as auditor:
        state = auditor.status(dt.datetime.now(dt.UTC))
    if args.json:
        print(json.dumps(state, default=_json_default, indent=2))
        return 0
    age = state["oldest_unreported_study_seconds"]
    lines = [
        f"queue depth                 {state['queue_depth']}",
        f"claimed                     {state['claimed']}",
        "instance states             " + _pairs(state["instance_states"]),
        f"unreported studies          {state['unreported_studies']}",
        f"studies not assessed, no SR {state['studies_not_assessed']}",
        f"oldest unreported study     {_duration(age) if age else '-'}",
        f"studies retrying a report   {state['retrying_studies']}",
        f"parked studies              {state['parked_studies']}"
        + ("  (fracture-node reprocess)" if state["parked_studies"] else ""),
        f"dead deliveries             {state['dead_deliveries']}",
        f"pending deliveries          {state['pending_deliveries']}",
        "delivery states             " + _pairs(state["delivery_states"]),
    ]
    print("\n".join(lines))
    print("\nlast reports")
    print(table(["created_at", "study_instance_uid", "version", "instances", "positive",
                 "unprocessed"], state["last_reports"]) if state["last_reports"] else "(none)")
    if state["parked"]:
        print("\nparked studies (report failed every attempt)")
        print(table(["parked_at", "study_instance_uid", "attempts", "error"], state["parked"]))
    if state["housekeeping_last_run"]:
        print("\nhousekeeping last run")
        for job, when in state["housekeeping_last_run"].items():
            print(f"  {job:<26}  {_cell(when)}")
    return 0


def _housekeeping(args: argparse.Namespace) -> int:
    import structlog

    from fracture_node import config as cfg
    from fracture_node.db.store import Store
    from fracture_node.metrics import Metrics
    from fracture_node.spool import Spool
    from fracture_node.stages.housekeeping import Housekeeping

    config = cfg.load(args.config)
    # The job's log lines go to stderr (stdout carries the answer), at the configured level; the
    # previous structlog configuration is restored afterwards.
    previous = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(config.logging.level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    store = Store(config.database_url)
    try:
        spool = Spool(config.spool_dir, fsync=config.storage.fsync)
        node = f"{socket.gethostname()}:cli:{os.getpid()}"
        run = Housekeeping(config, store, spool, Metrics(), node).run_once(args.job)
    finally:
        store.dispose()
        structlog.configure(**previous)
    if args.json:
        print(json.dumps({"job": run.job, "ok": run.ok, "summary": run.summary},
                         default=_json_default, indent=2))
    else:
        print(f"{run.job}: {'ok' if run.ok else 'FAILED'}")
        for key, value in run.summary.items():
            print(f"  {key:<32} {_cell(value)}")
    return 0 if run.ok else 1


# Formatting -----------------------------------------------------------------------------------

def parse_bound(value: str, *, end: bool) -> dt.datetime:
    """A ``--since``/``--until`` value as an aware UTC datetime.

    A bare date means the start of that UTC day for ``--since`` and the start of the next day for
    ``--until`` (so the day is included); a date-time is taken as given (naive means UTC).
    """
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            start = dt.datetime.combine(day, dt.time(), dt.UTC)
            return start + dt.timedelta(days=1) if end else start
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise FractureNodeError(f"{value!r} is not a date; fix: use YYYY-MM-DD or an ISO "
                                "date-time such as 2026-11-01T08:00") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return str(value)


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, int) and column.endswith("status"):
        return f"0x{value:04X}"  # DICOM statuses are written in hexadecimal
    if isinstance(value, float):
        if column.endswith("_s"):
            return f"{value:.1f}"
        return f"{value:.4f}"
    text = str(value)
    if column == "model_sha256":
        return text[:12]
    if len(text) > 60:
        return text[:57] + "..."
    return text


def table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """An aligned text table: numbers to the right, text to the left."""
    cells = [[_cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   or row.get(c) is None for row in rows) for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


if __name__ == "__main__":
    raise SystemExit(main())
