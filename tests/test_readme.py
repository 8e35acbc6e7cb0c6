"""Every `rglf` command in README.md names a real subcommand and real options.

The SQL examples are also run for real against a demo's output (tests/test_demo.py); the
cluster examples need a GPU cluster and real checkpoints, so here they are parsed by the CLI.
"""

from __future__ import annotations

import typer

from rglf.cli import app
from tests.readme_commands import readme_rglf_commands


def _command(argv: list[str]):
    """(the Typer/click command ``argv`` runs, its remaining arguments)."""
    cmd = typer.main.get_command(app)  # typer vendors click: duck-typed, not isinstance(click.Group)
    rest = list(argv)
    while hasattr(cmd, "commands"):
        assert rest, f"README command {argv} names no subcommand"
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"README command {argv}: no subcommand {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def test_readme_has_the_commands_it_documents():
    names = {argv[0] for argv in readme_rglf_commands()}
    assert {"convert", "ingest", "score", "rank", "train", "sql"} <= names


def test_every_readme_command_parses_with_the_cli(tmp_path):
    for argv in readme_rglf_commands():
        cmd, rest = _command(argv)
        if "--config" in rest:  # the file is read for real in tests/test_demo.py; here: the required options only
            toml = tmp_path / f"{cmd.name}.toml"
            toml.write_text("".join(f'{p.name} = "x"\n' for p in cmd.params if p.required and p.opts[0] not in rest))
            rest = [str(toml) if i and rest[i - 1] == "--config" else a for i, a in enumerate(rest)]
        options = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        flags = [a.split("=", 1)[0] for a in rest if a.startswith("--")]
        unknown = [f for f in flags if f not in options]
        assert not unknown, f"README command `rglf {' '.join(argv)}`: unknown option(s) {unknown}"
        # Full click parsing: arity, option values, types (paths need not exist here).
        ctx = cmd.make_context(cmd.name, list(rest), resilient_parsing=False)
        for p in (p for p in cmd.params if p.param_type_name == "argument"):
            assert ctx.params.get(p.name) not in (None, ()), f"`rglf {' '.join(argv)}`: missing {p.name}"
