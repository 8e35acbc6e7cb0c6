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


# ---- many images: Router, route_dataset, rglf route --data -------------------------------------


def test_a_batch_routes_exactly_as_one_image_at_a_time(setup, tmp_path):
    """Padding crops (images of other aspect ratios) and instruction tokens changes nothing."""
    from rglf.router.route import Router

    d = setup["dir"]
    rng = np.random.default_rng(5)
    images = [toy.render(toy.sample_scene(rng, aspect=a)) for a in ("wide", "square", "tall", "wide")]
    questions = [toy.QUESTIONS[f] for f in ("fine", "background", "medium", "background")]
    router = Router.load(d / "router", setup["ckpt"], device="cpu")
    batch = router.route(images, questions, batch_size=4)
    alone = [router.route([im], [q]) for im, q in zip(images, questions, strict=True)]
    assert len({int(n) for n in batch.n_crops}) > 1  # the batch really pads crops
    np.testing.assert_allclose(batch.probabilities, np.concatenate([a.probabilities for a in alone]), atol=1e-5)
    assert batch.level_index.tolist() == [int(a.level_index[0]) for a in alone]
    assert batch.n_visual_tokens.tolist() == [int(a.n_visual_tokens[0]) for a in alone]
    lmm = setup["lmm"]
    for k, im in enumerate(images):
        pixels, size = lmm.preprocess(im)
        enc = lmm.encode([pixels], [size])[0]
        assert batch.n_visual_tokens[k] == lmm.pack(enc.projected, enc.image_size, int(batch.level_index[k])).shape[0]
    assert batch.level_tokens.tolist() == [lmm.ladder.tokens[i] for i in batch.level_index]
    # one question for every image; a batch of 2 gives the same as a batch of 4
    same_q = router.route(images, QUESTION, batch_size=2)
    np.testing.assert_allclose(same_q.probabilities, router.route(images, [QUESTION] * 4).probabilities, atol=1e-5)


def test_route_loads_the_router_and_model_once(setup, monkeypatch):
    from rglf.router import route as route_mod

    d = setup["dir"]
    route_mod._cached_router.cache_clear()
    loads = []
    real = route_mod.Router.load.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(route_mod.Router, "load", classmethod(counting))
    first = route_mod.route(d / "router", setup["ckpt"], d / "img.png", QUESTION, device="cpu")
    second = route_mod.route(d / "router", setup["ckpt"], d / "img.png", toy.QUESTIONS["background"], device="cpu")
    assert len(loads) == 1
    assert first["question"] == QUESTION and second["question"] == toy.QUESTIONS["background"]


def _dataset(folder, lmm_images):
    """A LLaVA-format file: 3 good records, a missing image, a corrupt image, a record without id."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k, im in enumerate(lmm_images):
        im.save(folder / f"im{k}.png")
        records.append({"id": f"r{k}", "image": f"im{k}.png", "source": "toy" if k else None,
                        "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                          {"from": "gpt", "value": "plain"}]})
    (folder / "bad.png").write_bytes(b"not an image")
    records.append({"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "q"}]})
    records.append({"id": "corrupt", "image": "bad.png", "conversations": [{"from": "human", "value": "q"}]})
    records.append({"image": "im0.png", "conversations": [{"from": "human", "value": "q"}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def test_route_dataset_writes_one_row_per_record_and_error_rows(setup, tmp_path):
    import pyarrow.parquet as pq

    from rglf.router.route import Router, route_dataset

    d = setup["dir"]
    rng = np.random.default_rng(7)
    images = [toy.render(toy.sample_scene(rng, aspect=a)) for a in ("wide", "square", "tall")]
    data = _dataset(tmp_path / "data", images)
    router = Router.load(d / "router", setup["ckpt"], device="cpu")
    seen = []
    report = route_dataset(router, data, tmp_path / "data", tmp_path / "out" / "routed.parquet", batch_size=2,
                           answer=True, max_new_tokens=3, progress=lambda done, total, f: seen.append((done, total)))
    table = pq.read_table(tmp_path / "out" / "routed.parquet").to_pylist()
    assert [r["sample_id"] for r in table] == ["r0", "r1", "r2", "missing", "corrupt", None]  # input order
    assert [r["error_code"] for r in table] == [None, None, None, "missing_file", "corrupt_image", "missing_id"]
    assert report.records == 6 and report.routed == 3 and report.exit_code == 3
    assert report.rejected_by_code == {"missing_file": 1, "corrupt_image": 1, "missing_id": 1}
    expected = router.route(images, QUESTION)
    good = table[:3]
    np.testing.assert_allclose([[r[f"p_{t}"] for t in router.ladder] for r in good], expected.probabilities, atol=1e-5)
    assert [r["n_visual_tokens"] for r in good] == expected.n_visual_tokens.tolist()
    assert [r["level_tokens"] for r in good] == expected.level_tokens.tolist()
    assert all(isinstance(r["answer"], str) for r in good) and all(r["answer"] is None for r in table[3:])
    assert [r["source"] for r in good] == ["data", "toy", "toy"]  # the file's stem when a record has none
    assert report.mean_visual_tokens == pytest.approx(np.mean(expected.n_visual_tokens))
    assert report.finest_mean_visual_tokens == pytest.approx(np.mean(expected.visual_tokens_per_level[:, -1]))
    assert seen[-1] == (6, 6)
    assert "3 of 6 records routed" in report.summary() and "fewer" in report.summary()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp file left


def test_route_data_cli_summary_and_exit_codes(setup, tmp_path):
    d = setup["dir"]
    rng = np.random.default_rng(8)
    data = _dataset(tmp_path / "data", [toy.render(toy.sample_scene(rng, aspect="square"))])
    out = tmp_path / "routed.parquet"
    result = invoke("--router", d / "router", "--model", setup["ckpt"], "--data", data, "--image-root",
                    tmp_path / "data", "--out", out, "--device", "cpu")
    assert result.exit_code == 3, result.output  # rejected records: finished, exit 3
    assert result.stdout.startswith("route: 1 of 4 records routed") and "visual tokens per sample" in result.stdout
    assert out.is_file()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke("--router", d / "router", "--model", setup["ckpt"], "--data", empty, "--image-root", tmp_path,
                    "--out", tmp_path / "e.parquet", "--device", "cpu")
    assert result.exit_code == 3 and "no records (empty)" in result.stdout
    both = invoke("--router", d / "router", "--image", d / "img.png", "--data", data)
    assert both.exit_code == 2 and both.stderr.startswith("error:") and both.stderr.count("\n") == 1
    missing = invoke("--router", d / "router", "--model", setup["ckpt"], "--image", tmp_path / "nope.png",
                     "--question", QUESTION, "--device", "cpu")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr and missing.stderr.count("\n") == 1
