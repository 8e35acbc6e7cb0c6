"""The router's forward pass as it was before the speed work (commit b8b5b56), layer by layer.

``GranularityRouter.forward`` now runs as ``prepare`` (pooling, text filter; no gradients) +
``forward_prepared`` (dense per-crop-count blocks, attention across crops without transposes,
the voter folded before the last Linear). This module keeps the previous, straightforward
computation on the SAME module and parameters, as the oracle for the equality tests
(``tests/test_router.py``) and the "before" side of ``bench/bench_step.py``: padded crops,
``nn.TransformerEncoderLayer`` called on ``(B*L, C, d)`` with a key-padding mask, ``(R, L, N)``
token logits, then the voter.
"""

from __future__ import annotations

import torch

from rglf.model.router import GranularityRouter


def reference_forward(
    router: GranularityRouter,
    crop_features: torch.Tensor,
    crop_mask: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Router logits ``(B, N)``: ``GranularityRouter.forward``'s contract, the pre-optimisation code."""
    cfg = router.config
    crop_features, crop_mask, text_embeds, text_mask = router._check_inputs(
        crop_features, crop_mask, text_embeds, text_mask
    )
    bsz, n_crops, _, d = crop_features.shape
    seq_len = router.seq_len
    feats = crop_features.masked_fill(~crop_mask[:, :, None, None], 0.0)
    pieces = router.ladder.pool_all(feats)  # [(B, C, tokens_i, d)], ascending
    if cfg.use_text:
        text, _ = router.select_text(feats[:, 0], text_embeds, text_mask)  # (B, k, d)
        pieces.append(text[:, None].expand(bsz, n_crops, cfg.top_k, d))
    seq = torch.cat(pieces, dim=2)  # (B, C, L, d)
    if cfg.merger_attends == "tokens":
        hidden = router.merger(seq[crop_mask])  # (R, L, d)
    else:
        x = seq.transpose(1, 2).reshape(bsz * seq_len, n_crops, d)  # (B*L, C, d)
        pad = (~crop_mask)[:, None, :].expand(bsz, seq_len, n_crops).reshape(bsz * seq_len, n_crops)
        x = router.merger(x, src_key_padding_mask=pad)  # (B*L, C, d)
        hidden = x.reshape(bsz, seq_len, n_crops, d).transpose(1, 2)[crop_mask]  # (R, L, d)
    token_logits = router.router(hidden)  # (R, L, N)
    crop_logits = torch.einsum("rln,l->rn", token_logits, router.voter[:, 0])  # (R, N)
    sample_of_crop = crop_mask.nonzero()[:, 0]
    summed = crop_logits.new_zeros(bsz, crop_logits.shape[1]).index_add(0, sample_of_crop, crop_logits)
    mean = summed / crop_mask.sum(dim=1, keepdim=True).to(summed.dtype)
    return router.norm(mean)
