"""RGLF losses against an independent loop implementation and hand-checked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rglf.model.rglf import rglf_loss


def reference_rglf(
    logits: list[list[float]],
    nll: list[list[float]],
    order: list[list[int]],
    m: float = 1.0,
    w_rank: float = 1.0,
    w_ce: float = 0.1,
    loss: str = "rank+ce",
) -> tuple[float, float, float]:
    """Plain-python RGLF, written from SPEC: returns (total, rank, ce)."""
    n_samples, n_levels = len(logits), len(logits[0])
    ce = 0.0
    s_sorted, nll_sorted = [], []
    for b in range(n_samples):
        log_z = math.log(sum(math.exp(x) for x in logits[b]))
        log_p = [x - log_z for x in logits[b]]
        ce += -log_p[order[b][0]] / n_samples
        s_sorted.append([log_p[level] for level in order[b]])
        nll_sorted.append([nll[b][level] for level in order[b]])
    rank = 0.0
    for j in range(1, n_levels):
        terms = []
        for b in range(n_samples):
            for i in range(n_levels - j):
                margin = max(0.0, m * j * (nll_sorted[b][i + j] - nll_sorted[b][i]))
                terms.append(max(0.0, s_sorted[b][i + j] - s_sorted[b][i] + margin))
        rank += sum(terms) / len(terms)
    total = (w_rank * rank if "rank" in loss else 0.0) + (w_ce * ce if "ce" in loss else 0.0)
    return total, rank, ce


def run(logits, nll, order, **kw):
    total, parts = rglf_loss(
        torch.tensor(logits, dtype=torch.float64),
        torch.tensor(nll, dtype=torch.float64),
        torch.tensor(order, dtype=torch.long),
        **kw,
    )
    return total.item(), parts["rank"].item(), parts["ce"].item()


def test_n2_hand_checked():
    # s = [log .5, log .5]; margin = 1 * 1 * (1.5 - 1.0) = 0.5; rank = 0.5; ce = log 2.
    total, rank, ce = run([[0.0, 0.0]], [[1.0, 1.5]], [[0, 1]])
    assert rank == pytest.approx(0.5)
    assert ce == pytest.approx(math.log(2))
    assert total == pytest.approx(0.5 + 0.1 * math.log(2))


def test_n3_hand_checked_and_order_is_applied():
    # Uniform logits: every s equal, so each hinge equals its margin.
    # j=1 margins 0.3, 0.5 -> mean 0.4; j=2 margin 2 * 0.8 = 1.6; rank = 2.0; ce = log 3.
    total, rank, ce = run([[0.0, 0.0, 0.0]], [[0.2, 0.5, 1.0]], [[0, 1, 2]])
    assert rank == pytest.approx(2.0)
    assert total == pytest.approx(2.0 + 0.1 * math.log(3))
    # Same feedback stored in another ladder order: the loss follows `order`, not positions.
    total_perm, rank_perm, _ = run([[0.0, 0.0, 0.0]], [[1.0, 0.2, 0.5]], [[1, 2, 0]])
    assert rank_perm == pytest.approx(2.0)
    assert total_perm == pytest.approx(total)


def test_router_agreeing_with_ranking_beats_disagreeing():
    nll, order = [[0.1, 0.9]], [[0, 1]]
    good, _, _ = run([[3.0, -3.0]], nll, order)
    bad, _, _ = run([[-3.0, 3.0]], nll, order)
    assert good < bad
    # With a large enough gap the hinge is inactive: only CE remains.
    _, rank, _ = run([[10.0, -10.0]], nll, order)
    assert rank == 0.0


def test_tolerance_tie_margin_is_clamped_at_zero():
    # Tie rule put the cheaper level first although its NLL is 0.01 higher: margin -0.01 -> 0.
    logits, nll, order = [[0.0, 1.0]], [[0.51, 0.50]], [[0, 1]]
    s0, s1 = -math.log(1 + math.e), 1 - math.log(1 + math.e)
    _, rank, ce = run(logits, nll, order)
    assert rank == pytest.approx(s1 - s0)  # = 1.0, not 0.99 (unclamped)
    assert ce == pytest.approx(-s0)
    # Exact tie, router indifferent: no ranking loss.
    _, rank_tie, _ = run([[0.0, 0.0]], [[0.5, 0.5]], [[0, 1]])
    assert rank_tie == 0.0


@pytest.mark.parametrize("mode", ["rank+ce", "rank", "ce"])
def test_matches_loop_reference_random(mode):
    gen = torch.Generator().manual_seed(0)
    bsz, n_levels = 6, 5
    logits = torch.randn(bsz, n_levels, generator=gen, dtype=torch.float64) * 2
    nll = torch.rand(bsz, n_levels, generator=gen, dtype=torch.float64) * 3
    nll[0] = 0.0  # all-tied sample
    nll[1, 2] = nll[1, 3]  # an exact tie inside a sample
    order = nll.argsort(dim=1, stable=True)
    order[2] = order[2, [1, 0, 2, 3, 4]]  # a tolerance tie: a worse level ranked first
    kw = {"margin_scale": 0.7, "w_rank": 1.3, "w_ce": 0.25, "loss": mode}
    got = run(logits.tolist(), nll.tolist(), order.tolist(), **kw)
    want = reference_rglf(
        logits.tolist(), nll.tolist(), order.tolist(), m=0.7, w_rank=1.3, w_ce=0.25, loss=mode
    )
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_modes_select_terms_and_gradients_flow():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=gen)
    nll = torch.rand(4, 5, generator=gen)
    order = nll.argsort(dim=1)
    grads = {}
    for mode in ("rank+ce", "rank", "ce"):
        x = logits.clone().requires_grad_(True)
        total, parts = rglf_loss(x, nll, order, loss=mode)
        total.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        grads[mode] = x.grad
        assert not parts["rank"].requires_grad and not parts["ce"].requires_grad
    torch.testing.assert_close(grads["rank+ce"], grads["rank"] + grads["ce"])
    total_ce, parts = rglf_loss(logits, nll, order, loss="ce", w_ce=0.1)
    assert total_ce.item() == pytest.approx(0.1 * parts["ce"].item())


def test_bad_inputs_fail_loudly():
    logits, nll = torch.zeros(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="permutation"):
        rglf_loss(logits, nll, torch.tensor([[0, 0, 1], [0, 1, 2]]))
    with pytest.raises(ValueError, match="loss must be"):
        rglf_loss(logits, nll, torch.tensor([[0, 1, 2]] * 2), loss="ranking")
    with pytest.raises(ValueError, match="non-finite"):
        rglf_loss(logits, torch.tensor([[0.1, float("nan"), 0.2]] * 2), torch.tensor([[0, 1, 2]] * 2))
    with pytest.raises(ValueError, match="must match"):
        rglf_loss(logits, nll[:, :2], torch.tensor([[0, 1, 2]] * 2))
