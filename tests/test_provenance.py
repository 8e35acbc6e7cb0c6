"""Issue 13, case 1: a checkpoint identity that cannot be fooled, and rank / train refusing tables of another model or run.

The checkpoint id is a content hash of every weight, config, tokenizer and processor file
(``model/provenance.py``); it is recorded in ``run.json`` and every feedback row; ``rank``
refuses feedback of several models, ``train`` / ``eval`` refuse a rank folder built from
another run or model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_rank import feedback_rows, write_feedback
from typer.testing import CliRunner

from bench.synthetic import write_synthetic_tables
from rglf.cli import app
from rglf.model import provenance
from rglf.model.provenance import (
    CACHE_ENV,
    CACHE_FILE,
    ProvenanceError,
    check_rank_matches_run,
    checkpoint_identity,
)
from rglf.pipeline.rank import FeedbackError, RankConfig, run_rank
from rglf.pipeline.score import resolve_model

runner = CliRunner()
PAD = 3 * 2**18  # float32 elements: 3 MiB of padding on each side of the real weights


def projector_key(weights) -> str:
    return next(k for k in weights if "multi_modal_projector" in k and k.endswith("weight"))


@pytest.fixture(autouse=True)
def no_memo(monkeypatch):
    """Each test starts with an empty in-process hash cache (and no machine cache)."""
    monkeypatch.setattr(provenance, "_memo", {})
    monkeypatch.delenv(CACHE_ENV, raising=False)


def big_checkpoint(tiny_ckpt: Path, dest: Path) -> Path:
    """``tiny_ckpt`` whose weights file is > 6 MiB, the projector in the middle (as in a 15 GB LLaVA file)."""
    shutil.copytree(tiny_ckpt, dest)
    weights = load_file(dest / "model.safetensors")
    weights["a_pad"] = torch.zeros(PAD)
    weights["zz_pad"] = torch.zeros(PAD)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def change_projector(ckpt: Path) -> None:
    """Rewrite the weights file with a changed projector (what LLaVA's pretraining stage changes)."""
    path = ckpt / "model.safetensors"
    before = path.stat()
    weights = load_file(path)
    key = projector_key(weights)
    weights[key] = weights[key] * 1.5 + 0.01
    save_file(weights, path, metadata={"format": "pt"})
    # the size is unchanged; make the rewrite's new mtime certain even on a coarse-clock filesystem
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert path.stat().st_size == before.st_size


def head_and_tail(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 1 << 20] + data[-(1 << 20) :]


def test_changed_projector_bytes_change_the_id_and_score_refuses_to_resume(tiny_ckpt, tmp_path):
    ckpt = big_checkpoint(tiny_ckpt, tmp_path / "ckpt")
    model_id, ladder = resolve_model(ckpt, None)
    identity = checkpoint_identity(ckpt)
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rglf.model.tables import SAMPLES_SCHEMA

    sample = {"sample_id": "s1", "source": "t", "split": None, "image": None, "image_root": None,
              "turns": [{"role": "human", "text": "hi"}, {"role": "gpt", "text": "yes"}]}
    pq.write_table(pa.Table.from_pylist([sample], schema=SAMPLES_SCHEMA), run / "samples" / "part-00000.parquet")
    record = {"status": "complete", "model_id": model_id, "run_id": "r1", "model_files": identity.to_json(),
              "ladder": {"spec": ladder.spec, "tokens": list(ladder.tokens), "grid": ladder.grid}, "history": []}
    (run / "run.json").write_text(json.dumps(record))

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # the projector is not in the first/last MiB
        assert "a_pad" in f.keys() and projector_key(f.keys())
    before = head_and_tail(ckpt / "model.safetensors")
    change_projector(ckpt)
    assert head_and_tail(ckpt / "model.safetensors") == before  # what the old fingerprint hashed is identical

    assert resolve_model(ckpt, None, known=record["model_files"])[0] != model_id
    result = runner.invoke(app, ["score", "--run", str(run), "--model", str(ckpt), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(run) in lines[0], result.stderr
    assert f"model {model_id} ->" in lines[0] and "--force" in lines[0]
    assert "Traceback" not in result.output


def test_byte_identical_checkpoint_in_a_renamed_folder_has_the_same_id(tiny_ckpt, tmp_path):
    original = checkpoint_identity(tiny_ckpt).model_id
    renamed = tmp_path / "somewhere" / "another-name"
    shutil.copytree(tiny_ckpt, renamed)
    assert checkpoint_identity(renamed).model_id == original
    # ... so a run scored with the old folder resumes with the renamed one (same model_id in run.json)
    assert resolve_model(renamed, None)[0] == resolve_model(tiny_ckpt, None)[0]


def test_every_config_tokenizer_and_processor_byte_counts_but_docs_do_not(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    seen = {checkpoint_identity(ckpt).model_id}
    (ckpt / "README.md").write_text("# a model card\n")
    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "x").write_text("hub bookkeeping")
    assert checkpoint_identity(ckpt).model_id in seen  # documentation and hidden entries are not the model
    for name in sorted(p.name for p in ckpt.iterdir() if p.suffix == ".json"):
        path = ckpt / name
        path.write_text(path.read_text().rstrip() + " \n")  # one more byte (valid JSON still)
        model_id = checkpoint_identity(ckpt).model_id
        assert model_id not in seen, name
        seen.add(model_id)
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_identity(ckpt).model_id not in seen
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(checkpoint_identity(ckpt).files)


def test_hashes_are_reused_from_run_json_while_stats_match(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    first = checkpoint_identity(ckpt)
    assert first.hashed_bytes > 0
    provenance._memo.clear()
    again = checkpoint_identity(ckpt, known=first.to_json())
    assert again.model_id == first.model_id and again.hashed_bytes == 0  # nothing read
    # a record of another folder, or a file whose stats changed, is hashed again
    provenance._memo.clear()
    other = dict(first.to_json(), path=str(tmp_path / "elsewhere"))
    assert checkpoint_identity(ckpt, known=other).hashed_bytes == first.hashed_bytes
    provenance._memo.clear()
    os.utime(ckpt / "config.json", ns=(0, 10**9))
    partial = checkpoint_identity(ckpt, known=first.to_json())
    assert partial.hashed_bytes == (ckpt / "config.json").stat().st_size and partial.model_id == first.model_id


def test_machine_cache_only_when_rglf_cache_dir_is_set(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    checkpoint_identity(ckpt)
    assert not home.exists()  # nothing written anywhere by default
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    provenance._memo.clear()
    first = checkpoint_identity(ckpt)
    assert (cache / CACHE_FILE).is_file() and first.hashed_bytes > 0
    provenance._memo.clear()  # a new process on the same machine
    assert checkpoint_identity(ckpt).hashed_bytes == 0


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(provenance.CheckpointError, match="does not exist"):
        checkpoint_identity(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(provenance.CheckpointError, match="is a file"):
        checkpoint_identity(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(provenance.CheckpointError, match="no weight or config files"):
        checkpoint_identity(tmp_path / "empty")


# ---- rank and train check the provenance ------------------------------------------------------


def scored_run(folder: Path, model_id: str, run_id: str, samples: list[str]) -> Path:
    rows = [r for s in samples for r in feedback_rows(s, {4: 0.5, 16: 0.2, 64: 0.1})]
    for r in rows:
        r["model_id"] = model_id
    write_feedback(folder, rows)
    (folder / "run.json").write_text(json.dumps({"model_id": model_id, "run_id": run_id}))
    return folder


def test_rank_records_provenance_and_refuses_mixed_models(tmp_path):
    run = scored_run(tmp_path / "run", "sha256:aaa", "r1", ["s1", "s2"])
    report = run_rank(RankConfig(feedback=run, out=tmp_path / "rank"))
    assert report["provenance"] == {"run": str(run.resolve()), "run_id": "r1", "model_id": "sha256:aaa"}
    # feedback whose model_id is not run.json's
    (run / "run.json").write_text(json.dumps({"model_id": "sha256:bbb", "run_id": "r1"}))
    with pytest.raises(FeedbackError, match="scored by model sha256:aaa but .*names sha256:bbb"):
        run_rank(RankConfig(feedback=run, out=tmp_path / "rank2"))
    # two models' feedback in one folder (the CLI used to warn and rank them together)
    other = scored_run(tmp_path / "other", "sha256:ccc", "r2", ["s3"])
    shutil.copy(other / "feedback" / "part-00000.parquet", run / "feedback" / "part-00001.parquet")
    (run / "run.json").write_text(json.dumps({"model_id": "sha256:aaa", "run_id": "r1"}))
    result = runner.invoke(app, ["rank", "--run", str(run), "--out", str(tmp_path / "rank3")])
    assert result.exit_code == 2 and "mixes feedback of 2 models" in result.stderr, result.output
    assert not (tmp_path / "rank3").exists()


def test_train_refuses_a_rank_folder_built_from_another_run(tmp_path):
    run_a = scored_run(tmp_path / "run_a", "sha256:aaa", "run-a", ["s1", "s2"])
    runner.invoke(app, ["rank", "--run", str(run_a), "--out", str(tmp_path / "rank_a")])
    assert (tmp_path / "rank_a" / "rank_report.json").is_file()
    run_b, rank_b = tmp_path / "run_b", tmp_path / "rank_b"
    write_synthetic_tables(run_b, rank_b, n_samples=24)
    (run_b / "run.json").write_text(json.dumps({"model_id": "sha256:aaa", "run_id": "run-b", "ladder": "4,8,16,32,64"}))
    out = tmp_path / "router"
    result = runner.invoke(app, ["train", "--run", str(run_b), "--rank", str(tmp_path / "rank_a"), "--out", str(out),
                                 "--max-steps", "1", "--batch-size", "8", "--quiet"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "rank_a" in line and "run run-a (rank) vs run-b (run)" in line
    assert "rglf rank --run" in line and "Traceback" not in result.output
    assert not out.exists()  # refused before anything was written
    # router inputs whose router_side another model wrote than run.json names
    side = json.loads((run_b / "router_side" / "router_side.json").read_text())
    side["model_id"] = "sha256:zzz"
    (run_b / "router_side" / "router_side.json").write_text(json.dumps(side))
    with pytest.raises(ProvenanceError, match="router_side/ was written by model sha256:zzz"):
        check_rank_matches_run(run_b, rank_b)


def test_same_run_and_model_pass(tmp_path):
    run = scored_run(tmp_path / "run", "sha256:aaa", "r1", ["s1"])
    run_rank(RankConfig(feedback=run, out=tmp_path / "rank"))
    check_rank_matches_run(run, tmp_path / "rank")  # no error
