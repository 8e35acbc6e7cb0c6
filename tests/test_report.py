"""`rglf report`: PNG plots and report.md from a rank folder."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_rank import LADDER, feedback_rows, write_feedback
from typer.testing import CliRunner

from rglf.cli import app
from rglf.model.tables import ERRORS_SCHEMA
from rglf.pipeline.rank import RankConfig, run_rank
from rglf.pipeline.report import PLOTS, ReportConfig, run_report


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A scoring run with two sources (one prefers coarse levels, one fine), one error, and its rank."""
    tmp = tmp_path_factory.mktemp("report")
    rows = []
    for s in range(12):
        coarse = s % 2 == 0
        nlls = {t: (0.2 if coarse else 1.0 - t / 1000) + 0.01 * (s % 3) for t in LADDER}
        rows += feedback_rows(
            f"s{s}",
            nlls,
            source="gqa" if coarse else "docvqa",
            greedy={t: coarse or t == 576 for t in LADDER},
        )
    rows += feedback_rows("bad", {36: float("nan"), **{t: 0.3 for t in LADDER[1:]}}, source="gqa")
    run = write_feedback(tmp / "run", rows)
    (run / "errors").mkdir()
    errors = [
        {
            "sample_id": "e1",
            "stage": "load_image",
            "reason": "unreadable image",
            "source": "gqa",
            "detail": "",
        }
    ]
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), run / "errors" / "part-0.parquet")
    rank = tmp / "rank"
    run_rank(RankConfig(feedback=run, out=rank))
    return run, rank


def test_report_writes_valid_pngs_and_markdown(folders: tuple[Path, Path], tmp_path: Path) -> None:
    run, rank = folders
    out = tmp_path / "report"
    result = run_report(ReportConfig(rank=rank, out=out, run=run))
    for name in PLOTS:
        png = out / f"{name}.png"
        assert result["files"][name] == str(png)
        assert png.stat().st_size > 10_000
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 200
            assert len(set(im.convert("L").resize((64, 32)).getdata())) > 8  # not a blank canvas
    md = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name}.png)" in md
    assert "| source | policy | tokens/crop |" in md
    assert md.count("| oracle |") == 3 and "| all sources | oracle |" in md
    assert "samples ranked: 12 of 13" in md and "nan_nll 1" in md
    assert "unreadable image" in md and "samples: missing (no samples/ folder)" in md
    assert "feedback: 65 rows" in md and "errors: 1 row" in md
    assert "rankings: 60 rows" in md and "excluded: 1 row" in md
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.png" for n in PLOTS), "report.md"])


def test_cli_report(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, rank = folders
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--rank", str(rank), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "frontier.png").is_file() and (tmp_path / "r" / "report.md").is_file()
    result = runner.invoke(app, ["report", "--rank", str(tmp_path), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 4
    assert result.stderr.count("\n") == 1 and "no rankings there" in result.stderr and "rglf rank" in result.stderr


def test_report_without_ranked_samples_says_so(tmp_path: Path) -> None:
    run = write_feedback(tmp_path / "run", feedback_rows("a", {36: float("inf"), 72: 0.1}))
    run_rank(RankConfig(feedback=run, out=tmp_path / "rank"))
    result = run_report(ReportConfig(rank=tmp_path / "rank", out=tmp_path / "out"))
    assert list(result["files"]) == ["report"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No ranked samples" in md and "rankings: empty (0 rows)" in md  # empty, not missing


def test_run_tables_empty_is_not_missing(tmp_path: Path) -> None:
    from rglf.pipeline.report import describe_table, table_state

    run = write_feedback(tmp_path / "run", feedback_rows("a", {t: 0.1 for t in LADDER}))
    (run / "errors").mkdir()  # a run that rejected nothing: the folder exists, no parts
    (run / "samples").mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=ERRORS_SCHEMA), run / "samples" / "part-0.parquet")
    assert table_state(run, "feedback") == ("rows", 5)
    assert table_state(run, "errors") == ("empty", 0) and table_state(run, "samples") == ("empty", 0)
    assert table_state(run, "router_inputs") == ("missing", None)
    assert describe_table("errors", ("empty", 0)) == "errors: empty (0 rows)"
    assert describe_table("router_inputs", ("missing", None)) == "router_inputs: missing (no router_inputs/ folder)"
