"""Where tables come from: a checkpoint's content identity and the run / rank provenance checks.

**Checkpoint identity** (``checkpoint_identity``, ``checkpoint_fingerprint``): ``model_id`` =
``sha256:<16 hex>``, a SHA-256 over the name, size and full-content SHA-256 of every file at
the top level of the checkpoint folder that can change what is scored: weights
(``*.safetensors``, ``*.bin`` ...), configs, tokenizer and processor files. Skipped: hidden
entries (``.git``, ``.cache``), sub-folders (transformers loads the top level only) and
documentation (``*.md``, licences, images, ``*.log``). So the id changes when any weight,
config, tokenizer or processor byte changes, and does not change when the folder is renamed,
moved or copied.

Hashing is streamed (8 MiB reads; files hashed in parallel threads, hashlib releases the GIL).
Measured on this project's 2-core machine while it was shared with other jobs (load ~14):
**sha256 ~340 MB/s** (blake2b 145 MB/s, hence sha256: the CPU has SHA extensions), i.e. a 15 GB
7B checkpoint takes ~45 s the first time. It is hashed once: every file's hash is cached under
its (absolute path, size, mtime_ns) key, and reused only while both still match:

1. in this process (a dict);
2. in the run folder: ``run.json`` records ``model_files`` (this identity, per-file stats and
   hashes) and ``rglf score`` passes it back on the next run (``known=``), so a resumed job
   and every scorer actor skip the hashing;
3. across runs on one machine, only when ``RGLF_CACHE_DIR`` is set (opt-in: nothing is written
   outside the run folder and the paths the user named otherwise):
   ``$RGLF_CACHE_DIR/checkpoint-hashes.json``.

The (size, mtime_ns) key trusts the filesystem: a file rewritten in place with identical size
AND an identical nanosecond mtime (``touch -d`` back-dating) would keep its cached hash.
Delete ``model_files`` from run.json (or the cache file) to force a re-hash.

**Provenance** (``run_provenance``, ``check_rank_matches_run``): a run folder's ``run.json``
holds ``model_id`` and ``run_id`` (a random id given when the folder is first scored, kept on
resume, new after ``--force``); ``rglf rank`` records both in ``rank_report.json``
(``provenance``), and ``rglf train`` / ``rglf eval`` refuse a rank folder whose provenance
names another model or run (``ProvenanceError``, exit 2), and router inputs whose
``router_side`` was written by another model than ``run.json`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGORITHM = "sha256"
CACHE_ENV = "RGLF_CACHE_DIR"
CACHE_FILE = "checkpoint-hashes.json"
CHUNK = 8 << 20
# Never read by transformers' loaders: documentation, licences, pictures, logs.
SKIPPED_SUFFIXES = frozenset({".md", ".rst", ".log", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"})
SKIPPED_PREFIXES = ("license", "licence", "notice", "readme")

_memo: dict[str, tuple[int, int, str]] = {}  # absolute file path -> (size, mtime_ns, hash)
_memo_lock = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be identified (missing, not a folder, no model files)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


class ProvenanceError(ValueError):
    """Tables built from another model or run than the ones they are combined with."""

    exit_code = 2  # cli.EXIT_CODES: refused


@dataclass
class CheckpointIdentity:
    """A checkpoint folder's content id and the per-file stats and hashes it was computed from."""

    model_id: str
    path: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size, mtime_ns, sha256
    hashed_bytes: int = 0  # bytes actually read by this call (0: every hash came from a cache)

    def to_json(self) -> dict[str, Any]:
        """The record kept in ``run.json`` (``model_files``) and passed back as ``known``."""
        return {"model_id": self.model_id, "algorithm": ALGORITHM, "path": self.path, "files": self.files}


def model_files(path: Path) -> list[Path]:
    """The files of a checkpoint folder that make up its identity (top level, sorted by name)."""
    out = []
    for f in sorted(path.iterdir()):
        name = f.name.lower()
        if f.name.startswith(".") or not f.is_file():  # hidden entries, sub-folders (is_file follows symlinks)
            continue
        if f.suffix.lower() in SKIPPED_SUFFIXES or name.startswith(SKIPPED_PREFIXES):
            continue
        out.append(f)
    return out


def _hash_file(path: Path) -> str:
    h = hashlib.new(ALGORITHM)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _machine_cache_path() -> Path | None:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() / CACHE_FILE if root else None


def _read_machine_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data.get("files", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache: hash again


def _write_machine_cache(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files = _read_machine_cache(path)
        files.update(entries)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({"version": 1, "algorithm": ALGORITHM, "files": files}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # read-only or full cache folder: the id is still right, only the next run re-hashes


def checkpoint_identity(path: str | Path, *, known: Mapping[str, Any] | None = None) -> CheckpointIdentity:
    """The content identity of the checkpoint folder ``path`` (see the module docstring).

    ``known``: a previous ``CheckpointIdentity.to_json()`` (``run.json``'s ``model_files``); its
    per-file hashes are reused for files of the same folder whose size and mtime_ns still match.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: the checkpoint folder does not exist. Pass an HF-format checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder. Pass the folder holding config.json")
    root = folder.resolve()
    files = model_files(root)
    if not files:
        raise CheckpointError(f"{folder}: holds no weight or config files. Pass an HF-format checkpoint folder")
    known_files: Mapping[str, Any] = {}
    if known and known.get("algorithm", ALGORITHM) == ALGORITHM and known.get("path") == str(root):
        known_files = known.get("files") or {}
    cache_path = _machine_cache_path()
    machine = _read_machine_cache(cache_path)

    stats: dict[str, tuple[Path, int, int]] = {}
    hashes: dict[str, str] = {}
    todo: list[str] = []
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        stats[f.name] = (f, st.st_size, st.st_mtime_ns)
        with _memo_lock:
            memo = _memo.get(key)
        candidates = [
            memo and {"size": memo[0], "mtime_ns": memo[1], ALGORITHM: memo[2]},
            known_files.get(f.name),
            machine.get(key),
        ]
        hit = next(
            (c for c in candidates if c and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns
             and isinstance(c.get(ALGORITHM), str)),
            None,
        )
        if hit is not None:
            hashes[f.name] = hit[ALGORITHM]
        else:
            todo.append(f.name)

    def work(name: str) -> tuple[str, str]:
        f, size, mtime = stats[name]
        digest = _hash_file(f)
        after = f.stat()
        if (after.st_size, after.st_mtime_ns) != (size, mtime):
            raise CheckpointError(f"{f}: changed while it was being hashed. Rerun when the checkpoint is no longer written")
        return name, digest

    hashed_bytes = sum(stats[n][1] for n in todo)
    if todo:
        workers = max(1, min(4, len(todo), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            hashes.update(pool.map(work, todo))
    new_entries = {}
    for name, (f, size, mtime) in stats.items():
        key = str(f.resolve())
        with _memo_lock:
            _memo[key] = (size, mtime, hashes[name])
        if name in todo:
            new_entries[key] = {"size": size, "mtime_ns": mtime, ALGORITHM: hashes[name]}
    if cache_path is not None and new_entries:
        _write_machine_cache(cache_path, new_entries)

    total = hashlib.new(ALGORITHM)
    for name in sorted(stats):
        total.update(f"{name}\t{stats[name][1]}\t{hashes[name]}\n".encode())
    return CheckpointIdentity(
        model_id=f"{ALGORITHM}:{total.hexdigest()[:16]}",
        path=str(root),
        files={n: {"size": stats[n][1], "mtime_ns": stats[n][2], ALGORITHM: hashes[n]} for n in sorted(stats)},
        hashed_bytes=hashed_bytes,
    )


def checkpoint_fingerprint(path: str | Path, *, known: Mapping[str, Any] | None = None) -> str:
    """The checkpoint's ``model_id`` (``checkpoint_identity(path, known=known).model_id``)."""
    return checkpoint_identity(path, known=known).model_id


def known_files(run_dir: str | Path) -> dict[str, Any] | None:
    """``run.json``'s ``model_files`` record of a run folder (None when absent or unreadable)."""
    record = _read_json(Path(run_dir) / "run.json")
    value = record.get("model_files")
    return value if isinstance(value, dict) else None


# ---- run / rank provenance -------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def new_run_id() -> str:
    """A fresh run id (given when a run folder is first scored)."""
    return uuid.uuid4().hex[:16]


def run_provenance(run_dir: str | Path) -> dict[str, Any]:
    """``{"run_id", "model_id"}`` of a run folder, from ``run.json`` (values None when unknown)."""
    record = _read_json(Path(run_dir) / "run.json")
    return {"run_id": record.get("run_id"), "model_id": record.get("model_id")}


def check_run_consistent(run_dir: str | Path) -> None:
    """Refuse router inputs whose ``router_side`` another model wrote than ``run.json`` names."""
    run_dir = Path(run_dir)
    model_id = run_provenance(run_dir)["model_id"]
    side = _read_json(run_dir / "router_side" / "router_side.json").get("model_id")
    if model_id and side and side != model_id:
        raise ProvenanceError(
            f"{run_dir}: router_side/ was written by model {side} but run.json names {model_id}; the router inputs "
            "come from two models. Rescore the folder: rglf score --run RUN --model CKPT --force"
        )


def check_rank_matches_run(run_dir: str | Path, rank_dir: str | Path) -> None:
    """Refuse a rank folder built from another run or model than ``run_dir`` (``ProvenanceError``).

    Checks what both sides record: ``rank_report.json``'s ``provenance`` against ``run.json``.
    A side that records nothing (tables written by other tools) is not checked.
    """
    run_dir, rank_dir = Path(run_dir), Path(rank_dir)
    check_run_consistent(run_dir)
    ours = run_provenance(run_dir)
    theirs = _read_json(rank_dir / "rank_report.json").get("provenance") or {}
    problems = []
    for key, label in (("model_id", "model"), ("run_id", "run")):
        if ours.get(key) and theirs.get(key) and ours[key] != theirs[key]:
            problems.append(f"{label} {theirs[key]} (rank) vs {ours[key]} (run)")
    if problems:
        built_from = theirs.get("run") or "another folder"
        raise ProvenanceError(
            f"{rank_dir}: was ranked from {built_from}, not from {run_dir} ({'; '.join(problems)}). "
            f"Rank this run first: rglf rank --run {run_dir} --out NEW_RANK"
        )
