"""`rglf route`: one image + question on a tiny random checkpoint -> level, probabilities, answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rglf.model.router import GranularityRouter, RouterConfig, save_router
from rglf.model.toy import task as toy
from rglf.router.budget import Calibration, save_budget

QUESTION = toy.QUESTIONS["fine"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rglf.model.lmm import FrozenLMM
    from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint

    d = tmp_path_factory.mktemp("route")
    model, tok, proc = build_tiny_model(toy.TOY_VOCABULARY, text_hidden=32, text_layers=1, vision_hidden=16,
                                        image_size=32, intermediate=64)
    ckpt = save_tiny_checkpoint(d / "ckpt", model, tok, proc)
    lmm = FrozenLMM.from_pretrained(ckpt)
    torch.manual_seed(0)
    router = GranularityRouter(RouterConfig(hidden_size=lmm.hidden_size, ladder=lmm.ladder.spec, grid=lmm.grid))
    save_router(d / "router", router)
    scene = toy.sample_scene(np.random.default_rng(3), aspect="wide")
    image = toy.render(scene)
    image.save(d / "img.png")
    return {"dir": d, "ckpt": ckpt, "lmm": lmm, "image": image, "scene": scene}


def invoke(*args):
    from rglf.cli import app

    return CliRunner().invoke(app, ["route", *map(str, args)])


def test_route_cli_prints_a_valid_level_and_answer(setup):
    d = setup["dir"]
    result = invoke("--router", d / "router", "--model", setup["ckpt"], "--image", d / "img.png",
                    "--question", QUESTION, "--answer", "--max-new-tokens", "4", "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    lmm = setup["lmm"]
    assert out["level_tokens"] in lmm.ladder.tokens and out["level_index"] == lmm.ladder.index(out["level_tokens"])
    assert sum(out["probabilities"].values()) == pytest.approx(1.0)
    chosen = max(out["probabilities"], key=out["probabilities"].get)
    assert int(chosen) == out["level_tokens"]  # no budget: the argmax
    pixels, size = lmm.preprocess(setup["image"])
    enc = lmm.encode([pixels], [size])[0]
    assert out["n_crops"] == enc.n_crops == 3  # a wide toy image: base + 2 high-res crops
    assert out["n_visual_tokens"] == lmm.pack(enc.projected, enc.image_size, out["level_index"]).shape[0]
    assert isinstance(out["answer"], str)
    assert out["answer"] == lmm.generate([("human", "<image>\n" + QUESTION)], enc, out["level_index"], max_new_tokens=4)

    text = invoke("--router", d / "router", "--model", setup["ckpt"], "--image", d / "img.png", "--question", QUESTION,
                  "--answer", "--max-new-tokens", "4")
    assert text.exit_code == 0, text.output
    assert f"level: {out['level_tokens']} tokens per crop" in text.output and "answer:" in text.output


def test_route_builds_the_router_inputs_like_the_scoring_job(setup, tmp_path):
    """Probabilities from the live model equal the router's on the tables the scoring job writes."""
    from bench.synthetic import write_lmm_tables
    from rglf.model.lmm import RouterSide
    from rglf.model.router import load_router
    from rglf.router.data import load_router_data, router_logits
    from rglf.router.route import route

    d, lmm = setup["dir"], setup["lmm"]
    q, a = toy.question_answer(setup["scene"], "fine")
    sample = {"sample_id": "x", "image": setup["image"], "question": q, "answer": a, "source": "fine", "split": "test"}
    write_lmm_tables(lmm, [sample], tmp_path / "run", tmp_path / "rank")
    data = load_router_data(tmp_path / "run", tmp_path / "rank")
    logits = router_logits(load_router(d / "router"), data, RouterSide.load(tmp_path / "run" / "router_side"), [0])
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    out = route(d / "router", setup["ckpt"], d / "img.png", q)
    np.testing.assert_allclose(list(out["probabilities"].values()), probs, atol=2e-3)  # fp16 storage of the tables


def test_route_with_a_budget(setup):
    d = setup["dir"]
    tokens = setup["lmm"].ladder.tokens
    save_budget(d / "router", [Calibration(budget=0.05, lam=1e6, token_fraction=0.06, reachable=False, n_samples=1)])
    result = invoke("--router", d / "router", "--model", setup["ckpt"], "--image", d / "img.png",
                    "--question", QUESTION, "--budget", "0.05", "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["level_tokens"] == tokens[0] and out["lam"] == 1e6  # a huge lam: always the coarsest level
    missing = invoke("--router", d / "router", "--model", setup["ckpt"], "--image", d / "img.png",
                     "--question", QUESTION, "--budget", "0.3")
    assert missing.exit_code == 2 and "not calibrated" in missing.output
