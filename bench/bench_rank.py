"""Benchmark ``rglf rank``: rankings + pairs + preferences on synthetic feedback.

Generates ``--samples`` samples x 5 levels (36..576) of feedback following FEEDBACK_SCHEMA
(vectorised numpy/pyarrow, a few sources with different level preferences, a share of
near-ties), writes it as Parquet parts, then times ``run_rank`` end to end (read Parquet ->
validate -> rank -> pairs -> preferences -> write Parquet). Goal: <= 15 s at 1M samples.

    python -m bench.bench_rank                 # 1M samples
    python -m bench.bench_rank --samples 100000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rglf.model.tables import FEEDBACK_SCHEMA
from rglf.pipeline.rank import RankConfig, run_rank

LEVELS = np.array([36, 72, 144, 288, 576], dtype=np.int32)
GRIDS = np.array(["6x6", "12x6", "12x12", "24x12", "24x24"])
# per source: how much each level's NLL rises as it gets coarser (text-dense sources suffer most)
SOURCES = {"docvqa": 0.60, "chartqa": 0.35, "gqa": 0.08, "scienceqa": 0.02}


def make_feedback(n_samples: int, seed: int = 0) -> pa.Table:
    """Synthetic feedback, one row per (sample, level), rows grouped by sample."""
    rng = np.random.default_rng(seed)
    n_levels = len(LEVELS)
    names = np.array(list(SOURCES))
    penalty = np.array(list(SOURCES.values()))
    src = rng.integers(0, len(names), n_samples)
    base = rng.gamma(2.0, 0.4, n_samples)  # per-sample difficulty
    coarseness = np.arange(n_levels)[::-1] / (n_levels - 1)  # 1 at 36 tokens, 0 at 576
    nll = (
        base[:, None]
        + penalty[src][:, None] * coarseness[None, :] * rng.uniform(0, 2, (n_samples, 1))
        + rng.normal(0, 0.03, (n_samples, n_levels))
    )
    nll = np.abs(nll)  # (samples, levels)
    easy = rng.random(n_samples) < 0.2  # near-ties: NLL ~ 0 at every level
    nll[easy] = rng.uniform(0, 0.01, (int(easy.sum()), n_levels))
    answer_tokens = rng.integers(1, 40, n_samples).astype(np.int32)
    n_crops = rng.choice(np.array([1, 3, 5], dtype=np.int16), n_samples)
    rows_per_crop = np.sqrt(LEVELS).astype(np.int32)  # ~one image_newline per pooled row
    n_visual = LEVELS[None, :] * n_crops[:, None] + rows_per_crop[None, :] * (n_crops[:, None] - 1)

    ids = pa.array(np.char.add("s", np.arange(n_samples).astype("U9")))
    idx = np.repeat(np.arange(n_samples), n_levels)
    source = pa.DictionaryArray.from_arrays(pa.array(src[idx].astype(np.int32)), pa.array(names))
    flat_nll = nll.reshape(-1)
    columns = {
        "sample_id": ids.take(pa.array(idx)),
        "source": source.cast(pa.string()),
        "split": pa.array(np.where(idx % 10 == 0, "val", "train")),
        "level_tokens": pa.array(np.tile(LEVELS, n_samples)),
        "level_grid": pa.array(np.tile(GRIDS, n_samples)),
        "n_crops": pa.array(n_crops[idx]),
        "n_visual_tokens": pa.array(n_visual.reshape(-1).astype(np.int32)),
        "answer_tokens": pa.array(answer_tokens[idx]),
        "nll_sum": pa.array(flat_nll * answer_tokens[idx]),
        "nll_mean": pa.array(flat_nll),
        "greedy_match": pa.array(rng.random(flat_nll.size) < np.exp(-2 * flat_nll)),
        "model_id": pa.array(np.full(flat_nll.size, "bench-model")),
    }
    return pa.table(columns, schema=FEEDBACK_SCHEMA)


def write_parts(table: pa.Table, folder: Path, n_parts: int = 8) -> None:
    """Write ``table`` as ``n_parts`` Parquet parts, like a multi-worker scoring job."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // n_parts)
    for i in range(n_parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_rank", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples (x5 levels of feedback rows)")
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: usable cores)")
    parser.add_argument("--memory-limit", default="4GB", help="DuckDB memory limit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_rank_") as tmp:
        t0 = time.perf_counter()
        table = make_feedback(args.samples, args.seed)
        write_parts(table, Path(tmp) / "run" / "feedback")
        n_rows = table.num_rows
        del table
        t_gen = time.perf_counter() - t0

        cfg = RankConfig(
            feedback=Path(tmp) / "run",
            out=Path(tmp) / "rank",
            threads=args.threads,
            memory_limit=args.memory_limit,
        )
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_rank(cfg)
        t_rank, cpu_rank = time.perf_counter() - t0, time.process_time() - c0

    rows = report["tables"]
    figures = {
        "samples": args.samples,
        "feedback_rows": n_rows,
        "generate_s": t_gen,
        "rank_s": t_rank,
        "feedback_rows_per_s": n_rows / t_rank,
        "cpu_s": cpu_rank,
        "load_avg_1m": load_before,
    }
    print(
        f"bench_rank: {args.samples:,} samples x {len(LEVELS)} levels = {n_rows:,} feedback rows "
        f"(generated + written in {t_gen:.1f} s)"
    )
    print(
        f"  rank+pairs+preferences: {t_rank:.2f} s  ({n_rows / t_rank:,.0f} feedback rows/s; "
        f"{rows['rankings']['rows']:,} rankings, {rows['pairs']['rows']:,} pairs, "
        f"{rows['preferences']['rows']} preferences rows; threads={report['duckdb']['threads']}) "
        f"[goal <= 15 s: {'met' if t_rank <= 15 else 'MISSED'}]"
    )
    print("  stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings_s"].items()))
    # other jobs share the cores: CPU time and the load average say how contended the run was
    print(
        f"  process CPU time {cpu_rank:.1f} s over {t_rank:.1f} s wall; 1-min load average before: {load_before:.1f}"
    )
    return figures


if __name__ == "__main__":
    main()
