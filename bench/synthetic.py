"""Small run and ranking folders in the table contracts, for tests and benchmarks.

The router reads what the scoring job (``RUN/``) and ``rglf rank`` (``RANK/``) write; this
module writes the same tables without them, so the router can be tested and benchmarked on
its own (``router/`` never imports ``pipeline/``):

- ``write_rankings``: ``RANK/rankings/part-0.parquet`` + ``rank_report.json`` from per-level
  feedback arrays, ranked by ``router.data.rank_order`` (ARCHITECTURE.md "Ranking semantics").
- ``write_synthetic_tables``: a learnable toy problem with a tiny random ``RouterSide``: the
  best level of a sample is set by one "key" instruction token, so a router that reads the
  text can reach ~100% agreement and an image-only router cannot.
- ``write_lmm_tables``: router inputs, router side and rankings of real (question, answer,
  image) samples scored by a ``FrozenLMM`` at every level (what the scoring job does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rglf.model.lmm import RouterSide
from rglf.model.router_inputs import encode_row
from rglf.model.scaler import Ladder
from rglf.model.tables import ROUTER_INPUTS_SCHEMA
from rglf.router.data import DEFAULT_ABS_TOL, DEFAULT_REL_TOL, hash_split, rank_order

RANKINGS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),
        pa.field("level_tokens", pa.int32()),
        pa.field("level_index", pa.int32()),
        pa.field("nll_mean", pa.float64()),
        pa.field("n_visual_tokens", pa.int32()),
        pa.field("greedy_match", pa.bool_()),
        pa.field("rank", pa.int32()),
        pa.field("best_level_tokens", pa.int32()),
        pa.field("best_n_visual_tokens", pa.int32()),
        pa.field("regret", pa.float64()),
        pa.field("n_levels", pa.int32()),
    ]
)


def write_rankings(
    rank_dir: str | Path,
    sample_ids: Sequence[str],
    source: Sequence[str],
    split: Sequence[str | None],
    tokens: Sequence[int],
    nll: np.ndarray,
    greedy: np.ndarray,
    n_visual_tokens: np.ndarray,
    *,
    abs_tol: float = DEFAULT_ABS_TOL,
    rel_tol: float = DEFAULT_REL_TOL,
) -> Path:
    """One row per (sample, level) with the SQL's columns; ``nll``/``greedy``/``n_visual_tokens`` are (S, N)."""
    rank_dir = Path(rank_dir)
    (rank_dir / "rankings").mkdir(parents=True, exist_ok=True)
    s, n = nll.shape
    order = rank_order(nll, tokens, abs_tol, rel_tol)  # (S, N) best first
    rank = np.empty_like(order)
    rank[np.arange(s)[:, None], order] = np.arange(1, n + 1)[None, :]
    best = order[:, 0]
    tok = np.asarray(tokens)
    rows = np.arange(s)
    table = pa.table(
        {
            "sample_id": np.repeat(np.asarray(sample_ids, dtype=object), n),
            "source": np.repeat(np.asarray(source, dtype=object), n),
            "split": np.repeat(np.asarray(split, dtype=object), n),
            "level_tokens": np.tile(tok, s).astype(np.int32),
            "level_index": np.tile(np.arange(n), s).astype(np.int32),
            "nll_mean": nll.reshape(-1).astype(np.float64),
            "n_visual_tokens": n_visual_tokens.reshape(-1).astype(np.int32),
            "greedy_match": greedy.reshape(-1).astype(bool),
            "rank": rank.reshape(-1).astype(np.int32),
            "best_level_tokens": np.repeat(tok[best], n).astype(np.int32),
            "best_n_visual_tokens": np.repeat(n_visual_tokens[rows, best], n).astype(np.int32),
            "regret": (nll - nll.min(axis=1, keepdims=True)).reshape(-1),
            "n_levels": np.full(s * n, n, dtype=np.int32),
        },
        schema=RANKINGS_SCHEMA,
    )
    pq.write_table(table, rank_dir / "rankings" / "part-0.parquet")
    report = {"config": {"abs_tol": abs_tol, "rel_tol": rel_tol}, "ladder": [int(t) for t in tokens], "n_samples": s}
    (rank_dir / "rank_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return rank_dir


def write_router_inputs(run_dir: str | Path, rows: list[dict[str, Any]], part: int = 0, *, mode: str = "fp16",
                        row_group_size: int | None = None) -> Path:
    """``RUN/router_inputs/part-N.parquet`` from dicts with ``sample_id``, ``vision (C, g^2, dv)``
    (any float array), ``instruction_ids``, ``image_size`` (and ``image``, ``image_root`` for pixels),
    encoded as the scoring job does (``model.router_inputs.encode_row``, ``mode`` fp16 / fp8 / pixels).
    ``row_group_size``: rows per Parquet row group (the stream's unit; None: one group)."""
    out = Path(run_dir) / "router_inputs"
    out.mkdir(parents=True, exist_ok=True)
    table_rows = []
    for r in rows:
        v = np.asarray(r["vision"], dtype=np.float32)  # (C, g^2, dv)
        grid = int(round(v.shape[1] ** 0.5))
        table_rows.append(encode_row(
            mode, sample_id=r["sample_id"], vision=v, grid=grid, instruction_ids=r["instruction_ids"],
            image_size=r.get("image_size", (grid, grid)), image=r.get("image"), image_root=r.get("image_root"),
        ))
    path = out / f"part-{part}.parquet"
    pq.write_table(pa.Table.from_pylist(table_rows, schema=ROUTER_INPUTS_SCHEMA), path, row_group_size=row_group_size)
    return path


# ---- a learnable synthetic problem ----------------------------------------------------------

SYNTHETIC_KEYS = {1: 0, 2: 2, 3: 4}  # key instruction token -> best level index
SYNTHETIC_BOS = 0  # first id of every synthetic instruction, like the BOS of the job's instruction ids


def write_synthetic_tables(
    run_dir: str | Path,
    rank_dir: str | Path,
    *,
    n_samples: int = 96,
    seed: int = 0,
    grid: int = 8,
    vision_hidden: int = 8,
    hidden: int = 16,
    vocab: int = 24,
    splits: tuple[float, float] = (0.15, 0.15),
    with_split_column: bool = True,
    row_group_size: int | None = None,
) -> dict[str, Any]:
    """A run + rank folder where the best level is set by a key token in the instruction.

    Ladder: the default 5 levels scaled to ``grid`` (grid 8: 4,8,16,32,64). Sample ``i`` has 1-2
    crops of random features, an instruction of id 0 (a BOS: the scoring job's instruction ids keep it,
    as the reference does) then 3-6 random filler ids (4..vocab-1) with one key id (1, 2 or 3 -> best
    level 0, 2 or 4), and NLLs ``0.1 + 0.4 |level - best|`` + noise.
    Splits (val, test fractions) by hash; ``with_split_column=False`` leaves them null.
    ``row_group_size``: rows per router_inputs row group (the stream's unit; None: one).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    run_dir, rank_dir = Path(run_dir), Path(rank_dir)
    side = RouterSide(vision_hidden, hidden, vocab, act="gelu")
    for p in side.parameters():
        torch.nn.init.normal_(p, std=0.5)
    side.meta["grid"] = grid
    ladder = Ladder.parse(None, grid)
    side.save(run_dir / "router_side", extra={"ladder": ladder.spec})
    n_levels = len(ladder)
    ids, src, spl, rows = [], [], [], []
    nll = np.zeros((n_samples, n_levels))
    n_visual = np.zeros((n_samples, n_levels), dtype=np.int64)
    for i in range(n_samples):
        sid = f"syn-{seed}-{i:05d}"
        key = int(rng.integers(1, 4))
        best = SYNTHETIC_KEYS[key]
        filler = rng.integers(4, vocab, int(rng.integers(3, 7))).tolist()
        filler.insert(int(rng.integers(0, len(filler) + 1)), key)
        filler.insert(0, SYNTHETIC_BOS)
        n_crops = int(rng.integers(1, 3))
        rows.append(
            {
                "sample_id": sid,
                "vision": 0.2 * rng.normal(size=(n_crops, grid * grid, vision_hidden)),
                "instruction_ids": filler,
                "image_size": (grid * 4, grid * 4 * n_crops),
            }
        )
        nll[i] = 0.1 + 0.4 * np.abs(np.arange(n_levels) - best) + rng.uniform(0, 0.01, n_levels)
        n_visual[i] = np.asarray(ladder.tokens) * n_crops + (n_crops - 1) * np.array([lv.h for lv in ladder.levels])
        ids.append(sid)
        src.append(f"key{key}")
        spl.append(hash_split(sid, splits[0], splits[1]) if with_split_column else None)
    write_router_inputs(run_dir, rows, row_group_size=row_group_size)
    (run_dir / "run.json").write_text(json.dumps({"ladder": ladder.spec, "synthetic": True}) + "\n")
    greedy = nll < 0.3
    write_rankings(rank_dir, ids, src, spl, ladder.tokens, nll, greedy, n_visual)
    return {"n_samples": n_samples, "ladder": list(ladder.tokens), "grid": grid, "hidden": hidden}


# ---- real samples scored by a FrozenLMM -----------------------------------------------------


def write_lmm_tables(
    lmm,
    samples: Sequence[dict[str, Any]],
    run_dir: str | Path,
    rank_dir: str | Path,
    *,
    abs_tol: float = DEFAULT_ABS_TOL,
) -> dict[str, Any]:
    """Score ``samples`` (dicts: ``sample_id``, ``image`` (PIL), ``question``, ``answer``,
    ``source``, ``split``) at every level with ``lmm`` and write router_side, router_inputs,
    run.json and rankings. Single-turn conversations, the scoring job's instruction ids."""
    run_dir = Path(run_dir)
    lmm.router_side().save(run_dir / "router_side", extra={"ladder": lmm.ladder.spec})
    (run_dir / "run.json").write_text(json.dumps({"ladder": lmm.ladder.spec, "model_id": lmm.model_id}) + "\n")
    pixels, sizes = zip(*(lmm.preprocess(s["image"]) for s in samples), strict=True)
    encoded = lmm.encode(pixels, sizes)
    convs = [lmm.tokenize([("human", "<image>\n" + s["question"]), ("gpt", s["answer"])], True) for s in samples]
    rows = [
        {
            "sample_id": s["sample_id"],
            "vision": e.vision.float().cpu().numpy(),
            "instruction_ids": lmm.instruction_ids(c),
            "image_size": e.image_size,
        }
        for s, c, e in zip(samples, convs, encoded, strict=True)
    ]
    write_router_inputs(run_dir, rows)
    scores = lmm.score([(k, c, e) for k, (c, e) in enumerate(zip(convs, encoded, strict=True))])
    n_levels = len(lmm.ladder)
    nll = np.zeros((len(samples), n_levels))
    greedy = np.zeros((len(samples), n_levels), dtype=bool)
    n_visual = np.zeros((len(samples), n_levels), dtype=np.int64)
    for sc in scores:
        li = lmm.ladder.index(sc.level_tokens)
        nll[sc.key, li], greedy[sc.key, li], n_visual[sc.key, li] = sc.nll_mean, sc.greedy_match, sc.n_visual_tokens
    write_rankings(
        rank_dir,
        [s["sample_id"] for s in samples],
        [s["source"] for s in samples],
        [s.get("split") for s in samples],
        lmm.ladder.tokens,
        nll,
        greedy,
        n_visual,
        abs_tol=abs_tol,
    )
    return {"n_samples": len(samples), "ladder": list(lmm.ladder.tokens)}
