"""Stage-1 multi-granularity visual instruction tuning of the tiny embedded-default model.

AVG-LLaVA's Stage 1 trains the LMM on every granularity: the loss is the mean over levels
of the answer cross-entropy, with the image encoded once and its projected features pooled
to each level (SPEC). This module does that for a tiny ``LlavaNextForConditionalGeneration``
built from ``model.toy.tiny`` on the synthetic task of ``model.toy.task``, on a CPU.

What makes it learn in minutes (SPEC, "what then worked"; each is a documented choice):
- a linear vision path (SigLIP layer 0 = patch conv + position embedding, linear
  projector), so pooling commutes with the encoder and destroys the fine information
  exactly instead of letting the model learn pooling-robust codes;
- a curriculum: the first ``finest_steps`` steps train at the finest level only (learning
  to attend to a few of ~1,200 visual tokens from a random start is the bottleneck), then
  the Stage-1 loss over all levels;
- several question turns per training sequence (every family of the scene, shuffled).

The held-out evaluation (``evaluate``) scores the answers with ``FrozenLMM.score`` — the same
code the scoring job runs — and reports greedy exact match and mean answer NLL per family
per level.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..conversation import write_checkpoint_record
from ..lmm import FrozenLMM, answer_logits, splice
from ..scaler import Ladder
from . import task as toy


@dataclass
class Stage1Config:
    """Stage-1 training of the tiny embedded-default model."""

    out: Path
    """Checkpoint folder to write (HF format: weights, config, tokenizer, processor, report)."""
    steps: int = 2400
    """Optimiser steps in all (curriculum included)."""
    finest_steps: int = 1200
    """Curriculum: steps at the finest level only before the all-level Stage-1 loss."""
    batch_size: int = 8
    lr: float = 2e-3
    """AdamW learning rate (2e-3 trained the SPEC's experiment)."""
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of ``lr``."""
    seed: int = 0
    threads: int = 2
    eval_every: int = 200
    eval_per_family: int = 40
    """Held-out questions per family in the periodic evaluation (the final report uses more)."""
    report_per_family: int = 200
    max_minutes: float | None = None
    """Stop early (and still save) after this many minutes."""
    aspect_probs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    ladder: str = "6x6,12x6,12x12,24x12,24x24"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if not 0 <= self.finest_steps <= self.steps:
            raise ValueError(f"finest_steps ({self.finest_steps}) must be within [0, steps={self.steps}]")
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def _lr_at(step: int, cfg: Stage1Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _scene_turns(scene: toy.Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for i, (q, a) in enumerate(toy.stage1_turns(scene, rng)):
        turns += [("human", ("<image>\n" + q) if i == 0 else q), ("gpt", a)]
    return turns


def build_untrained(cfg: Stage1Config, seed: int | None = None) -> FrozenLMM:
    """The tiny LLaVA-NeXT (random init) wrapped for training (not frozen)."""
    from .tiny import TOY_TEMPLATE, build_tiny_model

    model, tok, proc = build_tiny_model(
        toy.TOY_VOCABULARY,
        seed=cfg.seed if seed is None else seed,
        text_hidden=cfg.text_hidden,
        text_layers=cfg.text_layers,
        vision_hidden=cfg.vision_hidden,
    )
    ladder = Ladder.parse(cfg.ladder, model.config.vision_config.image_size // model.config.vision_config.patch_size)
    return FrozenLMM(model, tok, proc, ladder=ladder, model_id="stage1-training", freeze=False, template=TOY_TEMPLATE)


def stage1_loss(
    lmm: FrozenLMM, images: list, conversations: list, levels: list[int]
) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over ``levels`` of the answer cross-entropy; the images are encoded once."""
    pix, sizes = zip(*(lmm.preprocess(im) for im in images), strict=True)
    counts = [p.shape[0] for p in pix]
    vision = lmm.vision_features(torch.cat(pix))  # (sum crops, g*g, dv)
    projected = lmm.projector(vision).split(counts)  # per image (n_crops, g*g, d)
    losses, per_level = [], {}
    for li in levels:
        seqs = [
            splice(lmm.embed, conv, lmm.pack(p, size, li))
            for conv, p, size in zip(conversations, projected, sizes, strict=True)
        ]
        logits, targets, _ = answer_logits(lmm.language_model, lmm.lm_head, [e for e, _ in seqs], [y for _, y in seqs])
        loss = F.cross_entropy(logits.float(), targets)
        losses.append(loss)
        per_level[lmm.ladder.levels[li].tokens] = float(loss.detach())
    return torch.stack(losses).mean(), per_level


def heldout_items(lmm: FrozenLMM, per_family: int, seed: int, aspect_probs=(0.8, 0.1, 0.1)):
    """Held-out (family, answer, conversation, encoding) items from a seed stream training never uses."""
    items = []
    for family in toy.FAMILIES:
        rng = np.random.default_rng([seed, 7919, toy.FAMILIES.index(family)])
        kind = family if family in toy.SQUARE_KINDS else None
        for _ in range(per_family):
            scene = toy.sample_scene(rng, square_kind=kind, aspect_probs=aspect_probs)
            q, a = toy.question_answer(scene, family)
            conv = lmm.tokenize([("human", "<image>\n" + q), ("gpt", a)], has_image=True)
            items.append((family, a, conv, toy.render(scene)))
    return items


def evaluate(lmm: FrozenLMM, items, batch_images: int = 16) -> dict[str, dict[int, dict[str, float]]]:
    """Greedy exact match and mean answer NLL per family per level (``FrozenLMM.score``)."""
    was_training = lmm.model.training
    lmm.model.eval()
    acc: dict[str, dict[int, list]] = {}
    for start in range(0, len(items), batch_images):
        chunk = items[start : start + batch_images]
        pix, sizes = zip(*(lmm.preprocess(im) for *_, im in chunk), strict=True)
        enc = lmm.encode(pix, sizes)
        scores = lmm.score([(k, conv, e) for k, ((_, _, conv, _), e) in enumerate(zip(chunk, enc, strict=True))])
        for s in scores:
            family = chunk[s.key][0]
            acc.setdefault(family, {}).setdefault(s.level_tokens, []).append((s.greedy_match, s.nll_mean))
    lmm.model.train(was_training)
    return {
        fam: {
            lv: {"accuracy": float(np.mean([m for m, _ in v])), "nll": float(np.mean([n for _, n in v])), "n": len(v)}
            for lv, v in sorted(by_level.items())
        }
        for fam, by_level in acc.items()
    }


def format_table(table: dict[str, dict[int, dict[str, float]]]) -> str:
    """Rows = families, columns = levels: ``accuracy% / nll``."""
    levels = sorted({lv for by_level in table.values() for lv in by_level})
    head = f"{'family':<14}" + "".join(f"{lv:>14}" for lv in levels)
    lines = [head, "-" * len(head)]
    for fam in toy.FAMILIES:
        if fam not in table:
            continue
        cells = "".join(
            f"{100 * table[fam][lv]['accuracy']:>7.0f} /{table[fam][lv]['nll']:>5.2f}" for lv in levels
        )
        lines.append(f"{fam:<14}{cells}")
    lines.append("cells: greedy exact-match accuracy % / mean answer NLL, per level (tokens per crop)")
    return "\n".join(lines)


def train_stage1(cfg: Stage1Config, log=print) -> dict:
    """Train, evaluate on held-out questions, save an HF-format checkpoint with its report."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    lmm = build_untrained(cfg)
    model = lmm.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 1])
    eval_items = heldout_items(lmm, cfg.eval_per_family, cfg.seed, cfg.aspect_probs)
    all_levels = list(range(len(lmm.ladder)))
    finest = [len(lmm.ladder) - 1]
    history, start, step = [], time.time(), 0
    coarsest = lmm.ladder.levels[0].tokens
    finest_tokens = lmm.ladder.levels[-1].tokens
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        scenes = [toy.sample_scene(rng, aspect_probs=cfg.aspect_probs) for _ in range(cfg.batch_size)]
        convs = [lmm.tokenize(_scene_turns(s, rng), has_image=True) for s in scenes]
        levels = finest if step < cfg.finest_steps else all_levels
        loss, per_level = stage1_loss(lmm, [toy.render(s) for s in scenes], convs, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = step + 1 == cfg.steps
        out_of_time = cfg.max_minutes is not None and (time.time() - start) / 60 > cfg.max_minutes
        if (step + 1) % cfg.eval_every == 0 or last or out_of_time:
            table = evaluate(lmm, eval_items)
            point = {
                "step": step + 1,
                "minutes": round((time.time() - start) / 60, 2),
                "loss": round(float(loss), 4),
                "fine_acc_finest": table["fine"][finest_tokens]["accuracy"],
                "fine_acc_coarsest": table["fine"][coarsest]["accuracy"],
                "medium_acc_finest": table["medium"][finest_tokens]["accuracy"],
                "medium_acc_coarsest": table["medium"][coarsest]["accuracy"],
                "coarse_acc_coarsest": float(
                    np.mean([table[f][coarsest]["accuracy"] for f in toy.FAMILIES if toy.GRANULARITY[f] == "coarse"])
                ),
            }
            history.append(point)
            log(json.dumps(point))
        if out_of_time:
            log(f"stopping at step {step + 1}: max_minutes={cfg.max_minutes} reached")
            break
    minutes = (time.time() - start) / 60
    model.eval()
    final_items = heldout_items(lmm, cfg.report_per_family, cfg.seed + 1, cfg.aspect_probs)
    table = evaluate(lmm, final_items)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "steps_done": step + 1,
        "train_minutes": round(minutes, 2),
        "threads": cfg.threads,
        "heldout_per_family": cfg.report_per_family,
        "table": table,
        "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_checkpoint(lmm, cfg.out, report)
    log(format_table(table))
    return report


def save_checkpoint(lmm: FrozenLMM, out: Path, report: dict) -> Path:
    """HF-format folder (``save_pretrained``) + ``stage1_report.json``; written to a temp dir then renamed."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lmm.model.save_pretrained(tmp)
    lmm.tokenizer.save_pretrained(tmp)
    lmm.image_processor.save_pretrained(tmp)
    (tmp / "stage1_report.json").write_text(json.dumps(report, indent=2))
    write_checkpoint_record(tmp, template=lmm.template.name, template_source="the template model/toy/stage1.py trained with")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
