"""``rglf score RUN_DIR --model CKPT``: the distributed feedback-scoring job (Ray Data).

The job is four named stages (input -> output columns):

1. **read** (Ray ``read_parquet`` of ``RUN_DIR/samples``, ``select_pending``, then a streaming
   repartition into blocks of ``batch_size`` rows so every actor gets work): samples rows ->
   ``sample_id, source, split, image, image_root, turns, levels``, only for samples not already
   done; ``levels`` (list<int32>) = the levels still to score for that sample.
2. **load_images** (stateless CPU tasks, ``pipeline.images.load_images``): + ``pixels``
   (float32 crops ``(n_crops, 3, S, S)`` as bytes), ``pixels_shape``, ``image_size``, and
   ``error_stage/code/reason/detail`` for bad images (the row goes on, to be recorded).
3. **score** (an actor pool of ``Scorer``: one frozen ``FrozenLMM`` per actor, loaded once in
   ``__init__``; ``__call__`` under ``torch.inference_mode``): tokenise each conversation,
   encode every image's crops ONCE (one vision pass per ``encode_batch`` images), reject
   sequences longer than the model's context, then ``FrozenLMM.score`` derives every level from
   that one encoding and runs the (sample, level) sequences sorted by length under a token
   budget, ``lm_head`` only on answer positions (bf16 + SDPA on CUDA by default).
4. **write** (same actor call, ``pipeline.writer.write_batch``): router_inputs, errors, then the
   feedback part LAST, named after the batch's sample ids. The actor returns one summary row
   per batch to the driver: ``part, samples, scored, rows, errors, visual_tokens,
   router_bytes, seconds, node_id``. Writing in the actor makes the batch the unit of commit (see
   ``pipeline/writer.py``) and keeps the router features out of the object store.

Output folder (``RUN_DIR``; on a multi-node cluster a filesystem every node mounts at the same
path, since the actors write to it; the checkpoint folder too must be readable on every node)::

    RUN_DIR/samples/part-*.parquet           input (``rglf ingest``)
    RUN_DIR/feedback/part-<key>.parquet      FEEDBACK_SCHEMA, one row per (sample, level)
    RUN_DIR/router_inputs/part-<key>.parquet ROUTER_INPUTS_SCHEMA, one row per scored IMAGE sample
    RUN_DIR/errors/score-<key>.parquet       ERRORS_SCHEMA, one row per sample rejected here
    RUN_DIR/errors/ingest-*.parquet          (from ``rglf ingest``)
    RUN_DIR/router_side/                     frozen projector + embedding table (written once, by an actor)
    RUN_DIR/run.json                         resolved ScoreConfig, model_id, ladder, counts, history

Resume (see ``pipeline/writer.py`` for the commit protocol and its guarantees): re-running on
the same folder deletes uncommitted leftovers, skips every sample whose levels are all in
feedback, and scores the rest. Samples REJECTED here (bad image, too long) count as done: a
rerun does not retry them (delete ``errors/score-*.parquet`` or use ``--force`` to retry).
A different model (``model_id``, a fingerprint of the checkpoint), ladder or conversation template
(``--template``, resolved: ``run.json`` "template") than the folder's ``run.json`` is refused (``ScoreRefused``, exit 2) unless ``--force``, which starts fresh:
the previous feedback, router_inputs, score errors, router_side and run.json are MOVED to the
hidden folder ``RUN_DIR/.replaced-<UTC time>/`` (readers skip hidden folders; delete it when
no longer needed).

Node loss: Ray Data restarts a lost scorer actor (``max_restarts=-1``) and retries the batches
it held, which rewrite their own part files; lost image blocks are recomputed from lineage. A
restart needs a node with room for the actor (spare capacity, or a replacement node from the
autoscaler); until then its batches wait. Killing a driver does not stop batches already queued
on live actors at once: they may commit for a few seconds more (harmless: whole files under
their own names; a rerun started in that window is still made exact by ``dedupe`` and
``check_router_inputs``).

Exit status of the command: 0 when every sample is scored, 3 when some were rejected (here or
at ingest: see ``errors/``), 2 when the job is refused; a crash is a crash (1).

Router inputs, bytes per sample: ``n_crops * grid^2 * vision_hidden * 2`` (fp16 vision-tower
features, before the projector) + ``4 * n_instruction_ids``. The embedded toy (SigLIP hidden 64,
24x24 grid): 2 crops (square image) x 576 x 64 x 2 B = 147,456 B (3 crops: 221,184 B).
7B LLaVA-NeXT (CLIP-L/336: grid 24, hidden 1024): 576 x 1024 x 2 B = 1,179,648 B per crop,
5 crops at 672x672 = 5.9 MB per sample, 4x less than the 4096-wide projected features.
The job prints and records the measured mean.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rglf.model.tables import ERRORS_SCHEMA, FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA

from .writer import (
    TABLES,
    ExistingOutput,
    batch_key,
    dedupe,
    part_files,
    scan_output,
    write_batch,
    write_text_atomic,
)

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("part", pa.string()),
        pa.field("samples", pa.int64()),
        pa.field("scored", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("visual_tokens", pa.int64()),
        pa.field("router_bytes", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("node_id", pa.string()),  # the Ray node whose actor committed the batch
    ]
)


class ScoreRefused(RuntimeError):
    """The output folder belongs to a different model or ladder (or its provenance is unknown)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass
class ScoreConfig:
    """Options of ``rglf score`` (saved, resolved, in ``RUN_DIR/run.json``)."""

    run_dir: Path
    """Output folder; its ``samples/`` (from ``rglf ingest``) is the input. On a multi-node
    cluster it must be on a filesystem every node mounts at the same path (actors write to it)."""
    model: Path
    """Local HF-format checkpoint folder (LLaVA-NeXT or LLaVA), at the same path on every node."""
    workers: int = 1
    """Scorer actors, each holding one frozen copy of the model."""
    gpus_per_worker: float = 0.0
    """GPUs each scorer actor reserves (required > 0 with ``device='cuda'``)."""
    cpus_per_worker: float = 1.0
    """CPUs each scorer actor reserves (its torch threads on ``device='cpu'``)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each scorer actor reserves, e.g. ``{"scorer_slot": 1}`` to place actors
    only on nodes started with that resource."""
    batch_size: int = 16
    """Samples per scorer call = per committed part file: the unit lost when a job is killed."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (inside each actor)."""
    dtype: str = "auto"
    """``auto`` (bf16 on cuda, fp32 on cpu), ``fp32``, ``bf16`` or ``fp16``."""
    ladder: str | None = None
    """Levels to score, e.g. ``"36,72,144,288,576"`` or ``"24x18,216"`` (default: the paper's
    five levels scaled to the model's crop grid)."""
    template: str = "auto"
    """Conversation template (``model/conversation.py``): a name, or ``auto`` = the checkpoint's recorded
    template, else the one its HF chat template stands for, else ``vicuna_v1``. Part of the provenance."""
    max_batch_tokens: int = 2048
    """Token budget (sequences x padded length) of one language-model forward pass (2,048: the
    fastest on CPU in bench/bench_score.py; raise it on GPUs)."""
    max_batch_size: int = 64
    """Most (sample, level) sequences in one forward pass."""
    encode_batch: int = 16
    """Images per vision-tower pass inside a scorer call."""
    max_aspect: float = 20.0
    """Reject images whose longer side exceeds this many times the shorter one."""
    min_side: int = 10
    """Reject images with a side shorter than this many pixels."""
    image_cpus: float = 0.5
    """CPUs per image-loading task. When it equals ``cpus_per_worker`` on a CPU-only job, Ray Data
    fuses stage 2 into the scorer actors (no pixel copies, but no overlap either)."""
    address: str | None = None
    """Ray cluster to join (else ``RAY_ADDRESS``, e.g. under ``ray job submit``; else a local
    instance sized to this machine)."""
    num_cpus: int | None = None
    """Local instance only: CPUs to give Ray (default: all of this machine's)."""
    object_store_mb: int | None = None
    """Local instance only: object store size in MiB (default: Ray's)."""
    ray_temp_dir: Path | None = None
    """Local instance only: Ray's session folder (keep it short: unix sockets live there)."""
    force: bool = False
    """Start fresh: move existing scoring outputs to ``RUN_DIR/.replaced-<time>/``."""
    progress: bool = True
    """Show Ray Data's progress bars."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.model = Path(self.model)
        if self.ray_temp_dir is not None:
            self.ray_temp_dir = Path(self.ray_temp_dir)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("workers", "batch_size", "max_batch_tokens", "max_batch_size", "encode_batch", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.worker_resources = {str(k): float(v) for k, v in (self.worker_resources or {}).items()}
        if any(v <= 0 for v in self.worker_resources.values()):
            raise ValueError(f"worker_resources amounts must be > 0, got {self.worker_resources}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0 or self.image_cpus < 0:
            raise ValueError("gpus_per_worker, cpus_per_worker and image_cpus must be >= 0")
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError("device 'cuda' needs gpus_per_worker > 0 (Ray assigns each actor its GPU)")
        if self.device == "cpu" and self.gpus_per_worker > 0:
            raise ValueError("device 'cpu' with gpus_per_worker > 0 would reserve GPUs that are never used")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.object_store_mb is not None and self.object_store_mb < 64:
            raise ValueError(f"object_store_mb must be >= 64, got {self.object_store_mb}")
        if self.template != "auto":
            from rglf.model.conversation import get_template

            self.template = get_template(self.template).name

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class ScoreReport:
    """What one ``rglf score`` did and what the output folder holds afterwards."""

    samples_total: int = 0
    skipped_done: int = 0  # already scored or rejected by an earlier run
    processed: int = 0  # samples this run sent through the pipeline
    scored: int = 0  # ... of which scored
    rejected: int = 0  # ... of which rejected
    rows: int = 0  # feedback rows written by this run
    batches: int = 0
    batches_by_node: dict[str, int] = field(default_factory=dict)  # which Ray nodes did the work
    seconds: float = 0.0
    removed_leftovers: int = 0
    duplicates_removed: int = 0
    feedback_rows: int = 0  # in the whole output folder
    scored_samples: int = 0
    rejected_samples: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    ingest_rejected: int = 0
    router_inputs_rows: int = 0
    router_bytes_per_sample: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0: every sample scored; 3: some inputs were rejected (here or at ingest)."""
        return 3 if (self.rejected_samples or self.ingest_rejected) else 0

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_code.items()))
        return (
            f"score: {self.processed} samples in {self.seconds:.1f} s ({self.samples_per_second:.2f} samples/s): "
            f"{self.scored} scored ({self.rows} feedback rows), {self.rejected} rejected; "
            f"{self.skipped_done} already done. Output: {self.scored_samples}/{self.samples_total} samples scored, "
            f"{self.feedback_rows} feedback rows, {self.rejected_samples} rejected" + (f" ({codes})" if codes else "")
            + (f", {self.ingest_rejected} rejected at ingest" if self.ingest_rejected else "")
            + f"; router inputs {self.router_bytes_per_sample / 1e6:.3f} MB/sample"
        )


# --------------------------------------------------------------------------------------
# Stage 1: read (the pending filter runs inside the read tasks)
# --------------------------------------------------------------------------------------


def select_pending(batch: pa.Table, *, skip: set[str], partial: dict[str, list[int]], levels: list[int]) -> pa.Table:
    """Drop samples already done; add ``levels``: the levels still to score for each sample."""
    ids = batch.column("sample_id").to_pylist()
    keep = [sid not in skip for sid in ids]
    batch = batch.filter(pa.array(keep, type=pa.bool_()))
    wanted = [partial.get(sid, levels) for sid, k in zip(ids, keep, strict=True) if k]
    return batch.append_column(pa.field("levels", pa.list_(pa.int32())), pa.array(wanted, type=pa.list_(pa.int32())))


# --------------------------------------------------------------------------------------
# Stages 3 + 4: score and write (one actor per model copy)
# --------------------------------------------------------------------------------------


def ensure_router_side(lmm, out: Path) -> None:
    """Write ``out/router_side/`` once: into a private folder, then one atomic rename (first writer wins)."""
    target = Path(out) / "router_side"
    if (target / "router_side.json").exists():
        return
    staging = Path(out) / f".router_side-{os.getpid()}-{time.time_ns()}"
    lmm.router_side().save(staging)
    try:
        os.rename(staging, target)  # atomic; fails if another actor got there first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class Scorer:
    """Stage 3 + 4 as a Ray Data callable class: one frozen LMM per actor, a batch per call."""

    def __init__(
        self,
        *,
        model: str,
        out: str,
        device: str,
        dtype: str,
        ladder: str,
        model_id: str,
        max_batch_tokens: int,
        max_batch_size: int,
        encode_batch: int,
        template: str = "auto",
    ):
        import torch

        from rglf.model.lmm import FrozenLMM
        from rglf.model.provenance import known_files

        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        self.lmm = FrozenLMM.from_pretrained(
            model, device=device, dtype=None if dtype == "auto" else dtype, ladder=ladder, known=known_files(out),
            template=template,
        )
        if self.lmm.model_id != model_id:
            raise RuntimeError(
                f"the checkpoint at {model} on this node has fingerprint {self.lmm.model_id}, the driver saw "
                f"{model_id}: every node must see the same checkpoint"
            )
        self.out = Path(out)
        self.node_id = _node_id()
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.encode_batch = encode_batch
        ensure_router_side(self.lmm, self.out)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        start = time.perf_counter()
        rows = batch.drop_columns(["pixels"]).to_pylist()
        if not rows:
            return SUMMARY_SCHEMA.empty_table()
        with torch.inference_mode():
            feedback, router, errors = self.score(rows, batch.column("pixels"))
        key = batch_key(r["sample_id"] for r in rows)
        tables = (
            pa.Table.from_pylist(feedback, schema=FEEDBACK_SCHEMA),
            pa.Table.from_pylist(router, schema=ROUTER_INPUTS_SCHEMA),
            pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA),
        )
        write_batch(self.out, key, *tables)
        summary = {
            "part": key,
            "samples": len(rows),
            "scored": len({r["sample_id"] for r in feedback}),
            "rows": len(feedback),
            "errors": len(errors),
            "visual_tokens": sum(r["n_visual_tokens"] for r in feedback),
            "router_bytes": sum(len(r["vision_features"]) + 4 * len(r["instruction_ids"]) for r in router),
            "seconds": time.perf_counter() - start,
            "node_id": self.node_id,
        }
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)

    def score(self, rows: list[dict], pixels: pa.ChunkedArray) -> tuple[list[dict], list[dict], list[dict]]:
        """Rows of one batch -> (feedback rows, router_inputs rows, error rows)."""
        import torch

        from rglf.model.conversation import ConversationError

        lmm = self.lmm
        errors: list[dict] = []

        def reject(i: int, stage: str, code: str, reason: str, detail: str | None = None) -> None:
            row = rows[i]
            errors.append(
                {"sample_id": row["sample_id"], "stage": stage, "reason": reason, "source": row["source"],
                 "detail": detail if detail is not None else row["image"], "code": code}
            )

        # tokenise; carry the image stage's rejections over
        convs: dict[int, Any] = {}
        for i, row in enumerate(rows):
            if row["error_code"] is not None:
                reject(i, row["error_stage"], row["error_code"], row["error_reason"], row["error_detail"])
                continue
            try:
                convs[i] = lmm.tokenize([(t["role"], t["text"]) for t in row["turns"]], has_image=row["image"] is not None)
            except ConversationError as err:
                reject(i, "tokenize", "bad_conversation", f"sample {row['sample_id']}: {err}")

        # encode every image's crops once, encode_batch images per vision pass
        with_image = [i for i in convs if rows[i]["image"] is not None]
        encoded: dict[int, Any] = {}
        for c in range(0, len(with_image), self.encode_batch):
            chunk = with_image[c : c + self.encode_batch]
            crops = [
                torch.from_numpy(np.frombuffer(pixels[i].as_py(), dtype=np.float32).reshape(rows[i]["pixels_shape"]).copy())
                for i in chunk
            ]
            sizes = [tuple(rows[i]["image_size"]) for i in chunk]
            try:
                encoded.update(zip(chunk, lmm.encode(crops, sizes), strict=True))
            except ValueError:  # one inconsistent image must not sink the others: retry one by one
                for i, crop, size in zip(chunk, crops, sizes, strict=True):
                    try:
                        encoded[i] = lmm.encode([crop], [size])[0]
                    except ValueError as err:
                        reject(i, "encode", "encode_failed", f"{rows[i]['image']}: {err}")
        for i in with_image:
            if i not in encoded:
                convs.pop(i, None)

        # sequences longer than the model's context cannot be scored at that level
        for i in list(convs):
            conv, enc, levels = convs[i], encoded.get(i), rows[i]["levels"]
            if enc is None:
                lengths = {t: len(conv.input_ids) for t in levels}
            else:
                lengths = {
                    t: len(conv.input_ids) - 1 + lmm.pack(enc.projected, enc.image_size, lmm.ladder.index(t)).shape[0]
                    for t in levels
                }
            t_max = max(lengths, key=lengths.get)
            if lengths[t_max] > lmm.max_length:
                what = rows[i]["image"] or f"text-only sample {rows[i]['sample_id']}"
                reject(
                    i, "score", "too_long",
                    f"{what}: {lengths[t_max]} tokens at level {t_max} ({conv.answer_tokens} answer tokens) exceed the "
                    f"model's context of {lmm.max_length} tokens",
                )
                del convs[i]

        # score every wanted level; samples grouped by their level set (normally one group)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in convs:
            groups[tuple(rows[i]["levels"])].append(i)
        feedback: list[dict] = []
        for levels, members in groups.items():
            scores = lmm.score(
                [(i, convs[i], encoded.get(i)) for i in members],
                levels=list(levels),
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
            )
            for s in scores:
                row = rows[s.key]
                feedback.append(
                    {
                        "sample_id": row["sample_id"], "source": row["source"], "split": row["split"],
                        "level_tokens": s.level_tokens, "level_grid": s.level_grid, "n_crops": s.n_crops,
                        "n_visual_tokens": s.n_visual_tokens, "answer_tokens": s.answer_tokens,
                        "nll_sum": s.nll_sum, "nll_mean": s.nll_mean, "greedy_match": s.greedy_match,
                        "model_id": lmm.model_id,
                    }
                )
        feedback.sort(key=lambda r: (r["sample_id"], r["level_tokens"]))

        router = []
        for i in sorted(convs, key=lambda i: rows[i]["sample_id"]):
            enc = encoded.get(i)
            if enc is None:  # text-only: nothing for the router to look at
                continue
            vision = enc.vision.to(torch.float16).cpu().numpy().astype("<f2", copy=False)  # (n_crops, g*g, dv)
            router.append(
                {
                    "sample_id": rows[i]["sample_id"], "n_crops": vision.shape[0], "grid": lmm.grid,
                    "vision_hidden": vision.shape[2], "vision_features": vision.tobytes(order="C"),
                    "instruction_ids": lmm.instruction_ids(convs[i]), "image_size": list(enc.image_size),
                }
            )
        return feedback, router, errors


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def resolve_model(model: Path, ladder_spec: str | None, known: dict | None = None):
    """(model_id, Ladder) of a checkpoint without loading its weights (the driver needs no GPU).

    ``known``: the run folder's ``run.json`` ``model_files`` (cached per-file hashes).
    """
    from transformers import AutoConfig

    from rglf.model.lmm import ModelLoadError, checkpoint_fingerprint
    from rglf.model.scaler import Ladder

    if not (model / "config.json").is_file():
        raise ModelLoadError(f"{model} is not an HF checkpoint folder (no config.json)")
    vc = AutoConfig.from_pretrained(model, local_files_only=True).vision_config
    return checkpoint_fingerprint(model, known=known), Ladder.parse(ladder_spec, vc.image_size // vc.patch_size)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prepare_output(cfg: ScoreConfig, model_id: str, ladder, log, template: str | None = None) -> dict | None:
    """Check the folder's provenance (refuse a different model/ladder/template) or, with ``force``, move old outputs aside.

    Returns the previous ``run.json`` (None when starting fresh).
    """
    out = cfg.run_dir
    run_json = out / "run.json"
    ours = [out / "feedback", out / "router_inputs", out / "router_side"]
    has_outputs = any(part_files(out, t) for t in TABLES) or (out / "router_side").exists()
    previous = json.loads(run_json.read_text()) if run_json.exists() else None
    if cfg.force and (previous is not None or has_outputs):
        aside = out / f".replaced-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
        aside.mkdir()
        for path in [*ours, run_json]:
            if path.exists():
                os.replace(path, aside / path.name)
        errors_aside = aside / "errors"
        for path in part_files(out, "errors"):
            errors_aside.mkdir(exist_ok=True)
            os.replace(path, errors_aside / path.name)
        log(f"--force: previous scoring outputs moved to {aside}")
        return None
    if previous is not None:
        problems = []
        if previous.get("model_id") != model_id:
            problems.append(f"model {previous.get('model_id')} -> {model_id}")
        if previous.get("ladder", {}).get("spec") != ladder.spec:
            problems.append(f"ladder {previous.get('ladder', {}).get('spec')} -> {ladder.spec}")
        if template is not None and (previous.get("template") or {}).get("name") != template:
            # a run.json without a template predates whole-prompt tokenisation: its ids are not comparable
            old = (previous.get("template") or {}).get("name", "unrecorded (scored before templates were recorded)")
            problems.append(f"template {old} -> {template}")
        if problems:
            raise ScoreRefused(
                f"{out} was scored with a different configuration ({'; '.join(problems)}); mixing them would "
                "make the feedback table meaningless. Use another output folder, or --force to start fresh "
                "(the old outputs are moved to RUN_DIR/.replaced-<time>/)."
            )
    elif has_outputs:
        raise ScoreRefused(f"{out} holds scoring outputs but no run.json (unknown model/ladder); use --force to start fresh")
    return previous


def plan(samples_dir: Path, existing: ExistingOutput, ladder) -> tuple[list[str], set[str], dict[str, list[int]]]:
    """(all sample ids, samples to skip, {sample: missing levels} for partially scored samples)."""
    files = sorted(samples_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{samples_dir} holds no samples: run `rglf ingest` first")
    ids = pa.concat_tables([pq.read_table(f, columns=["sample_id"]) for f in files]).column("sample_id").to_pylist()
    wanted = set(ladder.tokens)
    keys = existing.feedback_keys
    keys = keys.filter(pc.is_in(keys.column("level_tokens"), pa.array(sorted(wanted), type=pa.int32())))
    grouped = keys.group_by("sample_id").aggregate([("level_tokens", "list")])
    skip = set(existing.rejected)
    partial: dict[str, list[int]] = {}
    for sid, have in zip(grouped.column("sample_id").to_pylist(), grouped.column("level_tokens_list").to_pylist(), strict=True):
        missing = sorted(wanted - set(have))
        if missing:
            partial[sid] = missing
        else:
            skip.add(sid)
    return ids, skip, partial


def connect_ray(cfg: ScoreConfig, log) -> bool:
    """Join a cluster (``--address`` / ``RAY_ADDRESS``) or start a local instance; True if we must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log(f"joined the Ray cluster at {address}")
        need = cfg.workers * cfg.cpus_per_worker + cfg.image_cpus
        have = ray.cluster_resources().get("CPU", 0.0)
        if have < need:
            ray.shutdown()
            raise ValueError(
                f"the cluster at {address} has {have:g} CPUs; {cfg.workers} scorer actors x {cfg.cpus_per_worker:g} "
                f"CPUs + {cfg.image_cpus:g} for image tasks need {need:g} (the job would wait forever): "
                "lower --workers / --cpus-per-worker / --image-cpus"
            )
    else:
        # Ray CPUs are scheduling tokens: the scorer actors hold theirs for the whole job, so a
        # machine whose cores all go to actors would leave none for the image tasks and hang.
        # Give the local instance enough logical CPUs for the actors plus the CPU stages.
        need = math.ceil(cfg.workers * cfg.cpus_per_worker + max(cfg.image_cpus, 0.5))
        kwargs: dict[str, Any] = {"num_cpus": cfg.num_cpus or max(os.cpu_count() or 1, need), "include_dashboard": False}
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
        if cfg.ray_temp_dir is not None:
            kwargs["_temp_dir"] = str(cfg.ray_temp_dir)
        ray.init(**kwargs)
        log(f"started a local Ray instance ({kwargs['num_cpus']} CPUs)")
    return True


def build_pipeline(cfg: ScoreConfig, model_id: str, ladder, skip: set[str], partial: dict[str, list[int]],
                   template: str = "auto"):
    """The job as a Ray Dataset of per-batch summaries: read -> load_images -> score (+ write)."""
    import ray

    from .images import load_images

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    samples = ray.data.read_parquet(str(cfg.run_dir / "samples"), file_extensions=["parquet"])  # 1. read
    pending = samples.map_batches(
        select_pending, batch_format="pyarrow", num_cpus=cfg.image_cpus,
        fn_kwargs={"skip": skip, "partial": partial, "levels": list(ladder.tokens)},
    )
    # one block per scorer batch (streaming, no barrier): a samples part file is ONE read block, and
    # without this a whole file would reach one actor as one task, leaving the other actors idle
    pending = pending.repartition(target_num_rows_per_block=cfg.batch_size)
    loaded = pending.map_batches(  # 2. load_images (CPU tasks)
        load_images, batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=cfg.image_cpus,
        fn_kwargs={"model": str(cfg.model), "max_aspect": cfg.max_aspect, "min_side": cfg.min_side},
    )
    return loaded.map_batches(  # 3. score + 4. write (actor pool)
        Scorer,
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.workers, max_size=cfg.workers),
        num_gpus=cfg.gpus_per_worker or None,
        num_cpus=cfg.cpus_per_worker,
        resources=cfg.worker_resources or None,
        fn_constructor_kwargs={
            "model": str(cfg.model), "out": str(cfg.run_dir), "device": cfg.device, "dtype": cfg.dtype,
            "ladder": ladder.spec, "model_id": model_id, "max_batch_tokens": cfg.max_batch_tokens,
            "max_batch_size": cfg.max_batch_size, "encode_batch": cfg.encode_batch, "template": template,
        },
    )


def check_router_inputs(out: Path) -> None:
    """Every scored image sample must have its router inputs; un-commit the batches that do not.

    Only a race can break this: a straggling worker of a KILLED job committing a batch after the
    next run deleted that batch's router_inputs part as an orphan. Deleting the affected feedback
    parts makes those samples pending again, so a rerun redoes them.
    """
    feedback_files = part_files(out, "feedback")
    router_ids: set[str] = set()
    for f in part_files(out, "router_inputs"):
        router_ids.update(pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist())
    broken = []
    for f in feedback_files:
        t = pq.read_table(f, columns=["sample_id", "n_crops"])
        with_image = t.filter(pc.greater(t.column("n_crops"), 0)).column("sample_id").to_pylist()
        if any(sid not in router_ids for sid in with_image):
            broken.append(f)
    if broken:
        for f in broken:
            f.unlink()
        raise RuntimeError(
            f"{len(broken)} committed batches had no router inputs (a killed job's worker raced this run); "
            "they were un-committed: rerun `rglf score` to redo them"
        )


def _final_counts(cfg: ScoreConfig, report: ScoreReport, ladder, ids: list[str]) -> None:
    """Fill the whole-folder counts of ``report`` from the files; check every sample is accounted for."""
    out = cfg.run_dir
    existing = scan_output(out)
    _, skip, _ = plan(out / "samples", existing, ladder)
    keys = existing.feedback_keys
    report.feedback_rows = keys.num_rows
    report.scored_samples = len(set(keys.column("sample_id").to_pylist()))
    errs = [pq.read_table(f, columns=["sample_id", "code"]) for f in part_files(out, "errors")]
    report.rejected_samples = sum(t.num_rows for t in errs)
    report.rejected_by_code = dict(Counter(c for t in errs for c in t.column("code").to_pylist()))
    ingest_errors = sorted((out / "errors").glob("ingest-*.parquet"))
    report.ingest_rejected = sum(pq.read_metadata(f).num_rows for f in ingest_errors)
    router = [
        pq.read_table(f, columns=["n_crops", "grid", "vision_hidden", "instruction_ids"])
        for f in part_files(out, "router_inputs")
    ]
    report.router_inputs_rows = sum(t.num_rows for t in router)
    check_router_inputs(out)
    total = 0
    for t in router:
        n, g, h = (np.asarray(t.column(c).to_numpy(), dtype=np.int64) for c in ("n_crops", "grid", "vision_hidden"))
        total += int((n * g * g * h * 2).sum()) + 4 * int(pc.sum(pc.list_value_length(t.column("instruction_ids"))).as_py() or 0)
    report.router_bytes_per_sample = total / report.router_inputs_rows if report.router_inputs_rows else 0.0
    left = [sid for sid in ids if sid not in skip]  # partially scored samples are not in skip either
    if left:
        raise RuntimeError(
            f"{len(left)} samples were neither scored nor rejected (e.g. {left[:3]}); rerun `rglf score` to finish them"
        )


def run_score(cfg: ScoreConfig, log=print) -> ScoreReport:
    """Run the job (see the module docstring); returns the report also saved in ``run.json``."""
    from rglf.model.provenance import checkpoint_identity, known_files, new_run_id

    started = _now()
    known = known_files(cfg.run_dir)  # cached per-file hashes: a resumed run does not re-hash the checkpoint
    model_id, ladder = resolve_model(cfg.model, cfg.ladder, known=known)
    from rglf.model.conversation import resolve_template

    template, template_source = resolve_template(cfg.model, cfg.template)
    previous = prepare_output(cfg, model_id, ladder, log, template)
    existing = scan_output(cfg.run_dir)
    ids, skip, partial = plan(cfg.run_dir / "samples", existing, ladder)
    report = ScoreReport(samples_total=len(ids), removed_leftovers=len(existing.removed))
    report.skipped_done = sum(1 for sid in ids if sid in skip)
    pending = report.samples_total - report.skipped_done
    if existing.removed:
        log(f"removed {len(existing.removed)} uncommitted leftovers of an interrupted run")

    history = (previous or {}).get("history", [])
    for entry in history:  # an entry still "running" is a run that was killed
        if entry.get("status") == "running":
            entry["status"] = "interrupted"
    this_run: dict[str, Any] = {"started": started, "status": "running", "pending_at_start": pending}
    history.append(this_run)
    record: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_json(),
        "model_id": model_id,
        "run_id": (previous or {}).get("run_id") or new_run_id(),  # checked by rank/train (model/provenance.py)
        "model_files": checkpoint_identity(cfg.model, known=known).to_json(),
        "ladder": {"spec": ladder.spec, "tokens": list(ladder.tokens), "grid": ladder.grid},
        "template": {"name": template, "source": template_source},
        "history": history,
    }
    write_text_atomic(cfg.run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    log(
        f"score: {report.samples_total} samples, {report.skipped_done} already done, {pending} to score; "
        f"model {model_id}, ladder {','.join(map(str, ladder.tokens))}, template {template}"
    )

    t0 = time.perf_counter()
    if pending:
        started_ray = connect_ray(cfg, log)
        try:
            dataset = build_pipeline(cfg, model_id, ladder, skip, partial, template)
            for summary in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                report.batches += summary.num_rows
                for node in summary.column("node_id").to_pylist():
                    report.batches_by_node[node] = report.batches_by_node.get(node, 0) + 1
                report.processed += pc.sum(summary.column("samples")).as_py() or 0
                report.scored += pc.sum(summary.column("scored")).as_py() or 0
                report.rows += pc.sum(summary.column("rows")).as_py() or 0
                report.rejected += pc.sum(summary.column("errors")).as_py() or 0
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    elif not (cfg.run_dir / "router_side" / "router_side.json").exists():
        from rglf.model.lmm import FrozenLMM  # rare: every sample done but router_side deleted

        log("router_side/ missing: loading the model on this machine (CPU) to write it")
        ensure_router_side(FrozenLMM.from_pretrained(cfg.model, ladder=ladder.spec, template=template), cfg.run_dir)
    report.seconds = time.perf_counter() - t0

    report.duplicates_removed = sum(dedupe(cfg.run_dir, t) for t in TABLES)
    if report.duplicates_removed:
        log(f"removed {report.duplicates_removed} duplicate rows (a batch committed twice under different names)")
    _final_counts(cfg, report, ladder, ids)

    this_run.update(
        status="complete", finished=_now(), processed=report.processed, scored=report.scored,
        rejected=report.rejected, rows=report.rows, batches=report.batches, seconds=round(report.seconds, 3),
        samples_per_second=round(report.samples_per_second, 3), batches_by_node=report.batches_by_node,
        removed_leftovers=report.removed_leftovers, duplicates_removed=report.duplicates_removed,
    )
    per_run = ("processed", "scored", "rejected", "rows", "batches", "batches_by_node", "seconds")
    record.update(
        status="complete",
        counts={k: v for k, v in asdict(report).items() if k not in per_run},
        router_inputs={
            "bytes_per_sample_mean": report.router_bytes_per_sample,
            "formula": "n_crops * grid^2 * vision_hidden * 2 (fp16) + 4 * n_instruction_ids",
        },
        exit_code=report.exit_code,
    )
    write_text_atomic(cfg.run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    log(report.summary())
    return report
