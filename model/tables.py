"""Data contracts between the stages: explicit pyarrow schemas of every table.

``pipeline/`` writes these tables and ``router/`` reads them; both import the schemas from
here (they never import each other). Token counts are always stored explicitly
(``level_tokens``), never implied by a ladder index.

Tables (Parquet; a "table" is a folder of part files readable as one dataset):

- ``samples``: one row per ingested conversation.
- ``feedback``: one row per (sample, level): the frozen LMM's answer NLL at that level.
- ``errors``: one row per rejected input, with the stage and a reason.
- ``router_inputs``: what the router trainer needs per sample, so it never loads the LMM:
  the vision tower's selected-layer features of every crop (before the projector) plus the
  instruction token ids, in the encoding the user chose (``rglf score --router-inputs``:
  fp16, fp8 or pixels = a reference to the image; ``model.router_inputs``). The trainer
  applies the frozen projector and the input-embedding table saved beside them
  (``router_side/``, see ``model.lmm``). Bytes per sample, fp16: ``n_crops * grid^2 *
  vision_hidden * 2`` (+ 4 per instruction token): at 7B scale (CLIP-L, 1024) 1.18 MB per
  crop, 4x smaller than the projected 4096-wide features; fp8 half of that.
- ``rankings`` / ``pairs`` / ``preferences`` / ``excluded``: built from feedback by ``pipeline/sql``.

For notebooks (and for ``router/``, which assembles its labels this way), ``open_tables`` opens
a scoring folder and/or a ranking folder as polars LazyFrames::

    import polars as pl
    from rglf.model.tables import open_tables

    t = open_tables(run="runs/demo/run", rank="runs/demo/rank")
    t.rankings.filter(pl.col("rank") == 1).group_by("source").agg(pl.col("level_tokens").mean()).collect()
    t.feedback.join(t.samples.select("sample_id", "image"), on="sample_id").collect()
    t.sql("select code, count(*) as n from errors group by code").collect()   # polars SQL over every table

Nothing is read until ``.collect()``; the scans read only the columns and row groups a query needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import polars as pl

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("image", pa.string()),  # path relative to image_root (null: text-only sample)
        pa.field("image_root", pa.string()),
        # conversation turns in order; role is "human" or "gpt" (LLaVA's names)
        pa.field(
            "turns",
            pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())])),
            nullable=False,
        ),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("level_tokens", pa.int32(), nullable=False),  # tokens per crop at this level
        pa.field("level_grid", pa.string(), nullable=False),  # e.g. "24x12"
        pa.field("n_crops", pa.int16(), nullable=False),  # base crop + high-res crops
        pa.field("n_visual_tokens", pa.int32(), nullable=False),  # after packing (newlines included)
        pa.field("answer_tokens", pa.int32(), nullable=False),
        pa.field("nll_sum", pa.float64(), nullable=False),
        pa.field("nll_mean", pa.float64(), nullable=False),  # the RGLF feedback
        # teacher-forced argmax equals the answer at every answer token, i.e. greedy decoding
        # reproduces the reference answer exactly (the answer ends with the stop token)
        pa.field("greedy_match", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # ingest | load_image | score | ...
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("detail", pa.string()),  # the offending record / path, truncated
        # short machine-readable reason (missing_file, corrupt_image, too_long, duplicate_id, ...):
        # GROUP BY code in SQL; ``reason`` is the human sentence naming the input
        pa.field("code", pa.string()),
    ]
)

ROUTER_INPUTS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("n_crops", pa.int16(), nullable=False),
        pa.field("grid", pa.int16(), nullable=False),
        pa.field("vision_hidden", pa.int32(), nullable=False),
        # fp16, little-endian, C order, shape (n_crops, grid*grid, vision_hidden); crop 0 = base crop
        pa.field("vision_features", pa.large_binary(), nullable=False),
        # instruction token ids: every text token that is not an answer token and not the image
        pa.field("instruction_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("image_size", pa.list_(pa.int32()), nullable=False),  # (height, width) of the original image
        # ``model.router_inputs``: fp16 | fp8 | pixels (null in runs scored before the choice existed: fp16).
        # fp8: vision_features = float8 e4m3 codes, feature_scales = float32 (n_crops, vision_hidden).
        # pixels: vision_features is empty; the trainer re-encodes ``image`` under ``image_root``.
        pa.field("encoding", pa.string()),
        pa.field("feature_scales", pa.large_binary()),
        pa.field("image", pa.string()),
        pa.field("image_root", pa.string()),
    ]
)

# ---- reading the tables: polars LazyFrames ------------------------------------------------------

RUN_TABLES = ("samples", "feedback", "errors", "router_inputs")
RANK_TABLES = ("rankings", "pairs", "preferences", "excluded")
SCHEMAS = {"samples": SAMPLES_SCHEMA, "feedback": FEEDBACK_SCHEMA, "errors": ERRORS_SCHEMA,
           "router_inputs": ROUTER_INPUTS_SCHEMA}


class TableNotFound(FileNotFoundError):
    """A table folder that does not exist: the stage that writes it has not run."""

    exit_code = 4  # cli.EXIT_CODES: a required earlier stage's output is missing


def table_files(folder: str | Path) -> list[Path]:
    """The committed part files of a table folder, sorted: ``*.parquet``, never hidden or temp files
    (writers stage under hidden names and rename; ``--force`` moves old outputs to hidden folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TableNotFound(f"{folder}: no such table folder")
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def scan_table(folder: str | Path, schema: pa.Schema | None = None) -> pl.LazyFrame:
    """One table folder as a polars LazyFrame; an EMPTY folder gives an empty frame (with ``schema``'s
    columns when given), a MISSING one raises ``TableNotFound``. With a schema, part files written
    before a column existed read it as null."""
    import polars as pl

    files = table_files(folder)
    if not files:
        return pl.from_arrow(schema.empty_table()).lazy() if schema is not None else pl.LazyFrame()
    if schema is None:
        return pl.scan_parquet(files)
    target = pl.from_arrow(schema.empty_table()).schema
    return pl.scan_parquet(files, schema=target, missing_columns="insert", extra_columns="ignore")


@dataclass(frozen=True, eq=False)
class Tables(Mapping):
    """A scoring folder (``run``) and/or a ranking folder (``rank``) as polars LazyFrames.

    Attributes (each a fresh lazy scan): ``samples``, ``feedback``, ``errors``, ``router_inputs``
    (of ``run``) and ``rankings``, ``pairs``, ``preferences``, ``excluded`` (of ``rank``). A table
    whose folder is missing raises ``TableNotFound``; an empty one is an empty frame. ``errors`` of
    a run is always there (empty when nothing was rejected: the scoring job then writes no part),
    as in ``rglf sql``. Also a read-only mapping of the available tables: ``t["rankings"]``,
    ``set(t)``, ``"pairs" in t``.
    """

    run: Path | None = None
    rank: Path | None = None

    def scan(self, name: str) -> pl.LazyFrame:
        if name in RUN_TABLES:
            root, flag = self.run, "run"
        elif name in RANK_TABLES:
            root, flag = self.rank, "rank"
        else:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(RUN_TABLES + RANK_TABLES)}")
        if root is None:
            raise TableNotFound(f"table {name!r} lives in the {flag} folder: open_tables({flag}=...)")
        if name == "errors" and not (Path(root) / name).is_dir():
            import polars as pl

            return pl.from_arrow(ERRORS_SCHEMA.empty_table()).lazy()
        return scan_table(Path(root) / name, SCHEMAS.get(name))

    samples = property(lambda self: self.scan("samples"))
    feedback = property(lambda self: self.scan("feedback"))
    errors = property(lambda self: self.scan("errors"))
    router_inputs = property(lambda self: self.scan("router_inputs"))
    rankings = property(lambda self: self.scan("rankings"))
    pairs = property(lambda self: self.scan("pairs"))
    preferences = property(lambda self: self.scan("preferences"))
    excluded = property(lambda self: self.scan("excluded"))

    def available(self) -> list[str]:
        """Names of the tables that can be scanned: their folders exist (a run's ``errors``: always)."""
        out = []
        for names, root in ((RUN_TABLES, self.run), (RANK_TABLES, self.rank)):
            if root is not None:
                out += [n for n in names if (Path(root) / n).is_dir() or (n == "errors" and root is self.run)]
        return out

    def __getitem__(self, name: str) -> pl.LazyFrame:
        return self.scan(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self.available())

    def __contains__(self, name: object) -> bool:
        return name in self.available()

    def sql(self, query: str) -> pl.LazyFrame:
        """A polars SQL query over every available table (by name), lazily."""
        import polars as pl

        return pl.SQLContext({n: self.scan(n) for n in self.available()}).execute(query, eager=False)


def open_tables(run: str | Path | None = None, rank: str | Path | None = None) -> Tables:
    """Open a scoring output folder and/or a ranking output folder as polars LazyFrames (``Tables``)."""
    if run is None and rank is None:
        raise ValueError("open_tables needs run=..., rank=... or both")
    for name, path in (("run", run), ("rank", rank)):
        if path is not None and not Path(path).is_dir():
            raise TableNotFound(f"{path}: no such {name} folder")
    return Tables(Path(run) if run is not None else None, Path(rank) if rank is not None else None)


def open_run(run: str | Path) -> Tables:
    """A scoring folder's tables as polars LazyFrames: ``samples``, ``feedback``, ``errors`` (always;
    empty when nothing was rejected), ``router_inputs``; missing folders are left out of the mapping."""
    return open_tables(run=run)


def open_rank(rank: str | Path) -> Tables:
    """A ranking folder's tables (``rglf rank --out``) as polars LazyFrames: ``rankings``, ``pairs``,
    ``preferences``, ``excluded``."""
    return open_tables(rank=rank)
