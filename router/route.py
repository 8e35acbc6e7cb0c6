"""Route one image + question: the router's level, its probabilities, and optionally the answer.

The router's inputs are built exactly as the scoring job builds them for training, but from
the live model instead of the tables: the projected features of every crop (the vision tower
and projector run once, ``FrozenLMM.encode``) and the embeddings of the instruction ids, i.e.
the whole prompt's non-answer text: ``lmm.instruction_ids(lmm.tokenize([("human", "<image>\\n"
+ q), ("gpt", "x")], True))`` (the placeholder answer "x" is labelled, so it is left out).

The chosen level is the router's argmax (the paper), or with a budget (``router.budget``)
``argmax_i(log p_i - lam * tokens_i / tokens_finest)`` with ``lam`` from the router folder's
``budget.json``. With ``answer=True`` the LMM then answers greedily at that level only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rglf.model.conversation import IMAGE_PLACEHOLDER
from rglf.model.router import load_router
from rglf.router.budget import budget_choice, lam_for_budget, level_costs, log_softmax


def route(
    router_dir: str | Path,
    model: str | Path,
    image: str | Path,
    question: str,
    *,
    answer: bool = False,
    budget: float | None = None,
    lam: float | None = None,
    max_new_tokens: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Route one (image, question); returns a JSON-ready dict (see ``rglf route --json``)."""
    from PIL import Image

    from rglf.model.lmm import FrozenLMM

    if budget is not None and lam is not None:
        raise ValueError("give a budget (calibrated lam from budget.json) or a lam, not both")
    router = load_router(router_dir, device)
    lmm = FrozenLMM.from_pretrained(model, device=device, ladder=router.config.ladder)
    if lmm.grid != router.config.grid or lmm.hidden_size != router.config.hidden_size:
        raise ValueError(
            f"router {router_dir} expects a {router.config.grid}x{router.config.grid} grid of width "
            f"{router.config.hidden_size}; model {model} has {lmm.grid}x{lmm.grid}, width {lmm.hidden_size}"
        )
    calibration = lam_for_budget(router_dir, budget) if budget is not None else None
    if calibration is not None:
        lam = calibration.lam

    with Image.open(image) as im:
        pixels, size = lmm.preprocess(im.convert("RGB"))
    enc = lmm.encode([pixels], [size])[0]
    prompt = question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"
    ids = lmm.instruction_ids(lmm.tokenize([("human", prompt), ("gpt", "x")], True))
    with torch.inference_mode():
        text = lmm.embed(torch.tensor([ids], dtype=torch.long, device=lmm.device)).float()  # (1, T, d)
        feats = enc.projected.float()[None]  # (1, n_crops, grid^2, d)
        crop_mask = torch.ones(1, feats.shape[1], dtype=torch.bool, device=feats.device)
        logits = router(feats, crop_mask, text, None).double().cpu().numpy()  # (1, N)

    tokens = router.ladder.tokens
    choice = int(budget_choice(logits, level_costs(tokens), lam or 0.0)[0])
    probs = np.exp(log_softmax(logits[0]))
    visual = [int(lmm.pack(enc.projected, enc.image_size, i).shape[0]) for i in range(len(tokens))]
    level = router.ladder.levels[choice]
    result: dict[str, Any] = {
        "level_index": choice,
        "level_tokens": level.tokens,
        "level_grid": level.name,
        "n_visual_tokens": visual[choice],
        "n_crops": enc.n_crops,
        "image_size": list(enc.image_size),
        "probabilities": {str(t): float(p) for t, p in zip(tokens, probs, strict=True)},
        "visual_tokens_per_level": {str(t): v for t, v in zip(tokens, visual, strict=True)},
        "token_fraction": visual[choice] / visual[-1],
        "budget": budget,
        "lam": lam,
        "question": question,
        "answer": None,
    }
    if answer:
        result["answer"] = lmm.generate([("human", prompt)], enc, choice, max_new_tokens=max_new_tokens)
    return result


def format_route(result: dict[str, Any]) -> str:
    """Human-readable summary of ``route``'s result."""
    lines = [
        f"level: {result['level_tokens']} tokens per crop ({result['level_grid']}), "
        f"{result['n_visual_tokens']} visual tokens ({100 * result['token_fraction']:.0f}% of the finest level)",
        "probabilities: " + "  ".join(f"{t}: {p:.3f}" for t, p in result["probabilities"].items()),
    ]
    if result["lam"] is not None:
        lines.append(f"budget: {result['budget']}  lam: {result['lam']:.4f}")
    if result["answer"] is not None:
        lines.append(f"answer: {result['answer']}")
    return "\n".join(lines)
