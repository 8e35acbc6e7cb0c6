"""A shrunken `rglf demo` through the CLI: every table and plot exists and is well-formed."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest
from PIL import Image
from typer.testing import CliRunner

from rglf.cli import app
from tests.readme_commands import readme_rglf_commands


@pytest.mark.slow
def test_shrunken_demo_writes_every_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-samples", "30", "--workers", "1", "--epochs", "1", "--batch-size", "8",
            "--no-image-only"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained router" in result.output and "always-576" in result.output and "oracle" in result.output

    feedback = ds.dataset(out / "run" / "feedback", format="parquet").to_table()
    assert feedback.num_rows == 30 * 5
    keys = {(s, lv) for s, lv in zip(feedback["sample_id"].to_pylist(), feedback["level_tokens"].to_pylist(), strict=True)}
    assert len(keys) == feedback.num_rows  # (sample, level) unique
    assert set(feedback["level_tokens"].to_pylist()) == {36, 72, 144, 288, 576}
    assert ds.dataset(out / "run" / "router_inputs", format="parquet").count_rows() == 30
    for table, rows in (("rankings", 150), ("pairs", 300)):
        assert ds.dataset(out / "rank" / table, format="parquet").count_rows() == rows
    assert ds.dataset(out / "rank" / "preferences", format="parquet").count_rows() > 0
    assert (out / "router" / "router.safetensors").exists() and (out / "router" / "router_config.json").exists()

    report = json.loads((out / "eval" / "eval.json").read_text())
    assert {"router", "oracle", "fixed_36", "fixed_576", "random"} <= set(report["policies"])
    assert report["policies"]["oracle"]["agreement"] == 1.0
    pngs = sorted((out / "report").glob("*.png")) + sorted((out / "eval").glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert (out / "report" / "report.md").read_text().strip()

    # a second run reuses everything: nothing is scored again
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert ds.dataset(out / "run" / "feedback", format="parquet").count_rows() == 30 * 5

    # the demo's own outputs: training curve, evaluation plots, the test file routed in batches
    assert (out / "router" / "training_curve.png").is_file() and (out / "router" / "train.toml").is_file()
    assert (out / "eval" / "eval.toml").is_file()
    for png in ("eval.png", "confusion.png", "training_curve.png"):
        assert (out / "eval" / png).is_file(), png
    routed = ds.dataset(out / "routed-test.parquet", format="parquet").to_table()
    assert routed.num_rows == report["n_samples"] and routed["error_code"].null_count == routed.num_rows
    assert "route" in result.output and "records routed" in result.output

    # README's SQL, route and --config examples, as written, against this demo's folders
    examples = [argv for argv in readme_rglf_commands() if argv[0] in ("sql", "route")
                or (argv[0] == "train" and "--config" in argv)]
    assert sum(argv[0] == "sql" for argv in examples) >= 3 and sum(argv[0] == "route" for argv in examples) >= 2
    for argv in examples:
        argv = [a.replace("runs/demo", str(out)) for a in argv]
        ran = CliRunner().invoke(app, argv)
        assert ran.exit_code == 0, f"README `rglf {' '.join(argv)}` failed: {ran.output}"
        assert ran.output.strip(), argv
        if argv[0] == "route" and "--image" in argv:
            assert "level:" in ran.output and "answer:" in ran.output, ran.output
        if argv[0] == "route" and "--data" in argv:
            assert "records routed" in ran.stdout and "fewer" in ran.stdout, ran.output
        if argv[0] == "train":
            cfg = json.loads((out / "router-8-epochs" / "train_config.json").read_text())
            assert cfg["epochs"] == 8 and cfg["batch_size"] == 8 and cfg["run"] == str(out / "run")
