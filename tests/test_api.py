"""`import rglf`: the Python API (lazy, cheap), its table openers and stage functions, and the
installed layout (one `rglf` package, nothing generic in site-packages)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import rglf

REPO = Path(__file__).resolve().parents[1]


def test_import_rglf_is_cheap_and_names_resolve_lazily():
    code = (
        "import sys, rglf\n"
        "heavy = [m for m in ('torch', 'ray', 'duckdb', 'polars', 'transformers', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert rglf.TrainConfig.__module__ == 'rglf.router.train' and rglf.Router.__module__ == 'rglf.router.route'\n"
        "assert callable(rglf.score) and callable(rglf.open_run) and 'Router' in dir(rglf)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rglf.nope  # noqa: B018


def test_open_run_and_rank_and_the_stage_functions(tmp_path):
    import polars as pl
    from test_rank import LADDER, feedback_rows, write_feedback

    rows = [r for s in range(6) for r in feedback_rows(f"s{s}", {t: 0.5 - t / 2000 + 0.01 * s for t in LADDER},
                                                        source="a" if s % 2 else "b")]
    run = write_feedback(tmp_path / "run", rows)
    (run / "samples").mkdir()  # exists, no parts: empty, not missing
    report = rglf.rank(rglf.RankConfig(feedback=run, out=tmp_path / "rank"), progress=lambda *a: None)
    assert report["n_samples_ranked"] == 6

    tables = rglf.open_run(run)
    assert set(tables) == {"samples", "feedback", "errors"}  # router_inputs/: missing, left out
    assert all(isinstance(t, pl.LazyFrame) for t in tables.values())
    assert tables["feedback"].select(pl.len()).collect().item() == 30
    assert tables["errors"].collect().height == 0 and "code" in tables["errors"].collect_schema().names()
    assert tables["samples"].collect().height == 0 and "turns" in tables["samples"].collect_schema().names()

    rank = rglf.open_rank(tmp_path / "rank")
    assert set(rank) == {"rankings", "pairs", "preferences", "excluded"}
    best = rank["rankings"].filter(pl.col("rank") == 1).collect()
    assert best.height == 6 and set(best["level_tokens"]) == {576}  # NLL falls with tokens here
    with pytest.raises(FileNotFoundError):
        rglf.open_rank(tmp_path / "nope")

    files = rglf.report(rglf.ReportConfig(rank=tmp_path / "rank", out=tmp_path / "report", run=run))["files"]
    assert Path(files["report"]).is_file() and "samples: empty (0 rows)" in Path(files["report"]).read_text()


def test_ingest_reports_progress_through_the_api(tmp_path):
    import json

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": f"s{i}", "conversations": [{"from": "human", "value": "Hi?"},
                                                                   {"from": "gpt", "value": "Yes."}]} for i in range(5)]))
    calls = []
    report = rglf.ingest(rglf.IngestConfig(inputs=[data], image_root=tmp_path, out=tmp_path / "run"),
                         log=lambda _: None, progress=lambda done, total, fields: calls.append((done, total, fields)))
    assert report.exit_code == 0 and calls and calls[-1][0] == calls[-1][1] and calls[-1][2]["records"] == 5


@pytest.mark.slow
def test_non_editable_install_has_one_rglf_package_and_its_data(tmp_path):
    """`pip install --target` of the project (not editable): only `rglf` at the top, the SQL files and the
    committed checkpoint inside it, and every layer importable from another folder."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    target = tmp_path / "target"
    import importlib.util

    # the venv's own setuptools when it has one (no index needed), else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(target), str(src)],
        capture_output=True, text=True,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))} - {"bin"}
    assert top == {"rglf"}, top  # no top-level model / pipeline / router / cli / bench / tests
    pkg = target / "rglf"
    assert {p.name for p in (pkg / "pipeline" / "sql").glob("*.sql")} >= {"rankings.sql", "pairs.sql", "preferences.sql"}
    ckpt = pkg / "model" / "toy" / "default" / "avg-toy-llava-next"
    assert (ckpt / "model.safetensors").stat().st_size > 1_000_000 and (ckpt / "config.json").is_file()
    assert not (pkg / "tests").exists() and not (pkg / "bench").exists()

    code = (
        "import rglf, rglf.cli, rglf.pipeline.score, rglf.router.train, rglf.model.toy.stage1\n"
        "from rglf.pipeline.rank import load_sql\n"
        "from rglf.model.toy import DEFAULT_CHECKPOINT\n"
        f"assert rglf.__file__.startswith({str(target)!r}), rglf.__file__\n"
        f"assert str(DEFAULT_CHECKPOINT).startswith({str(target)!r})\n"
        "assert 'select' in load_sql('rankings').lower()\n"
        "import importlib.util as u\n"
        "assert all(u.find_spec(m) is None for m in ('model', 'pipeline', 'router', 'cli', 'bench'))\n"
    )
    # -S: no site-packages processing (the venv's editable-install hook would find the source tree);
    # the venv's site-packages on PYTHONPATH after the target, for the dependencies only
    site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{target}:{site}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
