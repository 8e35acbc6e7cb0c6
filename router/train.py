"""Router trainer: fit ``GranularityRouter`` from the feedback tables, decoupled from the LMM.

Per step (SPEC "RGLF losses"; the reference instead runs the 7B LMM five times per step):

    index (router.data: labels + locations, polars) ... a background thread, ahead of the step:
      router_inputs row groups of the epoch's shuffled windows -> decode (fp16 / fp8; pixels:
      the frozen vision tower) -> RouterSide.project (frozen) -> instruction ids -> RouterSide.embed
      -> GranularityRouter.prepare (pooling, text filter; no parameters)
    ... the step:
      -> GranularityRouter.forward_prepared logits (B, N)
      -> rglf_loss(logits, nll, order): adaptive ranking + CE, order = the SQL ranking
      -> AdamW, linear warmup then cosine decay to 0, gradient clipping

Published setting (the defaults of ``TrainConfig``): m = 1, w_rank = 1, w_ce = 0.1, AdamW
lr 1e-3, weight decay 0, warmup 3%, cosine decay, 1 epoch, global batch 128, k = 32.

Global batch semantics: step ``s`` of an epoch trains on positions ``[s*B, (s+1)*B)`` of the
epoch's global sample sequence (``router.data.SampleStream``: shuffled windows of row groups),
whatever the number of workers. Each worker reads only its own row groups (dealt round-robin
per window) and trains on the step's samples that live there, in micro-batches (gradient
accumulation); every micro-batch loss is weighted by its share of the global batch, and the
workers' gradients are summed, so the update is the global batch's mean gradient whatever the
split (up to float summation order and dropout draws). Memory does not grow with the data: the
trainer holds the index (~170 bytes per sample) and one or two shuffle windows of payload.

Engines: one process (CPU, or one GPU with bf16 autocast), or Ray Train's ``TorchTrainer``
(``num_workers > 1``; one process per GPU or CPU slot, torch.distributed set up by Ray). The
workers' gradients are summed with ONE coalesced ``all_reduce`` after accumulation rather
than through DDP: a worker's share of a step varies (it may even be empty), and DDP would need
every worker to run the same number of forward passes.

Resume is exact: a checkpoint records the step and the stream position (epoch, step in epoch,
samples done, and the order's parameters: seed, batch, shuffle buffer, training-set size); a
resumed run re-derives the window and offset from the index, and trains on exactly the
samples an uninterrupted run would have from there (the dropout draws too: they are seeded per
step). A run whose order parameters differ from the checkpoint's is refused (``--force``
starts over).

Outputs in ``out/`` (a router folder, loadable with ``model.router.load_router``)::

    router.safetensors, router_config.json   the final router (save_router)
    train_config.json                        the resolved TrainConfig
    metrics.json                             history (loss, lr, validation agreement), summary
    checkpoints/step-00000264/               router + optimiser/scheduler state + stream position,
    checkpoints/latest                       every ``checkpoint_every`` steps; a rerun resumes here

The output folder must be on a filesystem every worker sees (one machine: any folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rglf.model.lmm import RouterSide
from rglf.model.rglf import RGLF_LOSSES, rglf_loss
from rglf.model.router import (
    MERGER_AXES,
    VOTER_INITS,
    GranularityRouter,
    RouterConfig,
    load_router,
    save_router,
)
from rglf.router.data import (
    DEFAULT_PREFETCH,
    DEFAULT_SHUFFLE_BUFFER,
    RouterData,
    RouterDataError,
    SampleStream,
    iter_batches,
    iter_steps,
    load_router_data,
)
from rglf.router.preflight import TrainRefused  # also a resume that would not be exact (router config, order)

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
PROGRESS_FILE = ".train-progress.json"  # Ray workers -> driver (see _ProgressFile)
PROGRESS_FILE_KEY = "_progress_file"
Progress = Callable[[int, "int | None", "dict[str, Any] | None"], None]


def parse_levels(levels: str | Any | None) -> tuple[int, ...] | None:
    """``"36,144,576"`` / ``[36, 144, 576]`` -> ``(36, 144, 576)``; None stays None."""
    if levels is None:
        return None
    items = levels.replace(" ", "").split(",") if isinstance(levels, str) else list(levels)
    out = tuple(sorted(int(t) for t in items if str(t) != ""))
    if len(out) < 2 or len(set(out)) != len(out) or min(out) <= 0:
        raise ValueError(f"levels must be at least 2 distinct positive token counts, got {levels!r}")
    return out


@dataclass
class TrainConfig:
    """``rglf train``: fit the router from ranking + router-input tables."""

    run: Path
    """Scoring output folder: ``router_inputs/``, ``router_side/`` (and ``run.json``)."""
    rank: Path
    """Ranking output folder: ``rankings/`` (and ``rank_report.json``)."""
    out: Path
    """Router folder to write: weights + config, train_config.json, metrics.json, checkpoints/."""
    epochs: int = 1
    """Passes over the training split (published: 1; a ~2k-sample toy run wants more)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in all (None: ``epochs`` full passes)."""
    batch_size: int = 128
    """Global batch (samples per optimiser step, all workers together; published: 128)."""
    micro_batch_size: int = 32
    """Samples per forward/backward pass on one worker (gradient accumulation up to the batch)."""
    lr: float = 1e-3
    """AdamW peak learning rate (published: 1e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay (published: 0)."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the steps (published: 3%), then cosine decay to 0."""
    grad_clip: float = 1.0
    """Max global gradient norm (1.0: the HF Trainer default the reference ran with); 0 = off."""
    loss: str = "rank+ce"
    """'rank+ce' (the paper), 'rank' or 'ce' (its ablations)."""
    margin_scale: float = 1.0
    """m of the adaptive margin m * j * (nll_worse - nll_better) (published: 1)."""
    w_rank: float = 1.0
    """Weight of the ranking loss (published: 1)."""
    w_ce: float = 0.1
    """Weight of the cross-entropy loss (published: 0.1)."""
    levels: tuple[int, ...] | None = None
    """Ladder subset by tokens per crop, e.g. (36, 144, 576): labels re-ranked within it. None: all."""
    image_only: bool = False
    """The paper's image-only ablation (RouterConfig.use_text=False): no instruction tokens."""
    top_k: int = 32
    """Instruction tokens kept by the text filter (published: 32)."""
    merger_attends: str = "crops"
    """Merger attention axis: 'crops' (the reference's computation) or 'tokens' (the paper's prose)."""
    voter_init: str = "balanced"
    """Voter init (only the starting values; the parameter is the reference's): 'balanced'
    (default: the image and the instruction start with half of the vote each), 'mean' (1/L at
    every position) or 'normal' (N(0, 1), the reference's). With 'mean' the 32 text slots hold
    32/1148 = 3% of the vote, and on the embedded default, where only the question says which
    level is best, the image's token-level variation drowned them: the router collapsed to one
    level (22-27% validation agreement after 4 epochs, any lr or batch tried); 'balanced'
    reached 85-92% in the same budget. 'normal' gives each slot a random sign, so a word's
    evidence flips with the slot the text filter puts it in (37% there)."""
    dropout: float = 0.1
    """Merger dropout (PyTorch's default, kept by the reference)."""
    seed: int = 0
    """Seeds the router init, the shuffling and the dropout draws (resume is step-exact)."""
    val_fraction: float = 0.1
    """Hash-split share of validation samples when the tables record no 'val' split."""
    test_fraction: float = 0.1
    """Hash-split share of test samples for samples whose split is missing."""
    eval_every: int = 0
    """Validate every N steps (0: at the end of every epoch); always after the last step."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: at the end of every epoch); always after the last step."""
    keep_checkpoints: int = 1
    """How many step checkpoints to keep (the newest)."""
    resume: bool = True
    """Resume from ``out/checkpoints/latest`` when it exists, if ``out`` was trained with the same
    settings (else refused, see ``router/preflight.py``). False: start fresh, as ``force``."""
    force: bool = False
    """Start fresh even when ``out`` was trained with other settings: its previous router outputs
    (weights, configs, metrics, checkpoints, eval files) are moved to ``out/.replaced-<UTC time>/``."""
    num_workers: int = 1
    """1: train in this process. >1: Ray Train TorchTrainer with that many workers."""
    use_gpu: bool = False
    """Ray workers each take a GPU (num_workers > 1)."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray worker reserves (num_workers > 1)."""
    ray_address: str | None = None
    """Ray cluster to join (num_workers > 1); None: RAY_ADDRESS if set, else a new local instance."""
    device: str = "auto"
    """Single-process device: 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1' ..."""
    threads: int | None = None
    """torch CPU threads per process (None: torch's default; Ray sets 1 per CPU slot)."""
    eval_batch_size: int = 64
    """Samples per forward pass during validation."""
    progress: bool = True
    """Report progress to the ``progress`` callback of ``train_router`` (rank 0 only; the CLI
    draws it); False: no progress calls."""
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    """Samples per shuffle window: row groups are shuffled, then a window of at least this many
    samples is permuted as a whole. Memory holds about two windows of router inputs (x bytes per
    sample); several row groups per worker per window keep the workers' shares of a step even."""
    prefetch: int = DEFAULT_PREFETCH
    """Steps read, decoded and prepared ahead by the background data thread (0: in the loop)."""
    record_samples: bool = False
    """Record every step's sample ids in the history (metrics.json; audits and the resume test)."""

    def __post_init__(self) -> None:
        self.run, self.rank, self.out = Path(self.run), Path(self.rank), Path(self.out)
        self.levels = parse_levels(self.levels)
        positive = ("epochs", "batch_size", "micro_batch_size", "num_workers", "top_k", "eval_batch_size",
                    "keep_checkpoints", "shuffle_buffer")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        self.micro_batch_size = min(self.micro_batch_size, self.batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "margin_scale", "w_rank", "w_ce", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) with a sum below 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in RGLF_LOSSES:
            raise ValueError(f"loss must be one of {RGLF_LOSSES}, got {self.loss!r}")
        if self.merger_attends not in MERGER_AXES:
            raise ValueError(f"merger_attends must be one of {MERGER_AXES}, got {self.merger_attends!r}")
        if self.voter_init not in VOTER_INITS:
            raise ValueError(f"voter_init must be one of {VOTER_INITS}, got {self.voter_init!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("run", "rank", "out"):
            data[key] = str(data[key])
        data["levels"] = list(self.levels) if self.levels is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**data)

    def router_config(self, hidden_size: int, ladder_spec: str, grid: int) -> RouterConfig:
        return RouterConfig(
            hidden_size=hidden_size,
            ladder=ladder_spec,
            grid=grid,
            top_k=self.top_k,
            dropout=self.dropout,
            use_text=not self.image_only,
            merger_attends=self.merger_attends,
            voter_init=self.voter_init,
        )


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (HF's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule(cfg: TrainConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps)."""
    per_epoch = math.ceil(n_train / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    return per_epoch, total, math.ceil(cfg.warmup_ratio * total)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---- checkpoints -----------------------------------------------------------------------------


def latest_checkpoint(out: Path) -> Path | None:
    marker = Path(out) / CHECKPOINTS / "latest"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def save_checkpoint(cfg: TrainConfig, router, opt, sched, step: int, history: list[dict],
                    stream: dict[str, Any]) -> Path:
    """``checkpoints/step-N/`` (router, optimiser, scheduler, history, stream position), then ``latest`` -> it."""
    root = cfg.out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_router(tmp, router)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}, tmp / TRAINER_STATE)
    _write_json(tmp / "state.json", {"step": step, "stream": stream, "history": history})
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    (root / ".latest.tmp").write_text(name + "\n")
    os.replace(root / ".latest.tmp", root / "latest")  # the switch is atomic
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


# ---- the loop (one worker) -------------------------------------------------------------------


def _all_reduce_(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum the workers' gradients with one coalesced all_reduce (each already weighted 1/global batch)."""
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    _all_reduce_(flat, world)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _forward_loss(cfg: TrainConfig, router, batch, device: torch.device):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = router.forward_prepared(batch.prepared)
    loss, parts = rglf_loss(
        logits.float(), batch.nll, batch.order,
        margin_scale=cfg.margin_scale, w_rank=cfg.w_rank, w_ce=cfg.w_ce, loss=cfg.loss,
    )
    return logits, loss, parts


@torch.no_grad()
def validate(cfg: TrainConfig, router, data: RouterData, side: RouterSide, idx: np.ndarray, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """Loss and top-1 agreement with the oracle on ``idx`` (each worker streams its row groups; summed)."""
    router.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, agreements, n
    for batch in iter_batches(data, idx, side, batch_size=cfg.eval_batch_size, rank=rank, world=world,
                              device=device, router=router, prefetch_depth=cfg.prefetch):
        logits, loss, _ = _forward_loss(cfg, router, batch, device)
        n = len(batch)
        sums += torch.tensor([float(loss) * n, float((logits.argmax(-1) == batch.order[:, 0]).sum()), n], dtype=torch.float64)
    router.train()
    _all_reduce_(sums, world)
    n = max(1.0, float(sums[2]))
    return {"val_loss": float(sums[0]) / n, "val_agreement": float(sums[1]) / n, "n_val": int(sums[2])}


class _ProgressFile:
    """Ray workers cannot call the driver's callback: rank 0 writes its progress to a small JSON
    file in the router folder (atomically, at most twice a second, always the last step) and
    the driver polls it (``_poll_progress``)."""

    def __init__(self, path: Path, every: float = 0.5):
        self.path, self.every, self.last = Path(path), every, 0.0

    def __call__(self, done: int, total: int | None, fields: dict[str, Any] | None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and (total is None or done < total):
            return
        self.last = now
        _write_json(self.path, {"done": done, "total": total, "fields": fields or {}})


def _poll_progress(path: Path, callback: Progress, stop) -> None:
    seen = None
    while True:
        finished = stop.wait(0.5)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        if state is not None and state != seen:
            seen = state
            callback(state["done"], state["total"], state["fields"])
        if finished:
            return


def _order_params(cfg: TrainConfig, stream: SampleStream) -> dict[str, Any]:
    """What fixes the sample order: a resume is exact only if these equal the checkpoint's."""
    return {"seed": cfg.seed, "batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer,
            "n_train": stream.n, "row_groups": len(stream.units)}


def _progress_fields(loss: float | None, val: dict[str, Any]) -> dict[str, str]:
    """The fields shown next to the bar: the last step's loss and the last validation agreement
    (each left out until there is one)."""
    fields = {} if loss is None else {"loss": f"{loss:.4f}"}
    if "val_agreement" in val:
        fields["val agree"] = f"{val['val_agreement']:.3f}"
    return fields


def train_loop(
    cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on one worker of ``world`` (1: alone). Rank 0 writes every output and reports
    ``progress(step, total, {"loss", "val agree"})`` when ``cfg.progress``. Returns the metrics."""
    device = device if device is not None else resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    data = load_router_data(
        cfg.run, cfg.rank, splits=("train", "val"), levels=cfg.levels,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
    )
    train_idx, val_idx = data.indices("train"), data.indices("val")
    if len(train_idx) == 0:
        raise RouterDataError(f"no training samples in {cfg.rank} (splits found: {sorted(set(data.split))})")
    side = RouterSide.load(cfg.run / "router_side").to(device)
    if side.meta["vision_hidden"] != data.vision_hidden:
        raise RouterDataError(
            f"router_side projects {side.meta['vision_hidden']}-wide features, router inputs are {data.vision_hidden}"
        )
    router_cfg = cfg.router_config(int(side.meta["hidden"]), data.ladder.spec, data.grid)
    stream = SampleStream(data, train_idx, batch_size=cfg.batch_size, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer, rank=rank, world=world)

    torch.manual_seed(cfg.seed)
    router = GranularityRouter(router_cfg).to(device)
    params = [p for p in router.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch, total, warmup = schedule(cfg, len(train_idx))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    order = _order_params(cfg, stream)

    step, history = 0, []
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is not None:
        saved = load_router(ckpt, device)
        if saved.config.to_dict() != router_cfg.to_dict():
            raise TrainRefused(
                f"{ckpt} holds a router with config {saved.config.to_dict()}, this run builds "
                f"{router_cfg.to_dict()}: use another --out, or --force (--no-resume) to start over"
            )
        state_json = json.loads((ckpt / "state.json").read_text())
        saved_order = (state_json.get("stream") or {}).get("order")
        if saved_order is not None and saved_order != order:
            raise TrainRefused(
                f"{ckpt} was trained with sample order {saved_order}, this run has {order}: resuming would not "
                "see each sample exactly as often; use the same settings, another --out, or --force to start over"
            )
        router.load_state_dict(saved.state_dict())
        state = torch.load(ckpt / TRAINER_STATE, map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        history = state_json["history"]
    elif rank == 0 and (cfg.out / CHECKPOINTS).exists():
        shutil.rmtree(cfg.out / CHECKPOINTS)  # resume=False: an old run's checkpoints must not be picked up later
    if rank == 0 and not (cfg.out / TRAIN_CONFIG).exists():  # never rewrite the config of existing weights
        cfg.out.mkdir(parents=True, exist_ok=True)
        _write_json(cfg.out / TRAIN_CONFIG, cfg.to_dict())

    eval_every = cfg.eval_every or per_epoch
    ckpt_every = cfg.checkpoint_every or per_epoch
    router.train()
    start_step, t_loop = step, time.perf_counter()
    trained_local = 0
    val = next((h for h in reversed(history) if "val_agreement" in h), {})
    report = progress if (progress is not None and cfg.progress and rank == 0) else None
    if report is not None and step:  # resumed: show where it starts
        report(step, total, _progress_fields(None, val))
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        steps = iter_steps(stream, epoch, side, micro_batch_size=cfg.micro_batch_size, start_step=pos,
                           device=device, router=router, prefetch_depth=cfg.prefetch)
        try:
            for sb in steps:
                opt.zero_grad(set_to_none=True)
                sums = torch.zeros(3, dtype=torch.float64)  # loss, rank, ce; each a share of the global mean
                for m, batch in enumerate(sb.micro):
                    torch.manual_seed(cfg.seed * 1_000_003 + step * 7_919 + rank * 131 + m)  # dropout: step-exact resume
                    _, loss, parts = _forward_loss(cfg, router, batch, device)
                    share = len(batch) / sb.global_size  # summed over micro-batches and workers: the global mean
                    (loss * share).backward()
                    sums += torch.tensor([float(loss.detach()), float(parts["rank"]), float(parts["ce"])],
                                         dtype=torch.float64) * share
                trained_local += sb.n
                _sync_grads(params, world)
                _all_reduce_(sums, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                record = {"step": step, "epoch": round(step / per_epoch, 4), "lr": lr, "loss": float(sums[0]),
                          "rank_loss": float(sums[1]), "ce_loss": float(sums[2]), "samples": sb.global_size}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if cfg.record_samples:
                    mine = [data.sample_ids[i] for b in sb.micro for i in b.index.tolist()]
                    record["sample_ids"] = sorted(x for part in _all_gather(mine, world) for x in part)
                if step % eval_every == 0 or step == total:
                    if len(val_idx):
                        val = validate(cfg, router, data, side, val_idx, rank, world, device)
                        record.update(val)
                history.append(record)
                if report is not None:
                    report(step, total, _progress_fields(record["loss"], val))
                if rank == 0 and (step % ckpt_every == 0 or step == total):
                    position = {**stream.position(step - epoch * per_epoch), "epoch": epoch, "order": order}
                    save_checkpoint(cfg, router, opt, sched, step, history, position)
                if step >= total:
                    break
        finally:
            steps.close()  # stops the data thread when the loop ends early (max_steps, an error)

    seconds = time.perf_counter() - t_loop
    trained = int(_all_reduce_(torch.tensor([trained_local], dtype=torch.float64), world)[0])
    last_val = next((h for h in reversed(history) if "val_agreement" in h), {})
    metrics = {
        "engine": "ray" if world > 1 else "local",
        "num_workers": world,
        "device": str(device),
        "steps": step,
        "steps_per_epoch": per_epoch,
        "warmup_steps": warmup,
        "resumed_from_step": start_step if ckpt is not None else None,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "ladder": list(data.ladder.tokens),
        "router_config": router_cfg.to_dict(),
        "data": {**data.info, "shuffle_buffer": cfg.shuffle_buffer, "row_groups": len(stream.units)},
        "final": {
            "train_loss": history[-1]["loss"] if history else None,
            "val_loss": last_val.get("val_loss"),
            "val_agreement": last_val.get("val_agreement"),
        },
        "train_seconds": round(seconds, 3),
        "samples_per_s": round(trained / seconds, 2) if seconds > 0 and trained else None,
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "history": history,
    }
    if rank == 0:
        save_router(cfg.out, router)
        _write_json(cfg.out / METRICS, metrics)
    return metrics


# ---- engines ---------------------------------------------------------------------------------


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: torch.distributed is already set up (gloo on CPU, NCCL on GPU)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    config = dict(config)
    progress_file = config.pop(PROGRESS_FILE_KEY, None)
    cfg = TrainConfig.from_dict(config)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    train_loop(cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
               progress=_ProgressFile(progress_file) if progress_file else None)


def _fit_interruptibly(trainer) -> None:
    """``trainer.fit()`` in a helper thread, so Ctrl-C reaches this (main) thread at once.

    On the main thread Ray Train installs its own SIGINT handler, which only asks the controller
    to abort gracefully (and ignored Ctrl-C for minutes while resources were pending). Here a
    KeyboardInterrupt propagates instead; the caller's ``ray.shutdown()`` stops the workers.
    """
    import threading

    outcome: dict[str, BaseException] = {}
    done = threading.Event()  # not Thread.join: a KeyboardInterrupt inside join can corrupt the thread state

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="rglf-train-fit", daemon=True).start()
    while not done.wait(0.2):
        pass
    if "error" in outcome:
        raise outcome["error"]


def train_with_ray(
    cfg: TrainConfig, *, object_store_memory: int = 100 * 1024**2, progress: Progress | None = None
) -> dict[str, Any]:
    """Ray Train ``TorchTrainer`` with ``num_workers`` workers; starts (and stops) a local Ray
    cluster unless one is already running in this process. ``progress``: relayed from rank 0
    through ``OUT/.train-progress.json`` (removed at the end)."""
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rglf.router.preflight import check_cluster_resources

    started = not ray.is_initialized()
    temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-") if started else None
    storage = tempfile.mkdtemp(prefix="/tmp/rglf-train-")
    verbose = os.environ.get("RGLF_VERBOSE") == "1"
    # absolute paths: Ray workers do not run in this process's working directory
    loop_config = {**cfg.to_dict(), **{k: str(getattr(cfg, k).resolve()) for k in ("run", "rank", "out")}}
    poller, stop = None, threading.Event()
    if progress is not None and cfg.progress:
        cfg.out.mkdir(parents=True, exist_ok=True)
        progress_file = cfg.out / PROGRESS_FILE
        progress_file.unlink(missing_ok=True)
        loop_config[PROGRESS_FILE_KEY] = str(progress_file)
        poller = threading.Thread(target=_poll_progress, args=(progress_file, progress, stop), daemon=True)
        poller.start()
    try:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        # workers' own output and Ray's INFO lines only with --verbose (errors still raise here)
        logs = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
        if started and address:
            ray.init(address=address, **logs)  # join a cluster (the folders must be shared)
        elif started:  # a new local instance, never another process's cluster on this machine
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, math.ceil(cfg.num_workers * cfg.cpus_per_worker)),
                object_store_memory=object_store_memory,
                _temp_dir=temp,
                include_dashboard=False,
                **logs,
            )
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
            ),
            run_config=RunConfig(name="rglf-router", storage_path=storage),
        )
        check_cluster_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)  # Ray would wait forever
        _fit_interruptibly(trainer)
    finally:
        stop.set()
        if poller is not None:
            poller.join()
            (cfg.out / PROGRESS_FILE).unlink(missing_ok=True)
        shutil.rmtree(storage, ignore_errors=True)
        if started:  # also after a failed start: stop whatever part of the cluster came up
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    return json.loads((cfg.out / METRICS).read_text())


def train_router(
    cfg: TrainConfig, progress: Progress | None = None, log: Callable[[str], None] = lambda _m: None
) -> dict[str, Any]:
    """Train (one process, or Ray Train when ``num_workers > 1``); returns ``metrics.json``'s content.

    ``progress(step, total, {"loss", "val agree"})`` is called after every optimiser step (from
    rank 0; with Ray, relayed to this process) when ``cfg.progress``.
    """
    from rglf.router.preflight import preflight_train

    preflight_train(cfg, log)  # inputs, provenance, OUT's settings (--force), resources: one-line errors
    if cfg.num_workers > 1:
        return train_with_ray(cfg, progress=progress)
    return train_loop(cfg, progress=progress)
