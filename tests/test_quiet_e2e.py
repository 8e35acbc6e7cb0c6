"""A tiny end-to-end run of every stage through the real `rglf` executable (one small Ray run): without
--verbose, stdout holds our own lines only and stderr holds nothing but StageProgress lines (one
progress source, no Ray / transformers chatter, at the file-descriptor level)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rglf.model.toy import DEFAULT_CHECKPOINT

RGLF = Path(sys.executable).parent / "rglf"
# a StageProgress line in non-terminal mode: "<label>: <done>[/<total>] <unit> ..." (units: samples, steps, MiB, ...)
PROGRESS = re.compile(r"^[a-z][a-z -]*: [\d,]+(/[\d,]+)? [A-Za-z]+( \(\d+%\))?(, .*)?$")
CHATTER = re.compile(
    r"\bINFO\b|\bWARNING\b|\bWARN\b|Loading weights|core_worker|raylet|\(pid=|Tip:|Traceback|it/s\]|"
    r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d"
)


def rglf(*args, expect: int = 0) -> tuple[str, str]:
    done = subprocess.run([str(RGLF), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, f"rglf {' '.join(map(str, args))}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    for line in done.stderr.splitlines():
        assert PROGRESS.match(line), f"rglf {args[0]}: stderr line that is not progress: {line!r}\n{done.stderr}"
    assert not CHATTER.search(done.stdout), f"rglf {args[0]}: chatter on stdout:\n{done.stdout}"
    return done.stdout, done.stderr


@pytest.mark.slow
def test_every_stage_is_quiet_without_verbose(tmp_path):
    data, run, rank, router = tmp_path / "data", tmp_path / "run", tmp_path / "rank", tmp_path / "router"
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rglf-e2e-")  # unix sockets live there: keep the path short
    try:
        out, _ = rglf("toy", "data", "--out", data, "--n-samples", "20")
        assert out.startswith("toy data:")
        out, _ = rglf("ingest", data / "train.json", data / "val.json", data / "test.json", "--image-root", data,
                      "--run", run)
        assert out.startswith("ingest: 20 samples")

        config = tmp_path / "score.toml"  # values from a file; the record beside run.json repeats them
        config.write_text(f'run = "{run}"\nmodel = "{DEFAULT_CHECKPOINT}"\nworkers = 1\nbatch-size = 8\nnum-cpus = 2\nobject-store-mb = 100\n'
                          f'ray-temp-dir = "{ray_tmp}"\n')
        out, err = rglf("score", "--config", config)
        assert "20/20 samples scored" in out
        assert json.loads((run / "run.json").read_text())["config"]["batch_size"] == 8
        record = (run / "score.toml").read_text()
        assert "batch-size = 8" in record and f'run = "{run}"' in record

        out, err = rglf("rank", "--run", run, "--out", rank)
        assert out.startswith("rank: 20 of 20 samples ranked") and err.startswith("rank: ")
        out, err = rglf("train", "--run", run, "--rank", rank, "--out", router, "--max-steps", "2", "--batch-size", "8",
                        "--torch-threads", "1")
        assert out.startswith("train: 2 steps") and "train: 2/2 steps" in err
        out, err = rglf("eval", "--run", run, "--rank", rank, "--router", router, "--out", tmp_path / "eval",
                        "--budgets", "0.5,1.0")
        assert "APGR" in out and "eval: " in out and (tmp_path / "eval" / "confusion.png").is_file()
        out, _ = rglf("report", "--rank", rank, "--run", run, "--out", tmp_path / "report")
        assert out.startswith("report: 4 files")
        assert "errors: empty (0 rows)" in (tmp_path / "report" / "report.md").read_text()

        routed = tmp_path / "routed.parquet"
        out, err = rglf("route", "--router", router, "--data", data / "test.json", "--image-root", data, "--out",
                        routed, "--answer")
        assert re.match(r"route: \d+ of \d+ records routed; mean [\d,]+ visual tokens", out) and "route: " in err
        assert pq.read_table(routed).num_rows == len(json.loads((data / "test.json").read_text()))
        image = next((data / "images").glob("*.png"))
        out, err = rglf("route", "--router", router, "--image", image, "--question", "What colour is the background?",
                        "--answer")
        assert out.startswith("level: ") and "answer: " in out and err == ""

        # --quiet: the final summary line only, nothing on stderr
        out, err = rglf("eval", "--run", run, "--rank", rank, "--router", router, "--out", tmp_path / "eval2",
                        "--budgets", "0.5", "--quiet")
        assert out.count("\n") == 1 and out.startswith("eval: ") and err == ""
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
