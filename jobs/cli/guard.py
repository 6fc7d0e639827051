"""Every command's last line of defence: any error becomes one line on stderr (the last one) and
an exit code from jobs/errors.py, never a stack trace. A full disk names the path and how much
room is left."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pyspark import SparkContext
from pyspark.errors import PySparkException

from jobs.cli.args import add_config_args
from jobs.config.loader import load_config
from jobs.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, GlanError
from jobs.spark.session import is_local_path, local_path

log = logging.getLogger("glan")


def one_line(exc: BaseException) -> str:
    """A Java or Python exception as one readable line, never a stack trace."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    if "JVM stacktrace" in text or first.startswith("An error occurred while calling"):
        for line in text.splitlines():
            if "Exception:" in line:
                first = line.split("Exception:", 1)[1].strip() or first
                break
    elif first.startswith("An exception was thrown from the Python worker"):
        # The worker's own traceback follows; its last line says what went wrong.
        raised = [line for line in text.splitlines() if _PYTHON_RAISED.match(line)]
        first = raised[-1] if raised else first
    return first[:500]


_PYTHON_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:")
_NO_SPACE = re.compile(r"no space left on device|errno 28\b|os error 28\b", re.IGNORECASE)
# A local path in an error line: "/x/y", "file:/x/y" or "'/x/y'"; not the "/java.io" of "java.base/java.io".
_PATH = re.compile(r"(?<![\w.])(?:file:)?(/[^\s'\"():,]+)")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _no_space_path(exc: BaseException) -> str | None:
    """None if `exc` is not a full disk; else the path it names, or "" when it names none.

    A full disk reaches the CLI as a Python OSError, as Java text inside a Py4J or Spark error
    ("java.io.IOException: No space left on device"), or as a Python worker's traceback text."""
    found = False
    for item in _exception_chain(exc):
        if isinstance(item, OSError) and item.errno == errno.ENOSPC:
            if item.filename:
                return str(item.filename)
            found = True
        for line in str(item).splitlines():
            if _NO_SPACE.search(line):
                found = True
                path = _PATH.search(line)
                if path:
                    return path.group(1)
    return "" if found else None


def _free_space(path: str) -> str:
    """How much room the file system holding `path` (or its nearest existing folder) has left."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = float(shutil.disk_usage(probe).free)
    except OSError:
        return "free space unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            break
        free /= 1024
    return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"


def _run_root_of(argv: Sequence[str]) -> str | None:
    """The local run root that `argv`'s --conf/--set name, if they load."""
    known, _ = add_config_args(argparse.ArgumentParser(add_help=False)).parse_known_args(list(argv))
    try:
        run_root = load_config(known.conf, known.sets).run_root
    except GlanError:
        return None
    return str(local_path(run_root)) if is_local_path(run_root) else None


def no_space_message(path: str, argv: Sequence[str]) -> str:
    """One line for a full disk: the path when the error gave one, else where glan writes and how
    much room each place has left (Spark's scratch is the temp folder unless spark.local.dir says)."""
    if path:
        return f"no space left on device: {path} ({_free_space(path)})"
    places = [(f"run root {root}", root) for root in [_run_root_of(argv)] if root]
    places.append((f"temp {tempfile.gettempdir()}", tempfile.gettempdir()))
    where = ", ".join(f"{label} {_free_space(path)}" for label, path in places)
    return f"no space left on device (the error names no file; {where})"


def _silence_spark() -> None:
    """Mute the JVM's loggers so that nothing it logs later (killed tasks, shutdown) lands below
    the CLI's one-line error: that line must be the last one on stderr."""
    sc = SparkContext._active_spark_context
    if sc is not None:
        try:
            sc.setLogLevel("OFF")
        except Exception:  # noqa: BLE001 - a JVM already gone has nothing left to log
            pass


def _fail(message: str, code: int) -> int:
    _silence_spark()
    sys.stdout.flush()
    print(f"glan: error: {message}", file=sys.stderr, flush=True)
    return code


def run_guarded(func: Callable[[], int], argv: Sequence[str] | None = None) -> int:
    """Run a command; any error becomes one line on stderr and an exit code.

    `argv` is the command line (default: sys.argv[1:]); a full disk names the run root it sets."""
    try:
        result = func()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except KeyboardInterrupt:
        _silence_spark()
        print("glan: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`glan sql ... | head -1`): nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the CLI's promise is one line, not a traceback
        log.debug("traceback", exc_info=True)
        full = _no_space_path(exc)
        if full is not None:
            return _fail(no_space_message(full, sys.argv[1:] if argv is None else argv), EXIT_ERROR)
        if isinstance(exc, GlanError):
            return _fail(str(exc), exc.exit_code)
        if isinstance(exc, PySparkException):
            cls = getattr(exc, "getCondition", lambda: None)() or type(exc).__name__
            bad_input = "ANALYSIS" in type(exc).__name__.upper() or "PARSE" in type(exc).__name__.upper()
            return _fail(f"{cls}: {one_line(exc)}", EXIT_USAGE if bad_input else EXIT_ERROR)
        return _fail(f"{type(exc).__name__}: {one_line(exc)}", EXIT_ERROR)
