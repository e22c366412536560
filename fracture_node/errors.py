"""Exceptions of fracture-node.

Every error the daemon raises on purpose is a :class:`FractureNodeError`. A subclass's docstring
is its default message. Messages name objects by UID, never by patient demographics.
"""

from __future__ import annotations

import re
import traceback


class FractureNodeError(Exception):
    """fracture-node failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(FractureNodeError):
    """The configuration is invalid."""


class StorageError(FractureNodeError):
    """A received object could not be written to the spool."""


class DatabaseError(FractureNodeError):
    """The database could not be reached or refused the statement."""


class NotProcessable(FractureNodeError):
    """The object cannot be read by the fracture model.

    Parameters
    ----------
    reason:
        A short machine-readable code (``undecodable``, ``out_of_scope_modality``,
        ``multi_frame``, ``colour``, ``no_pixel_data``, ...) recorded in SQL.
    message:
        What happened, for people.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)


class ModelError(FractureNodeError):
    """The model file is missing, corrupt or of an unknown format."""


class ReportError(FractureNodeError):
    """The Structured Report could not be built."""


class DeliveryError(FractureNodeError):
    """An object could not be delivered to a destination."""


class DatasetError(FractureNodeError):
    """The dataset could not be read."""


class UnknownJob(FractureNodeError):
    """There is no housekeeping job of that name."""


class NoPicture(FractureNodeError):
    """No overlay can be drawn for an instance (no saliency record, or its file is gone)."""


class StartupError(FractureNodeError):
    """A part of the node could not start.

    Parameters
    ----------
    part:
        What failed (``dicom_port``, ``metrics_port``, ``model``, ...), logged with the event.
    message:
        What happened and what to do.
    """

    def __init__(self, part: str, message: str) -> None:
        self.part = part
        super().__init__(message)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def describe(exc: BaseException) -> str:
    """What an exception says that may be logged and stored: never a value from a data set.

    Library exceptions (pydicom, highdicom, the standard library) often quote the value they
    refused: a birth date, a name. They are described by their type and where they were raised
    (``ValueError at pydicom/valuerep.py:123 in __new__``), without their text. Our own errors
    keep their message (they name objects by UID), with anything quoted and the text of any
    library exception they wrap removed, in case a message carried one along.
    """
    where = ""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if frames:
        last = frames[-1]
        parts = last.filename.replace("\\", "/").split("/")
        where = f" at {'/'.join(parts[-2:])}:{last.lineno} in {last.name}"
    if not isinstance(exc, FractureNodeError):
        return f"{type(exc).__name__}{where}"
    text = str(exc)
    cause: BaseException | None = exc.__cause__ or exc.__context__
    seen = 0
    while cause is not None and seen < 5:
        quoted = str(cause)
        if quoted and not isinstance(cause, FractureNodeError):
            text = text.replace(quoted, f"<{type(cause).__name__}>")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    text = _QUOTED.sub("<value>", text)
    return f"{type(exc).__name__}: {text}"


class LoginRequired(Exception):
    # A signal to the web app (401, or the login page), not a failure: not a FractureNodeError.
    """No valid credentials: the API answers 401, the console redirects to its login page."""
