"""Stage 4 of ``rglf score``: part files, and the bookkeeping that makes the job resumable and exactly-once.

Every scorer call (one batch of samples) commits its results itself, as part files whose name
is DETERMINISTIC: ``key = sha1(sorted sample ids of the batch)``. In this order, each file
written to a hidden temporary name, fsynced, then ``os.replace``d into place:

    1. ``router_inputs/part-<key>.parquet``  the batch's scored image samples (if any)
    2. ``errors/score-<key>.parquet``        the batch's rejected samples (if any)
    3. ``feedback/part-<key>.parquet``       ALWAYS, even with 0 rows: the completion marker

So a batch is committed exactly when its feedback part exists. Why this gives exactly-once:

- A job killed at any moment leaves only whole files (``os.replace`` is atomic) plus hidden
  ``.*.tmp`` leftovers that every reader ignores. At most the batches in flight are lost.
- A batch that is retried (actor restarted after a node loss, task re-executed) has the same
  sample ids, hence the same key, and REPLACES its own files: no duplicates.
- On start (``scan_output``) the driver deletes the leftovers: ``.*.tmp`` files and
  router_inputs / errors parts whose feedback part is missing (a batch killed between steps
  1-3). Everything left is committed; the samples in it are not scored again.
- At the end (``dedupe``) the driver checks that ``(sample_id, level_tokens)`` is unique in
  feedback (``sample_id`` in router_inputs and score errors). Duplicates can only arise if two
  DIFFERENT batches held the same sample, e.g. a killed job's straggling worker finishing after
  the next run planned its batches. They are removed (first part by name wins; the values are
  the same model on the same input) by rewriting the affected parts atomically, and counted.

Requirements: one ``rglf score`` per output folder at a time, and on a multi-node cluster
the output folder must be a filesystem every node mounts at the same path (NFS, Lustre,
a FUSE-mounted bucket with atomic rename): the actors write to it directly.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rglf.model.tables import ERRORS_SCHEMA, FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA

# table -> (folder, part-file prefix, key columns that must be unique)
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "feedback": ("feedback", "part-", ("sample_id", "level_tokens")),
    "router_inputs": ("router_inputs", "part-", ("sample_id",)),
    "errors": ("errors", "score-", ("sample_id",)),  # ingest errors (errors/ingest-*) are not ours
}
SCHEMAS = {"feedback": FEEDBACK_SCHEMA, "router_inputs": ROUTER_INPUTS_SCHEMA, "errors": ERRORS_SCHEMA}


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to a hidden temporary file beside ``path``, fsync it, then ``os.replace``.

    A reader (or a job killed mid-write) never sees a half-written ``path``; hidden ``.*.tmp``
    leftovers are ignored by every Parquet reader here and removed by the next run.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_parquet_atomic`` for a small text file (run.json, ingest.json)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def batch_key(sample_ids: Iterable[str]) -> str:
    """The deterministic name of a batch: sha1 of its sorted sample ids (20 hex digits)."""
    h = hashlib.sha1()
    for sid in sorted(sample_ids):
        h.update(sid.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def part_path(out: Path, table: str, key: str) -> Path:
    folder, prefix, _ = TABLES[table]
    return Path(out) / folder / f"{prefix}{key}.parquet"


def part_files(out: Path, table: str) -> list[Path]:
    """Committed part files of one of our tables, sorted by name (hidden temporaries excluded)."""
    folder, prefix, _ = TABLES[table]
    root = Path(out) / folder
    return sorted(root.glob(f"{prefix}*.parquet")) if root.is_dir() else []


def write_batch(out: Path, key: str, feedback: pa.Table, router_inputs: pa.Table, errors: pa.Table) -> None:
    """Commit one batch: router inputs, then errors, then the feedback part LAST (the marker)."""
    for table, data in (("router_inputs", router_inputs), ("errors", errors), ("feedback", feedback)):
        if not data.schema.equals(SCHEMAS[table]):
            raise TypeError(f"{table} batch does not match its schema:\n{data.schema}\nexpected\n{SCHEMAS[table]}")
        if data.num_rows == 0 and table != "feedback":
            continue
        path = part_path(out, table, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(data, path)


@dataclass
class ExistingOutput:
    """What a previous (possibly killed) run left in an output folder, after clean-up."""

    feedback_keys: pa.Table  # (sample_id, level_tokens) of every committed feedback row
    rejected: set[str]  # samples with a committed score-stage error row
    feedback_parts: int = 0
    removed: list[str] = field(default_factory=list)  # deleted leftovers (tmp files, orphan parts)


def _read_columns(files: list[Path], columns: list[str], schema: pa.Schema) -> pa.Table:
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except Exception as err:  # a committed part must be readable: never skip it silently
            raise RuntimeError(f"cannot read the committed part file {f}: {err}") from err
    if not tables:
        return pa.table({c: pa.array([], type=schema.field(c).type) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")


def scan_output(out: Path) -> ExistingOutput:
    """Delete uncommitted leftovers, then read what is committed (see the module docstring)."""
    out = Path(out)
    removed = []
    for table in TABLES:
        folder = out / TABLES[table][0]
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed.append(str(tmp))
    committed = {p.name.removeprefix("part-").removesuffix(".parquet") for p in part_files(out, "feedback")}
    for table in ("router_inputs", "errors"):
        prefix = TABLES[table][1]
        for path in part_files(out, table):
            if path.name.removeprefix(prefix).removesuffix(".parquet") not in committed:
                path.unlink()
                removed.append(str(path))
    feedback_keys = _read_columns(part_files(out, "feedback"), ["sample_id", "level_tokens"], FEEDBACK_SCHEMA)
    errors = _read_columns(part_files(out, "errors"), ["sample_id"], ERRORS_SCHEMA)
    rejected = {s for s in errors.column("sample_id").to_pylist() if s is not None}
    return ExistingOutput(feedback_keys, rejected, len(committed), removed)


def dedupe(out: Path, table: str) -> int:
    """Make the table's key unique across its parts (first part by name wins); return rows removed."""
    files = part_files(out, table)
    keys = list(TABLES[table][2])
    if not files:
        return 0
    per_file = [_read_columns([f], keys, SCHEMAS[table]) for f in files]
    everything = pa.concat_tables(per_file)
    counts = everything.group_by(keys).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dup.num_rows == 0:
        return 0
    duplicated = set(zip(*(dup.column(k).to_pylist() for k in keys), strict=True))
    seen: set = set()
    removed = 0
    for f, key_table in zip(files, per_file, strict=True):
        rows = list(zip(*(key_table.column(k).to_pylist() for k in keys), strict=True))
        keep = []
        for row in rows:
            if row in duplicated:
                keep.append(row not in seen)
                seen.add(row)
            else:
                keep.append(True)
        if all(keep):
            continue
        data = pq.read_table(f, schema=SCHEMAS[table])
        write_parquet_atomic(data.filter(pa.array(keep)), f)
        removed += keep.count(False)
    return removed
