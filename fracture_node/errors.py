"""Exceptions of fracture-node.

Every error the daemon raises on purpose is a :class:`FractureNodeError`. A subclass's docstring
is its default message. Messages name objects by UID, never by patient demographics.
"""

from __future__ import annotations


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
