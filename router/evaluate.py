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

Quality-vs-cost summaries (RouteLLM's, with weak = always the coarsest level and strong =
always the finest; quality = greedy accuracy, cost = mean visual tokens; see ``apgr``/``cpt``)::

    PGR(point)  = (accuracy - accuracy_weak) / (accuracy_strong - accuracy_weak)
    APGR        = area under PGR over the normalised cost (tokens - tokens_weak) / (tokens_strong
                  - tokens_weak) in [0, 1], of the budget curve with both end points added
                  (0.5 = no better than mixing the two fixed levels at random; higher is better)
    CPT(x%)     = the fewest mean visual tokens, as a fraction of the finest level's, at which
                  the budget curve first recovers x% of the gap (lower is better; null: never)

The oracle's reference curve is the best accuracy any per-sample choice reaches at each cost
(``oracle_curve``).

``eval.json`` layout::

    {"split", "n_samples", "ladder", "finest_mean_visual_tokens", "routers": {...},
     "policies": {name: metrics}, "by_source": {source: {name: metrics}},
     "budget_curve": {"router": [{budget, lam, reachable, val_token_fraction, <metrics>}, ...],
                      "image_only": [...]},
     "oracle_curve": [{token_fraction, mean_visual_tokens, accuracy}, ...],
     "routellm": {"quality", "weak", "strong", "curves": {"router": {apgr, cpt50, cpt80}, "oracle": {...}}},
     "confusion": {"levels", "rows": "oracle", "cols": "router", "matrix", "by_router": {...}},
     "budget": {budget, lam, ... metrics} | null, "calibration": {split, n_samples},
     "plot": "eval.png", "plots": {name: file}}

Plots (all with the same log-2 token axis as ``rglf report``'s): ``eval.png`` (accuracy and
NLL regret vs mean visual tokens: fixed levels, oracle and its curve, random, the routers and
their budget curves), ``confusion.png`` (router level vs oracle level, counts), and
``training_curve.png`` (from the router folder's ``metrics.json``, when it has one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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
from rglf.router.train import METRICS, resolve_device

EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"
CONFUSION_PNG = "confusion.png"
TRAINING_CURVE_PNG = "training_curve.png"
Progress = Callable[[int, "int | None", "dict[str, Any] | None"], None]


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


def confusion_matrix(oracle: np.ndarray, chosen: np.ndarray, n_levels: int) -> np.ndarray:
    """``(N, N)`` counts: row = the oracle's level index, column = the chosen level index."""
    m = np.zeros((n_levels, n_levels), dtype=np.int64)
    np.add.at(m, (np.asarray(oracle, dtype=np.int64), np.asarray(chosen, dtype=np.int64)), 1)
    return m


def pgr(quality: np.ndarray | float, weak: float, strong: float) -> np.ndarray | None:
    """Performance gap recovered (RouteLLM): ``(quality - weak) / (strong - weak)``; None when
    the strong policy is not better than the weak one (no gap to recover)."""
    if not strong > weak:
        return None
    return (np.asarray(quality, dtype=np.float64) - weak) / (strong - weak)


def _curve(costs, quality, weak: tuple[float, float], strong: tuple[float, float]):
    """(normalised cost, PGR) of a curve with both end points added, sorted by cost; None: no gap."""
    c = np.concatenate([[weak[0]], np.asarray(costs, dtype=np.float64), [strong[0]]])
    q = np.concatenate([[weak[1]], np.asarray(quality, dtype=np.float64), [strong[1]]])
    y = pgr(q, weak[1], strong[1])
    if y is None or not strong[0] > weak[0]:
        return None
    order = np.lexsort((y, c))  # by cost; at equal cost the worse point first
    return (c[order] - weak[0]) / (strong[0] - weak[0]), y[order], c[order]


def apgr(costs, quality, weak: tuple[float, float], strong: tuple[float, float]) -> float | None:
    """Average PGR: the area under PGR vs normalised cost (trapezoids), end points included.

    ``costs``/``quality``: the curve's points (e.g. mean visual tokens and accuracy at each budget);
    ``weak``/``strong``: ``(cost, quality)`` of always-coarsest / always-finest. The straight line
    between them scores 0.5. None when strong is not better than weak.
    """
    curve = _curve(costs, quality, weak, strong)
    if curve is None:
        return None
    x, y, _ = curve
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def cpt(costs, quality, weak: tuple[float, float], strong: tuple[float, float], target: float) -> float | None:
    """Call-performance threshold (RouteLLM's CPT(target)): the lowest cost at which the curve
    (linear between its points, end points included) first reaches PGR >= ``target``, in the
    cost's own unit; None when it never does (or there is no gap)."""
    curve = _curve(costs, quality, weak, strong)
    if curve is None:
        return None
    _, y, c = curve
    if y[0] >= target:
        return float(c[0])
    for i in range(len(y) - 1):
        if y[i] < target <= y[i + 1]:
            return float(c[i] + (target - y[i]) / (y[i + 1] - y[i]) * (c[i + 1] - c[i]))
    return None


def oracle_curve(greedy: np.ndarray, n_visual_tokens: np.ndarray, tokens) -> list[tuple[float, float]]:
    """The best (mean visual tokens, accuracy) trade-offs a per-sample choice can reach.

    Per sample choose ``argmax_i(greedy_i - lam * cost_i)`` (``cost_i`` = tokens per crop / the
    finest; ties -> the cheaper level) for every ``lam`` where the choice changes: lam = 0 is
    the cheapest correct level, a large lam always the coarsest. ``greedy (S, N)`` bool,
    ``n_visual_tokens (S, N)``; returns points sorted by cost.
    """
    costs = np.asarray(tokens, dtype=np.float64) / float(np.max(tokens))
    gaps = {float(b - a) for a in costs for b in costs if b > a}
    breaks = sorted(1.0 / g for g in gaps)
    lams = [0.0, *[b * f for b in breaks for f in (0.999, 1.001)], 2.0 * breaks[-1] + 1.0] if breaks else [0.0]
    util = np.asarray(greedy, dtype=np.float64)
    rows = np.arange(len(util))
    points = set()
    for lam in lams:
        choice = np.argmax(util - lam * costs[None, :], axis=1)
        points.add((float(n_visual_tokens[rows, choice].mean()), float(util[rows, choice].mean())))
    return sorted(points)


def routellm_summary(
    curves: dict[str, list[tuple[float, float]]], weak: tuple[float, float], strong: tuple[float, float],
    finest_tokens: float,
) -> dict[str, dict[str, float | None]]:
    """APGR, CPT(50%) and CPT(80%) of each ``(mean visual tokens, accuracy)`` curve; CPTs as a
    fraction of the finest level's mean visual tokens."""
    out = {}
    for name, points in curves.items():
        costs = [p[0] for p in points]
        quality = [p[1] for p in points]
        row: dict[str, float | None] = {"apgr": apgr(costs, quality, weak, strong)}
        for target in (0.5, 0.8):
            value = cpt(costs, quality, weak, strong, target)
            row[f"cpt{int(100 * target)}"] = None if value is None else value / finest_tokens
        out[name] = row
    return out


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


def _router_scores(
    path: Path, data: RouterData, side: RouterSide, rows: np.ndarray, cfg: EvalConfig, device,
    tick: Callable[[int], None] | None = None,
) -> np.ndarray:
    router = load_router(path, device)
    if tuple(router.ladder.tokens) != tuple(data.ladder.tokens) or router.config.grid != data.grid:
        raise ValueError(
            f"router {path} routes over levels {list(router.ladder.tokens)} (grid {router.config.grid}), "
            f"the evaluation data has {list(data.ladder.tokens)} (grid {data.grid})"
        )
    # one stream over the rows (each row group read once), ticking per batch
    return router_logits(router, data, side, rows, batch_size=cfg.batch_size, device=device, tick=tick)


def evaluate_router(cfg: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate; write ``eval.json`` and the plots into ``cfg.out``; return the report.

    ``progress(done, total, fields)``: samples through the router(s) so far (optional).
    """
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
        found = sorted(set(data.split))
        raise ValueError(f"split {cfg.split!r} is empty: no samples in it (found splits: {found or 'none'})")
    cal_rows = data.indices(cfg.calibration_split)
    cal_split = cfg.calibration_split
    if len(cal_rows) == 0:  # nothing held out for calibration: calibrate on the evaluated split, and say so
        cal_rows, cal_split = rows, cfg.split
    side = RouterSide.load(cfg.run / "router_side").to(device)

    routers = {"router": cfg.router}
    if cfg.image_only_router is not None:
        routers["image_only"] = cfg.image_only_router
    total = len(routers) * (len(rows) + len(cal_rows))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total, None)

    scores, cal_scores = {}, {}
    for name, path in routers.items():
        both = _router_scores(path, data, side, np.concatenate([rows, cal_rows]), cfg, device, tick)
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

    # Quality vs cost: the oracle's reference curve, APGR / CPT (RouteLLM), level confusion.
    finest = report["finest_mean_visual_tokens"]
    oracle_points = oracle_curve(data.greedy[rows], data.n_visual_tokens[rows], tokens)
    report["oracle_curve"] = [
        {"mean_visual_tokens": c, "token_fraction": c / finest, "accuracy": a} for c, a in oracle_points
    ]
    pol = report["policies"]
    weak, strong = pol[f"fixed_{tokens[0]}"], pol[f"fixed_{tokens[-1]}"]
    curve_points = {
        name: [(e["mean_visual_tokens"], e["accuracy"]) for e in entries]
        + [(pol[name]["mean_visual_tokens"], pol[name]["accuracy"])]  # the router's own argmax (lam = 0)
        for name, entries in report["budget_curve"].items()
    }
    curve_points["oracle"] = oracle_points
    report["routellm"] = {
        "quality": "accuracy (greedy_match)",
        "cost": "mean visual tokens; CPT as a fraction of the finest level's",
        "weak": f"fixed_{tokens[0]}",
        "strong": f"fixed_{tokens[-1]}",
        "quality_gap": strong["accuracy"] - weak["accuracy"],
        "curves": routellm_summary(
            curve_points,
            (weak["mean_visual_tokens"], weak["accuracy"]),
            (strong["mean_visual_tokens"], strong["accuracy"]),
            finest,
        ),
    }
    oracle_idx = data.best[rows]
    report["confusion"] = {
        "levels": list(tokens),
        "rows": "oracle level (tokens per crop)",
        "cols": "chosen level (tokens per crop)",
        "matrix": confusion_matrix(oracle_idx, policies["router"][0], len(tokens)).tolist(),
        "by_router": {
            name: confusion_matrix(oracle_idx, policies[name][0], len(tokens)).tolist() for name in scores
        },
    }

    cfg.out.mkdir(parents=True, exist_ok=True)
    report["plot"] = None
    report["plots"] = {}
    if cfg.plot:
        plot_eval(report, cfg.out / EVAL_PNG)
        plot_confusion(report, cfg.out / CONFUSION_PNG)
        report["plot"] = EVAL_PNG
        report["plots"] = {"eval": EVAL_PNG, "confusion": CONFUSION_PNG}
        metrics_file = cfg.router / METRICS
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            if metrics.get("history"):
                plot_training_curve(metrics, cfg.out / TRAINING_CURVE_PNG)
                report["plots"]["training_curve"] = TRAINING_CURVE_PNG
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


def source_table(report: dict[str, Any]):
    """A rich Table: per source, the router vs the oracle and always-finest (sample counts shown)."""
    from rich.table import Table

    finest = f"fixed_{report['ladder'][-1]}"
    table = Table(title="by source (router vs oracle and always-finest)")
    for col in ("source", "n", "agree %", "acc %", "oracle acc %", "finest acc %", "tokens %", "oracle tokens %"):
        table.add_column(col, justify="left" if col == "source" else "right", no_wrap=col == "source")
    for source, pol in report["by_source"].items():
        r, o, f = pol["router"], pol["oracle"], pol[finest]
        table.add_row(
            source, f"{r['n']:,}", _fmt(r["agreement"], True), _fmt(r["accuracy"], True), _fmt(o["accuracy"], True),
            _fmt(f["accuracy"], True), _fmt(r["token_fraction"], True), _fmt(o["token_fraction"], True),
        )
    return table


def routellm_table(report: dict[str, Any]):
    """A rich Table of APGR and CPT(50%) / CPT(80%) per curve (RouteLLM's router metrics)."""
    from rich.table import Table

    r = report["routellm"]
    table = Table(title=f"RouteLLM metrics (weak = always-{r['weak'].removeprefix('fixed_')}, "
                        f"strong = always-{r['strong'].removeprefix('fixed_')})")
    for col in ("curve", "APGR", "CPT(50%) tokens %", "CPT(80%) tokens %"):
        table.add_column(col, justify="left" if col == "curve" else "right")
    for name, m in r["curves"].items():
        table.add_row(name, _fmt(m["apgr"]), _fmt(m["cpt50"], True), _fmt(m["cpt80"], True))
    return table


# One token axis for every plot (the same as pipeline/report.py's, which this module may not import).
def _log_tokens_axis(ax) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean visual tokens per sample (log scale)")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int = 110) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


POLICY_STYLES = {  # marker, colour, size; the oracle last: on top when a router reaches it
    "random": ("X", "dimgrey", 9),
    "router": ("D", "tab:blue", 9),
    "image_only": ("s", "tab:orange", 9),
    "oracle": ("*", "gold", 17),
}


def plot_eval(report: dict[str, Any], path: Path) -> Path:
    """Accuracy and NLL regret vs mean visual tokens (log axis): fixed levels (labelled), the
    oracle and its best-trade-off curve, random, the routers and their budget curves."""
    pol = report["policies"]
    fixed = [(name, m) for name, m in pol.items() if name.startswith("fixed_")]
    apgr_of = {name: m["apgr"] for name, m in report.get("routellm", {}).get("curves", {}).items()}
    fig = _figure(12, 4.8)
    panels = (("accuracy", "greedy accuracy (higher is better)"), ("regret", "mean NLL regret (lower is better)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [m["mean_visual_tokens"] for _, m in fixed]
        ax.plot(xs, [m[key] for _, m in fixed], "o-", color="grey", lw=1.5, label="fixed level (tokens / crop)",
                zorder=2)
        for k, (name, m) in enumerate(fixed):  # alternate above / below: neighbours never collide
            ax.annotate(name.removeprefix("fixed_"), (m["mean_visual_tokens"], m[key]), fontsize=8, color="dimgrey",
                        textcoords="offset points", xytext=(0, 9 if k % 2 == 0 else -14), ha="center")
        if key == "accuracy" and report.get("oracle_curve"):
            oc = report["oracle_curve"]
            ax.plot([p["mean_visual_tokens"] for p in oc], [p["accuracy"] for p in oc], ":", color="goldenrod",
                    lw=1.5, label="oracle curve (cheapest correct level per sample)", zorder=2)
        for name, curve in report.get("budget_curve", {}).items():
            color = POLICY_STYLES.get(name, ("", "black", 0))[1]
            ax.plot([c["mean_visual_tokens"] for c in curve], [c[key] for c in curve], "--", color=color, alpha=0.8,
                    lw=1.3, label=f"{name} budget curve" + (f" (APGR {apgr_of[name]:.2f})" if apgr_of.get(name) is not None else ""),
                    zorder=3)
        for name, (marker, color, size) in POLICY_STYLES.items():
            if name in pol:
                ax.plot(pol[name]["mean_visual_tokens"], pol[name][key], marker, color=color, markersize=size,
                        label=name, linestyle="none", markeredgecolor="black", markeredgewidth=0.7, zorder=4)
        _log_tokens_axis(ax)
        ax.margins(x=0.06, y=0.1)  # room for the level labels above the highest / below the lowest point
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(f"Quality vs visual tokens ({report['split']} split, n = {report['n_samples']:,})")
    return _save(fig, path)


def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    """Router level vs oracle level: counts, shaded by the share of the oracle level's samples."""
    conf = report["confusion"]
    levels = conf["levels"]
    m = np.asarray(conf["matrix"], dtype=np.int64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = _figure(1.6 + 0.75 * len(levels), 1.4 + 0.7 * len(levels))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for r in range(len(levels)):
        for c in range(len(levels)):
            ax.text(c, r, f"{m[r, c]:,}", ha="center", va="center", fontsize=9,
                    color="white" if share[r, c] > 0.6 else "black", fontweight="bold" if r == c else "normal")
    ax.set_xticks(range(len(levels)), [str(t) for t in levels])
    ax.set_yticks(range(len(levels)), [f"{t} (n = {n:,})" for t, n in zip(levels, m.sum(axis=1), strict=True)])
    ax.set_xlabel("router's level (tokens / crop)")
    ax.set_ylabel("oracle's best level (tokens / crop)")
    agree = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"Router vs oracle, {report['split']} split\n(n = {m.sum():,}, agreement {agree:.1%})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the oracle level's samples")
    return _save(fig, path)


def plot_training_curve(metrics: dict[str, Any], path: Path) -> Path:
    """Loss, validation agreement and learning rate vs optimiser step, from ``metrics.json``."""
    from matplotlib.ticker import MaxNLocator

    history = metrics.get("history") or []
    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    val = [h for h in history if "val_loss" in h]
    fig = _figure(13, 4.0)
    axes = fig.subplots(1, 3, width_ratios=[1.2, 1.2, 0.8], sharex=True)
    ax = axes[0]
    ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.45 if len(loss) > 20 else 1.0, label="train loss (per step)")
    if len(loss) > 20:  # the per-step loss is noisy: an exponential moving average reads better
        ema, acc = np.empty_like(loss), loss[0]
        for i, v in enumerate(loss):
            acc = 0.9 * acc + 0.1 * v
            ema[i] = acc
        ax.plot(steps, ema, color="tab:blue", lw=1.8, label="train loss (moving average)")
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", color="tab:red", ms=5,
                label="validation loss")
    ax.set_ylabel("loss (rank + ce)")
    ax.legend(fontsize=8, loc="best")
    ax = axes[1]
    if val:
        ax.plot([h["step"] for h in val], [h["val_agreement"] for h in val], "o-", color="tab:green", ms=5,
                label=f"validation (n = {val[-1].get('n_val', metrics.get('n_val', '?'))})")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("top-1 agreement with the oracle")
    ax = axes[2]
    lr = [h.get("lr") for h in history]
    if history and all(v is not None for v in lr):
        ax.plot(steps, lr, color="dimgrey", lw=1.2)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_ylabel("learning rate")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Router training: {metrics.get('steps', len(history))} steps, {metrics.get('n_train', '?')} train "
                 f"/ {metrics.get('n_val', '?')} validation samples")
    return _save(fig, path)
