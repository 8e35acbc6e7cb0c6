"""rglf command line: thin wrappers that build a stage's config and call one function.

Heavy imports (torch, ray, transformers, duckdb) live inside the commands so that
``rglf --help`` answers instantly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Offline RGLF: score answers at every visual granularity, rank them in SQL, train the router from tables.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# ---- embedded default: the synthetic task and the tiny Stage-1 model -------------------

toy_app = typer.Typer(help="The embedded default: synthetic multi-granularity VQA and its tiny Stage-1 LLaVA-NeXT.")
app.add_typer(toy_app, name="toy")

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "model" / "default" / "avg-toy-llava-next"


@toy_app.command("data")
def toy_data(
    out: Annotated[Path, typer.Option(help="Folder for images/ and train/val/test.json (LLaVA format).")],
    n_samples: Annotated[int, typer.Option(help="Samples in all (one question each).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives byte-identical files.")] = 0,
) -> None:
    """Write the synthetic task as a real LLaVA-format dataset."""
    from model.toy import ToyDatasetConfig, write_dataset

    summary = write_dataset(out, ToyDatasetConfig(n_samples=n_samples, seed=seed))
    typer.echo(f"toy data: {summary['counts']} -> {out}")


@toy_app.command("train")
def toy_train(
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (HF format).")] = DEFAULT_CHECKPOINT,
    steps: Annotated[int, typer.Option(help="Optimiser steps in all.")] = 2400,
    finest_steps: Annotated[int, typer.Option(help="Curriculum: steps at the finest level only first.")] = 1200,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    eval_every: Annotated[int, typer.Option(help="Held-out evaluation every N steps.")] = 200,
    max_minutes: Annotated[float | None, typer.Option(help="Stop (and save) after this many minutes.")] = None,
) -> None:
    """Stage-1 multi-granularity training of the tiny embedded-default model (CPU)."""
    from model.stage1 import Stage1Config, train_stage1

    cfg = Stage1Config(
        out=out, steps=steps, finest_steps=finest_steps, batch_size=batch_size, lr=lr, seed=seed,
        threads=threads, eval_every=eval_every, max_minutes=max_minutes,
    )
    report = train_stage1(cfg, log=typer.echo)
    typer.echo(f"stage1: {report['steps_done']} steps in {report['train_minutes']} min -> {out}")


@toy_app.command("report")
def toy_report(
    model: Annotated[Path, typer.Option(help="Checkpoint folder.")] = DEFAULT_CHECKPOINT,
    per_family: Annotated[int, typer.Option(help="Held-out questions per family.")] = 200,
    seed: Annotated[int, typer.Option(help="Held-out seed stream.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the table as JSON here.")] = None,
) -> None:
    """Held-out greedy accuracy and mean answer NLL per family per level of a checkpoint."""
    import json

    from model.lmm import FrozenLMM
    from model.stage1 import evaluate, format_table, heldout_items

    lmm = FrozenLMM.from_pretrained(model)
    table = evaluate(lmm, heldout_items(lmm, per_family, seed))
    typer.echo(format_table(table))
    if json_out is not None:
        json_out.write_text(json.dumps(table, indent=2))
        typer.echo(f"wrote {json_out}")


if __name__ == "__main__":
    app()
