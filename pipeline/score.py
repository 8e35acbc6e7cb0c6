"""``rglf score --run RUN --model CKPT``: the distributed feedback-scoring job (Ray).

The job is four named stages (input -> output columns), streamed batch by batch:

1. **read** (the driver, ``pending_batches``): ``RUN/samples`` row group by row group, only the
   samples not already done (``plan_run`` + the run's index, see ``pipeline/writer.py``), cut
   into batches of ``batch_size`` rows: ``sample_id, source, split, image, image_root, turns,
   levels``; ``levels`` (list<int32>) = the levels still to score for that sample.
2. **load_images** (stateless Ray CPU tasks, ``pipeline.images.load_images``): + ``pixels``
   (float32 crops ``(n_crops, 3, S, S)`` as bytes), ``pixels_shape``, ``image_size``, and
   ``error_stage/code/reason/detail`` for bad images (the row goes on, to be recorded).
3. **score** (``workers`` Ray actors of ``Scorer``: one frozen ``FrozenLMM`` per actor, loaded
   once in ``__init__``; each call under ``torch.inference_mode``): tokenise each conversation,
   encode every image's crops ONCE (one vision pass per ``encode_batch`` images), reject
   sequences longer than the model's context, then ``FrozenLMM.score`` derives every level from
   that one encoding and runs the (sample, level) sequences sorted by length under a token
   budget, ``lm_head`` only on answer positions (bf16 + SDPA on CUDA by default).
4. **write** (same actor call, ``pipeline.writer.write_batch``): router_inputs, errors, then the
   feedback part LAST, named after the batch's sample ids. The call returns a ``BatchResult``:
   per-batch counts and the batch's index rows, which the driver appends to ``RUN/index/``.
   Writing in the actor makes the batch the unit of commit and keeps the router features out
   of the object store.

How the batches flow (``pipeline/job.py``): the driver keeps two batches in flight per actor
(one scoring, the next one's images loading), so the first batch is sent as soon as the first
row group is read, whatever the dataset size, and memory stays bounded. Resources are checked
before anything starts: impossible requests (CUDA absent, more actors than the cluster can
hold) fail at once (exit 5); when the actors leave no CPU for image tasks, images load inside
the actors.

Output folder (``RUN``; on a multi-node cluster a filesystem every node mounts at the same
path, since the actors write to it; the checkpoint folder too must be readable on every node)::

    RUN/samples/part-*.parquet           input (``rglf ingest``)
    RUN/feedback/part-<key>.parquet      FEEDBACK_SCHEMA, one row per (sample, level)
    RUN/router_inputs/part-<key>.parquet ROUTER_INPUTS_SCHEMA, one row per scored IMAGE sample
    RUN/errors/score-<key>.parquet       ERRORS_SCHEMA, one row per sample rejected here
    RUN/errors/ingest-*.parquet          (from ``rglf ingest``)
    RUN/router_side/                     frozen projector + embedding table (written once, by an actor)
    RUN/index/seg-*.parquet              what is done (a cache of the parts; see pipeline/writer.py)
    RUN/run.json                         resolved ScoreConfig, model_id, ladder, counts, history
    RUN/.lock                            one writer at a time (RunLocked, exit 6)

Resume (see ``pipeline/writer.py`` for the commit protocol and its guarantees): re-running on
the same folder deletes uncommitted leftovers, skips every sample whose levels are all in
feedback, and scores the rest. Planning reads the index plus a listing of ``feedback/``, and
the end-of-job checks work on the index: their cost does not grow with the run's history.
Samples REJECTED here (bad image, too long) count as done: a rerun does not retry them
(delete ``errors/score-*.parquet`` or use ``--force`` to retry). A different model
(``model_id``, a fingerprint of the checkpoint), ladder, conversation template (``--template``,
resolved: ``run.json`` "template") or router-inputs mode than the folder's ``run.json`` is refused
(``ScoreRefused``, exit 2) unless ``--force``, which starts fresh: the previous feedback, router_inputs, score errors,
router_side, index and run.json are MOVED to the hidden folder ``RUN/.replaced-<UTC time>/``
(readers skip hidden folders; delete it when no longer needed).

``run.json`` ``history`` has one entry per run: ``status`` is ``complete``, ``interrupted``
(Ctrl-C; or ``ended: "killed"`` when the next run found it still marked running with its lock
released) or ``failed`` (with the one-line ``error``).

Node loss: Ray restarts a lost scorer actor (``max_restarts=-1``) where there is capacity; the
batches it held are re-queued at once to the live actors, so the job also finishes without
spare capacity. Killing a driver does not stop batches already running on live actors at
once: they may commit for a few seconds more (harmless: whole files under their own names; a
rerun started in that window is still made exact by ``RunIndex.dedupe`` and
``RunIndex.check_router_inputs``).

Exit status of the command: 0 when every sample is scored, 3 when some were rejected (here or
at ingest: see ``errors/``) or the samples table is empty, 2 when the job is refused, 4 when
there are no samples (run ``rglf ingest`` first), 5 for impossible resources, 6 when another
process holds the run folder, 130 on Ctrl-C; a crash is a crash (1).

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
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rglf.model.router_inputs import (
    BYTES_FORMULA,
    ROUTER_INPUT_MODES,
    encode_row,
    row_nbytes,
    save_router_side,
)
from rglf.model.tables import ERRORS_SCHEMA, FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA

from .writer import (
    INDEX_DIR,
    TABLES,
    RunIndex,
    RunLock,
    batch_index,
    batch_key,
    describe_holder,
    part_files,
    write_batch,
    write_text_atomic,
)

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
READ_ROWS = 4096  # samples rows the driver reads at a time


class ScoreRefused(RuntimeError):
    """The output folder belongs to a different model or ladder (or its provenance is unknown)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


class MissingSamples(RuntimeError):
    """``RUN/samples`` does not exist: ``rglf ingest`` has not run."""

    exit_code = 4  # cli.EXIT_CODES: a required earlier stage's output is missing


class ScoreInterrupted(KeyboardInterrupt):
    """Ctrl-C: the message says what is kept and what a rerun does (the CLI prints it, exit 130)."""


@dataclass
class ScoreConfig:
    """Options of ``rglf score`` (saved, resolved, in ``RUN/run.json``)."""

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
    router_inputs: str = "fp16"
    """What ``router_inputs/`` keeps per image sample for router training (``model.router_inputs``):
    ``fp16`` vision features (default), ``fp8`` (e4m3 + per-channel scales: half the bytes),
    ``pixels`` (only the image reference; the trainer re-encodes with the frozen vision tower saved
    in ``router_side/vision/``) or ``none`` (feedback only)."""
    max_aspect: float | None = None
    """Reject images whose longer side exceeds this many times the shorter one. Default (None):
    derived from the checkpoint's preprocessing -- no limit for LLaVA-NeXT (anyres handles any
    aspect), Pillow's pixel limit / crop size^2 for a single-crop CLIP processor."""
    min_side: int = 1
    """Reject images with a side shorter than this many pixels (default 1: every image scores)."""
    image_cpus: float = 0.5
    """CPUs per image-loading task (Ray tasks beside the actors; inside the actors when the
    cluster has no CPU left for them)."""
    address: str | None = None
    """Ray cluster to join (else ``RAY_ADDRESS``, e.g. under ``ray job submit``; else a local
    instance sized to this machine)."""
    num_cpus: int | None = None
    """Local instance only: CPUs to give Ray (default: this machine's, at least enough for the
    actors plus one image task)."""
    object_store_mb: int | None = None
    """Local instance only: object store size in MiB (default: Ray's)."""
    ray_temp_dir: Path | None = None
    """Local instance only: Ray's session folder (keep it short: unix sockets live there)."""
    force: bool = False
    """Start fresh: move existing scoring outputs to ``RUN/.replaced-<time>/``."""
    progress: bool = False
    """Let Ray's and transformers' own output through (the CLI's ``--verbose``)."""
    placement_timeout: float = 60.0
    """Seconds a cluster (``--address``) may take to offer room for the scorer actors before the
    job fails (exit 5); a local instance fails at once."""
    prefetch: int = 2
    """Batches in flight per actor (one scoring, the next ones' images loading)."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.model = Path(self.model)
        if self.ray_temp_dir is not None:
            self.ray_temp_dir = Path(self.ray_temp_dir)
        if self.router_inputs not in ROUTER_INPUT_MODES:
            raise ValueError(f"router_inputs must be one of {ROUTER_INPUT_MODES}, got {self.router_inputs!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("workers", "batch_size", "max_batch_tokens", "max_batch_size", "encode_batch", "min_side",
                     "prefetch"):
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
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.object_store_mb is not None and self.object_store_mb < 64:
            raise ValueError(f"object_store_mb must be >= 64, got {self.object_store_mb}")
        if self.placement_timeout < 0:
            raise ValueError(f"placement_timeout must be >= 0, got {self.placement_timeout}")
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
    planning_seconds: float = 0.0  # index + listing + pending filter, before any Ray work
    first_batch_seconds: float | None = None  # from the job's start to its first committed batch
    idle_share: float | None = None  # share of the actors' available time spent waiting for input
    images_in_actor: bool = False
    requeued_batches: int = 0  # batches re-sent after their actor died
    removed_leftovers: int = 0
    parts_indexed: int = 0  # parts read on start because the index did not cover them
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
        """0: every sample scored; 3: some inputs were rejected (here or at ingest), or there were none."""
        return 3 if (self.rejected_samples or self.ingest_rejected or not self.samples_total) else 0

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_code.items()))
        if not self.samples_total:
            return "score: the samples table is empty: nothing to score (check the ingest's input)"
        return (
            f"score: {self.processed} samples in {self.seconds:.1f} s ({self.samples_per_second:.2f} samples/s): "
            f"{self.scored} scored ({self.rows} feedback rows), {self.rejected} rejected; "
            f"{self.skipped_done} already done. Output: {self.scored_samples}/{self.samples_total} samples scored, "
            f"{self.feedback_rows} feedback rows, {self.rejected_samples} rejected" + (f" ({codes})" if codes else "")
            + (f", {self.ingest_rejected} rejected at ingest" if self.ingest_rejected else "")
            + f"; router inputs {self.router_bytes_per_sample / 1e6:.3f} MB/sample"
        )


@dataclass
class BatchResult:
    """What one scorer call returns to the driver (its batch is committed when this exists)."""

    part: str
    samples: int
    scored: int
    rows: int
    errors: int
    visual_tokens: int
    router_bytes: int
    seconds: float
    node_id: str | None
    index: pa.Table  # INDEX_SCHEMA rows of the batch


# --------------------------------------------------------------------------------------
# Stage 1: read
# --------------------------------------------------------------------------------------


def select_pending(batch: pa.Table, *, skip: set[str], partial: dict[str, list[int]], levels: list[int]) -> pa.Table:
    """Drop samples already done; add ``levels``: the levels still to score for each sample."""
    ids = batch.column("sample_id").to_pylist()
    keep = [sid not in skip for sid in ids]
    batch = batch.filter(pa.array(keep, type=pa.bool_()))
    wanted = [partial.get(sid, levels) for sid, k in zip(ids, keep, strict=True) if k]
    return batch.append_column(pa.field("levels", pa.list_(pa.int32())), pa.array(wanted, type=pa.list_(pa.int32())))


@dataclass
class Plan:
    """Which samples the run sends: per samples file, a mask of pending rows."""

    files: list[Path]
    masks: list[np.ndarray]
    partial: dict[str, list[int]]
    image_roots: dict[str, str]  # image_root as stored -> the absolute folder to read from
    total: int = 0
    pending: int = 0

    @property
    def skipped(self) -> int:
        return self.total - self.pending


def plan_run(run_dir: Path, index: RunIndex, levels: list[int], log: Callable[[str], None]) -> Plan:
    """Pending samples from the index: reads the samples' ``sample_id`` / ``image_root`` columns once."""
    samples_dir = run_dir / "samples"
    files = sorted(samples_dir.glob("*.parquet")) if samples_dir.is_dir() else []
    if not files:
        raise MissingSamples(f"{samples_dir}: no samples. Run `rglf ingest DATA.json --image-root DIR --run {run_dir}` first")
    done, partial = index.done(levels)
    tables = [pq.ParquetFile(f).read(columns=["sample_id", "image_root"]) for f in files]
    ids = pa.chunked_array([t.column("sample_id").combine_chunks() for t in tables], pa.string())
    everything = np.ones(len(ids), dtype=bool) if len(done) == 0 else ~np.asarray(
        pc.is_in(ids, value_set=done).to_numpy(zero_copy_only=False), dtype=bool)
    masks, roots = [], set()
    offset = 0
    for t in tables:
        mask = everything[offset : offset + t.num_rows]
        offset += t.num_rows
        masks.append(mask)
        if mask.any():
            pending_roots = t.column("image_root").filter(pa.array(mask))
            roots.update(r for r in pc.unique(pending_roots).to_pylist() if r is not None)
    total, pending = len(ids), int(everything.sum())
    image_roots = {}
    for root in sorted(roots):
        absolute = os.path.abspath(root)
        if not os.path.isabs(root):
            log(f"warning: the samples hold a relative image root {root!r} (an older ingest); reading it as {absolute}")
        if not os.path.isdir(absolute):
            raise ScoreRefused(
                f"{absolute}: the image root of the pending samples is not a folder here (not mounted?); nothing "
                f"was scored. Mount it, or re-ingest with the right --image-root (rglf ingest --force)"
            )
        image_roots[root] = absolute
    return Plan(files, masks, partial, image_roots, total, pending)


def pending_batches(plan: Plan, batch_size: int, levels: list[int]) -> Iterator[pa.Table]:
    """The pending samples, in input order, as tables of ``batch_size`` rows (+ ``levels``; roots absolute)."""
    carry: list[pa.Table] = []
    carried = 0
    for f, mask in zip(plan.files, plan.masks, strict=True):
        if not mask.any():
            continue
        pf = pq.ParquetFile(f)
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = [i for i in range(pf.num_row_groups) if mask[bounds[i] : bounds[i + 1]].any()]
        for group in groups:
            offset = int(bounds[group])
            for chunk in pf.iter_batches(batch_size=READ_ROWS, row_groups=[group]):
                m = mask[offset : offset + chunk.num_rows]
                offset += chunk.num_rows
                if not m.any():
                    continue
                table = pa.Table.from_batches([chunk]).filter(pa.array(m))
                ids = table.column("sample_id").to_pylist()
                table = table.append_column(pa.field("levels", pa.list_(pa.int32())), pa.array(
                    [plan.partial.get(sid, levels) for sid in ids], pa.list_(pa.int32())))
                if plan.image_roots:
                    roots = [None if r is None else plan.image_roots.get(r, r) for r in table.column("image_root").to_pylist()]
                    table = table.set_column(table.schema.get_field_index("image_root"), "image_root",
                                             pa.array(roots, pa.string()))
                carry.append(table)
                carried += table.num_rows
                while carried >= batch_size:
                    merged = pa.concat_tables(carry)
                    yield merged.slice(0, batch_size).combine_chunks()
                    rest = merged.slice(batch_size)
                    carry, carried = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if carried:
        yield pa.concat_tables(carry).combine_chunks()


# --------------------------------------------------------------------------------------
# Stages 3 + 4: score and write (one actor per model copy)
# --------------------------------------------------------------------------------------


def ensure_router_side(lmm, out: Path, router_inputs: str = "fp16") -> None:
    """Write ``out/router_side/`` once: into a private folder, then one atomic rename (first writer wins)."""
    target = Path(out) / "router_side"
    if (target / "router_side.json").exists():
        return
    staging = Path(out) / f".router_side-{os.getpid()}-{time.time_ns()}"
    save_router_side(lmm, staging, router_inputs)  # + the frozen vision tower for --router-inputs pixels
    try:
        os.rename(staging, target)  # atomic; fails if another actor got there first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def quiet_libraries(verbose: bool) -> None:
    """Silence transformers' progress bars and warnings in this process unless ``verbose``."""
    if verbose:
        return
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class Scorer:
    """Stages 3 + 4: one frozen LMM, a batch per call (a Ray actor through ``ScorerActor``)."""

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
        verbose: bool = True,
        router_inputs: str = "fp16",
        template: str = "auto",
    ):
        import torch

        from rglf.model.lmm import FrozenLMM
        from rglf.model.provenance import known_files

        quiet_libraries(verbose)
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
        self.model = model
        self.node_id = _node_id()
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.encode_batch = encode_batch
        self.router_inputs = router_inputs
        ensure_router_side(self.lmm, self.out, router_inputs)

    def __call__(self, batch: pa.Table) -> BatchResult:
        """Score and commit one batch (rows with ``pixels`` from ``load_images``)."""
        import torch

        start = time.perf_counter()
        rows = batch.drop_columns(["pixels"]).to_pylist()
        if not rows:
            return BatchResult("", 0, 0, 0, 0, 0, 0, 0.0, self.node_id, batch_index("", *_empty_tables()))
        with torch.inference_mode():
            feedback, router, errors = self.score(rows, batch.column("pixels"))
        key = batch_key(r["sample_id"] for r in rows)
        tables = (
            pa.Table.from_pylist(feedback, schema=FEEDBACK_SCHEMA),
            pa.Table.from_pylist(router, schema=ROUTER_INPUTS_SCHEMA),
            pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA),
        )
        stat = write_batch(self.out, key, *tables)
        return BatchResult(
            part=key,
            samples=len(rows),
            scored=len({r["sample_id"] for r in feedback}),
            rows=len(feedback),
            errors=len(errors),
            visual_tokens=sum(r["n_visual_tokens"] for r in feedback),
            router_bytes=sum(row_nbytes(r) for r in router),
            seconds=time.perf_counter() - start,
            node_id=self.node_id,
            index=batch_index(key, *tables, stat),
        )

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
            row = encode_row(  # --router-inputs: fp16 / fp8 features, the image reference (pixels), or None
                self.router_inputs, sample_id=rows[i]["sample_id"], vision=enc.vision, grid=lmm.grid,
                instruction_ids=lmm.instruction_ids(convs[i]), image_size=enc.image_size,
                image=rows[i]["image"], image_root=rows[i]["image_root"],
            )
            if row is not None:
                router.append(row)
        return feedback, router, errors



def _empty_tables() -> tuple[pa.Table, pa.Table, pa.Table]:
    return FEEDBACK_SCHEMA.empty_table(), ROUTER_INPUTS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table()


class ScorerActor(Scorer):
    """``Scorer`` as a Ray actor: construction errors are kept and re-raised by ``ping`` (typed, one line)."""

    def __init__(self, **kwargs: Any):
        self.init_error: BaseException | None = None
        try:
            super().__init__(**kwargs)
        except Exception as err:  # noqa: BLE001 -- re-raised by ping() in the driver
            self.init_error = err

    def ping(self) -> str | None:
        """The actor's node once it is ready; raises what ``__init__`` raised."""
        if self.init_error is not None:
            raise self.init_error
        return self.node_id

    def score_batch(self, batch: pa.Table, load_kwargs: dict | None = None) -> BatchResult:
        """One batch: its images are already loaded (an image task's output), or loaded here when ``load_kwargs``."""
        if load_kwargs is not None:
            batch = load_images_quietly(batch, **load_kwargs)
        return self(batch)


def load_images_quietly(batch: pa.Table, *, verbose: bool = False, **kwargs: Any) -> pa.Table:
    """``pipeline.images.load_images`` as a Ray task (library chatter off unless ``verbose``)."""
    from .images import load_images

    quiet_libraries(verbose)
    return load_images(batch, **kwargs)


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def resolve_model(model: Path, ladder_spec: str | None, known: dict | None = None):
    """(model_id, Ladder) of a checkpoint without loading its weights (the driver needs no GPU).

    ``known``: the run folder's ``run.json`` ``model_files`` (cached per-file hashes).
    """
    from rglf.model.lmm import ModelLoadError, checkpoint_fingerprint
    from rglf.model.scaler import Ladder

    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model} is not an HF checkpoint folder (no config.json); convert an original "
                             "LLaVA layout with `rglf convert`")
    try:
        vc = json.loads(config_path.read_text())["vision_config"]
        grid = int(vc["image_size"]) // int(vc["patch_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{config_path}: no usable vision_config image_size / patch_size ({err})") from None
    return checkpoint_fingerprint(model, known=known), Ladder.parse(ladder_spec, grid)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prepare_output(cfg: ScoreConfig, model_id: str, ladder, log, template: str | None = None) -> dict | None:
    """Check the folder's provenance (refuse a different model/ladder/template/router inputs) or, with
    ``force``, move old outputs aside.

    Returns the previous ``run.json`` (None when starting fresh).
    """
    out = cfg.run_dir
    run_json = out / "run.json"
    ours = [out / "feedback", out / "router_inputs", out / "router_side", out / INDEX_DIR]
    has_outputs = any(part_files(out, t) for t in TABLES) or (out / "router_side").exists()
    previous = json.loads(run_json.read_text()) if run_json.exists() else None
    if cfg.force and (previous is not None or has_outputs or (out / INDEX_DIR).exists()):
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
        if previous.get("config", {}).get("router_inputs", "fp16") != cfg.router_inputs:
            problems.append(f"router inputs {previous.get('config', {}).get('router_inputs', 'fp16')} -> {cfg.router_inputs}")
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
                "(the old outputs are moved to RUN/.replaced-<time>/)"
            )
    elif has_outputs:
        raise ScoreRefused(f"{out} holds scoring outputs but no run.json (unknown model/ladder); use --force to start fresh")
    return previous


def _ingest_rejected(out: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in sorted((out / "errors").glob("ingest-*.parquet")))


def _record(cfg: ScoreConfig, record: dict) -> None:
    write_text_atomic(cfg.run_dir / "run.json", json.dumps(record, indent=2) + "\n")


def run_score(cfg: ScoreConfig, log: Callable[[str], None] = print,
              progress: Callable[[int, int | None, dict | None], None] | None = None) -> ScoreReport:
    """Run the job (see the module docstring); returns the report also saved in ``run.json``.

    ``log`` gets informational lines and the final summary; ``progress(done, total, fields)`` is
    called after every committed batch (``done`` / ``total``: samples of this run).
    """
    if not (cfg.run_dir / "samples").is_dir():  # before the lock: a mistyped --run creates no folder
        raise MissingSamples(f"{cfg.run_dir / 'samples'}: no samples. Run `rglf ingest DATA.json --image-root DIR "
                             f"--run {cfg.run_dir}` first")
    with RunLock.acquire(cfg.run_dir, "rglf score") as lock:
        if lock.previous:
            log(describe_holder(lock.previous))
        return _run_locked(cfg, log, progress)


def _run_locked(cfg: ScoreConfig, log, progress) -> ScoreReport:
    from rglf.model.provenance import checkpoint_identity, known_files, new_run_id

    started = _now()
    known = known_files(cfg.run_dir)  # cached per-file hashes: a resumed run does not re-hash the checkpoint
    model_id, ladder = resolve_model(cfg.model, cfg.ladder, known=known)
    from rglf.model.conversation import resolve_template

    template, template_source = resolve_template(cfg.model, cfg.template)
    previous = prepare_output(cfg, model_id, ladder, log, template)
    t_plan = time.perf_counter()
    index = RunIndex.load(cfg.run_dir)
    plan = plan_run(cfg.run_dir, index, list(ladder.tokens), log)
    report = ScoreReport(samples_total=plan.total, skipped_done=plan.skipped, removed_leftovers=len(index.removed),
                         parts_indexed=index.parts_read, planning_seconds=time.perf_counter() - t_plan)
    if index.removed:
        log(f"removed {len(index.removed)} uncommitted leftovers of an interrupted run")

    history = (previous or {}).get("history", [])
    for entry in history:  # an entry still "running" is a run that died without recording (we hold its lock)
        if entry.get("status") == "running":
            entry.update(status="interrupted", ended="killed (found still running, its lock released)")
    this_run: dict[str, Any] = {"started": started, "status": "running", "pending_at_start": plan.pending}
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
    _record(cfg, record)
    if not plan.total:
        log("warning: the samples table is empty: nothing to score")
    log(
        f"score: {report.samples_total} samples, {report.skipped_done} already done, {plan.pending} to score; "
        f"model {model_id}, ladder {','.join(map(str, ladder.tokens))}, template {template}"
    )

    def stop(status: str, **details: Any) -> None:
        index.flush()
        this_run.update(status=status, finished=_now(), processed=report.processed, scored=report.scored,
                        rejected=report.rejected, rows=report.rows, batches=report.batches, **_perf(report), **details)
        record["status"] = status
        _record(cfg, record)

    t0 = time.perf_counter()
    try:
        if plan.pending:
            _score_pending(cfg, model_id, ladder, plan, index, report, log, progress, template)
        elif not (cfg.run_dir / "router_side" / "router_side.json").exists() and plan.total:
            from rglf.model.lmm import FrozenLMM  # rare: every sample done but router_side deleted

            log("router_side/ missing: loading the model on this machine (CPU) to write it")
            ensure_router_side(FrozenLMM.from_pretrained(cfg.model, ladder=ladder.spec, template=template), cfg.run_dir,
                               cfg.router_inputs)
    except KeyboardInterrupt:
        report.seconds = time.perf_counter() - t0
        stop("interrupted", seconds=round(report.seconds, 3))
        left = plan.pending - report.processed
        raise ScoreInterrupted(
            f"interrupted after {report.batches} committed batches ({report.processed} samples) this run; they are "
            f"kept. A rerun of the same command scores the remaining {left}"
        ) from None
    except BaseException as err:
        stop("failed", error=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise
    report.seconds = time.perf_counter() - t0

    report.duplicates_removed = index.dedupe()
    if report.duplicates_removed:
        log(f"removed {report.duplicates_removed} duplicate rows (a batch committed twice under different names)")
    broken = index.check_router_inputs() if cfg.router_inputs != "none" else []  # feedback-only: none to check
    if broken:
        stop("failed", error="router inputs missing")
        raise RuntimeError(
            f"{len(broken)} committed batches had no router inputs (a killed job's worker raced this run); "
            "they were un-committed: rerun `rglf score` to redo them"
        )
    index.compact()
    for key, value in index.counts().items():
        setattr(report, key, value)
    report.ingest_rejected = _ingest_rejected(cfg.run_dir)
    done, _ = index.done(ladder.tokens)
    left = sum(int(np.count_nonzero(~np.asarray(pc.is_in(pq.read_table(f, columns=["sample_id"]).column("sample_id"),
                                                          value_set=done).to_numpy(zero_copy_only=False), dtype=bool)))
               for f in plan.files) if len(done) else plan.total
    if left:
        stop("failed", error=f"{left} samples neither scored nor rejected")
        raise RuntimeError(f"{left} samples were neither scored nor rejected; rerun `rglf score` to finish them")

    this_run.update(
        status="complete", finished=_now(), processed=report.processed, scored=report.scored,
        rejected=report.rejected, rows=report.rows, batches=report.batches, seconds=round(report.seconds, 3),
        samples_per_second=round(report.samples_per_second, 3), batches_by_node=report.batches_by_node,
        removed_leftovers=report.removed_leftovers, duplicates_removed=report.duplicates_removed, **_perf(report),
    )
    per_run = ("processed", "scored", "rejected", "rows", "batches", "batches_by_node", "seconds", "planning_seconds",
               "first_batch_seconds", "idle_share", "images_in_actor", "requeued_batches", "parts_indexed")
    record.update(
        status="complete",
        counts={k: v for k, v in asdict(report).items() if k not in per_run},
        router_inputs={
            "bytes_per_sample_mean": report.router_bytes_per_sample,
            "mode": cfg.router_inputs,
            "formula": BYTES_FORMULA[cfg.router_inputs],
        },
        exit_code=report.exit_code,
    )
    _record(cfg, record)
    log(report.summary())
    return report


def fold_result(result: BatchResult, report: ScoreReport, index: RunIndex,
                progress: Callable[[int, int | None, dict | None], None] | None, pending: int) -> None:
    """Account for one committed batch: its index rows, the run's counters, the progress display."""
    index.append(result.index)
    index.maybe_flush()
    report.batches += 1
    node = result.node_id or "?"
    report.batches_by_node[node] = report.batches_by_node.get(node, 0) + 1
    report.processed += result.samples
    report.scored += result.scored
    report.rows += result.rows
    report.rejected += result.errors
    if progress is not None:
        progress(report.processed, pending, {"rejected": report.rejected})


def _perf(report: ScoreReport) -> dict[str, Any]:
    """The run's timing figures for its history entry."""
    return {
        "planning_seconds": round(report.planning_seconds, 3), "parts_indexed": report.parts_indexed,
        "first_batch_seconds": None if report.first_batch_seconds is None else round(report.first_batch_seconds, 3),
        "idle_share": None if report.idle_share is None else round(report.idle_share, 4),
        "images_in_actor": report.images_in_actor, "requeued_batches": report.requeued_batches,
    }


def _score_pending(cfg: ScoreConfig, model_id: str, ladder, plan: Plan, index: RunIndex, report: ScoreReport,
                   log, progress, template: str = "auto") -> None:
    """Start Ray and the actors, stream the pending batches, fold each committed batch into ``report``."""
    import ray

    from .job import ResourcesUnavailable, ScoringPool, connect, plan_placement

    verbose = cfg.progress
    t_start = time.perf_counter()
    ours = not ray.is_initialized()  # a Ray we start (even half-way, when Ctrl-C hits ray.init) we shut down
    try:
        connect(
            address=cfg.address, num_cpus=cfg.num_cpus,
            need_cpus=cfg.workers * cfg.cpus_per_worker + max(cfg.image_cpus, 0.5),
            object_store_mb=cfg.object_store_mb, temp_dir=cfg.ray_temp_dir, verbose=verbose, log=log,
        )
    except BaseException:
        if ours and ray.is_initialized():
            ray.shutdown()
        raise
    remote = bool(cfg.address or os.environ.get("RAY_ADDRESS"))
    need = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker, **cfg.worker_resources}
    pool = None
    try:
        deadline = time.monotonic() + (cfg.placement_timeout if remote else 0.0)
        while True:
            placement = plan_placement(need, cfg.workers, cfg.image_cpus, cfg.device)
            if placement.actors >= cfg.workers or time.monotonic() >= deadline:
                break
            time.sleep(2.0)  # a cluster that may grow (autoscaler): re-check for a while
        if placement.actors < cfg.workers:
            more = f"; it can host {placement.actors}" if placement.actors else ""
            raise ResourcesUnavailable(
                f"{placement.detail}{more}: --workers {cfg.workers} can never all be placed. Lower --workers / "
                "--cpus-per-worker / --gpus-per-worker, or add nodes"
                if placement.actors else f"{placement.detail}. Lower the per-worker resources or use another cluster"
            )
        if placement.images_in_actor:
            log("no CPU is left beside the scorer actors for image tasks: images are loaded inside the actors")
        report.images_in_actor = placement.images_in_actor
        load_kwargs = {"model": str(cfg.model), "max_aspect": "auto" if cfg.max_aspect is None else cfg.max_aspect,
                       "min_side": cfg.min_side}
        pool = ScoringPool(
            ScorerActor,
            {"model": str(cfg.model), "out": str(cfg.run_dir), "device": cfg.device, "dtype": cfg.dtype,
             "ladder": ladder.spec, "model_id": model_id, "max_batch_tokens": cfg.max_batch_tokens,
             "max_batch_size": cfg.max_batch_size, "encode_batch": cfg.encode_batch, "verbose": verbose,
             "router_inputs": cfg.router_inputs, "template": template},
            load_images_quietly, {**load_kwargs, "verbose": verbose},
            workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=cfg.gpus_per_worker,
            worker_resources=cfg.worker_resources, image_cpus=cfg.image_cpus,
            images_in_actor=placement.images_in_actor, prefetch=cfg.prefetch, log=log,
        )
        if progress is not None:
            progress(0, plan.pending, {"rejected": 0})

        def on_result(result: BatchResult) -> None:
            if report.first_batch_seconds is None:
                report.first_batch_seconds = time.perf_counter() - t_start
            fold_result(result, report, index, progress, plan.pending)

        def unplaceable() -> str | None:
            p = plan_placement(need, 1, cfg.image_cpus, cfg.device)
            return None if p.actors else p.detail

        pool.run(pending_batches(plan, cfg.batch_size, list(ladder.tokens)), on_result,
                 unplaceable=unplaceable, placement_timeout=cfg.placement_timeout if remote else 0.0)
    finally:
        if pool is not None:
            stats = pool.finish()  # also on Ctrl-C: the interrupted run records its figures too
            report.idle_share = stats.idle_share
            report.requeued_batches = stats.requeued
            pool.shutdown()
        if ours:
            ray.shutdown()
