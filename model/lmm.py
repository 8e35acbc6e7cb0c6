"""The frozen Stage-1 LMM: encode crops once, pack every granularity, score answers.

Wraps transformers' ``LlavaNextForConditionalGeneration`` (anyres, ``spatial_unpad``) and
``LlavaForConditionalGeneration`` (one crop) loaded from a local HF-format folder.

Per image (SPEC, "LLaVA-NeXT packing with pooled grids"):
1. ``encode``: the vision tower and projector run ONCE over all crops -> the selected layer's
   features ``(n_crops, grid*grid, d_vision)`` and the projected ``(n_crops, grid*grid, d)``.
2. every level of the ladder is pooled from that one encoding (``model.scaler``), then
3. ``pack_level``: the base crop's pooled tokens first, flat; the high-res crops laid out as
   one ``(rows*h) x (cols*w)`` map, un-padded to the image's aspect ratio, with the learned
   ``image_newline`` appended to every row. transformers' own ``pack_image_features``
   assumes square ``h = w`` grids; this one takes any ``h x w`` and equals it at 576.
4. ``score``: the answer is teacher-forced; ``lm_head`` runs ONLY at answer positions and
   the feedback is the mean NLL over answer tokens (the reference's ``nll_mean``), with the
   sum, the count, and whether every teacher-forced argmax equals the answer (= greedy
   decoding reproduces it). (sample, level) sequences are sorted by length and batched
   under a token budget so padding stays small.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.activations import ACT2FN
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from .conversation import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    Template,
    TokenizedConversation,
    get_template,
    resolve_template,
    tokenize_conversation,
)
from .provenance import checkpoint_fingerprint
from .scaler import Ladder, Level


class ModelLoadError(RuntimeError):
    """A checkpoint folder that cannot be loaded as a LLaVA(-NeXT) model."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass
class Encoded:
    """One image after the vision tower and projector (all crops, unpooled)."""

    vision: torch.Tensor  # (n_crops, grid*grid, d_vision): selected layer, before the projector
    projected: torch.Tensor  # (n_crops, grid*grid, d): after the projector
    image_size: tuple[int, int]  # (height, width) of the original image

    @property
    def n_crops(self) -> int:
        return self.projected.shape[0]


@dataclass
class LevelScore:
    """The answer's feedback for one (sample, level)."""

    key: Any
    level_tokens: int
    level_grid: str
    n_crops: int
    n_visual_tokens: int
    answer_tokens: int
    nll_sum: float
    nll_mean: float
    greedy_match: bool


# --------------------------------------------------------------------------------------
# Packing (differentiable: the Stage-1 trainer uses the same functions)
# --------------------------------------------------------------------------------------


def pack_level(
    crops: torch.Tensor,
    level: Level,
    image_size: tuple[int, int],
    grid_shape: tuple[int, int] | None,
    image_newline: torch.Tensor | None,
) -> torch.Tensor:
    """Pack one level's pooled crops ``(n_crops, h*w, d)`` into the visual token sequence ``(n_tokens, d)``.

    ``grid_shape`` = (rows, cols) of the high-res crops (None for single-crop LLaVA).
    Mirrors transformers' ``pack_image_features`` with ``h x w`` pooled grids.
    """
    n_crops, n_tok, d = crops.shape
    if n_tok != level.tokens:
        raise ValueError(f"crops have {n_tok} tokens each, level {level.name} needs {level.tokens}")
    base = crops[0]  # (h*w, d)
    if n_crops == 1:
        if image_newline is None:
            return base
        return torch.cat([base, image_newline[None].to(base)], dim=0)  # (h*w + 1, d)
    if grid_shape is None:
        raise ValueError("several crops but no high-res grid shape")
    rows, cols = grid_shape
    if rows * cols != n_crops - 1:
        raise ValueError(
            f"image of size {image_size} maps to a {rows}x{cols} crop grid, but {n_crops - 1} high-res crops were given"
        )
    hi = crops[1:].view(rows, cols, level.h, level.w, d)  # (rows, cols, h, w, d)
    hi = hi.permute(4, 0, 2, 1, 3).reshape(d, rows * level.h, cols * level.w)  # (d, rows*h, cols*w)
    hi = unpad_image(hi, image_size)  # (d, H', W'): drop rows/cols that only hold padding
    if image_newline is not None:
        newline = image_newline[:, None, None].to(hi).expand(d, hi.shape[1], 1)  # (d, H', 1)
        hi = torch.cat([hi, newline], dim=-1)  # (d, H', W'+1)
    hi = hi.flatten(1, 2).transpose(0, 1)  # (H' * (W'+1), d)
    return torch.cat([base, hi], dim=0)


def visual_token_counts(config, ladder: Ladder, image_size: tuple[int, int]) -> dict[int, int]:
    """Visual tokens per level (tokens per crop -> packed length) for an image of ``image_size`` (height, width).

    From the config alone (no weights): what ``FrozenLMM.pack`` returns for that image, i.e. the
    base crop plus, for LLaVA-NeXT, the un-padded high-res map with one ``image_newline`` per row.
    """
    size = (int(image_size[0]), int(image_size[1]))
    if config.model_type == "llava_next":
        grid = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
        n_crops, newline = 1 + grid[0] * grid[1], torch.empty(0)
    else:
        grid, n_crops, newline = None, 1, None
    return {lv.tokens: pack_level(torch.empty(n_crops, lv.tokens, 0), lv, size, grid, newline).shape[0]
            for lv in ladder.levels}


def splice(
    embed: nn.Module, conv: TokenizedConversation, visual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings and labels of one sequence: text embeddings with the visual tokens in place of the image."""
    device = embed.weight.device
    ids = torch.tensor(conv.input_ids, dtype=torch.long, device=device)
    labels = torch.tensor(conv.labels, dtype=torch.long, device=device)
    if conv.image_index is None:
        if visual is not None:
            raise ValueError("visual tokens given for a text-only conversation")
        return embed(ids), labels
    if visual is None:
        raise ValueError("conversation has an image placeholder but no visual tokens were given")
    i = conv.image_index
    # The placeholder itself is never embedded: its id may lie outside the vocabulary (a converted
    # original checkpoint, like LLaVA's IMAGE_TOKEN_INDEX = -200), see model/convert.py.
    text = embed(torch.cat([ids[:i], ids[i + 1 :]]))  # (L - 1, d)
    visual = visual.to(text.dtype)
    embeds = torch.cat([text[:i], visual, text[i:]], dim=0)  # (L - 1 + n_visual, d)
    pad = torch.full((visual.shape[0],), IGNORE_INDEX, dtype=torch.long, device=device)
    return embeds, torch.cat([labels[:i], pad, labels[i + 1 :]])


def answer_logits(
    language_model: nn.Module,
    lm_head: nn.Module,
    embeds: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the decoder on right-padded sequences; ``lm_head`` only where the next token is an answer token.

    Returns (logits ``(n_answer, vocab)``, targets ``(n_answer,)``, answer count per sequence ``(B,)``).
    """
    batch = len(embeds)
    length = max(e.shape[0] for e in embeds)
    d = embeds[0].shape[-1]
    x = embeds[0].new_zeros(batch, length, d)  # (B, L, d)
    y = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=x.device)
    for b, (e, lab) in enumerate(zip(embeds, labels, strict=True)):
        x[b, : e.shape[0]] = e
        y[b, : lab.shape[0]] = lab
    # No attention mask, padded or not: padding only FOLLOWS each sequence, and causal attention
    # at position t sees positions <= t, so no real position ever sees padding (outputs at real
    # positions equal the unpadded ones; padded positions are dropped below). SDPA then runs its
    # fused causal kernel instead of materialising a (B, 1, L, L) mask -- several times faster
    # for ~1,200-token sequences. No KV cache either: nothing is decoded after this pass.
    hidden = language_model(inputs_embeds=x, use_cache=False).last_hidden_state  # (B, L, d)
    target = y[:, 1:]  # position t predicts token t+1
    is_answer = target != IGNORE_INDEX  # (B, L-1)
    logits = lm_head(hidden[:, :-1][is_answer])  # (n_answer, vocab): never the full vocabulary x L
    return logits, target[is_answer], is_answer.sum(dim=1)


# --------------------------------------------------------------------------------------
# The router's view of the frozen model: projector + input embedding table only
# --------------------------------------------------------------------------------------


class RouterSide(nn.Module):
    """The only parts of the LMM the router needs: the frozen projector and embedding table.

    The scoring job saves it next to the router inputs, so the trainer applies the projector
    to stored vision features and embeds instruction ids without loading the language model.
    Parameter names follow transformers (``multi_modal_projector.linear_1`` ...).
    """

    def __init__(self, vision_hidden: int, hidden: int, vocab: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.meta = {"vision_hidden": vision_hidden, "hidden": hidden, "vocab": vocab, "act": act, "bias": bias}
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(vision_hidden, hidden, bias=bias)
        self.multi_modal_projector.linear_2 = nn.Linear(hidden, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.requires_grad_(False)

    def project(self, vision: torch.Tensor) -> torch.Tensor:
        """``(..., d_vision)`` -> ``(..., d)``."""
        p = self.multi_modal_projector
        return p.linear_2(self.act(p.linear_1(vision)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path / "router_side.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "router_side.safetensors")
        tmp_json = path / "router_side.json.tmp"
        tmp_json.write_text(json.dumps({**self.meta, **(extra or {})}, indent=2))
        os.replace(tmp_json, path / "router_side.json")

    @classmethod
    def load(cls, path: str | Path) -> RouterSide:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "router_side.json").exists():
            raise FileNotFoundError(f"{path} has no router_side.json (written by `rglf score` next to router inputs)")
        meta = json.loads((path / "router_side.json").read_text())
        side = cls(meta["vision_hidden"], meta["hidden"], meta["vocab"], meta["act"], meta["bias"])
        side.load_state_dict(load_file(str(path / "router_side.safetensors")))
        side.meta.update({k: v for k, v in meta.items() if k not in side.meta})
        return side.eval()


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------


class FrozenLMM:
    """A LLaVA(-NeXT) checkpoint in inference mode, with this project's multi-granularity scoring."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        *,
        ladder: Ladder | None = None,
        model_id: str = "unknown",
        freeze: bool = True,
        template: str | Template = DEFAULT_TEMPLATE,
        template_source: str = "given",
    ):
        # freeze=False lets the Stage-1 trainer use the same packing on a model it is training.
        # template: the conversation template the checkpoint was trained with (model/conversation.py).
        self.model = model.eval().requires_grad_(False) if freeze else model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model.config
        self.model_id = model_id
        self.is_next = self.config.model_type == "llava_next"
        vc = self.config.vision_config
        if vc.image_size % vc.patch_size:
            raise ModelLoadError(f"vision image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}")
        self.grid = vc.image_size // vc.patch_size
        self.ladder = ladder if ladder is not None else Ladder.parse(None, self.grid)
        if self.ladder.grid != self.grid:
            raise ValueError(f"ladder is for a {self.ladder.grid}x{self.ladder.grid} grid, the model has {self.grid}x{self.grid}")
        inner = model.model
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.language_model = inner.language_model
        self.lm_head = model.lm_head
        self.image_newline = getattr(inner, "image_newline", None) if self.is_next else None
        self.embed = self.language_model.get_input_embeddings()
        self.image_token_id = self.config.image_token_id
        self.template = get_template(template)
        self.template_source = template_source

    # ---- loading -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        ladder: Ladder | str | None = None,
        attn_implementation: str | None = "sdpa",
        known: dict[str, Any] | None = None,
        template: str = "auto",
    ) -> FrozenLMM:
        """Load a local HF-format folder (never a hub: ``local_files_only``).

        ``known``: a ``run.json`` ``model_files`` record whose per-file hashes the model id may
        reuse (``model.provenance.checkpoint_identity``), so a scorer actor does not re-hash.
        ``template``: a template name, or ``auto``: the one recorded in the folder, else the one its HF
        chat template stands for, else ``vicuna_v1`` (``conversation.resolve_template``).
        """
        from transformers import (
            AutoConfig,
            AutoTokenizer,
            CLIPImageProcessorPil,
            LlavaForConditionalGeneration,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessorPil,
        )

        path = Path(path)
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is not an HF checkpoint folder (no config.json); convert an original LLaVA layout with `rglf convert`"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "llava_next":
            model_cls, proc_cls = LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil
        elif config.model_type == "llava":
            model_cls, proc_cls = LlavaForConditionalGeneration, CLIPImageProcessorPil
        else:
            raise ModelLoadError(f"{path}: model_type {config.model_type!r} is not llava_next or llava")
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                     "float16": torch.float16, "fp16": torch.float16, "auto": None}[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model = model_cls.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = proc_cls.from_pretrained(path, local_files_only=True)
        if isinstance(ladder, str):
            grid = config.vision_config.image_size // config.vision_config.patch_size
            ladder = Ladder.parse(ladder, grid)
        name, source = resolve_template(path, template)
        return cls(model, tokenizer, processor, ladder=ladder, model_id=checkpoint_fingerprint(path, known=known),
                   template=name, template_source=source)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def vision_hidden(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def max_length(self) -> int:
        return int(getattr(self.config.text_config, "max_position_embeddings", 1 << 30))

    # ---- images ------------------------------------------------------------------------

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB PIL image -> (pixel_values ``(n_crops, 3, S, S)``, original (height, width))."""
        out = self.image_processor(image, return_tensors="pt")
        pixels = out["pixel_values"]
        if self.is_next:
            size = tuple(int(v) for v in out["image_sizes"][0])
            pixels = pixels[0]  # (n_crops, 3, S, S); one image, so no batch padding of crops
        else:
            size = (image.height, image.width)
        return pixels, size

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """(rows, cols) of high-res crops for an image size; None for single-crop LLaVA."""
        if not self.is_next:
            return None
        return get_anyres_image_grid_shape(
            list(image_size), self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops ``(N, 3, S, S)`` -> the selected layer's features ``(N, grid*grid, d_vision)``."""
        layer = self.config.vision_feature_layer
        pixel_values = pixel_values.to(self.device, self.dtype)
        if layer == 0 and self.config.vision_config.model_type == "siglip_vision_model":
            # SigLIP's hidden_states[0] is its embeddings output (patch conv + positions): skip
            # the encoder layers, whose output would be thrown away (the embedded default).
            tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
            feats = tower.embeddings(pixel_values)  # (N, grid*grid, d_vision)
            if feats.shape[1] != self.grid * self.grid:
                raise ValueError(f"vision tower gave {feats.shape[1]} tokens per crop, expected {self.grid}x{self.grid}")
            return feats
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        if isinstance(layer, int):
            feats = out.hidden_states[layer]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        if feats.shape[1] != self.grid * self.grid:
            raise ValueError(f"vision tower gave {feats.shape[1]} tokens per crop, expected {self.grid}x{self.grid}")
        return feats

    def encode(self, pixel_values: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Encoded]:
        """Encode the crops of several images in ONE vision pass; every level derives from this."""
        counts = [p.shape[0] for p in pixel_values]
        with torch.inference_mode():
            vision = self.vision_features(torch.cat(list(pixel_values), dim=0))  # (sum crops, g*g, dv)
            projected = self.projector(vision)  # (sum crops, g*g, d)
        out = []
        for v, p, size in zip(vision.split(counts), projected.split(counts), image_sizes, strict=True):
            expected = 1 if not self.is_next else 1 + _prod(self.grid_shape(size))
            if v.shape[0] != expected:
                raise ValueError(f"image of size {size} should have {expected} crops, got {v.shape[0]}")
            out.append(Encoded(v, p, tuple(size)))
        return out

    def pack(self, projected: torch.Tensor, image_size: tuple[int, int], level: Level | int) -> torch.Tensor:
        """One level's visual token sequence for an encoded image: ``(n_visual_tokens, d)``."""
        lv = self.ladder.levels[level] if isinstance(level, int) else level
        pooled = self.ladder.pool(projected, lv)  # (n_crops, h*w, d)
        return pack_level(pooled, lv, image_size, self.grid_shape(image_size), self.image_newline)

    def n_visual_tokens(self, image_size: tuple[int, int], n_crops: int, level: Level | int) -> int:
        """Length of ``pack``'s output for an image, from shapes alone (nothing pooled or copied)."""
        lv = self.ladder.levels[level] if isinstance(level, int) else level
        shapes = torch.empty(n_crops, lv.tokens, 0)  # (n_crops, h*w, 0): zero-width crops, pack_level moves shapes only
        newline = None if self.image_newline is None else self.image_newline.new_empty(0)
        return pack_level(shapes, lv, image_size, self.grid_shape(image_size), newline).shape[0]

    # ---- text --------------------------------------------------------------------------

    def tokenize(self, turns: Sequence[tuple[str, str]], has_image: bool) -> TokenizedConversation:
        """The training ids and answer labels of a conversation, with this checkpoint's template."""
        return tokenize_conversation(
            turns, self.tokenizer, has_image=has_image, image_token_id=self.image_token_id, template=self.template
        )

    def prompt(self, turns: Sequence[tuple[str, str]], has_image: bool) -> TokenizedConversation:
        """The ids the model answers (turns end with a human turn): the training ids up to the next answer."""
        return tokenize_conversation(
            turns, self.tokenizer, has_image=has_image, image_token_id=self.image_token_id, template=self.template,
            generation=True,
        )

    def instruction_ids(self, conv: TokenizedConversation) -> list[int]:
        """The router's instruction ids: every non-answer id but the image placeholder (BOS kept, as the reference)."""
        return conv.instruction_ids()

    def router_side(self) -> RouterSide:
        """Copy of the frozen projector and embedding table for the router trainer."""
        p = self.projector
        side = RouterSide(
            self.vision_hidden,
            self.hidden_size,
            self.embed.weight.shape[0],
            act=self.config.projector_hidden_act,
            bias=p.linear_1.bias is not None,
        )
        side.multi_modal_projector.linear_1.load_state_dict(p.linear_1.state_dict())
        side.multi_modal_projector.linear_2.load_state_dict(p.linear_2.state_dict())
        side.embed_tokens.load_state_dict(self.embed.state_dict())
        side.meta.update({"model_id": self.model_id, "grid": self.grid})
        return side.float().eval()

    # ---- scoring -----------------------------------------------------------------------

    def score(
        self,
        items: Sequence[tuple[Any, TokenizedConversation, Encoded | None]],
        *,
        levels: Sequence[int] | None = None,
        max_batch_tokens: int = 2048,
        max_batch_size: int = 64,
        max_padding: float = 0.1,
    ) -> list[LevelScore]:
        """Score every (item, level): ``items`` are (key, conversation, encoding or None for text-only).

        ``levels`` are token counts from the ladder (default: all). Text-only items are scored
        once and reported at every level (their feedback does not depend on granularity).
        Sequences are ordered by length and batched under ``max_batch_tokens`` (B x L, padding
        included) and ``max_padding`` (padded positions per real token): a padded position costs
        as much as a real one, and neighbours in length order (other levels, other images) can
        differ by hundreds of tokens. A sequence longer than the budget runs alone. The default
        (2,048) runs the finest levels one sequence at a time and batches the coarse ones; bigger
        batches bought no speed on CPU (4,096 and 8,192 took 10-30% more CPU time in
        bench/bench_score.py) while activation memory grows with the budget. A batch's visual
        tokens are packed when it runs, so memory holds one batch's sequences, not every
        (item, level)'s.
        """
        if max_padding < 0:
            raise ValueError(f"max_padding must be >= 0, got {max_padding}")
        wanted = [self.ladder.index(t) for t in levels] if levels is not None else range(len(self.ladder))
        jobs = []  # (sequence length, item index, level index or None for text-only)
        for i, (_, conv, enc) in enumerate(items):
            if conv.image_index is None:
                jobs.append((len(conv.input_ids), i, None))
                continue
            if enc is None:
                raise ValueError(f"item {items[i][0]!r} has an image placeholder but no encoding")
            for li in wanted:
                jobs.append((len(conv.input_ids) - 1 + self.n_visual_tokens(enc.image_size, enc.n_crops, li), i, li))
        too_long = [items[i][0] for length, i, _ in jobs if length > self.max_length]
        if too_long:
            raise ValueError(f"sequences longer than the model's context ({self.max_length}): {too_long[:5]}")
        jobs.sort(key=lambda j: j[0])
        results: list[LevelScore] = []
        start = 0
        with torch.inference_mode():
            while start < len(jobs):
                end, real = start + 1, jobs[start][0]
                while end < len(jobs) and end - start < max_batch_size:
                    length, size = jobs[end][0], end + 1 - start  # sorted: the newcomer sets the padded length
                    if length * size > max_batch_tokens or length * size > (1 + max_padding) * (real + length):
                        break
                    real += length
                    end += 1
                results.extend(self._score_batch(items, jobs[start:end], wanted))
                start = end
        return results

    def _score_batch(self, items, jobs, wanted: Sequence[int]) -> list[LevelScore]:
        visuals = [
            None if li is None else self.pack(items[i][2].projected, items[i][2].image_size, li) for _, i, li in jobs
        ]
        seqs = [splice(self.embed, items[i][1], visual) for (_, i, _), visual in zip(jobs, visuals, strict=True)]
        for (length, i, li), (e, _) in zip(jobs, seqs, strict=True):
            if e.shape[0] != length:
                raise RuntimeError(f"item {items[i][0]!r}, level {li}: sequence of {e.shape[0]} tokens, planned {length}")
        logits, targets, counts = answer_logits(
            self.language_model, self.lm_head, [e for e, _ in seqs], [lab for _, lab in seqs]
        )
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # (n_answer,)
        hit = logits.argmax(dim=-1) == targets
        out = []
        for (_, i, li), visual, n_nll, n_hit in zip(
            jobs, visuals, nll.split(counts.tolist()), hit.split(counts.tolist()), strict=True
        ):
            key, conv, enc = items[i]
            level_list = [li] if li is not None else wanted  # text-only: once, reported at the wanted levels
            for lj in level_list:
                lv = self.ladder.levels[lj]
                out.append(
                    LevelScore(
                        key=key,
                        level_tokens=lv.tokens,
                        level_grid=lv.name,
                        n_crops=enc.n_crops if enc is not None else 0,
                        n_visual_tokens=visual.shape[0] if visual is not None else 0,
                        answer_tokens=int(n_nll.numel()),
                        nll_sum=float(n_nll.sum()),
                        nll_mean=float(n_nll.mean()),
                        greedy_match=bool(n_hit.all()),
                    )
                )
        return out

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self, turns: Sequence[tuple[str, str]], encoded: Encoded | None, level: int | Level, max_new_tokens: int = 32
    ) -> str:
        """Greedy answer to the last human turn of ``turns`` (ending with a human turn) at one level."""
        conv = self.prompt(turns, has_image=encoded is not None)
        with torch.inference_mode():
            visual = self.pack(encoded.projected, encoded.image_size, level) if encoded is not None else None
            embeds, _ = splice(self.embed, conv, visual)
            out = self.language_model(inputs_embeds=embeds[None], use_cache=True)
            new: list[int] = []
            stop = {self.tokenizer.eos_token_id}
            end = self.tokenizer.convert_tokens_to_ids(self.template.end_token)
            if end is not None and self.tokenizer.convert_ids_to_tokens(end) == self.template.end_token:
                stop.add(end)  # the template's end of turn (<|im_end|>, <|eot_id|>) when it is not the EOS
            for _ in range(max_new_tokens):
                token = int(self.lm_head(out.last_hidden_state[0, -1]).argmax())
                if token in stop:
                    break
                new.append(token)
                step = self.embed(torch.tensor([[token]], device=self.device))
                out = self.language_model(inputs_embeds=step, past_key_values=out.past_key_values, use_cache=True)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


def _prod(shape: tuple[int, int] | None) -> int:
    return 0 if shape is None else shape[0] * shape[1]
