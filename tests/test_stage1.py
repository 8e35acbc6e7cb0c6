"""Stage-1 trainer: a few steps lower the loss; the saved checkpoint reloads offline and scores identically."""

from __future__ import annotations

import numpy as np
import torch

from rglf.model.lmm import FrozenLMM
from rglf.model.toy import task as toy
from rglf.model.toy.stage1 import Stage1Config, _scene_turns, build_untrained, save_checkpoint, stage1_loss


def test_few_steps_lower_the_multi_level_loss(tmp_path):
    torch.manual_seed(0)
    cfg = Stage1Config(out=tmp_path / "ckpt", steps=10, finest_steps=0, text_hidden=64, vision_hidden=32)
    lmm = build_untrained(cfg)
    lmm.model.train()
    opt = torch.optim.AdamW([p for p in lmm.model.parameters() if p.requires_grad], lr=3e-3)
    rng = np.random.default_rng(0)
    scenes = [toy.sample_scene(rng, aspect="square") for _ in range(4)]
    images = [toy.render(s) for s in scenes]
    convs = [lmm.tokenize(_scene_turns(s, rng), has_image=True) for s in scenes]
    levels = list(range(len(lmm.ladder)))
    first, per_level = stage1_loss(lmm, images, convs, levels)
    assert set(per_level) == {36, 72, 144, 288, 576}
    for _ in range(8):
        loss, _ = stage1_loss(lmm, images, convs, levels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = stage1_loss(lmm, images, convs, levels)
    assert float(last) < 0.7 * float(first)


def test_saved_checkpoint_reloads_offline_and_scores_identically(tmp_path):
    cfg = Stage1Config(out=tmp_path / "ckpt", steps=1, finest_steps=0, text_hidden=64, vision_hidden=32)
    lmm = build_untrained(cfg)
    lmm.model.eval()
    save_checkpoint(lmm, cfg.out, {"note": "test"})
    assert not (tmp_path / "ckpt.tmp").exists()
    again = FrozenLMM.from_pretrained(cfg.out)
    rng = np.random.default_rng(1)
    scene = toy.sample_scene(rng, aspect="wide")
    q, a = toy.question_answer(scene, "fine" if scene.square_kind == "fine" else "medium")
    turns = [("human", "<image>\n" + q), ("gpt", a)]
    scores = []
    for model in (lmm, again):
        pix, size = model.preprocess(toy.render(scene))
        enc = model.encode([pix], [size])
        scores.append([(s.level_tokens, s.nll_mean) for s in model.score([(0, model.tokenize(turns, True), enc[0])])])
    assert [lv for lv, _ in scores[0]] == [lv for lv, _ in scores[1]]
    np.testing.assert_allclose([n for _, n in scores[0]], [n for _, n in scores[1]], atol=1e-6)
