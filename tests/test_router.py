"""GranularityRouter: shapes, batching with masks, the text filter, checkpoints, the published key map."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rglf.model.router import (
    AVG_LLAVA_KEY_PREFIX,
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    GranularityRouter,
    RouterConfig,
    convert_avg_llava_router_state_dict,
    load_router,
    save_router,
)

D = 32
GRID = 8  # small crop grid for speed: 64 tokens, ladder 4,8,16,32,64 (the paper's ladder / 9)
SMALL_LADDER = "2x2,4x2,4x4,8x4,8x8"
MODES = ("tokens", "crops")


def small_router(seed: int = 0, **kw) -> GranularityRouter:
    torch.manual_seed(seed)
    cfg = RouterConfig(hidden_size=D, ladder=SMALL_LADDER, grid=GRID, **kw)
    return GranularityRouter(cfg).eval()


def make_sample(n_crops: int, n_text: int, seed: int, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_crops, grid * grid, D, generator=gen), torch.randn(n_text, D, generator=gen)


def pad_batch(samples, extra_crops: int = 0, extra_text: int = 0, garbage: float = 0.0):
    """Stack samples with padding; padded slots hold `garbage`-scaled noise (0: zeros)."""
    n_crops = max(f.shape[0] for f, _ in samples) + extra_crops
    n_text = max(t.shape[0] for _, t in samples) + extra_text
    bsz, n_tok = len(samples), samples[0][0].shape[1]
    gen = torch.Generator().manual_seed(123)
    feats = torch.randn(bsz, n_crops, n_tok, D, generator=gen) * garbage
    text = torch.randn(bsz, n_text, D, generator=gen) * garbage
    crop_mask = torch.zeros(bsz, n_crops, dtype=torch.bool)
    text_mask = torch.zeros(bsz, n_text, dtype=torch.bool)
    for b, (f, t) in enumerate(samples):
        feats[b, : f.shape[0]], crop_mask[b, : f.shape[0]] = f, True
        text[b, : t.shape[0]], text_mask[b, : t.shape[0]] = t, True
    return feats, crop_mask, text, text_mask


def reference_logits(router: GranularityRouter, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One image, step by step as the published AVG-LLaVA router (re-typed from its description).

    ``feats (n_crops, grid*grid, d)``, ``text (T, d)``: no padding anywhere.
    """
    cfg = router.config
    grid_tokens = feats.shape[1]
    side = int(grid_tokens**0.5)
    # text filter: cosine of every base-crop token with every text token, mean over visual tokens
    if cfg.use_text:
        sim = F.cosine_similarity(feats[0].unsqueeze(1), text.unsqueeze(0), dim=-1).mean(dim=0)
        picked = torch.sort(sim, descending=True).indices[: cfg.top_k]
        filtered = torch.zeros(cfg.top_k, D)
        filtered[: len(picked)] = text[picked]
    # levels by avg pooling with kernel = stride, matryoshka style
    levels = []
    for tokens in router.ladder.tokens:
        if tokens == grid_tokens // 2:
            kernel = (1, 2)
        elif tokens == grid_tokens // 8:
            kernel = (2, 4)
        else:
            kernel = int((grid_tokens / tokens) ** 0.5)
        x = feats.view(-1, side, side, D).permute(0, 3, 1, 2)
        levels.append(F.avg_pool2d(x, kernel, kernel).permute(0, 2, 3, 1).reshape(feats.shape[0], -1, D))
    seq = torch.cat(levels + ([filtered.expand(feats.shape[0], -1, -1)] if cfg.use_text else []), dim=1)
    # merger: the reference passes (n_crops, L, d) to a batch_first=False layer -> attention over crops
    merger = nn.TransformerEncoderLayer(D, cfg.nhead, D, batch_first=(cfg.merger_attends == "tokens")).eval()
    merger.load_state_dict(router.merger.state_dict())
    hidden = merger(seq)
    z = router.router(hidden).permute(0, 2, 1)  # (n, N, L)
    z = torch.einsum("ijk,kl->ijl", z, router.voter).permute(0, 2, 1)  # (n, 1, N)
    return router.norm(z.mean(dim=0))[0]


def test_default_voter_lengths_and_full_size_forward():
    torch.manual_seed(0)
    router = GranularityRouter(RouterConfig(hidden_size=D)).eval()
    assert router.voter.shape == (1148, 1)  # 36+72+144+288+576+32, the published shape
    assert router.ladder.tokens == (36, 72, 144, 288, 576)
    image_only = GranularityRouter(RouterConfig(hidden_size=D, use_text=False))
    assert image_only.voter.shape == (1116, 1)
    feats, text = make_sample(2, 7, seed=0, grid=24)
    with torch.no_grad():
        logits = router(feats[None], torch.ones(1, 2, dtype=torch.bool), text[None])
    assert logits.shape == (1, 5)
    # LayerNorm(N) output: zero mean over the levels
    assert logits.mean().abs() < 1e-5


def test_balanced_voter_gives_image_and_instruction_half_the_vote_each():
    router = GranularityRouter(RouterConfig(hidden_size=D, voter_init="balanced"))
    v = router.voter[:, 0].detach().double()
    bounds = [0, 36, 108, 252, 540, 1116, 1148]  # the default ladder's positions, then the 32 text slots
    shares = [float(v[a:b].sum()) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert shares == pytest.approx([0.1] * 5 + [0.5])
    for a, b in zip(bounds, bounds[1:], strict=False):  # uniform inside each group
        assert torch.all(v[a:b] == v[a])
    image_only = GranularityRouter(RouterConfig(hidden_size=D, voter_init="balanced", use_text=False))
    w = image_only.voter[:, 0].detach().double()
    assert [float(w[a:b].sum()) for a, b in zip(bounds[:-2], bounds[1:-1], strict=True)] == pytest.approx([0.2] * 5)
    with pytest.raises(ValueError, match="voter_init"):
        RouterConfig(hidden_size=D, voter_init="uniform")


def test_output_shapes_predict_and_token_counts():
    router = small_router()
    feats, crop_mask, text, text_mask = pad_batch([make_sample(1, 3, 1), make_sample(3, 9, 2)])
    with torch.no_grad():
        logits = router(feats, crop_mask, text, text_mask)
    assert logits.shape == (2, 5)
    pred = router.predict(feats, crop_mask, text, text_mask)
    assert pred.shape == (2,) and pred.dtype == torch.long
    assert torch.equal(pred, logits.argmax(-1))
    assert router.tokens_for(torch.tensor([0, 4, 2])).tolist() == [4, 64, 16]


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_one_by_one(mode):
    router = small_router(merger_attends=mode)
    # crop counts 1, 2, 3 and instruction lengths 0, 5, 40 (> k = 32)
    samples = [make_sample(1, 40, 10), make_sample(2, 0, 11), make_sample(3, 5, 12)]
    with torch.no_grad():
        batched = router(*pad_batch(samples, garbage=7.0))
        for b, sample in enumerate(samples):
            single = router(*pad_batch([sample]))
            torch.testing.assert_close(batched[b], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("garbage", [1e3, float("nan"), float("inf")])
def test_padding_with_garbage_does_not_change_logits(mode, garbage):
    router = small_router(merger_attends=mode)
    samples = [make_sample(2, 6, 20), make_sample(1, 35, 21)]
    with torch.no_grad():
        tight = router(*pad_batch(samples))
        padded = router(*pad_batch(samples, extra_crops=2, extra_text=9, garbage=garbage))
    torch.testing.assert_close(padded, tight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_computation(mode):
    router = small_router(merger_attends=mode)
    samples = [make_sample(3, 40, 30), make_sample(1, 4, 31), make_sample(2, 33, 32)]
    with torch.no_grad():
        batched = router(*pad_batch(samples, garbage=3.0))
        for b, (feats, text) in enumerate(samples):
            torch.testing.assert_close(
                batched[b], reference_logits(router, feats, text), atol=1e-5, rtol=1e-5
            )


def test_merger_axis_matters_with_several_crops():
    """The two axes are really different computations (same weights), equal for one crop only in
    the trivial sense that 'crops' then does no token mixing at all."""
    tokens, crops = small_router(merger_attends="tokens"), small_router(merger_attends="crops")
    crops.load_state_dict(tokens.state_dict())
    batch = pad_batch([make_sample(3, 8, 40)])
    with torch.no_grad():
        assert not torch.allclose(tokens(*batch), crops(*batch), atol=1e-4)


def test_text_filter_picks_tokens_most_similar_to_base_crop():
    router = small_router(top_k=4)
    direction = F.normalize(torch.randn(D), dim=0)
    gen = torch.Generator().manual_seed(5)
    base = direction + 0.01 * torch.randn(GRID * GRID, D, generator=gen)  # base crop points along `direction`
    other = -direction + 0.01 * torch.randn(GRID * GRID, D, generator=gen)  # a second crop points away
    n_text = 12
    text = torch.randn(n_text, D, generator=gen)
    text = text - (text @ direction)[:, None] * direction  # orthogonal to the image: cosine ~ 0
    # cosines 0.9, 0.5, 0.7, 0.3 at positions 7, 2, 10, 4 (scaled to show it is cosine, not dot)
    for pos, cos, scale in [(7, 0.9, 0.1), (2, 0.5, 10.0), (10, 0.7, 1.0), (4, 0.3, 3.0)]:
        ortho = F.normalize(text[pos], dim=0)
        text[pos] = scale * (cos * direction + (1 - cos**2) ** 0.5 * ortho)
    text[0] = -5 * direction  # most dissimilar
    feats = torch.stack([base, other])[None]  # (1, 2, 64, d)
    text_b = torch.cat([text, 100 * direction.expand(3, D)])[None]  # 3 padded tokens, perfectly aligned
    text_mask = torch.tensor([[True] * n_text + [False] * 3])
    selected, index = router.select_text(feats[:, 0], text_b, text_mask)
    assert index[0].tolist() == [7, 10, 2, 4]  # score order, best first; padding never chosen
    torch.testing.assert_close(selected[0], text[[7, 10, 2, 4]])
    # fewer real tokens than k: zero-padded slots with index -1
    selected, index = router.select_text(
        feats[:, 0], text_b[:, [2, 7, 12]], torch.tensor([[True, True, False]])
    )
    assert index[0].tolist() == [1, 0, -1, -1]
    assert torch.all(selected[0, 2:] == 0)
    # empty instruction
    selected, index = router.select_text(
        feats[:, 0], torch.zeros(1, 0, D), torch.zeros(1, 0, dtype=torch.bool)
    )
    assert index.tolist() == [[-1] * 4] and torch.all(selected == 0)


def test_image_only_router_ignores_text():
    router = small_router(use_text=False)
    assert router.voter.shape == (124, 1)
    feats, crop_mask, text, text_mask = pad_batch([make_sample(2, 5, 50)])
    with torch.no_grad():
        a = router(feats, crop_mask, text, text_mask)
        b = router(feats, crop_mask)
    torch.testing.assert_close(a, b)


def test_text_changes_logits_and_gradients_reach_every_parameter():
    router = small_router().train()
    feats, crop_mask, text, text_mask = pad_batch([make_sample(2, 5, 60), make_sample(1, 9, 61)])
    router(feats, crop_mask, text, text_mask).pow(2).sum().backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    router.eval()
    with torch.no_grad():
        assert not torch.allclose(
            router(feats, crop_mask, text, text_mask), router(feats, crop_mask, -text, text_mask)
        )


def test_invariants_fail_loudly():
    router = small_router()
    feats, crop_mask, text, text_mask = pad_batch([make_sample(2, 5, 70)])
    with pytest.raises(ValueError, match="grid is 8x8"):
        router(torch.randn(1, 2, 50, D), crop_mask, text, text_mask)
    with pytest.raises(ValueError, match="hidden_size"):
        router(torch.randn(1, 2, GRID * GRID, D + 1), crop_mask, text, text_mask)
    with pytest.raises(ValueError, match="text_embeds"):
        router(feats, crop_mask, torch.randn(1, 5, D - 1), text_mask)
    with pytest.raises(ValueError, match="use_text=True"):
        router(feats, crop_mask)
    with pytest.raises(ValueError, match="base crop"):
        router(feats, torch.tensor([[False, True]]), text, text_mask)
    with pytest.raises(ValueError, match="crop_mask must be bool"):
        router(feats, crop_mask.long(), text, text_mask)


def test_config_validation_and_dict_round_trip():
    cfg = RouterConfig(hidden_size=64, ladder="36,72,144,288,576", top_k=16, merger_attends="crops")
    assert cfg.ladder == "6x6,12x6,12x12,24x12,24x24"  # canonical form
    assert RouterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.seq_len == 1116 + 16 and cfg.n_levels == 5
    with pytest.raises(ValueError, match="divisible"):
        RouterConfig(hidden_size=30)
    with pytest.raises(ValueError, match="ladder"):
        RouterConfig(hidden_size=32, ladder="36,1000")
    with pytest.raises(ValueError, match="at least 2 levels"):
        RouterConfig(hidden_size=32, ladder="576")
    with pytest.raises(ValueError, match="merger_attends"):
        RouterConfig(hidden_size=32, merger_attends="both")
    with pytest.raises(ValueError, match="unknown RouterConfig fields"):
        RouterConfig.from_dict({"hidden_size": 32, "k": 3})


def test_save_load_round_trip(tmp_path):
    router = small_router(seed=3, merger_attends="crops", top_k=8)
    save_router(tmp_path / "ckpt", router)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([ROUTER_WEIGHTS, ROUTER_CONFIG])
    loaded = load_router(tmp_path / "ckpt")
    assert loaded.config == router.config and not loaded.training
    batch = pad_batch([make_sample(3, 20, 80), make_sample(1, 2, 81)], garbage=2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*batch), router(*batch), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        load_router(tmp_path / "missing")


def published_state_dict(router: GranularityRouter) -> dict[str, torch.Tensor]:
    """What an AVG-LLaVA checkpoint holds: the router under `model.router.`, plus the LLM's weights."""
    sd = {AVG_LLAVA_KEY_PREFIX + k: v.clone().half() for k, v in router.state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    sd["lm_head.weight"] = torch.zeros(2, 2)
    return sd


def test_avg_llava_key_map_loads_published_names():
    torch.manual_seed(0)
    source = GranularityRouter(RouterConfig.for_avg_llava(hidden_size=D)).eval()
    published = published_state_dict(source)
    for name in (
        "router.0.weight",
        "router.2.bias",
        "merger.self_attn.in_proj_weight",
        "merger.linear1.weight",
        "merger.norm2.bias",
        "norm.weight",
    ):
        assert AVG_LLAVA_KEY_PREFIX + name in published
    assert published["model.router.voter"].shape == (1148, 1)
    # published weights are fp16: compare against the source rounded the same way
    source.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})
    torch.manual_seed(1)
    fresh = GranularityRouter(RouterConfig.for_avg_llava(hidden_size=D)).eval()
    fresh.load_state_dict(convert_avg_llava_router_state_dict(published), strict=True)
    feats, text = make_sample(2, 40, 90, grid=24)
    batch = (feats[None], torch.ones(1, 2, dtype=torch.bool), text[None])
    with torch.no_grad():
        torch.testing.assert_close(fresh(*batch), source(*batch), atol=0, rtol=0)


def test_avg_llava_key_map_reports_missing_and_unexpected_keys():
    published = published_state_dict(small_router())
    del published["model.router.voter"]
    published["model.router.text_filter.temp"] = torch.ones(())
    with pytest.raises(
        KeyError, match=r"missing \['model.router.voter'\].*unexpected \['model.router.text_filter.temp'\]"
    ):
        convert_avg_llava_router_state_dict(published)
    with pytest.raises(KeyError, match="no keys start with"):
        convert_avg_llava_router_state_dict({"voter": torch.ones(3, 1)})


# ---- the fast execution path equals the layer-by-layer computation ----------------------------


@pytest.mark.parametrize("mode", MODES)
def test_prepared_forward_equals_the_layer_by_layer_computation(mode):
    """``forward`` (prepare + dense per-crop-count blocks, folded voter) = bench/router_reference.py, the
    pre-optimisation code: the same logits (eval) and the same gradients (train mode, dropout 0)."""
    from bench.router_reference import reference_forward
    from rglf.model.rglf import rglf_loss

    samples = [make_sample(3, 40, 80), make_sample(1, 4, 81), make_sample(2, 33, 82), make_sample(3, 0, 83),
               make_sample(2, 7, 84)]
    batch = pad_batch(samples, extra_crops=1, garbage=5.0)
    router = small_router(merger_attends=mode, dropout=0.0).train()
    nll = torch.rand(len(samples), 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for forward in (reference_forward, lambda r, *b: r(*b)):
        loss, _ = rglf_loss(forward(router, *batch), nll, nll.argsort(dim=1))
        grads.append(torch.autograd.grad(loss, list(router.parameters())))
    for (name, _), a, b in zip(router.named_parameters(), *grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4, msg=name)
    router.eval()
    with torch.no_grad():
        torch.testing.assert_close(router(*batch), reference_forward(router, *batch), atol=1e-5, rtol=1e-5)
        inputs = router.prepare(*batch)
        assert inputs.crop_counts == (1, 2, 2, 3, 3)  # sorted: dense blocks of equal crop count
        torch.testing.assert_close(router.forward_prepared(inputs), router(*batch))


def test_cpu_dropout_has_dropouts_law_and_follows_the_torch_seed():
    from rglf.model.router import dropout

    x = torch.ones(400_000)
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    torch.manual_seed(3)
    b = dropout(x, 0.1, True)
    assert torch.equal(a, b) and not torch.equal(a, dropout(x, 0.1, True))  # seeded by torch's generator
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 400k draws: 5 standard deviations
    torch.testing.assert_close(a[kept], torch.full_like(a[kept], 1 / 0.9))  # kept values scaled by 1/(1-p)
    assert torch.equal(dropout(x, 0.1, False), x) and torch.equal(dropout(x, 0.0, True), x)
    g = torch.ones(10, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(g, 0.5, True)
    y.sum().backward()
    torch.testing.assert_close(g.grad, y.detach())  # gradient flows through the kept entries only
