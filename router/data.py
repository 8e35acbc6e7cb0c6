"""Tables -> router training data: rankings + router inputs, joined per sample, in memory.

The router trainer never loads the language model. It reads, from a scoring output folder
``RUN/`` (``rglf score``) and a ranking output folder ``RANK/`` (``rglf rank``):

    RUN/router_inputs/*.parquet   ROUTER_INPUTS_SCHEMA: fp16 vision features (n_crops, grid^2, dv)
                                  of every crop + instruction token ids, one row per sample
    RUN/router_side/              the frozen projector + input-embedding table (``RouterSide``)
    RUN/run.json                  the scoring config; its ladder gives each level's h x w shape
    RANK/rankings/*.parquet       one row per (sample, level): nll_mean, rank (1 = best),
                                  n_visual_tokens, greedy_match, source, split
    RANK/rank_report.json         the ranking's tolerance (re-used when ranking a level subset)

Everything is loaded up front (router inputs are compact: ``n_crops * grid^2 * dv * 2`` bytes
per sample, 147 KB for a two-crop toy image) and kept as ONE contiguous byte buffer per
column; a batch decodes only its own samples (``collate``): fp16 -> float32 -> the frozen
projector, instruction ids -> the embedding table, crops and text padded with masks.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from rglf.model.lmm import RouterSide
from rglf.model.scaler import Ladder, LadderError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "eval": "val"}
# Ranking defaults (ARCHITECTURE.md "Ranking semantics"), used when rank_report.json lacks them.
DEFAULT_ABS_TOL = 0.02
DEFAULT_REL_TOL = 0.0
RANKING_COLUMNS = ("sample_id", "source", "split", "level_tokens", "nll_mean", "rank", "n_visual_tokens", "greedy_match")


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


def _table_dir(root: Path, name: str) -> Path:
    path = Path(root) / name
    if not path.is_dir():
        raise RouterDataError(f"{path} not found: expected the {name}/ table of {root}")
    return path


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


# ---- the in-memory data ----------------------------------------------------------------------


def _binary_view(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n+1,), bytes) of a large_binary array, zero-copy."""
    array = array.cast(pa.large_binary()) if array.type != pa.large_binary() else array
    _, offsets, data = array.buffers()
    off = np.frombuffer(offsets, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    return off, np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)


def _list_view(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n+1,), int32 values) of a list<int32> array."""
    array = array.cast(pa.large_list(pa.int32()))
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    off = array.offsets.to_numpy().astype(np.int64)
    return off - off[0], values


@dataclass
class RouterData:
    """Router inputs and ranking labels of a set of samples, ladder order, in memory."""

    sample_ids: list[str]
    source: np.ndarray  # (S,) str
    split: np.ndarray  # (S,) str: train / val / test
    ladder: Ladder
    grid: int
    vision_hidden: int
    n_crops: np.ndarray  # (S,) int
    vision_offsets: np.ndarray  # (S+1,) byte offsets into vision_bytes
    vision_bytes: np.ndarray  # uint8: fp16 (n_crops, grid^2, dv) per sample, C order
    text_offsets: np.ndarray  # (S+1,) into text_ids
    text_ids: np.ndarray  # int32 instruction ids, concatenated
    nll: np.ndarray  # (S, N) float64 nll_mean
    order: np.ndarray  # (S, N) int64 level indices best first
    greedy: np.ndarray  # (S, N) bool greedy_match
    n_visual_tokens: np.ndarray  # (S, N) int
    info: dict[str, Any]

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

    def vision(self, i: int) -> np.ndarray:
        """Sample ``i``'s vision features ``(n_crops, grid^2, dv)`` fp16 (a view)."""
        raw = self.vision_bytes[self.vision_offsets[i] : self.vision_offsets[i + 1]]
        return raw.view("<f2").reshape(int(self.n_crops[i]), self.grid * self.grid, self.vision_hidden)

    def instruction(self, i: int) -> np.ndarray:
        return self.text_ids[self.text_offsets[i] : self.text_offsets[i + 1]]


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
    """Join ``RANK/rankings`` with ``RUN/router_inputs`` for the samples of ``splits`` (all: None).

    ``levels``: token counts of a ladder subset (re-ranked within it); None = every level of the
    rankings. ``abs_tol``/``rel_tol`` (subset re-ranking only): None = the ranking's own.
    Samples without router inputs (or without a ranking) are left out and counted in ``info``.
    """
    run_dir, rank_dir = Path(run_dir), Path(rank_dir)
    rankings = ds.dataset(_table_dir(rank_dir, "rankings"), format="parquet")
    missing = [c for c in RANKING_COLUMNS if c not in rankings.schema.names]
    if missing:
        raise RouterDataError(f"{rank_dir}/rankings lacks column(s) {missing}; written by `rglf rank`?")
    rk = rankings.to_table(columns=list(RANKING_COLUMNS)).sort_by([("sample_id", "ascending"), ("level_tokens", "ascending")])
    if rk.num_rows == 0:
        raise RouterDataError(f"{rank_dir}/rankings has no rows")

    all_tokens = sorted(set(rk.column("level_tokens").to_pylist()))
    tokens = all_tokens if levels is None else sorted(set(int(t) for t in levels))
    unknown = sorted(set(tokens) - set(all_tokens))
    if unknown:
        raise RouterDataError(f"levels {unknown} are not in the rankings' ladder {all_tokens}")
    if len(tokens) < 2:
        raise RouterDataError(f"the router needs at least 2 levels, got {tokens}")
    n_levels = len(all_tokens)

    # Wide layout: every sample has exactly one row per ladder level (the SQL excludes the rest).
    ids = rk.column("sample_id").to_numpy(zero_copy_only=False)
    counts = np.unique(ids, return_counts=True)[1]
    if not (counts == n_levels).all():
        raise RouterDataError(f"rankings: every sample must have all {n_levels} levels {all_tokens}; some do not")
    n_samples = len(ids) // n_levels

    def wide(name: str, dtype) -> np.ndarray:
        return rk.column(name).to_numpy(zero_copy_only=False).astype(dtype).reshape(n_samples, n_levels)

    sample_ids = ids.reshape(n_samples, n_levels)[:, 0]
    level_tokens = wide("level_tokens", np.int64)
    if not (level_tokens == np.asarray(all_tokens)).all():
        raise RouterDataError("rankings: duplicate (sample_id, level_tokens) rows")
    nll, rank = wide("nll_mean", np.float64), wide("rank", np.int64)
    greedy, n_visual = wide("greedy_match", bool), wide("n_visual_tokens", np.int64)
    source = rk.column("source").to_numpy(zero_copy_only=False).reshape(n_samples, n_levels)[:, 0].astype(str)
    raw_split = rk.column("split").to_pylist()[::n_levels]

    # Split: the recorded one, else a hash split; carve val out of train if there is none.
    split = np.array(
        [
            SPLIT_ALIASES.get(s, s) if s else hash_split(sid, val_fraction, test_fraction)
            for s, sid in zip(raw_split, sample_ids, strict=True)
        ],
        dtype=object,
    )
    carved = False
    if not (split == "val").any() and val_fraction > 0:
        for i in np.flatnonzero(split == "train"):
            if hash_fraction("val/" + sample_ids[i]) < val_fraction:
                split[i] = "val"
                carved = True
    split = split.astype(str)

    keep = np.isin(split, list(splits)) if splits is not None else np.ones(n_samples, bool)
    keep_cols = [all_tokens.index(t) for t in tokens]
    if tokens == all_tokens:
        order = np.argsort(rank, axis=1, kind="stable")  # ranks 1..N -> level indices best first
        if not (np.sort(rank, axis=1) == np.arange(1, n_levels + 1)).all():
            raise RouterDataError("rankings: ranks of a sample must be 1..n_levels")
        tol = (None, None)
    else:
        a, r = rank_tolerances(rank_dir)
        tol = (a if abs_tol is None else abs_tol, r if rel_tol is None else rel_tol)
        order = rank_order(nll[:, keep_cols], tokens, *tol)

    # Router inputs of the kept samples only.
    inputs = ds.dataset(_table_dir(run_dir, "router_inputs"), format="parquet")
    wanted = pa.array(sample_ids[keep].tolist(), pa.string())
    ri = inputs.to_table(
        columns=["sample_id", "n_crops", "grid", "vision_hidden", "vision_features", "instruction_ids"],
        filter=pc.field("sample_id").isin(wanted),
    )
    ri_ids = ri.column("sample_id").to_pylist()
    if len(set(ri_ids)) != len(ri_ids):
        raise RouterDataError(f"{run_dir}/router_inputs has duplicate sample_id rows")
    pos = {sid: j for j, sid in enumerate(ri_ids)}
    rows = np.array([i for i in np.flatnonzero(keep) if sample_ids[i] in pos], dtype=np.int64)
    if len(rows) == 0:
        raise RouterDataError(
            f"no sample of splits {list(splits) if splits else 'all'} has both a ranking and router inputs "
            f"({int(keep.sum())} ranked, {ri.num_rows} router-input rows matched)"
        )
    take = pa.array([pos[sample_ids[i]] for i in rows], pa.int64())
    ri = ri.take(take).combine_chunks()
    grids = set(ri.column("grid").to_pylist())
    dvs = set(ri.column("vision_hidden").to_pylist())
    if len(grids) != 1 or len(dvs) != 1:
        raise RouterDataError(f"router_inputs mix grids {grids} / vision widths {dvs}: one scoring run per folder")
    grid, dv = grids.pop(), dvs.pop()
    n_crops = ri.column("n_crops").to_numpy().astype(np.int64)
    v_off, v_bytes = _binary_view(ri.column("vision_features").chunk(0))
    expected = n_crops * grid * grid * dv * 2
    if not (np.diff(v_off) == expected).all():
        bad = int(np.flatnonzero(np.diff(v_off) != expected)[0])
        raise RouterDataError(
            f"router_inputs: sample {sample_ids[rows[bad]]!r} has {int(np.diff(v_off)[bad])} feature bytes, "
            f"expected n_crops * grid^2 * vision_hidden * 2 = {int(expected[bad])}"
        )
    t_off, t_ids = _list_view(ri.column("instruction_ids").chunk(0))

    ladder = resolve_ladder(run_dir, grid, tokens)
    info = {
        "n_ranked": int(n_samples),
        "n_selected": int(keep.sum()),
        "n_loaded": len(rows),
        "n_without_router_inputs": int(keep.sum()) - len(rows),
        "levels": tokens,
        "full_ladder": all_tokens,
        "reranked_subset": tokens != all_tokens,
        "rerank_tolerance": {"abs_tol": tol[0], "rel_tol": tol[1]},
        "val_carved_from_train": carved,
        "bytes_per_sample": float(expected.mean()),
    }
    return RouterData(
        sample_ids=[str(s) for s in sample_ids[rows]],
        source=source[rows],
        split=split[rows],
        ladder=ladder,
        grid=int(grid),
        vision_hidden=int(dv),
        n_crops=n_crops,
        vision_offsets=v_off - v_off[0],
        vision_bytes=v_bytes[v_off[0] : v_off[-1]],
        text_offsets=t_off,
        text_ids=t_ids,
        nll=nll[rows][:, keep_cols],
        order=order[rows],
        greedy=greedy[rows][:, keep_cols],
        n_visual_tokens=n_visual[rows][:, keep_cols],
        info=info,
    )


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

    def __len__(self) -> int:
        return self.crop_features.shape[0]


@torch.no_grad()
def collate(data: RouterData, indices: Sequence[int], side: RouterSide, device: torch.device | str = "cpu") -> Batch:
    """Decode, project (frozen) and pad the samples ``indices``."""
    device = torch.device(device)
    idx = [int(i) for i in indices]
    bsz, g2 = len(idx), data.grid * data.grid
    crops = [data.vision(i) for i in idx]
    n_max = max(c.shape[0] for c in crops)
    real = torch.from_numpy(np.concatenate(crops).astype(np.float32)).to(device)  # (R, g^2, dv)
    projected = side.project(real)  # (R, g^2, d): only real crops go through the projector
    crop_mask = torch.zeros(bsz, n_max, dtype=torch.bool, device=device)
    for b, c in enumerate(crops):
        crop_mask[b, : c.shape[0]] = True
    feats = projected.new_zeros(bsz, n_max, g2, projected.shape[-1])  # (B, C, g^2, d)
    feats[crop_mask] = projected  # row-major over (B, C) = the concatenation order

    texts = [data.instruction(i) for i in idx]
    t_max = max((len(t) for t in texts), default=0)
    ids = torch.zeros(bsz, t_max, dtype=torch.long)
    text_mask = torch.zeros(bsz, t_max, dtype=torch.bool)
    for b, t in enumerate(texts):
        ids[b, : len(t)] = torch.from_numpy(t.astype(np.int64))
        text_mask[b, : len(t)] = True
    text_embeds = side.embed(ids.to(device))  # (B, T, d); padding rows are masked by the router
    return Batch(
        crop_features=feats,
        crop_mask=crop_mask,
        text_embeds=text_embeds,
        text_mask=text_mask.to(device),
        nll=torch.from_numpy(data.nll[idx]).float().to(device),
        order=torch.from_numpy(data.order[idx]).to(device),
    )


@torch.no_grad()
def router_logits(
    router: torch.nn.Module,
    data: RouterData,
    side: RouterSide,
    indices: Sequence[int],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Router logits ``(len(indices), N)`` in eval mode (float64 numpy), batched."""
    was_training = router.training
    router.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        b = collate(data, indices[start : start + batch_size], side, device)
        out.append(router(b.crop_features, b.crop_mask, b.text_embeds, b.text_mask).double().cpu().numpy())
    router.train(was_training)
    n = data.nll.shape[1]
    return np.concatenate(out) if out else np.zeros((0, n))
