"""The project's exceptions: library errors are turned into these at the boundary.

Each docstring is the default message, so a raise site only adds what is specific.
"""

from __future__ import annotations


class SyncError(Exception):
    """background-sync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(SyncError):
    """A setting is invalid; the process exits with status 78 (EX_CONFIG)."""


class SchemaError(ConfigError):
    """The database refused a statement for the shape of its tables (a column or type
    changed, a right is missing): a configuration problem, never retried as an outage."""


class StoreError(SyncError):
    """The database did not answer or refused a statement."""


class BackendError(SyncError):
    """The backend call failed."""
