"""Benchmark router training: from tables (this project) vs in-loop RGLF (the reference's way).

Both train the same ``GranularityRouter`` with the same RGLF loss on the same tiny random
LLaVA-NeXT (``model.toy.tiny.build_tiny_model(model.toy.task.TOY_VOCABULARY)``: the embedded default's
shape, 24 x 24 grid, Llama hidden 128) and the same toy samples, batch for batch:

- tables: a batch is decoded from the router inputs (fp16 vision features + instruction ids),
  put through the frozen projector and embedding table, then the router step. The one-off
  cost of writing the tables (the scoring job: every sample at every level, once) is timed
  separately and reported with the break-even number of router epochs.
- in-loop: every step preprocesses and encodes the batch's images with the frozen LMM, scores
  the answer at all five levels to get the feedback (``FrozenLMM.score``: the scoring job's own
  code, lm_head only at answer positions, so a FASTER in-loop than the reference's full-vocab
  forward), ranks the levels, then runs the same router step.

The two paths alternate step by step (same batches), so load from other processes on a shared
machine slows both alike; the ratio is steadier than the absolute rates.

    python -m bench.bench_train                       # ~1-3 minutes on 2 CPU threads
    python -m bench.bench_train --steps 3 --samples 32

The ratio grows with the LMM: at the tiny scale the router (one d x d transformer layer over
1,148 tokens per crop) costs about as much as the 2-layer LLM. ``--text-hidden``/``--text-layers``
scale the LLM to show the trend.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(args):
    from rglf.model.lmm import FrozenLMM
    from rglf.model.toy import task as toy
    from rglf.model.toy.tiny import build_tiny_model

    model, tok, proc = build_tiny_model(toy.TOY_VOCABULARY, seed=args.seed, text_hidden=args.text_hidden,
                                        text_layers=args.text_layers, intermediate=2 * args.text_hidden)
    lmm = FrozenLMM(model, tok, proc, model_id="bench-tiny")
    rng = np.random.default_rng(args.seed)
    samples = []
    for i in range(args.samples):
        scene = toy.sample_scene(rng)
        family = toy.families_for(scene)[int(rng.integers(4))]
        q, a = toy.question_answer(scene, family)
        samples.append({"sample_id": f"b{i:05d}", "image": toy.render(scene), "question": q, "answer": a,
                        "source": family, "split": "train"})
    return lmm, samples


def router_step(router, opt, feats, crop_mask, text, text_mask, nll, order):
    from rglf.model.rglf import rglf_loss

    logits = router(feats, crop_mask, text, text_mask)
    loss, _ = rglf_loss(logits, nll, order)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def make_router(lmm, seed: int):
    from rglf.model.router import GranularityRouter, RouterConfig

    torch.manual_seed(seed)
    router = GranularityRouter(RouterConfig(hidden_size=lmm.hidden_size, ladder=lmm.ladder.spec, grid=lmm.grid))
    return router.train(), torch.optim.AdamW(router.parameters(), lr=1e-3)


def batches(n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    idx = np.arange(n)
    return [idx[(s * batch_size) % n :][:batch_size] for s in range(steps)]


class TablePath:
    """Router steps from the tables (written once by ``write_lmm_tables``, timed separately)."""

    def __init__(self, lmm, samples, args, work: Path):
        from bench.synthetic import write_lmm_tables
        from rglf.model.lmm import RouterSide
        from rglf.router.data import load_router_data

        t = time.perf_counter()
        write_lmm_tables(lmm, samples, work / "run", work / "rank")
        self.write_seconds = time.perf_counter() - t
        self.data = load_router_data(work / "run", work / "rank")
        self.side = RouterSide.load(work / "run" / "router_side")
        self.router, self.opt = make_router(lmm, args.seed)

    def step(self, b: np.ndarray) -> None:
        from rglf.router.data import collate

        x = collate(self.data, b, self.side)
        router_step(self.router, self.opt, x.crop_features, x.crop_mask, x.text_embeds, x.text_mask, x.nll, x.order)


class InLoopPath:
    """Router steps that first score their batch at every level with the frozen LMM (the reference)."""

    def __init__(self, lmm, samples, args):
        self.lmm, self.samples = lmm, samples
        self.router, self.opt = make_router(lmm, args.seed)

    def step(self, b: np.ndarray) -> None:
        from rglf.router.data import rank_order

        lmm, tokens = self.lmm, self.lmm.ladder.tokens
        chunk = [self.samples[j] for j in b]
        pixels, sizes = zip(*(lmm.preprocess(s["image"]) for s in chunk), strict=True)
        enc = lmm.encode(pixels, sizes)  # vision tower + projector, once per image
        convs = [lmm.tokenize([("human", "<image>\n" + s["question"]), ("gpt", s["answer"])], True) for s in chunk]
        nll = np.zeros((len(chunk), len(tokens)))
        for sc in lmm.score([(k, c, e) for k, (c, e) in enumerate(zip(convs, enc, strict=True))]):
            nll[sc.key, lmm.ladder.index(sc.level_tokens)] = sc.nll_mean
        order = torch.from_numpy(rank_order(nll, tokens, 0.02, 0.0))
        # router inputs straight from the encoding: projected crops + instruction embeddings, padded
        n_max = max(e.n_crops for e in enc)
        feats = torch.zeros(len(chunk), n_max, lmm.grid**2, lmm.hidden_size)
        crop_mask = torch.zeros(len(chunk), n_max, dtype=torch.bool)
        ids = [lmm.instruction_ids(c) for c in convs]
        t_max = max(len(x) for x in ids)
        text_ids = torch.zeros(len(chunk), t_max, dtype=torch.long)
        text_mask = torch.zeros(len(chunk), t_max, dtype=torch.bool)
        for k, (e, x) in enumerate(zip(enc, ids, strict=True)):
            feats[k, : e.n_crops], crop_mask[k, : e.n_crops] = e.projected.float(), True
            text_ids[k, : len(x)], text_mask[k, : len(x)] = torch.tensor(x), True
        with torch.no_grad():
            text = lmm.embed(text_ids).float()
        router_step(self.router, self.opt, feats, crop_mask, text, text_mask, torch.from_numpy(nll).float(), order)


def time_interleaved(paths: dict, plan: list[np.ndarray], warmup: int) -> dict[str, float]:
    """Seconds per path over ``plan[warmup:]``; the paths alternate step by step, so load from
    other processes on a shared machine hits both alike."""
    spent = dict.fromkeys(paths, 0.0)
    for i, b in enumerate(plan):
        for name, path in paths.items():
            t = time.perf_counter()
            path.step(b)
            if i >= warmup:
                spent[name] += time.perf_counter() - t
    return spent


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64, help="toy samples (the tables hold all of them)")
    p.add_argument("--batch-size", type=int, default=16, help="router batch (both paths)")
    p.add_argument("--steps", type=int, default=4, help="timed router steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--text-hidden", type=int, default=128, help="LLM hidden size (the embedded default: 128)")
    p.add_argument("--text-layers", type=int, default=2, help="LLM layers (the embedded default: 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lmm, samples = build(args)
    with tempfile.TemporaryDirectory(prefix="rglf-bench-train-") as tmp:
        paths = {"tables": TablePath(lmm, samples, args, Path(tmp)), "in_loop": InLoopPath(lmm, samples, args)}
        spent = time_interleaved(paths, batches(len(samples), args.batch_size, args.warmup + args.steps), args.warmup)
    n = args.steps * args.batch_size
    tables, in_loop = n / spent["tables"], n / spent["in_loop"]
    write_rate = len(samples) / paths["tables"].write_seconds
    ratio = tables / in_loop
    # tables pay the scoring once: n/write + e*n/tables = e*n/in_loop  ->  e = (1/write) / (1/in_loop - 1/tables)
    gain = 1 / in_loop - 1 / tables
    break_even = (1 / write_rate) / gain if gain > 0 else float("inf")
    print(f"tiny LLaVA-NeXT: LLM hidden {args.text_hidden} x {args.text_layers} layers, router d = {lmm.hidden_size}, "
          f"grid {lmm.grid}x{lmm.grid}, ladder {','.join(map(str, lmm.ladder.tokens))}; batch {args.batch_size}, "
          f"{args.steps} timed steps, {args.threads} threads")
    print(f"router training from tables : {tables:8.2f} samples/s")
    print(f"in-loop RGLF (LMM x 5/step) : {in_loop:8.2f} samples/s")
    print(f"ratio                       : {ratio:8.2f}x   (goal >= 20x)")
    print(f"one-off table writing       : {write_rate:8.2f} samples/s (scoring job, every level once); "
          f"tables win after {break_even:.2f} epochs")
    return {"tables_samples_per_s": tables, "in_loop_samples_per_s": in_loop, "ratio": ratio,
            "table_write_samples_per_s": write_rate, "break_even_epochs": break_even}


if __name__ == "__main__":
    main()
