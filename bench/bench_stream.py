"""Benchmark: the streaming trainer's peak memory does not grow with the number of samples.

Writes synthetic run + rank folders of N and 8N samples of the SAME shape (default: one crop of
576 x 512 fp16 vision features = 0.59 MB per sample, the issue's measurement; row groups of 16
samples, one part file per 64, like the scoring job's committed batches), then trains one epoch
on each in a FRESH subprocess (``rglf.router.train.train_router``, batch 16, shuffle buffer 256,
prefetch 2) that reports its own peak RSS (``getrusage``). Prints both peaks, their ratio
(goal: within 10%) and the samples/s of each run. Before streaming, the in-memory loader
measured 1.3 GB vs 5.1 GB for 300 vs 2,400 such samples (3.9x).

    python -m bench.bench_stream                      # N = 300 vs 2,400: ~1.5 GB of scratch tables
    python -m bench.bench_stream --samples 100 --dv 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_tables(run: Path, rank: Path, n: int, *, dv: int, hidden: int, grid: int = 24, part_rows: int = 64,
                 row_group: int = 16, seed: int = 0) -> float:
    """Synthetic tables of ``n`` one-crop samples; returns the stored feature bytes per sample."""
    import torch

    from bench.synthetic import SYNTHETIC_KEYS, write_rankings, write_router_inputs
    from rglf.model.lmm import RouterSide
    from rglf.model.scaler import Ladder

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    side = RouterSide(dv, hidden, 32, act="gelu")
    side.save(run / "router_side", extra={"ladder": Ladder.parse(None, grid).spec})
    ladder = Ladder.parse(None, grid)
    (run / "run.json").write_text(json.dumps({"ladder": ladder.spec}) + "\n")
    pool = (0.2 * rng.standard_normal((8, 1, grid * grid, dv))).astype(np.float32)  # reused rows: writing is fast
    ids, nll = [], np.zeros((n, len(ladder)))
    for start in range(0, n, part_rows):
        rows = []
        for i in range(start, min(n, start + part_rows)):
            key = int(rng.integers(1, 4))
            ids.append(f"m{i:06d}")
            rows.append({"sample_id": ids[-1], "vision": pool[i % len(pool)] + np.float32(i * 1e-3),
                         "instruction_ids": [4 + int(x) for x in rng.integers(0, 28, 6)] + [key]})
            nll[i] = 0.1 + 0.4 * np.abs(np.arange(len(ladder)) - SYNTHETIC_KEYS[key])
        write_router_inputs(run, rows, part=start // part_rows, row_group_size=row_group)
    visual = np.tile(np.asarray(ladder.tokens), (n, 1))
    write_rankings(rank, ids, ["syn"] * n, ["train"] * n, ladder.tokens, nll, nll < 0.3, visual)
    return grid * grid * dv * 2.0


def child(args) -> None:
    """One training run (in its own process, so its peak RSS is its own)."""
    import torch

    from rglf.router.train import TrainConfig, train_router

    torch.set_num_threads(args.threads)
    m = train_router(TrainConfig(run=args.run, rank=args.rank, out=args.out, epochs=1, batch_size=args.batch_size,
                                 micro_batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                                 prefetch=args.prefetch, threads=args.threads, progress=False, val_fraction=0.0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB
    print(json.dumps({"samples_per_s": m["samples_per_s"], "steps": m["steps"], "n_train": m["n_train"],
                      "peak_rss": peak}))


def run_child(argv: list[str]) -> tuple[float, dict]:
    """(the child's own peak RSS in bytes, its JSON line)."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_stream", "--child", *argv], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"training child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_rss"], out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=300, help="N (the second run has 8N)")
    p.add_argument("--dv", type=int, default=512, help="vision width (576 x dv x 2 bytes per sample)")
    p.add_argument("--hidden", type=int, default=64, help="router width d (small: the bench is about memory)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="rglf-bench-stream-") as tmp:
        for n in (args.samples, 8 * args.samples):
            d = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            per_sample = write_tables(d / "run", d / "rank", n, dv=args.dv, hidden=args.hidden)
            written = time.perf_counter() - t
            common = ["--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer),
                      "--prefetch", str(args.prefetch), "--threads", str(args.threads)]
            rss, out = run_child(["--run", str(d / "run"), "--rank", str(d / "rank"), "--out", str(d / "router"), *common])
            results[n] = (rss, out["samples_per_s"], per_sample)
            print(f"N = {n:6,d}: {n * per_sample / 1e9:5.2f} GB of router inputs ({per_sample / 1e6:.2f} MB/sample, "
                  f"written in {written:.0f} s); one epoch, {out['steps']} steps: peak RSS {rss / 1e9:.2f} GB, "
                  f"{out['samples_per_s']:.1f} samples/s", flush=True)
    (small, r1, _), (big, r8, _) = results[args.samples], results[8 * args.samples]
    ratio = big / small
    print(f"peak RSS 8N / N: {ratio:.3f}   (goal: within 10%, i.e. <= 1.10; the in-memory loader: 3.9x)")
    print(f"samples/s 8N / N: {r8 / r1:.2f}   (shuffle buffer {args.shuffle_buffer}, prefetch {args.prefetch}, "
          f"{args.threads} threads; shared machine: rates are indicative)")
    return {"peak_rss_n": small, "peak_rss_8n": big, "ratio": ratio, "samples_per_s_n": r1, "samples_per_s_8n": r8}


if __name__ == "__main__":
    main()
