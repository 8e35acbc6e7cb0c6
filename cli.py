"""rglf command line: thin wrappers that build a stage's config and call one function.

Heavy imports (torch, ray, transformers, duckdb) live inside the commands so that
``rglf --help`` answers instantly.
"""

from __future__ import annotations

import os

import typer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Offline RGLF: score answers at every visual granularity, rank them in SQL, train the router from tables.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


if __name__ == "__main__":
    app()
