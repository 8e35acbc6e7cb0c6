"""Tiny LLaVA(-NeXT) models built from configs, with an offline word-level tokenizer.

No weights can be downloaded, so tests and the embedded default build their models here:
``tiny_config`` gives a ``LlavaNextConfig`` (or ``LlavaConfig`` for a single crop) small
enough to run on a laptop CPU, ``build_tokenizer`` a word-level tokenizer trained offline
with an ``<image>`` token, and ``save_tiny_checkpoint`` writes an HF-format folder
(weights, config, tokenizer, image processor) that loads with ``from_pretrained`` like any
real checkpoint.

The embedded default's vision path (SPEC, "what then worked"): SigLIP with
``vision_feature_layer=0`` (patch conv + position embedding, no LayerNorm),
``vision_feature_select_strategy='full'`` and a linear projector, so the whole vision path
is linear per patch and average pooling commutes with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER, LLAVA_V1_SYSTEM, VICUNA_SYSTEM

TOY_TEMPLATE = "llava_v1"
"""The conversation template of the embedded default (LLaVA's ``llava_v1``: vicuna_v1's layout with the
"curious human" system text). ``save_tiny_checkpoint`` records it in the folder's ``rglf_checkpoint.json``."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER)
# Words of the conversation template and a few common ones, so generic prompts tokenise.
BASE_WORDS = (
    "USER ASSISTANT : , . ? ! ' \" ( ) - \n the a an is are what which where how many of in on "
    "at to and or not yes no this that image picture photo colour color shape square block big "
    "small left right top bottom center horizontal vertical describe answer question word single"
)


def build_tokenizer(extra_words: Iterable[str] = ()):
    """A deterministic word-level ``PreTrainedTokenizerFast`` with ``<image>``, ``<s>``, ``</s>``.

    Lower-cased. The vocabulary is the templates' words (both vicuna system prompts), ``BASE_WORDS``
    and ``extra_words``; anything else becomes ``<unk>``. Like a LLaMA tokenizer it adds ``<s>`` in
    front (``add_special_tokens=True``), which LLaVA's ``tokenizer_image_token`` relies on. Built
    offline with ``tokenizers``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words: set[str] = set()
    for text in (LLAVA_V1_SYSTEM, VICUNA_SYSTEM, BASE_WORDS, " ".join(extra_words)):
        words.update(piece for piece, _ in pre.pre_tokenize_str(text.lower()))
    words -= set(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # a word-level vocabulary: case carries nothing here
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return fast


def tiny_config(
    vocab_size: int,
    image_token_id: int,
    *,
    next: bool = True,
    vision: str = "siglip",
    image_size: int = 96,
    patch_size: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 1,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_heads: int = 4,
    intermediate: int = 256,
    linear_vision: bool = True,
    grid_pinpoints: list[list[int]] | None = None,
    max_positions: int = 4096,
):
    """A tiny LLaVA-NeXT (``next=True``) or LLaVA config; grid = image_size / patch_size (24 by default).

    ``linear_vision=True`` is the embedded default's linear vision path (layer 0, 'full',
    linear projector). ``False`` gives LLaVA's usual layout: last layer's penultimate-style
    features (-1), CLIP's 'default' strategy dropping CLS, GELU projector.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, SiglipVisionConfig

    vision_kwargs = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32),
        image_size=image_size,
        patch_size=patch_size,
    )
    vision_config = SiglipVisionConfig(**vision_kwargs) if vision == "siglip" else CLIPVisionConfig(**vision_kwargs)
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_positions,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=0 if linear_vision else -1,
        vision_feature_select_strategy="full" if (linear_vision or vision == "siglip") else "default",
        projector_hidden_act="linear" if linear_vision else "gelu",
        tie_word_embeddings=False,
    )
    if not next:
        return LlavaConfig(**common)
    if grid_pinpoints is None:
        # one, or two high-res crops side by side / stacked (pinpoints are (height, width))
        grid_pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    return LlavaNextConfig(image_grid_pinpoints=grid_pinpoints, **common)


def build_image_processor(config):
    """The PIL image processor matching a tiny config (torchvision is not needed)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    size = config.vision_config.image_size
    kwargs = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    if config.model_type == "llava_next":
        return LlavaNextImageProcessorPil(image_grid_pinpoints=config.image_grid_pinpoints, **kwargs)
    return CLIPImageProcessorPil(**kwargs)


def build_tiny_model(extra_words: Iterable[str] = (), seed: int = 0, **config_kwargs):
    """(model, tokenizer, image_processor) with random weights, deterministic by seed."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tokenizer = build_tokenizer(extra_words)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config = tiny_config(len(tokenizer), image_token_id, **config_kwargs)
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    model = cls(config).eval()
    return model, tokenizer, build_image_processor(config)


def save_tiny_checkpoint(path: str | Path, model, tokenizer, image_processor, template: str | None = None) -> Path:
    """Write an HF-format checkpoint folder (safetensors, config, tokenizer, processor).

    ``template``: recorded in ``rglf_checkpoint.json`` (what ``--template auto`` then uses).
    """
    from ..conversation import write_checkpoint_record

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    if template is not None:
        write_checkpoint_record(path, template=template, template_source="recorded when the checkpoint was built")
    return path
