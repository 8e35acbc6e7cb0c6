"""Every command through its common mistakes: one line on stderr, a documented exit code, no traceback.

Issue 13, case 9 (and the resource checks of case 8): each row is a command line with a
mistake a user makes (missing / wrong path, a file where a folder is expected, a bad option
value, an unwritable output, empty input, a missing earlier stage, an impossible resource).
The assertion is the same for all: the exit code documented in ``cli.EXIT_CODES``, exactly one
line on stderr starting ``error:`` and naming the input, and no ``Traceback`` anywhere. No Ray
is started: every mistake is caught before the distributed work would begin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_rank import feedback_rows, write_feedback
from typer.testing import CliRunner

from bench.synthetic import write_synthetic_tables
from rglf.cli import EXIT_CODES, app

runner = CliRunner()


def _unwritable() -> Path | None:
    """A folder path that cannot be created even by root (sysfs), or None where this does not hold."""
    candidate = Path("/sys/rglf-cannot-write-here")
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    return None


UNWRITABLE = _unwritable()


@pytest.fixture(scope="module")
def f(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The inputs of every case, built once (no Ray, tiny models)."""
    from rglf.model.toy.task import TOY_VOCABULARY, ToyDatasetConfig, write_dataset
    from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint
    from rglf.pipeline.ingest import IngestConfig, run_ingest
    from rglf.router.train import TrainConfig, train_router

    tmp = tmp_path_factory.mktemp("cli-errors")
    paths: dict[str, Path] = {"tmp": tmp, "missing": tmp / "missing"}
    paths["file"] = tmp / "notes.txt"
    paths["file"].write_text("not what you wanted\n")
    paths["ckpt"] = save_tiny_checkpoint(
        tmp / "ckpt", *build_tiny_model(TOY_VOCABULARY, text_hidden=32, text_layers=1, vision_hidden=16, image_size=32,
                                        intermediate=64)
    )
    paths["no_config"] = tmp / "no-config"
    paths["no_config"].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(b"\0" * 16)
    data = tmp / "data"
    write_dataset(data, ToyDatasetConfig(n_samples=6, seed=0))
    paths["data"], paths["data_json"] = data, data / "train.json"
    paths["empty_json"] = tmp / "empty.json"
    paths["empty_json"].write_text("[]")
    paths["ingested"] = tmp / "ingested"  # samples/ only: not scored yet
    run_ingest(IngestConfig(inputs=[data / "train.json"], image_root=data, out=paths["ingested"]), log=lambda _m: None)
    paths["scored"] = write_feedback(tmp / "scored", [r for s in ("a", "b") for r in feedback_rows(s, {4: 0.3, 16: 0.1})])
    (paths["scored"] / "run.json").write_text(json.dumps({"model_id": "m0", "run_id": "r0"}))
    paths["ranked"] = tmp / "ranked"
    assert runner.invoke(app, ["rank", "--run", str(paths["scored"]), "--out", str(paths["ranked"])]).exit_code == 0
    run, rank = tmp / "syn_run", tmp / "syn_rank"
    write_synthetic_tables(run, rank, n_samples=48)
    paths["run"], paths["rank"] = run, rank
    test_only = tmp / "rank_test_only"
    (test_only / "rankings").mkdir(parents=True)
    table = pq.read_table(rank / "rankings")
    table = table.set_column(table.schema.get_field_index("split"), "split",
                             __import__("pyarrow").array(["test"] * table.num_rows))
    pq.write_table(table, test_only / "rankings" / "part-0.parquet")
    paths["rank_test_only"] = test_only
    paths["router"] = tmp / "router"
    train_router(TrainConfig(run=run, rank=rank, out=paths["router"], max_steps=1, batch_size=8, progress=False,
                             threads=1))
    paths["image"] = next((data / "images").iterdir())
    paths["not_image"] = tmp / "fake.png"
    paths["not_image"].write_text("this is no PNG")
    return paths


P = Callable[[dict[str, Path]], list[str]]


def s(*parts: object) -> P:
    """argv with ``{name}`` placeholders filled from the fixture paths."""
    return lambda f: [str(p).format(**{k: str(v) for k, v in f.items()}) for p in parts]


# (id, argv, exit code, text the one error line must contain)
CASES: list[tuple[str, P, int, str]] = [
    # ---- toy data / train / report
    ("toy-data-out-is-a-file", s("toy", "data", "--out", "{file}", "--n-samples", "2"), 2, "notes.txt"),
    ("toy-data-zero-samples", s("toy", "data", "--out", "{tmp}/toy", "--n-samples", "0"), 2, "n_samples"),
    ("toy-train-out-is-a-file", s("toy", "train", "--out", "{file}", "--steps", "1"), 2, "notes.txt"),
    ("toy-train-zero-steps", s("toy", "train", "--out", "{tmp}/toy-ckpt", "--steps", "0"), 2, "steps"),
    ("toy-report-model-missing", s("toy", "report", "--model", "{missing}"), 2, "missing"),
    ("toy-report-model-is-a-file", s("toy", "report", "--model", "{file}"), 2, "notes.txt"),
    ("toy-report-bad-format", s("toy", "report", "--format", "xml"), 2, "xml"),
    # ---- ingest
    ("ingest-input-missing", s("ingest", "{missing}.json", "--image-root", "{data}", "--run", "{tmp}/r1"), 2, "missing.json"),
    ("ingest-input-is-a-folder", s("ingest", "{data}", "--image-root", "{data}", "--run", "{tmp}/r2"), 2, "data"),
    ("ingest-image-root-missing", s("ingest", "{data_json}", "--image-root", "{missing}", "--run", "{tmp}/r3"), 2, "missing"),
    ("ingest-image-root-is-a-file", s("ingest", "{data_json}", "--image-root", "{file}", "--run", "{tmp}/r4"), 2, "notes.txt"),
    ("ingest-run-is-a-file", s("ingest", "{data_json}", "--image-root", "{data}", "--run", "{file}"), 2, "notes.txt"),
    ("ingest-bad-rows-per-part", s("ingest", "{data_json}", "--image-root", "{data}", "--run", "{tmp}/r5",
                                   "--rows-per-part", "0"), 2, "rows_per_part"),
    # ---- score (every mistake is caught before Ray starts)
    ("score-run-missing", s("score", "--run", "{missing}", "--model", "{ckpt}"), 4, "missing"),
    ("score-run-is-a-file", s("score", "--run", "{file}", "--model", "{ckpt}"), 2, "notes.txt"),
    ("score-before-ingest", s("score", "--run", "{tmp}/empty-run", "--model", "{ckpt}"), 4, "rglf ingest"),
    ("score-model-missing", s("score", "--run", "{ingested}", "--model", "{missing}"), 2, "missing"),
    ("score-model-is-a-file", s("score", "--run", "{ingested}", "--model", "{file}"), 2, "notes.txt"),
    ("score-model-without-config", s("score", "--run", "{ingested}", "--model", "{no_config}"), 2, "no-config"),
    ("score-zero-workers", s("score", "--run", "{ingested}", "--model", "{ckpt}", "--workers", "0"), 2, "workers"),
    ("score-bad-ladder", s("score", "--run", "{ingested}", "--model", "{ckpt}", "--ladder", "7,x"), 2, "level 7"),
    ("score-bad-device", s("score", "--run", "{ingested}", "--model", "{ckpt}", "--device", "tpu"), 2, "tpu"),
    # ---- convert
    ("convert-src-missing", s("convert", "{missing}", "{tmp}/hf"), 2, "missing"),
    ("convert-src-is-a-file", s("convert", "{file}", "{tmp}/hf"), 2, "notes.txt"),
    ("convert-src-without-config", s("convert", "{no_config}", "{tmp}/hf"), 2, "no-config"),
    ("convert-dst-exists-names-force", s("convert", "{ckpt}", "{data}"), 2, "--force"),
    ("convert-dst-exists", s("convert", "{ckpt}", "{data}"), 2, "data"),
    # ---- rank
    ("rank-run-missing", s("rank", "--run", "{missing}", "--out", "{tmp}/k1"), 2, "missing"),
    ("rank-before-score", s("rank", "--run", "{ingested}", "--out", "{tmp}/k2"), 4, "rglf score"),
    ("rank-run-is-not-parquet", s("rank", "--run", "{file}", "--out", "{tmp}/k3"), 2, "notes.txt"),
    ("rank-out-is-a-file", s("rank", "--run", "{scored}", "--out", "{file}"), 2, "notes.txt"),
    ("rank-negative-tolerance", s("rank", "--run", "{scored}", "--out", "{tmp}/k4", "--abs-tol", "-1"), 2, "abs_tol"),
    ("rank-bad-ladder", s("rank", "--run", "{scored}", "--out", "{tmp}/k5", "--ladder", "a,b"), 2, "a,b"),
    # ---- sql
    ("sql-run-missing", s("sql", "select 1", "--run", "{missing}"), 2, "missing"),
    ("sql-run-is-a-file", s("sql", "select 1", "--run", "{file}"), 2, "notes.txt"),
    ("sql-unknown-table", s("sql", "select * from rankingz", "--rank", "{ranked}"), 2, "rankingz"),
    ("sql-bad-format", s("sql", "select 1", "--format", "xml"), 2, "xml"),
    ("sql-parquet-without-output", s("sql", "select 1", "--format", "parquet"), 2, "--output"),
    ("sql-output-is-a-folder", s("sql", "select 1", "--format", "csv", "--output", "{data}"), 2, "data"),
    ("sql-writes", s("sql", "copy (select 1) to '{tmp}/x.csv'"), 2, "read-only"),
    # ---- report
    ("report-rank-missing", s("report", "--rank", "{missing}", "--out", "{tmp}/rep1"), 4, "rglf rank"),
    ("report-rank-is-a-run", s("report", "--rank", "{scored}", "--out", "{tmp}/rep2"), 4, "rglf rank"),
    ("report-out-is-a-file", s("report", "--rank", "{ranked}", "--out", "{file}"), 2, "notes.txt"),
    # ---- train
    ("train-before-rank", s("train", "--run", "{run}", "--rank", "{tmp}/never-ranked", "--out", "{tmp}/t1"), 4,
     "rglf rank --run"),
    ("train-before-score", s("train", "--run", "{ingested}", "--rank", "{rank}", "--out", "{tmp}/t2"), 4, "rglf score"),
    ("train-run-missing", s("train", "--run", "{missing}", "--rank", "{rank}", "--out", "{tmp}/t3"), 2, "missing"),
    ("train-run-is-a-file", s("train", "--run", "{file}", "--rank", "{rank}", "--out", "{tmp}/t4"), 2, "notes.txt"),
    ("train-rank-is-a-file", s("train", "--run", "{run}", "--rank", "{file}", "--out", "{tmp}/t5"), 2, "notes.txt"),
    ("train-out-is-a-file", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{file}"), 2, "notes.txt"),
    ("train-no-train-split", s("train", "--run", "{run}", "--rank", "{rank_test_only}", "--out", "{tmp}/t6"), 2,
     "splits found: test"),
    ("train-bad-loss", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t7", "--loss", "hinge"), 2,
     "hinge"),
    ("train-zero-lr", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t8", "--lr", "0"), 2, "lr"),
    ("train-bad-device", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t9", "--device", "gpu"), 2,
     "gpu"),
    ("train-cuda-absent", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t10", "--device", "cuda"),
     5, "CUDA"),
    ("train-gpu-workers-absent", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t11", "--workers",
                                   "4", "--use-gpu"), 5, "GPU"),
    ("train-more-workers-than-cpus", s("train", "--run", "{run}", "--rank", "{rank}", "--out", "{tmp}/t12",
                                       "--workers", "4096"), 5, "CPUs"),
    # ---- eval
    ("eval-router-missing", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{missing}"), 4, "rglf train"),
    ("eval-router-is-a-file", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{file}"), 2, "notes.txt"),
    ("eval-before-rank", s("eval", "--run", "{run}", "--rank", "{missing}", "--router", "{router}"), 4, "rglf rank"),
    ("eval-no-such-split", s("eval", "--run", "{run}", "--rank", "{rank_test_only}", "--router", "{router}",
                             "--split", "val"), 2, "splits found: test"),
    ("eval-cuda-absent", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{router}", "--device", "cuda"),
     5, "CUDA"),
    ("eval-bad-budget", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{router}", "--budget", "0"), 2,
     "budget"),
    ("eval-out-is-a-file", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{router}", "--out", "{file}"),
     2, "notes.txt"),
    # ---- route
    ("route-router-missing", s("route", "--router", "{missing}", "--image", "{image}", "--question", "q?"), 4,
     "rglf train"),
    ("route-image-missing", s("route", "--router", "{router}", "--image", "{missing}.png", "--question", "q?"), 2,
     "missing.png"),
    ("route-image-is-not-an-image", s("route", "--router", "{router}", "--image", "{not_image}", "--question", "q?"),
     2, "fake.png"),
    ("route-model-missing", s("route", "--router", "{router}", "--image", "{image}", "--question", "q?", "--model",
                              "{missing}"), 2, "missing"),
    ("route-cuda-absent", s("route", "--router", "{router}", "--image", "{image}", "--question", "q?", "--device",
                            "cuda"), 5, "CUDA"),
    ("route-budget-and-lam", s("route", "--router", "{router}", "--image", "{image}", "--question", "q?", "--budget",
                               "0.3", "--lam", "1"), 2, "lam"),
    ("route-bad-format", s("route", "--router", "{router}", "--image", "{image}", "--question", "q?", "--format",
                           "xml"), 2, "xml"),
    # ---- prompt / export-router / --template
    ("prompt-data-missing", s("prompt", "{missing}.json", "--model", "{ckpt}"), 2, "missing.json"),
    ("prompt-model-without-config", s("prompt", "{data_json}", "--model", "{no_config}"), 2, "no-config"),
    ("prompt-bad-template", s("prompt", "{data_json}", "--model", "{ckpt}", "--template", "vicuna"), 2, "'vicuna'"),
    ("prompt-bad-format", s("prompt", "{data_json}", "--model", "{ckpt}", "--format", "xml"), 2, "xml"),
    ("score-bad-template", s("score", "--run", "{ingested}", "--model", "{ckpt}", "--template", "vicuna"), 2, "'vicuna'"),
    ("export-router-missing", s("export-router", "{missing}", "{tmp}/exported"), 2, "missing"),
    ("export-router-not-a-router", s("export-router", "{data}", "{tmp}/exported"), 2, "rglf train"),
    ("export-router-bad-dtype", s("export-router", "{router}", "{tmp}/exported", "--dtype", "int8"), 2, "int8"),
    # ---- demo (refused before any stage runs)
    ("demo-out-is-a-file", s("demo", "--out", "{file}"), 2, "notes.txt"),
    ("demo-model-missing", s("demo", "--out", "{tmp}/demo", "--model", "{missing}"), 2, "missing"),
    ("demo-zero-samples", s("demo", "--out", "{tmp}/demo2", "--n-samples", "0"), 2, "n-samples"),
    # ---- usage
    ("unknown-command", s("scroe"), 2, "scroe"),
    ("unknown-option", s("rank", "--run", "{scored}", "--out", "{tmp}/k6", "--tolerance", "1"), 2, "--tolerance"),
]

if UNWRITABLE is not None:  # an output folder that cannot be created (sysfs; chmod does not stop root)
    CASES += [
        ("rank-out-unwritable", s("rank", "--run", "{scored}", "--out", str(UNWRITABLE)), 2, str(UNWRITABLE)),
        ("train-out-unwritable", s("train", "--run", "{run}", "--rank", "{rank}", "--out", str(UNWRITABLE)), 2,
         str(UNWRITABLE)),
        ("sql-output-unwritable", s("sql", "select 1", "--format", "csv", "--output", f"{UNWRITABLE}/x.csv"), 2,
         str(UNWRITABLE)),
        ("report-out-unwritable", s("report", "--rank", "{ranked}", "--out", str(UNWRITABLE)), 2, str(UNWRITABLE)),
        ("toy-data-out-unwritable", s("toy", "data", "--out", str(UNWRITABLE), "--n-samples", "2"), 2,
         str(UNWRITABLE)),
        ("eval-out-unwritable", s("eval", "--run", "{run}", "--rank", "{rank}", "--router", "{router}", "--out",
                                  str(UNWRITABLE)), 2, str(UNWRITABLE)),
    ]


@pytest.mark.parametrize(("argv", "code", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_is_one_line_and_a_documented_exit_code(f, argv: P, code: int, names: str) -> None:
    assert code in EXIT_CODES
    args = argv(f)
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"rglf {' '.join(args)} raised {result.exception!r}")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), f"rglf {' '.join(args)}:\n{result.stderr}"
    assert names in lines[0], f"the error line does not name {names!r}: {lines[0]}"
    assert result.exit_code == code, f"rglf {' '.join(args)}: exit {result.exit_code}, expected {code}: {lines[0]}"


def test_every_command_has_cases() -> None:
    from typer.main import get_command

    root = get_command(app)
    names = {name for name, cmd in root.commands.items() if not hasattr(cmd, "commands")}
    names |= {f"toy-{name}" for name in root.commands["toy"].commands}
    covered = {name for name in names if any(case_id.startswith(name + "-") for case_id, *_ in CASES)}
    assert names <= covered, sorted(names - covered)


def test_rank_without_feedback_leaves_no_output_folder(f) -> None:
    out = f["tmp"] / "rank-nothing"
    result = runner.invoke(app, ["rank", "--run", str(f["ingested"]), "--out", str(out)])
    assert result.exit_code == 4 and not out.exists()
    assert os.path.isdir(f["ingested"] / "samples")  # the run's own folders are untouched


def test_readme_documents_every_exit_code() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme, code
