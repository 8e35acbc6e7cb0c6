"""``rglf score`` resumes: a job SIGKILLed mid-run and re-run gives the same table as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rglf.cli import app
from rglf.model.tables import ERRORS_SCHEMA, FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA
from rglf.model.toy.task import TOY_VOCABULARY, ToyDatasetConfig, write_dataset
from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint
from rglf.pipeline.images import load_images
from rglf.pipeline.ingest import IngestConfig, run_ingest
from rglf.pipeline.score import Scorer, resolve_model, select_pending
from rglf.pipeline.writer import part_files

RGLF = Path(sys.executable).parent / "rglf"
N_SAMPLES = 16


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of the session the killed job started: its Ray head, raylet, workers."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return [int(pid) for pid, s, stat in rows if int(s) == sid and not stat.startswith("Z")]


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of the job's session, by pid, and wait until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not session_pids(sid), "the killed job left processes behind"


def score_command(run: Path, ckpt: Path, ray_temp: str, *extra: str) -> list[str]:
    return [str(RGLF), "score", "--run", str(run), "--model", str(ckpt), "--batch-size", "1", "--num-cpus", "2",
            "--object-store-mb", "300", "--ray-temp-dir", ray_temp, *extra]


def uninterrupted_reference(run: Path, ckpt: Path, out: Path) -> Path:
    """The same stages in one process, without Ray or interruption: read -> load_images -> score + write."""
    out.mkdir()
    model_id, ladder = resolve_model(ckpt, None)
    samples = pq.read_table(run / "samples")
    batch = select_pending(samples, skip=set(), partial={}, levels=list(ladder.tokens))
    batch = load_images(batch, model=str(ckpt))
    scorer = Scorer(model=str(ckpt), out=str(out), device="cpu", dtype="auto", ladder=ladder.spec, model_id=model_id,
                    max_batch_tokens=32768, max_batch_size=64, encode_batch=16)
    scorer(batch)
    return out


def table(run: Path, name: str, schema: pa.Schema, key: list[str]) -> list[dict]:
    rows = [r for f in part_files(run, name) for r in pq.read_table(f, schema=schema).to_pylist()]
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


def assert_same_tables(run: Path, ref: Path) -> None:
    feedback, expected = (table(p, "feedback", FEEDBACK_SCHEMA, ["sample_id", "level_tokens"]) for p in (run, ref))
    keys = [(r["sample_id"], r["level_tokens"]) for r in feedback]
    assert len(keys) == len(set(keys)), "duplicate (sample_id, level_tokens) rows"
    assert keys == [(r["sample_id"], r["level_tokens"]) for r in expected]
    for got, want in zip(feedback, expected, strict=True):
        for column in ("nll_mean", "nll_sum"):  # batches differ (padding), so float noise only
            assert got[column] == pytest.approx(want[column], abs=1e-5)
        assert {k: v for k, v in got.items() if k not in ("nll_mean", "nll_sum")} == {
            k: v for k, v in want.items() if k not in ("nll_mean", "nll_sum")
        }
    router, expected = (table(p, "router_inputs", ROUTER_INPUTS_SCHEMA, ["sample_id"]) for p in (run, ref))
    assert [r["sample_id"] for r in router] == [r["sample_id"] for r in expected] and len(router) == N_SAMPLES
    assert [r["instruction_ids"] for r in router] == [r["instruction_ids"] for r in expected]
    assert table(run, "errors", ERRORS_SCHEMA, ["sample_id"]) == table(ref, "errors", ERRORS_SCHEMA, ["sample_id"])


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_table(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", *build_tiny_model(TOY_VOCABULARY, image_size=48, max_positions=1024))
    write_dataset(tmp_path / "data", ToyDatasetConfig(n_samples=N_SAMPLES, seed=2, aspect_probs=(0.4, 0.3, 0.3)))
    run = tmp_path / "run"
    inputs = [tmp_path / "data" / f"{s}.json" for s in ("train", "val", "test")]
    run_ingest(IngestConfig(inputs=inputs, image_root=tmp_path / "data", out=run), log=lambda _: None)
    ray_temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    jobs: list[subprocess.Popen] = []

    def start(name: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        job = subprocess.Popen(score_command(run, ckpt, ray_temp), stdout=log, stderr=subprocess.STDOUT,
                               env=env, start_new_session=True)
        jobs.append(job)
        return job

    try:
        # 1. start the job; SIGKILL it (and every process it started) once the first batch is committed
        job = start("killed")
        deadline = time.monotonic() + 240
        while not part_files(run, "feedback"):
            assert job.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no feedback part appeared"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
        kill_session(job.pid)
        job.wait()
        committed = len(part_files(run, "feedback"))
        assert 1 <= committed < N_SAMPLES, "the job was not interrupted partway"
        assert json.loads((run / "run.json").read_text())["status"] == "running"
        # leftovers a kill can leave: a temporary file and a batch without its feedback part
        (run / "feedback" / ".part-0123.parquet.abcd.tmp").write_bytes(b"half a file")
        orphan = run / "router_inputs" / "part-00000000000000000000.parquet"
        shutil.copy(part_files(run, "router_inputs")[0], orphan)

        # 2. re-run to completion: only the missing samples are scored
        rerun = start("rerun")
        assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
        record = json.loads((run / "run.json").read_text())
        last = record["history"][-1]
        assert record["status"] == "complete" and record["counts"]["skipped_done"] == committed
        assert [h["status"] for h in record["history"]] == ["interrupted", "complete"]
        assert last["processed"] == N_SAMPLES - committed and last["removed_leftovers"] == 2
        assert not orphan.exists() and not list((run / "feedback").glob(".*"))
    finally:
        for job in jobs:  # whatever happened, leave no process of ours behind
            kill_session(job.pid)
        shutil.rmtree(ray_temp, ignore_errors=True)

    # 3. the same table as an uninterrupted run: same rows, no duplicates
    assert_same_tables(run, uninterrupted_reference(run, ckpt, tmp_path / "reference"))

    # 4. a rerun on a complete output scores nothing (and needs no Ray at all)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    runner = CliRunner()
    result = runner.invoke(app, ["score", "--run", str(run), "--model", str(ckpt), "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert f"{N_SAMPLES} already done, 0 to score" in result.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")} == before
    assert json.loads((run / "run.json").read_text())["history"][-1]["processed"] == 0

    # 5. a different ladder on the same folder is refused, and nothing is touched
    result = runner.invoke(app, ["score", "--run", str(run), "--model", str(ckpt), "--ladder", "9,36,144"])
    assert result.exit_code == 2 and "different configuration" in result.output and "--force" in result.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")} == before
