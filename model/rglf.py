"""RGLF losses: rank the granularity levels by the frozen LMM's own feedback (SPEC "RGLF losses").

Per sample, the levels are ordered best first by the ranking SQL (ARCHITECTURE.md "Ranking
semantics": ``nll_mean`` ascending, levels within a tolerance of the best tie and the one with
fewer tokens wins). With ``s = log_softmax(router_logits)`` reordered into that order and
``nll_(i)`` the feedback in that order:

- cross-entropy on the raw logits, target = the best level ``order[:, 0]``;
- adaptive ranking loss, for every gap ``j = 1..N-1`` and position ``i < N - j``::

      L_rank += mean_{b, i} max(0, s_(i+j) - s_(i) + m * j * (nll_(i+j) - nll_(i)))

  i.e. a better level must out-score a worse one by a margin that grows with the gap in
  ranks and in NLL (the reference's ``adaptive_rank_loss``);
- ``L = w_rank * L_rank + w_ce * L_ce``; published: m = 1, w_rank = 1, w_ce = 0.1.

Margins are clamped at 0. In the reference the order is a plain NLL sort, so every margin is
>= 0 already; with tolerance ties the SQL order can put a slightly WORSE NLL first (the cheaper
level), which would make the margin negative and let the router rank the pair either way at
no cost. Clamping keeps the pair ordered as the tie rule says, with margin 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RGLF_LOSSES = ("rank+ce", "rank", "ce")


def rglf_loss(
    logits: torch.Tensor,
    nll: torch.Tensor,
    order: torch.Tensor,
    *,
    margin_scale: float = 1.0,
    w_rank: float = 1.0,
    w_ce: float = 0.1,
    loss: str = "rank+ce",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RGLF loss for a batch.

    ``logits (B, N)``: router logits, ladder order. ``nll (B, N)``: ``nll_mean`` of each level,
    ladder order. ``order (B, N)`` long: level indices best first (a permutation per row).
    ``loss``: ``"rank+ce"`` (the paper), ``"rank"`` or ``"ce"`` (its ablations: the other term is
    left out; the kept term keeps its weight). Returns ``(total, {"rank": L_rank, "ce": L_ce})``; the parts are
    detached, for logging, and always both computed.
    """
    if loss not in RGLF_LOSSES:
        raise ValueError(f"loss must be one of {RGLF_LOSSES}, got {loss!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, N), got shape {tuple(logits.shape)}")
    bsz, n_levels = logits.shape
    if n_levels < 2:
        raise ValueError(f"ranking needs at least 2 levels, got N = {n_levels}")
    if nll.shape != logits.shape or order.shape != logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, nll {tuple(nll.shape)} and order {tuple(order.shape)} must match"
        )
    if order.dtype != torch.long:
        raise ValueError(f"order must be int64 level indices, got {order.dtype}")
    expected = torch.arange(n_levels, device=order.device).expand(bsz, n_levels)
    if not torch.equal(order.sort(dim=1).values, expected):
        raise ValueError("every row of order must be a permutation of 0..N-1 (level indices, best first)")
    if not bool(torch.isfinite(nll).all()):
        raise ValueError("nll has non-finite values; drop or fix those samples before training")

    # log_softmax commutes with the permutation: reorder after normalising over all levels.
    s = F.log_softmax(logits, dim=-1).gather(1, order)  # (B, N), best first
    nll_sorted = nll.detach().to(s.dtype).gather(1, order)  # (B, N), best first
    ce = F.cross_entropy(logits, order[:, 0])

    rank = s.new_zeros(())
    for gap in range(1, n_levels):
        pos, neg = s[:, :-gap], s[:, gap:]  # (B, N - gap): level i vs level i + gap
        margin = (margin_scale * gap * (nll_sorted[:, gap:] - nll_sorted[:, :-gap])).clamp_min(0.0)
        rank = rank + F.relu(neg - pos + margin).mean()  # mean over batch and i

    total = s.new_zeros(())
    if loss in ("rank+ce", "rank"):
        total = total + w_rank * rank
    if loss in ("rank+ce", "ce"):
        total = total + w_ce * ce
    return total, {"rank": rank.detach(), "ce": ce.detach()}
