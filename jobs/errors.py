"""Errors that reach the user as one line, and the exit codes of every command (jobs/cli/guard.py
turns any exception into one line and one of these codes)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # a failure that is not the user's input: a write that failed, a service down, a full disk
EXIT_USAGE = 2  # bad configuration, arguments or input data; nothing was written
EXIT_FAILED_CALLS = 3  # `glan run` finished, but more LLM calls failed than pipeline.max_failed_share allows
EXIT_OVER_BUDGET = 4  # a stage would spend, or has spent, more than pipeline.max_usd
EXIT_INTERRUPTED = 130  # Ctrl-C


class GlanError(Exception):
    """A failure the user can act on; its message is the whole story, printed as one line."""

    exit_code = EXIT_ERROR


class ConfigError(GlanError):
    """Bad configuration: missing file, unknown key, wrong type or value. Nothing has been written."""

    exit_code = EXIT_USAGE


class InputError(GlanError):
    """Bad input data (a file, a table, a taxonomy): the message names the problem and where it is."""

    exit_code = EXIT_USAGE


class SchemaMismatchError(GlanError):
    """Rows written to a table do not match the table's schema."""


class ConflictError(GlanError):
    """Another writer changed the same table in a way that collides with this write."""


class TableNotFoundError(GlanError):
    """A table that a stage needs does not exist under the run root yet."""


class BudgetError(GlanError):
    """The spending guard (pipeline.max_usd) stopped a stage: before its first call, or once the
    recorded spend reached the limit. What was answered is committed."""

    exit_code = EXIT_OVER_BUDGET
