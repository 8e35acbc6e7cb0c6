"""``rglf score`` on a two-node Ray cluster survives losing a node, with or without a replacement node:
nothing lost, nothing duplicated, and the job finishes."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rglf.model.tables import FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA
from rglf.model.toy.task import TOY_VOCABULARY, ToyDatasetConfig, write_dataset
from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint
from rglf.pipeline.ingest import IngestConfig, run_ingest
from rglf.pipeline.score import ScoreConfig, run_score
from rglf.pipeline.writer import part_files

N_SAMPLES = 24
MIB = 2**20


@pytest.fixture
def two_nodes(monkeypatch):
    """A head (2 CPUs) and a worker node (1 CPU) on this machine, each with ONE ``scorer_slot``."""
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-")
    (Path(temp) / "ray").mkdir()  # Ray's temp root for every node (short: unix socket paths are limited)
    monkeypatch.setenv("RAY_TMPDIR", temp)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=2, object_store_memory=200 * MIB, include_dashboard=False, resources={"scorer_slot": 1})
        worker = cluster.add_node(num_cpus=1, resources={"scorer_slot": 1}, object_store_memory=100 * MIB)
        ray.init(address=cluster.address)
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def scorer_nodes() -> set[str]:
    """Nodes with a live scorer actor (the GCS actor table: no dashboard needed)."""
    from ray._private.state import actors

    alive = actors(actor_state_name="ALIVE").values()
    return {a["Address"]["NodeID"] for a in alive if "Scorer" in a["ActorClassName"]}


@pytest.mark.slow
@pytest.mark.parametrize("replacement", [True, False], ids=["replaced", "no-spare-capacity"])
def test_losing_a_worker_node_mid_job_loses_and_duplicates_nothing(tmp_path, two_nodes, replacement):
    cluster, worker = two_nodes
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", *build_tiny_model(TOY_VOCABULARY, image_size=48, max_positions=1024))
    write_dataset(tmp_path / "data", ToyDatasetConfig(n_samples=N_SAMPLES, seed=4, aspect_probs=(0.4, 0.3, 0.3)))
    run = tmp_path / "run"
    inputs = [tmp_path / "data" / f"{s}.json" for s in ("train", "val", "test")]
    run_ingest(IngestConfig(inputs=inputs, image_root=tmp_path / "data", out=run), log=lambda _: None)

    # two actors, one per node (one scorer_slot each); image tasks at 0.25 CPU beside them
    cfg = ScoreConfig(run_dir=run, model=ckpt, workers=2, cpus_per_worker=0.5, image_cpus=0.25, batch_size=1,
                      worker_resources={"scorer_slot": 1}, progress=False)
    result: dict = {}

    def job() -> None:
        try:
            result["report"] = run_score(cfg, log=lambda _: None)
        except BaseException as err:  # surfaced below
            result["error"] = err

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    # Once a batch is committed and the worker node's scorer is up (so it holds batches), kill the
    # node. Its batches are re-queued to the head's actor; with a replacement node (as an autoscaler
    # would add) the lost actor also restarts there. (Cluster calls must come from the main thread.)
    deadline = time.monotonic() + 240
    while not (part_files(run, "feedback") and worker.node_id in scorer_nodes()):
        assert runner.is_alive(), result
        assert time.monotonic() < deadline, "the job never got going on both nodes"
        time.sleep(0.05)
    parts_at_loss = len(part_files(run, "feedback"))
    cluster.remove_node(worker)
    if replacement:  # as an autoscaler would; without it the job finishes on the head's actor
        cluster.add_node(num_cpus=1, resources={"scorer_slot": 1}, object_store_memory=100 * MIB)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the job hung after the node loss"
    assert "error" not in result, result
    report = result["report"]

    assert parts_at_loss < N_SAMPLES, "the job had finished before the node was lost"
    assert report.exit_code == 0 and report.scored_samples == N_SAMPLES
    feedback = pq.read_table(run / "feedback", schema=FEEDBACK_SCHEMA, columns=["sample_id", "level_tokens"])
    keys = list(zip(feedback["sample_id"].to_pylist(), feedback["level_tokens"].to_pylist(), strict=True))
    samples = pq.read_table(run / "samples", columns=["sample_id"])["sample_id"].to_pylist()
    levels = (9, 18, 36, 72, 144)
    assert sorted(keys) == sorted((s, t) for s in samples for t in levels)  # all there, exactly once
    router = pq.read_table(run / "router_inputs", schema=ROUTER_INPUTS_SCHEMA, columns=["sample_id"])
    assert sorted(router["sample_id"].to_pylist()) == sorted(samples)
    assert report.duplicates_removed == 0  # retried batches rewrote their own parts
    assert report.requeued_batches >= 1  # the lost actor's batches went to the live one
