"""Checks ``rglf train`` / ``rglf eval`` run before any work, so expected failures are one line.

- inputs: the run folder exists and holds ``router_inputs/`` + ``router_side/`` (else exit 4:
  score first), the rank folder holds ``rankings/`` (else exit 4: ``rglf rank --run RUN --out
  RANK``), both come from the same model and run (``model.provenance``, exit 2), and the
  rankings have the split(s) the command needs (exit 2, naming the splits found);
- the router folder of ``rglf train``: continuing into a folder trained with other settings is
  refused (exit 2, naming the settings that differ) unless ``--force`` (or ``--no-resume``),
  which starts fresh by moving the previous router outputs to ``OUT/.replaced-<UTC time>/``;
  the config of existing weights is never rewritten;
- resources (exit 5): ``--device cuda`` without CUDA, ``--use-gpu`` with fewer GPUs than
  workers, more Ray Train workers than this machine's (or the joined cluster's) CPUs can place.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rglf.model.provenance import check_rank_matches_run
from rglf.router.data import SPLIT_ALIASES, RouterDataError

if TYPE_CHECKING:
    from rglf.router.train import TrainConfig

# Files a router folder may hold (train writes the first five; eval and budget calibration the rest).
ROUTER_OUTPUTS = (
    "router.safetensors", "router_config.json", "train_config.json", "metrics.json", "checkpoints",
    "eval.json", "eval.png", "budget.json",
)
# TrainConfig fields that do not change the weights: they may differ when a run is resumed.
RUNTIME_FIELDS = frozenset({
    "out", "resume", "force", "num_workers", "use_gpu", "cpus_per_worker", "ray_address", "device", "threads",
    "eval_batch_size", "progress", "keep_checkpoints", "micro_batch_size", "eval_every", "checkpoint_every",
    "prefetch", "record_samples",
})


class UsageError(ValueError):
    """A bad path or option value."""

    exit_code = 2  # cli.EXIT_CODES: bad usage or input


class TrainRefused(ValueError):
    """The router folder was trained with other settings (continuing would mix them)."""

    exit_code = 2  # cli.EXIT_CODES: refused


class ResourceError(RuntimeError):
    """Resources that can never be had: CUDA absent, more workers than the CPUs/GPUs to place them."""

    exit_code = 5  # cli.EXIT_CODES: impossible resources


# ---- inputs ----------------------------------------------------------------------------------


def check_folder(path: Path, option: str) -> None:
    """An input folder that must exist (exit 2 when missing or a file)."""
    if not path.exists():
        raise UsageError(f"{option} {path}: does not exist. Check the path")
    if not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder. Pass the folder")


def check_inputs(run: Path, rank: Path) -> None:
    """The run has router inputs, the rank has rankings, and both come from one model and run."""
    check_folder(run, "--run")
    for name in ("router_inputs", "router_side"):
        if not (run / name).is_dir():
            raise RouterDataError(
                f"{run / name}: not found (the run has not been scored). Score it first: "
                f"rglf score --run {run} --model CKPT"
            )
    if rank.exists() and not rank.is_dir():
        raise UsageError(f"--rank {rank}: is a file, not a folder. Pass the folder written by rglf rank")
    if not (rank / "rankings").is_dir():
        raise RouterDataError(
            f"{rank / 'rankings'}: not found (the run has not been ranked). Rank it first: "
            f"rglf rank --run {run} --out {rank}"
        )
    check_rank_matches_run(run, rank)


def splits_found(rank: Path) -> tuple[set[str], bool]:
    """(the splits the rankings name, after aliases; whether some samples have none: hash-split)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(rank / "rankings", format="parquet")
    if "split" not in dataset.schema.names:
        return set(), True
    values = dataset.to_table(columns=["split"]).column("split").unique().to_pylist()
    return {SPLIT_ALIASES.get(v, v) for v in values if v}, any(not v for v in values)


def check_split(rank: Path, wanted: str, option: str) -> None:
    """Refuse a split the rankings do not have (samples without a split are hash-split, so any goes then)."""
    found, unsplit = splits_found(rank)
    if wanted in found or unsplit:
        return
    raise UsageError(
        f"{rank / 'rankings'}: has no {wanted!r} split (splits found: {', '.join(sorted(found)) or 'none'}). "
        f"Pass {option} with one of them"
    )


# ---- resources -------------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_device(device: str, option: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA ones must exist here (exit 5)."""
    if device in ("auto", "cpu"):
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"{option} {device}: not a device. Use auto, cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ResourceError(
            f"{option} {device}: CUDA is not available on this machine (torch {torch.__version__}, {build}). "
            f"Use {option} cpu (or auto)"
        )
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ResourceError(
            f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s). Use cuda:0..."
            f"cuda:{torch.cuda.device_count() - 1}"
        )


def _joins_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def check_local_workers(num_workers: int, cpus_per_worker: float, use_gpu: bool, address: str | None) -> None:
    """Before starting a local Ray instance: enough CPUs (and GPUs) on this machine (exit 5)."""
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not _joins_cluster(address) and gpus < num_workers:
            raise ResourceError(
                f"--use-gpu with --workers {num_workers}: needs {num_workers} GPU(s), this machine has {gpus}. "
                "Drop --use-gpu, lower --workers, or join a GPU cluster with --address"
            )
    if num_workers > 1 and not _joins_cluster(address):
        need = math.ceil(num_workers * cpus_per_worker)
        if need > usable_cores():
            raise ResourceError(
                f"--workers {num_workers}: needs {need} CPUs ({cpus_per_worker:g} each), this machine has "
                f"{usable_cores()}. Lower --workers, or join a cluster with --address"
            )


def check_cluster_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """After ``ray.init``: the cluster can place every worker now (exit 5; Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    need = {"CPU": num_workers * cpus_per_worker, **({"GPU": float(num_workers)} if use_gpu else {})}
    short = {k: (v, total.get(k, 0.0)) for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        text = ", ".join(f"{v:g} {k} needed, {have:g} in the cluster" for k, (v, have) in short.items())
        raise ResourceError(
            f"--workers {num_workers}{' --use-gpu' if use_gpu else ''}: {text} (Ray would wait forever). "
            "Lower --workers, or add nodes"
        )


# ---- the router folder -----------------------------------------------------------------------


def _same_path(a: Any, b: Any) -> bool:
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def settings_diff(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings (fields that change the weights) where ``saved`` differs from ``cfg``, as text."""
    current = cfg.to_dict()
    problems = []
    for f in fields(cfg):
        if f.name in RUNTIME_FIELDS:
            continue
        mine = current.get(f.name)
        if f.name not in saved:  # written by an older version: it ran with the default
            theirs = list(f.default) if isinstance(f.default, tuple) else f.default
        else:
            theirs = saved[f.name]
        same = _same_path(theirs, mine) if f.name in ("run", "rank") else theirs == mine
        if not same:
            problems.append(f"{f.name} {theirs} -> {mine}")
    return problems


def _existing_outputs(out: Path) -> list[str]:
    return [name for name in ROUTER_OUTPUTS if (out / name).exists()]


def prepare_router_folder(cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """Refuse to continue into a folder trained with other settings; or start fresh (force / no-resume)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder. Choose a folder for the router")
    existing = _existing_outputs(out)
    if not existing:
        return
    if not (cfg.force or not cfg.resume):
        config = out / "train_config.json"
        try:
            saved = json.loads(config.read_text()) if config.is_file() else None
        except (OSError, ValueError):
            saved = None
        problems = ["its train_config.json is missing or unreadable"] if not isinstance(saved, dict) else settings_diff(saved, cfg)
        if not problems:
            return  # the same settings: resume (the existing config describes the weights; it is kept)
        raise TrainRefused(
            f"{out}: was trained with different settings ({'; '.join(problems)}); continuing would mix them. "
            "Use another --out, or --force (or --no-resume) to start fresh (old outputs moved to OUT/.replaced-<time>/)"
        )
    aside = out / f".replaced-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    aside.mkdir()
    for name in existing:
        os.replace(out / name, aside / name)
    log(f"train: starting fresh; the previous outputs of {out} ({', '.join(existing)}) were moved to {aside}")


def check_writable(folder: Path, option: str) -> None:
    """The output folder can be created and written (a probe file), before any work is done."""
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        where = "is a file" if probe_dir == folder else f"{probe_dir} is a file"
        raise UsageError(f"{option} {folder}: {where}, not a folder. Choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rglf-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot be written ({e.strerror}). Choose a writable folder") from None


# ---- entry points ----------------------------------------------------------------------------


def preflight_train(cfg: TrainConfig, log: Callable[[str], None] = lambda _m: None) -> None:
    """Every check of ``rglf train`` (see the module docstring), then the router folder is ready."""
    check_inputs(cfg.run, cfg.rank)
    found, unsplit = splits_found(cfg.rank)
    if "train" not in found and not unsplit:
        raise UsageError(
            f"{cfg.rank / 'rankings'}: has no 'train' split to train on (splits found: "
            f"{', '.join(sorted(found)) or 'none'}). Ingest the training data with --split train"
        )
    if cfg.num_workers == 1:
        check_device(cfg.device)
    check_local_workers(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.ray_address)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UsageError(f"--out {cfg.out}: is a file, not a folder. Choose a folder for the router")
    check_writable(cfg.out, "--out")
    prepare_router_folder(cfg, log)


def check_router_folder(router: Path, option: str, run: Path, rank: Path) -> None:
    """A trained router folder (exit 4 when it is not there yet)."""
    if router.exists() and not router.is_dir():
        raise UsageError(f"{option} {router}: is a file, not a folder. Pass the folder written by rglf train")
    if not (router / "router_config.json").is_file():
        raise RouterDataError(
            f"{option} {router}: no trained router there (no router_config.json). Train one first: "
            f"rglf train --run {run} --rank {rank} --out {router}"
        )


def preflight_eval(
    run: Path, rank: Path, routers: Iterable[tuple[str, Path]], split: str, device: str, out: Path
) -> None:
    """Every check of ``rglf eval`` before the data is loaded."""
    check_inputs(run, rank)
    for option, path in routers:
        check_router_folder(path, option, run, rank)
    check_split(rank, split, "--split")
    check_device(device)
    check_writable(out, "--out")
