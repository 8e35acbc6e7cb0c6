"""Streaming router data: the index, the epoch's global sequence, worker shards, resume positions, the
polars table API, and a training run killed with SIGKILL and resumed (exact sample counts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import rglf
from bench.synthetic import write_rankings, write_router_inputs, write_synthetic_tables
from rglf.model.lmm import RouterSide
from rglf.model.router import load_router
from rglf.model.scaler import Ladder
from rglf.model.tables import TableNotFound, open_tables
from rglf.router.data import SampleStream, iter_steps, load_router_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent


def write_parts(tmp_path: Path, n: int = 150, part_rows: int = 20, row_group: int = 7, seed: int = 0):
    """Run + rank folders of ``n`` samples in several part files and row groups of uneven sizes."""
    run, rank = tmp_path / "run", tmp_path / "rank"
    rng = np.random.default_rng(seed)
    grid, dv = 8, 8
    ladder = Ladder.parse(None, grid)
    torch.manual_seed(seed)
    RouterSide(dv, 16, 24).save(run / "router_side", extra={"ladder": ladder.spec})
    (run / "run.json").write_text(json.dumps({"ladder": ladder.spec}))
    ids = [f"s{i:04d}" for i in range(n)]
    for p, start in enumerate(range(0, n, part_rows)):
        rows = [{"sample_id": ids[i], "vision": rng.normal(size=(1 + i % 2, grid * grid, dv)),
                 "instruction_ids": [4 + i % 20, 1 + i % 3]} for i in range(start, min(n, start + part_rows))]
        write_router_inputs(run, rows, part=p, row_group_size=row_group)
    nll = rng.uniform(0, 1, (n, len(ladder)))
    split = ["test" if i % 10 == 0 else "val" if i % 10 == 1 else "train" for i in range(n)]
    write_rankings(rank, ids, ["syn"] * n, split, ladder.tokens, nll, nll < 0.5, np.ones((n, len(ladder)), int))
    return run, rank


def test_index_holds_labels_and_locations_not_features(tmp_path):
    run, rank = write_parts(tmp_path)
    data = load_router_data(run, rank, splits=("train", "val"))
    assert len(data) == 135 and set(data.split) == {"train", "val"}
    assert data.nll.shape == (135, 5) and len(data.files) == 8
    # every array the index keeps is per-sample small: no feature bytes in memory
    assert all(getattr(data, f).nbytes / len(data) <= 40 for f in ("nll", "order", "n_visual_tokens", "row"))
    # random access decodes exactly what was stored (fp16), wherever its row group is
    for i in (0, 57, 134):
        sid = data.sample_ids[i]
        k = int(sid[1:])
        assert data.vision(i).shape == (1 + k % 2, 64, 8)
        assert data.instruction(i).tolist() == [4 + k % 20, 1 + k % 3]
    units = data.units(data.indices("train"))
    assert sum(len(u) for u in units) == len(data.indices("train")) and max(len(u) for u in units) <= 7


def test_an_epoch_is_a_permutation_and_workers_split_it_without_changing_it(tmp_path):
    run, rank = write_parts(tmp_path)
    data = load_router_data(run, rank, splits=("train",))
    train = data.indices("train")
    one = SampleStream(data, train, batch_size=16, seed=3, shuffle_buffer=30)
    steps = list(one.steps(0))
    assert len(steps) == one.steps_per_epoch == 8
    order = np.concatenate([s[3] for s in steps])
    assert sorted(order.tolist()) == sorted(train.tolist())  # each sample exactly once
    assert [s[1] for s in steps] == [16] * 7 + [120 - 7 * 16]
    again = np.concatenate([s[3] for s in one.steps(0)])
    other = np.concatenate([s[3] for s in one.steps(1)])
    assert np.array_equal(order, again) and not np.array_equal(order, other)  # seeded per epoch
    assert not np.array_equal(order, np.sort(order))  # shuffled
    # three workers: disjoint row groups, and together exactly the one-worker global batches
    shards = [list(SampleStream(data, train, batch_size=16, seed=3, shuffle_buffer=30, rank=r, world=3).steps(0))
              for r in range(3)]
    read = [{(u.file, u.row_group) for s in shard for u in s[2]} for shard in shards]
    assert not (read[0] & read[1]) and not (read[0] & read[2]) and not (read[1] & read[2])
    for k, (_, size, _, mine) in enumerate(steps):
        together = np.concatenate([shard[k][3] for shard in shards])
        assert sorted(together.tolist()) == sorted(mine.tolist()) and all(shard[k][1] == size for shard in shards)


def test_the_loader_holds_about_two_windows_whatever_the_number_of_samples(tmp_path):
    """Flat memory, structurally: the samples read but not yet trained on never exceed ~2 shuffle windows
    (a window + the rest of the previous one), for 150 and for 8x as many samples; decoded batches are
    at most ``prefetch`` steps ahead."""
    peaks = {}
    for n in (150, 1200):
        run, rank = write_parts(tmp_path / str(n), n=n, part_rows=40, row_group=7)
        data = load_router_data(run, rank, splits=("train",))
        for world in (1, 2):
            for r in range(world):
                stream = SampleStream(data, data.indices("train"), batch_size=16, seed=1, shuffle_buffer=30, rank=r,
                                      world=world)
                resident = peak = 0
                for epoch in (0, 1):
                    for _, _, units, mine in stream.steps(epoch):
                        resident += sum(len(u) for u in units)
                        peak = max(peak, resident)
                        resident -= len(mine)
                    assert resident == 0  # everything read is trained on within the epoch
                peaks[n, world, r] = peak
    assert max(peaks.values()) <= 2 * (30 + 7) + 16  # shuffle buffer + one row group, twice, + one batch
    assert max(p for (n, _, _), p in peaks.items() if n == 1200) <= max(p for (n, _, _), p in peaks.items() if n == 150) + 7
    # the prefetching loader: a bounded queue, never more than `depth` steps of decoded batches ahead
    run, rank = write_parts(tmp_path / "q", n=150)
    data = load_router_data(run, rank, splits=("train",))
    stream = SampleStream(data, data.indices("train"), batch_size=16, seed=0, shuffle_buffer=30)
    made = []
    side = RouterSide.load(run / "router_side")
    real = stream.steps

    def counted(epoch, start_step=0):
        for item in real(epoch, start_step):
            made.append(item[0])
            yield item

    stream.steps = counted
    steps = iter_steps(stream, 0, side, micro_batch_size=8, prefetch_depth=2)
    first = next(steps)
    time.sleep(0.5)  # give the data thread time to run ahead as far as the queue lets it (no timing asserted)
    assert first.step == 0 and len(made) <= 1 + 2 + 1  # the consumed step, the queue, one blocked in put()
    steps.close()


def test_resuming_mid_epoch_continues_the_same_sequence_and_skips_what_was_read(tmp_path):
    run, rank = write_parts(tmp_path)
    data = load_router_data(run, rank, splits=("train",))
    stream = SampleStream(data, data.indices("train"), batch_size=16, seed=0, shuffle_buffer=30)
    full = list(stream.steps(2))
    for start in (1, 3, 7):
        tail = list(stream.steps(2, start_step=start))
        assert [t[0] for t in tail] == list(range(start, 8))
        for a, b in zip(full[start:], tail, strict=True):
            assert np.array_equal(a[3], b[3])
        # nothing already trained on is read again
        done = set(np.concatenate([f[3] for f in full[:start]]).tolist())
        assert not done & {i for t in tail for u in t[2] for i in u.members.tolist()}
    # the loader yields exactly those samples, decoded, projected and prepared
    side = RouterSide.load(run / "router_side")
    got = list(iter_steps(stream, 2, side, micro_batch_size=5, start_step=3))
    for a, b in zip(full[3:], got, strict=True):
        assert np.concatenate([m.index for m in b.micro]).tolist() == a[3].tolist()
        assert all(len(m) <= 5 for m in b.micro) and b.global_size == a[1]


def test_open_tables_gives_lazy_frames_and_tells_missing_from_empty(tmp_path):
    run, rank = write_parts(tmp_path, n=30)
    t = open_tables(run=run, rank=rank)
    assert isinstance(t.rankings, pl.LazyFrame) and "rankings" in t.available()
    best = t.rankings.filter(pl.col("rank") == 1).select(pl.len()).collect().item()
    assert best == 30
    # router_inputs read without the feature bytes; older part files without the new columns read as null
    ri = t.router_inputs.select("sample_id", "n_crops", "encoding").collect()
    assert ri.height == 30 and ri["encoding"].to_list() == ["fp16"] * 30
    assert t.sql("select count(*) as n from rankings where rank = 1").collect()["n"][0] == 30
    # a run that rejected nothing has no errors/ folder: empty, not missing (as in `rglf sql`)
    assert t.errors.collect().height == 0 and "code" in t.errors.collect_schema().names()
    with pytest.raises(TableNotFound):
        t.feedback.collect()  # missing
    # a read-only mapping of what is there (rglf.open_run / open_rank are these openers)
    assert set(t) == {"errors", "router_inputs", "rankings"} and "feedback" not in t and len(t) == 3
    assert t["rankings"].select(pl.len()).collect().item() == t.rankings.select(pl.len()).collect().item()
    assert rglf.open_rank(rank).keys() == {"rankings"} and set(rglf.open_run(run)) == {"errors", "router_inputs"}
    with pytest.raises(TableNotFound):
        open_tables(run=tmp_path / "nope")
    with pytest.raises(TableNotFound):
        open_tables(run=run).scan("pairs")


def _train_cmd(run: Path, rank: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rglf.cli", "train", "--run", str(run), "--rank", str(rank), "--out", str(out),
            "--epochs", "3", "--batch-size", "8", "--micro-batch-size", "4", "--checkpoint-every", "2",
            "--shuffle-buffer", "24", "--torch-threads", "1", "--record-samples", "--quiet"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_sample_counts(tmp_path):
    """SIGKILL a real training process mid-epoch, rerun the same command: every training sample is seen
    exactly as often (3 epochs: 3 times) as in an uninterrupted run, and the weights are the same."""
    # row groups of 5 under a shuffle buffer of 24: the kill lands inside a window of several row groups
    write_synthetic_tables(tmp_path / "run", tmp_path / "rank", n_samples=120, seed=1, row_group_size=5)
    run, rank = tmp_path / "run", tmp_path / "rank"
    env = dict(os.environ)  # the installed rglf (editable: this checkout)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(run, rank, full), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(run, rank, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it after its second checkpoint, mid-epoch
        if latest.is_file() and latest.read_text().strip() >= "step-00000004":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    resumed = subprocess.run(_train_cmd(run, rank, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["resumed_from_step"] is not None and 4 <= b["resumed_from_step"] < b["steps"] == a["steps"]
    assert b["resumed_from_step"] % a["steps_per_epoch"] != 0, "killed at an epoch boundary, not mid-epoch"
    count = [Counter(s for h in m["history"] for s in h["sample_ids"]) for m in (a, b)]
    assert count[0] == count[1] and set(count[0].values()) == {3} and len(count[0]) == a["n_train"]
    assert [h["sample_ids"] for h in a["history"]] == [h["sample_ids"] for h in b["history"]]
    for k, v in load_router(full).state_dict().items():
        torch.testing.assert_close(v, load_router(killed).state_dict()[k])
