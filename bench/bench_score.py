"""Benchmark feedback scoring: the engine (``FrozenLMM.encode`` + ``score``) vs a reference-style loop.

Both methods compute the same feedback, ``nll_mean`` of the answer at every level of the
ladder (36..576) for every sample, on the same model, samples and thread count; the bench
asserts that they agree (1e-4) before it reports a model's figures.

- engine: what the scoring actor does. ``encode`` runs the vision tower and projector once
  per batch of images; ``score`` (its own defaults, printed) packs every level, sorts the
  (sample, level) sequences by length, batches them under a token budget and runs
  ``lm_head`` on answer positions only; under ``torch.inference_mode``.
- reference: the paper's in-training way (AVG-LLaVA Stage 2 runs the LMM once per level).
  For each sample and each level: re-run the vision tower + projector on the crops, pool and
  pack that level (``FrozenLMM.pack``), splice the sequence, run the FULL model forward
  (logits at every position over the whole vocabulary), cast them to fp32 and take the
  answer NLL; batch 1. Also under ``torch.inference_mode`` (the LMM is frozen there too), so
  the comparison is about the work done, not about autograd.

Models: ``tiny`` is the embedded default's size (``build_tiny_model(TOY_VOCABULARY)``, ~0.5M
parameters, a ~100-word vocabulary); ``mid`` is a random LLaVA-NeXT with a 32k vocabulary
(Llama hidden 512, 4 layers, 8 heads, MLP 1408; SigLIP hidden 128 on a 96-px crop, patch 4:
the paper's 24 x 24 grid). Ids beyond the word-level tokenizer's vocabulary never occur.
Samples: toy scenes (``model/toy.py``), alternately square (base + 1 high-res crop) and wide
(base + 2), one question each, every 4th a 3-turn conversation. Images are preprocessed and
conversations tokenised before timing (both methods need that once per sample).

Throughput: samples/s, a sample = all levels scored. The two methods are timed side by
side in one process, chunk by chunk (``--batch-images`` samples per chunk, the engine's
batch), alternating which goes first, after a warm-up. Other work on the machine shifts
absolute times; the ratio is the figure to read.
Peak memory: each method runs the same samples again in its OWN subprocess. After the model
is built and the inputs prepared, the process's peak RSS is reset (``/proc/self/clear_refs``)
and its RSS taken as the baseline; after scoring, the peak RSS (``VmHWM``) is the total peak
and peak - baseline the increment. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux it also
keeps the RSS of the process that launched the subprocess (carried across ``exec``; here the
bench itself, > 1 GB after the mid model) and ``clear_refs`` does not reset that part; where
``/proc`` is missing it is the fallback. (On CPU torch keeps no allocator statistics; RSS is
the measure.)
Goals (from the scoring issue): engine >= 5x the reference's samples/s and <= 1/3 of its
peak memory increment.

    python -m bench.bench_score                         # tiny (64 samples) and mid (8 samples)
    python -m bench.bench_score --models mid --samples 4 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rglf.model.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, TokenizedConversation
from rglf.model.lmm import FrozenLMM, splice
from rglf.model.toy.task import (
    TOY_VOCABULARY,
    families_for,
    question_answer,
    render,
    sample_scene,
    stage1_turns,
)

THROUGHPUT_GOAL = 5.0  # engine / reference samples/s
MEMORY_GOAL = 1 / 3  # engine / reference peak RSS increment
NLL_TOLERANCE = 1e-4  # engine and reference nll_mean must agree this closely


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: ``tiny_config`` keyword arguments and an optional vocabulary size."""

    description: str
    config: dict
    vocab_size: int | None  # None: the tokenizer's own size (the embedded default)
    default_samples: int


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("embedded default size", {}, None, 64),
    # A 7B LLaVA's vocabulary (32k) on a model small enough for a shared 2-core CPU.
    "mid": ModelSpec(
        "random, 32k vocab",
        dict(text_hidden=512, text_layers=4, text_heads=8, intermediate=1408, vision_hidden=128),
        32000,
        8,
    ),
}


def build_lmm(name: str, seed: int = 0) -> FrozenLMM:
    """The benchmark model ``name`` as a ``FrozenLMM`` (random weights, deterministic by seed)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from rglf.model.toy.tiny import build_image_processor, build_tokenizer, tiny_config

    spec = MODELS[name]
    tokenizer = build_tokenizer(TOY_VOCABULARY)
    vocab = spec.vocab_size if spec.vocab_size is not None else len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"model {name}: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    config = tiny_config(vocab, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), **spec.config)
    torch.manual_seed(seed)
    cls = (
        LlavaNextForConditionalGeneration
        if config.model_type == "llava_next"
        else LlavaForConditionalGeneration
    )
    model = cls(config).eval()
    return FrozenLMM(model, tokenizer, build_image_processor(config), model_id=f"bench-{name}")


@dataclass
class Sample:
    """One prepared sample: tokenised conversation and preprocessed crops."""

    key: int
    conv: TokenizedConversation
    pixels: torch.Tensor  # (n_crops, 3, S, S)
    image_size: tuple[int, int]  # (height, width)


def make_samples(lmm: FrozenLMM, n: int, seed: int = 0) -> list[Sample]:
    """``n`` toy samples: square and wide scenes alternately, every 4th a 3-turn conversation."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        scene = sample_scene(rng, aspect=("square", "wide")[i % 2])
        if i % 4 == 3:
            qa = stage1_turns(scene, rng)[:3]
        else:
            families = families_for(scene)
            qa = [question_answer(scene, families[int(rng.integers(len(families)))])]
        turns = []
        for j, (question, answer) in enumerate(qa):
            turns += [("human", f"{IMAGE_PLACEHOLDER}\n{question}" if j == 0 else question), ("gpt", answer)]
        pixels, size = lmm.preprocess(render(scene))
        samples.append(Sample(i, lmm.tokenize(turns, has_image=True), pixels, size))
    return samples


# ------------------------------------------------------------------------------------------
# The two methods: each returns {(sample key, level tokens): nll_mean}
# ------------------------------------------------------------------------------------------


def score_engine(lmm: FrozenLMM, samples: Sequence[Sample]) -> dict[tuple[int, int], float]:
    """The scoring actor's way: one vision pass for the batch, ``score`` for every level."""
    with torch.inference_mode():
        encoded = lmm.encode([s.pixels for s in samples], [s.image_size for s in samples])
        scores = lmm.score([(s.key, s.conv, enc) for s, enc in zip(samples, encoded, strict=True)])
    return {(s.key, s.level_tokens): s.nll_mean for s in scores}


def score_reference(
    lmm: FrozenLMM, samples: Sequence[Sample], timers: dict[str, float] | None = None
) -> dict[tuple[int, int], float]:
    """The reference-style loop: per sample and level, re-encode, full forward, full fp32 logits; batch 1.

    ``timers`` (optional) accumulates CPU seconds spent in ``vision`` (tower + projector + pool
    + pack), ``decoder`` (up to ``lm_head``) and ``logits`` (``lm_head`` over every position and
    the whole vocabulary, fp32 cast, NLL).
    """
    timers = timers if timers is not None else {}
    clock = time.process_time
    lm_head_start: list[float] = []
    hook = lmm.lm_head.register_forward_pre_hook(lambda *_: lm_head_start.append(clock()))
    out = {}
    try:
        with torch.inference_mode():
            for s in samples:
                for li, level in enumerate(lmm.ladder.levels):
                    t0 = clock()
                    projected = lmm.projector(
                        lmm.vision_features(s.pixels)
                    )  # (n_crops, g*g, d): again per level
                    visual = lmm.pack(projected, s.image_size, li)  # (n_visual, d)
                    embeds, labels = splice(lmm.embed, s.conv, visual)  # (L, d), (L,)
                    t1 = clock()
                    logits = lmm.model(
                        inputs_embeds=embeds[None], use_cache=False
                    ).logits.float()  # (1, L, vocab)
                    nll = F.cross_entropy(
                        logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX
                    )  # answer mean
                    out[(s.key, level.tokens)] = float(nll)
                    t2 = clock()
                    t_head = lm_head_start.pop()
                    timers["vision"] = timers.get("vision", 0.0) + t1 - t0
                    timers["decoder"] = timers.get("decoder", 0.0) + t_head - t1
                    timers["logits"] = timers.get("logits", 0.0) + t2 - t_head
    finally:
        hook.remove()
    return out


METHODS = {"engine": score_engine, "reference": score_reference}


def chunks(samples: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


# ------------------------------------------------------------------------------------------
# Throughput (side by side, one process) and peak memory (one subprocess per method)
# ------------------------------------------------------------------------------------------


def measure_throughput(lmm: FrozenLMM, samples: Sequence[Sample], batch_images: int) -> dict:
    """Time both methods chunk by chunk, alternating which runs first; check they agree.

    Wall time gives samples/s; this process's CPU time is also kept: other processes on the
    machine stretch wall time far more than the CPU time of the work itself.
    """
    score_engine(lmm, samples[:2])  # warm-up, not timed
    score_reference(lmm, samples[:1])
    seconds = {"engine": 0.0, "reference": 0.0}
    cpu_seconds = {"engine": 0.0, "reference": 0.0}
    ratios = []  # per chunk: reference time / engine time
    timers: dict[str, float] = {}
    results: dict[str, dict] = {"engine": {}, "reference": {}}
    for c, chunk in enumerate(chunks(samples, batch_images)):
        took = {}
        for method in ("engine", "reference") if c % 2 == 0 else ("reference", "engine"):
            t0, c0 = time.perf_counter(), time.process_time()
            if method == "engine":
                results[method].update(score_engine(lmm, chunk))
            else:
                results[method].update(score_reference(lmm, chunk, timers))
            took[method] = time.perf_counter() - t0
            seconds[method] += took[method]
            cpu_seconds[method] += time.process_time() - c0
        ratios.append(took["reference"] / took["engine"])

    engine, reference = results["engine"], results["reference"]
    if engine.keys() != reference.keys():
        raise AssertionError(
            f"methods scored different (sample, level) pairs: {sorted(engine.keys() ^ reference.keys())[:5]}"
        )
    diff = max(abs(engine[k] - reference[k]) for k in reference)
    if not diff <= NLL_TOLERANCE:
        worst = max(reference, key=lambda k: abs(engine[k] - reference[k]))
        raise AssertionError(
            f"engine and reference nll_mean differ by {diff:.2e} > {NLL_TOLERANCE} at (sample, level) {worst}: "
            f"{engine[worst]} vs {reference[worst]}"
        )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "samples_per_s": {m: len(samples) / t for m, t in seconds.items()},
        "ratio": seconds["reference"] / seconds["engine"],
        "cpu_ratio": cpu_seconds["reference"] / cpu_seconds["engine"],
        "chunk_ratio_median": statistics.median(ratios),
        "pairs": len(reference),
        "max_nll_diff": diff,
        "reference_split": {k: v / sum(timers.values()) for k, v in timers.items()},
    }


def _status_kb(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS, ``VmHWM`` (Linux >= 4.0); False if not possible here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def memory_worker(
    model: str, method: str, n_samples: int, batch_images: int, threads: int, seed: int
) -> dict:
    """Runs in its own process: build, prepare, baseline, score every chunk with ONE method, peak."""
    torch.set_num_threads(threads)
    lmm = build_lmm(model, seed)
    samples = make_samples(lmm, n_samples, seed)
    gc.collect()
    reset = _reset_peak_rss()
    baseline_kb = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for chunk in chunks(samples, batch_images):
        METHODS[method](lmm, chunk)
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    return {
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "increment_mb": (peak_kb - baseline_kb) / 1024,
        "peak_reset": reset,
    }


def measure_memory(
    model: str, method: str, n_samples: int, batch_images: int, threads: int, seed: int
) -> dict:
    """``memory_worker`` in a fresh interpreter, so one method's peak never hides the other's."""
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "bench.bench_score", "--memory-worker", method, "--models", model,
        "--samples", str(n_samples), "--batch-images", str(batch_images), "--threads", str(threads),
        "--seed", str(seed),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {model}/{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Run the benchmark; print and return its figures per model."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_score", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,mid", help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument(
        "--samples", type=int, default=None,
        help="samples per model (default: " + ", ".join(f"{k} {v.default_samples}" for k, v in MODELS.items()) + ")",
    )  # fmt: skip
    parser.add_argument("--batch-images", type=int, default=8, help="images per engine call (encode + score)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for both methods (default 1: on a shared machine extra threads only add noise)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-worker", choices=tuple(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.batch_images < 1 or args.threads < 1:
        parser.error("--batch-images and --threads must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.memory_worker:  # internal: one method's peak memory, printed as JSON
        n = args.samples or MODELS[models[0]].default_samples
        print(
            json.dumps(
                memory_worker(models[0], args.memory_worker, n, args.batch_images, args.threads, args.seed)
            )
        )
        return {}

    # restored at the end: `python -m bench` runs other benches in this process afterwards
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(models, args)
    finally:
        torch.set_num_threads(threads_before)


def _run(models: list[str], args: argparse.Namespace) -> dict[str, dict]:
    defaults = {
        k: v.default
        for k, v in inspect.signature(FrozenLMM.score).parameters.items()
        if v.default is not inspect.Parameter.empty and k != "levels"
    }
    print(
        "bench_score: answer nll_mean of every (sample, level), engine vs reference-style loop\n"
        f"  engine: encode {args.batch_images} images once, FrozenLMM.score ("
        + ", ".join(f"{k}={v}" for k, v in defaults.items())
        + ", lm_head on answer positions only)\n"
        "  reference: per sample and level: re-encode, full forward, full-vocab fp32 logits, batch 1\n"
        f"  threads={args.threads}; samples/s from wall time, CPU ratio from this process's CPU time"
    )
    columns = (
        f"  {'method':<10} {'samples/s':>10} {'CPU s/sample':>13} {'peak RSS +MB':>13} {'peak RSS MB':>12}"
    )
    figures: dict[str, dict] = {}
    for name in models:
        n = args.samples or MODELS[name].default_samples
        lmm = build_lmm(name, args.seed)
        samples = make_samples(lmm, n, args.seed)
        params = sum(p.numel() for p in lmm.model.parameters())
        levels = range(len(lmm.ladder))
        visual = sum(
            lmm.n_visual_tokens(s.image_size, s.pixels.shape[0], li) for s in samples for li in levels
        )
        print(
            f"\n[{name}] {MODELS[name].description}: {params / 1e6:.1f}M parameters, "
            f"vocab {lmm.embed.weight.shape[0]}, hidden {lmm.hidden_size}, {lmm.config.text_config.num_hidden_layers} "
            f"layers; {n} samples x levels {list(lmm.ladder.tokens)} = {visual / n:.0f} visual tokens per sample"
        )
        speed = measure_throughput(lmm, samples, args.batch_images)
        del lmm, samples
        gc.collect()
        memory = {m: measure_memory(name, m, n, args.batch_images, args.threads, args.seed) for m in METHODS}
        mem_ratio = memory["engine"]["increment_mb"] / max(memory["reference"]["increment_mb"], 1e-9)
        print(columns)
        for m in METHODS:
            print(
                f"  {m:<10} {speed['samples_per_s'][m]:>10.2f} {speed['cpu_seconds'][m] / n:>13.3f} "
                f"{memory[m]['increment_mb']:>13.1f} {memory[m]['peak_mb']:>12.1f}"
            )
        split = speed["reference_split"]
        print(
            f"  engine/reference: throughput {speed['ratio']:.2f}x wall (chunk median {speed['chunk_ratio_median']:.2f}x), "
            f"{speed['cpu_ratio']:.2f}x CPU; peak RSS increment {mem_ratio:.2f}\n"
            f"  reference CPU time: vision {split['vision']:.0%}, decoder {split['decoder']:.0%}, full-vocab logits "
            f"+ fp32 NLL {split['logits']:.0%} -> an engine running the same decoder work is at most "
            f"~{1 / split['decoder']:.1f}x faster\n"
            f"  nll_mean: max |engine - reference| = {speed['max_nll_diff']:.1e} over {speed['pairs']} (sample, level) "
            f"pairs (tolerance {NLL_TOLERANCE:g}); baseline RSS (model loaded) {memory['reference']['baseline_mb']:.0f} MB"
            + (
                ""
                if all(v["peak_reset"] for v in memory.values())
                else " [peak RSS not resettable: increments are lower bounds]"
            )
        )
        figures[name] = {"throughput": speed, "memory": memory, "memory_ratio": mem_ratio}

    print(
        f"\n  {'engine/reference':<16} {'throughput wall':>15} {'CPU':>6}  {'goal >= 5x':<10} {'peak RSS +':>10}  goal <= 1/3"
    )
    for name, f in figures.items():
        speed, mem_ratio = f["throughput"], f["memory_ratio"]
        print(
            f"  {name:<16} {speed['ratio']:>14.2f}x {speed['cpu_ratio']:>5.2f}x  "
            f"{_verdict(speed['ratio'] >= THROUGHPUT_GOAL):<10} {mem_ratio:>10.2f}  {_verdict(mem_ratio <= MEMORY_GOAL)}"
        )
    return figures


if __name__ == "__main__":
    main()
