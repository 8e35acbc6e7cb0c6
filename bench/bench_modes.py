"""Benchmark: ``rglf score --router-inputs fp16|fp8|pixels|none`` -> bytes per sample and trainer samples/s.

Scores toy samples once with the embedded default (the scoring job's own ``Scorer``, fp16, no
Ray), derives the fp8 and pixels tables from that run exactly as the scoring job writes them
(``model.router_inputs.encode_row``; pixels also saves the frozen vision tower), then trains the
router for a few steps from each (``train_router``: data thread, decode / re-encode, projector,
router step) and prints per mode: stored bytes per sample, what else is read per sample (the
image file for pixels), trainer samples/s and its ratio to fp16, plus the same figures computed
for 7B LLaVA-NeXT shapes.

``--agreement RUN RANK`` (a demo's folders, e.g. ``runs/demo/run runs/demo/rank``) also trains a
router from the fp16 tables and one from their fp8 encoding with the demo's settings of the time (6 epochs,
batch 16, lr 2e-3) and reports both routers' agreement with the oracle on the test split (goal:
fp8 within 1 point of fp16). ~2 x the demo's training time.

    python -m bench.bench_modes                       # ~1-2 minutes
    python -m bench.bench_modes --agreement runs/demo/run runs/demo/rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("fp16", "fp8", "pixels", "none")


def score_toy(work: Path, n: int) -> tuple[Path, Path]:
    """Toy samples scored by the embedded default (fp16 router inputs) + their rankings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.synthetic import write_rankings
    from rglf.model.lmm import FrozenLMM
    from rglf.model.tables import SAMPLES_SCHEMA
    from rglf.model.toy import DEFAULT_CHECKPOINT
    from rglf.model.toy.task import ToyDatasetConfig, write_dataset
    from rglf.pipeline.images import load_images
    from rglf.pipeline.score import Scorer

    data, run = work / "data", work / "fp16"
    write_dataset(data, ToyDatasetConfig(n_samples=n, seed=5, family_weights={"background": 1.0, "block_colour": 1.0,
                                                                               "block_shape": 0.0, "medium": 1.0,
                                                                               "fine": 1.0}))
    records = [r for s in ("train", "val", "test") for r in json.loads((data / f"{s}.json").read_text())]
    rows = [{"sample_id": r["id"], "source": r["source"], "split": "train", "image": r["image"], "image_root": str(data),
             "turns": [{"role": t["from"], "text": t["value"]} for t in r["conversations"]]} for r in records]
    lmm = FrozenLMM.from_pretrained(DEFAULT_CHECKPOINT)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"ladder": lmm.ladder.spec, "config": {"router_inputs": "fp16"}}))
    scorer = Scorer(model=str(DEFAULT_CHECKPOINT), out=str(run), device="cpu", dtype="auto", ladder=lmm.ladder.spec,
                    model_id=lmm.model_id, max_batch_tokens=2048, max_batch_size=64, encode_batch=16)
    for start in range(0, len(rows), 16):
        table = pa.Table.from_pylist(rows[start : start + 16], schema=SAMPLES_SCHEMA)
        table = table.append_column(pa.field("levels", pa.list_(pa.int32())),
                                    pa.array([list(lmm.ladder.tokens)] * table.num_rows, pa.list_(pa.int32())))
        scorer(load_images(table, model=str(DEFAULT_CHECKPOINT)))
    fb = pq.read_table(run / "feedback").sort_by([("sample_id", "ascending"), ("level_tokens", "ascending")])
    k = len(lmm.ladder)
    ids = fb.column("sample_id").to_pylist()[::k]
    col = lambda name: np.asarray(fb.column(name).to_pylist()).reshape(-1, k)  # noqa: E731
    rank = work / "rank"
    write_rankings(rank, ids, fb.column("source").to_pylist()[::k], ["train"] * len(ids), lmm.ladder.tokens,
                   col("nll_mean"), col("greedy_match"), col("n_visual_tokens"))
    return run, rank


def derive(run: Path, mode: str, out: Path) -> Path:
    """``run``'s router inputs (fp16) re-encoded as ``mode`` rows, the way the scoring job writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rglf.model.router_inputs import decode_vision, encode_row, save_router_side
    from rglf.model.tables import ROUTER_INPUTS_SCHEMA, table_files

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("router_inputs"))
    cfg = json.loads((run / "run.json").read_text())
    cfg.setdefault("config", {})["router_inputs"] = mode
    (out / "run.json").write_text(json.dumps(cfg))
    if mode == "none":
        return out
    if mode == "pixels":
        from rglf.model.lmm import FrozenLMM
        from rglf.model.toy import DEFAULT_CHECKPOINT

        shutil.rmtree(out / "router_side")
        save_router_side(FrozenLMM.from_pretrained(DEFAULT_CHECKPOINT), out / "router_side", "pixels")
    samples = {r["sample_id"]: r for r in pq.read_table(run / "samples").to_pylist()} if (run / "samples").is_dir() else {}
    (out / "router_inputs").mkdir()
    for f in table_files(run / "router_inputs"):
        rows = []
        for r in pq.read_table(f).to_pylist():
            v = decode_vision(r.get("encoding"), r["vision_features"], r.get("feature_scales"), r["n_crops"], r["grid"],
                              r["vision_hidden"])
            s = samples.get(r["sample_id"], {})
            rows.append(encode_row(mode, sample_id=r["sample_id"], vision=v, grid=r["grid"],
                                   instruction_ids=r["instruction_ids"], image_size=r["image_size"],
                                   image=r.get("image") or s.get("image"), image_root=r.get("image_root") or s.get("image_root")))
        pq.write_table(pa.Table.from_pylist(rows, schema=ROUTER_INPUTS_SCHEMA), out / "router_inputs" / f.name)
    return out


def image_bytes(run: Path) -> float:
    """Mean size of the image files a pixels run refers to."""
    import pyarrow.parquet as pq

    from rglf.model.images import resolve_inside

    t = pq.read_table(run / "router_inputs", columns=["image", "image_root"]).to_pylist()
    return float(np.mean([resolve_inside(r["image"], r["image_root"]).stat().st_size for r in t])) if t else 0.0


def at_7b() -> list[tuple[str, str, str]]:
    """(mode, bytes per sample, relative trainer compute per sample) at 7B LLaVA-NeXT shapes, computed."""
    crops, tokens, dv, d, length = 5, 576, 1024, 4096, 1148  # 672x672: base + 2x2 crops; CLIP-L/336; Vicuna-7B
    fp16 = crops * tokens * dv * 2
    fp8 = crops * tokens * dv + crops * dv * 4
    router = crops * length * 36 * d * d  # the router step's useful FLOPs (bench/bench_step.py)
    projector = 3 * crops * tokens * 2 * (dv * d + d * d)  # x3: the data thread runs it forward only; kept pessimistic
    vision = crops * 2 * 304e6 * 577  # CLIP-L forward: ~2 x params x tokens
    return [
        ("fp16", f"{fp16 / 1e6:.2f} MB", "1.00 (router step + projector)"),
        ("fp8", f"{fp8 / 1e6:.2f} MB", "1.00 (+ a table lookup per value)"),
        ("pixels", "~0.1-0.3 MB (the JPEG)", f"{(router + projector + vision) / (router + projector):.2f} (+ CLIP-L forward)"),
        ("none", "0", "no router training"),
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=96, help="toy samples to score")
    p.add_argument("--steps", type=int, default=8, help="trainer steps per mode (batch 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--agreement", nargs=2, type=Path, metavar=("RUN", "RANK"), help="a demo's run and rank folders")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="router seeds of the agreement comparison, e.g. 0,1,2")
    p.add_argument("--agreement-only", action="store_true", help="skip the bytes and samples/s part")
    args = p.parse_args(argv)
    import torch

    from rglf.model.tables import table_files
    from rglf.router.train import TrainConfig, train_router

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results: dict[str, dict] = {}
    if not args.agreement_only:
        with tempfile.TemporaryDirectory(prefix="rglf-bench-modes-") as tmp:
            work = Path(tmp)
            fp16, rank = score_toy(work, args.samples)
            runs = {"fp16": fp16, **{m: derive(fp16, m, work / m) for m in MODES[1:]}}
            from rglf.model.router_inputs import stored_nbytes

            for mode, run in runs.items():
                files = table_files(run / "router_inputs") if (run / "router_inputs").is_dir() else []
                n, stored = stored_nbytes(files)
                extra = image_bytes(run) if mode == "pixels" else 0.0
                rate = None
                if mode != "none":
                    m = train_router(TrainConfig(run=run, rank=rank, out=work / f"router-{mode}", max_steps=args.steps,
                                                 batch_size=16, micro_batch_size=16, threads=args.threads, progress=False,
                                                 val_fraction=0.0, eval_every=10**6))
                    rate = m["samples_per_s"]
                results[mode] = {"bytes_per_sample": stored / n if n else 0.0, "read_per_sample": extra, "samples_per_s": rate}
        print(f"router inputs per mode, embedded default ({args.samples} toy samples, 2-3 crops of 576 x 64; "
              f"{args.steps} trainer steps of 16, {args.threads} threads):")
        base = results["fp16"]["samples_per_s"]
        for mode, r in results.items():
            rate = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:6.1f} samples/s ({r['samples_per_s'] / base:.2f}x)"
            extra = f" + {r['read_per_sample'] / 1e3:.1f} kB image file" if r["read_per_sample"] else ""
            print(f"  {mode:7s} {r['bytes_per_sample'] / 1e3:8.1f} kB/sample stored{extra:24s} trainer {rate}")
        print("computed at 7B LLaVA-NeXT shapes (672x672: 5 crops of 576 x 1024, d 4096):")
        for mode, size, compute in at_7b():
            print(f"  {mode:7s} {size:24s} trainer compute per sample, relative: {compute}")
    if args.agreement:
        results["agreement"] = agreement(*args.agreement, threads=args.threads, seeds=args.seeds)
    return results


def agreement(run: Path, rank: Path, *, threads: int, seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """Routers trained from fp16 and from fp8 router inputs of the same demo run, per seed (the demo's settings:
    6 epochs, batch 16, lr 2e-3): test-split agreement, accuracy and tokens of each, their paired difference,
    and the fp16-trained router run on fp8 inputs (the quantisation alone: same weights, only the inputs differ)."""
    from rglf.model.lmm import RouterSide
    from rglf.model.router import load_router
    from rglf.router.data import load_router_data, router_logits
    from rglf.router.evaluate import EvalConfig, evaluate_router
    from rglf.router.train import TrainConfig, train_router

    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="rglf-bench-agree-") as tmp:
        fp8 = derive(run, "fp8", Path(tmp) / "fp8")
        side = RouterSide.load(run / "router_side")
        data16 = load_router_data(run, rank, splits=("test",))
        data8 = load_router_data(fp8, rank, splits=("test",))
        assert data16.sample_ids == data8.sample_ids
        test = data16.indices("test")
        for seed in seeds:
            row: dict[str, float] = {"seed": seed}
            for mode, r in (("fp16", run), ("fp8", fp8)):
                folder = Path(tmp) / f"router-{mode}-{seed}"
                train_router(TrainConfig(run=r, rank=rank, out=folder, epochs=6, batch_size=16, lr=2e-3, seed=seed,
                                         threads=threads, progress=False))
                pol = evaluate_router(EvalConfig(run=r, rank=rank, router=folder, out=Path(tmp) / f"eval-{mode}-{seed}",
                                                 plot=False))["policies"]["router"]
                row |= {f"{mode}_agreement": pol["agreement"], f"{mode}_accuracy": pol["accuracy"],
                        f"{mode}_tokens": pol["token_fraction"]}
            router16 = load_router(Path(tmp) / f"router-fp16-{seed}")
            on16 = router_logits(router16, data16, side, test).argmax(1)
            on8 = router_logits(router16, data8, side, test).argmax(1)
            row["cross_agreement"] = float((on8 == data8.best[test]).mean())
            row["cross_same_choice"] = float((on8 == on16).mean())
            rows.append(row)
            print(f"  seed {seed}: test agreement fp16 {100 * row['fp16_agreement']:.1f}% / fp8 "
                  f"{100 * row['fp8_agreement']:.1f}% ({100 * (row['fp8_agreement'] - row['fp16_agreement']):+.1f}); "
                  f"accuracy {100 * row['fp16_accuracy']:.1f} / {100 * row['fp8_accuracy']:.1f}%; tokens "
                  f"{100 * row['fp16_tokens']:.1f} / {100 * row['fp8_tokens']:.1f}% of always-finest; the fp16 router "
                  f"on fp8 inputs: {100 * row['cross_agreement']:.1f}%, same level as on fp16 for "
                  f"{100 * row['cross_same_choice']:.1f}% of samples", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "seed"}
    diffs = [r["fp8_agreement"] - r["fp16_agreement"] for r in rows]
    cross = [r["cross_agreement"] - r["fp16_agreement"] for r in rows]
    print(f"fp8 vs fp16 router agreement over seeds {list(seeds)} ({len(test)} test samples): fp16 "
          f"{100 * mean['fp16_agreement']:.1f}%, fp8 {100 * mean['fp8_agreement']:.1f}%: "
          f"{100 * float(np.mean(diffs)):+.1f} points on average (per seed {', '.join(f'{100 * d:+.1f}' for d in diffs)}; "
          f"goal: within 1); the same router on fp8 inputs: {100 * float(np.mean(cross)):+.1f} points, same level for "
          f"{100 * mean['cross_same_choice']:.1f}% of samples")
    return {"seeds": rows, "mean": mean, "mean_difference": float(np.mean(diffs)),
            "mean_difference_same_router": float(np.mean(cross))}


if __name__ == "__main__":
    main()
