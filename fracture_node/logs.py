"""Logging: structlog to stdout, JSON lines when not on a terminal.

Event names are snake_case facts (``instance_stored``) with fields. Patient names, IDs and birth
dates never reach a log call: log UIDs instead.
"""

from __future__ import annotations

import datetime as dt
import json as json_module
import logging
import sys
import warnings
from typing import Any, TextIO

import structlog

_FORBIDDEN_KEYS = frozenset(
    {"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID",
     "PatientBirthDate"}
)


def _drop_patient_fields(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove any field that is named like a patient attribute (defence in depth)."""
    for key in _FORBIDDEN_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


def configure(level: str = "info", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's logging.

    Parameters
    ----------
    level:
        ``debug``, ``info``, ``warning`` or ``error``.
    json:
        JSON lines when true, a console renderer when false; by default JSON unless ``stream``
        is a terminal.
    stream:
        Where log lines go: standard output (the default: the daemon, under journald), or
        standard error for a command whose output is data (``predict`` writing CSV to stdout).
    """
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_patient_fields,
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (pynetdicom, alembic, apscheduler) log through the standard library: keep their
    # warnings, but they are not allowed to print dataset contents at debug level.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s %(message)s", force=True)
    if json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(LibraryJSONFormatter())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns about every non-conformant value it reads; received objects are often
    # non-conformant, and such warnings may quote element values (patient data): keep errors only.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # Library warnings can quote data set values (highdicom warns about a patient's name), so
    # they go to the logging system and are dropped there, never to stderr.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.CRITICAL)
    warnings.simplefilter("default")
    # APScheduler warns when a frequent job is still running at its next tick: that is expected.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


LIBRARY_MESSAGE_CHARS = 300
"""How much of a library's log message is kept: pynetdicom's can repeat what a peer sent
(up to 64 KiB of a PDU)."""


class LibraryJSONFormatter(logging.Formatter):
    """Library log records (pynetdicom, alembic, ...) as JSON lines like our own events.

    The message is cut to :data:`LIBRARY_MESSAGE_CHARS` and control characters are escaped by
    the JSON encoding; an exception keeps only its type (its text and traceback can quote what a
    peer sent or a data set holds).
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not lose the record
            message = str(record.msg)
        if len(message) > LIBRARY_MESSAGE_CHARS:
            message = message[:LIBRARY_MESSAGE_CHARS] + f"... ({len(message)} chars)"
        event: dict[str, Any] = {
            "event": "library_log", "logger": record.name,
            "log_level": record.levelname.lower(), "message": message,
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            event["error"] = record.exc_info[0].__name__
        return json_module.dumps(event, ensure_ascii=True)


def get_logger(name: str | None = None) -> Any:
    """Return a structlog logger bound to ``component=name``."""
    # Initial values keep the logger lazy: it picks up the configuration in force when it is
    # first used, not the one at import time.
    return structlog.get_logger(component=name) if name else structlog.get_logger()
