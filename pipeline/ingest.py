"""``rglf ingest``: LLaVA-format JSON/JSONL -> the ``samples`` table the scoring job reads.

Input: one or more files, each either a JSON list of records (LLaVA's ``llava_v1_5_mix665k.json``
layout) or JSONL (one record per line; a file whose first non-blank character is not ``[``)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...],
     "source": "coco", "split": "train"}           # source / split are optional

Output (``OUT/``; every file written to a hidden temporary name, then ``os.replace``d)::

    OUT/samples/part-00000.parquet   SAMPLES_SCHEMA, one row per kept conversation, input order
    OUT/errors/ingest-00000.parquet  ERRORS_SCHEMA (stage "ingest"), one row per rejected record
    OUT/ingest.json                  inputs, options and counts (written last)

Rules, one per record:

- ``sample_id`` is the record's ``id`` (a string, or an integer written in decimal). A record
  without one is rejected (``missing_id``): an invented id (a row number, a hash of the
  content) would change when the files are edited, and the resume logic and every join
  downstream key on it. A repeated id keeps the FIRST record and rejects the later ones
  (``duplicate_id``), across all input files.
- ``image`` (a path under ``--image-root``, stored as given) is optional: without it the
  sample is text-only, and ``<image>`` must then not appear in its text. With it, the first
  human turn holds the image; ``<image>`` may be anywhere in that turn (the template moves
  it to the front, as LLaVA does) or absent (then it is put first as well), at most once.
  Whether the image file exists and decodes is checked by ``rglf score`` (stage
  ``load_image``), not here: ingest never touches the image store.
- ``conversations``: alternating human / gpt turns (``user`` / ``assistant`` accepted),
  human first, ending with an answer; every answer non-empty (``empty_answer``).
  Multi-turn conversations are one sample (all answers are scored together, SPEC).
- ``source``: the record's own ``source`` key, else ``--source``, else the input file's stem.
  ``split``: the record's ``split``, else ``--split``, else null.

Exit status of the command: 0 when every record was kept, 3 when some were rejected.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from rglf.model.conversation import IMAGE_PLACEHOLDER, ConversationError, normalise_turns
from rglf.model.tables import ERRORS_SCHEMA, SAMPLES_SCHEMA

from .writer import write_parquet_atomic, write_text_atomic

DETAIL_CHARS = 500  # an error row's ``detail`` keeps this much of the offending record


class IngestError(RuntimeError):
    """The ingest cannot run at all (missing input, existing output without ``--force``)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


class RecordError(ValueError):
    """One record that cannot become a sample; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class IngestConfig:
    """Options of ``rglf ingest``."""

    inputs: list[Path]
    """LLaVA-format files (JSON list or JSONL), read in the order given."""
    image_root: Path
    """Folder the records' ``image`` paths are relative to (stored in every row)."""
    out: Path
    """Output folder (later the ``RUN_DIR`` of ``rglf score``)."""
    source: str | None = None
    """``source`` for records without one (default: the input file's stem)."""
    split: str | None = None
    """``split`` for records without one (default: null)."""
    rows_per_part: int = 100_000
    """Rows per samples part file."""
    force: bool = False
    """Replace an existing ``OUT/samples`` (and the ingest errors) instead of refusing."""

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        self.image_root = Path(self.image_root)
        self.out = Path(self.out)
        if not self.inputs:
            raise ValueError("give at least one input file")
        if self.rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {self.rows_per_part}")
        for name in ("source", "split"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must not be blank")


@dataclass
class IngestReport:
    """Counts of one ingest (also saved as ``OUT/ingest.json``)."""

    records: int = 0
    samples: int = 0
    text_only: int = 0
    multi_turn: int = 0
    rejected: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    samples_by_source: dict[str, int] = field(default_factory=dict)
    sample_parts: int = 0

    @property
    def exit_code(self) -> int:
        """0: every record kept; 3: some records were rejected (see ``OUT/errors``)."""
        return 3 if self.rejected else 0

    def summary(self) -> str:
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_code.items()))
        return (
            f"ingest: {self.samples} samples from {self.records} records "
            f"({self.text_only} text-only, {self.multi_turn} multi-turn), "
            f"{self.rejected} rejected" + (f" ({rejected})" if rejected else "")
        )


# --------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) of every record of one file; unparsable JSONL lines come as RecordError.

    ``location`` is ``file[index]`` for a JSON list and ``file:line`` for JSONL. A JSON list
    that does not parse at all raises ``RecordError`` (the whole file is one error row).
    """
    with path.open("r", encoding="utf-8") as fh:
        head = ""
        while True:
            ch = fh.read(1)
            if not ch or not ch.isspace():
                head = ch
                break
        fh.seek(0)
        if head == "[":
            try:
                records = json.load(fh)
            except json.JSONDecodeError as err:
                raise RecordError("invalid_json", f"{path}: not valid JSON ({err})") from err
            for i, record in enumerate(records):
                yield f"{path}[{i}]", record
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RecordError("invalid_json", f"{where}: not valid JSON ({err.msg})")


def _text_field(record: dict, key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value.strip() else None


def parse_record(record: Any, where: str, *, default_source: str, default_split: str | None, image_root: str) -> dict:
    """One LLaVA record -> a samples row (dict in SAMPLES_SCHEMA order); RecordError if invalid."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"{where}: record is a {type(record).__name__}, not a JSON object")
    raw_id = record.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raise RecordError(
            "missing_id",
            f"{where}: record has no 'id' (ids are not invented: they must stay stable across runs)",
        )
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise RecordError("bad_id", f"{where}: 'id' must be a string or an integer, got {raw_id!r}")
    sample_id = str(raw_id)

    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        kind = "a list (several images per sample are not supported)" if isinstance(image, list) else repr(image)
        raise RecordError("bad_image_field", f"{where} (id {sample_id}): 'image' must be a path string, got {kind}")

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("bad_conversation", f"{where} (id {sample_id}): 'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise RecordError(
                "bad_conversation", f"{where} (id {sample_id}): turn {i} must be {{'from': str, 'value': str}}"
            )
        turns.append((turn["from"], turn["value"]))
    for i, (role, text) in enumerate(turns):
        if role.lower() in ("gpt", "assistant") and not text.strip():
            raise RecordError("empty_answer", f"{where} (id {sample_id}): answer in turn {i} is empty")
    try:
        turns = normalise_turns(turns)  # roles alternate, human first, ends with an answer
    except ConversationError as err:
        raise RecordError("bad_conversation", f"{where} (id {sample_id}): {err}") from err
    n_placeholders = turns[0][1].count(IMAGE_PLACEHOLDER)
    if image is None and n_placeholders:
        raise RecordError(
            "image_placeholder_without_image", f"{where} (id {sample_id}): text holds {IMAGE_PLACEHOLDER} but the record has no 'image'"
        )
    if n_placeholders > 1:
        raise RecordError(
            "several_placeholders", f"{where} (id {sample_id}): the first turn holds {IMAGE_PLACEHOLDER} {n_placeholders} times; one image per sample"
        )
    return {
        "sample_id": sample_id,
        "source": _text_field(record, "source") or default_source,
        "split": _text_field(record, "split") or default_split,
        "image": image,
        "image_root": image_root if image is not None else None,
        "turns": [{"role": role, "text": text} for role, text in turns],
    }


def _detail(where: str, record: Any) -> str:
    text = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, default=str)
    return f"{where}: {text}"[:DETAIL_CHARS]


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def run_ingest(cfg: IngestConfig, log=print) -> IngestReport:
    """Read every input file, validate its records, write ``OUT/samples`` and ``OUT/errors/ingest-*``."""
    for path in cfg.inputs:
        if not path.is_file():
            raise IngestError(f"input file {path} does not exist")
    samples_dir = cfg.out / "samples"
    errors_dir = cfg.out / "errors"
    if samples_dir.exists() and any(samples_dir.glob("*.parquet")) and not cfg.force:
        raise IngestError(f"{samples_dir} already holds samples; pass --force to replace them")

    report = IngestReport()
    rows: list[dict] = []
    errors: list[dict] = []
    first_seen: dict[str, str] = {}
    image_root = str(cfg.image_root)
    for path in cfg.inputs:
        default_source = cfg.source or path.stem
        try:
            for where, record in read_records(path):
                report.records += 1
                try:
                    if isinstance(record, RecordError):
                        raise record
                    row = parse_record(
                        record, where, default_source=default_source, default_split=cfg.split, image_root=image_root
                    )
                    if row["sample_id"] in first_seen:
                        raise RecordError(
                            "duplicate_id",
                            f"{where}: duplicate id {row['sample_id']!r}, first seen at {first_seen[row['sample_id']]}; "
                            "this copy is dropped",
                        )
                except RecordError as err:
                    known = record.get("id") if isinstance(record, dict) else None
                    src = record.get("source") if isinstance(record, dict) else None
                    errors.append(
                        {
                            "sample_id": None if known is None else str(known),
                            "stage": "ingest",
                            "reason": err.reason,
                            "source": src if isinstance(src, str) else default_source,
                            "detail": _detail(where, record if not isinstance(record, RecordError) else ""),
                            "code": err.code,
                        }
                    )
                    continue
                first_seen[row["sample_id"]] = where
                rows.append(row)
        except RecordError as err:  # the whole file is unreadable
            report.records += 1
            errors.append(
                {"sample_id": None, "stage": "ingest", "reason": err.reason, "source": default_source,
                 "detail": str(path), "code": err.code}
            )

    report.samples = len(rows)
    report.text_only = sum(1 for r in rows if r["image"] is None)
    report.multi_turn = sum(1 for r in rows if len(r["turns"]) > 2)
    report.rejected = len(errors)
    report.rejected_by_code = dict(Counter(e["code"] for e in errors))
    report.samples_by_source = dict(Counter(r["source"] for r in rows))

    # New samples go into a hidden folder that replaces the old one in one rename, so a reader
    # sees either the old table or the new one.
    cfg.out.mkdir(parents=True, exist_ok=True)
    staging = cfg.out / f".samples-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    n_parts = max(1, -(-len(rows) // cfg.rows_per_part))
    for k in range(n_parts):
        chunk = rows[k * cfg.rows_per_part : (k + 1) * cfg.rows_per_part]
        write_parquet_atomic(pa.Table.from_pylist(chunk, schema=SAMPLES_SCHEMA), staging / f"part-{k:05d}.parquet")
    report.sample_parts = n_parts
    if samples_dir.exists():
        old = cfg.out / f".samples-old-{uuid.uuid4().hex[:8]}"
        os.replace(samples_dir, old)
        os.replace(staging, samples_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, samples_dir)

    errors_dir.mkdir(parents=True, exist_ok=True)
    for old_part in errors_dir.glob("ingest-*.parquet"):
        old_part.unlink()
    if errors:
        write_parquet_atomic(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), errors_dir / "ingest-00000.parquet")

    manifest = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        | {"inputs": [str(p) for p in cfg.inputs]},
        "counts": asdict(report),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(cfg.out / "ingest.json", json.dumps(manifest, indent=2) + "\n")
    log(report.summary() + f" -> {cfg.out}")
    return report
