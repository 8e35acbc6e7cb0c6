"""Visual granularity router: image + instruction -> one logit per granularity level.

SPEC "Visual granularity router", batched. Per sample, with crops ``c = 0..C-1`` (crop 0 is
the base crop) and a ladder of ``N`` levels (ascending; expert ``i`` = level ``i``):

1. Text filter: cosine similarity of every UNPOOLED base-crop token with every instruction
   token embedding, averaged over the visual tokens; the top-k instruction tokens (k = 32,
   the paper's ablation optimum) are kept in SCORE order (best first, as the reference's
   ``torch.sort(..., descending=True)``), zero-padded to k.
2. Per crop the sequence ``[level_0; ...; level_{N-1}; k text tokens]``: 36+72+144+288+576+32
   = 1148 tokens for the paper's ladder. The same k text tokens go with every crop.
3. ``merger``: one ``nn.TransformerEncoderLayer(d, nhead=8, dim_feedforward=d)``, PyTorch
   defaults otherwise (post-norm, ReLU, dropout 0.1). See "Merger axis" below.
4. ``router``: ``Linear(d, d) -> GELU -> Linear(d, N)`` per token -> ``(L, N)``.
5. ``voter``: one learned weight per token position, ``logits_c = sum_t voter[t] * z[t]``.
6. Mean over the REAL crops, then ``LayerNorm(N)``. Inference: argmax.

Batching: crops are padded to the largest crop count (``crop_mask``) and instructions to the
longest instruction (``text_mask``). Padded crops never enter another crop's computation and
are left out of the mean; padded text tokens are never selected. A batched call equals the
one-by-one calls (tested).

Execution (speed only; the computation is the one above, tested equal to the layer-by-layer
form kept in ``bench/router_reference.py``): ``forward = forward_prepared(prepare(...))``.
``prepare`` holds everything without parameters — pooling every REAL crop to every level, the
text filter, assembling the sequences — so the trainer's data thread runs it ahead of the step.
``forward_prepared`` runs samples of equal crop count as dense ``(G, c, L, d)`` blocks (no
padded crops, no masks, no ``(B*L, C, d)`` transposes), attends across the c <= 5 crops with c
elementwise products instead of ``B*L*heads`` tiny matrix products, folds the voter in before
the MLP's last Linear, and on CPU draws dropout masks from numpy's PCG64 (``dropout``: same law,
~14x cheaper than torch's serial generator). Demo shapes: 15% -> ~40% of the machine's matmul
peak per step (``bench/bench_step.py``).

Merger axis (``RouterConfig.merger_attends``). The reference
(``llava/model/multimodal_router/builder.py`` of DeepLearnXMU/AVG-LLaVA) builds the layer with
PyTorch's default ``batch_first=False`` and calls it on ``(n_crops, 1148, d)``, so its
attention runs ACROSS THE CROPS at each token position (with one crop it is a per-token
map). SPEC fixes the layer as "PyTorch defaults otherwise" and was read off that code, so
``"crops"`` is the DEFAULT: it reproduces the reference computation exactly and is what the
published weights were trained with. The paper's prose suggests attention over the token
sequence ("cross-modal fusion"); ``"tokens"`` runs the layer over each crop's 1148-token
sequence instead, as an option. The parameters are identical either way, so both modes load
the same weights.

Zero-padded text slots are NOT masked inside the merger: the reference zero-pads without a
mask, and the voter has a weight for each slot. Both choices depend only on the sample
itself, so batching does not change them.

Published weights (AVG-LLaVA checkpoints, prefix ``model.router.``) -> this module:

    model.router.merger.self_attn.in_proj_weight  -> merger.self_attn.in_proj_weight  (3d, d)
    model.router.merger.self_attn.in_proj_bias    -> merger.self_attn.in_proj_bias    (3d,)
    model.router.merger.self_attn.out_proj.{weight,bias} -> merger.self_attn.out_proj.*
    model.router.merger.linear1.{weight,bias}     -> merger.linear1.*   (d, d), (d,)
    model.router.merger.linear2.{weight,bias}     -> merger.linear2.*   (d, d), (d,)
    model.router.merger.norm1.{weight,bias}       -> merger.norm1.*
    model.router.merger.norm2.{weight,bias}       -> merger.norm2.*
    model.router.router.0.{weight,bias}           -> router.0.*   Linear(d, d)
    model.router.router.2.{weight,bias}           -> router.2.*   Linear(d, N)
    model.router.voter                            -> voter        (1148, 1)
    model.router.norm.{weight,bias}               -> norm.*       LayerNorm(N)

i.e. strip the prefix; the reference's ``text_filter`` has no parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rglf.model.scaler import Ladder, LadderError

MERGER_AXES = ("tokens", "crops")
VOTER_INITS = ("normal", "mean", "balanced")
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
AVG_LLAVA_KEY_PREFIX = "model.router."


@dataclass
class RouterConfig:
    """Hyperparameters of ``GranularityRouter``; saved beside its weights as JSON."""

    hidden_size: int
    """d: width of the projected visual features and of the LLM's input embeddings."""
    ladder: str = "6x6,12x6,12x12,24x12,24x24"
    """Levels (a ``model.scaler.Ladder`` spec), ascending; router expert i = level i.
    Default: the paper's 36,72,144,288,576. Stored in canonical 'HxW' form."""
    grid: int = 24
    """Crop grid side: a crop has grid*grid unpooled tokens (24: CLIP-L/336, patch 14)."""
    top_k: int = 32
    """Instruction tokens kept by the text filter (k = 32: the paper's best setting)."""
    nhead: int = 8
    """Attention heads of the merger (8 in the reference)."""
    dropout: float = 0.1
    """Merger dropout (PyTorch's default 0.1, kept by the reference)."""
    use_text: bool = True
    """False: the paper's image-only ablation; no instruction tokens, the sequence is the
    levels only (sum of level tokens positions, 1116 for the default ladder)."""
    merger_attends: str = "crops"
    """'crops' (default): attention across crops at each position, the reference code's
    batch_first=False call (PyTorch defaults, SPEC); reproduces the published router's outputs.
    'tokens': attention over each crop's token sequence (the paper's prose). See the module docstring."""
    voter_init: str = "normal"
    """'normal': voter ~ N(0, 1) as in the reference; 'mean': every position 1/L (an
    unweighted mean of the token votes); 'balanced': the image and the instruction each start
    with half of the vote (the image half split equally between the levels, each share spread
    over that level's tokens; image-only: each level 1/N). LayerNorm(N) makes the output
    scale-free either way. Only the initial values differ: the parameter is the same."""

    def __post_init__(self) -> None:
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if self.nhead <= 0 or self.hidden_size % self.nhead:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by nhead {self.nhead}")
        if self.grid <= 0:
            raise ValueError(f"grid must be positive, got {self.grid}")
        if self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k} (use use_text=False for no text)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.merger_attends not in MERGER_AXES:
            raise ValueError(f"merger_attends must be one of {MERGER_AXES}, got {self.merger_attends!r}")
        if self.voter_init not in VOTER_INITS:
            raise ValueError(f"voter_init must be one of {VOTER_INITS}, got {self.voter_init!r}")
        try:
            ladder = Ladder.parse(self.ladder, self.grid)
        except LadderError as err:
            raise ValueError(f"invalid ladder {self.ladder!r} for grid {self.grid}: {err}") from err
        if len(ladder) < 2:
            # LayerNorm over a single logit is identically zero: nothing to route.
            raise ValueError(f"the router needs at least 2 levels, got ladder {ladder.spec!r}")
        self.ladder = ladder.spec

    @classmethod
    def for_avg_llava(cls, hidden_size: int = 4096) -> RouterConfig:
        """The published AVG-LLaVA router (Vicuna-7B: d = 4096), reference merger axis."""
        return cls(hidden_size=hidden_size, merger_attends="crops")

    @property
    def n_levels(self) -> int:
        return len(Ladder.parse(self.ladder, self.grid))

    @property
    def seq_len(self) -> int:
        """Tokens per crop sequence = voter length: 1148 default, 1116 image-only."""
        level_tokens = sum(Ladder.parse(self.ladder, self.grid).tokens)
        return level_tokens + (self.top_k if self.use_text else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class RouterInputs:
    """``GranularityRouter.prepare``'s output: the no-grad half of the forward pass, for ``forward_prepared``."""

    seqs: tuple[torch.Tensor, ...]  # per crop count c (ascending): (g, c, L, d) sequences
    # [level_0 .. level_{N-1} pooled tokens; k selected instruction tokens] of the g samples with c crops
    crop_counts: tuple[int, ...]  # (B,) crops per sample, ascending (samples sorted by it)
    perm: torch.Tensor  # (B,) sorted position -> position in the caller's batch

    def to(self, device: torch.device | str) -> RouterInputs:
        return RouterInputs(tuple(s.to(device) for s in self.seqs), self.crop_counts, self.perm.to(device))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` (keep with probability 1-p, scale kept values by 1/(1-p)), with fast CPU masks.

    On CPU, torch draws every Bernoulli from its serial mt19937 generator (~14 ns per element: a
    dropout over the merger's activations cost ~30x a multiply over them, a quarter of a router
    step). Here the masks come from numpy's PCG64 as raw 32-bit words compared with
    ``round(p * 2^32)`` (drop probability exact to 1e-10; ~1 ns per element), seeded by one draw
    from torch's generator, so ``torch.manual_seed`` still makes a run reproducible. The law of
    the mask is dropout's; the stream differs from ``F.dropout``'s. Elsewhere (CUDA): ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    n = x.numel()
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 1) // 2)
    keep = words.view(np.uint32)[:n] >= np.uint32(round(p * 2**32))
    mask = torch.from_numpy(keep).view(x.shape).to(x.dtype) * (1.0 / (1.0 - p))
    return x * mask


def _runs(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """(value, length) of the runs of equal values: ``(1, 1, 2, 2, 2)`` -> ``[(1, 2), (2, 3)]``."""
    out: list[tuple[int, int]] = []
    for c in counts:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def balanced_voter(level_tokens: tuple[int, ...] | list[int], top_k: int) -> torch.Tensor:
    """Voter values ``(L, 1)`` giving the image and the instruction half of the vote each.

    Level ``i``'s ``level_tokens[i]`` positions share ``1 / (2N)`` (``1 / N`` without text,
    ``top_k = 0``); the ``top_k`` text slots share ``1/2``. Sums to 1, like 'mean'.
    """
    n = len(level_tokens)
    image_share = 0.5 if top_k else 1.0
    parts = [torch.full((t,), image_share / (n * t)) for t in level_tokens]
    if top_k:
        parts.append(torch.full((top_k,), 0.5 / top_k))
    return torch.cat(parts)[:, None]


class GranularityRouter(nn.Module):
    """SPEC's router, batched. Module names match the published weights (see module docstring)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.ladder = Ladder.parse(config.ladder, config.grid)
        d, n = config.hidden_size, len(self.ladder)
        self.seq_len = config.seq_len
        # batch_first=True for the (sequences, length, d) layout used in forward; the reference's
        # batch_first=False is reproduced by choosing the axis (merger_attends), not the flag.
        self.merger = nn.TransformerEncoderLayer(
            d_model=d, nhead=config.nhead, dim_feedforward=d, dropout=config.dropout, batch_first=True
        )
        self.router = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, n))
        self.voter = nn.Parameter(torch.empty(self.seq_len, 1))  # (L, 1), the published shape
        self.norm = nn.LayerNorm(n)
        self.register_buffer(
            "level_tokens", torch.tensor(self.ladder.tokens, dtype=torch.long), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference: kaiming_normal_ on both MLP weights (biases keep nn.Linear's init).
        nn.init.kaiming_normal_(self.router[0].weight)
        nn.init.kaiming_normal_(self.router[2].weight)
        if self.config.voter_init == "normal":
            nn.init.normal_(self.voter)  # the reference's init
        elif self.config.voter_init == "mean":
            nn.init.constant_(self.voter, 1.0 / self.seq_len)
        else:
            with torch.no_grad():
                self.voter.copy_(balanced_voter(self.ladder.tokens, self.config.top_k if self.config.use_text else 0))

    # -- step 1 ---------------------------------------------------------------------------
    def select_text(
        self, base_crop: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k instruction tokens by mean cosine similarity to the unpooled base crop.

        ``base_crop (B, grid*grid, d)``, ``text_embeds (B, T, d)``, ``text_mask (B, T)`` bool.
        Returns ``(selected (B, k, d), index (B, k))``: best first; slots beyond the number of
        real tokens are zero vectors with index -1. Ties keep the earlier token (stable sort).
        """
        k = self.config.top_k
        bsz, n_text, d = text_embeds.shape
        # Padding -> zero vectors, so unfilled slots below come out zero (SPEC: zero-padded to k)
        # and garbage (even NaN) in padded positions never reaches the scores or the output.
        text = text_embeds.masked_fill(~text_mask[..., None], 0.0)
        # mean_i cos(v_i, t) = (mean_i v_i/|v_i|) . t/|t|: one matmul instead of (B, 576, T) cosines.
        visual_dir = F.normalize(base_crop, dim=-1, eps=1e-8).mean(dim=1)  # (B, d)
        text_dir = F.normalize(text, dim=-1, eps=1e-8)  # (B, T, d)
        score = torch.einsum("btd,bd->bt", text_dir, visual_dir)  # (B, T)
        score = score.masked_fill(~text_mask, float("-inf"))
        valid = text_mask
        if n_text < k:  # fewer candidates than slots: pad with never-selected empties
            pad = k - n_text
            score = F.pad(score, (0, pad), value=float("-inf"))  # (B, k)
            text = F.pad(text, (0, 0, 0, pad))  # (B, k, d)
            valid = F.pad(valid, (0, pad), value=False)  # (B, k)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        keep = valid.gather(1, order)  # (B, k)
        selected = text.gather(1, order[..., None].expand(bsz, k, d))  # (B, k, d), empties are zero
        index = order.masked_fill(~keep, -1)
        return selected, index

    # -- steps 1-2 without gradients: what the data loader can do ahead of the step -------------
    def prepare(
        self,
        crop_features: torch.Tensor,
        crop_mask: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> RouterInputs:
        """The parameter-free half of ``forward``: pool every REAL crop to every level and run the text
        filter. Same arguments as ``forward``; the result feeds ``forward_prepared``.

        Nothing here is trained (the inputs are frozen features, pooling and the cosine top-k have
        no parameters), so the trainer's data thread runs it ahead of the step, under no_grad.
        Samples are reordered by crop count (stable), so the merger sees dense groups of equal
        crop count with no padding; ``forward_prepared`` restores the input order.
        """
        cfg = self.config
        crop_features, crop_mask, text_embeds, text_mask = self._check_inputs(
            crop_features, crop_mask, text_embeds, text_mask
        )
        counts = crop_mask.sum(dim=1)  # (B,)
        perm = torch.sort(counts, stable=True).indices  # sorted position -> input sample
        crop_counts = tuple(counts[perm].tolist())
        # Real crops only, sample-major in sorted order: padded crops (even NaN garbage) never enter.
        real = crop_features[perm][crop_mask[perm]]  # (R, grid^2, d)
        levels = torch.cat(self.ladder.pool_all(real), dim=1)  # (R, sum of level tokens, d)
        text = None
        if cfg.use_text:
            text, _ = self.select_text(crop_features[perm, 0], text_embeds[perm], text_mask[perm])  # (B, k, d)
        seqs, row, start = [], 0, 0
        for c, g in _runs(crop_counts):  # g samples with c crops each: one dense (g, c, L, d) block
            parts = [levels[row : row + g * c].view(g, c, levels.shape[1], levels.shape[2])]
            if text is not None:  # the same k instruction tokens after every crop's levels
                parts.append(text[start : start + g, None].expand(g, c, *text.shape[1:]))
            seqs.append(torch.cat(parts, dim=2))
            row, start = row + g * c, start + g
        return RouterInputs(seqs=tuple(seqs), crop_counts=crop_counts, perm=perm)

    # -- steps 2-6 ------------------------------------------------------------------------
    def forward(
        self,
        crop_features: torch.Tensor,
        crop_mask: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Router logits ``(B, N)`` (after LayerNorm), level order = the ladder's.

        ``crop_features (B, C, grid*grid, d)``: unpooled projected features, crop 0 = base crop;
        ``crop_mask (B, C)`` bool, True = real crop; ``text_embeds (B, T, d)``: instruction token
        embeddings (input embedding table), ``text_mask (B, T)`` bool (None: all real). T may
        be 0. Ignored when ``use_text=False``. = ``forward_prepared(prepare(...))``.
        """
        return self.forward_prepared(self.prepare(crop_features, crop_mask, text_embeds, text_mask))

    def forward_prepared(self, inputs: RouterInputs) -> torch.Tensor:
        """Steps 2-6 on ``prepare``'s output: logits ``(B, N)`` in the original sample order.

        Samples with the same crop count run as one dense block ``(G, c, L, d)``: no padded crops,
        so no masks, and the 'crops' axis attends across dim 1 directly (no transposes to
        ``(G*L, c, d)``). The voter is applied before the MLP's last Linear:
        ``sum_t w_t (W z_t + b) = W (sum_t w_t z_t) + b sum_t w_t`` (exact algebra; the ``(L, N)``
        token logits are never formed). Equal to the layer-by-layer computation within float
        tolerance (tested against it).
        """
        cfg = self.config
        voter = self.voter[:, 0]  # (L,)
        first, last = self.router[0], self.router[2]
        out = []
        for seq in inputs.seqs:  # (g, c, L, d): the samples with c crops
            seq = seq.to(voter.dtype)
            if seq.shape[2] != self.seq_len:
                raise RuntimeError(f"router sequence has {seq.shape[2]} tokens, voter expects {self.seq_len}")
            if cfg.merger_attends == "tokens":
                hidden = self.merger(seq.flatten(0, 1)).view(seq.shape)  # each crop's sequence on its own
            else:
                hidden = self._merge_across_crops(seq)
            z = self.router[1](first(hidden))  # (g, c, L, d)
            voted = torch.einsum("gcld,l->gcd", z, voter)  # (g, c, d)
            crop_logits = F.linear(voted, last.weight) + voter.sum() * last.bias  # (g, c, N)
            out.append(crop_logits.mean(dim=1))  # (g, N): mean over the sample's crops
        logits = torch.cat(out)  # (B, N) in sorted order
        inverse = torch.empty_like(inputs.perm)
        inverse[inputs.perm] = torch.arange(len(inputs.perm), device=inputs.perm.device)
        return self.norm(logits[inverse])

    def _merge_across_crops(self, x: torch.Tensor) -> torch.Tensor:
        """``self.merger`` (post-norm ``TransformerEncoderLayer``, ReLU) on ``x (G, c, L, d)`` with the
        attention across dim 1 (the sample's crops) at every position: the reference's
        ``batch_first=False`` call on ``(c, L, d)``. Same parameters, dropouts and order of operations
        as ``nn.TransformerEncoderLayer.forward``; only the memory layout differs."""
        layer, train = self.merger, self.training
        x = layer.norm1(x + dropout(self._attend_across_crops(x), layer.dropout1.p, train))
        ff = layer.linear2(dropout(layer.activation(layer.linear1(x)), layer.dropout.p, train))
        return layer.norm2(x + dropout(ff, layer.dropout2.p, train))

    def _attend_across_crops(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention across dim 1 of ``x (G, c, L, d)`` (c = 1..5 crops): per head,
        ``softmax_j(q_i . k_j / sqrt(d_h))`` with c keys, then dropout on the weights and ``sum_j p_ij v_j``.
        c is tiny, so the c x c scores are c elementwise products over (G, c, L, d) rather than
        G * L * heads matrix products of size c x d_h."""
        attn = self.merger.self_attn
        g, c, length, d = x.shape
        h = attn.num_heads
        hd = d // h
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (G, c, L, d) each
        q = (q * hd**-0.5).unflatten(-1, (h, hd))  # (G, c, L, h, hd)
        ks = k.unflatten(-1, (h, hd)).unbind(1)  # c x (G, L, h, hd)
        vs = v.unflatten(-1, (h, hd)).unbind(1)
        scores = torch.stack([(q * kj[:, None]).sum(-1) for kj in ks], dim=-1)  # (G, c, L, h, c)
        p = dropout(scores.softmax(dim=-1), attn.dropout, self.training)
        pj = p.unbind(-1)
        out = pj[0][..., None] * vs[0][:, None]
        for j in range(1, c):
            out = out + pj[j][..., None] * vs[j][:, None]  # (G, c, L, h, hd)
        return attn.out_proj(out.flatten(-2))

    @torch.no_grad()
    def predict(
        self,
        crop_features: torch.Tensor,
        crop_mask: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Chosen level index ``(B,)`` (argmax, SPEC step 7); see ``tokens_for`` for token counts."""
        return self(crop_features, crop_mask, text_embeds, text_mask).argmax(dim=-1)

    def tokens_for(self, level_index: torch.Tensor) -> torch.Tensor:
        """Level indices -> tokens per crop of those levels (e.g. 0 -> 36 for the default ladder)."""
        return self.level_tokens.to(level_index.device)[level_index]

    def _check_inputs(
        self,
        crop_features: torch.Tensor,
        crop_mask: torch.Tensor,
        text_embeds: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        cfg = self.config
        g, d = cfg.grid, cfg.hidden_size
        if crop_features.dim() != 4:
            raise ValueError(
                f"crop_features must be (B, crops, {g * g}, {d}), got shape {tuple(crop_features.shape)}"
            )
        bsz, n_crops, n_tok, feat_d = crop_features.shape
        if n_tok != g * g:
            raise ValueError(
                f"crop_features has {n_tok} tokens per crop, the router's grid is {g}x{g} = {g * g} "
                f"(shape {tuple(crop_features.shape)})"
            )
        if feat_d != d:
            raise ValueError(f"crop_features width {feat_d} != router hidden_size {d}")
        if crop_mask.shape != (bsz, n_crops) or crop_mask.dtype != torch.bool:
            raise ValueError(
                f"crop_mask must be bool of shape {(bsz, n_crops)}, got {crop_mask.dtype} {tuple(crop_mask.shape)}"
            )
        if n_crops == 0 or not bool(crop_mask[:, 0].all()):
            raise ValueError(
                "crop 0 is the base crop and must be real (crop_mask[:, 0] all True) in every sample"
            )
        crop_features = crop_features.to(self.voter.dtype)
        if not cfg.use_text:
            return crop_features, crop_mask, None, None
        if text_embeds is None:
            raise ValueError(
                "this router uses instruction tokens (use_text=True): pass text_embeds (B, T, d); "
                "T may be 0 for an empty instruction"
            )
        if text_embeds.dim() != 3 or text_embeds.shape[0] != bsz or text_embeds.shape[2] != d:
            raise ValueError(f"text_embeds must be ({bsz}, T, {d}), got {tuple(text_embeds.shape)}")
        if text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
        if text_mask.shape != text_embeds.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be bool of shape {tuple(text_embeds.shape[:2])}, "
                f"got {text_mask.dtype} {tuple(text_mask.shape)}"
            )
        return crop_features, crop_mask, text_embeds.to(self.voter.dtype), text_mask


# -- checkpoints ------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_router(directory: str | os.PathLike[str], router: GranularityRouter) -> Path:
    """Write ``router.safetensors`` then ``router_config.json`` (the config last, so its presence
    means the weights are complete). Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(router.config.to_dict(), indent=2, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    _atomic_write(out / ROUTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"config": config_json}))

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(config_json + "\n")

    _atomic_write(out / ROUTER_CONFIG, write_config)
    return out


def load_router(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> GranularityRouter:
    """Load a router saved by ``save_router``; returned in eval mode."""
    src = Path(directory)
    config_path, weights_path = src / ROUTER_CONFIG, src / ROUTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a router checkpoint directory")
    config = RouterConfig.from_dict(json.loads(config_path.read_text()))
    router = GranularityRouter(config)
    router.load_state_dict(load_file(weights_path, device=str(device)), strict=True)
    return router.to(device).eval()


# -- published AVG-LLaVA weights ---------------------------------------------------------------

_PUBLISHED_NAMES = (
    "merger.self_attn.in_proj_weight",
    "merger.self_attn.in_proj_bias",
    "merger.self_attn.out_proj.weight",
    "merger.self_attn.out_proj.bias",
    "merger.linear1.weight",
    "merger.linear1.bias",
    "merger.linear2.weight",
    "merger.linear2.bias",
    "merger.norm1.weight",
    "merger.norm1.bias",
    "merger.norm2.weight",
    "merger.norm2.bias",
    "router.0.weight",
    "router.0.bias",
    "router.2.weight",
    "router.2.bias",
    "voter",
    "norm.weight",
    "norm.bias",
)
# Published name (after the prefix) -> this module's name. The identity today; kept as a table
# so a renamed module shows up here, not as a silent load failure.
AVG_LLAVA_KEY_MAP: dict[str, str] = {name: name for name in _PUBLISHED_NAMES}


def convert_avg_llava_router_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published AVG-LLaVA router weights -> ``GranularityRouter`` state dict.

    Takes every key under ``model.router.`` (other keys, e.g. the LLM's, are ignored, so a
    whole checkpoint shard can be passed) and renames it by ``AVG_LLAVA_KEY_MAP``. Raises
    ``KeyError`` listing missing and unexpected router keys. Load the result with a config
    whose ``seq_len`` matches ``voter`` (1148 for the paper), e.g. ``RouterConfig.for_avg_llava``.
    """
    router_keys = {
        k[len(AVG_LLAVA_KEY_PREFIX) :]: k for k in state_dict if k.startswith(AVG_LLAVA_KEY_PREFIX)
    }
    if not router_keys:
        raise KeyError(
            f"no keys start with {AVG_LLAVA_KEY_PREFIX!r}: not an AVG-LLaVA checkpoint with a router "
            f"(first keys: {sorted(state_dict)[:5]})"
        )
    missing = sorted(name for name in AVG_LLAVA_KEY_MAP if name not in router_keys)
    unexpected = sorted(router_keys[name] for name in router_keys if name not in AVG_LLAVA_KEY_MAP)
    if missing or unexpected:
        raise KeyError(
            "AVG-LLaVA router weights do not match the key map: "
            f"missing {[AVG_LLAVA_KEY_PREFIX + m for m in missing]}, unexpected {unexpected}"
        )
    return {AVG_LLAVA_KEY_MAP[name]: state_dict[full] for name, full in router_keys.items()}
