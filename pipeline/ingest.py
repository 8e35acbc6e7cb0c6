"""``rglf ingest``: LLaVA-format JSON/JSONL -> the ``samples`` table the scoring job reads.

Input: one or more files, each a JSON list of records (LLaVA's ``llava_v1_5_mix665k.json``
layout), JSONL (one record per line), or one record / concatenated records as pretty-printed
JSON objects::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...],
     "source": "coco", "split": "train"}           # source / split are optional

Files are read INCREMENTALLY (``read_records``: 1 MiB at a time, one record decoded at a time
with the C JSON decoder) and samples are written in row groups of ``rows_per_group`` rows, so
peak memory does not depend on the file's size (an 18-byte digest + location per id is kept
to find duplicates: ~18 MB for 1M records).

Output (``RUN/``; written into hidden staging folders swapped in at the end, so a reader -- or
an interrupted ingest -- sees either the old tables or the new ones)::

    RUN/samples/part-00000.parquet   SAMPLES_SCHEMA, one row per kept conversation, input order
    RUN/errors/ingest-00000.parquet  ERRORS_SCHEMA (stage "ingest"), one row per rejected record (0 rows
                                     when none: every table folder holds a schema'd file)
    RUN/ingest.json                  inputs, options and counts (written last)

The image root is stored ABSOLUTE in every row (``os.path.abspath`` of ``--image-root``), so a
later ``rglf score`` from another working directory reads the same files.

Rules, one per record (``code`` of its error row in parentheses):

- ``sample_id`` is the record's ``id`` (a string, or an integer written in decimal). A record
  without one is rejected (``missing_id``; ``bad_id`` for another type): an invented id (a row
  number, a hash of the content) would change when the files are edited, and the resume logic
  and every join downstream key on it. A repeated id keeps the FIRST record and rejects the
  later ones (``duplicate_id``), across all input files.
- ``image`` (a path under ``--image-root``, stored as given) is optional (``bad_image_field``
  when it is not a string): without it the sample is text-only, and ``<image>`` must then not
  appear in its text (``image_placeholder_without_image``). With it, the first human turn holds
  the image; ``<image>`` may be anywhere in that turn (the template moves it to the front, as
  LLaVA does) or absent (then it is put first as well), at most once (``several_placeholders``).
  Whether the image file exists, decodes and lies inside the image root is checked by
  ``rglf score`` (stage ``load_image``), not here: ingest never opens the image store.
- ``conversations``: alternating human / gpt turns (``user`` / ``assistant`` accepted), human
  first, ending with an answer (``bad_conversation``); every answer non-empty
  (``empty_answer``). Multi-turn conversations are one sample (all answers scored together).
- ``source``: the record's own ``source`` key, else ``--source``, else the input file's stem.
  ``split``: the record's ``split``, else ``--split``, else null.
- Encoding and syntax, per record: a record that is not a JSON object (``not_an_object``),
  not valid JSON (``invalid_json``: a bad JSONL line, or a list element whose brackets balance;
  the rest of the file is read on), holding bytes that are not UTF-8 or lone surrogate escapes
  (``invalid_utf8``), or nested deeper than the JSON decoder's limit (``too_deep``). A UTF-8
  byte-order mark is skipped. Refused with one line naming the file and position (exit 2,
  nothing written): UTF-16/32 files, a file that is not JSON at all, a top-level object that is
  not a record, a record over 256 MiB.

Exit status of the command: 0 when every record was kept, 3 when some were rejected or the
input held no record at all (a one-line warning), 2 refused, 6 when another process holds the
run folder, 130 on Ctrl-C (nothing is replaced).
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rglf.model.conversation import IMAGE_PLACEHOLDER, ConversationError, normalise_turns
from rglf.model.tables import ERRORS_SCHEMA, SAMPLES_SCHEMA

from .writer import RunLock, describe_holder, write_text_atomic

DETAIL_CHARS = 500  # an error row's ``detail`` keeps this much of the offending record
CHUNK_BYTES = 1 << 20  # bytes read at a time
MAX_RECORD_CHARS = 256 << 20  # one record larger than this is refused (it would have to be held whole)


class IngestError(RuntimeError):
    """The ingest cannot run at all (missing input, existing output without ``--force``, unreadable file)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C during an ingest: nothing was replaced (the CLI prints the message, exit 130)."""


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
    """LLaVA-format files (JSON list, JSONL, or JSON objects), read in the order given."""
    image_root: Path
    """Folder the records' ``image`` paths are relative to (stored ABSOLUTE in every row)."""
    out: Path
    """Output folder (later the ``RUN`` of ``rglf score``)."""
    source: str | None = None
    """``source`` for records without one (default: the input file's stem)."""
    split: str | None = None
    """``split`` for records without one (default: null)."""
    rows_per_part: int = 100_000
    """Rows per samples part file."""
    rows_per_group: int = 4096
    """Rows per Parquet row group (the unit held in memory while writing, and read by ``rglf score``)."""
    force: bool = False
    """Replace an existing ``RUN/samples`` (and the ingest errors) instead of refusing."""

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        self.image_root = Path(self.image_root)
        self.out = Path(self.out)
        if not self.inputs:
            raise ValueError("give at least one input file")
        if self.rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {self.rows_per_part}")
        if self.rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {self.rows_per_group}")
        for name in ("source", "split"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must not be blank")


@dataclass
class IngestReport:
    """Counts of one ingest (also saved as ``RUN/ingest.json``)."""

    records: int = 0
    samples: int = 0
    text_only: int = 0
    multi_turn: int = 0
    rejected: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    samples_by_source: dict[str, int] = field(default_factory=dict)
    sample_parts: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0: every record kept; 3: some records were rejected (see ``RUN/errors``) or there were none."""
        return 3 if (self.rejected or not self.records) else 0

    def summary(self) -> str:
        if not self.records:
            return "ingest: the input holds no records: nothing to score (an empty file or list?)"
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_code.items()))
        return (
            f"ingest: {self.samples} samples from {self.records} records "
            f"({self.text_only} text-only, {self.multi_turn} multi-turn), "
            f"{self.rejected} rejected" + (f" ({rejected})" if rejected else "")
        )


# --------------------------------------------------------------------------------------
# Reading records, incrementally
# --------------------------------------------------------------------------------------

_NON_WS = re.compile(r"[^ \t\r\n]")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SPECIAL = re.compile(r'[\[\]{}"]')
_SCALAR_END = re.compile(r"[,\]}\s]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def value_end(buf: str, pos: int) -> int | None:
    """End of the JSON value starting at ``buf[pos]`` by bracket counting (no recursion), None if incomplete."""
    c = buf[pos]
    if c == '"':
        m = _STRING.match(buf, pos)
        return m.end() if m else None
    if c not in "[{":
        m = _SCALAR_END.search(buf, pos)
        return m.start() if m else None
    depth, i = 0, pos
    while True:
        m = _SPECIAL.search(buf, i)
        if m is None:
            return None
        j = m.start()
        ch = buf[j]
        if ch == '"':
            s = _STRING.match(buf, j)
            if s is None:
                return None
            i = s.end()
            continue
        depth += 1 if ch in "[{" else -1
        i = j + 1
        if depth == 0:
            return i


class _Text:
    """A binary file decoded incrementally (UTF-8; bad bytes kept as surrogates and flagged per record)."""

    def __init__(self, fh: BinaryIO, path: Path):
        self.fh, self.path = fh, path
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_dropped = 0

    def more(self) -> bool:
        """Read another chunk (dropping the consumed prefix); False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(CHUNK_BYTES)
        self.lines_dropped += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + self.decoder.decode(data, final=not data)
        self.pos = 0
        if not data:
            self.eof = True
        if len(self.buf) > MAX_RECORD_CHARS + CHUNK_BYTES:
            raise IngestError(f"{self.path}: a record at {self.where(0)} is larger than {MAX_RECORD_CHARS >> 20} MiB; "
                              "split the file or fix the record")
        return True

    def peek(self) -> str | None:
        """The next non-blank character (position left on it), None at the end of the file."""
        while True:
            m = _NON_WS.search(self.buf, self.pos)
            if m is not None:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.more():
                return None

    def where(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        line = self.lines_dropped + self.buf.count("\n", 0, pos) + 1
        column = pos - (self.buf.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {column}"


def _decode_values(text: _Text, path: Path, decoder: json.JSONDecoder, where: str):
    """Decode the value at ``text.pos``: (value, None) or (None, RecordError); the position moves past it."""
    while True:
        start = text.pos
        try:
            value, end = decoder.raw_decode(text.buf, start)
        except json.JSONDecodeError as err:
            end = value_end(text.buf, start)
            if end is None and text.more():
                continue
            if end is None:
                at = text.where(start)
                text.pos = len(text.buf)
                error = RecordError("invalid_json", f"{where}: the file ends inside this record (it starts at {at})")
                error.truncated = True  # type: ignore[attr-defined]
                return None, error
            at = text.where(err.pos)
            text.pos = end
            return None, RecordError("invalid_json", f"{where}: not valid JSON ({err.msg} at {at})")
        except RecursionError:
            end = value_end(text.buf, start)
            if end is None and text.more():
                continue
            text.pos = len(text.buf) if end is None else end
            return None, RecordError("too_deep", f"{where}: nested deeper than the JSON decoder's limit")
        if end == len(text.buf) and not text.eof and text.buf[start] not in '{["' and text.more():
            continue  # a number or literal cut by the chunk boundary
        text.pos = end
        return value, None


def _iter_list(text: _Text, path: Path) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    text.pos += 1  # the "["
    index = 0
    while True:
        c = text.peek()
        if c is None:
            yield f"{path}[{index}]", RecordError(
                "invalid_json", f"{path}: the file ends before the JSON list is closed (after record [{index - 1}])")
            return
        if c == "]":
            text.pos += 1
            if text.peek() is not None:
                yield f"{path}[{index}]", RecordError(
                    "invalid_json", f"{path}: unexpected data after the end of the JSON list at {text.where()}; ignored")
            return
        if index:
            if c == ",":
                text.pos += 1
                c = text.peek()
                if c == "]" or c is None:
                    continue
            elif c in "{[":
                yield f"{path}[{index}]", RecordError(
                    "invalid_json", f"{path}[{index}]: missing ',' before this record at {text.where()} (record read anyway)")
            else:
                raise IngestError(f"{path}: not valid JSON at {text.where()} (expected ',' or ']' after record "
                                  f"[{index - 1}]); fix the file")
        where = f"{path}[{index}]"
        value, error = _decode_values(text, path, decoder, where)
        yield where, error if error is not None else value
        if getattr(error, "truncated", False):
            return
        index += 1


def _iter_objects(text: _Text, path: Path) -> Iterator[tuple[str, Any]]:
    """Top-level JSON values one after the other (a pretty-printed record, or several)."""
    decoder = json.JSONDecoder()
    index = 0
    while text.peek() is not None:
        where = f"{path}[{index}]"
        at = text.where()
        value, error = _decode_values(text, path, decoder, where)
        if index == 0 and isinstance(value, dict) and "conversations" not in value and "id" not in value:
            keys = ", ".join(list(value)[:5])
            raise IngestError(f"{path}: the file holds a JSON object at {at} that is not a record (keys: {keys}); "
                              "give a JSON list of records or JSONL")
        yield where, error if error is not None else value
        index += 1


def _iter_lines(fh: BinaryIO, path: Path, skip: int) -> Iterator[tuple[str, Any]]:
    fh.seek(skip)
    for lineno, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        line = raw.decode("utf-8", "surrogateescape")
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, RecordError("invalid_json", f"{where}: not valid JSON ({err.msg}, column {err.colno})")
        except RecursionError:
            yield where, RecordError("too_deep", f"{where}: nested deeper than the JSON decoder's limit")


def _looks_like_jsonl(fh: BinaryIO, skip: int) -> bool:
    """True when one of the first two non-blank lines is a complete JSON value on its own."""
    fh.seek(skip)
    seen = 0
    for raw in fh:
        if not raw.strip():
            continue
        try:
            json.loads(raw.decode("utf-8", "surrogateescape"))
            return True
        except (ValueError, RecursionError):
            seen += 1
            if seen >= 2:
                return False
    return False


def read_records(path: Path, position: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record or RecordError) of every record of one file, read incrementally.

    ``location`` is ``file[index]`` for a JSON list (or objects) and ``file:line`` for JSONL.
    ``position(bytes_read)`` is called as the file is consumed. ``IngestError`` when the file
    cannot be read as LLaVA JSON at all (see the module docstring).
    """
    with path.open("rb") as fh:
        head = fh.read(4)
        for bom, name in _BOMS:
            if head.startswith(bom):
                raise IngestError(f"{path}: the file is {name} (byte-order mark at byte 0); convert it to UTF-8")
        skip = 3 if head.startswith(codecs.BOM_UTF8) else 0
        fh.seek(skip)
        text = _Text(fh, path)
        first = text.peek()
        if first is None:
            return  # empty: no records
        if first == "[":
            kind = "list"
        elif first == "{":
            kind = "lines" if _looks_like_jsonl(fh, skip) else "objects"
        else:
            raw = first.encode("utf-8", "surrogateescape")[:1]
            raise IngestError(f"{path}: not JSON or JSONL (the first character at {text.where()} is {raw!r}, "
                              "expected '[' or '{')")
        if kind == "lines":
            records = _iter_lines(fh, path, skip)
        else:
            if kind == "objects":  # _looks_like_jsonl moved the file position: start over
                fh.seek(skip)
                text = _Text(fh, path)
                text.peek()
            records = _iter_list(text, path) if kind == "list" else _iter_objects(text, path)
        for i, item in enumerate(records):
            yield item
            if position is not None and i % 1024 == 0:
                position(fh.tell())
        if position is not None:
            position(fh.tell())


def _bad_text(row: dict) -> str | None:
    """The field of a samples row holding a lone surrogate (undecodable bytes, or a bad \\ud8xx escape)."""
    for name in ("sample_id", "source", "split", "image"):
        value = row[name]
        if value is not None and not value.isascii() and _SURROGATE.search(value):
            return name
    for i, turn in enumerate(row["turns"]):
        if not turn["text"].isascii() and _SURROGATE.search(turn["text"]):
            return f"turn {i}"
    return None


def _clean(text: str) -> str:
    """``text`` with undecodable bytes / lone surrogates replaced (storable as UTF-8)."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


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
    return _clean(f"{where}: {text}"[:DETAIL_CHARS])


# --------------------------------------------------------------------------------------
# Duplicate ids in bounded memory
# --------------------------------------------------------------------------------------


class SeenIds:
    """Every id seen so far: a 12-byte blake2b digest each, in sorted numpy arrays (+ a small dict of recent ones).

    ``add`` returns where the id was first seen (file number, position) or None. 18 bytes per id
    (digest, file, position) instead of a Python string per id (a set of 1M ids is ~100 MB);
    merging the recent ids in inserts column by column, so the peak stays near the arrays' own
    size. Two different ids collide with probability ~n^2 / 2^97 (1M ids: 6e-18).
    """

    RECENT = 16384

    def __init__(self) -> None:
        self.hi = np.empty(0, np.uint64)
        self.lo = np.empty(0, np.uint32)
        self.file = np.empty(0, np.uint16)
        self.pos = np.empty(0, np.uint32)
        self.recent: dict[bytes, tuple[int, int]] = {}

    def add(self, sample_id: str, file: int, pos: int) -> tuple[int, int] | None:
        digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
        first = self.recent.get(digest)
        if first is not None:
            return first
        if len(self.hi):
            hi = int.from_bytes(digest[:8], "little")
            lo = int.from_bytes(digest[8:], "little")
            i = int(np.searchsorted(self.hi, np.uint64(hi)))
            while i < len(self.hi) and int(self.hi[i]) == hi:
                if int(self.lo[i]) == lo:
                    return int(self.file[i]), int(self.pos[i])
                i += 1
        self.recent[digest] = (file, pos)
        if len(self.recent) >= self.RECENT:
            self._merge()
        return None

    def _merge(self) -> None:
        raw = np.frombuffer(b"".join(self.recent), dtype=np.uint8).reshape(-1, 12)
        hi = raw[:, :8].copy().view("<u8").ravel().astype(np.uint64)
        lo = raw[:, 8:].copy().view("<u4").ravel().astype(np.uint32)
        where = np.array(list(self.recent.values()), dtype=np.int64).reshape(-1, 2)
        order = np.argsort(hi, kind="stable")
        at = np.searchsorted(self.hi, hi[order])
        self.hi = np.insert(self.hi, at, hi[order])
        self.lo = np.insert(self.lo, at, lo[order])
        self.file = np.insert(self.file, at, where[order, 0].astype(np.uint16))
        self.pos = np.insert(self.pos, at, np.minimum(where[order, 1], 2**32 - 1).astype(np.uint32))
        self.recent = {}


# --------------------------------------------------------------------------------------
# Writing, in row groups
# --------------------------------------------------------------------------------------


class _PartWriter:
    """Rows -> ``folder/<prefix>NNNNN.parquet`` files of ``rows_per_part`` rows, written ``rows_per_group`` at a time."""

    def __init__(self, folder: Path, prefix: str, schema: pa.Schema, rows_per_part: int, rows_per_group: int):
        self.folder, self.prefix, self.schema = folder, prefix, schema
        self.rows_per_part, self.rows_per_group = rows_per_part, rows_per_group
        self.buffer: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.tmp: Path | None = None
        self.parts = 0
        self.in_part = 0
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= min(self.rows_per_group, self.rows_per_part - self.in_part):
            self._write()

    def _write(self) -> None:
        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.tmp = self.folder / f".{self.prefix}{self.parts:05d}.parquet.tmp"
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.in_part += len(self.buffer)
        self.rows += len(self.buffer)
        self.buffer = []
        if self.in_part >= self.rows_per_part:
            self._close_part()

    def _close_part(self) -> None:
        assert self.writer is not None and self.tmp is not None
        self.writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.folder / f"{self.prefix}{self.parts:05d}.parquet")
        self.writer, self.tmp = None, None
        self.parts += 1
        self.in_part = 0

    def close(self, *, at_least_one: bool) -> int:
        """Write what is buffered; an empty table still gets one (schema'd, 0-row) part when ``at_least_one``."""
        if self.buffer or (at_least_one and self.parts == 0 and self.writer is None):
            self._write()
        if self.writer is not None:
            self._close_part()
        return self.parts


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def run_ingest(cfg: IngestConfig, log: Callable[[str], None] = print,
               progress: Callable[[int, int | None, dict | None], None] | None = None) -> IngestReport:
    """Read every input file, validate its records, write ``RUN/samples`` and ``RUN/errors/ingest-*``.

    ``progress(done, total, fields)`` reports MiB read of the inputs' total, with the records and
    rejections so far.
    """
    for path in cfg.inputs:
        if not path.is_file():
            raise IngestError(f"input file {path} does not exist")
    samples_dir = cfg.out / "samples"
    if samples_dir.exists() and any(samples_dir.glob("*.parquet")) and not cfg.force:
        raise IngestError(f"{samples_dir} already holds samples; pass --force to replace them")
    with RunLock.acquire(cfg.out, "rglf ingest") as lock:
        if lock.previous:
            log(describe_holder(lock.previous))
        return _ingest_locked(cfg, log, progress)


def _ingest_locked(cfg: IngestConfig, log, progress) -> IngestReport:
    start = time.perf_counter()
    samples_dir = cfg.out / "samples"
    errors_dir = cfg.out / "errors"
    image_root = os.path.abspath(cfg.image_root)
    if not os.path.isdir(image_root):
        log(f"warning: the image root {image_root} is not a folder here; `rglf score` refuses to start until it is")
    report = IngestReport()
    sizes = [p.stat().st_size for p in cfg.inputs]
    report.input_bytes = sum(sizes)
    total_mib = max(1, -(-report.input_bytes // 2**20))
    rejected_by_code: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    seen = SeenIds()
    token = uuid.uuid4().hex[:8]
    staging = cfg.out / f".samples-{token}"
    errors_staging = cfg.out / f".errors-{token}"
    samples = _PartWriter(staging, "part-", SAMPLES_SCHEMA, cfg.rows_per_part, cfg.rows_per_group)
    errors = _PartWriter(errors_staging, "ingest-", ERRORS_SCHEMA, cfg.rows_per_part, cfg.rows_per_group)
    done_bytes = 0
    last_report = 0.0

    line_based: dict[int, bool] = {}  # file number -> locations are file:line (JSONL)

    def position(nbytes: int) -> None:
        nonlocal last_report
        now = time.perf_counter()
        if progress is not None and now - last_report >= 0.2:
            last_report = now
            progress((done_bytes + nbytes) >> 20, total_mib, {"records": report.records, "rejected": report.rejected})

    def reject(err: RecordError, where: str, record: Any, default_source: str) -> None:
        known = record.get("id") if isinstance(record, dict) else None
        src = record.get("source") if isinstance(record, dict) else None
        errors.add({
            "sample_id": None if known is None or isinstance(known, dict | list) else _clean(str(known)),
            "stage": "ingest",
            "reason": _clean(err.reason),
            "source": _clean(src) if isinstance(src, str) else default_source,
            "detail": _detail(where, record if not isinstance(record, RecordError) else ""),
            "code": err.code,
        })
        report.rejected += 1
        rejected_by_code[err.code] += 1

    try:
        for file_no, (path, size) in enumerate(zip(cfg.inputs, sizes, strict=True)):
            default_source = cfg.source or path.stem
            for where, record in read_records(path, position):
                report.records += 1
                try:
                    if isinstance(record, RecordError):
                        raise record
                    row = parse_record(
                        record, where, default_source=default_source, default_split=cfg.split, image_root=image_root
                    )
                    bad = _bad_text(row)
                    if bad is not None:
                        raise RecordError("invalid_utf8", f"{_clean(where)} (id {_clean(row['sample_id'])}): {bad} holds "
                                          "bytes that are not valid UTF-8 (or a lone surrogate escape)")
                    line_based.setdefault(file_no, where[len(str(path)) : len(str(path)) + 1] == ":")
                    first = seen.add(row["sample_id"], file_no, _position(where))
                    if first is not None:
                        seen_at = _location(cfg.inputs[first[0]], first[1], line_based.get(first[0], False))
                        raise RecordError(
                            "duplicate_id",
                            f"{where}: duplicate id {row['sample_id']!r}, first seen at {seen_at}; this copy is dropped",
                        )
                except RecordError as err:
                    reject(err, where, record, default_source)
                    continue
                samples.add(row)
                report.samples += 1
                report.text_only += row["image"] is None
                report.multi_turn += len(row["turns"]) > 2
                by_source[row["source"]] += 1
            done_bytes += size
        report.sample_parts = samples.close(at_least_one=True)
        errors.close(at_least_one=True)  # a schema'd 0-row file when nothing was rejected
    except BaseException as err:
        for folder in (staging, errors_staging):
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, KeyboardInterrupt):
            raise IngestInterrupted(
                f"interrupted after {report.records} records; nothing was replaced ({samples_dir} is as before). "
                "Rerun the same command"
            ) from None
        raise
    if progress is not None:
        progress(total_mib, total_mib, {"records": report.records, "rejected": report.rejected})
    report.rejected_by_code = dict(rejected_by_code)
    report.samples_by_source = dict(by_source)

    # Swap the new tables in: samples in one rename (a reader sees the old table or the new one).
    if samples_dir.exists():
        old = cfg.out / f".samples-old-{token}"
        os.replace(samples_dir, old)
        os.replace(staging, samples_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, samples_dir)
    errors_dir.mkdir(parents=True, exist_ok=True)
    for old_part in errors_dir.glob("ingest-*.parquet"):
        old_part.unlink()
    if errors_staging.is_dir():
        for part in sorted(errors_staging.glob("ingest-*.parquet")):
            os.replace(part, errors_dir / part.name)
        shutil.rmtree(errors_staging, ignore_errors=True)

    report.seconds = time.perf_counter() - start
    manifest = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        | {"inputs": [str(p) for p in cfg.inputs], "image_root": image_root},
        "counts": asdict(report),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(cfg.out / "ingest.json", json.dumps(manifest, indent=2) + "\n")
    if not report.records:
        log("warning: the input holds no records (empty files or lists); the samples table is empty")
    log(report.summary() + f" -> {cfg.out}")
    return report


def _position(where: str) -> int:
    """The index (``file[12]``) or line (``file:12``) at the end of a location."""
    tail = where.rsplit("[", 1)[-1] if where.endswith("]") else where.rsplit(":", 1)[-1]
    digits = tail.rstrip("]")
    return int(digits) if digits.isdigit() else 0


def _location(path: Path, pos: int, line_based: bool) -> str:
    return f"{path}:{pos}" if line_based else f"{path}[{pos}]"
