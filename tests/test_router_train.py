"""Router trainer: tables -> RouterData, RGLF training, checkpoints/resume, the CLI, Ray Train."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from bench.synthetic import SYNTHETIC_KEYS, write_lmm_tables, write_synthetic_tables
from rglf.model.router import load_router
from rglf.router.data import RouterDataError, collate, hash_split, load_router_data, rank_order
from rglf.router.train import CHECKPOINTS, METRICS, TRAIN_CONFIG, TrainConfig, lr_factor, train_router

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tables(tmp_path):
    write_synthetic_tables(tmp_path / "run", tmp_path / "rank", n_samples=96, seed=0)
    return tmp_path / "run", tmp_path / "rank"


def cfg_for(run, rank, out, **kw) -> TrainConfig:
    base = dict(batch_size=16, micro_batch_size=16, lr=3e-3, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(run=run, rank=rank, out=out, **base)


def weights(path) -> dict[str, torch.Tensor]:
    return load_router(path).state_dict()


# ---- data ------------------------------------------------------------------------------------


def test_rank_order_hand_checked():
    tokens = [36, 144, 576]
    nll = np.array(
        [
            [0.50, 0.20, 0.10],  # plain NLL order
            [0.011, 0.005, 0.0],  # all within abs_tol 0.02 of the best: fewest tokens first
            [0.30, 0.015, 0.0],  # 144 ties with 576 and wins; 36 is outside the tie set
            [0.4, 0.4, 0.1],  # exact tie outside the tie set: fewer tokens first
        ]
    )
    order = rank_order(nll, tokens, abs_tol=0.02, rel_tol=0.0)
    assert order.tolist() == [[2, 1, 0], [0, 1, 2], [1, 2, 0], [2, 0, 1]]
    # a relative tolerance widens the tie set of a sample with a large best NLL
    assert rank_order(np.array([[1.05, 1.0, 2.0]]), tokens, 0.0, 0.1).tolist() == [[0, 1, 2]]


def test_rank_order_matches_the_ranking_sql(tmp_path):
    """The Python re-ranking (used for level subsets) agrees with pipeline/sql on the full ladder."""
    rank_mod = pytest.importorskip("pipeline.rank")
    from rglf.model.tables import FEEDBACK_SCHEMA

    rng = np.random.default_rng(0)
    levels = [36, 72, 144, 288, 576]
    n = 200
    nll = np.where(rng.random((n, 1)) < 0.3, rng.uniform(0, 0.03, (n, 5)), rng.uniform(0, 2, (n, 5)))
    rows = [
        {"sample_id": f"s{i:03d}", "source": "x", "split": "train", "level_tokens": t, "level_grid": "g",
         "n_crops": 1, "n_visual_tokens": t, "answer_tokens": 2, "nll_sum": 2 * nll[i, j],
         "nll_mean": float(nll[i, j]), "greedy_match": True, "model_id": "m"}
        for i in range(n) for j, t in enumerate(levels)
    ]
    (tmp_path / "fb").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA), tmp_path / "fb" / "part-0.parquet")
    rank_mod.run_rank(rank_mod.RankConfig(feedback=tmp_path / "fb", out=tmp_path / "rank"))
    rk = pq.read_table(tmp_path / "rank" / "rankings").sort_by([("sample_id", "ascending"), ("level_tokens", "ascending")])
    sql_rank = rk.column("rank").to_numpy().reshape(n, 5)
    ours = np.empty_like(sql_rank)
    order = rank_order(nll, levels, 0.02, 0.0)
    ours[np.arange(n)[:, None], order] = np.arange(1, 6)
    np.testing.assert_array_equal(ours, sql_rank)


def test_router_data_joins_tables_and_collates(tables):
    run, rank = tables
    data = load_router_data(run, rank)
    assert len(data) == 96 and data.ladder.tokens == (4, 8, 16, 32, 64)
    assert set(data.split) <= {"train", "val", "test"} and (data.split == "val").any()
    # labels: the key token decides the best level
    for i in range(len(data)):
        key = next(t for t in data.instruction(i).tolist() if t in SYNTHETIC_KEYS)
        assert data.best[i] == SYNTHETIC_KEYS[key]
    b = collate(data, [0, 1, 2], data_side(run))
    c_max = int(data.n_crops[:3].max())
    assert b.crop_features.shape == (3, c_max, 64, 16) and b.crop_mask.sum(1).tolist() == data.n_crops[:3].tolist()
    assert b.text_mask.sum(1).tolist() == [len(data.instruction(i)) for i in range(3)]
    # padded crops are zero; real ones are the frozen projection of the stored fp16 features
    side = data_side(run)
    expected = side.project(torch.from_numpy(data.vision(0).astype(np.float32)))
    torch.testing.assert_close(b.crop_features[0, : data.n_crops[0]], expected)
    assert not b.crop_features[~b.crop_mask].any()


def data_side(run):
    from rglf.model.lmm import RouterSide

    return RouterSide.load(run / "router_side")


def test_level_subset_is_reranked_within_the_subset(tables):
    run, rank = tables
    full = load_router_data(run, rank)
    sub = load_router_data(run, rank, levels=[4, 16, 64])
    assert sub.ladder.tokens == (4, 16, 64) and sub.nll.shape == (96, 3)
    np.testing.assert_array_equal(sub.nll, full.nll[:, [0, 2, 4]])
    np.testing.assert_array_equal(sub.order, rank_order(sub.nll, (4, 16, 64), 0.02, 0.0))
    with pytest.raises(RouterDataError, match="not in the rankings"):
        load_router_data(run, rank, levels=[4, 5])


def test_hash_split_when_the_tables_have_no_split(tmp_path):
    write_synthetic_tables(tmp_path / "run", tmp_path / "rank", n_samples=200, with_split_column=False)
    a = load_router_data(tmp_path / "run", tmp_path / "rank", val_fraction=0.2, test_fraction=0.1)
    b = load_router_data(tmp_path / "run", tmp_path / "rank", val_fraction=0.2, test_fraction=0.1)
    assert a.split.tolist() == b.split.tolist()  # deterministic
    assert a.split.tolist() == [hash_split(s, 0.2, 0.1) for s in a.sample_ids]
    counts = {s: int((a.split == s).sum()) for s in ("train", "val", "test")}
    assert 20 < counts["val"] < 60 and 5 < counts["test"] < 40, counts


# ---- training --------------------------------------------------------------------------------


def test_training_learns_a_text_determined_best_level(tmp_path):
    write_synthetic_tables(tmp_path / "run", tmp_path / "rank", n_samples=400, seed=0)
    cfg = cfg_for(tmp_path / "run", tmp_path / "rank", tmp_path / "router", max_steps=160, eval_every=40)
    m = train_router(cfg)
    losses = [h["loss"] for h in m["history"]]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert m["final"]["val_agreement"] >= 0.75, m["final"]
    # the image-only ablation cannot see the key token: near chance on the same data
    img = train_router(cfg_for(tmp_path / "run", tmp_path / "rank", tmp_path / "img", max_steps=160, eval_every=160,
                               image_only=True))
    assert img["router_config"]["use_text"] is False
    assert img["final"]["val_agreement"] < m["final"]["val_agreement"] - 0.2


def test_outputs_save_load_and_config_round_trip(tables, tmp_path):
    run, rank = tables
    cfg = cfg_for(run, rank, tmp_path / "router", epochs=2, levels="4,16,64", loss="ce", merger_attends="tokens")
    m = train_router(cfg)
    out = tmp_path / "router"
    router = load_router(out)
    assert router.ladder.tokens == (4, 16, 64) and router.config.merger_attends == "tokens"
    saved = json.loads((out / TRAIN_CONFIG).read_text())
    assert TrainConfig.from_dict(saved) == cfg
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["steps"] == m["steps"] == 2 * metrics["steps_per_epoch"]
    assert [h["step"] for h in metrics["history"]] == list(range(1, m["steps"] + 1))
    assert metrics["history"][0]["lr"] == pytest.approx(3e-3 * lr_factor(0, m["steps"], m["warmup_steps"]))
    assert "val_agreement" in metrics["history"][-1]
    assert (out / CHECKPOINTS / "latest").is_file()


def test_micro_batches_accumulate_to_the_full_batch_update(tables, tmp_path):
    run, rank = tables
    a = train_router(cfg_for(run, rank, tmp_path / "a", max_steps=3, dropout=0.0))
    b = train_router(cfg_for(run, rank, tmp_path / "b", max_steps=3, dropout=0.0, micro_batch_size=5))
    assert a["history"][-1]["loss"] == pytest.approx(b["history"][-1]["loss"], rel=1e-4)
    for k, v in weights(tmp_path / "a").items():
        torch.testing.assert_close(v, weights(tmp_path / "b")[k], atol=1e-5, rtol=1e-4)


def test_resume_from_the_last_checkpoint_is_step_exact(tables, tmp_path):
    run, rank = tables
    full = tmp_path / "full"
    train_router(cfg_for(run, rank, full, max_steps=6, checkpoint_every=3, keep_checkpoints=2))
    # simulate a run killed after step 3: only the step-3 checkpoint is left
    part = tmp_path / "part"
    (part / CHECKPOINTS).mkdir(parents=True)
    shutil.copytree(full / CHECKPOINTS / "step-00000003", part / CHECKPOINTS / "step-00000003")
    (part / CHECKPOINTS / "latest").write_text("step-00000003\n")
    shutil.copy(full / TRAIN_CONFIG, part / TRAIN_CONFIG)  # written before the first step: a killed run has it
    m = train_router(cfg_for(run, rank, part, max_steps=6, checkpoint_every=3))
    assert m["resumed_from_step"] == 3 and len(m["history"]) == 6
    for k, v in weights(full).items():
        torch.testing.assert_close(v, weights(part)[k])
    # a different router config refuses to resume; --no-resume starts over
    with pytest.raises(ValueError, match="no-resume"):
        train_router(cfg_for(run, rank, part, max_steps=6, top_k=4))
    m = train_router(cfg_for(run, rank, part, max_steps=2, top_k=4, resume=False))
    assert m["resumed_from_step"] is None and m["steps"] == 2


def test_config_validation():
    ok = dict(run="r", rank="k", out="o")
    assert TrainConfig(**ok, levels="576, 36,144").levels == (36, 144, 576)
    assert TrainConfig(**ok, batch_size=8).micro_batch_size == 8
    for bad in (dict(loss="hinge"), dict(levels="36"), dict(lr=0), dict(warmup_ratio=1.0), dict(epochs=0),
                dict(merger_attends="rows"), dict(val_fraction=0.6, test_fraction=0.5)):
        with pytest.raises(ValueError):
            TrainConfig(**ok, **bad)


def test_cli_defaults_match_train_config():
    from rglf import cli

    params = inspect.signature(cli.train_cmd).parameters
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in params and f.name not in ("run", "rank", "out"):
            assert params[f.name].default == f.default, f.name


# ---- the CLI, with the language model's weights absent ----------------------------------------


def test_train_cli_works_without_the_language_model(tmp_path, monkeypatch):
    from rglf.model.lmm import FrozenLMM
    from rglf.model.toy import task as toy
    from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint

    model, tok, proc = build_tiny_model(toy.TOY_VOCABULARY, text_hidden=32, text_layers=1, vision_hidden=16,
                                        image_size=32, intermediate=64)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", model, tok, proc)
    lmm = FrozenLMM.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        scene = toy.sample_scene(rng)
        family = toy.families_for(scene)[i % 4]
        q, a = toy.question_answer(scene, family)
        samples.append({"sample_id": f"t{i:02d}", "image": toy.render(scene), "question": q, "answer": a,
                        "source": family, "split": ("train", "train", "val")[i % 3]})
    write_lmm_tables(lmm, samples, tmp_path / "run", tmp_path / "rank")
    del lmm, model
    shutil.rmtree(ckpt)  # the language model is gone; the router side is all the trainer needs

    def refuse(*a, **k):
        raise AssertionError("the trainer must not load the LMM")

    monkeypatch.setattr(FrozenLMM, "from_pretrained", refuse)
    from rglf.cli import app

    result = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "run"), "--rank", str(tmp_path / "rank"),
                                      "--out", str(tmp_path / "router"), "--epochs", "2", "--batch-size", "8",
                                      "--torch-threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "train: 4 steps" in result.output
    router = load_router(tmp_path / "router")
    assert router.config.hidden_size == 32 and router.config.grid == 8
    assert router.ladder.tokens == (4, 8, 16, 32, 64)


# ---- Ray Train -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ray_workers_match_one_process(tmp_path):
    run, rank = tmp_path / "run", tmp_path / "rank"
    write_synthetic_tables(run, rank, n_samples=96, seed=0, row_group_size=4)
    kw = dict(max_steps=3, dropout=0.0, micro_batch_size=4, shuffle_buffer=16, record_samples=True)
    one = train_router(cfg_for(run, rank, tmp_path / "one", **kw))
    two = train_router(cfg_for(run, rank, tmp_path / "two", num_workers=2, **kw))
    # each worker read its own row groups; together they trained on the same global batches as one process
    assert [h["sample_ids"] for h in two["history"]] == [h["sample_ids"] for h in one["history"]]
    assert all(len(h["sample_ids"]) == 16 for h in two["history"])
    assert two["engine"] == "ray" and two["num_workers"] == 2 and two["steps"] == 3
    assert two["history"][-1]["loss"] == pytest.approx(one["history"][-1]["loss"], rel=1e-4)
    for k, v in weights(tmp_path / "one").items():
        torch.testing.assert_close(v, weights(tmp_path / "two")[k], atol=1e-4, rtol=1e-4)
    assert two["history"][-1]["n_val"] == one["history"][-1]["n_val"]
