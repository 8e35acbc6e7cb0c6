"""Ad-hoc DuckDB SQL over a run's tables (``rglf sql``).

``open_catalog`` registers one view per table that exists:

- from a scoring output folder (``--run OUT``): ``samples``, ``feedback``, ``errors``
  (``OUT/<table>/`` part files, or ``OUT/<table>.parquet``); ``errors`` is always there, empty
  when nothing was rejected;
- from a rank folder (``--rank RANK``): ``rankings``, ``pairs``, ``preferences``,
  ``excluded``; and ``feedback`` from the folder ``rank_report.json`` names when ``--run`` is
  not given and that folder still exists.

``run_sql`` runs the query and prints a table or writes csv / json / parquet. DuckDB errors
become ``QueryError`` carrying DuckDB's own message. ``SHOW TABLES`` lists the views.

Read-only: the command is for analysis and can neither change nor exfiltrate a file.

- The views are Arrow datasets registered from Python (the files are opened by pyarrow, not
  by SQL), then the connection is sealed: ``enable_external_access = false`` (no file, network
  or extension access from SQL: ``COPY``, ``read_text``/``read_csv``/``read_parquet``/``glob``,
  ``ATTACH`` of a file, ``INSTALL``/``LOAD``, ``EXPORT DATABASE`` all fail), ``temp_directory =
  ''`` (no spilling: a query that outgrows ``memory_limit`` fails instead of writing), then
  ``lock_configuration = true`` (no ``SET``/``RESET``/``PRAGMA`` can undo any of it).
- ``COPY``, ``EXPORT``, ``ATTACH``/``DETACH`` and ``INSTALL``/``LOAD`` statements are refused up
  front with a message pointing at ``--output``; in-memory statements (``CREATE TEMP VIEW``,
  ``CREATE MACRO``, ``SET VARIABLE``) only live for the command.
- ``--output FILE`` is the only write: the result streams as Arrow from the sealed connection
  into a second connection that runs exactly one ``COPY result TO FILE`` of our own (DuckDB's
  csv/parquet writers), into a temp name renamed over ``FILE``.
- Values are converted through Arrow (Python's ``zoneinfo``), so ``TIMESTAMP WITH TIME ZONE``
  columns (``select now()``) need no ``pytz``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from rglf.model.tables import ERRORS_SCHEMA
from rglf.pipeline.rank import (
    REPORT_NAME,
    TABLES,
    FeedbackError,
    parquet_files,
    resolve_table,
    run_interruptibly,
)

if TYPE_CHECKING:
    from rich.table import Table

RUN_TABLES = ("samples", "feedback", "errors")
RANK_TABLES = TABLES
FORMATS = ("table", "csv", "json", "parquet")
# Statements refused before they reach DuckDB (the sealed connection would refuse most of them too).
_WRITE_HINT = "Write a result with --format csv|json|parquet --output FILE"
_TABLES_HINT = "Query the views of --run / --rank (SHOW TABLES lists them)"
REFUSED_STATEMENTS = {
    "COPY": f"COPY writes or reads files. {_WRITE_HINT}",
    "COPY_DATABASE": f"COPY FROM DATABASE writes a database. {_WRITE_HINT}",
    "EXPORT": f"EXPORT DATABASE writes files. {_WRITE_HINT}",
    "ATTACH": f"ATTACH opens another database. {_TABLES_HINT}",
    "DETACH": f"DETACH changes the attached databases. {_TABLES_HINT}",
    "LOAD": f"INSTALL/LOAD add extensions. {_TABLES_HINT}",
}


class QueryError(RuntimeError):
    """A query DuckDB rejected or failed to run; the message is DuckDB's."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass
class SqlConfig:
    """Options of ``rglf sql``."""

    query: str
    """The SQL to run (DuckDB dialect); several statements may be given, the last one's result
    is shown."""
    run: Path | None = None
    """A scoring output folder: registers ``samples``, ``feedback``, ``errors`` if present."""
    rank: Path | None = None
    """A rank output folder: registers ``rankings``, ``pairs``, ``preferences``, ``excluded``."""
    format: str = "table"
    """``table`` (pretty, on the terminal), ``csv``, ``json`` (an array of records), or
    ``parquet`` (needs ``output``)."""
    output: Path | None = None
    """File to write csv / json / parquet to (written atomically); None: standard output."""
    max_rows: int = 100
    """``table`` format: rows shown at most (the query itself is not limited)."""
    threads: int | None = None
    """DuckDB threads; None: the core count."""
    memory_limit: str | None = None
    """DuckDB memory limit such as ``"4GB"``; None: DuckDB's default."""

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise ValueError("the query is empty")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "parquet" and self.output is None:
            raise ValueError("--format parquet needs --output FILE")
        if self.format == "table" and self.output is not None:
            raise ValueError("--output needs --format csv, json or parquet")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        for name in ("run", "rank"):
            folder = getattr(self, name)
            if folder is not None:
                folder = Path(folder)
                if not folder.is_dir():
                    raise ValueError(f"--{name} {folder} is not a folder")
                setattr(self, name, folder)
        if self.output is not None:
            self.output = Path(self.output)


def _table_files(folder: Path, table: str) -> list[Path]:
    if (folder / table).is_dir():
        return parquet_files(folder / table)
    if (folder / f"{table}.parquet").is_file():
        return [folder / f"{table}.parquet"]
    return []


def _ranked_feedback(rank: Path) -> list[Path]:
    """The feedback files a rank folder was built from, if ``rank_report.json`` names them and they exist."""
    report_path = rank / REPORT_NAME
    if not report_path.is_file():
        return []
    try:
        return resolve_table(json.loads(report_path.read_text())["inputs"]["feedback"])[1]
    except (FeedbackError, KeyError, ValueError):
        return []


def _dataset(files: list[Path]) -> ds.Dataset:
    """The part files as one Arrow dataset, columns unioned by name (like ``union_by_name``)."""
    schemas = [pq.read_schema(f) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1 else schemas[0]
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet")


def sealed_connection(threads: int | None = None, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that will be sealed by ``seal`` once the views are registered."""
    config: dict[str, Any] = {
        "threads": threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1),
        "preserve_insertion_order": False,
        "temp_directory": "",  # no spilling: the command writes nothing but --output
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    }
    if memory_limit:
        config["memory_limit"] = memory_limit
    return duckdb.connect(":memory:", config=config)


def seal(con: duckdb.DuckDBPyConnection) -> None:
    """No file, network or extension access from SQL from now on, and no SET to undo it."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def open_catalog(
    run: Path | None = None,
    rank: Path | None = None,
    *,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
    """A sealed, read-only DuckDB connection with a view per existing table; returns it and ``{view: n_files}``."""
    found: dict[str, list[Path]] = {}
    if run is not None:
        found.update({t: _table_files(Path(run), t) for t in RUN_TABLES})
    if rank is not None:
        found.update({t: _table_files(Path(rank), t) for t in RANK_TABLES})
        if run is None:
            found["feedback"] = _ranked_feedback(Path(rank))
    con = sealed_connection(threads, memory_limit)
    try:
        for table, files in found.items():
            if files:
                con.register(table, _dataset(files))
        if run is not None and not found["errors"]:
            # A run that rejected nothing writes no errors part: "no errors" is an empty table, not a
            # missing one, so `select ... from errors` answers 0 rows instead of failing.
            con.register("errors", ERRORS_SCHEMA.empty_table())
        seal(con)
    except BaseException:
        con.close()
        raise
    return con, {table: len(files) for table, files in found.items() if files}


def check_read_only(query: str) -> None:
    """Refuse statements that would write, attach or load (``QueryError``, before anything runs)."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    for statement in statements:
        kind = statement.type.name
        if kind in REFUSED_STATEMENTS:
            raise QueryError(f"rglf sql is read-only: {REFUSED_STATEMENTS[kind]}")


def execute(con: duckdb.DuckDBPyConnection, query: str) -> duckdb.DuckDBPyRelation | None:
    """Run ``query``; the last statement's result as a relation (None if it returns nothing)."""
    check_read_only(query)
    try:
        return con.sql(query)
    except duckdb.PermissionException as e:
        raise QueryError(f"rglf sql is read-only (only the run's own tables can be read): {e}") from None
    except duckdb.Error as e:
        if "configuration has been locked" in str(e):
            raise QueryError(f"rglf sql is read-only (settings are locked): {e}") from None
        raise QueryError(str(e)) from None


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def export(rel: duckdb.DuckDBPyRelation, fmt: str, path: Path) -> None:
    """Write ``rel`` to ``path`` atomically (temp file + os.replace).

    csv and parquet stream as Arrow batches into DuckDB's own writers on a separate connection
    that runs only our ``COPY``; json (an array of records; NaN/inf as null; dates and other
    non-JSON values as strings) is built in memory.
    """
    path = Path(path)
    if path.is_dir():
        raise QueryError(f"--output {path}: is a folder. Name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh hidden name (not mkstemp: its 0600 mode would stick to the published file)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt in ("csv", "parquet"):
            options = "FORMAT csv, HEADER" if fmt == "csv" else "FORMAT parquet, COMPRESSION zstd"
            writer = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
            try:
                writer.register("result", rel.to_arrow_reader(batch_size=100_000))
                writer.execute(f"COPY result TO {_sql_string(str(tmp))} ({options})")
            finally:
                writer.close()
        elif fmt == "json":
            records = [_json_value(r) for r in rel.to_arrow_table().to_pylist()]
            tmp.write_text(json.dumps(records, indent=1, default=str) + "\n", encoding="utf-8")
        else:
            raise ValueError(f"cannot export as {fmt!r}")
        os.replace(tmp, path)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _visible_columns(widths: list[int], budget: int) -> list[int]:
    """Indices of the columns to show within ``budget`` characters: the outer ones first (as
    DuckDB's own renderer does); the hidden middle becomes one "..." column."""
    if sum(w + 3 for w in widths) + 1 <= budget:
        return list(range(len(widths)))
    left, right, used = 0, len(widths) - 1, 1 + 20  # outer border + the "(n more columns)" column
    keep: list[int] = []
    take_left = True
    while left <= right:
        i = left if take_left else right
        if used + widths[i] + 3 > budget:
            break
        keep.append(i)
        used += widths[i] + 3
        left, right = (left + 1, right) if take_left else (left, right - 1)
        take_left = not take_left
    return sorted(keep) or [0]


def format_table(rel: duckdb.DuckDBPyRelation, max_rows: int, width: int | None = None) -> tuple[Table, bool]:
    """The first ``max_rows`` rows of ``rel`` as a ``rich.table.Table``, and whether rows were cut.

    With ``width``, columns that do not fit are hidden from the middle outwards (a "(n more)"
    column says so) rather than squeezed to nothing.
    """
    from rich.table import Table
    from rich.text import Text  # plain Text: a value like "[b]" is data, not rich markup

    try:  # through Arrow: TIMESTAMP WITH TIME ZONE converts with zoneinfo, no pytz needed
        arrow = rel.limit(max_rows + 1).to_arrow_table()
        columns = [[_cell(v) for v in column.to_pylist()] for column in arrow.columns]  # duplicate names stay apart
        rows = [list(r) for r in zip(*columns, strict=True)] if columns else []
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    cut = len(rows) > max_rows
    rows = rows[:max_rows]
    names = list(rel.columns)
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    shown = _visible_columns(widths, width) if width else list(range(len(names)))
    gap = next((k for k in range(1, len(shown)) if shown[k] != shown[k - 1] + 1), None)
    table = Table(header_style="bold")
    for k, i in enumerate(shown):
        if k == gap:
            table.add_column(f"({shown[k] - shown[k - 1] - 1} more columns)", no_wrap=True, style="dim")
        numeric = any(t in str(rel.types[i]) for t in ("INT", "DOUBLE", "FLOAT", "DECIMAL"))
        table.add_column(Text(names[i]), justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        cells = [r[i] for i in shown]
        if gap is not None:
            cells.insert(gap, "...")
        table.add_row(*(Text(c) for c in cells))
    return table, cut


def run_sql(cfg: SqlConfig, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run ``cfg.query`` over the registered views and show or write its result.

    ``echo`` prints text (``table`` output goes through rich to standard output). Returns
    ``{"views": ..., "rows_shown" or "output": ...}``. Raises ``QueryError`` on a DuckDB error.
    """
    con, views = open_catalog(cfg.run, cfg.rank, threads=cfg.threads, memory_limit=cfg.memory_limit)
    try:
        return run_interruptibly(con, lambda: _run(con, views, cfg, echo))  # Ctrl-C stops a long query
    finally:
        con.close()


def _run(con: duckdb.DuckDBPyConnection, views: dict[str, int], cfg: SqlConfig, echo: Callable[[str], Any]) -> dict[str, Any]:
    """Run the query on the sealed connection and show or write its result (see ``run_sql``)."""
    rel = execute(con, cfg.query)
    if rel is None:
        echo("OK (the statement returned no rows)")
        return {"views": views}
    if cfg.format == "table":
        from rich.console import Console

        console = Console()
        # a terminal: fit its width; piped or captured: never hide a column
        table, cut = format_table(rel, cfg.max_rows, console.width if console.is_terminal else None)
        if not console.is_terminal:
            console = Console(width=100_000)
        console.print(table)
        if cut:
            echo(
                f"(first {cfg.max_rows} rows shown; add LIMIT, --max-rows, or --format csv --output FILE)"
            )
        else:
            echo(f"({table.row_count} row{'s' if table.row_count != 1 else ''})")
        return {"views": views, "rows_shown": min(table.row_count, cfg.max_rows)}
    if cfg.output is not None:
        export(rel, cfg.format, cfg.output)
        echo(f"wrote {cfg.output}")
        return {"views": views, "output": str(cfg.output)}
    with tempfile.TemporaryDirectory(prefix="rglf_sql_") as tmp:
        path = Path(tmp) / f"result.{cfg.format}"
        export(rel, cfg.format, path)
        text = path.read_text(encoding="utf-8")
    echo(text.rstrip("\n"))
    return {"views": views}
