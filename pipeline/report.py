"""Plots and a markdown summary of a rank folder (``rglf report``).

Reads ``preferences`` and ``rank_report.json`` from a rank folder (``rglf rank --out``) and,
optionally, a scoring output folder for its samples/feedback/errors counts. Writes into
``--out``:

- ``best_level_share.png``: per source, the share of samples whose best level is each level.
- ``nll_vs_tokens.png``: per source, mean NLL vs mean visual tokens of every fixed level,
  with the oracle (each sample's best level) as a star.
- ``frontier.png``: all sources: mean NLL and greedy accuracy vs mean visual tokens, every
  fixed level plus the oracle point.
- ``report.md``: counts, exclusions, the plots, and the preferences table.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend state). Each file is
written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rglf.pipeline.query import open_catalog
from rglf.pipeline.rank import REPORT_NAME, TABLES

Progress = Callable[[int, "int | None", "dict[str, Any] | None"], None]

ALL = "__all__"  # the preferences row over every source
PLOTS = {
    "best_level_share": "Best level per source",
    "nll_vs_tokens": "Mean NLL vs visual tokens per source",
    "frontier": "Quality vs tokens: fixed levels and the oracle",
}
# Small presentation queries (constants; no values are interpolated).
_PREFERENCES_SQL = (
    "SELECT * FROM preferences ORDER BY source <> '__all__', source, policy = 'oracle', level_tokens"
)
# errors.code (short, machine-readable) when the parts have it; reason is a per-input sentence
_ERRORS_BY_CODE_SQL = (
    "SELECT stage, coalesce(code, reason) AS what, count(*) AS n FROM errors "
    "GROUP BY ALL ORDER BY n DESC, stage, what LIMIT 20"
)
_ERRORS_BY_REASON_SQL = "SELECT stage, reason AS what, count(*) AS n FROM errors GROUP BY ALL ORDER BY n DESC, stage, what LIMIT 20"


@dataclass
class ReportConfig:
    """Options of ``rglf report``."""

    rank: Path
    """A rank folder written by ``rglf rank`` (needs ``preferences/`` and ``rank_report.json``)."""
    out: Path
    """Folder for the PNGs and ``report.md`` (created if missing)."""
    run: Path | None = None
    """Optional scoring output folder: adds its samples / feedback / errors counts."""
    dpi: int = 120
    """Resolution of the PNGs."""

    def __post_init__(self) -> None:
        self.rank = Path(self.rank)
        self.out = Path(self.out)
        if self.run is not None:
            self.run = Path(self.run)
            if not self.run.is_dir():
                raise ValueError(f"--run {self.run} is not a folder")
        if not (self.rank / REPORT_NAME).is_file() or not (self.rank / "preferences").is_dir():
            raise ValueError(
                f"--rank {self.rank} is not a rank folder (no {REPORT_NAME} / preferences/): run `rglf rank` first"
            )
        if self.dpi < 30:
            raise ValueError(f"dpi must be >= 30, got {self.dpi}")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # a fresh hidden name (not mkstemp: its 0600 mode would stick to the published file)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int) -> None:
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _log_tokens_axis(ax) -> None:
    # the same axis as router/evaluate.py's plots (which cannot import this module)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean visual tokens per sample (log scale)")


def _source_label(source: str) -> str:
    return "all sources" if source == ALL else source


def plot_best_level_share(prefs: list[dict[str, Any]], levels: list[int], path: Path, dpi: int) -> None:
    """Stacked horizontal bars: per source, the share of samples whose best level is each level."""
    from matplotlib import colormaps

    fixed = [p for p in prefs if p["policy"] == "fixed"]
    sources = list(dict.fromkeys(p["source"] for p in fixed))[::-1]  # '__all__' on top
    share = {(p["source"], p["level_tokens"]): p["best_share"] or 0.0 for p in fixed}
    counts = {p["source"]: p["n_samples"] for p in fixed}
    # the sample count on every bar: a 28-sample source must not look as certain as a 1,000-sample one
    labels = [f"{_source_label(s)}\n(n = {counts.get(s, 0):,})" for s in sources]
    colors = colormaps["viridis"]
    fig = _figure(8, 1.4 + 0.6 * len(sources))
    ax = fig.add_subplot()
    left = [0.0] * len(sources)
    for k, level in enumerate(levels):
        widths = [share.get((s, level), 0.0) for s in sources]
        color = colors(k / max(len(levels) - 1, 1))
        ax.barh(labels, widths, left=left, color=color, label=str(level))
        for y, (x0, w) in enumerate(zip(left, widths, strict=True)):
            if w >= 0.07:
                ax.text(
                    x0 + w / 2,
                    y,
                    f"{w:.0%}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if k < len(levels) / 2 else "black",
                )
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of samples whose best level (rank 1) is the level")
    ax.legend(
        title="tokens / crop",
        ncols=min(len(levels), 8),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    _save(fig, path, dpi)


def plot_nll_vs_tokens(prefs: list[dict[str, Any]], path: Path, dpi: int) -> None:
    """Per source: mean NLL of each fixed level vs its mean visual tokens; the oracle as a star."""
    from matplotlib import colormaps

    sources = list(dict.fromkeys(p["source"] for p in prefs))
    colors = colormaps["tab10"]
    fig = _figure(8.5, 5.2)
    ax = fig.add_subplot()
    for k, source in enumerate(sources):
        color = "black" if source == ALL else colors(k % 10)
        fixed = [p for p in prefs if p["source"] == source and p["policy"] == "fixed"]
        oracle = [p for p in prefs if p["source"] == source and p["policy"] == "oracle"]
        n = fixed[0]["n_samples"] if fixed else 0
        ax.plot(
            [p["mean_visual_tokens"] for p in fixed],
            [p["mean_nll"] for p in fixed],
            marker="o",
            ms=4,
            color=color,
            lw=2.2 if source == ALL else 1.2,
            label=f"{_source_label(source)} (n = {n:,})",
            zorder=2,
        )
        for p in oracle:  # above every line and marker, outlined so it shows on any colour
            ax.scatter(
                p["mean_visual_tokens"],
                p["mean_nll"],
                marker="*",
                s=230,
                color=color,
                edgecolor="black" if source != ALL else "gold",
                linewidth=0.8,
                zorder=5,
            )
        if source == ALL:  # the levels, once, on the all-sources line
            for p in fixed:
                ax.annotate(
                    f"{p['level_tokens']}",
                    (p["mean_visual_tokens"], p["mean_nll"]),
                    textcoords="offset points",
                    xytext=(0, 8),
                    ha="center",
                    fontsize=8,
                )
    ax.scatter([], [], marker="*", s=160, color="white", edgecolor="black", label="oracle (each sample's best level)")
    _log_tokens_axis(ax)
    ax.set_ylabel("mean answer NLL (lower is better)")
    ax.set_title("Fixed levels (lines; labels: tokens per crop) and the oracle (stars)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path, dpi)


def plot_frontier(prefs: list[dict[str, Any]], path: Path, dpi: int) -> None:
    """All sources: mean NLL and greedy accuracy vs mean visual tokens, fixed levels and the oracle."""
    overall = [p for p in prefs if p["source"] == ALL]
    fixed = [p for p in overall if p["policy"] == "fixed"]
    oracle = next(p for p in overall if p["policy"] == "oracle")
    fig = _figure(11, 4.5)
    panels = (
        ("mean_nll", "mean answer NLL (lower is better)"),
        ("greedy_accuracy", "greedy accuracy (higher is better)"),
    )
    for i, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [p["mean_visual_tokens"] for p in fixed]
        ax.plot(xs, [p[metric] for p in fixed], marker="o", color="tab:blue", label="fixed level")
        for k, p in enumerate(fixed):  # alternate above / below: neighbours never collide
            ax.annotate(
                str(p["level_tokens"]),
                (p["mean_visual_tokens"], p[metric]),
                textcoords="offset points",
                xytext=(0, 8 if k % 2 == 0 else -13),
                ha="center",
                fontsize=8,
            )
        ax.scatter(
            oracle["mean_visual_tokens"],
            oracle[metric],
            marker="*",
            s=220,
            color="tab:red",
            zorder=3,
            label=f"oracle ({oracle['token_reduction_vs_finest']:.0%} fewer tokens)",
        )
        _log_tokens_axis(ax)
        ax.margins(x=0.06, y=0.1)  # room for the labels and the star at the edges
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Quality vs visual tokens, all sources ({oracle['n_samples']:,} samples)")
    _save(fig, path, dpi)


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "int":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


PREFERENCE_COLUMNS = (
    ("source", "source", ""),
    ("policy", "policy", ""),
    ("level_tokens", "tokens/crop", ""),
    ("n_samples", "samples", "int"),
    ("best_share", "best share", "pct"),
    ("mean_visual_tokens", "mean visual tokens", "int"),
    ("token_reduction_vs_finest", "token reduction vs finest", "pct"),
    ("mean_nll", "mean NLL", ""),
    ("mean_regret", "mean regret", ""),
    ("greedy_accuracy", "greedy accuracy", "pct"),
)


def preferences_markdown(prefs: list[dict[str, Any]]) -> str:
    """The preferences rows as a markdown table."""
    lines = [
        "| " + " | ".join(title for _, title, _ in PREFERENCE_COLUMNS) + " |",
        "|"
        + "|".join(
            "---" if kind == "" and col in ("source", "policy") else "---:"
            for col, _, kind in PREFERENCE_COLUMNS
        )
        + "|",
    ]
    for p in prefs:
        cells = [_fmt(p[col], kind) for col, _, kind in PREFERENCE_COLUMNS]
        cells[0] = _source_label(p["source"])  # "__all__" would render as bold "all"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_state(folder: Path, table: str) -> tuple[str, int | None]:
    """``("missing", None)``: no ``table/`` folder (nor ``table.parquet``); ``("empty", 0)``: it
    exists but holds no rows (no part files, or only empty ones); ``("rows", n)`` otherwise."""
    import pyarrow.parquet as pq

    from rglf.pipeline.rank import parquet_files

    if (folder / table).is_dir():
        files = parquet_files(folder / table)
    elif (folder / f"{table}.parquet").is_file():
        files = [folder / f"{table}.parquet"]
    else:
        return "missing", None
    n = sum(pq.read_metadata(f).num_rows for f in files)
    return ("rows", n) if n else ("empty", 0)


def describe_table(name: str, state: tuple[str, int | None]) -> str:
    """One line of a summary: ``feedback: 5,000 rows`` / ``errors: empty (0 rows)`` / ``samples: missing``."""
    kind, n = state
    if kind == "missing":
        return f"{name}: missing (no {name}/ folder)"
    if kind == "empty":
        return f"{name}: empty (0 rows)"
    return f"{name}: {n:,} row{'s' if n != 1 else ''}"


def _run_section(run: Path) -> list[str]:
    lines = ["## Scoring run", "", f"Folder: `{run}`", ""]
    states = {view: table_state(run, view) for view in ("samples", "feedback", "errors")}
    lines += [f"- {describe_table(view, state)}" for view, state in states.items()]
    if states["errors"][0] == "rows":
        con, _ = open_catalog(run=run)
        try:
            by_code = "code" in con.table("errors").columns
            rows = con.sql(_ERRORS_BY_CODE_SQL if by_code else _ERRORS_BY_REASON_SQL).fetchall()
        finally:
            con.close()
        if rows:
            lines += ["", f"| stage | {'code' if by_code else 'reason'} | rows |", "|---|---|---:|"]
            lines += [f"| {stage} | {what} | {n:,} |" for stage, what, n in rows]
    return [*lines, ""]


def run_report(cfg: ReportConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Write the PNGs and ``report.md`` for ``cfg.rank`` into ``cfg.out``; return what was written.

    ``progress(done, total, {"wrote": file})`` after each file (optional).
    """
    rank_report = json.loads((cfg.rank / REPORT_NAME).read_text())
    con, _ = open_catalog(rank=cfg.rank)
    try:
        rel = con.sql(_PREFERENCES_SQL)
        prefs = [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]
    finally:
        con.close()
    cfg.out.mkdir(parents=True, exist_ok=True)
    levels = sorted({p["level_tokens"] for p in prefs if p["policy"] == "fixed"})

    written: dict[str, str] = {}
    total = 1 + (len(PLOTS) if prefs else 0)

    def wrote(name: str, path: Path) -> None:
        written[name] = str(path)
        if progress is not None:
            progress(len(written), total, {"wrote": path.name})

    if prefs:
        plots = {
            "best_level_share": lambda path: plot_best_level_share(prefs, levels, path, cfg.dpi),
            "nll_vs_tokens": lambda path: plot_nll_vs_tokens(prefs, path, cfg.dpi),
            "frontier": lambda path: plot_frontier(prefs, path, cfg.dpi),
        }
        for name in PLOTS:
            plots[name](cfg.out / f"{name}.png")
            wrote(name, cfg.out / f"{name}.png")

    conf = rank_report.get("config", {})
    excluded = {r: v["n_samples"] for r, v in rank_report.get("excluded", {}).items() if v["n_samples"]}
    md = [
        "# Granularity preferences",
        "",
        f"Rank folder: `{cfg.rank}` (built {rank_report.get('created_at', '?')} from "
        f"`{rank_report.get('inputs', {}).get('feedback', '?')}`).",
        "",
        f"- ladder (tokens per crop): {', '.join(map(str, rank_report.get('ladder', [])))}",
        f"- tolerance: abs_tol = {conf.get('abs_tol')}, rel_tol = {conf.get('rel_tol')} "
        "(levels within max(abs_tol, rel_tol * best NLL) of the best NLL tie; the cheapest wins)",
        f"- samples ranked: {rank_report.get('n_samples_ranked', 0):,} of {rank_report.get('n_samples', 0):,}",
        "- samples excluded: "
        + (", ".join(f"{r} {n:,}" for r, n in excluded.items()) if excluded else "none")
        + (" (a sample can fail several checks; see `excluded/`)" if excluded else ""),
        "- tables: " + "; ".join(describe_table(t, table_state(cfg.rank, t)) for t in TABLES),
        "",
    ]
    if not prefs:
        md += ["No ranked samples (the preferences table is empty): nothing to plot.", ""]
    else:
        oracle = next(p for p in prefs if p["source"] == ALL and p["policy"] == "oracle")
        finest = max(
            (p for p in prefs if p["source"] == ALL and p["policy"] == "fixed"),
            key=lambda p: p["level_tokens"],
        )
        md += [
            "## Oracle vs the finest level (all sources)",
            "",
            f"Using each sample's best level needs {_fmt(oracle['mean_visual_tokens'], 'int')} visual "
            f"tokens on average vs {_fmt(finest['mean_visual_tokens'], 'int')} at level "
            f"{finest['level_tokens']} ({_fmt(oracle['token_reduction_vs_finest'], 'pct')} fewer), "
            f"mean NLL {_fmt(oracle['mean_nll'])} vs {_fmt(finest['mean_nll'])}, greedy accuracy "
            f"{_fmt(oracle['greedy_accuracy'], 'pct')} vs {_fmt(finest['greedy_accuracy'], 'pct')}.",
            "",
        ]
        for name, title in PLOTS.items():
            md += [f"## {title}", "", f"![{title}]({name}.png)", ""]
        md += [
            "## Preferences",
            "",
            "One row per source (and all sources together) and policy: `fixed` = always that level, "
            "`oracle` = each sample's rank-1 level. Best share: samples whose rank-1 level is the "
            "level. Regret: NLL above the sample's minimum.",
            "",
            preferences_markdown(prefs),
            "",
        ]
    if cfg.run is not None:
        md += _run_section(cfg.run)
    report_md = cfg.out / "report.md"
    _atomic_write(report_md, lambda tmp: tmp.write_text("\n".join(md), encoding="utf-8"))
    wrote("report", report_md)
    return {"files": written, "n_preference_rows": len(prefs)}
