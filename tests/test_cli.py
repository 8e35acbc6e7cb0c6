"""The CLI's conventions (CONVENTIONS.md "CLI vocabulary"): one flag vocabulary over every command,
--config files, quiet/verbose, one progress display."""

from __future__ import annotations

import io
import json
import re

import pytest
import typer
from typer.testing import CliRunner

from rglf.cli import CONFIG_RECORDS, StageProgress, app, config_record, parse_device

BANNED = ("--overwrite", "--num-workers", "--ray-address", "--levels", "--threads", "--json")
# parameter name -> the one flag it may be spelled with
CANONICAL = {
    "run": "--run", "rank": "--rank", "out": "--out", "model": "--model", "router": "--router", "force": "--force",
    "address": "--address", "workers": "--workers", "ladder": "--ladder", "device": "--device",
    "torch_threads": "--torch-threads", "duckdb_threads": "--duckdb-threads", "fmt": "--format", "output": "--output",
    "config": "--config", "quiet": "--quiet", "verbose": "--verbose",
}
WITH_CONFIG = {"score", "train", "eval"}


def _commands(cmd=None, path=()):
    cmd = cmd if cmd is not None else typer.main.get_command(app)
    if hasattr(cmd, "commands"):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


COMMANDS = dict(_commands())


def test_every_command_is_covered():
    assert {"toy data", "toy train", "toy report", "ingest", "score", "convert", "rank", "sql", "report", "train",
            "eval", "route", "demo", "prompt", "export-router"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_flag_vocabulary(name):
    cmd = COMMANDS[name]
    flags = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    assert not flags & set(BANNED), f"rglf {name}: old spellings {sorted(flags & set(BANNED))}"
    for p in cmd.params:
        if p.name in CANONICAL:
            assert p.param_type_name == "option", f"rglf {name}: {p.name} must be an option, not positional"
            long = [o for o in p.opts if o.startswith("--")]
            assert long == [CANONICAL[p.name]], f"rglf {name}: {p.name} is spelled {long}"
        if p.param_type_name == "option":
            assert all(o.startswith("--") or re.fullmatch(r"-[a-z]", o) for o in p.opts), (name, p.opts)
            long = next(o for o in p.opts if o.startswith("--"))
            assert long == long.lower() and "_" not in long, f"rglf {name}: {long} is not kebab-case"
    names = {p.name for p in cmd.params}
    assert {"quiet", "verbose"} <= names, f"rglf {name} lacks --quiet/--verbose"
    assert ("config" in names) == (name in WITH_CONFIG), f"rglf {name}: --config only on {sorted(WITH_CONFIG)}"
    assert "threads" not in names  # torch_threads or duckdb_threads: say which
    assert "Example" in (cmd.epilog or ""), f"rglf {name} has no example in its help"
    device = next((p for p in cmd.params if p.name == "device"), None)
    if device is not None:
        assert device.default == "auto" and device.metavar == "[auto|cpu|cuda]", (name, device.default, device.metavar)


def test_device_values():
    assert [parse_device(v) for v in ("auto", "CPU", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(typer.BadParameter):
            parse_device(bad)
    result = CliRunner().invoke(app, ["eval", "--run", "r", "--rank", "k", "--router", "x", "--device", "gpu"])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_answers_with_an_example(name):
    result = CliRunner().invoke(app, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout and "--quiet" in result.stdout and result.stderr == ""


# ---- --config ---------------------------------------------------------------------------------


def test_config_values_are_defaults_that_flags_override(tmp_path):
    from typer._click.core import ParameterSource

    toml = tmp_path / "train.toml"
    toml.write_text('run = "r1"\nrank = "k1"\nout = "o1"\nmax-steps = 3\nlr = 0.003\ntorch_threads = 2\n'
                    'image-only = true\nladder = "36,144,576"\n')
    cmd = COMMANDS["train"]
    ctx = cmd.make_context("train", ["--config", str(toml), "--max-steps", "7", "--out", "o2"])
    assert ctx.params["max_steps"] == 7 and str(ctx.params["out"]) == "o2"  # the command line wins
    assert ctx.params["lr"] == 0.003 and ctx.params["torch_threads"] == 2 and ctx.params["image_only"] is True
    assert str(ctx.params["run"]) == "r1" and ctx.params["ladder"] == "36,144,576"  # required options from the file
    assert ctx.get_parameter_source("lr") == ParameterSource.DEFAULT_MAP
    assert ctx.get_parameter_source("max_steps") == ParameterSource.COMMANDLINE
    assert ctx.params["epochs"] == 1  # neither: the command's default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('run = "r"\nnum_workers = 2\nlevels = "36,72"\n', "unknown key(s) levels, num_workers"),
        ("run = [", "not valid TOML"),
        ('max-steps = 2\nmax_steps = 3\n', "given twice"),
        ("[train]\nlr = 1\n", "is a table"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    result = CliRunner().invoke(app, ["train", "--config", str(toml)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1 and message in result.stderr
    missing = CliRunner().invoke(app, ["eval", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_config_record_is_loadable_and_lists_every_option(tmp_path):
    """What a run writes beside its outputs reads back to the same parameters (paths made absolute)."""
    for name in sorted(WITH_CONFIG):
        cmd = COMMANDS[name]
        argv = {"score": ["--run", "r", "--model", "m", "--worker-resource", "slot=1", "--ladder", "36,576"],
                "train": ["--run", "r", "--rank", "k", "--out", "o", "--lr", "0.01", "--no-resume"],
                "eval": ["--run", "r", "--rank", "k", "--router", "x", "--budget", "0.3", "--device", "cpu"]}[name]
        ctx = cmd.make_context(name, argv)
        with ctx:
            record = config_record(ctx)
        path = tmp_path / CONFIG_RECORDS[name]
        path.write_text(record)
        again = cmd.make_context(name, ["--config", str(path)])
        for key, value in ctx.params.items():
            if key in ("quiet", "verbose", "config"):
                continue
            got = again.params[key]
            if hasattr(value, "absolute"):
                assert str(got) == str(value.absolute()), (name, key)
            else:
                assert got == value or (not got and not value), (name, key, got, value)
        flags = {next(o for o in p.opts if o.startswith("--"))[2:] for p in cmd.params
                 if p.param_type_name == "option" and p.name not in ("quiet", "verbose", "config")}
        written = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) = ", record, flags=re.M))
        assert written == flags, (name, flags ^ written)


@pytest.mark.slow
def test_train_and_eval_repeat_from_their_own_records(tmp_path, one_torch_thread):
    from bench.synthetic import write_synthetic_tables

    run, rank = tmp_path / "run", tmp_path / "rank"
    write_synthetic_tables(run, rank, n_samples=80, seed=3)
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--run", str(run), "--rank", str(rank), "--out", str(tmp_path / "a"),
                                "--max-steps", "2", "--batch-size", "8", "--torch-threads", "1", "--quiet"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "a" / "train.toml").is_file() and (tmp_path / "a" / "training_curve.png").is_file()
    again = runner.invoke(app, ["train", "--config", str(tmp_path / "a" / "train.toml"), "--out", str(tmp_path / "b"),
                                "--quiet"])
    assert again.exit_code == 0, again.output
    a = json.loads((tmp_path / "a" / "train_config.json").read_text())
    b = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert a["max_steps"] == 2 and a["batch_size"] == 8 and a["threads"] == 1

    ev = runner.invoke(app, ["eval", "--run", str(run), "--rank", str(rank), "--router", str(tmp_path / "a"),
                             "--out", str(tmp_path / "e1"), "--budgets", "0.5,1.0", "--seed", "4", "--quiet"])
    assert ev.exit_code == 0, ev.output
    ev2 = runner.invoke(app, ["eval", "--config", str(tmp_path / "e1" / "eval.toml"), "--out", str(tmp_path / "e2"),
                              "--quiet"])
    assert ev2.exit_code == 0, ev2.output
    r1 = json.loads((tmp_path / "e1" / "eval.json").read_text())
    r2 = json.loads((tmp_path / "e2" / "eval.json").read_text())
    for r in (r1, r2):
        r["config"].pop("out")
    assert r1["config"] == r2["config"] and r1["policies"] == r2["policies"]
    assert r1["config"]["seed"] == 4 and r1["config"]["budgets"] == [0.5, 1.0]


# ---- output ----------------------------------------------------------------------------------


def test_stage_progress_line_mode_and_quiet():
    stream = io.StringIO()  # not a terminal: periodic single lines, and a last one at the end
    with StageProgress("rank", "steps", stream=stream, every=3600) as bar:
        for done in range(1, 8):
            bar(done, 7, {"done": f"s{done}"})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("rank: 1/7 steps (14%)") and lines[-1].startswith("rank: 7/7 steps (100%)")
    assert len(lines) == 2  # the first call and the end; nothing in between within `every`
    quiet = io.StringIO()
    with StageProgress("rank", "steps", stream=quiet, enabled=False) as bar:
        bar(3, 7, None)
    assert quiet.getvalue() == ""
    unknown = io.StringIO()
    with StageProgress("route", "records", stream=unknown, every=3600) as bar:
        bar(5, None, {"rejected": 1})
    assert unknown.getvalue().startswith("route: 5 records") and "rejected 1" in unknown.getvalue()


def test_stage_progress_rate_and_eta_start_at_the_first_committed_unit(monkeypatch):
    """Start-up (Ray, model loading) before the first unit must not drag the rate and ETA down."""
    import types

    import rglf.cli as cli

    clock = {"t": 0.0}
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    stream = io.StringIO()
    with StageProgress("score", "samples", stream=stream, every=0) as bar:
        clock["t"] = 100.0  # 100 s of start-up, nothing done yet
        bar(0, 120, None)
        clock["t"] = 101.0
        bar(10, 120, None)  # the first committed unit: the rate's origin
        clock["t"] = 103.0
        bar(30, 120, None)  # 20 more in 2 s: 10/s, 90 left -> ETA 9 s
    lines = stream.getvalue().splitlines()
    assert lines[0] == "score: 0/120 samples (0%)"
    assert lines[-1] == "score: 30/120 samples (25%), 10.0 samples/s, ETA 9 s", lines


def test_rank_quiet_and_default_output(tmp_path):
    from test_rank import LADDER, feedback_rows, write_feedback

    rows = [r for s in range(20) for r in feedback_rows(f"s{s}", {t: 0.1 * (s % 3) + t / 1000 for t in LADDER})]
    run = write_feedback(tmp_path / "run", rows)
    runner = CliRunner()
    loud = runner.invoke(app, ["rank", "--run", str(run), "--out", str(tmp_path / "r1")])
    assert loud.exit_code == 0, loud.output
    progress = loud.stderr.splitlines()
    assert progress and all(re.match(r"rank: \d+/\d+ steps", line) for line in progress), progress
    assert loud.stdout.startswith("rank: 20 of 20 samples ranked")
    quiet = runner.invoke(app, ["rank", "--run", str(run), "--out", str(tmp_path / "r2"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout.count("\n") == 1
    both = runner.invoke(app, ["rank", "--run", str(run), "--out", str(tmp_path / "r3"), "--quiet", "--verbose"])
    assert both.exit_code == 2 and "exclude each other" in both.stderr
