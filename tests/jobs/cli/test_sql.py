"""`glan sql` only reads: statements that would change or create anything are refused before they
run, with one line and exit code 2; queries, SHOW, DESCRIBE and EXPLAIN still work. Output formats."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from jobs.cli import main as cli

from tests.support import REPO


@pytest.fixture(autouse=True)
def spark_logs_back_on(spark):
    yield
    spark.sparkContext.setLogLevel("WARN")  # a failing command mutes the JVM's logs; the session is shared


@pytest.fixture()
def run(tmp_path) -> Path:
    """A run root with two real Delta tables, `questions` (3 rows) and `answers` (2 rows)."""
    root = tmp_path / "run"
    write_deltalake(str(root / "questions"), pa.table({"question_id": ["q1", "q2", "q3"], "n": [1, 2, 3]}))
    write_deltalake(str(root / "answers"), pa.table({"question_id": ["q1", "q2"], "answer": ["a1", "a2"]}))
    return root


def files_of(run: Path) -> dict[str, str]:
    """Every file of the run's tables, `_delta_log` included, with a hash of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and not p.relative_to(run).parts[0].startswith("_")}


def glan_sql(run: Path, query: str, *extra: str) -> list[str]:
    return ["sql", "--set", f"run_root={run}", "--set", "storage.backend=embedded", *extra, query]


DESTRUCTIVE = [
    "INSERT OVERWRITE DIRECTORY '{run}/questions' USING parquet SELECT 1 AS x",
    "CREATE TABLE copied USING parquet AS SELECT * FROM answers",
    "DROP TABLE answers",
    "DELETE FROM answers",
    "WITH a AS (SELECT * FROM answers) INSERT INTO answers SELECT * FROM a",
    "FROM answers INSERT OVERWRITE TABLE answers SELECT *",
    "UPDATE answers SET answer = 'x'",
    "MERGE INTO answers a USING answers b ON a.question_id = b.question_id WHEN MATCHED THEN DELETE",
    "TRUNCATE TABLE answers",
    "CREATE TEMPORARY VIEW v AS SELECT 1",
    "CACHE TABLE answers",
    "REFRESH TABLE answers",
    "ADD JAR /nonexistent/x.jar",
    "SET spark.sql.shuffle.partitions=1",
    "EXPLAIN INSERT INTO answers SELECT * FROM answers",
    "EXECUTE IMMEDIATE 'DROP TABLE answers'",
    "SELECT 1; DROP TABLE answers",
]


@pytest.mark.parametrize("statement", DESTRUCTIVE)
def test_statements_that_write_are_refused_and_the_tables_are_untouched(spark, run, capsys, statement):
    before = files_of(run)
    code = cli.main(glan_sql(run, statement.format(run=run)))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("glan: error: glan sql "), err
    assert out == ""
    assert files_of(run) == before
    assert DeltaTable(str(run / "answers")).to_pyarrow_table().num_rows == 2
    assert DeltaTable(str(run / "questions")).to_pyarrow_table().num_rows == 3
    assert not spark.catalog.tableExists("copied")


def test_the_refusal_names_the_kind_of_statement(spark, run, capsys):
    assert cli.main(glan_sql(run, "DROP TABLE answers")) == 2
    assert capsys.readouterr().err.strip() == (
        "glan: error: glan sql only reads; refused DropTable, which is not a query (it runs SELECT, WITH ... SELECT, "
        "VALUES, TABLE, SHOW, DESCRIBE, EXPLAIN); README, section SQL, says how to change data")


def test_reflection_is_refused_even_inside_a_query(spark, run, capsys):
    # reflect() reaches any static Java method (System.exit, FileUtil.chmod); valueOf is a harmless stand-in.
    code = cli.main(glan_sql(run, "SELECT IDENTIFIER('reflect')('java.lang.String', 'valueOf', n) FROM questions"))
    assert code == 2
    assert "refused reflect(), which calls Java methods" in capsys.readouterr().err


@pytest.mark.parametrize(("query", "expected"), [
    ("SELECT question_id, n FROM questions WHERE n > 1 ORDER BY n", [{"question_id": "q2", "n": 2}, {"question_id": "q3", "n": 3}]),
    ("WITH done AS (SELECT question_id FROM answers) SELECT count(*) AS c FROM questions JOIN done USING (question_id)", [{"c": 2}]),
    ("SELECT question_id FROM questions WHERE question_id NOT IN (SELECT question_id FROM answers)", [{"question_id": "q3"}]),
    ("FROM questions |> WHERE n = 1 |> SELECT question_id", [{"question_id": "q1"}]),
    ("VALUES (1, 'a') AS t(x, y)", [{"x": 1, "y": "a"}]),
    ("SELECT * FROM VALUES (1 + 1) AS t(x)", [{"x": 2}]),
    ("TABLE answers ORDER BY question_id LIMIT 1", [{"question_id": "q1", "answer": "a1"}]),
    ("SHOW COLUMNS IN answers", [{"col_name": "question_id"}, {"col_name": "answer"}]),
])
def test_queries_still_run(spark, run, capsys, query, expected):
    code = cli.main(glan_sql(run, query, "--format", "json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == expected


@pytest.mark.parametrize(("query", "first_column"), [
    ("SHOW TABLES", "namespace"),
    ("SHOW VIEWS", "namespace"),
    ("DESCRIBE answers", "col_name"),
    ("DESCRIBE QUERY SELECT * FROM answers", "col_name"),
    ("EXPLAIN SELECT * FROM answers", "plan"),
    ("SHOW FUNCTIONS LIKE 'abs'", "function"),
])
def test_show_describe_and_explain_run(spark, run, capsys, query, first_column):
    code = cli.main(glan_sql(run, query, "--format", "csv"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.split("\n", 1)[0].split(",")[0] == first_column


def test_csv_lines_end_with_a_newline_only(spark, run, capsys):
    assert cli.main(glan_sql(run, "SELECT n FROM questions ORDER BY n", "--format", "csv")) == 0
    assert capsys.readouterr().out == "n\n1\n2\n3\n"  # `| tail -1` is "3", not "3\r"


def test_json_prints_one_object_per_line(spark, run, capsys):
    query = "SELECT question_id, named_struct('n', n, 'tags', array('a\nb')) AS detail FROM questions ORDER BY n"
    assert cli.main(glan_sql(run, query, "--format", "json")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"question_id": "q1", "detail": {"n": 1, "tags": ["a\nb"]}}


@pytest.mark.slow
def test_insert_overwrite_directory_from_the_shell_is_refused_as_the_last_line(run):
    """The reported case, end to end in a fresh process: exit 2, and the table and its log survive."""
    before = files_of(run)
    query = f"INSERT OVERWRITE DIRECTORY '{run}/questions' USING parquet SELECT 1 AS x"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli.main", *glan_sql(run, query)], cwd=run.parent,
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert stderr.splitlines()[-1].startswith("glan: error: glan sql only reads"), stderr
    assert "Traceback" not in stderr and "at org.apache" not in stderr
    assert files_of(run) == before
    assert (run / "questions" / "_delta_log").is_dir()
    assert DeltaTable(str(run / "questions")).to_pyarrow_table().num_rows == 3
