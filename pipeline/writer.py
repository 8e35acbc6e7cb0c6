"""Stage 4 of ``rglf score``: part files, the index of what is done, and the run-folder lock.

**Commit protocol.** Every scorer call (one batch of samples) commits its results itself, as
part files whose name is DETERMINISTIC: ``key = sha1(sorted sample ids of the batch)``. In this
order, each file written to a hidden temporary name, fsynced, then ``os.replace``d into place:

    1. ``router_inputs/part-<key>.parquet``  the batch's scored image samples (if any)
    2. ``errors/score-<key>.parquet``        the batch's rejected samples (if any)
    3. ``feedback/part-<key>.parquet``       ALWAYS, even with 0 rows: the completion marker

So a batch is committed exactly when its feedback part exists. Why this gives exactly-once:

- A job killed at any moment leaves only whole files (``os.replace`` is atomic) plus hidden
  ``.*.tmp`` leftovers that every reader ignores. At most the batches in flight are lost.
- A batch that is retried (actor restarted after a node loss, batch re-queued) has the same
  sample ids, hence the same key, and REPLACES its own files: no duplicates.
- On start (``RunIndex.load``) the driver deletes the leftovers: ``.*.tmp`` files and
  router_inputs / errors parts whose feedback part is missing (a batch killed between steps
  1-3). Everything left is committed; the samples in it are not scored again.
- At the end (``RunIndex.dedupe``) the driver checks that ``(sample_id, level_tokens)`` is unique
  in feedback (``sample_id`` in router_inputs and score errors). Duplicates can only arise if
  two DIFFERENT batches held the same sample, e.g. a killed job's straggling worker finishing
  after the next run planned its batches. They are removed (first part by name wins; the values
  are the same model on the same input) by rewriting the affected parts atomically, and counted.

**The index** (``RUN/index/seg-*.parquet``, ``INDEX_SCHEMA``): one row per (committed batch,
sample) with the levels it has in feedback, its crop count, its rejection code and its router
input bytes. It is a cache of the part files, never the truth: every scorer call returns its
batch's rows (``batch_index``), the driver appends them in segments (every ~30 s and at the end)
and compacts the segments into one at the end of a run. On start the driver lists
``feedback/`` (names, sizes, mtimes: no file is opened), keeps the index rows whose part is still
there unchanged, and reads only the parts the index does not cover (those committed after the
last flush of a killed run, or changed on disk). So planning a resume reads one index file
plus a directory listing, whatever the run's history, and the end-of-job checks (dedupe, router
inputs present, counts) work on the index: each part is read at most once, when it is indexed.

**The lock** (``RUN/.lock``, ``RunLock``): one writer per run folder (``rglf score``,
``rglf ingest``). An exclusive ``flock`` held for the whole command, plus the holder's host, pid,
command and start time written in the file for the message a second writer prints (exit 6). The
kernel drops a dead process's ``flock``, so a stale lock (a killed run) is taken over safely by
the next writer; the previous holder's record tells it that run died.

Requirements: on a multi-node cluster the output folder must be a filesystem every node mounts
at the same path (NFS, Lustre, a FUSE-mounted bucket with atomic rename): the actors write to it
directly. Where the filesystem has no ``flock``, the lock falls back to the record alone (a live
holder on this host is detected by pid and process start time; one on another host is trusted).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

INDEX_DIR = "index"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("part", pa.string(), nullable=False),  # batch key: feedback/part-<part>.parquet
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("levels", pa.list_(pa.int32())),  # level_tokens in feedback (empty: rejected)
        pa.field("n_crops", pa.int16()),  # null when rejected; 0 for a text-only sample
        pa.field("code", pa.string()),  # rejection code (errors/score-<part>), null when scored
        pa.field("router_bytes", pa.int64()),  # bytes of its router_inputs row (0: none)
        pa.field("part_bytes", pa.int64()),  # size and mtime of the feedback part when indexed
        pa.field("part_mtime_ns", pa.int64()),
    ]
)


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


def _part_keys(out: Path, table: str, *, with_stat: bool = False) -> dict[str, tuple[int, int] | None]:
    """{key: (size, mtime_ns) or None} of a table's committed parts, from one directory listing."""
    folder, prefix, _ = TABLES[table]
    return _scan(Path(out) / folder, prefix, with_stat=with_stat)[0]


def write_batch(out: Path, key: str, feedback: pa.Table, router_inputs: pa.Table, errors: pa.Table) -> tuple[int, int]:
    """Commit one batch: router inputs, then errors, then the feedback part LAST (the marker).

    Returns the feedback part's (size, mtime_ns), which the batch's index rows record.
    """
    for table, data in (("router_inputs", router_inputs), ("errors", errors), ("feedback", feedback)):
        if not data.schema.equals(SCHEMAS[table]):
            raise TypeError(f"{table} batch does not match its schema:\n{data.schema}\nexpected\n{SCHEMAS[table]}")
        if data.num_rows == 0 and table != "feedback":
            continue
        path = part_path(out, table, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(data, path)
    st = part_path(out, "feedback", key).stat()
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------------------
# The index of what is done
# --------------------------------------------------------------------------------------


ROUTER_BYTES_COLUMNS = ["sample_id", "n_crops", "grid", "vision_hidden", "instruction_ids", "encoding", "image"]


def router_bytes(router_inputs: pa.Table) -> pa.Array:
    """Bytes each router_inputs row stores for the router (``model.router_inputs.BYTES_FORMULA``),
    from the small columns only: fp16 ``n_crops * grid^2 * vision_hidden * 2``, fp8 ``n_crops * grid^2 *
    vision_hidden + n_crops * vision_hidden * 4``, pixels the image reference; + 4 per instruction id."""
    if router_inputs.num_rows == 0:
        return pa.array([], pa.int64())
    n = pc.cast(router_inputs.column("n_crops"), pa.int64())
    g = pc.cast(router_inputs.column("grid"), pa.int64())
    h = pc.cast(router_inputs.column("vision_hidden"), pa.int64())
    ids = pc.cast(pc.list_value_length(router_inputs.column("instruction_ids")), pa.int64())
    values = pc.multiply(pc.multiply(pc.multiply(n, g), g), h)
    names = router_inputs.column_names
    encoding = (pc.fill_null(router_inputs.column("encoding"), "fp16") if "encoding" in names
                else pa.array(["fp16"] * router_inputs.num_rows, pa.string()))
    image = (pc.cast(pc.fill_null(pc.binary_length(router_inputs.column("image")), 0), pa.int64()) if "image" in names
             else pa.array([0] * router_inputs.num_rows, pa.int64()))
    features = pc.if_else(pc.equal(encoding, "fp8"), pc.add(values, pc.multiply(pc.multiply(n, h), 4)),
                          pc.if_else(pc.equal(encoding, "pixels"), image, pc.multiply(values, 2)))
    return pc.add(features, pc.multiply(ids, 4))


def batch_index(key: str, feedback: pa.Table, router_inputs: pa.Table, errors: pa.Table,
                part_stat: tuple[int, int] | None = None) -> pa.Table:
    """The index rows (``INDEX_SCHEMA``) of one committed batch, from its three tables.

    ``router_inputs`` needs only ``ROUTER_BYTES_COLUMNS``.
    """
    size, mtime = part_stat if part_stat is not None else (None, None)
    rows: dict[str, dict[str, Any]] = {}
    if feedback.num_rows:
        grouped = feedback.select(["sample_id", "level_tokens", "n_crops"]).group_by("sample_id").aggregate(
            [("level_tokens", "list"), ("n_crops", "min")]
        )
        for sid, levels, crops in zip(grouped.column("sample_id").to_pylist(),
                                      grouped.column("level_tokens_list").to_pylist(),
                                      grouped.column("n_crops_min").to_pylist(), strict=True):
            rows[sid] = {"levels": sorted(levels), "n_crops": crops, "code": None, "router_bytes": 0}
    if router_inputs.num_rows:
        for sid, nbytes in zip(router_inputs.column("sample_id").to_pylist(), router_bytes(router_inputs).to_pylist(),
                               strict=True):
            rows.setdefault(sid, {"levels": [], "n_crops": None, "code": None, "router_bytes": 0})["router_bytes"] = nbytes
    if errors.num_rows:
        for sid, code in zip(errors.column("sample_id").to_pylist(), errors.column("code").to_pylist(), strict=True):
            if sid is None:
                continue
            entry = rows.setdefault(sid, {"levels": [], "n_crops": None, "code": None, "router_bytes": 0})
            entry["code"] = code or "rejected"
    out = [
        {"part": key, "sample_id": sid, **entry, "part_bytes": size, "part_mtime_ns": mtime}
        for sid, entry in sorted(rows.items())
    ]
    return pa.Table.from_pylist(out, schema=INDEX_SCHEMA)


def _read_part(out: Path, key: str, stat: tuple[int, int] | None) -> pa.Table:
    """Index rows of one committed part, read from its files (the slow path: each part read once)."""

    def read(table: str, columns: list[str]) -> pa.Table:
        path = part_path(out, table, key)
        try:
            return pq.read_table(path, columns=columns, schema=SCHEMAS[table])  # older parts: new columns null
        except FileNotFoundError:
            return pa.table({c: pa.array([], SCHEMAS[table].field(c).type) for c in columns})
        except Exception as err:  # a committed part must be readable: never skip it silently
            raise RuntimeError(f"cannot read the committed part file {path}: {err}") from err

    return batch_index(
        key,
        read("feedback", ["sample_id", "level_tokens", "n_crops"]),
        read("router_inputs", ROUTER_BYTES_COLUMNS),
        read("errors", ["sample_id", "code"]),
        stat,
    )


def _read_many(out: Path, table: str, keys: list[str], columns: list[str]) -> pa.Table:
    """``columns`` + ``part`` of many parts of one table, read by one multi-threaded scan."""
    import pyarrow.dataset as ds

    folder, prefix, _ = TABLES[table]
    have = _part_keys(out, table) if table != "feedback" else dict.fromkeys(keys)
    files = [str(part_path(out, table, k)) for k in keys if k in have]
    fields = [SCHEMAS[table].field(c) for c in columns]
    if not files:
        return pa.schema([*fields, pa.field("part", pa.string())]).empty_table()
    batches, names = [], []
    try:
        for tagged in ds.dataset(files, format="parquet", schema=SCHEMAS[table]).scanner(columns=columns).scan_batches():
            batches.append(tagged.record_batch)
            names.append(pa.array([Path(tagged.fragment.path).name[len(prefix) : -len(".parquet")]]
                                  * tagged.record_batch.num_rows, pa.string()))
    except Exception as err:  # a committed part must be readable: never skip it silently
        raise RuntimeError(f"cannot read the committed part files of {Path(out) / folder}: {err}") from err
    schema = pa.schema([*fields, pa.field("part", pa.string())])
    if not batches:
        return schema.empty_table()
    data = pa.Table.from_batches(batches).append_column("part", pa.chunked_array(names, pa.string()))
    return data.cast(schema)


def _read_parts(out: Path, keys: list[str], listing: dict[str, tuple[int, int] | None]) -> pa.Table:
    """Index rows of many committed parts (parts the index misses): each file read once, in bulk."""
    if len(keys) <= 4:
        return pa.concat_tables([_read_part(out, key, listing.get(key)) for key in keys])
    fb = _read_many(out, "feedback", keys, ["sample_id", "level_tokens", "n_crops"])
    ri = _read_many(out, "router_inputs", keys, ROUTER_BYTES_COLUMNS)
    er = _read_many(out, "errors", keys, ["sample_id", "code"]).filter(pc.is_valid(pc.field("sample_id")))
    agg = fb.group_by(["part", "sample_id"]).aggregate([("level_tokens", "list"), ("n_crops", "min")])
    rb = pa.table({"part": ri.column("part"), "sample_id": ri.column("sample_id"), "router_bytes": router_bytes(ri)})

    def joined(t: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(t.column("part"), t.column("sample_id"), "\0")

    key_schema = pa.schema([pa.field("part", pa.string()), pa.field("sample_id", pa.string())])
    keys_table = pa.concat_tables([t.select(["part", "sample_id"]).cast(key_schema) for t in (agg, rb, er)]).group_by(
        ["part", "sample_id"]).aggregate([])
    k = joined(keys_table)
    at_fb, at_rb, at_er = (pc.index_in(k, value_set=joined(t)) for t in (agg, rb, er))
    levels = pc.take(agg.column("level_tokens_list"), at_fb)
    empty = pa.array([[]] * len(k), pa.list_(pa.int32()))
    parts = keys_table.column("part")
    stats = [listing.get(p) for p in parts.to_pylist()]
    return pa.table({
        "part": parts,
        "sample_id": keys_table.column("sample_id"),
        "levels": pc.if_else(pc.is_valid(at_fb), levels, empty),
        "n_crops": pc.cast(pc.take(agg.column("n_crops_min"), at_fb), pa.int16()),
        "code": pc.if_else(pc.is_valid(at_er), pc.fill_null(pc.take(er.column("code"), at_er), "rejected"),
                           pa.scalar(None, pa.string())),
        "router_bytes": pc.fill_null(pc.take(rb.column("router_bytes"), at_rb), 0),
        "part_bytes": pa.array([s[0] if s else None for s in stats], pa.int64()),
        "part_mtime_ns": pa.array([s[1] if s else None for s in stats], pa.int64()),
    }, schema=INDEX_SCHEMA)


def _scan(folder: Path, prefix: str, *, with_stat: bool) -> tuple[dict[str, tuple[int, int] | None], list[Path]]:
    """One directory listing: ({part key: (size, mtime_ns) or None}, hidden ``.*.tmp`` files)."""
    keys: dict[str, tuple[int, int] | None] = {}
    tmps: list[Path] = []
    if not folder.is_dir():
        return keys, tmps
    with os.scandir(folder) as entries:
        for e in entries:
            name = e.name
            if name.startswith(prefix) and name.endswith(".parquet"):
                st = e.stat() if with_stat else None
                keys[name[len(prefix) : -len(".parquet")]] = (st.st_size, st.st_mtime_ns) if st else None
            elif name.startswith(".") and name.endswith(".tmp"):
                tmps.append(folder / name)
    return keys, tmps


def remove_leftovers(out: Path) -> tuple[list[str], dict[str, tuple[int, int] | None]]:
    """Delete ``.*.tmp`` files and router_inputs / errors parts without a feedback part.

    Returns (the deleted paths, the committed feedback parts with their (size, mtime_ns)).
    """
    out = Path(out)
    removed: list[str] = []
    listings = {}
    for table, (folder, prefix, _) in TABLES.items():
        listings[table], tmps = _scan(out / folder, prefix, with_stat=table == "feedback")
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
    for tmp in _scan(out / INDEX_DIR, "seg-", with_stat=False)[1]:
        tmp.unlink(missing_ok=True)
    committed = listings["feedback"]
    for table in ("router_inputs", "errors"):
        for key in listings[table]:
            if key not in committed:
                path = part_path(out, table, key)
                path.unlink(missing_ok=True)
                removed.append(str(path))
    return removed, committed


@dataclass
class RunIndex:
    """What a run folder holds, as index rows (``INDEX_SCHEMA``), plus the segment bookkeeping."""

    out: Path
    table: pa.Table  # one row per (committed part, sample)
    removed: list[str] = field(default_factory=list)  # leftovers deleted on load
    parts_read: int = 0  # parts read (not covered by the index) when loading
    segments: list[Path] = field(default_factory=list)  # segment files holding ``table``
    _pending: list[pa.Table] = field(default_factory=list)  # appended, not yet written
    _last_flush: float = field(default_factory=time.monotonic)
    _dropped: bool = False  # rows were removed from ``table``: the segments hold more than it

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, out: Path, *, clean: bool = True) -> RunIndex:
        """Clean leftovers (``clean``), read the index, index the parts it misses, drop rows of vanished parts."""
        out = Path(out)
        if clean:
            removed, listing = remove_leftovers(out)
        else:
            removed, listing = [], _part_keys(out, "feedback", with_stat=True)
        folder = out / INDEX_DIR
        segments = sorted(folder.glob("seg-*.parquet")) if folder.is_dir() else []
        tables = []
        for seg in segments:
            try:
                tables.append(pq.ParquetFile(seg).read().cast(INDEX_SCHEMA))
            except Exception:  # noqa: BLE001 -- a cache: an unreadable segment is rebuilt from the parts
                pass
        index = _last_segment_wins(tables)
        stale_rows = 0
        covered: set[str] = set()
        if index.num_rows:  # validate per part (one hash pass over the rows), not per row
            import numpy as np

            encoded = pc.dictionary_encode(index.column("part")).combine_chunks()
            parts = encoded.dictionary.to_pylist()
            codes = np.asarray(encoded.indices)
            _, first = np.unique(codes, return_index=True)
            sizes = np.asarray(index.column("part_bytes").fill_null(-1))[first]
            mtimes = np.asarray(index.column("part_mtime_ns").fill_null(-1))[first]
            ok_part = np.array([listing.get(p) == (int(b), int(m)) for p, b, m in zip(parts, sizes, mtimes, strict=True)],
                               dtype=bool)
            valid = index.filter(pa.array(ok_part[codes]))
            stale_rows = index.num_rows - valid.num_rows
            index = valid.cast(INDEX_SCHEMA)
            covered = {p for p, ok in zip(parts, ok_part, strict=True) if ok}
        missing = sorted(set(listing) - covered)
        self = cls(out=out, table=index, removed=removed, parts_read=len(missing), segments=segments)
        if missing:
            self.append(_read_parts(out, missing, listing))
        self._dropped = bool(stale_rows)
        if stale_rows or (len(segments) > 1 and missing) or len(segments) > 8:
            self.compact()
        else:
            self.flush()
        return self

    # ---- adding ----------------------------------------------------------------------------

    def append(self, rows: pa.Table) -> None:
        """Add the rows of newly committed batches (written by ``flush``; ``maybe_flush`` every ~30 s)."""
        if rows.num_rows:
            self._pending.append(rows.cast(INDEX_SCHEMA))

    def maybe_flush(self, every_s: float = 30.0, max_rows: int = 50_000, max_segments: int = 64) -> None:
        """Flush every ``every_s`` seconds (or ``max_rows``); compact once ``max_segments`` accumulate."""
        if sum(t.num_rows for t in self._pending) >= max_rows or time.monotonic() - self._last_flush >= every_s:
            self.flush()
            if len(self.segments) > max_segments:
                self.compact()

    def flush(self) -> None:
        """Write the appended rows as one new segment."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        new = pa.concat_tables(self._pending)
        self._pending = []
        self.table = pa.concat_tables([self.table, new]) if self.table.num_rows else new
        path = self._new_segment_path()
        write_parquet_atomic(new, path)
        self.segments.append(path)

    def compact(self) -> None:
        """Replace every segment by one holding the whole (de-duplicated) index (no-op when already one)."""
        self.flush()
        if len(self.segments) <= 1 and not self._dropped and (self.segments or not self.table.num_rows):
            return
        self._dropped = False
        path = self._new_segment_path()
        write_parquet_atomic(self.table, path)
        for old in self.segments:
            if old != path:
                old.unlink(missing_ok=True)
        self.segments = [path]

    def _new_segment_path(self) -> Path:
        folder = self.out / INDEX_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"

    def drop_parts(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self.flush()
            before = self.table.num_rows
            self.table = self.table.filter(pc.invert(pc.is_in(self.table.column("part"), pa.array(keys, pa.string()))))
            self._dropped = self._dropped or self.table.num_rows != before

    # ---- questions -------------------------------------------------------------------------

    def all_rows(self) -> pa.Table:
        """Every index row, including appended ones not yet flushed."""
        return pa.concat_tables([self.table, *self._pending]) if self._pending else self.table

    def done(self, levels: Iterable[int]) -> tuple[pa.Array, dict[str, list[int]]]:
        """(ids of samples with nothing left to do, {sample: missing levels} of partially scored ones).

        A sample is done when every wanted level is in feedback or it was rejected. Vectorised:
        a row (one part's levels of a sample) holding every wanted level settles its sample; only
        the rare samples spread over several parts (or missing levels) are merged in Python.
        """
        import numpy as np

        wanted = sorted(set(levels))
        rows = self.all_rows()
        if rows.num_rows == 0:
            return pa.array([], pa.string()), {}
        ids = rows.column("sample_id").combine_chunks()
        lv = rows.column("levels").combine_chunks()
        hits = np.asarray(pc.is_in(pc.list_flatten(lv), value_set=pa.array(wanted, pa.int32())), dtype=bool)
        parents = np.asarray(pc.list_parent_indices(lv))
        per_row = np.bincount(parents[hits], minlength=rows.num_rows)
        rejected = np.asarray(pc.is_valid(rows.column("code")), dtype=bool)
        settled = (per_row >= len(wanted)) | rejected
        done = ids.filter(pa.array(settled))
        partial: dict[str, set[int]] = {}
        rest = np.nonzero(~settled)[0]
        if len(rest):
            done_set = set(done.to_pylist())
            for sid, have in zip(ids.take(pa.array(rest)).to_pylist(), lv.take(pa.array(rest)).to_pylist(), strict=True):
                if sid not in done_set:
                    partial.setdefault(sid, set()).update(have)
        complete = [sid for sid, have in partial.items() if set(wanted) <= have]
        if complete:
            done = pa.concat_arrays([done, pa.array(complete, pa.string())])
        missing = {sid: sorted(set(wanted) - have) for sid, have in partial.items() if not set(wanted) <= have}
        return done, missing

    def counts(self) -> dict[str, Any]:
        """Whole-folder counts: feedback rows, scored / rejected samples (by code), router rows and bytes."""
        rows = self.all_rows()
        scored = rows.filter(pc.greater(pc.list_value_length(rows.column("levels")), 0))
        rejected = rows.filter(pc.is_valid(rows.column("code")))
        with_router = rows.filter(pc.greater(rows.column("router_bytes"), 0))
        codes: dict[str, int] = {}
        for code in rejected.column("code").to_pylist():
            codes[code] = codes.get(code, 0) + 1
        total = pc.sum(with_router.column("router_bytes")).as_py() or 0
        return {
            "feedback_rows": int(pc.sum(pc.list_value_length(rows.column("levels"))).as_py() or 0),
            "scored_samples": len(pc.unique(scored.column("sample_id"))),
            "rejected_samples": rejected.num_rows,
            "rejected_by_code": codes,
            "router_inputs_rows": with_router.num_rows,
            "router_bytes_per_sample": total / with_router.num_rows if with_router.num_rows else 0.0,
        }

    # ---- end-of-job checks -------------------------------------------------------------------

    def dedupe(self) -> int:
        """Make (sample_id, level_tokens) unique in feedback, sample_id in router_inputs and score errors.

        Works on the index: only the parts holding a duplicated sample are read and rewritten
        (first part by name keeps the sample). Returns the number of rows removed.
        """
        self.flush()
        rows = self.table
        if rows.num_rows == 0:
            return 0
        per_sample = rows.group_by("sample_id").aggregate([("part", "count")])
        dup_ids = per_sample.filter(pc.greater(per_sample.column("part_count"), 1)).column("sample_id")
        if len(dup_ids) == 0:
            return 0
        dup_rows = rows.filter(pc.is_in(rows.column("sample_id"), dup_ids.combine_chunks()))
        losers: dict[str, set[str]] = {}  # part -> samples it must drop
        by_sample: dict[str, list[str]] = {}
        for part, sid in zip(dup_rows.column("part").to_pylist(), dup_rows.column("sample_id").to_pylist(), strict=True):
            by_sample.setdefault(sid, []).append(part)
        for sid, parts in by_sample.items():
            for part in sorted(parts)[1:]:
                losers.setdefault(part, set()).add(sid)
        removed = 0
        for part, drop in sorted(losers.items()):
            for table in ("router_inputs", "errors", "feedback"):
                path = part_path(self.out, table, part)
                if not path.exists():
                    continue
                data = pq.read_table(path, schema=SCHEMAS[table])
                keep = pc.invert(pc.is_in(data.column("sample_id"), pa.array(sorted(drop), pa.string())))
                kept = data.filter(pc.fill_null(keep, True))
                if kept.num_rows != data.num_rows:
                    removed += data.num_rows - kept.num_rows
                    write_parquet_atomic(kept, path)
        self.drop_parts(losers)
        self.append(pa.concat_tables([_read_part(self.out, part, _stat(part_path(self.out, "feedback", part)))
                                      for part in sorted(losers)]))
        self.flush()
        return removed

    def check_router_inputs(self) -> list[str]:
        """Un-commit the batches whose scored image samples have no router_inputs part; return their keys.

        Only a race can break this: a straggling worker of a KILLED job committing a batch after
        the next run deleted that batch's router_inputs part as an orphan. Deleting the feedback
        part makes those samples pending again, so a rerun redoes them.
        """
        self.flush()
        rows = self.table
        need = rows.filter(pc.and_(pc.greater(pc.fill_null(rows.column("n_crops"), 0), 0),
                                   pc.greater(pc.list_value_length(rows.column("levels")), 0)))
        have = _part_keys(self.out, "router_inputs")
        broken = sorted({p for p in pc.unique(need.column("part")).to_pylist() if p not in have})
        for key in broken:
            part_path(self.out, "feedback", key).unlink(missing_ok=True)
            part_path(self.out, "errors", key).unlink(missing_ok=True)
        self.drop_parts(broken)
        if broken:
            self.compact()
        return broken


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _last_segment_wins(tables: list[pa.Table]) -> pa.Table:
    """Concatenate index segments, keeping each part's rows from the LAST segment that holds the part.

    A part's rows are always written together (one batch, or one re-read of its files), so
    de-duplicating by part is enough; a single segment (the usual case) is returned as is.
    """
    if not tables:
        return INDEX_SCHEMA.empty_table()
    kept = [tables[-1]]
    seen = pc.unique(tables[-1].column("part"))
    for table in reversed(tables[:-1]):
        fresh = table.filter(pc.invert(pc.is_in(table.column("part"), value_set=seen)))
        if fresh.num_rows:
            kept.append(fresh)
            seen = pa.concat_arrays([seen, pc.unique(fresh.column("part"))])
    return pa.concat_tables(list(reversed(kept))) if len(kept) > 1 else kept[0]


# --------------------------------------------------------------------------------------
# Compatibility helpers (tests, ad-hoc inspection)
# --------------------------------------------------------------------------------------


@dataclass
class ExistingOutput:
    """What a previous (possibly killed) run left in an output folder, after clean-up."""

    feedback_keys: pa.Table  # (sample_id, level_tokens) of every committed feedback row
    rejected: set[str]  # samples with a committed score-stage error row
    feedback_parts: int = 0
    removed: list[str] = field(default_factory=list)  # deleted leftovers (tmp files, orphan parts)


def scan_output(out: Path) -> ExistingOutput:
    """Delete uncommitted leftovers, then describe what is committed (through the index)."""
    index = RunIndex.load(out)
    rows = index.all_rows()
    keys = pa.table({
        "sample_id": pc.take(rows.column("sample_id"), pc.list_parent_indices(rows.column("levels"))),
        "level_tokens": pc.list_flatten(rows.column("levels")),
    })
    rejected = set(rows.filter(pc.is_valid(rows.column("code"))).column("sample_id").to_pylist())
    parts = len(pc.unique(rows.column("part"))) if rows.num_rows else 0
    return ExistingOutput(keys, rejected, parts, index.removed)


def dedupe(out: Path) -> int:
    """``RunIndex.dedupe`` of a folder (every table); returns the rows removed."""
    return RunIndex.load(out, clean=False).dedupe()


# --------------------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another process is writing to this run folder."""

    exit_code = 6  # cli.EXIT_CODES: the run folder is locked by another writer


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc), to tell a pid reused by another process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """The exclusive lock of one run folder (see the module docstring); use as a context manager."""

    def __init__(self, run: Path, fd: int, record: dict, previous: dict | None):
        self.run, self._fd, self.record, self.previous = run, fd, record, previous

    @classmethod
    def acquire(cls, run: Path, command: str) -> RunLock:
        """Take the lock or raise ``RunLocked`` naming the holder (host, pid, start time)."""
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        path = run / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(cls._held_message(run, cls._read(fd))) from None
            except OSError as err:  # no flock on this filesystem: the record alone decides
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                flocked = False
            previous = cls._read(fd)
            if not flocked and previous and not previous.get("released"):
                same_host = previous.get("host") == socket.gethostname()
                if not same_host or _alive(int(previous.get("pid", 0)), previous.get("pid_start")):
                    raise RunLocked(cls._held_message(run, previous))
            record = {
                "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "command": command, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "released": False,
            }
            cls._write(fd, record)
            return cls(run, fd, record, previous if previous and not previous.get("released") else None)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _read(fd: int) -> dict | None:
        for _ in range(5):  # the holder may be writing its record right now
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
            if not data.strip():
                return None
            try:
                return json.loads(data)
            except ValueError:
                time.sleep(0.05)
        return None

    @staticmethod
    def _write(fd: int, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _held_message(run: Path, holder: dict | None) -> str:
        if not holder:
            who = "another process (no record yet)"
        else:
            who = (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"started {holder.get('started', '?')})")
        return (f"{run}: locked by {who}. Wait for it to finish or stop it (what it committed is kept); "
                f"one writer per run folder")

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            self.record["released"] = True
            self._write(self._fd, self.record)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(previous: dict | None) -> str:
    """One phrase about a dead previous holder of the lock (for a log line)."""
    if not previous:
        return ""
    return (f"took over the lock of `{previous.get('command', '?')}` (pid {previous.get('pid', '?')} on "
            f"{previous.get('host', '?')}, started {previous.get('started', '?')}), which ended without releasing it")

