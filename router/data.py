"""Tables -> router training data: labels through polars, router inputs STREAMED by Parquet row group.

The router trainer never loads the language model. It reads, from a scoring output folder
``RUN/`` (``rglf score``) and a ranking output folder ``RANK/`` (``rglf rank``):

    RUN/router_inputs/*.parquet   ROUTER_INPUTS_SCHEMA: per sample the vision features of every
                                  crop (fp16, fp8 or a reference to the image: ``model.router_inputs``)
                                  + instruction token ids
    RUN/router_side/              the frozen projector + input-embedding table (``RouterSide``),
                                  and for pixels-mode runs the frozen vision tower (``vision/``)
    RUN/run.json                  the scoring config; its ladder gives each level's h x w shape
    RANK/rankings/*.parquet       one row per (sample, level): nll_mean, rank (1 = best),
                                  n_visual_tokens, greedy_match, source, split
    RANK/rank_report.json         the ranking's tolerance (re-used when ranking a level subset)

Two parts, two memory profiles:

- **The index** (``load_router_data`` -> ``RouterData``): one lazy polars query
  (``model.tables.open_tables``) pivots ``rankings`` to one row per sample (levels in ladder
  order), joins it with the LOCATION of each sample's router inputs (file, row; the features
  themselves are never read here), resolves splits and keeps the selected splits. What stays
  in memory is a few numpy arrays per sample — labels (N floats, N ints, N bools, N ints),
  location, crop count, split, source, id: ~170 bytes per sample (0.17 GB per million; 70 of them the id), never
  the features.
- **The payload** streams (``SampleStream`` + ``iter_batches``): a unit is one Parquet row
  group (the scoring job writes one per committed batch). Per epoch the units are shuffled
  (seeded by ``seed, epoch``) and cut into WINDOWS of at least ``shuffle_buffer`` samples; a
  window's samples are permuted as a whole. The concatenated windows are the epoch's global
  sample sequence; global step ``s`` trains on positions ``[s*B, (s+1)*B)``. A background
  thread reads, decodes (fp16 / fp8 / pixels), projects and pools ahead of the training step
  (``prefetch`` micro-batches), so I/O and decoding overlap compute. Memory: the current
  window (``shuffle_buffer`` samples' stored bytes) + the next one while it is read + the
  prefetched micro-batches — independent of the number of samples.

Workers (``world > 1``): the units of each window are dealt round-robin to the workers, and a
worker reads ONLY its own units; from global step ``s`` it trains on the positions of
``[s*B, (s+1)*B)`` that fall in its units. The global sequence does not depend on the number of
workers, so neither does the update (up to float summation order and dropout draws): the
documented global-batch semantics. A window should hold several units per worker
(``shuffle_buffer >= 4 x workers x rows per row group``) or the workers' shares of a step vary
more.

Resume: the stream position is a function of the step (``SampleStream.position``): a resumed
run recomputes the window and offset from the index alone, reads that one window, skips the
positions already trained on, and sees every sample exactly as often as an uninterrupted run.

Labels per sample, ladder order (level ``i`` = router expert ``i``): ``nll (N,)``,
``order (N,)`` = level indices best first (from the SQL ``rank``), ``greedy (N,)`` and
``n_visual_tokens (N,)``. With a level subset (the paper's ladder ablations, ``levels``), the
levels outside it are dropped and the rest RE-RANKED with the ranking's own rule
(ARCHITECTURE.md "Ranking semantics", ``rank_order``), since the best level of the subset may
have been a tie-loser of the full ladder.

Splits: the ``split`` column (train / val / test) when the scoring job recorded it; a sample
without one gets a deterministic hash split (``hash_split``); and when no sample at all is in
``val``, a ``val_fraction`` of ``train`` is carved out by the same hash, so validation never
shares a sample with training.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rglf.model.lmm import RouterSide
from rglf.model.router_inputs import VISION_DIR, VisionSide, decode_vision, stored_nbytes
from rglf.model.scaler import Ladder, LadderError
from rglf.model.tables import TableNotFound, open_tables, table_files

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "eval": "val"}
# Ranking defaults (ARCHITECTURE.md "Ranking semantics"), used when rank_report.json lacks them.
DEFAULT_ABS_TOL = 0.02
DEFAULT_REL_TOL = 0.0
RANKING_COLUMNS = ("sample_id", "source", "split", "level_tokens", "nll_mean", "rank", "n_visual_tokens", "greedy_match")
PAYLOAD_COLUMNS = ("n_crops", "grid", "vision_hidden", "vision_features", "instruction_ids", "encoding",
                   "feature_scales", "image", "image_root")
DEFAULT_SHUFFLE_BUFFER = 1024
DEFAULT_PREFETCH = 2


class RouterDataError(ValueError):
    """Tables that cannot feed the router: missing folders or columns, inconsistent samples."""

    exit_code = 4  # cli.EXIT_CODES: a required earlier stage is missing (e.g. train before rank)


# ---- ranking rule ----------------------------------------------------------------------------


def rank_order(nll: np.ndarray, tokens: Sequence[int], abs_tol: float, rel_tol: float) -> np.ndarray:
    """Level indices best first, per sample: ARCHITECTURE.md "Ranking semantics" in numpy.

    ``nll (S, N)`` in ladder order, ``tokens (N,)`` ascending. Levels within
    ``max(abs_tol, rel_tol * min)`` of the sample's minimum tie and come first, fewer tokens
    first; the rest follow by NLL, exact ties by fewer tokens. Returns ``(S, N)`` int64.
    """
    nll = np.asarray(nll, dtype=np.float64)
    tok = np.asarray(tokens, dtype=np.int64)
    best = nll.min(axis=1, keepdims=True)  # (S, 1)
    outside = nll > best + np.maximum(abs_tol, rel_tol * best)  # (S, N)
    sort_nll = np.where(outside, nll, 0.0)
    tok_b = np.broadcast_to(tok, nll.shape)
    # lexsort: last key is primary -> (outside, sort_nll, tokens), the SQL's struct sort
    return np.lexsort((tok_b, sort_nll, outside), axis=1).astype(np.int64)


def hash_fraction(sample_id: str) -> float:
    """A stable number in [0, 1) per sample id (sha256), independent of order and run."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2.0**64


def hash_split(sample_id: str, val_fraction: float, test_fraction: float) -> str:
    u = hash_fraction(sample_id)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


# ---- folders ---------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def rank_tolerances(rank_dir: Path) -> tuple[float, float]:
    """(abs_tol, rel_tol) the rankings were built with (rank_report.json), else the defaults."""
    config = read_json(Path(rank_dir) / "rank_report.json").get("config", {})
    return float(config.get("abs_tol", DEFAULT_ABS_TOL)), float(config.get("rel_tol", DEFAULT_REL_TOL))


def _ladder_spec(meta: dict[str, Any]) -> str | None:
    value = meta.get("ladder")
    if isinstance(value, dict):
        value = value.get("spec") or value.get("levels") or value.get("tokens")
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value if isinstance(value, str) else None


def resolve_ladder(run_dir: Path, grid: int, tokens: Iterable[int]) -> Ladder:
    """The scoring job's ladder for these level token counts: shapes from ``run.json`` (or
    ``router_side.json``) when they record a ladder, else ``Ladder.parse`` of the counts."""
    tokens = sorted(set(int(t) for t in tokens))
    for meta in (read_json(Path(run_dir) / "run.json"), read_json(Path(run_dir) / "router_side" / "router_side.json")):
        for source in (meta, meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}):
            spec = _ladder_spec(source)
            if not spec:
                continue
            try:
                full = Ladder.parse(spec, grid)
            except LadderError:
                continue
            if set(tokens) <= set(full.tokens):
                return Ladder(tuple(lv for lv in full.levels if lv.tokens in tokens), grid)
    return Ladder.parse(tokens, grid)


# ---- the index -------------------------------------------------------------------------------


@dataclass
class Unit:
    """One Parquet row group of ``router_inputs`` and the selected samples it holds."""

    file: int  # index into RouterData.files
    row_group: int
    members: np.ndarray  # sample indices (into RouterData's arrays), by row
    rows: np.ndarray  # their rows within the row group

    def __len__(self) -> int:
        return len(self.members)


@dataclass
class Sample:
    """One sample's payload as stored (decoded to float32 only when its batch is made)."""

    index: int
    instruction_ids: np.ndarray  # int32
    encoding: str  # fp16 / fp8 / pixels
    n_crops: int
    features: Any = None  # the stored feature bytes (a pyarrow buffer); fp16 / fp8
    scales: Any = None  # fp8: float32 (n_crops, dv) scales
    image: tuple[str, str | None] | None = None  # pixels: (image, image_root)
    vision: np.ndarray | None = None  # float32 (n_crops, grid^2, dv), once decoded / encoded


@dataclass
class RouterData:
    """Labels and router-input locations of a set of samples (ladder order); payloads read on demand."""

    sample_ids: list[str]
    source: np.ndarray  # (S,) str (object array, shared strings)
    split: np.ndarray  # (S,) str: train / val / test
    ladder: Ladder
    grid: int
    vision_hidden: int
    n_crops: np.ndarray  # (S,) int
    nll: np.ndarray  # (S, N) float64 nll_mean
    order: np.ndarray  # (S, N) int8 level indices best first
    greedy: np.ndarray  # (S, N) bool greedy_match
    n_visual_tokens: np.ndarray  # (S, N) int32
    info: dict[str, Any]
    files: list[str]  # router_inputs part files
    file_index: np.ndarray  # (S,) int32 into files
    row: np.ndarray  # (S,) int32: row within the file
    encoding: np.ndarray  # (S,) str: fp16 / fp8 / pixels
    run_dir: Path | None = None
    _row_groups: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # file -> first row of each group
    _vision_side: VisionSide | None = field(default=None, repr=False)
    _vision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def best(self) -> np.ndarray:
        """(S,) the oracle level index (rank 1)."""
        return self.order[:, 0]

    @property
    def regret(self) -> np.ndarray:
        """(S, N) nll_mean - the sample's minimum nll_mean."""
        return self.nll - self.nll.min(axis=1, keepdims=True)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    # -- where the payloads are ---------------------------------------------------------------

    def _group_starts(self, f: int) -> np.ndarray:
        starts = self._row_groups.get(f)
        if starts is None:
            md = pq.ParquetFile(self.files[f]).metadata
            sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            starts = self._row_groups[f] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return starts

    def units(self, indices: Sequence[int] | np.ndarray) -> list[Unit]:
        """The row groups holding ``indices``, in storage order (file, row group, row)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return []
        idx = idx[np.lexsort((self.row[idx], self.file_index[idx]))]
        out = []
        for f in np.unique(self.file_index[idx]):
            sel = idx[self.file_index[idx] == f]
            starts = self._group_starts(int(f))
            groups = np.searchsorted(starts, self.row[sel], side="right") - 1
            for g in np.unique(groups):
                members = sel[groups == g]
                out.append(Unit(int(f), int(g), members, self.row[members] - starts[g]))
        return out

    def read_unit(self, unit: Unit) -> list[Sample]:
        """Read one row group's selected samples, as stored (``decode`` makes the float32 features)."""
        f = pq.ParquetFile(self.files[unit.file])
        names = [c for c in PAYLOAD_COLUMNS if c in f.schema_arrow.names]
        table = f.read_row_group(unit.row_group, columns=names).take(pa.array(unit.rows, pa.int64()))
        cols = {c: table.column(c) for c in names}
        out = []
        for k, i in enumerate(unit.members.tolist()):
            enc = (cols["encoding"][k].as_py() if "encoding" in cols else None) or "fp16"
            ids = np.asarray(cols["instruction_ids"][k].values.to_numpy(zero_copy_only=False), dtype=np.int32)
            sample = Sample(i, ids, enc, int(cols["n_crops"][k].as_py()))
            if enc == "pixels":
                sample.image = (cols["image"][k].as_py(), cols["image_root"][k].as_py())
            else:
                sample.features = cols["vision_features"][k].as_buffer()
                sample.scales = cols["feature_scales"][k].as_buffer() if "feature_scales" in cols else None
            out.append(sample)
        return out

    def decode(self, samples: list[Sample], device: torch.device | str = "cpu") -> None:
        """Fill ``vision`` (float32) of every sample: fp16 / fp8 decoded, pixels re-encoded by the vision tower."""
        for s in samples:
            if s.vision is None and s.encoding != "pixels":
                s.vision = decode_vision(s.encoding, s.features, s.scales, s.n_crops, self.grid, self.vision_hidden,
                                         sample_id=self.sample_ids[s.index])
        self.encode_pixels(samples, device)

    def vision_side(self, device: torch.device | str = "cpu") -> VisionSide:
        """The frozen vision tower of a pixels-mode run (loaded once)."""
        with self._vision_lock:
            if self._vision_side is None:
                if self.run_dir is None:
                    raise RouterDataError("pixels-mode router inputs but no run folder to load the vision tower from")
                self._vision_side = VisionSide.load(self.run_dir / "router_side" / VISION_DIR, device)
            return self._vision_side

    def encode_pixels(self, samples: list[Sample], device: torch.device | str = "cpu") -> None:
        """Fill ``vision`` of pixels-mode samples by running the frozen vision tower on their images."""
        todo = [s for s in samples if s.vision is None]
        if todo:
            feats = self.vision_side(device).encode([s.image for s in todo])
            for s, v in zip(todo, feats, strict=True):
                if v.shape != (int(self.n_crops[s.index]), self.grid * self.grid, self.vision_hidden):
                    raise RouterDataError(
                        f"sample {self.sample_ids[s.index]!r}: its image now encodes to {v.shape[0]} crops of "
                        f"{v.shape[1:]}, scored as {int(self.n_crops[s.index])}: the image file changed since scoring"
                    )
                s.vision = v

    def fetch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> list[Sample]:
        """Random access: the decoded samples ``indices`` in that order (reads each row group once)."""
        got: dict[int, Sample] = {}
        for unit in self.units(indices):
            got.update((s.index, s) for s in self.read_unit(unit))
        out = [got[int(i)] for i in indices]
        self.decode(out, device)
        return out

    def vision(self, i: int) -> np.ndarray:
        """Sample ``i``'s vision features ``(n_crops, grid^2, dv)`` float32 (read on demand)."""
        return self.fetch([i])[0].vision

    def instruction(self, i: int) -> np.ndarray:
        return self.fetch([i])[0].instruction_ids


def _shared_strings(values: np.ndarray) -> np.ndarray:
    """An object array whose equal strings are ONE object (8 bytes per sample, not a fixed-width copy)."""
    cats, codes = np.unique(values.astype(str), return_inverse=True)
    return cats.astype(object)[codes]


def _per_row(rows: int, nbytes: int) -> float:
    return nbytes / rows if rows else 0.0


def _location_frame(run_dir: Path, files: list[Path]):
    """Lazy (sample_id, n_crops, grid, vision_hidden, encoding, file_index, row) of every router-inputs row:
    where each sample's payload is; the feature bytes are not read."""
    import polars as pl

    schema = open_tables(run=run_dir).router_inputs.collect_schema()
    paths = [str(f) for f in files]
    return (
        pl.scan_parquet(paths, schema=schema, missing_columns="insert", extra_columns="ignore",
                        include_file_paths="path")
        .select(
            "sample_id", "n_crops", "grid", "vision_hidden", pl.col("encoding").fill_null("fp16"), "path",
            pl.int_range(pl.len(), dtype=pl.Int64).over("path").alias("row"),
        )
        .join(pl.LazyFrame({"path": paths, "file_index": list(range(len(paths)))},
                           schema={"path": pl.String, "file_index": pl.Int32}), on="path")
        .drop("path")
    )


def load_router_data(
    run_dir: str | Path,
    rank_dir: str | Path,
    *,
    splits: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    abs_tol: float | None = None,
    rel_tol: float | None = None,
) -> RouterData:
    """The index of ``RANK/rankings`` joined with ``RUN/router_inputs`` for the samples of ``splits`` (all: None).

    ``levels``: token counts of a ladder subset (re-ranked within it); None = every level of the
    rankings. ``abs_tol``/``rel_tol`` (subset re-ranking only): None = the ranking's own.
    Samples without router inputs (or without a ranking) are left out and counted in ``info``.
    Reads labels and locations only; features are read by ``fetch`` / ``iter_batches``.
    """
    import polars as pl

    run_dir, rank_dir = Path(run_dir), Path(rank_dir)
    if not run_dir.is_dir():
        raise RouterDataError(f"{run_dir}: no such run folder: expected the output of `rglf score`")
    try:
        rankings = open_tables(rank=rank_dir).rankings
        files = table_files(run_dir / "router_inputs") if (run_dir / "router_inputs").is_dir() else []
    except TableNotFound as err:
        raise RouterDataError(f"{err}: expected the output of `rglf rank` / `rglf score`") from None
    names = rankings.collect_schema().names()
    missing = [c for c in RANKING_COLUMNS if c not in names]
    if missing:
        raise RouterDataError(f"{rank_dir}/rankings lacks column(s) {missing}; written by `rglf rank`?")
    all_tokens = rankings.select(pl.col("level_tokens").unique().sort()).collect()["level_tokens"].to_list()
    if not all_tokens:
        raise RouterDataError(f"{rank_dir}/rankings has no rows")
    tokens = all_tokens if levels is None else sorted(set(int(t) for t in levels))
    unknown = sorted(set(tokens) - set(all_tokens))
    if unknown:
        raise RouterDataError(f"levels {unknown} are not in the rankings' ladder {all_tokens}")
    if len(tokens) < 2:
        raise RouterDataError(f"the router needs at least 2 levels, got {tokens}")
    n_levels = len(all_tokens)
    if not files:
        run_cfg = read_json(run_dir / "run.json").get("config", {})
        hint = (" (scored with --router-inputs none: feedback only)" if run_cfg.get("router_inputs") == "none" else "")
        raise RouterDataError(
            f"{run_dir}/router_inputs holds no samples{hint}: rescore with --router-inputs fp16, fp8 or pixels "
            "to train a router"
        )

    # One row per sample, levels in ladder order (a polars pivot instead of a numpy reshape).
    per_sample = (
        rankings.select(RANKING_COLUMNS)
        .sort("sample_id", "level_tokens")
        .group_by("sample_id", maintain_order=True)
        .agg(
            pl.col("level_tokens"), pl.col("nll_mean"), pl.col("rank"), pl.col("greedy_match"),
            pl.col("n_visual_tokens"), pl.col("source").first(), pl.col("split").first(),
        )
    )
    checks = per_sample.select(
        pl.len().alias("n"),
        (pl.col("level_tokens") != pl.lit(all_tokens, dtype=pl.List(pl.Int32))).sum().alias("bad_levels"),
    ).collect(engine="streaming")
    n_ranked, bad = int(checks["n"][0]), int(checks["bad_levels"][0])
    if bad:
        raise RouterDataError(
            f"rankings: every sample must have exactly one row per level {all_tokens}; {bad} sample(s) do not"
        )

    locations = _location_frame(run_dir, files)
    dup = locations.group_by("sample_id").len().filter(pl.col("len") > 1).select(pl.len()).collect().item()
    if dup:
        raise RouterDataError(f"{run_dir}/router_inputs has duplicate sample_id rows ({dup} ids)")
    joined = (
        per_sample.join(locations, on="sample_id", how="left")
        .with_columns(pl.col("split").replace(SPLIT_ALIASES))
        .sort("file_index", "row", nulls_last=True)
        .collect(engine="streaming")
    )

    # Split: the recorded one, else a hash split; carve val out of train if there is none.
    sample_ids = joined["sample_id"].to_list()
    recorded = joined["split"].to_list()
    split = np.array(
        [s if s else hash_split(sid, val_fraction, test_fraction) for s, sid in zip(recorded, sample_ids, strict=True)],
        dtype=object,
    )
    carved = False
    if not (split == "val").any() and val_fraction > 0:
        for i in np.flatnonzero(split == "train"):
            if hash_fraction("val/" + sample_ids[i]) < val_fraction:
                split[i] = "val"
                carved = True
    split = split.astype(str)
    selected = np.isin(split, list(splits)) if splits is not None else np.ones(len(split), bool)
    has_inputs = joined["file_index"].is_not_null().to_numpy()
    rows = np.flatnonzero(selected & has_inputs)
    if len(rows) == 0:
        raise RouterDataError(
            f"no sample of splits {list(splits) if splits else 'all'} has both a ranking and router inputs "
            f"({int(selected.sum())} ranked, {int((has_inputs & selected).sum())} with router inputs)"
        )
    kept = joined[rows.tolist()]
    grids, dvs = set(kept["grid"].unique().to_list()), set(kept["vision_hidden"].unique().to_list())
    if len(grids) != 1 or len(dvs) != 1:
        raise RouterDataError(f"router_inputs mix grids {grids} / vision widths {dvs}: one scoring run per folder")
    grid, dv = int(grids.pop()), int(dvs.pop())

    def wide(name: str, dtype) -> np.ndarray:
        return kept[name].explode().to_numpy().astype(dtype).reshape(len(rows), n_levels)

    keep_cols = [all_tokens.index(t) for t in tokens]
    nll, rank = wide("nll_mean", np.float64), wide("rank", np.int64)
    if tokens == all_tokens:
        if not (np.sort(rank, axis=1) == np.arange(1, n_levels + 1)).all():
            raise RouterDataError("rankings: ranks of a sample must be 1..n_levels")
        order = np.argsort(rank, axis=1, kind="stable").astype(np.int8)  # ranks 1..N -> level indices best first
        tol: tuple[float | None, float | None] = (None, None)
    else:
        a, r = rank_tolerances(rank_dir)
        tol = (a if abs_tol is None else abs_tol, r if rel_tol is None else rel_tol)
        order = rank_order(nll[:, keep_cols], tokens, *tol).astype(np.int8)

    ladder = resolve_ladder(run_dir, grid, tokens)
    n_crops = kept["n_crops"].to_numpy().astype(np.int16)
    encoding = _shared_strings(kept["encoding"].to_numpy())
    info = {
        "n_ranked": n_ranked,
        "n_selected": int(selected.sum()),
        "n_loaded": len(rows),
        "n_without_router_inputs": int((selected & ~has_inputs).sum()),
        "levels": tokens,
        "full_ladder": all_tokens,
        "reranked_subset": tokens != all_tokens,
        "rerank_tolerance": {"abs_tol": tol[0], "rel_tol": tol[1]},
        "val_carved_from_train": carved,
        "encodings": sorted(set(encoding.tolist())),
        "bytes_per_sample": _per_row(*stored_nbytes(files)),
    }
    return RouterData(
        sample_ids=[str(s) for s in kept["sample_id"].to_list()],
        source=_shared_strings(kept["source"].to_numpy()),
        split=_shared_strings(split[rows]),
        ladder=ladder,
        grid=grid,
        vision_hidden=dv,
        n_crops=n_crops,
        nll=nll[:, keep_cols],
        order=order,
        greedy=wide("greedy_match", bool)[:, keep_cols],
        n_visual_tokens=wide("n_visual_tokens", np.int32)[:, keep_cols],
        info=info,
        files=[str(f) for f in files],
        file_index=kept["file_index"].to_numpy().astype(np.int32),
        row=kept["row"].to_numpy().astype(np.int32),
        encoding=encoding,
        run_dir=run_dir,
    )


# ---- the stream --------------------------------------------------------------------------------


@dataclass
class Window:
    """A run of consecutive units (in the epoch's order) whose samples are permuted together."""

    start: int  # global position of its first sample in the epoch's sequence
    units: list[Unit]
    owner: list[int]  # worker rank of each unit

    @property
    def size(self) -> int:
        return sum(len(u) for u in self.units)


class SampleStream:
    """The epoch's global sample sequence over ``indices`` (see the module docstring), for one worker.

    ``batch_size`` = global batch B; step ``s`` of an epoch covers positions ``[s*B, (s+1)*B)``.
    ``shuffle=False``: storage order, no permutation (validation, evaluation).
    """

    def __init__(self, data: RouterData, indices: Sequence[int] | np.ndarray, *, batch_size: int, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, shuffle: bool = True, rank: int = 0, world: int = 1):
        if batch_size < 1 or shuffle_buffer < 1 or not 0 <= rank < world:
            raise ValueError(f"bad stream parameters: batch_size {batch_size}, shuffle_buffer {shuffle_buffer}, "
                             f"rank {rank} of {world}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle_buffer, self.shuffle, self.rank, self.world = shuffle_buffer, shuffle, rank, world
        self.units = data.units(indices)  # storage order
        self.n = sum(len(u) for u in self.units)
        self.steps_per_epoch = math.ceil(self.n / batch_size)

    def windows(self, epoch: int) -> list[Window]:
        """The epoch's units, shuffled (seed, epoch), cut into windows of >= shuffle_buffer samples; the
        units of a window are dealt to the workers round-robin."""
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        out: list[Window] = []
        current: list[Unit] = []
        size = start = 0
        for j in order.tolist():
            current.append(self.units[j])
            size += len(self.units[j])
            if size >= self.shuffle_buffer or j == order[-1]:
                out.append(Window(start, current, [k % self.world for k in range(len(current))]))
                start += size
                current, size = [], 0
        return out

    def window_sequence(self, epoch: int, w: int, window: Window) -> np.ndarray:
        """Sample indices of ``window`` in global order (a seeded permutation of its samples)."""
        members = np.concatenate([u.members for u in window.units])
        if self.shuffle:
            members = members[np.random.default_rng([self.seed, epoch, w, 1]).permutation(len(members))]
        return members

    def position(self, step_in_epoch: int) -> dict[str, int]:
        """Where the stream stands before ``step_in_epoch`` (what a checkpoint records)."""
        return {"step_in_epoch": step_in_epoch, "samples_done": min(self.n, step_in_epoch * self.batch_size),
                "n": self.n, "units": len(self.units)}

    def steps(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, int, list[Unit], np.ndarray]]:
        """Per global step from ``start_step``: ``(step_in_epoch, global batch size, row groups to read first,
        this worker's sample indices in global order)``. A window's row groups (this worker's, only the rows
        still to train on) are announced at the first step that needs them; positions before
        ``start_step * B`` (a resumed run) are skipped without being read."""
        windows = self.windows(epoch)
        b = self.batch_size
        pending: deque[tuple[int, int]] = deque()  # (global position, sample index): this worker's, to train on
        w_next = 0
        for step in range(start_step, self.steps_per_epoch):
            lo, hi = step * b, min(self.n, (step + 1) * b)
            to_read: list[Unit] = []
            while w_next < len(windows) and windows[w_next].start < hi:
                win = windows[w_next]
                if win.start + win.size > lo:  # not entirely before a resume point
                    seq = self.window_sequence(epoch, w_next, win).tolist()
                    position = {i: win.start + k for k, i in enumerate(seq)}
                    for unit, owner in zip(win.units, win.owner, strict=True):
                        if owner != self.rank:
                            continue
                        keep = np.array([position[i] >= lo for i in unit.members.tolist()], dtype=bool)
                        if keep.any():
                            to_read.append(Unit(unit.file, unit.row_group, unit.members[keep], unit.rows[keep]))
                    wanted = {i for u in to_read for i in u.members.tolist()}
                    pending.extend((position[i], i) for i in seq if i in wanted and position[i] >= lo)
                w_next += 1
            take = []
            while pending and pending[0][0] < hi:
                take.append(pending.popleft()[1])
            yield step, hi - lo, to_read, np.array(take, dtype=np.int64)


# ---- batches ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """Padded router inputs and labels of a few samples (see ``GranularityRouter.forward``)."""

    crop_features: torch.Tensor  # (B, C, grid^2, d) projected, zero-padded crops
    crop_mask: torch.Tensor  # (B, C) bool
    text_embeds: torch.Tensor  # (B, T, d)
    text_mask: torch.Tensor  # (B, T) bool
    nll: torch.Tensor  # (B, N) float32
    order: torch.Tensor  # (B, N) int64, best first
    index: np.ndarray | None = None  # (B,) sample indices into RouterData
    prepared: Any = None  # GranularityRouter.prepare(...) of this batch, when the loader was given a router

    def __len__(self) -> int:
        return self.crop_features.shape[0]


@torch.no_grad()
def make_batch(data: RouterData, samples: list[Sample], side: RouterSide, device: torch.device | str = "cpu",
               router: torch.nn.Module | None = None) -> Batch:
    """Project (frozen) and pad decoded samples; with ``router``, also its no-grad ``prepare`` step."""
    device = torch.device(device)
    bsz, g2 = len(samples), data.grid * data.grid
    data.decode(samples, device)
    crops = [s.vision for s in samples]
    n_max = max(c.shape[0] for c in crops)
    real = torch.from_numpy(np.concatenate(crops)).to(device)  # (R, g^2, dv)
    projected = side.project(real)  # (R, g^2, d): only real crops go through the projector
    crop_mask = torch.zeros(bsz, n_max, dtype=torch.bool, device=device)
    for b, c in enumerate(crops):
        crop_mask[b, : c.shape[0]] = True
    feats = projected.new_zeros(bsz, n_max, g2, projected.shape[-1])  # (B, C, g^2, d)
    feats[crop_mask] = projected  # row-major over (B, C) = the concatenation order

    texts = [s.instruction_ids for s in samples]
    t_max = max((len(t) for t in texts), default=0)
    ids = torch.zeros(bsz, t_max, dtype=torch.long)
    text_mask = torch.zeros(bsz, t_max, dtype=torch.bool)
    for b, t in enumerate(texts):
        ids[b, : len(t)] = torch.from_numpy(t.astype(np.int64))
        text_mask[b, : len(t)] = True
    text_embeds = side.embed(ids.to(device))  # (B, T, d); padding rows are masked by the router
    idx = np.array([s.index for s in samples], dtype=np.int64)
    batch = Batch(
        crop_features=feats,
        crop_mask=crop_mask,
        text_embeds=text_embeds,
        text_mask=text_mask.to(device),
        nll=torch.from_numpy(data.nll[idx]).float().to(device),
        order=torch.from_numpy(data.order[idx]).long().to(device),
        index=idx,
    )
    if router is not None:
        use_text = router.config.use_text
        batch.prepared = router.prepare(feats, crop_mask, text_embeds if use_text else None,
                                        batch.text_mask if use_text else None)
    return batch


def collate(data: RouterData, indices: Sequence[int], side: RouterSide, device: torch.device | str = "cpu",
            router: torch.nn.Module | None = None) -> Batch:
    """Read, decode, project (frozen) and pad the samples ``indices`` (random access)."""
    return make_batch(data, data.fetch(indices, device), side, device, router)


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` results ahead (0: in this thread)."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, raised there
            q.put(err)

    thread = threading.Thread(target=produce, name="rglf-router-data", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it see `stop`
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


@dataclass
class StepBatches:
    """One global step's share of this worker: its micro-batches (possibly none) and the global batch size."""

    step: int
    global_size: int
    micro: list[Batch]

    @property
    def n(self) -> int:
        return sum(len(b) for b in self.micro)


def iter_steps(stream: SampleStream, epoch: int, side: RouterSide, *, micro_batch_size: int, start_step: int = 0,
               device: torch.device | str = "cpu", router: torch.nn.Module | None = None,
               prefetch_depth: int = DEFAULT_PREFETCH) -> Iterator[StepBatches]:
    """The worker's steps of ``epoch`` from ``start_step``, read, decoded, projected (and prepared for
    ``router``) in a background thread ``prefetch_depth`` steps ahead."""
    data = stream.data

    def produce() -> Iterator[StepBatches]:
        loaded: dict[int, Sample] = {}
        for step, global_size, units, mine in stream.steps(epoch, start_step):
            for unit in units:
                loaded.update((s.index, s) for s in data.read_unit(unit))
            samples = [loaded.pop(int(i)) for i in mine]
            micro = [make_batch(data, samples[k : k + micro_batch_size], side, device, router)
                     for k in range(0, len(samples), micro_batch_size)]
            yield StepBatches(step, global_size, micro)

    return prefetch(produce(), prefetch_depth)


def iter_batches(data: RouterData, indices: Sequence[int] | np.ndarray, side: RouterSide, *, batch_size: int,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", router: torch.nn.Module | None = None,
                 prefetch_depth: int = DEFAULT_PREFETCH) -> Iterator[Batch]:
    """Batches of ``indices`` in storage order (no shuffling), this worker's units only: validation, evaluation."""
    stream = SampleStream(data, indices, batch_size=batch_size, shuffle=False, rank=rank, world=world,
                          shuffle_buffer=batch_size)
    for step in iter_steps(stream, 0, side, micro_batch_size=batch_size, device=device, router=router,
                           prefetch_depth=prefetch_depth):
        yield from step.micro


@torch.no_grad()
def router_logits(
    router: torch.nn.Module,
    data: RouterData,
    side: RouterSide,
    indices: Sequence[int],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    tick: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Router logits ``(len(indices), N)`` in eval mode (float64 numpy), in the order of ``indices``.

    Streams the samples in storage order (each row group read once), then puts the rows back;
    ``tick(n)`` after each batch of ``n`` samples (progress)."""
    was_training = router.training
    router.eval()
    idx = np.asarray(indices, dtype=np.int64)
    n = data.nll.shape[1]
    out = np.zeros((len(idx), n))
    where: dict[int, list[int]] = {}
    for k, i in enumerate(idx.tolist()):
        where.setdefault(i, []).append(k)
    for b in iter_batches(data, np.unique(idx), side, batch_size=batch_size, device=device, router=router):
        logits = router.forward_prepared(b.prepared).double().cpu().numpy()
        for row, i in zip(logits, b.index.tolist(), strict=True):
            out[where[i]] = row
        if tick is not None:
            tick(sum(len(where[i]) for i in b.index.tolist()))
    router.train(was_training)
    return out
