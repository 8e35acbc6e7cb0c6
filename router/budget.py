"""Token-budget knob: trade answer quality for visual tokens at inference, calibrated on held-out data.

Beyond the paper (which always takes the router's argmax). With the router's level
probabilities ``p_i`` and ``cost_i = tokens_i / tokens_finest`` (tokens per crop, a property of
the ladder, so it is known before packing), choose

    level = argmax_i ( log p_i - lam * cost_i )

``lam = 0`` is the paper's router; ``lam > 0`` moves choices to cheaper levels, ``lam < 0`` to
finer ones. For every sample the chosen cost can only fall as ``lam`` grows (the argmax of
``u_i - lam * c_i`` is monotone in ``lam``), so the mean visual tokens are a non-increasing step
function of ``lam`` and bisection finds the smallest ``lam`` whose mean stays within a target.
RouteLLM calibrates its routing threshold to a target share of strong-model calls the same way.

Budget = the mean visual tokens of the chosen levels (``n_visual_tokens``, packing included)
over the mean visual tokens of the finest level, on the calibration samples: ``0.3`` = 30% of
always-finest. Budgets at or above 1 give always-finest; below always-coarsest they cannot be
met, and the calibration says so (``reachable = False``) and returns always-coarsest.

``budget.json`` in a router folder holds calibrated values, read by ``rglf route --budget``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BUDGET_FILE = "budget.json"
DEFAULT_BUDGETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1.0
METHOD = (
    "level = argmax_i(log p_i - lam * tokens_i / tokens_finest); lam = the smallest value whose mean "
    "n_visual_tokens on the calibration split is <= budget * mean n_visual_tokens of the finest level "
    "(bisection; the mean is non-increasing in lam)"
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def level_costs(tokens) -> np.ndarray:
    """``tokens_i / tokens_finest`` per level (ladder order)."""
    t = np.asarray(tokens, dtype=np.float64)
    return t / t.max()


def budget_choice(logits: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """Chosen level index per sample: ``argmax_i(log p_i - lam * cost_i)``; ties -> the cheaper level."""
    return np.argmax(log_softmax(logits) - lam * np.asarray(costs)[None, :], axis=-1)


def token_fraction(choice: np.ndarray, n_visual_tokens: np.ndarray) -> float:
    """Mean visual tokens of the choices over the mean visual tokens of the finest level."""
    rows = np.arange(len(choice))
    return float(n_visual_tokens[rows, choice].mean() / n_visual_tokens[:, -1].mean())


@dataclass
class Calibration:
    """One calibrated budget."""

    budget: float
    lam: float
    token_fraction: float  # achieved on the calibration samples (<= budget when reachable)
    reachable: bool
    n_samples: int
    split: str = "val"


def lam_bound(logits: np.ndarray, costs: np.ndarray) -> float:
    """A ``lam`` beyond which every sample picks the cheapest level (and below ``-bound`` the finest)."""
    lp = log_softmax(logits)
    spread = float((lp.max(axis=-1) - lp.min(axis=-1)).max()) if len(lp) else 0.0
    gaps = np.diff(np.sort(np.unique(costs)))
    return (spread / float(gaps.min()) if len(gaps) else 0.0) + 1.0


def calibrate(
    logits: np.ndarray,
    n_visual_tokens: np.ndarray,
    tokens,
    budget: float,
    *,
    iters: int = 64,
    split: str = "val",
) -> Calibration:
    """The smallest ``lam`` whose mean token fraction on these samples is ``<= budget`` (bisection).

    ``logits (S, N)`` router logits, ``n_visual_tokens (S, N)``, ``tokens (N,)`` tokens per crop;
    ladder order, finest last.
    """
    if not budget > 0:
        raise ValueError(f"budget must be > 0 (a fraction of the finest level's tokens), got {budget}")
    if len(logits) == 0:
        raise ValueError("cannot calibrate a budget on zero samples")
    costs = level_costs(tokens)
    bound = lam_bound(logits, costs)

    def frac(lam: float) -> float:
        return token_fraction(budget_choice(logits, costs, lam), n_visual_tokens)

    n = len(logits)
    if frac(-bound) <= budget:  # even always-finest fits
        return Calibration(budget, -bound, frac(-bound), True, n, split)
    if frac(bound) > budget:  # even always-coarsest does not fit
        return Calibration(budget, bound, frac(bound), False, n, split)
    lo, hi = -bound, bound  # frac(lo) > budget >= frac(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if frac(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return Calibration(budget, hi, frac(hi), True, n, split)


def budget_key(budget: float) -> str:
    return f"{float(budget):g}"


def save_budget(router_dir: str | os.PathLike[str], calibrations: list[Calibration], default: float | None = None) -> Path:
    """Merge ``calibrations`` into ``router_dir/budget.json`` (``default``: the budget used when
    ``rglf route`` gets ``--budget`` without a value; kept if None)."""
    path = Path(router_dir) / BUDGET_FILE
    data = load_budget_file(router_dir) or {"method": METHOD, "budgets": {}}
    for cal in calibrations:
        data["budgets"][budget_key(cal.budget)] = asdict(cal)
    if default is not None:
        data["default_budget"] = float(default)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_budget_file(router_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(router_dir) / BUDGET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def lam_for_budget(router_dir: str | os.PathLike[str], budget: float) -> Calibration:
    """The calibrated ``lam`` for ``budget`` from ``router_dir/budget.json`` (exact match)."""
    data = load_budget_file(router_dir)
    if data is None:
        raise FileNotFoundError(
            f"{Path(router_dir) / BUDGET_FILE} not found: calibrate first with "
            f"`rglf eval ... --budget {budget_key(budget)} --save-budget`"
        )
    entry = data["budgets"].get(budget_key(budget))
    if entry is None:
        raise KeyError(
            f"budget {budget_key(budget)} is not calibrated in {Path(router_dir) / BUDGET_FILE} "
            f"(calibrated: {sorted(data['budgets'], key=float)}); run `rglf eval ... --budget "
            f"{budget_key(budget)} --save-budget`"
        )
    return Calibration(**entry)
