"""rglf: offline RGLF feedback scoring, SQL rankings and decoupled router training (AVG-LLaVA).

The installed package maps the repository's folders: ``rglf.model`` (the paper's concepts),
``rglf.model.toy`` (the embedded default), ``rglf.pipeline`` (scoring job + SQL),
``rglf.router`` (trainer, evaluation, routing) and ``rglf.cli`` (the ``rglf`` command).

The Python API below is what the CLI runs, with the same config dataclasses. Every name is
imported on first use, so ``import rglf`` stays cheap (no torch, Ray or DuckDB until needed).

Run the stages::

    import rglf

    rglf.ingest(rglf.IngestConfig(inputs=["data/test.json"], image_root="data", out="runs/r1"))
    rglf.score(rglf.ScoreConfig(run_dir="runs/r1", model="/models/avg-llava-7b-hf", workers=2))
    rglf.rank(rglf.RankConfig(feedback="runs/r1", out="runs/r1-rank"))
    metrics = rglf.train(rglf.TrainConfig(run="runs/r1", rank="runs/r1-rank", out="runs/router"))
    report = rglf.evaluate(rglf.EvalConfig(run="runs/r1", rank="runs/r1-rank", router="runs/router"))
    rglf.report(rglf.ReportConfig(rank="runs/r1-rank", out="runs/r1-report"))

Each takes ``log=`` (a callable for its summary lines; default: the ``rglf`` logger) and, where
the stage reports progress, ``progress=`` (``(done, total, fields) -> None``).

Open the tables (polars LazyFrames; ``rglf.model.tables``)::

    run = rglf.open_run("runs/r1")          # samples, feedback, errors, router_inputs
    rank = rglf.open_rank("runs/r1-rank")   # rankings, pairs, preferences, excluded
    rank["rankings"].filter(pl.col("rank") == 1).group_by("source").agg(pl.col("level_tokens").mean()).collect()
    t = rglf.open_tables(run="runs/r1", rank="runs/r1-rank")   # both; t.rankings, t.sql("select ...")

Route many (image, question) pairs with a router loaded once::

    router = rglf.Router.load("runs/router", model="/models/avg-llava-7b-hf")
    routed = router.route(["a.png", "b.png"], ["What is written on the sign?", "What colour is the car?"])
    routed.level_tokens, routed.probabilities, routed.n_visual_tokens
    rglf.route_dataset(router, "data/test.json", "data", "runs/routed.parquet")
"""

from __future__ import annotations

import logging
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rglf.pipeline.ingest import IngestConfig, IngestReport
    from rglf.pipeline.rank import RankConfig
    from rglf.pipeline.report import ReportConfig
    from rglf.pipeline.score import ScoreConfig, ScoreReport
    from rglf.router.evaluate import EvalConfig
    from rglf.router.train import TrainConfig

try:
    __version__ = version("rglf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

logger = logging.getLogger("rglf")

# Public name -> (module, attribute), imported on first access (PEP 562).
_LAZY = {
    "IngestConfig": ("rglf.pipeline.ingest", "IngestConfig"),
    "ScoreConfig": ("rglf.pipeline.score", "ScoreConfig"),
    "RankConfig": ("rglf.pipeline.rank", "RankConfig"),
    "ReportConfig": ("rglf.pipeline.report", "ReportConfig"),
    "TrainConfig": ("rglf.router.train", "TrainConfig"),
    "EvalConfig": ("rglf.router.evaluate", "EvalConfig"),
    "Router": ("rglf.router.route", "Router"),
    "Routed": ("rglf.router.route", "Routed"),
    "route": ("rglf.router.route", "route"),
    "route_dataset": ("rglf.router.route", "route_dataset"),
    "Ladder": ("rglf.model.scaler", "Ladder"),
    "FrozenLMM": ("rglf.model.lmm", "FrozenLMM"),
    "DEFAULT_CHECKPOINT": ("rglf.model.toy", "DEFAULT_CHECKPOINT"),
    "open_run": ("rglf.model.tables", "open_run"),
    "open_rank": ("rglf.model.tables", "open_rank"),
    "open_tables": ("rglf.model.tables", "open_tables"),
    "Tables": ("rglf.model.tables", "Tables"),
}

__all__ = [
    "__version__", *_LAZY, "ingest", "score", "rank", "train", "evaluate", "report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'rglf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# ---- the stages ------------------------------------------------------------------------------


def ingest(config: IngestConfig, *, log=None, progress=None) -> IngestReport:
    """``rglf ingest``: LLaVA-format files -> ``config.out/samples`` (+ ``errors/``), read incrementally;
    ``progress(done, total, fields)`` gets MiB read of the inputs' total."""
    from rglf.pipeline.ingest import run_ingest

    return run_ingest(config, log=log or logger.info, progress=progress)


def score(config: ScoreConfig, *, log=None, progress=None) -> ScoreReport:
    """``rglf score``: the streaming Ray scoring job over ``config.run_dir/samples``; resumable, one writer per
    run folder; ``progress(done, total, fields)`` gets the samples committed of this run's pending total."""
    from rglf.pipeline.score import run_score

    return run_score(config, log=log or logger.info, progress=progress)


def rank(config: RankConfig, *, progress=None) -> dict[str, Any]:
    """``rglf rank``: rankings, pairs and preferences in DuckDB SQL; returns ``rank_report.json``."""
    from rglf.pipeline.rank import run_rank

    return run_rank(config, progress=progress)


def report(config: ReportConfig, *, progress=None) -> dict[str, Any]:
    """``rglf report``: PNG plots and ``report.md`` of a rank folder; returns the files written."""
    from rglf.pipeline.report import run_report

    return run_report(config, progress=progress)


def train(config: TrainConfig, *, progress=None) -> dict[str, Any]:
    """``rglf train``: fit the router from the tables (no LMM); returns ``metrics.json``'s content."""
    from rglf.router.train import train_router

    return train_router(config, progress=progress)


def evaluate(config: EvalConfig, *, progress=None) -> dict[str, Any]:
    """``rglf eval``: a router vs the oracle and the baselines; returns ``eval.json``'s content."""
    from rglf.router.evaluate import evaluate_router

    return evaluate_router(config, progress=progress)
