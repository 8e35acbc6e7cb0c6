"""Rank feedback in DuckDB SQL: ``rankings``, ``pairs``, ``preferences`` (``rglf rank``).

Stages, each one query in ``pipeline/sql/<name>.sql`` (a chain of CTEs):

1. ``ladder``         feedback -> the run's ladder = every distinct ``level_tokens`` (unless
                      ``RankConfig.levels`` fixes it).
2. ``sample_checks``  feedback -> one row per sample: its levels as a list, key problems, and
                      the reasons that exclude it (missing level, unexpected level, NaN/NULL or
                      infinite NLL, inconsistent source/split). The only full pass over feedback.
3. ``validate``       sample_checks -> NULL keys and duplicate (sample_id, level_tokens) keys
                      are an ERROR (``FeedbackError``, details from ``duplicates``): ranking a
                      sample twice at one level would double count it.
4. ``excluded``       sample_checks -> one row per (excluded sample, reason): written to
                      ``excluded/`` and counted in ``rank_report.json``, never silently dropped.
5. ``ranked_samples`` sample_checks -> per valid sample, its levels in rank order
                      (ARCHITECTURE.md "Ranking semantics": tolerance ties go to fewer tokens).
6. ``rankings``       ranked_samples -> one row per (sample, level) with its rank.
7. ``pairs``          ranked_samples -> every (better, worse) pair of levels with the SPEC's
                      adaptive margin ``m * j * (nll_worse - nll_better)``.
8. ``preferences``    rankings -> per source (and '__all__') and policy (each fixed level, the
                      oracle): best-level shares, visual tokens, NLL, regret, greedy accuracy.

Values reach the SQL only as DuckDB prepared-statement parameters (``$abs_tol`` ...); the
feedback files are registered as the view ``feedback``. Outputs are written into a hidden
temporary folder inside ``--out`` and moved into place with ``os.replace``, the report last,
so a reader never sees a half-written table and ``rank_report.json`` marks a finished run.

Output folder (Parquet, snappy; row order is not meaningful, sort in your query)::

    OUT/rankings/part-0.parquet     one row per (valid sample, level)
        sample_id, source, split, level_tokens, level_index, n_visual_tokens, nll_mean,
        greedy_match, rank, in_tie_set, best_level_tokens, best_n_visual_tokens,
        min_nll_mean, regret, n_levels
    OUT/pairs/part-0.parquet        one row per (valid sample, better level, worse level)
        sample_id, better_level_tokens, worse_level_tokens, better_level_index,
        worse_level_index, better_rank, worse_rank, gap, better_nll_mean, worse_nll_mean,
        nll_diff, margin, within_tie_set
    OUT/preferences/part-0.parquet  one row per (source or '__all__', policy fixed/oracle, level)
        source, policy, level_tokens, level_index, n_samples, n_best, best_share,
        mean_level_tokens, mean_visual_tokens, token_reduction_vs_finest, mean_nll,
        mean_regret, greedy_accuracy
    OUT/excluded/part-0.parquet     one row per (excluded sample, reason)
        sample_id, source, split, n_levels, reason
    OUT/rank_report.json            resolved config, inputs, ladder, exclusions (counts and
                                    capped id lists per reason), row counts, timings

The meaning of every column is documented in its ``.sql`` file.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import duckdb

# Tables written by ``run_rank`` (one folder each), in the order they are built.
TABLES = ("rankings", "pairs", "preferences", "excluded")
# Exclusion reasons, as columns of ``sample_checks.sql``.
EXCLUSION_REASONS = ("missing_level", "unexpected_level", "nan_nll", "infinite_nll", "inconsistent_source")
# Feedback columns the SQL reads (FEEDBACK_SCHEMA has more; they are not needed to rank).
REQUIRED_COLUMNS = (
    "sample_id",
    "source",
    "split",
    "level_tokens",
    "n_visual_tokens",
    "nll_mean",
    "greedy_match",
)
REPORT_NAME = "rank_report.json"
T = TypeVar("T")
PART_NAME = "part-0.parquet"
# The timed steps of ``run_rank`` (what its progress callback counts).
STEPS = ("ladder", "sample_checks", "rank", *(f"write_{t}" for t in TABLES))
Progress = Callable[[int, "int | None", "dict[str, Any] | None"], None]


class FeedbackError(ValueError):
    """Feedback that cannot be ranked: no files, missing columns, NULL or duplicate keys, mixed models."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


class FeedbackMissing(FeedbackError):
    """A run folder without feedback yet: ``rglf score`` has not run (or written nothing)."""

    exit_code = 4  # cli.EXIT_CODES: a required earlier stage's output is missing


@dataclass
class RankConfig:
    """Options of ``rglf rank``: build rankings, pairs and preferences from feedback."""

    feedback: Path
    """Feedback Parquet: a scoring output folder (``OUT/`` holding ``feedback/``), the
    ``feedback/`` folder itself (part files, searched recursively), one file, or a glob."""
    out: Path
    """Folder to write ``rankings/``, ``pairs/``, ``preferences/``, ``excluded/`` and
    ``rank_report.json`` into (created if missing; previous outputs there are replaced)."""
    abs_tol: float = 0.02
    """Absolute NLL tolerance: levels with ``nll_mean <= min + max(abs_tol, rel_tol * min)`` tie
    with the best and the one with the fewest tokens wins (ARCHITECTURE.md "Ranking semantics")."""
    rel_tol: float = 0.0
    """Relative NLL tolerance, a fraction of the sample's minimum ``nll_mean``."""
    margin_scale: float = 1.0
    """``m`` of the SPEC's adaptive margin ``m * j * (nll_worse - nll_better)`` (published: 1)."""
    levels: tuple[int, ...] | None = None
    """The ladder every sample must have (``level_tokens``). None: every distinct level_tokens
    in the feedback. With a ladder given, a sample with any other level is excluded."""
    threads: int | None = None
    """DuckDB worker threads; None: the machine's core count."""
    memory_limit: str | None = None
    """DuckDB memory limit such as ``"4GB"``; None: DuckDB's default (80% of RAM). DuckDB
    spills to a temporary folder inside ``out`` beyond it."""
    max_listed_ids: int = 20
    """How many example sample ids ``rank_report.json`` lists per exclusion reason."""

    def __post_init__(self) -> None:
        self.feedback = Path(self.feedback)
        self.out = Path(self.out)
        for name in ("abs_tol", "rel_tol", "margin_scale"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.levels is not None:
            levels = tuple(int(t) for t in self.levels)
            if not levels or any(t <= 0 for t in levels) or len(set(levels)) != len(levels):
                raise ValueError(f"levels must be distinct positive token counts, got {self.levels!r}")
            self.levels = tuple(sorted(levels))
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_listed_ids < 0:
            raise ValueError(f"max_listed_ids must be >= 0, got {self.max_listed_ids}")


def load_sql(name: str) -> str:
    """The query in ``pipeline/sql/<name>.sql`` (package data), without a trailing ``;``."""
    path = resources.files(__package__).joinpath("sql", f"{name}.sql")
    if not path.is_file():
        known = sorted(p.name for p in resources.files(__package__).joinpath("sql").iterdir())
        raise FileNotFoundError(f"no SQL file {name}.sql in pipeline/sql (have: {', '.join(known)})")
    return path.read_text(encoding="utf-8").strip().rstrip(";")


def _is_hidden(path: Path, root: Path) -> bool:
    # Writers' temporary files/folders (".tmp-*", "_SUCCESS", ...) are not data.
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def parquet_files(root: Path) -> list[Path]:
    """The Parquet files under ``root`` (recursively), hidden/underscored entries skipped, sorted."""
    return sorted(f for f in root.rglob("*.parquet") if f.is_file() and not _is_hidden(f, root))


def resolve_table(path: str | Path, table: str = "feedback") -> tuple[Path, list[Path]]:
    """Resolve ``path`` to the Parquet files of one table: ``(root, files)``.

    ``path`` may be a folder holding ``<table>/`` (e.g. a scoring output folder), the table's
    folder itself (part files, searched recursively, hidden/underscored entries skipped), one
    Parquet file, or a glob (matching files and/or folders). Raises ``FeedbackError`` when
    nothing is found.
    """
    text = str(path)
    if any(ch in text for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        files: list[Path] = []
        for m in matches:
            files.extend(parquet_files(m) if m.is_dir() else [m] if m.suffix == ".parquet" else [])
        if not files:
            raise FeedbackError(f"the glob {text!r} matches no Parquet file")
        files = sorted(set(files))
        return Path(os.path.commonpath([f.parent for f in files])), files
    path = Path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise FeedbackError(f"{path}: is not a Parquet file or a folder. Pass a run folder (holding {table}/)")
        return path.parent, [path]
    if not path.is_dir():
        raise FeedbackError(f"{path}: does not exist. Pass a run folder (holding {table}/), the {table}/ folder or a file")
    if not (path / table).is_dir() and any((path / p).exists() for p in ("run.json", "samples", "router_inputs")):
        # a run folder before (or without) scoring: never rank its other tables by mistake
        raise FeedbackMissing(
            f"{path}: has no {table}/ yet. Score it first: rglf score --run {path} --model CKPT"
        )
    root = path / table if (path / table).is_dir() else path
    files = parquet_files(root)
    if not files:
        raise FeedbackMissing(f"{root}: holds no Parquet files. Score the run first: rglf score --run RUN --model CKPT")
    return root, files


def _usable_cores() -> int:
    # the cores this process may run on (a container's CPU set), not the host's count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect(
    threads: int | None = None, memory_limit: str | None = None, temp_dir: Path | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with explicit threads (default: core count) and limits."""
    config: dict[str, Any] = {
        "threads": threads or _usable_cores(),
        # every query that needs an order says ORDER BY; the rest may write in parallel
        "preserve_insertion_order": False,
    }
    if memory_limit:
        config["memory_limit"] = memory_limit
    if temp_dir is not None:
        config["temp_directory"] = str(temp_dir)
    return duckdb.connect(":memory:", config=config)


def register_parquet(con: duckdb.DuckDBPyConnection, name: str, files: list[Path]) -> list[str]:
    """Register Parquet ``files`` as the view ``name`` (parts unioned by column name)."""
    rel = con.read_parquet([str(f) for f in files], union_by_name=True)
    rel.create_view(name, replace=True)
    return list(rel.columns)


def _check_columns(columns: list[str], root: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise FeedbackError(
            f"feedback under {root} lacks column(s) {', '.join(missing)} "
            f"(has: {', '.join(columns)}); see model/tables.py FEEDBACK_SCHEMA"
        )


def _check_keys(con: duckdb.DuckDBPyConnection, root: Path) -> int:
    """Raise ``FeedbackError`` on NULL or duplicate keys (needs ``sample_checks``); return the row count."""
    n_rows, _, n_null_ids, n_null_levels, n_dup_samples = con.sql(load_sql("validate")).fetchall()[0]
    if n_rows == 0:
        raise FeedbackError(f"feedback under {root} has no rows")
    if n_null_ids or n_null_levels:
        raise FeedbackError(
            f"feedback has {n_null_ids} row(s) with a NULL sample_id and {n_null_levels} with a NULL "
            "level_tokens (FEEDBACK_SCHEMA forbids them; fix the writer)"
        )
    if n_dup_samples:
        n_keys, n_dup_rows, examples = con.sql(load_sql("duplicates")).fetchall()[0]
        shown = ", ".join(f"({e['sample_id']!r}, {e['level_tokens']}) x{e['n']}" for e in examples)
        raise FeedbackError(
            f"feedback has {n_keys} duplicate (sample_id, level_tokens) key(s) covering {n_dup_rows} "
            f"rows in {n_dup_samples} sample(s), e.g. {shown}. Each (sample, level) must be scored "
            "once: were two runs, or two model_ids, written into the same folder? Deduplicate first."
        )
    return int(n_rows)


def _exclusion_summary(con: duckdb.DuckDBPyConnection, cap: int) -> dict[str, dict[str, Any]]:
    rows = con.sql(
        "SELECT reason, count(*) AS n, list(sample_id ORDER BY sample_id)[1:$cap] AS ids "
        "FROM excluded GROUP BY reason",
        params={"cap": cap},
    ).fetchall()
    found = {reason: (int(n), list(ids) if cap else []) for reason, n, ids in rows}
    return {
        reason: {
            "n_samples": found.get(reason, (0, []))[0],
            "sample_ids": found.get(reason, (0, []))[1],
            "truncated": found.get(reason, (0, []))[0] > cap,
        }
        for reason in EXCLUSION_REASONS
    }


def run_interruptibly(con: duckdb.DuckDBPyConnection, work: Callable[[], T], grace: float = 30.0) -> T:
    """``work()`` (DuckDB calls on ``con``) in a helper thread, so Ctrl-C stops it within a moment.

    DuckDB runs a query in C++ without returning to Python, so a Ctrl-C on the thread running it
    waits for the whole query. Here the main thread waits; on KeyboardInterrupt it interrupts
    ``con`` (repeatedly, until ``work`` returns: a query may be about to start) and re-raises.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="rglf-duckdb", daemon=True).start()
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        deadline = time.monotonic() + grace
        while not done.is_set() and time.monotonic() < deadline:
            try:
                con.interrupt()
                done.wait(0.1)
            except KeyboardInterrupt:  # a second Ctrl-C: already stopping
                continue
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _run_folder(feedback: Path, root: Path) -> Path | None:
    """The run folder (holding ``run.json``) the feedback belongs to, if any."""
    for candidate in (feedback, root.parent if root.name == "feedback" else None):
        if candidate is not None and candidate.is_dir() and (candidate / "run.json").is_file():
            return candidate
    return None


def _provenance(feedback: Path, root: Path, model_ids: list[str]) -> dict[str, Any]:
    """Which model and run the feedback comes from (``rank_report.json`` ``provenance``).

    Refuses (``FeedbackError``) feedback mixing several ``model_id`` values, and feedback whose
    ``model_id`` differs from its run folder's ``run.json``: such a ranking compares two models.
    """
    if len(model_ids) > 1:
        raise FeedbackError(
            f"{root}: mixes feedback of {len(model_ids)} models ({', '.join(map(str, model_ids[:5]))}); rankings "
            "must compare levels of ONE model. Rescore into a fresh folder: rglf score --run NEW_RUN --model CKPT"
        )
    run = _run_folder(feedback, root)
    record: dict[str, Any] = {}
    if run is not None:
        try:
            record = json.loads((run / "run.json").read_text())
        except (OSError, ValueError) as e:
            raise FeedbackError(f"{run / 'run.json'}: unreadable ({e}). Rescore the run: rglf score --run RUN --force") from None
    model_id = model_ids[0] if model_ids else None
    recorded = record.get("model_id")
    if recorded and model_id and recorded != model_id:
        raise FeedbackError(
            f"{root}: feedback was scored by model {model_id} but {run}/run.json names {recorded}. "
            "Rescore the run: rglf score --run RUN --model CKPT --force"
        )
    return {
        "run": str(run.resolve()) if run is not None else None,
        "run_id": record.get("run_id"),
        "model_id": model_id or recorded,
    }


def _publish(tmp: Path, out: Path, names: list[str]) -> None:
    """Move ``tmp/<name>`` over ``out/<name>`` for each name, in order (the report last).

    A file is replaced atomically. A folder cannot be replaced in one step when the old one is
    not empty, so the old folder is first renamed away; it is then never half-written, only
    briefly absent.
    """
    trash = tmp / ".old"
    trash.mkdir(exist_ok=True)
    report = out / REPORT_NAME
    if report.exists():  # no completion marker while the tables are being swapped
        os.replace(report, trash / REPORT_NAME)
    for name in names:
        src, dst = tmp / name, out / name
        if dst.is_dir() and not dst.is_symlink():
            os.replace(dst, trash / name)
        os.replace(src, dst)


def _build(
    con: duckdb.DuckDBPyConnection, cfg: RankConfig, root: Path, files: list[Path], tmp: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the SQL stages on ``con``, write every table into ``tmp``; return the report."""
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        if progress is not None:
            progress(len(timings), len(STEPS), {"done": name})
        return now

    columns = register_parquet(con, "feedback", files)
    _check_columns(columns, root)
    if cfg.levels is not None:
        ladder, ladder_from = list(cfg.levels), "config"
    else:
        ladder, ladder_from = [int(r[0]) for r in con.sql(load_sql("ladder")).fetchall()], "feedback"
    model_ids = (
        [r[0] for r in con.sql("SELECT DISTINCT model_id FROM feedback ORDER BY 1 LIMIT 20").fetchall()]
        if "model_id" in columns
        else []
    )
    provenance = _provenance(cfg.feedback, root, model_ids)
    t = step("ladder", t)

    con.sql(load_sql("sample_checks"), params={"ladder": ladder}).create("sample_checks")
    n_rows = _check_keys(con, root)
    con.sql(load_sql("excluded")).create("excluded")
    t = step("sample_checks", t)

    con.sql(load_sql("ranked_samples"), params={"abs_tol": cfg.abs_tol, "rel_tol": cfg.rel_tol}).create(
        "ranked_samples"
    )
    con.sql(load_sql("rankings")).create_view("rankings")  # a cheap unnest: not materialised
    t = step("rank", t)

    built = {
        "rankings": con.table("rankings"),
        "pairs": con.sql(load_sql("pairs"), params={"margin_scale": cfg.margin_scale}),
        "preferences": con.sql(load_sql("preferences")),
        "excluded": con.table("excluded"),
    }
    counts: dict[str, int] = {}
    for name in TABLES:
        (tmp / name).mkdir()
        target = tmp / name / PART_NAME
        built[name].write_parquet(str(target), compression="snappy")  # DuckDB's default; zstd is ~15% slower
        counts[name] = int(
            con.sql("SELECT count(*) FROM read_parquet($p)", params={"p": str(target)}).fetchall()[0][0]
        )
        t = step(f"write_{name}", t)

    n_samples, n_excluded = con.sql(
        "SELECT count(*), count(*) FILTER (WHERE excluded) FROM sample_checks"
    ).fetchall()[0]
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "inputs": {
            "feedback": str(cfg.feedback.absolute()),
            "feedback_root": str(root.resolve()),
            "n_files": len(files),
            "files": [str(f) for f in files[:20]],
            "n_rows": n_rows,
            "model_ids": model_ids,
        },
        "provenance": provenance,
        "ladder": ladder,
        "ladder_from": ladder_from,
        "n_samples": int(n_samples),
        "n_samples_ranked": int(n_samples - n_excluded),
        "n_samples_excluded": int(n_excluded),
        "excluded": _exclusion_summary(con, cfg.max_listed_ids),
        "tables": {name: {"path": f"{name}/{PART_NAME}", "rows": counts[name]} for name in TABLES},
        "semantics": {
            "tolerance": "tol = max(abs_tol, rel_tol * min_nll_mean); levels with nll_mean <= "
            "min_nll_mean + tol tie and rank first, fewer level_tokens first; the rest follow by "
            "nll_mean, exact ties by fewer level_tokens",
            "regret": "nll_mean - min nll_mean of the sample (>= 0)",
            "margin": "margin_scale * gap * (worse_nll_mean - better_nll_mean), gap = rank distance; "
            "negative inside a tie set, kept raw (the trainer clamps)",
        },
        "duckdb": {
            "version": duckdb.__version__,
            "threads": int(con.sql("SELECT current_setting('threads')").fetchall()[0][0]),
            "memory_limit": con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0],
        },
        "timings_s": timings,
    }


def run_rank(cfg: RankConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Build rankings, pairs, preferences and excluded from ``cfg.feedback`` into ``cfg.out``.

    Returns the report that is also written to ``cfg.out / "rank_report.json"``. Raises
    ``FeedbackError`` for feedback that cannot be ranked (nothing is written then).
    ``progress(done, total, {"done": step})`` is called after each of the ``STEPS``.
    """
    t_start = time.perf_counter()
    root, files = resolve_table(cfg.feedback)
    out = cfg.out.resolve()
    if cfg.feedback.is_dir() and out.is_relative_to(root.resolve()):  # a folder is read recursively
        raise FeedbackError(
            f"--out {cfg.out} is inside the feedback folder {root}: later reads would mix them. Choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise FeedbackError(f"--out {cfg.out}: is a file, not a folder. Choose a folder for the rankings")
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if nothing is published
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank-tmp-{uuid.uuid4().hex[:12]}"
    published = False
    try:
        tmp.mkdir()
        con = connect(cfg.threads, cfg.memory_limit, tmp / ".duckdb_tmp")
        try:
            report = run_interruptibly(con, lambda: _build(con, cfg, root, files, tmp, progress))
        finally:
            con.close()
        report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out, [*TABLES, REPORT_NAME])
        published = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not published:  # a failed or interrupted first run leaves no empty output folder behind
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return report
