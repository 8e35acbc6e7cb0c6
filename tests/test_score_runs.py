"""Trustworthy ``rglf score`` runs (issue 13, cases 4, 5, 8) and the index that makes resuming cheap (issue 15).

Most of these run the real ``run_score`` with the Ray pool replaced by an in-process loop over
the same stages (``in_process_pool``), so they need no Ray; the placement checks that do need
a cluster use a small local instance.
"""

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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import rglf.pipeline.score as score_module
from rglf.cli import app
from rglf.model.toy.task import ToyDatasetConfig, write_dataset
from rglf.pipeline import job
from rglf.pipeline.images import load_images
from rglf.pipeline.ingest import IngestConfig, run_ingest
from rglf.pipeline.score import (
    ScoreConfig,
    Scorer,
    fold_result,
    pending_batches,
    plan_run,
    resolve_model,
    run_score,
)
from rglf.pipeline.writer import INDEX_DIR, RunIndex, RunLock, RunLocked, part_files, part_path


@pytest.fixture
def run(tmp_path) -> Path:
    """An ingested run folder of 10 toy samples (images under tmp_path/data)."""
    data = tmp_path / "data"
    write_dataset(data, ToyDatasetConfig(n_samples=10, seed=5))
    out = tmp_path / "run"
    run_ingest(IngestConfig(inputs=[data / f"{s}.json" for s in ("train", "val", "test")], image_root=data, out=out),
               log=lambda _: None)
    return out


def in_process_pool(monkeypatch, *, fail_after: int | None = None, error: BaseException | None = None) -> list[int]:
    """Replace the Ray part of ``run_score`` by the same stages run here, batch by batch.

    After ``fail_after`` committed batches, ``error`` is raised (a Ctrl-C, a crash). Returns the
    list the batch sizes of each call are appended to.
    """
    calls: list[int] = []

    def fake(cfg, model_id, ladder, plan, index, report, log, progress, template="auto"):
        scorer = Scorer(model=str(cfg.model), out=str(cfg.run_dir), device="cpu", dtype="auto", ladder=ladder.spec,
                        model_id=model_id, max_batch_tokens=4096, max_batch_size=64, encode_batch=16,
                        router_inputs=cfg.router_inputs, template=template)
        for n, batch in enumerate(pending_batches(plan, cfg.batch_size, list(ladder.tokens))):
            if fail_after is not None and n == fail_after:
                raise error
            calls.append(batch.num_rows)
            fold_result(scorer(load_images(batch, model=str(cfg.model))), report, index, progress, plan.pending)

    monkeypatch.setattr(score_module, "_score_pending", fake)
    return calls


# --------------------------------------------------------------------------------------
# Case 5: one writer per run folder; history tells finished / interrupted / failed apart
# --------------------------------------------------------------------------------------


def test_history_tells_interrupted_failed_and_complete_runs_apart(run, tiny_ckpt, monkeypatch):
    cfg = ScoreConfig(run_dir=run, model=tiny_ckpt, batch_size=3)
    in_process_pool(monkeypatch, fail_after=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match="interrupted after 2 committed batches .6 samples.*remaining 4"):
        run_score(cfg, log=lambda _: None)
    assert len(part_files(run, "feedback")) == 2
    in_process_pool(monkeypatch, fail_after=0, error=RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_score(cfg, log=lambda _: None)
    calls = in_process_pool(monkeypatch)
    report = run_score(cfg, log=lambda _: None)
    assert calls == [3, 1] and report.skipped_done == 6 and report.scored_samples == 10
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["status"] for h in history] == ["interrupted", "failed", "complete"]
    assert history[0]["processed"] == 6 and history[1]["error"] == "RuntimeError: disk on fire"
    assert history[2]["pending_at_start"] == 4


def test_a_second_writer_is_refused_with_the_holders_name(run, tiny_ckpt, monkeypatch):
    in_process_pool(monkeypatch)
    with RunLock.acquire(run, "rglf score") as held:
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        result = CliRunner().invoke(app, ["score", "--run", str(run), "--model", str(tiny_ckpt)])
        assert result.exit_code == 6, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith(f"error: {run}: locked by `rglf score`")
        assert f"pid {os.getpid()}" in line and held.record["host"] in line and held.record["started"] in line
        result = CliRunner().invoke(app, ["ingest", str(run / "x.json"), "--image-root", str(run), "--run", str(run),
                                          "--force"])
        assert result.exit_code in (2, 6)  # the input is missing (2) before the lock is even tried
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    run_score(ScoreConfig(run_dir=run, model=tiny_ckpt), log=lambda _: None)  # released: runs


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import os, signal, sys; from rglf.pipeline.writer import RunLock; "
            "RunLock.acquire(sys.argv[1], 'rglf score'); print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout
    lock = RunLock.acquire(tmp_path, "rglf score")
    assert lock.previous is not None and lock.previous["pid"] != os.getpid()  # the dead holder, for the log line
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock.acquire(tmp_path, "rglf ingest")
    lock.release()
    RunLock.acquire(tmp_path, "rglf ingest").release()


def test_a_live_holder_in_another_process_is_never_taken_over(tmp_path):
    code = ("import sys, time; from rglf.pipeline.writer import RunLock; "
            "RunLock.acquire(sys.argv[1], 'rglf score'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {proc.pid} on "):
            RunLock.acquire(tmp_path, "rglf score")
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------
# Case 4: a relative image root can never make samples unretryable
# --------------------------------------------------------------------------------------


def test_a_relative_image_root_that_does_not_resolve_refuses_before_rejecting_anything(run, tiny_ckpt, monkeypatch,
                                                                                         tmp_path):
    # an older ingest stored the root as given: make it relative, as it was
    samples = next((run / "samples").glob("*.parquet"))
    table = pq.read_table(samples)
    table = table.set_column(table.schema.get_field_index("image_root"), "image_root",
                             pa.array(["data"] * table.num_rows, pa.string()))
    pq.write_table(table, samples)
    in_process_pool(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["score", "--run", str(run), "--model", str(tiny_ckpt)])
    assert result.exit_code == 2, result.output
    assert f"{elsewhere / 'data'}: the image root of the pending samples is not a folder here" in result.output
    assert not part_files(run, "errors") and not part_files(run, "feedback")  # nothing marked done
    monkeypatch.chdir(tmp_path)  # from the right folder the same samples are all still pending, and score
    report = run_score(ScoreConfig(run_dir=run, model=tiny_ckpt), log=lambda _: None)
    assert report.scored_samples == 10 and report.rejected_samples == 0


# --------------------------------------------------------------------------------------
# Issue 15: planning and the end-of-job checks read the index, not the history
# --------------------------------------------------------------------------------------


def test_planning_reads_each_part_at_most_once_and_only_when_the_index_misses_it(run, tiny_ckpt, monkeypatch):
    cfg = ScoreConfig(run_dir=run, model=tiny_ckpt, batch_size=2)
    in_process_pool(monkeypatch)
    run_score(cfg, log=lambda _: None)
    assert len(list((run / INDEX_DIR).glob("seg-*.parquet"))) == 1  # compacted at the end

    reads = []
    real = pq.read_table

    def counting(path, *args, **kwargs):
        reads.append(Path(path).parent.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting)
    index = RunIndex.load(run)
    assert index.parts_read == 0 and not [r for r in reads if r in ("feedback", "errors", "router_inputs")]
    # a killed run's batch, committed after its last index flush, and a part changed on disk: read once each
    shutil.rmtree(run / INDEX_DIR)
    RunIndex.load(run)
    reads.clear()
    first = part_files(run, "feedback")[0]
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
    index = RunIndex.load(run)
    assert index.parts_read == 1 and reads.count("feedback") == 1
    reads.clear()
    index = RunIndex.load(run)
    assert index.parts_read == 0 and reads.count("feedback") == 0
    # many parts missing from the index are read in one bulk scan, to the same rows as part by part
    from rglf.pipeline.writer import _part_keys, _read_part, _read_parts

    listing = _part_keys(run, "feedback", with_stat=True)

    def canonical(t: pa.Table) -> list[dict]:
        rows = [r | {"levels": sorted(r["levels"])} for r in t.to_pylist()]
        return sorted(rows, key=lambda r: (r["part"], r["sample_id"]))

    assert len(listing) > 4
    assert canonical(_read_parts(run, sorted(listing), listing)) == canonical(
        pa.concat_tables([_read_part(run, k, listing[k]) for k in sorted(listing)]))
    # a part deleted by hand: its samples are pending again
    key = first.name.removeprefix("part-").removesuffix(".parquet")
    gone = set(pq.ParquetFile(first).read(columns=["sample_id"]).column("sample_id").to_pylist())
    first.unlink()
    part_path(run, "router_inputs", key).unlink(missing_ok=True)
    levels = list(resolve_model(tiny_ckpt, None)[1].tokens)
    plan = plan_run(run, RunIndex.load(run), levels, lambda _: None)
    pending = {s for b in pending_batches(plan, 16, levels) for s in b.column("sample_id").to_pylist()}
    assert pending == gone


def test_partially_scored_samples_get_only_their_missing_levels(run, tiny_ckpt, monkeypatch):
    in_process_pool(monkeypatch)
    run_score(ScoreConfig(run_dir=run, model=tiny_ckpt), log=lambda _: None)
    part = part_files(run, "feedback")[0]
    table = pq.read_table(part)
    dropped = table.column("sample_id")[0].as_py()
    levels = list(resolve_model(tiny_ckpt, None)[1].tokens)
    keep = pc.invert(pc.and_(pc.equal(table.column("sample_id"), dropped),
                             pc.equal(table.column("level_tokens"), levels[-1])))
    pq.write_table(table.filter(keep), part)
    index = RunIndex.load(run)
    done, partial = index.done(levels)
    assert partial == {dropped: [levels[-1]]} and dropped not in done.to_pylist()
    plan = plan_run(run, index, levels, lambda _: None)
    (batch,) = list(pending_batches(plan, 16, levels))
    assert batch.column("sample_id").to_pylist() == [dropped] and batch.column("levels").to_pylist() == [[levels[-1]]]


# --------------------------------------------------------------------------------------
# Case 8: impossible resources fail fast (exit 5)
# --------------------------------------------------------------------------------------


def test_placement_check_against_the_nodes_total_resources(monkeypatch):
    nodes = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 1.0, "scorer_slot": 1.0}]
    monkeypatch.setattr(job, "_node_resources", lambda: nodes)
    cuda = job.plan_placement({"CPU": 1, "GPU": 1}, 1, 0.5, "cuda")
    assert cuda.actors == 0 and "no GPU (CUDA is absent)" in cuda.detail
    assert job.plan_placement({"CPU": 1}, 3, 0.5, "cpu").actors == 3
    too_many = job.plan_placement({"CPU": 1}, 4, 0.5, "cpu")
    assert too_many.actors == 3 and "can host 3" in too_many.detail
    assert job.plan_placement({"CPU": 4}, 1, 0.5, "cpu").actors == 0
    slot = job.plan_placement({"CPU": 1, "scorer_slot": 1}, 1, 0.5, "cpu")
    assert slot.actors == 1 and not slot.images_in_actor
    full = job.plan_placement({"CPU": 1}, 3, 0.5, "cpu")
    assert full.images_in_actor  # every CPU holds an actor: images are loaded inside them


@pytest.mark.slow
def test_impossible_resources_fail_fast_with_one_line(run, tiny_ckpt):
    temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-")
    base = ["score", "--run", str(run), "--model", str(tiny_ckpt), "--num-cpus", "2", "--object-store-mb", "100",
            "--ray-temp-dir", temp]
    try:
        for extra, words in (
            (["--device", "cuda"], "the cluster has no GPU (CUDA is absent)"),
            (["--workers", "3"], "--workers 3 can never all be placed"),
        ):
            start = time.monotonic()
            proc = subprocess.run([str(Path(sys.executable).parent / "rglf"), *base, *extra], capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 5, proc.stderr
            (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
            assert words in line and "Traceback" not in proc.stderr
            assert time.monotonic() - start < 300  # a bound, not a benchmark: the old code waited forever
        assert not part_files(run, "feedback")
        assert json.loads((run / "run.json").read_text())["history"][-1]["status"] == "failed"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_pool_that_cannot_place_its_actors_says_so_and_fails_in_bounded_time(monkeypatch):
    """What the driver does when the cluster loses (or never had) room for any scorer actor."""
    import ray

    temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-")
    monkeypatch.setattr(job, "WAIT_NOTICE_S", 1.0)
    lines: list[str] = []
    ray.init(num_cpus=1, object_store_memory=80 * 2**20, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    try:
        pool = job.ScoringPool(
            score_module.ScorerActor, {}, score_module.load_images_quietly, {}, workers=1, cpus_per_worker=1,
            gpus_per_worker=0, worker_resources={"gone_node_slot": 1}, image_cpus=0.5, images_in_actor=False,
            log=lines.append,
        )
        with pytest.raises(job.ResourcesUnavailable, match="no scorer actor can be placed: the node is gone"):
            pool.run(iter([pa.table({"x": [1]})]), on_result=lambda _: None,
                     unplaceable=lambda: "the node is gone", placement_timeout=3.0)
        assert any(line.startswith("waiting: nothing committed for") and "up 0/1" in line for line in lines), lines
        pool.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_an_empty_samples_table_is_a_warning_and_exit_3(tmp_path, tiny_ckpt):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(empty), "--image-root", str(tmp_path), "--run", str(tmp_path / "run")])
    assert result.exit_code == 3, result.output
    result = runner.invoke(app, ["score", "--run", str(tmp_path / "run"), "--model", str(tiny_ckpt)])
    assert result.exit_code == 3, result.output
    assert "the samples table is empty" in result.output
    result = runner.invoke(app, ["score", "--run", str(tmp_path / "nothing"), "--model", str(tiny_ckpt)])
    assert result.exit_code == 4 and "rglf ingest" in result.output  # score before ingest
    assert not (tmp_path / "nothing").exists()
