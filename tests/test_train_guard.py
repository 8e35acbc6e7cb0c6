"""``rglf train`` guards (issue 13, cases 8 and 10): the router folder's settings, --force, Ctrl-C.

- Continuing into a folder trained with other settings is refused (exit 2, naming them); the
  config of existing weights is never rewritten; the same settings still resume; ``--force``
  (or ``--no-resume``) starts fresh, moving the old outputs to ``OUT/.replaced-<time>/``.
- Ctrl-C (SIGINT) stops training with one line saying what is kept, exit 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.synthetic import write_synthetic_tables
from rglf.cli import app
from rglf.router.train import CHECKPOINTS, METRICS, TRAIN_CONFIG

RGLF = Path(sys.executable).parent / "rglf"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("guard")
    write_synthetic_tables(tmp / "run", tmp / "rank", n_samples=48, seed=0)
    return tmp / "run", tmp / "rank"


def train(run: Path, rank: Path, out: Path, *extra: str):
    args = ["train", "--run", str(run), "--rank", str(rank), "--out", str(out), "--batch-size", "8",
            "--torch-threads", "1", "--quiet", *extra]
    return runner.invoke(app, args)


def test_other_settings_are_refused_and_the_config_is_never_rewritten(tables, tmp_path):
    run, rank = tables
    out = tmp_path / "router"
    assert train(run, rank, out, "--max-steps", "2", "--lr", "0.003").exit_code == 0
    config, weights = (out / TRAIN_CONFIG).read_bytes(), (out / "router.safetensors").read_bytes()

    result = train(run, rank, out, "--max-steps", "2", "--lr", "0.002", "--top-k", "4", "--shuffle-buffer", "64")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: was trained with different settings")
    assert "lr 0.003 -> 0.002" in line and "top_k 32 -> 4" in line and "--force" in line
    assert "shuffle_buffer 1024 -> 64" in line  # the sample order is a setting
    assert (out / TRAIN_CONFIG).read_bytes() == config and (out / "router.safetensors").read_bytes() == weights

    # runtime options (threads, progress, eval batch) are not settings: the same settings resume
    result = train(run, rank, out, "--max-steps", "2", "--lr", "0.003", "--torch-threads", "2", "--prefetch", "0",
                   "--record-samples")
    assert result.exit_code == 0, result.output
    assert json.loads((out / METRICS).read_text())["resumed_from_step"] == 2
    assert (out / TRAIN_CONFIG).read_bytes() == config  # not rewritten on resume either


def test_same_settings_resume_from_the_last_checkpoint(tables, tmp_path):
    from rglf.router.train import TrainConfig, train_router

    run, rank = tables
    out = tmp_path / "router"
    train_router(TrainConfig(run=run, rank=rank, out=out, batch_size=8, max_steps=4, checkpoint_every=2,
                             keep_checkpoints=2, threads=1, progress=False))
    # a run killed after step 2: the step-2 checkpoint is the latest, no final weights yet
    (out / CHECKPOINTS / "latest").write_text("step-00000002\n")
    for name in ("router.safetensors", METRICS):
        (out / name).unlink()
    result = train(run, rank, out, "--max-steps", "4", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4


@pytest.mark.parametrize("flag", ["--force", "--no-resume"])
def test_force_starts_fresh_and_moves_the_old_outputs_aside(tables, tmp_path, flag):
    run, rank = tables
    out = tmp_path / "router"
    assert train(run, rank, out, "--max-steps", "2", "--lr", "0.003").exit_code == 0
    (out / "eval.json").write_text("{}")  # eval output of the old weights
    old_weights = (out / "router.safetensors").read_bytes()
    result = train(run, rank, out, "--max-steps", "3", "--lr", "0.002", flag)
    assert result.exit_code == 0, result.output
    (aside,) = out.glob(".replaced-*")
    assert {p.name for p in aside.iterdir()} == {"router.safetensors", "router_config.json", TRAIN_CONFIG, METRICS,
                                                  CHECKPOINTS, "eval.json"}
    assert (aside / "router.safetensors").read_bytes() == old_weights
    assert json.loads((aside / TRAIN_CONFIG).read_text())["lr"] == 0.003
    assert json.loads((out / TRAIN_CONFIG).read_text())["lr"] == 0.002  # describes the new weights
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 3
    assert not (out / "eval.json").exists()


def test_weights_without_a_recorded_config_are_not_continued(tables, tmp_path):
    run, rank = tables
    out = tmp_path / "router"
    assert train(run, rank, out, "--max-steps", "2").exit_code == 0
    (out / TRAIN_CONFIG).unlink()
    result = train(run, rank, out, "--max-steps", "2")
    assert result.exit_code == 2 and "train_config.json is missing" in result.stderr


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow, id="ray-train")])
def test_ctrl_c_stops_training_with_one_line_and_keeps_the_checkpoint(tables, tmp_path, workers):
    """Ray Train included: its own SIGINT handler used to ignore Ctrl-C for minutes."""
    run, rank = tables
    out = tmp_path / "router"
    cmd = [str(RGLF), "train", "--run", str(run), "--rank", str(rank), "--out", str(out), "--batch-size", "8",
           "--max-steps", "1000000", "--checkpoint-every", "1", "--torch-threads", "1", "--quiet",
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
        while not (out / CHECKPOINTS / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("train interrupted: the checkpoint") and "rerun the same command to resume" in line
    assert "Traceback" not in stderr + stdout
    kept = out / CHECKPOINTS / (out / CHECKPOINTS / "latest").read_text().strip()
    assert (kept / "trainer_state.pt").is_file() and str(kept.name) in line
