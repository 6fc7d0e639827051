"""Errors become one line and an exit code; a reader that goes away is not an error."""

from __future__ import annotations

import subprocess
import sys

from jobs.cli.guard import run_guarded
from jobs.errors import EXIT_OK, EXIT_USAGE, ConfigError
from tests.support import REPO


def test_output_cut_short_by_its_reader_exits_0_without_a_word():
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -m jobs.cli.main stages | head -1; '
                                         'echo "rc=${PIPESTATUS[0]}" >&2'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("stage")
    assert proc.stderr.strip() == "rc=0"


def test_a_glan_error_is_its_line_and_its_exit_code(capsys):
    def bad() -> int:
        raise ConfigError("conf/x.yaml: llm.timeout_s=-1 must be > 0")

    assert run_guarded(bad, argv=[]) == EXIT_USAGE
    assert capsys.readouterr().err == "glan: error: conf/x.yaml: llm.timeout_s=-1 must be > 0\n"
    assert run_guarded(lambda: 0, argv=[]) == EXIT_OK
