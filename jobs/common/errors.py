"""Errors that reach the user as one line. The CLI maps them to exit codes."""

from __future__ import annotations


class GlanError(Exception):
    """A failure the user can act on; its message is the whole story, printed as one line."""

    exit_code = 1


class ConfigError(GlanError):
    """Bad configuration: missing file, unknown key, wrong type or value. Nothing has been written."""

    exit_code = 2


class InputError(GlanError):
    """Bad input data (a file, a table, a taxonomy): the message names the problem and where it is."""

    exit_code = 2


class SchemaMismatchError(GlanError):
    """Rows written to a table do not match the table's schema."""


class ConflictError(GlanError):
    """Another writer changed the same table in a way that collides with this write."""


class TableNotFoundError(GlanError):
    """A table that a stage needs does not exist under the run root yet."""
