"""Held-out evaluation of a trained router against the oracle and the paper's baselines.

Every metric is computed from the tables alone (rankings + router inputs): the level a policy
chooses for a sample is looked up in that sample's ranking rows, so no LMM runs here.

Policies (each chooses one level per sample):

    router       the trained router's argmax
    image_only   a second router trained with --image-only (if given)
    oracle       the rank-1 level (the cheapest within tolerance of the lowest NLL)
    random       a uniformly random level (seeded); its ordering is a random permutation
    fixed_<t>    always the level with t tokens per crop

Metrics per policy (means over samples):

    agreement           chosen level == oracle rank-1 level
    kendall_tau         Kendall's tau-a between the policy's level ordering (router: by logits)
                        and the oracle ranking; 1 for the oracle, null for fixed levels
    regret              nll_mean(chosen) - min nll_mean (the rankings' ``regret``)
    nll                 nll_mean(chosen)
    mean_visual_tokens  n_visual_tokens(chosen) (packing included, per sample)
    token_fraction      mean_visual_tokens / mean n_visual_tokens of the finest level
    token_reduction     1 - token_fraction
    accuracy            greedy_match(chosen): greedy decoding reproduces the reference answer
    choice_share        share of samples per chosen level (tokens per crop)

``eval.json`` layout::

    {"split", "n_samples", "ladder", "finest_mean_visual_tokens", "routers": {...},
     "policies": {name: metrics}, "by_source": {source: {name: metrics}},
     "budget_curve": {"router": [{budget, lam, reachable, val_token_fraction, <metrics>}, ...],
                      "image_only": [...]},
     "budget": {budget, lam, ... metrics} | null, "calibration": {split, n_samples}, "plot": "eval.png"}

The PNG plots accuracy and NLL regret against mean visual tokens: the fixed levels as a line,
the oracle, random, the routers, and each router's budget curve.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rglf.model.lmm import RouterSide
from rglf.model.router import ROUTER_CONFIG, RouterConfig, load_router
from rglf.model.scaler import Ladder
from rglf.router.budget import DEFAULT_BUDGETS, budget_choice, calibrate, level_costs, save_budget
from rglf.router.data import RouterData, load_router_data, router_logits
from rglf.router.train import resolve_device

EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"


# ---- metrics (pure numpy) --------------------------------------------------------------------


def kendall_tau(scores: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per-sample Kendall tau-a of ``scores (S, N)`` (higher = better) against ``order (S, N)``
    (level indices best first): (concordant - discordant) / (N (N-1) / 2); score ties count 0."""
    s, n = order.shape
    position = np.empty_like(order)
    position[np.arange(s)[:, None], order] = np.arange(n)[None, :]  # rank position of each level
    total = np.zeros(s)
    for i in range(n):
        for j in range(i + 1, n):
            oracle = np.sign(position[:, j] - position[:, i])  # +1: level i ranks better
            model = np.sign(scores[:, i] - scores[:, j])  # +1: level i scores higher
            total += oracle * model
    return total / (n * (n - 1) / 2)


def policy_metrics(
    choice: np.ndarray,
    data: RouterData,
    rows: np.ndarray,
    scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of choosing level ``choice[k]`` for sample ``rows[k]``; ``scores (len(rows), N)``
    give the policy's ordering for Kendall's tau (None: not defined)."""
    r = np.arange(len(rows))
    nll, regret = data.nll[rows], data.regret[rows]
    greedy, visual = data.greedy[rows], data.n_visual_tokens[rows]
    tokens = np.asarray(data.ladder.tokens)
    mean_tokens = float(visual[r, choice].mean())
    finest = float(visual[:, -1].mean())
    return {
        "n": len(rows),
        "agreement": float((choice == data.best[rows]).mean()),
        "kendall_tau": float(kendall_tau(scores, data.order[rows]).mean()) if scores is not None else None,
        "regret": float(regret[r, choice].mean()),
        "nll": float(nll[r, choice].mean()),
        "mean_visual_tokens": mean_tokens,
        "token_fraction": mean_tokens / finest,
        "token_reduction": 1.0 - mean_tokens / finest,
        "accuracy": float(greedy[r, choice].mean()),
        "choice_share": {str(int(t)): float((choice == i).mean()) for i, t in enumerate(tokens)},
    }


def baseline_policies(data: RouterData, rows: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{name: (choice, scores)}`` for the oracle, random and every fixed level."""
    n_levels = len(data.ladder)
    order = data.order[rows]
    oracle_scores = np.empty(order.shape, dtype=np.float64)
    oracle_scores[np.arange(len(rows))[:, None], order] = -np.arange(n_levels)[None, :]
    rng = np.random.default_rng(seed)
    random_scores = rng.random((len(rows), n_levels))
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "oracle": (data.best[rows], oracle_scores),
        "random": (random_scores.argmax(axis=1), random_scores),
    }
    for i, t in enumerate(data.ladder.tokens):
        out[f"fixed_{t}"] = (np.full(len(rows), i), None)
    return out


# ---- config and driver -----------------------------------------------------------------------


@dataclass
class EvalConfig:
    """``rglf eval``: a trained router (and baselines) on a held-out split."""

    run: Path
    """Scoring output folder (router_inputs/, router_side/)."""
    rank: Path
    """Ranking output folder (rankings/)."""
    router: Path
    """Router folder (router.safetensors + router_config.json)."""
    image_only_router: Path | None = None
    """A second router folder (trained with --image-only) evaluated alongside."""
    split: str = "test"
    """Split to evaluate on."""
    calibration_split: str = "val"
    """Split the budget's lam is calibrated on (never the evaluated split, unless it is empty)."""
    out: Path | None = None
    """Folder for eval.json and eval.png (None: the router folder)."""
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    """Budgets of the reported curve (fractions of the finest level's mean visual tokens)."""
    budget: float | None = None
    """One budget to calibrate and report on its own (and to save with save_budget)."""
    save_budget: bool = False
    """Write the calibrated lam of ``budget`` (and of the curve) into the router's budget.json."""
    seed: int = 0
    """Seed of the random baseline."""
    batch_size: int = 64
    """Samples per router forward pass."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' ..."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    plot: bool = True
    """Write eval.png."""

    def __post_init__(self) -> None:
        self.run, self.rank, self.router = Path(self.run), Path(self.rank), Path(self.router)
        self.image_only_router = Path(self.image_only_router) if self.image_only_router else None
        self.out = Path(self.out) if self.out else self.router
        self.budgets = tuple(float(b) for b in self.budgets)
        for b in (*self.budgets, *(() if self.budget is None else (self.budget,))):
            if not b > 0:
                raise ValueError(f"budgets must be > 0, got {b}")
        if self.save_budget and self.budget is None:
            raise ValueError("save_budget needs a budget (e.g. --budget 0.3)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def _router_scores(path: Path, data: RouterData, side: RouterSide, rows: np.ndarray, cfg: EvalConfig, device) -> np.ndarray:
    router = load_router(path, device)
    if tuple(router.ladder.tokens) != tuple(data.ladder.tokens) or router.config.grid != data.grid:
        raise ValueError(
            f"router {path} routes over levels {list(router.ladder.tokens)} (grid {router.config.grid}), "
            f"the evaluation data has {list(data.ladder.tokens)} (grid {data.grid})"
        )
    return router_logits(router, data, side, rows, batch_size=cfg.batch_size, device=device)


def evaluate_router(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate; write ``eval.json`` (and ``eval.png``) into ``cfg.out``; return the report."""
    from rglf.router.preflight import preflight_eval

    routers = [("--router", cfg.router)] + ([("--image-only-router", cfg.image_only_router)] if cfg.image_only_router else [])
    preflight_eval(cfg.run, cfg.rank, routers, cfg.split, cfg.device, cfg.out)  # one-line errors before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    router_cfg = RouterConfig.from_dict(json.loads((cfg.router / ROUTER_CONFIG).read_text()))
    levels = Ladder.parse(router_cfg.ladder, router_cfg.grid).tokens  # a subset router is evaluated on its subset
    data = load_router_data(cfg.run, cfg.rank, splits=(cfg.split, cfg.calibration_split), levels=levels)
    rows = data.indices(cfg.split)
    if len(rows) == 0:
        raise ValueError(f"no samples in split {cfg.split!r} (found: {sorted(set(data.split))})")
    cal_rows = data.indices(cfg.calibration_split)
    cal_split = cfg.calibration_split
    if len(cal_rows) == 0:  # nothing held out for calibration: calibrate on the evaluated split, and say so
        cal_rows, cal_split = rows, cfg.split
    side = RouterSide.load(cfg.run / "router_side").to(device)

    routers = {"router": cfg.router}
    if cfg.image_only_router is not None:
        routers["image_only"] = cfg.image_only_router
    scores, cal_scores = {}, {}
    for name, path in routers.items():
        both = _router_scores(path, data, side, np.concatenate([rows, cal_rows]), cfg, device)
        scores[name], cal_scores[name] = both[: len(rows)], both[len(rows) :]

    policies: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        name: (s.argmax(axis=1), s) for name, s in scores.items()
    }
    policies.update(baseline_policies(data, rows, cfg.seed))

    report: dict[str, Any] = {
        "split": cfg.split,
        "n_samples": len(rows),
        "ladder": list(data.ladder.tokens),
        "finest_mean_visual_tokens": float(data.n_visual_tokens[rows, -1].mean()),
        "routers": {name: str(path) for name, path in routers.items()},
        "policies": {name: policy_metrics(c, data, rows, s) for name, (c, s) in policies.items()},
        "by_source": {},
        "calibration": {"split": cal_split, "n_samples": len(cal_rows)},
        "data": data.info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    for source in sorted(set(data.source[rows])):
        k = np.flatnonzero(data.source[rows] == source)
        report["by_source"][str(source)] = {
            name: policy_metrics(c[k], data, rows[k], None if s is None else s[k]) for name, (c, s) in policies.items()
        }

    # Budget knob: lam calibrated on the calibration split, metrics on the evaluated split.
    tokens = data.ladder.tokens
    costs = level_costs(tokens)

    def at_budget(name: str, budget: float) -> tuple[Any, dict[str, Any]]:
        cal = calibrate(cal_scores[name], data.n_visual_tokens[cal_rows], tokens, budget, split=cal_split)
        choice = budget_choice(scores[name], costs, cal.lam)
        entry = {"budget": budget, "lam": cal.lam, "reachable": cal.reachable, "val_token_fraction": cal.token_fraction}
        entry.update(policy_metrics(choice, data, rows, scores[name]))
        return cal, entry

    curves = {name: [at_budget(name, b) for b in cfg.budgets] for name in scores}
    report["budget_curve"] = {name: [entry for _, entry in curve] for name, curve in curves.items()}
    report["budget"] = None
    if cfg.budget is not None:
        cal, entry = at_budget("router", cfg.budget)
        report["budget"] = entry
        if cfg.save_budget:
            saved = [c for c, _ in curves["router"]] + [cal]
            report["budget"]["saved_to"] = str(save_budget(cfg.router, saved, default=cfg.budget))

    cfg.out.mkdir(parents=True, exist_ok=True)
    report["plot"] = None
    if cfg.plot:
        plot_eval(report, cfg.out / EVAL_PNG)
        report["plot"] = EVAL_PNG
    tmp = cfg.out / f".{EVAL_JSON}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, cfg.out / EVAL_JSON)
    return report


# ---- presentation ----------------------------------------------------------------------------


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.3f}"


def eval_table(report: dict[str, Any]):
    """A rich Table of the policies."""
    from rich.table import Table

    table = Table(title=f"router evaluation: split {report['split']}, {report['n_samples']} samples")
    for col in ("policy", "agree %", "tau", "regret", "nll", "tokens", "tokens %", "acc %"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    rows = list(report["policies"].items())
    if report.get("budget"):
        rows.append((f"router @ budget {report['budget']['budget']:g}", report["budget"]))
    for name, m in rows:
        table.add_row(
            name, _fmt(m["agreement"], True), _fmt(m["kendall_tau"]), _fmt(m["regret"]), _fmt(m["nll"]),
            f"{m['mean_visual_tokens']:.0f}", _fmt(m["token_fraction"], True), _fmt(m["accuracy"], True),
        )
    return table


def plot_eval(report: dict[str, Any], path: Path) -> Path:
    """Accuracy and NLL regret vs mean visual tokens (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = report["policies"]
    fixed = [(name, m) for name, m in pol.items() if name.startswith("fixed_")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "accuracy", "greedy accuracy"), (axes[1], "regret", "mean NLL regret")):
        ax.plot([m["mean_visual_tokens"] for _, m in fixed], [m[key] for _, m in fixed], "o-", color="grey",
                label="fixed level")
        for name, m in fixed:
            ax.annotate(name.removeprefix("fixed_"), (m["mean_visual_tokens"], m[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        styles = {"random": ("x", "black", 9), "router": ("D", "tab:blue", 10), "image_only": ("s", "tab:orange", 9),
                  "oracle": ("*", "gold", 12)}  # the oracle last: on top when the router reaches it
        for name, (marker, color, size) in styles.items():
            if name in pol:
                ax.plot(pol[name]["mean_visual_tokens"], pol[name][key], marker, color=color, markersize=size,
                        label=name, linestyle="none", markeredgecolor="black", markeredgewidth=0.5)
        for name, curve in report.get("budget_curve", {}).items():
            color = styles.get(name, ("", None, 0))[1]
            ax.plot([c["mean_visual_tokens"] for c in curve], [c[key] for c in curve], "--", color=color, alpha=0.7,
                    label=f"{name} budget curve")
        ax.set_xlabel("mean visual tokens per sample")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"quality vs visual tokens ({report['split']}, n = {report['n_samples']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
