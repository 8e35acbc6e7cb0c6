"""FrozenLMM against transformers' own LLaVA(-NeXT) on tiny random models.

Packing at 576 and the answer NLL are pinned to transformers' ``get_image_features`` and
``forward(labels=...)``; the other levels, batching, encode-once, generation and the saved
artefacts are pinned to their definitions.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rglf.model.conversation import IGNORE_INDEX
from rglf.model.lmm import FrozenLMM, RouterSide, checkpoint_fingerprint, splice
from rglf.model.toy.tiny import build_tiny_model

# PIL (width, height). The tiny pinpoints are 96x96, 96x192, 192x96: "odd" sizes leave padding
# that un-padding removes (columns for the wide one, rows for the tall one).
SIZES = {"square": (96, 96), "wide": (192, 96), "tall": (96, 192), "odd-wide": (130, 70), "odd-tall": (70, 130)}
QA = [("human", "<image>\nwhat colour is the circle ?"), ("gpt", "red")]
MULTI = [
    ("human", "what is the background colour ? <image>"),
    ("gpt", "green"),
    ("human", "is the circle checkered or plain ?"),
    ("gpt", "the circle is checkered"),
    ("human", "what colour is the circle ?"),
    ("gpt", "red and blue"),
]


def image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def encode(lmm: FrozenLMM, size: tuple[int, int], seed: int = 0):
    pixels, image_size = lmm.preprocess(image(size, seed))
    return pixels, image_size, lmm.encode([pixels], [image_size])[0]


def by_level(scores) -> dict[int, object]:
    return {s.level_tokens: s for s in scores}


def hf_image_outputs(lmm: FrozenLMM, pixels: torch.Tensor, image_size: tuple[int, int]):
    """transformers' own image features (output_hidden_states=True: 5.23 needs it for vision_feature_layer=0)."""
    with torch.no_grad():
        if lmm.is_next:
            return lmm.model.model.get_image_features(
                pixels[None], torch.tensor([image_size]), return_dict=True, output_hidden_states=True
            )
        return lmm.model.model.get_image_features(pixels, return_dict=True, output_hidden_states=True)


def hf_loss(lmm: FrozenLMM, conv, image_outputs=None) -> float:
    """transformers' forward loss with labels: the image placeholder expanded to its feature count."""
    ids, labels = list(conv.input_ids), list(conv.labels)
    kwargs = {}
    if image_outputs is not None:
        n = image_outputs.pooler_output[0].shape[0]
        i = conv.image_index
        ids = ids[:i] + [lmm.image_token_id] * n + ids[i + 1 :]
        labels = labels[:i] + [IGNORE_INDEX] * n + labels[i + 1 :]
        kwargs["mm_encoder_outputs"] = {"image": image_outputs}
    with torch.no_grad():
        out = lmm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), **kwargs)
    return float(out.loss)


@pytest.fixture(scope="module")
def variants(tiny_lmm, tiny_words):
    """The three layouts FrozenLMM supports: SigLIP + linear path (the saved tiny checkpoint),
    CLIP + GELU projector (LLaVA's usual layout), single-crop LLaVA."""
    return {
        "siglip-linear": tiny_lmm,
        "clip-gelu": FrozenLMM(*build_tiny_model(tiny_words, vision="clip", linear_vision=False)),
        "llava-single-crop": FrozenLMM(*build_tiny_model(tiny_words, next=False)),
    }


# --- packing and loss parity with transformers ----------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("name", ["siglip-linear", "clip-gelu"])
def test_packing_at_576_equals_transformers(variants, name, size):
    lmm = variants[name]
    pixels, image_size, enc = encode(lmm, SIZES[size])
    ours = lmm.pack(enc.projected, image_size, lmm.ladder.index(576))
    ref = hf_image_outputs(lmm, pixels, image_size).pooler_output[0]
    assert torch.equal(ours, ref)
    rows, cols = lmm.grid_shape(image_size)
    padded = 576 + rows * 24 * (cols * 24 + 1)  # every row of the high-res map + a newline each
    if size.startswith("odd"):
        assert ours.shape[0] < padded  # un-padding removed rows or columns
    else:
        assert ours.shape[0] == padded


@pytest.mark.parametrize(
    ("name", "size"),
    [("siglip-linear", "odd-wide"), ("clip-gelu", "square"), ("llava-single-crop", "odd-wide")],
)
def test_score_at_576_equals_transformers_loss(variants, name, size):
    lmm = variants[name]
    pixels, image_size, enc = encode(lmm, SIZES[size])
    conv = lmm.tokenize(MULTI, has_image=True)
    s = by_level(lmm.score([("k", conv, enc)], levels=[576]))[576]
    ref = hf_loss(lmm, conv, hf_image_outputs(lmm, pixels, image_size))
    assert abs(s.nll_mean - ref) < 1e-5
    assert s.answer_tokens == conv.answer_tokens
    assert s.nll_sum == pytest.approx(s.nll_mean * s.answer_tokens, rel=1e-6)
    if name == "llava-single-crop":
        assert (s.n_crops, s.n_visual_tokens) == (1, 576)


def test_answer_only_head_equals_full_logits(tiny_lmm):
    lmm = tiny_lmm
    _, _, enc = encode(lmm, SIZES["square"])
    conv = lmm.tokenize(MULTI, has_image=True)
    scores = by_level(lmm.score([("k", conv, enc)], levels=[72, 576]))
    for tokens in (72, 576):
        embeds, labels = splice(lmm.embed, conv, lmm.pack(enc.projected, enc.image_size, lmm.ladder.index(tokens)))
        with torch.no_grad():
            hidden = lmm.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]  # (L, d)
            logp = torch.log_softmax(lmm.lm_head(hidden).float(), dim=-1)  # (L, vocab): every position
        target = labels[1:]
        at = (target != IGNORE_INDEX).nonzero()[:, 0]
        nll = -logp[at, target[at]]
        s = scores[tokens]
        assert s.answer_tokens == len(at) == conv.answer_tokens
        assert s.nll_sum == pytest.approx(float(nll.sum()), abs=1e-5)
        assert s.nll_mean == pytest.approx(float(nll.mean()), abs=1e-5)
        assert s.greedy_match == bool((logp[at].argmax(-1) == target[at]).all())


# --- batching, token counts, encode-once ------------------------------------------------------------


def test_batched_scoring_equals_one_by_one(tiny_lmm):
    lmm = tiny_lmm
    items = [
        ("square", lmm.tokenize(QA, has_image=True), encode(lmm, SIZES["square"])[2]),
        ("multi", lmm.tokenize(MULTI, has_image=True), encode(lmm, SIZES["square"], seed=1)[2]),
        ("text", lmm.tokenize([("human", "what colour is red ?"), ("gpt", "red")], has_image=False), None),
    ]
    levels = [36, 576]  # the shortest and the longest sequences of each image
    alone = {(s.key, s.level_tokens): s for item in items for s in lmm.score([item], levels=levels)}
    one_batch = lmm.score(items, levels=levels, max_batch_tokens=1 << 30)
    small_batches = lmm.score(items, levels=levels, max_batch_tokens=2500, max_batch_size=2)
    for batched in (one_batch, small_batches):
        assert len(batched) == len(alone) == 3 * 2
        for s in batched:
            ref = alone[(s.key, s.level_tokens)]
            assert (s.n_visual_tokens, s.n_crops, s.answer_tokens) == (ref.n_visual_tokens, ref.n_crops, ref.answer_tokens)
            assert abs(s.nll_mean - ref.nll_mean) < 1e-5
            assert abs(s.nll_sum - ref.nll_sum) < 1e-5 * max(1, ref.answer_tokens)
    assert [(s.key, s.n_visual_tokens) for s in small_batches if s.key == "square"] == [("square", 78), ("square", 1176)]


def test_one_vision_pass_scores_every_level_with_right_token_counts(tiny_lmm):
    lmm = tiny_lmm
    calls = []
    # the patch embedding runs exactly once per vision pass (SigLIP layer 0 skips the encoder)
    tower = getattr(lmm.vision_tower, "vision_model", lmm.vision_tower)
    handle = tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
    try:
        pixels, image_size = lmm.preprocess(image(SIZES["square"]))
        enc = lmm.encode([pixels], [image_size])[0]
        scores = lmm.score([("a", lmm.tokenize(QA, has_image=True), enc)])
        assert len(calls) == 1
        wide, wide_size = lmm.preprocess(image(SIZES["wide"], seed=2))
        assert [e.n_crops for e in lmm.encode([wide, pixels], [wide_size, image_size])] == [3, 2]
        assert len(calls) == 2  # several images: still one pass
    finally:
        handle.remove()
    square = {s.level_tokens: (s.level_grid, s.n_crops, s.n_visual_tokens) for s in scores}
    # base crop h*w + un-padded high-res map rows x (w + newline). Non-square grids (12x6, 24x12) are
    # un-padded as an h x w map, as the reference does, so a square image keeps half their rows.
    assert square == {
        36: ("6x6", 2, 36 + 6 * 7),
        72: ("12x6", 2, 72 + 6 * 7),
        144: ("12x12", 2, 144 + 12 * 13),
        288: ("24x12", 2, 288 + 12 * 13),
        576: ("24x24", 2, 576 + 24 * 25),
    }
    assert square[576][2] == 1176 and square[36][2] == 78


# --- conversations ----------------------------------------------------------------------------------


def test_multi_turn_labels_cover_every_answer_and_eos(tiny_lmm):
    lmm = tiny_lmm
    tok = lmm.tokenizer
    conv = lmm.tokenize(MULTI, has_image=True)
    labelled = [i for i, lab in enumerate(conv.labels) if lab != IGNORE_INDEX]
    expected = []
    for answer in (MULTI[1][1], MULTI[3][1], MULTI[5][1]):
        expected.append(tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert [conv.labels[i] for i in labelled] == [t for ids in expected for t in ids]
    assert all(conv.labels[i] == conv.input_ids[i] for i in labelled)
    # the three answer spans are separate runs: everything between them (questions, roles) is ignored
    breaks = sum(1 for a, b in zip(labelled, labelled[1:], strict=False) if b != a + 1)
    assert breaks == 2
    assert conv.input_ids[labelled[-1]] == tok.eos_token_id and labelled[-1] == len(conv.input_ids) - 1


def test_text_only_sample_is_scored(tiny_lmm):
    lmm = tiny_lmm
    conv = lmm.tokenize([("human", "what colour is the background ?"), ("gpt", "blue")], has_image=False)
    scores = lmm.score([("t", conv, None)])
    assert [s.level_tokens for s in scores] == [36, 72, 144, 288, 576]
    assert {(s.n_crops, s.n_visual_tokens, s.answer_tokens) for s in scores} == {(0, 0, 2)}
    assert len({s.nll_mean for s in scores}) == 1
    assert abs(scores[0].nll_mean - hf_loss(lmm, conv)) < 1e-5
    only = lmm.score([("t", conv, None)], levels=[576])  # reported only at the requested levels
    assert [s.level_tokens for s in only] == [576]


def test_image_conversation_without_encoding_is_rejected(tiny_lmm):
    conv = tiny_lmm.tokenize(QA, has_image=True)
    with pytest.raises(ValueError, match="no encoding"):
        tiny_lmm.score([("k", conv, None)])


def test_greedy_match_agrees_with_generate(tiny_model):
    model, tok, processor = copy.deepcopy(tiny_model)  # a private copy: its lm_head is edited below
    lmm = FrozenLMM(model, tok, processor)
    decoded: list[list[int]] = []
    decode = tok.decode
    tok.decode = lambda ids, **kw: (decoded.append(list(ids)), decode(ids, **kw))[1]  # record raw greedy ids
    _, _, enc = encode(lmm, SIZES["square"])
    prompt = [QA[0]]
    top = lmm.ladder.index(576)
    lmm.generate(prompt, enc, top, max_new_tokens=6)
    greedy = decoded[-1]
    # A random model rarely emits </s>: make greedy decoding stop after a prefix of plain words by
    # swapping the lm_head rows of </s> and of the token that follows that prefix (the prefix's own
    # argmaxes are untouched, the next argmax becomes </s>).
    special = set(tok.all_special_ids)
    k = next(
        i for i in range(1, len(greedy))
        if not special & set(greedy[:i]) and greedy[i] not in greedy[:i] and greedy[i] != tok.eos_token_id
    )
    with torch.no_grad():
        w = model.lm_head.weight
        w[[greedy[k], tok.eos_token_id]] = w[[tok.eos_token_id, greedy[k]]]
    answer = lmm.generate(prompt, enc, top, max_new_tokens=6)
    assert decoded[-1] == greedy[:k] and answer
    levels = [36, 576]
    generated = {36: lmm.generate(prompt, enc, lmm.ladder.index(36), max_new_tokens=6), 576: answer}
    for candidate in (answer, answer + " blue", "red"):
        conv = lmm.tokenize(prompt + [("gpt", candidate)], has_image=True)
        for s in lmm.score([("k", conv, enc)], levels=levels):
            assert s.greedy_match == (generated[s.level_tokens] == candidate), (candidate, s.level_tokens, generated)
            if s.level_tokens == 576:
                assert s.greedy_match == (candidate == answer)


# --- saved artefacts --------------------------------------------------------------------------------


def test_reloaded_checkpoint_scores_identically(tiny_model, tiny_lmm, tiny_ckpt):
    memory = FrozenLMM(*tiny_model)
    assert tiny_lmm.model_id == checkpoint_fingerprint(tiny_ckpt)
    for (name, a), b in zip(memory.model.state_dict().items(), tiny_lmm.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    scores = []
    for lmm in (memory, tiny_lmm):
        _, _, enc = encode(lmm, SIZES["odd-tall"])
        scores.append(lmm.score([("k", lmm.tokenize(QA, has_image=True), enc)], levels=[72, 288]))
    assert scores[0] == scores[1]


@pytest.mark.parametrize("name", ["siglip-linear", "clip-gelu"])
def test_router_side_reproduces_projector_and_embeddings(variants, name, tmp_path):
    lmm = variants[name]
    lmm.router_side().save(tmp_path / "side", extra={"ladder": lmm.ladder.spec})
    side = RouterSide.load(tmp_path / "side")
    assert not any(p.requires_grad for p in side.parameters())
    _, _, enc = encode(lmm, SIZES["wide"])
    with torch.no_grad():
        torch.testing.assert_close(side.project(enc.vision), enc.projected)
        vision = torch.randn(2, 576, lmm.vision_hidden)
        torch.testing.assert_close(side.project(vision), lmm.projector(vision))
        ids = torch.tensor([[1, 5, 9], [2, 3, len(lmm.tokenizer) - 1]])
        torch.testing.assert_close(side.embed(ids), lmm.embed(ids))
    assert side.meta["model_id"] == lmm.model_id and side.meta["grid"] == 24
    assert side.meta["ladder"] == "6x6,12x6,12x12,24x12,24x24"
    assert json.loads((tmp_path / "side" / "router_side.json").read_text())["hidden"] == lmm.hidden_size


def test_checkpoint_fingerprint_changes_when_weights_change(tiny_ckpt, tmp_path):
    copy = tmp_path / tiny_ckpt.name
    shutil.copytree(tiny_ckpt, copy)
    original = checkpoint_fingerprint(copy)
    assert original == checkpoint_fingerprint(tiny_ckpt)  # content only: not the path (see tests/test_provenance.py)
    weights = load_file(copy / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    retrained = checkpoint_fingerprint(copy)
    assert retrained != original
    config = json.loads((copy / "config.json").read_text())
    config["vision_feature_layer"] = -1
    (copy / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(copy) not in (original, retrained)
