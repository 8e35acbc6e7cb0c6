"""`rglf sql`: queries over the registered views through the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_rank import feedback_rows, write_feedback
from typer.testing import CliRunner

from rglf.cli import app
from rglf.model.tables import ERRORS_SCHEMA
from rglf.pipeline.query import SqlConfig, _visible_columns, open_catalog
from rglf.pipeline.rank import RankConfig, run_rank

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A scoring output folder (feedback + errors, no samples) and its rank folder."""
    tmp = tmp_path_factory.mktemp("query")
    rows = (
        feedback_rows("a", {36: 0.1, 72: 0.5}, source="docs")
        + feedback_rows("b", {36: 0.9, 72: 0.2}, source="docs")
        + feedback_rows("c", {36: 0.3, 72: 0.3}, source="charts", split=None)
        + feedback_rows("d", {36: float("nan"), 72: 0.3}, source="charts")
    )
    run = write_feedback(tmp / "run", rows)
    (run / "errors").mkdir()
    errors = [
        {
            "sample_id": "e1",
            "stage": "load_image",
            "reason": "missing file",
            "source": "docs",
            "detail": "x.png",
        }
    ]
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), run / "errors" / "part-0.parquet")
    rank = tmp / "rank"
    run_rank(RankConfig(feedback=run, out=rank))
    return run, rank


def sql(*args: str):
    return runner.invoke(app, ["sql", *args])


def test_query_over_registered_views_returns_expected_rows(folders: tuple[Path, Path]) -> None:
    run, rank = folders
    result = sql(
        "SELECT sample_id, best_level_tokens FROM rankings WHERE rank = 1 ORDER BY sample_id",
        "--rank",
        str(rank),
        "--format",
        "csv",
    )
    assert result.exit_code == 0, result.output
    assert list(csv.DictReader(io.StringIO(result.stdout))) == [
        {"sample_id": "a", "best_level_tokens": "36"},
        {"sample_id": "b", "best_level_tokens": "72"},
        {"sample_id": "c", "best_level_tokens": "36"},  # a tie: the cheaper level
    ]


def test_table_format_is_the_default_and_joins_run_and_rank_views(folders: tuple[Path, Path]) -> None:
    run, rank = folders
    query = (
        "SELECT f.source, count(DISTINCT f.sample_id) AS n, (SELECT count(*) FROM errors) AS n_errors "
        "FROM feedback f JOIN excluded x USING (sample_id) GROUP BY ALL"
    )
    result = sql(query, "--run", str(run), "--rank", str(rank))
    assert result.exit_code == 0, result.output
    assert "charts" in result.stdout and "n_errors" in result.stdout
    body = [line for line in result.stdout.splitlines() if "charts" in line][0]
    assert body.split()[2:] == ["│", "1", "│", "1", "│"]


def test_json_output_and_nan_becomes_null(folders: tuple[Path, Path]) -> None:
    run, _ = folders
    result = sql(
        "SELECT sample_id, level_tokens, nll_mean, split FROM feedback WHERE sample_id IN ('c', 'd') "
        "AND level_tokens = 36 ORDER BY sample_id",
        "--run",
        str(run),
        "-f",
        "json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"sample_id": "c", "level_tokens": 36, "nll_mean": 0.3, "split": None},
        {"sample_id": "d", "level_tokens": 36, "nll_mean": None, "split": "train"},
    ]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_output_file_is_written(folders: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    _, rank = folders
    target = tmp_path / "sub" / f"prefs.{fmt}"
    result = sql("SELECT * FROM preferences", "--rank", str(rank), "-f", fmt, "-o", str(target))
    assert result.exit_code == 0, result.output
    n_rows = 3 * 3  # (docs, charts, __all__) x (2 fixed levels + oracle)
    if fmt == "parquet":
        assert pq.read_table(target).num_rows == n_rows
    elif fmt == "json":
        assert len(json.loads(target.read_text())) == n_rows
    else:
        assert len(list(csv.DictReader(target.open()))) == n_rows
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left


def test_bad_sql_exits_1_with_duckdbs_message(folders: tuple[Path, Path]) -> None:
    _, rank = folders
    result = sql("SELECT * FROM rankingz", "--rank", str(rank))
    assert result.exit_code == 2
    assert "Catalog Error" in result.stderr and "rankingz" in result.stderr
    assert "Traceback" not in result.output
    result = sql("SELEC 1")
    assert result.exit_code == 2 and "Parser Error" in result.stderr
    result = sql("SELECT 'x'::INTEGER", "-f", "csv")  # fails at run time, not at bind time
    assert result.exit_code == 2 and "Conversion Error" in result.stderr


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    assert sql("SELECT 1", "-f", "xml").exit_code == 2
    assert sql("SELECT 1", "-f", "parquet").exit_code == 2  # needs --output
    assert sql("SELECT 1", "--run", str(tmp_path / "missing")).exit_code == 2


def test_catalog_registers_only_existing_tables(folders: tuple[Path, Path]) -> None:
    run, rank = folders
    con, views = open_catalog(run=run)
    assert set(views) == {"feedback", "errors"}  # no samples/ in this run folder
    con.close()
    con, views = open_catalog(rank=rank)  # feedback found through rank_report.json
    assert set(views) == {"rankings", "pairs", "preferences", "excluded", "feedback"}
    assert con.sql("SELECT count(*) FROM feedback").fetchall() == [(8,)]
    con.close()


def test_a_run_without_rejections_has_an_empty_errors_table(tmp_path: Path) -> None:
    run = write_feedback(tmp_path / "run", feedback_rows("a", {36: 0.1, 72: 0.5}))
    result = sql("select stage, count(*) as n from errors group by stage", "--run", str(run), "--format", "csv")
    assert result.exit_code == 0, result.output
    assert list(csv.DictReader(io.StringIO(result.stdout))) == []
    con, _ = open_catalog(run=run)
    assert [c[0] for c in con.sql("describe errors").fetchall()] == ERRORS_SCHEMA.names
    con.close()


def test_wide_tables_hide_middle_columns_on_a_narrow_terminal() -> None:
    assert _visible_columns([5, 5, 5], 80) == [0, 1, 2]
    assert _visible_columns([10] * 10, 60) == [0, 1, 9]  # outer columns first, alternating
    assert _visible_columns([10] * 10, 73) == [0, 1, 8, 9]
    with pytest.raises(ValueError):
        SqlConfig(query="  ")


# ---- read-only (issue 13, case 2) -------------------------------------------------------------


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("copy (select 1 as x) to '{part}'", "COPY"),
        ("copy (select 1 as x) to '{part}' (use_tmp_file false)", "COPY"),
        ("copy feedback to '{tmp}/stolen.csv'", "COPY"),
        ("select * from read_text('/etc/passwd')", "read-only"),
        ("select * from read_csv('/etc/passwd', sep = ':')", "read-only"),
        ("select * from read_parquet('{part}')", "read-only"),
        ("select * from glob('/etc/*')", "read-only"),
        ("attach '{tmp}/other.db' as other", "ATTACH"),
        ("attach ':memory:' as m", "ATTACH"),
        ("install httpfs", "INSTALL/LOAD"),
        ("load httpfs", "INSTALL/LOAD"),
        ("set enable_external_access = true", "locked"),
        ("set threads = 1", "locked"),
        ("reset lock_configuration", "locked"),
        ("export database '{tmp}/dump'", "EXPORT"),
        ("select 1; copy (select 2) to '{tmp}/x.csv'; select 3", "COPY"),
    ],
)
def test_sql_cannot_write_or_read_other_files(folders: tuple[Path, Path], tmp_path: Path, query: str, words: str) -> None:
    run, rank = folders
    part = sorted((run / "feedback").glob("*.parquet"))[0]
    before = part.read_bytes()
    result = sql(query.format(part=part, tmp=tmp_path), "--run", str(run), "--rank", str(rank))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert "read-only" in line and words in line, line
    assert part.read_bytes() == before  # the committed part is untouched
    assert list(tmp_path.iterdir()) == []  # and nothing was written anywhere else


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_timestamp_with_time_zone_needs_no_pytz(fmt: str) -> None:
    result = sql("select now() as t, [now()] as l, 1 as n", "--format", fmt)
    assert result.exit_code == 0, result.output
    assert "pytz" not in result.output and re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d", result.stdout), result.output


def test_output_is_the_only_write_and_only_to_the_named_file(folders: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = folders
    target = tmp_path / "out" / "result.parquet"
    result = sql("select sample_id, now() as at from feedback", "--run", str(run), "-f", "parquet", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert pq.read_table(target).num_rows == 8
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["out", "out/result.parquet"]
    result = sql("select 1", "-f", "csv", "-o", str(tmp_path))  # a folder, not a file
    assert result.exit_code == 2 and "is a folder" in _one_error_line(result)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see the query running")
def test_ctrl_c_stops_a_long_query_with_one_line() -> None:
    """DuckDB does not return to Python while a query runs: the query runs in a helper thread and
    Ctrl-C interrupts the connection."""
    rglf = Path(sys.executable).parent / "rglf"
    proc = subprocess.Popen([str(rglf), "sql", "select sum(range * 7 % 13) from range(100000000000)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
        while proc.poll() is None and _cpu_seconds(proc.pid) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # imports take ~1 s of CPU; beyond that the query is running
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == ["sql interrupted: the query was stopped; nothing was written."]
