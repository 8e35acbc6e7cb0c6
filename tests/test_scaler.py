"""The granularity scaler: the paper's ladder, its pooling kernels, custom ladders, bad specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rglf.model.scaler import Ladder, LadderError, Level

# SPEC: tokens per crop -> (grid h x w, avg-pool kernel (height, width)) on the 24x24 map
PAPER = {36: ((6, 6), (4, 4)), 72: ((12, 6), (2, 4)), 144: ((12, 12), (2, 2)), 288: ((24, 12), (1, 2)), 576: ((24, 24), (1, 1))}


def as_map(feats: torch.Tensor, g: int = 24) -> torch.Tensor:
    """(B, g*g, d) row-major tokens -> (B, d, g, g)."""
    return feats.reshape(feats.shape[0], g, g, -1).permute(0, 3, 1, 2)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B, h*w, d), row-major."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


@pytest.fixture
def feats() -> torch.Tensor:
    return torch.randn(3, 576, 8, generator=torch.Generator().manual_seed(0))  # (crops, 24*24, d)


def test_default_ladder_tokens_and_grids():
    ladder = Ladder.default()
    assert ladder.tokens == (36, 72, 144, 288, 576)
    assert [(lv.h, lv.w) for lv in ladder.levels] == [PAPER[t][0] for t in ladder.tokens]
    assert ladder.spec == "6x6,12x6,12x12,24x12,24x24"
    assert Ladder.parse("576,36,144,72,288") == ladder  # any order in, ascending out (expert i = level i)
    assert Ladder.parse(ladder.spec) == ladder
    assert [ladder.index(t) for t in (36, 576)] == [0, 4]


@pytest.mark.parametrize("tokens", [36, 72, 144, 288])
def test_default_levels_equal_avg_pool2d_with_spec_kernels(feats, tokens):
    (h, w), kernel = PAPER[tokens]
    ladder = Ladder.default()
    ours = ladder.pool(feats, ladder.index(tokens))
    ref = as_tokens(F.avg_pool2d(as_map(feats), kernel_size=kernel, stride=kernel))
    assert ours.shape == (3, h * w, 8)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # one token by hand: output (r, c) averages rows kh*r.., cols kw*c.. of the row-major 24x24 map
    kh, kw = kernel
    r, c = h - 1, 1
    window = [feats[:, (kh * r + i) * 24 + kw * c + j] for i in range(kh) for j in range(kw)]
    torch.testing.assert_close(ours[:, r * w + c], torch.stack(window).mean(0))


def test_level_576_is_the_input(feats):
    assert torch.equal(Ladder.default().pool(feats, 4), feats)


def test_default_levels_equal_alternating_1x2_and_2x1_pools(feats):
    ladder = Ladder.default()
    x = as_map(feats)
    for tokens, kernel in [(288, (1, 2)), (144, (2, 1)), (72, (1, 2)), (36, (2, 1))]:
        x = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
        torch.testing.assert_close(ladder.pool(feats, ladder.index(tokens)), as_tokens(x))


def test_pool_all_keeps_leading_dims(feats):
    many = feats.reshape(1, 3, 576, 8).expand(2, 3, 576, 8)
    pooled = Ladder.default().pool_all(many)
    assert [p.shape for p in pooled] == [(2, 3, t, 8) for t in (36, 72, 144, 288, 576)]
    torch.testing.assert_close(pooled[2][1], Ladder.default().pool(feats, 2))


def test_custom_ladder_with_intermediate_levels_uses_adaptive_pooling(feats):
    ladder = Ladder.parse("36,72,144,216,288,432,576")
    assert ladder.tokens == (36, 72, 144, 216, 288, 432, 576)
    assert ladder.levels[ladder.index(432)] == Level(24, 18)
    assert ladder.levels[ladder.index(216)] == Level(18, 12)
    for tokens, (h, w) in [(432, (24, 18)), (216, (18, 12))]:
        lv = ladder.levels[ladder.index(tokens)]
        assert not lv.is_exact(24)
        ref = as_tokens(F.adaptive_avg_pool2d(as_map(feats), (h, w)))
        torch.testing.assert_close(ladder.pool(feats, lv), ref, rtol=0, atol=0)
    # the paper's levels in a custom ladder are still pooled exactly
    torch.testing.assert_close(
        ladder.pool(feats, ladder.index(72)), as_tokens(F.avg_pool2d(as_map(feats), (2, 4), (2, 4)))
    )


def test_explicit_hxw_levels_and_other_grids(feats):
    assert Ladder.parse(["24x18", 216]).levels == (Level(18, 12), Level(24, 18))
    small = Ladder.parse(None, grid=12)  # the paper's ladder scaled to a 12x12 crop
    assert small.tokens == (9, 18, 36, 72, 144)
    assert small.pool(torch.zeros(2, 144, 4), 0).shape == (2, 9, 4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("36,37", "level 37 tokens does not fit a 24x24 grid"),
        ("36,72,36", r"duplicate levels .*\[36\]"),
        ("144,12x12", r"duplicate levels .*\[144\]"),
        ("36,577", "exceeds the 24x24 = 576 tokens"),
        ("36,25x1", "does not fit the 24x24 crop grid"),
        ("36,big", "neither a token count nor 'HxW'"),
        ("36,axb", "not 'HxW' with integer sides"),
        ("0", "positive token count"),
        ("-36", "positive token count"),
        ("", "at least one level"),
    ],
)
def test_bad_ladders_raise_clear_errors(spec, message):
    with pytest.raises(LadderError, match=message):
        Ladder.parse(spec)


def test_unknown_level_and_wrong_token_count_raise(feats):
    ladder = Ladder.default()
    with pytest.raises(LadderError, match="not in the ladder"):
        ladder.index(100)
    with pytest.raises(ValueError, match="expected 576 tokens per crop"):
        ladder.pool(feats[:, :575], 0)
