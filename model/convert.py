"""Original LLaVA / AVG-LLaVA checkpoint layout -> an HF-format folder ``FrozenLMM`` loads.

The published LLaVA-1.6 and AVG-LLaVA checkpoints are saved by LLaVA's own code
(``LlavaLlamaForCausalLM``): a Llama ``config.json`` with extra ``mm_*`` keys, and weights
under LLaVA's module names. ``convert_checkpoint`` writes the same tensors, untouched (same
dtype, same values), under transformers 5.23's names, with a ``LlavaNextConfig`` (anyres +
``spatial_unpad``) or ``LlavaConfig`` (single crop, ``flat``) built from the original config.

Key map (original prefix -> transformers 5.23 prefix; the rest of the name is kept):

    model.embed_tokens.*                          -> model.language_model.embed_tokens.*
    model.layers.N.*                              -> model.language_model.layers.N.*
    model.norm.*                                  -> model.language_model.norm.*
    lm_head.weight                                -> lm_head.weight
    model.mm_projector.0.{weight,bias}            -> model.multi_modal_projector.linear_1.*
    model.mm_projector.2.{weight,bias}            -> model.multi_modal_projector.linear_2.*
    model.image_newline                           -> model.image_newline
    model.vision_tower.vision_tower.vision_model.* -> model.vision_tower.*
    model.router.*  (AVG-LLaVA)                   -> DST/avg_llava_router.safetensors, names and bytes untouched;
                                                     its RouterConfig in DST/rglf_checkpoint.json ("router"):
                                                     ``load_published_router(DST)`` (``rglf route --router DST``)

Buffers older transformers versions saved (``*.position_ids``, ``*.rotary_emb.inv_freq``) are
dropped: they are rebuilt at load. Every other key must map to a parameter of the target model
and every parameter must be present with the same shape, or ``ConvertError`` lists them.

Config map (original key -> HF):

    mm_patch_merge_type 'spatial_unpad' + image_aspect_ratio 'anyres' -> LlavaNextConfig
    mm_patch_merge_type 'flat' (LLaVA-1.5)                            -> LlavaConfig
    mm_projector_type 'mlp2x_gelu'      -> projector_hidden_act 'gelu' (the only type HF's projector has)
    mm_vision_select_layer (-2)         -> vision_feature_layer
    mm_vision_select_feature 'patch'    -> vision_feature_select_strategy 'default' (drop CLS);
                             'cls_patch'-> 'full'
    image_grid_pinpoints [[w, h], ...]  -> image_grid_pinpoints [[h, w], ...] (LLaVA's select_best_resolution
                                           reads (width, height), transformers' reads (height, width); order kept).
                                           Also its string form "[[336, 672], ...]" (AVG-LLaVA's train.py default,
                                           parsed with ast.literal_eval as LLaVA's mm_utils does)
    vis_token_granularity [36, ...]     -> the ladder, recorded in DST/rglf_checkpoint.json ("ladder"); also "36,72,..."
    filtered_text_num (absent: 32), vis_token_granularity -> the published router's RouterConfig (top_k, ladder)
    (no template key: version / conv_mode if present, else model_type / vocabulary / router -> the conversation
     template recorded in DST/rglf_checkpoint.json ("template"; ``detect_template``, or ``--template``)

Anything else in those keys (e.g. LLaVA-OneVision's "(1x1),...,(6x6)" pinpoints, or router weights without
``vis_token_granularity``) is a ``ConvertError`` naming the key.
    Llama fields (hidden_size, num_hidden_layers, rope_theta, ...) -> text_config (LlamaConfig)

What the conversion needs besides the folder:
- The vision tower is CLIP (LLaVA's ``CLIPVisionTower``). Its config is usually NOT in the
  folder (``mm_vision_tower`` names a hub repo, e.g. ``openai/clip-vit-large-patch14-336``).
  Hidden size, patch size, image size, depth and MLP width are read off the weights; the number
  of attention heads cannot be, and defaults to ``hidden_size // 64`` (OpenAI CLIP ViT-B/L: head
  dim 64, so 16 heads for CLIP-L). Pass ``vision_config`` (a CLIPVisionConfig JSON, or a CLIP
  ``config.json`` with a ``vision_config`` entry) for anything else; values that contradict the
  weights are an error.
- Tokenizer files are copied as they are (a folder with only a SentencePiece ``tokenizer.model``
  may need the ``sentencepiece`` package to load in transformers 5). The image placeholder id is the tokenizer's
  ``<image>`` token if it has one inside the vocabulary, otherwise ``vocab_size``: an id outside
  the vocabulary that is never embedded (like LLaVA's ``IMAGE_TOKEN_INDEX = -200``), so the
  weights and the softmax stay exactly the original ones. ``FrozenLMM`` never embeds the
  placeholder; transformers' own ``forward(input_ids=...)`` would, so call it with
  ``inputs_embeds`` on such a folder.
- Image preprocessing: ``preprocessor_config.json`` in SRC, if any, gives mean/std/sizes;
  otherwise OpenAI CLIP's mean/std and the vision tower's image size. The anyres pinpoints come
  from the original config.

The output is written into a temporary folder beside DST and renamed into place at the end, so
DST either does not exist or is complete. DST also gets ``llava_original_config.json`` (the
source config, verbatim) and ``convert.json`` (what was converted, from where).
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conversation import CHECKPOINT_RECORD

ROUTER_PREFIX = "model.router."
ROUTER_FILE = "avg_llava_router.safetensors"
ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# (original prefix, transformers 5.23 prefix); the first matching prefix wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    (ORIGINAL_VISION_PREFIX, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
DROPPED_BUFFERS = (".position_ids", ".rotary_emb.inv_freq")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# LlamaConfig fields read from the original config (everything else there is LLaVA's).
LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
)
# AVG-LLaVA's router settings in the original config, kept in convert.json for the router loader.
AVG_LLAVA_KEYS = ("router_select", "vis_token_granularity", "filtered_text_num", "margin",
                  "rank_loss_weight", "ce_loss_weight")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
CLIP_HEAD_DIM = 64  # OpenAI CLIP ViT-B/16, ViT-L/14(-336): 768/12 = 1024/16 = 64
MAX_LISTED = 20


class ConvertError(ValueError):
    """A source folder that cannot be converted; the message says what is wrong."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass
class ConvertReport:
    """What ``convert_checkpoint`` wrote (also saved as ``DST/convert.json``)."""

    src: str
    dst: str
    model_type: str
    tensors: int
    router_tensors: int
    dropped_buffers: list[str]
    image_token_id: int
    vision_config_source: str
    tokenizer_files: list[str]
    dtype: str
    avg_llava: dict[str, Any] = field(default_factory=dict)
    template: str = "vicuna_v1"
    ladder: str | None = None

    def summary(self) -> str:
        router = f", {self.router_tensors} router tensors -> {ROUTER_FILE}" if self.router_tensors else ""
        ladder = f", ladder {self.ladder}" if self.ladder else ""
        return (
            f"converted {self.src} -> {self.dst}: {self.model_type}, {self.tensors} tensors ({self.dtype}){router}; "
            f"template {self.template}{ladder}; "
            f"vision config from {self.vision_config_source}; image token id {self.image_token_id}; "
            f"tokenizer files: {', '.join(self.tokenizer_files) or 'none'}"
        )


# --------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------


def read_original_config(src: Path) -> dict[str, Any]:
    """The original ``config.json`` as a dict, checked to be LLaVA's own layout."""
    path = src / "config.json"
    if not path.exists():
        raise ConvertError(f"{src} has no config.json")
    cfg = json.loads(path.read_text())
    if "text_config" in cfg or cfg.get("model_type") == "llava_next":
        raise ConvertError(f"{src} is already in the HF layout (config.json has text_config); load it directly")
    if "mm_vision_tower" not in cfg and "mm_hidden_size" not in cfg:
        raise ConvertError(
            f"{src}/config.json has no mm_vision_tower / mm_hidden_size: not an original LLaVA (LlavaLlamaForCausalLM) checkpoint"
        )
    return cfg


def weight_files(src: Path) -> list[Path]:
    """Safetensors shards (as listed by the index if there is one), else ``pytorch_model*.bin``."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (src / n).exists()]
        if missing:
            raise ConvertError(f"{index.name} lists shards that are not in {src}: {missing}")
        return [src / n for n in names]
    files = sorted(p for p in src.glob("*.safetensors") if p.name != ROUTER_FILE)
    if not files:
        files = sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ConvertError(f"{src} has no *.safetensors or pytorch_model*.bin weights")
    return files


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Every tensor's shape (safetensors headers only; .bin files are loaded) and the weights' dtype."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key] = tuple(sl.get_shape())
                    dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + 1
        else:
            for key, t in load_weights(path).items():
                shapes[key] = tuple(t.shape)
                name = str(t.dtype).removeprefix("torch.")
                dtypes[name] = dtypes.get(name, 0) + 1
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    main = max(dtypes, key=dtypes.get) if dtypes else "float32"
    return shapes, getattr(torch, names.get(main, main), torch.float32)


def map_key(key: str) -> str | None:
    """Original name -> transformers 5.23 name (None: not a model weight this map knows)."""
    for old, new in KEY_MAP:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def find_image_token(src: Path) -> int | None:
    """The ``<image>`` token's id in the tokenizer files, if they define one."""
    token = "<image>"
    added = src / "added_tokens.json"
    if added.exists() and token in (tokens := json.loads(added.read_text())):
        return int(tokens[token])
    tok_cfg = src / "tokenizer_config.json"
    if tok_cfg.exists():
        for idx, entry in json.loads(tok_cfg.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(idx)
    tok_json = src / "tokenizer.json"
    if tok_json.exists():
        data = json.loads(tok_json.read_text())
        for entry in data.get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
        vocab = data.get("model", {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    return None


# --------------------------------------------------------------------------------------
# Building the HF config
# --------------------------------------------------------------------------------------


def clip_vision_config(shapes: dict[str, tuple[int, ...]], mm_hidden_size: int | None, override: dict | None):
    """A ``CLIPVisionConfig`` from the vision tower's weight shapes, plus ``override`` (checked against them)."""
    from transformers import CLIPVisionConfig

    p = ORIGINAL_VISION_PREFIX
    needed = [p + "embeddings.patch_embedding.weight", p + "embeddings.position_embedding.weight",
              p + "embeddings.class_embedding", p + "encoder.layers.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ConvertError(
            f"the checkpoint has no CLIP vision tower weights (missing {absent}). LLaVA-1.5 style checkpoints "
            "keep CLIP frozen and load it from mm_vision_tower at run time; merge those weights under "
            f"{ORIGINAL_VISION_PREFIX!r} first (only CLIP vision towers are supported)"
        )
    hidden, channels, patch, _ = shapes[p + "embeddings.patch_embedding.weight"]  # (d, 3, p, p)
    n_pos = shapes[p + "embeddings.position_embedding.weight"][0]  # grid*grid + 1 (CLS)
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1:
        raise ConvertError(f"vision position embedding has {n_pos} rows, not grid*grid + 1 for a square grid")
    layers = 1 + max(
        int(k[len(p + "encoder.layers.") :].split(".")[0]) for k in shapes if k.startswith(p + "encoder.layers.")
    )
    derived = dict(
        hidden_size=hidden,
        num_channels=channels,
        patch_size=patch,
        image_size=side * patch,
        num_hidden_layers=layers,
        intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
    )
    if mm_hidden_size is not None and mm_hidden_size != hidden:
        raise ConvertError(f"config mm_hidden_size {mm_hidden_size} != vision tower width {hidden} in the weights")
    override = dict(override or {})
    override.pop("model_type", None)
    conflicts = {k: (override[k], v) for k, v in derived.items() if k in override and override[k] != v}
    if conflicts:
        raise ConvertError(
            "vision config contradicts the weights (given, weights): "
            + ", ".join(f"{k}={a} vs {b}" for k, (a, b) in conflicts.items())
        )
    kwargs = {**derived, "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM), **override}
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ConvertError(f"vision hidden size {hidden} is not divisible by {kwargs['num_attention_heads']} heads")
    return CLIPVisionConfig(**kwargs)


def read_vision_config_file(path: str | Path | dict | None) -> dict | None:
    if path is None or isinstance(path, dict):
        return path
    data = json.loads(Path(path).read_text())
    return data.get("vision_config", data)  # a CLIPConfig holds the vision part under vision_config


def parse_pinpoints(value: Any) -> list[list[int]]:
    """``image_grid_pinpoints`` as LLaVA writes it: a list of [width, height] pairs, or that list's string
    form (AVG-LLaVA's ``train.py`` default, parsed with ``ast.literal_eval`` as LLaVA's ``mm_utils`` does)."""
    given = value
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConvertError(
                f"config.json: image_grid_pinpoints {given!r} is not a list of [width, height] pairs (nor its string "
                "form, e.g. \"[[336, 672], [672, 336]]\"). Fix the key in the source config"
            ) from None
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                             for v in p)
        for p in value
    )
    if not ok:
        raise ConvertError(
            f"config.json: image_grid_pinpoints {given!r} is not a list of [width, height] pairs of positive integers "
            "(LLaVA-NeXT 'anyres'). Fix the key in the source config"
        )
    return [[int(w), int(h)] for w, h in value]


def parse_granularity(value: Any, grid: int) -> str | None:
    """AVG-LLaVA's ``vis_token_granularity`` (a list of token counts, or "36,72,..." as passed to ``train.py``)
    -> a ladder spec on the crop grid; None when absent."""
    from .scaler import Ladder, LadderError

    if value is None:
        return None
    tokens = value
    if isinstance(value, str):
        try:
            tokens = [int(t) for t in value.split(",")]
        except ValueError:
            tokens = None
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        tokens = [tokens]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise ConvertError(
            f"config.json: vis_token_granularity {value!r} is not a list of token counts (e.g. [36, 72, 144, 288, 576]). "
            "Fix the key in the source config"
        )
    if tokens != sorted(set(tokens)):
        raise ConvertError(f"config.json: vis_token_granularity {value!r} must be ascending without repeats (router expert i = level i)")
    try:
        return Ladder.parse(",".join(map(str, tokens)), grid).spec
    except LadderError as err:
        raise ConvertError(f"config.json: vis_token_granularity {value!r}: {err}") from None


def check_router_settings(orig: dict[str, Any]) -> None:
    """AVG-LLaVA's router and loss settings must have the types its ``train.py`` writes."""
    kinds = {"router_select": (bool,), "filtered_text_num": (int,), "margin": (int, float),
             "rank_loss_weight": (int, float), "ce_loss_weight": (int, float), "tune_router": (bool,)}
    for key, kind in kinds.items():
        value = orig.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in kind) or not isinstance(value, kind):
            raise ConvertError(
                f"config.json: {key} {value!r} must be of type {' or '.join(k.__name__ for k in kind)}. Fix the key in the source config"
            )


def published_router_config(orig: dict[str, Any], shapes: dict[str, tuple[int, ...]], hidden: int, grid: int):
    """The ``RouterConfig`` of the published router weights (``model.router.*``) from the original config.

    ``vis_token_granularity`` -> the ladder; ``filtered_text_num`` (absent: 32, as the reference's
    ``getattr(config, 'filtered_text_num', 32)``) -> ``top_k``; the merger attends across crops and has
    8 heads, as the reference builds it. Checked against the weights' shapes.
    """
    from .router import (
        AVG_LLAVA_KEY_PREFIX,
        GranularityRouter,
        RouterConfig,
        convert_avg_llava_router_state_dict,
    )

    ladder = parse_granularity(orig.get("vis_token_granularity"), grid)
    if ladder is None:
        raise ConvertError(
            "config.json: vis_token_granularity is missing but the weights hold an AVG-LLaVA router (model.router.*); "
            "add the router's levels, e.g. [36, 72, 144, 288, 576]"
        )
    check_router_settings(orig)
    top_k = orig.get("filtered_text_num") or 32
    if top_k <= 0:
        raise ConvertError(f"config.json: filtered_text_num {top_k} must be positive")
    config = RouterConfig(hidden_size=hidden, ladder=ladder, grid=grid, top_k=top_k, merger_attends="crops")
    try:
        names = convert_avg_llava_router_state_dict({k: torch.empty(0) for k in shapes if k.startswith(AVG_LLAVA_KEY_PREFIX)})
    except KeyError as err:
        raise ConvertError(str(err).strip("'\"")) from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GranularityRouter(config).state_dict().items()}
    bad = [f"{AVG_LLAVA_KEY_PREFIX}{k} {shapes[AVG_LLAVA_KEY_PREFIX + k]} != {expected[k]}" for k in names
           if shapes[AVG_LLAVA_KEY_PREFIX + k] != expected[k]]
    if bad:
        raise ConvertError(
            f"router weights do not match vis_token_granularity {orig.get('vis_token_granularity')} + filtered_text_num "
            f"{top_k} (voter rows = sum of levels + filtered_text_num): {', '.join(bad)}"
        )
    return config


def detect_template(orig: dict[str, Any], src: Path, has_router: bool) -> tuple[str, str]:
    """The conversation template an original checkpoint was trained with (its config does not say)."""
    for key in ("version", "conv_mode", "conversation", "template"):
        if isinstance(orig.get(key), str):
            from .conversation import TemplateError, get_template

            try:
                return get_template(orig[key]).name, f"config.json {key} {orig[key]!r}"
            except TemplateError as err:
                raise ConvertError(f"config.json: {key}: {err}") from None
    model_type = orig.get("model_type", "")
    if model_type == "llava_mistral":
        return "mistral_instruct", "config.json model_type 'llava_mistral' (LLaVA-1.6 mistral)"
    if model_type.startswith("llava_qwen"):
        return "qwen", f"config.json model_type {model_type!r} (LLaVA-NeXT qwen)"
    vocab = orig.get("vocab_size")
    if vocab in (128256, 128257):
        return "llava_llama_3", f"vocab_size {vocab} (Llama-3: llama3-llava-next)"
    if vocab in (64000, 64002):
        return "chatml_direct", f"vocab_size {vocab} (Yi: llava-v1.6-34b)"
    if has_router:
        return "vicuna_v1", "AVG-LLaVA (router weights; its training scripts pass --version v1)"
    return "vicuna_v1", "default: vicuna LLaVA-1.5/1.6 train with --version v1 (pass --template otherwise)"


def build_hf_config(orig: dict[str, Any], vision_config, image_token_id: int, dtype: torch.dtype):
    """``LlavaNextConfig`` (anyres, spatial_unpad) or ``LlavaConfig`` (flat) from the original config."""
    from transformers import LlamaConfig, LlavaConfig, LlavaNextConfig

    projector = orig.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConvertError(
            f"mm_projector_type {projector!r} is not supported: transformers' LLaVA projector is mlp2x_gelu "
            "(Linear -> GELU -> Linear)"
        )
    feature = orig.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ConvertError(f"mm_vision_select_feature {feature!r} is not one of {sorted(SELECT_FEATURE)}")
    merge = orig.get("mm_patch_merge_type", "flat")
    aspect = orig.get("image_aspect_ratio", "square")
    text_kwargs = {k: orig[k] for k in LLAMA_KEYS if k in orig}
    text_config = LlamaConfig(**text_kwargs)
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=orig.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_FEATURE[feature],
        tie_word_embeddings=bool(orig.get("tie_word_embeddings", False)),
        dtype=str(dtype).removeprefix("torch."),
    )
    if merge == "spatial_unpad" and aspect == "anyres":
        pinpoints = [[h, w] for w, h in parse_pinpoints(orig.get("image_grid_pinpoints"))]  # LLaVA (w, h) -> HF (h, w)
        grid = vision_config.image_size // vision_config.patch_size
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=grid * grid, **common)
    elif merge == "flat" and aspect in ("pad", "square"):
        config = LlavaConfig(**common)
    else:
        raise ConvertError(
            f"mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r} is not supported: "
            "use 'spatial_unpad' + 'anyres' (LLaVA-NeXT, AVG-LLaVA) or 'flat' + 'pad' (LLaVA-1.5)"
        )
    config.architectures = [
        "LlavaNextForConditionalGeneration" if config.model_type == "llava_next" else "LlavaForConditionalGeneration"
    ]
    return config


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the target model, built on the meta device (no memory)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_image_processor(config, src: Path):
    """LLaVA-NeXT (or CLIP, single crop) image processor; SRC's preprocessor_config.json gives mean/std/sizes."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = config.vision_config.image_size
    kwargs: dict[str, Any] = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    pre = src / "preprocessor_config.json"
    if pre.exists():
        given = json.loads(pre.read_text())
        kwargs.update({k: given[k] for k in ("size", "crop_size", "image_mean", "image_std") if k in given})
    if config.model_type == "llava_next":
        return LlavaNextImageProcessorPil(image_grid_pinpoints=config.image_grid_pinpoints, **kwargs)
    return CLIPImageProcessorPil(**kwargs)


# --------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{keys[:MAX_LISTED]}{more}"


def plan_keys(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], tied: bool
) -> tuple[dict[str, str], list[str], list[str]]:
    """(original -> HF name for model weights, router keys, dropped buffers); raises listing every mismatch."""
    mapping: dict[str, str] = {}
    router, dropped, unexpected = [], [], []
    for key in sorted(shapes):
        if key.startswith(ROUTER_PREFIX):
            router.append(key)
        elif key.endswith(DROPPED_BUFFERS):
            dropped.append(key)
        elif (new := map_key(key)) is not None and new in expected:
            mapping[key] = new
        else:
            unexpected.append(key)
    present = set(mapping.values())
    missing = sorted(k for k in expected if k not in present)
    if tied and missing == ["lm_head.weight"]:
        missing = []  # tie_word_embeddings: lm_head shares embed_tokens
    reverse = {new: old for old, new in mapping.items()}
    bad_shape = sorted(
        f"{reverse[k]} {shapes[reverse[k]]} -> {k} {expected[k]}" for k in present if shapes[reverse[k]] != expected[k]
    )
    if missing or unexpected or bad_shape:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} (HF names): {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} (original names, no place in the target model): {_listed(unexpected)}")
        if bad_shape:
            problems.append(f"shape mismatch {len(bad_shape)}: {_listed(bad_shape)}")
        raise ConvertError("checkpoint weights do not match the converted config: " + "; ".join(problems))
    return mapping, router, dropped


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    vision_config: str | Path | dict | None = None,
    image_token_id: int | None = None,
    template: str | None = None,
    force: bool = False,
) -> ConvertReport:
    """Convert an original LLaVA / AVG-LLaVA folder ``src`` into a new HF-format folder ``dst``.

    ``template``: the conversation template to record (default: detected, ``detect_template``).
    ``force``: replace an existing ``dst``.
    """
    from safetensors.torch import save_file

    from .conversation import TemplateError, get_template, write_checkpoint_record

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists. Pass --force to replace it, or choose another destination")
    orig = read_original_config(src)
    check_router_settings(orig)
    files = weight_files(src)
    shapes, dtype = read_shapes(files)

    override = read_vision_config_file(vision_config)
    vcfg = clip_vision_config(shapes, orig.get("mm_hidden_size"), override)
    vocab = shapes.get("model.embed_tokens.weight", (orig.get("vocab_size", 0),))[0]
    if image_token_id is None:
        found = find_image_token(src)
        image_token_id = found if found is not None and found < vocab else vocab
    config = build_hf_config(orig, vcfg, image_token_id, dtype)
    mapping, router_keys, dropped = plan_keys(shapes, expected_shapes(config), config.tie_word_embeddings)
    grid = vcfg.image_size // vcfg.patch_size
    ladder = parse_granularity(orig.get("vis_token_granularity"), grid)
    router_config = (
        published_router_config(orig, shapes, config.text_config.hidden_size, grid) if router_keys else None
    )
    if template is not None:
        try:
            template_name, template_source = get_template(template).name, "given (--template)"
        except TemplateError as err:
            raise ConvertError(str(err)) from None
    else:
        template_name, template_source = detect_template(orig, src, bool(router_keys))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        router: dict[str, torch.Tensor] = {}
        written: list[tuple[Path, list[str]]] = []  # (temp shard, its tensor names): files holding only router
        for k, path in enumerate(files):  # weights write no shard, so shard names count model shards only
            tensors = load_weights(path)
            shard = {mapping[key]: t.contiguous() for key, t in tensors.items() if key in mapping}
            router.update({key: t.contiguous() for key, t in tensors.items() if key.startswith(ROUTER_PREFIX)})
            del tensors
            if shard:
                part = tmp / f".shard-{k}.safetensors"
                save_file(shard, str(part), metadata={"format": "pt"})
                written.append((part, list(shard)))
                total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        for k, (part, names) in enumerate(written):
            name = "model.safetensors" if len(written) == 1 else f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(part, tmp / name)
            weight_map.update(dict.fromkeys(names, name))
        if len(written) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if router:
            save_file(router, str(tmp / ROUTER_FILE), metadata={"format": "pt"})

        config.save_pretrained(tmp)
        build_image_processor(config, src).save_pretrained(tmp)
        copied = [n for n in TOKENIZER_FILES if (src / n).exists()]
        for name in copied:
            shutil.copy2(src / name, tmp / name)
        shutil.copy2(src / "config.json", tmp / "llava_original_config.json")
        report = ConvertReport(
            src=str(src),
            dst=str(dst),
            model_type=config.model_type,
            tensors=len(mapping),
            router_tensors=len(router_keys),
            dropped_buffers=dropped,
            image_token_id=image_token_id,
            vision_config_source=(
                f"weights + {'given config' if override else 'no config'}, {vcfg.num_attention_heads} heads"
                + ("" if "num_attention_heads" in (override or {}) else f" (default: hidden / {CLIP_HEAD_DIM})")
            ),
            tokenizer_files=copied,
            dtype=str(dtype).removeprefix("torch."),
            avg_llava={k: orig[k] for k in AVG_LLAVA_KEYS if k in orig},
            template=template_name,
            ladder=ladder,
        )
        (tmp / "convert.json").write_text(json.dumps(asdict(report), indent=2))
        record: dict[str, Any] = {"template": template_name, "template_source": template_source}
        if ladder is not None:
            record.update(ladder=ladder, ladder_source="config.json vis_token_granularity")
        if router_config is not None:
            record["router"] = {"weights": ROUTER_FILE, "names": "published (model.router.*)",
                                "config": router_config.to_dict()}
        write_checkpoint_record(tmp, **record)

        old = None
        if dst.exists():  # force: move the old folder aside first so dst is never half-written
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------------------
# Published router weights, both ways
# --------------------------------------------------------------------------------------


def _router_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(ROUTER_PREFIX)})
        else:
            out.update({k: v for k, v in load_weights(path).items() if k.startswith(ROUTER_PREFIX)})
    return out


def _vision_grid(orig: dict[str, Any], files: list[Path]) -> int:
    """The crop grid side of an original checkpoint: from its vision tower's position embedding."""
    shapes, _ = read_shapes(files)
    rows = shapes.get(ORIGINAL_VISION_PREFIX + "embeddings.position_embedding.weight", (577,))[0]
    return math.isqrt(rows - 1)


def is_published_router(path: str | Path) -> bool:
    """True for a folder holding AVG-LLaVA router weights under their published names (see ``load_published_router``)."""
    from .conversation import read_checkpoint_record

    path = Path(path)
    if (path / ROUTER_FILE).is_file():
        return True
    if (path / "config.json").is_file() and "router" not in read_checkpoint_record(path):
        try:
            orig = read_original_config(path)
        except ConvertError:
            return False
        return bool(orig.get("router_select") or orig.get("vis_token_granularity"))
    return False


def load_published_router(path: str | Path, device: str | torch.device = "cpu"):
    """A ``GranularityRouter`` from AVG-LLaVA's published weights (names ``model.router.*``), in eval mode.

    ``path`` is a folder written by ``rglf convert`` (``avg_llava_router.safetensors`` + the router config in
    ``rglf_checkpoint.json``; older conversions: from ``llava_original_config.json``), by ``rglf export-router``,
    or an original-layout AVG-LLaVA checkpoint (``config.json`` + shards holding ``model.router.*``).
    """
    from safetensors.torch import load_file

    from .conversation import read_checkpoint_record
    from .router import GranularityRouter, RouterConfig, convert_avg_llava_router_state_dict

    path = Path(path)
    record = read_checkpoint_record(path).get("router")
    if (path / ROUTER_FILE).is_file():
        tensors = load_file(str(path / ROUTER_FILE))
        if record is not None:
            config = RouterConfig.from_dict(record["config"])
        elif (path / "llava_original_config.json").is_file() and (path / "config.json").is_file():
            orig = json.loads((path / "llava_original_config.json").read_text())
            vc = json.loads((path / "config.json").read_text())["vision_config"]
            hidden = int(tensors[ROUTER_PREFIX + "router.0.weight"].shape[0])
            config = published_router_config(orig, {k: tuple(v.shape) for k, v in tensors.items()}, hidden,
                                             vc["image_size"] // vc["patch_size"])
        else:
            raise ConvertError(
                f"{path}: {ROUTER_FILE} has no router config beside it ({CHECKPOINT_RECORD} 'router' or "
                "llava_original_config.json). Re-run `rglf convert` or `rglf export-router`"
            )
    else:
        orig = read_original_config(path)
        files = weight_files(path)
        tensors = _router_tensors(files)
        if not tensors:
            raise ConvertError(f"{path}: no {ROUTER_PREFIX}* weights: not an AVG-LLaVA checkpoint with a router")
        hidden = int(tensors[ROUTER_PREFIX + "router.0.weight"].shape[0])
        config = published_router_config(orig, {k: tuple(v.shape) for k, v in tensors.items()}, hidden,
                                         _vision_grid(orig, files))
    router = GranularityRouter(config)
    state = {k: v.to(torch.float32) for k, v in convert_avg_llava_router_state_dict(tensors).items()}
    router.load_state_dict(state, strict=True)
    return router.to(device).eval()


def exportable(config) -> None:
    """Refuse routers the reference code cannot run: it attends across crops, always uses text, has 8 heads,
    and pools only to (g, g/2), (g/2, g/4) or (g/k, g/k) grids (``matryoshka_vis_token_process``)."""
    from .scaler import Ladder

    problems = []
    if config.merger_attends != "crops":
        problems.append(f"merger_attends {config.merger_attends!r} (the reference attends across crops)")
    if not config.use_text:
        problems.append("use_text False (image-only; the reference always feeds filtered_text_num text tokens)")
    if config.nhead != 8:
        problems.append(f"nhead {config.nhead} (the reference builds 8 heads)")
    g = config.grid
    for lv in Ladder.parse(config.ladder, g).levels:
        total = g * g
        if lv.tokens * 2 == total:
            shape = (g, g // 2)
        elif lv.tokens * 8 == total:
            shape = (g // 2, g // 4)
        else:
            k = math.isqrt(total // lv.tokens) if total % lv.tokens == 0 else 0
            shape = (g // k, g // k) if k and g % k == 0 else None
        if shape != (lv.h, lv.w):
            problems.append(f"level {lv.name} (the reference pools {lv.tokens} tokens to {shape or 'no grid'})")
    if problems:
        raise ConvertError("this router cannot be written in AVG-LLaVA's format: " + "; ".join(problems))


@dataclass
class ExportReport:
    """What ``export_router`` wrote."""

    router: str
    dst: str
    mode: str  # "merged" into an original-layout checkpoint, or "standalone"
    tensors: int
    dtype: str
    files: list[str]
    config_changes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        changes = (", config.json: " + ", ".join(f"{k} = {v}" for k, v in self.config_changes.items())
                   if self.config_changes else "")
        return (f"exported {self.router} -> {self.dst} ({self.mode}): {self.tensors} tensors as {ROUTER_PREFIX}* "
                f"({self.dtype}) in {', '.join(self.files)}{changes}")


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_router(router_path: str | Path, dst: str | Path, *, force: bool = False, dtype: str | None = None) -> ExportReport:
    """Write a router under AVG-LLaVA's published names (``model.router.*``).

    ``router_path``: a router folder (``rglf train``) or any published router ``load_published_router`` reads.
    ``dst``: an original-layout AVG-LLaVA / LLaVA checkpoint folder (``config.json`` with ``mm_*`` keys): the
    router is merged in (a sharded folder gets ``model-avg-llava-router.safetensors`` and index entries, a
    single-file one its ``model.safetensors`` rewritten with the router added; ``config.json`` gets
    ``vis_token_granularity``, ``filtered_text_num`` and ``router_select`` where they differ), replacing a
    router already there only with ``force``. Any other ``dst``: a folder with ``avg_llava_router.safetensors``
    and its config in ``rglf_checkpoint.json`` (what ``rglf convert`` writes beside a converted checkpoint).
    ``dtype``: float32 / bfloat16 / float16 (default: the dtype of the router being replaced, else the
    checkpoint's ``torch_dtype``, else float32).
    """
    from .conversation import read_checkpoint_record, write_checkpoint_record
    from .router import AVG_LLAVA_KEY_MAP, ROUTER_CONFIG, load_router

    router_path, dst = Path(router_path), Path(dst)
    if (router_path / ROUTER_CONFIG).is_file():
        router = load_router(router_path)
    elif is_published_router(router_path):
        router = load_published_router(router_path)
    else:
        raise ConvertError(
            f"{router_path}: not a router folder ({ROUTER_CONFIG}) nor a published AVG-LLaVA router. "
            "Pass the folder `rglf train --out` wrote"
        )
    config = router.config
    exportable(config)
    reverse = {ours: published for published, ours in AVG_LLAVA_KEY_MAP.items()}
    state = {ROUTER_PREFIX + reverse[k]: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ConvertError(f"--dtype {dtype!r} is not one of {sorted(dtypes)}")

    original = None
    if (dst / "config.json").is_file():
        try:
            original = read_original_config(dst)
        except ConvertError:
            original = None
    if original is None:  # standalone
        if dst.exists() and not dst.is_dir():
            raise ConvertError(f"{dst} exists and is not a folder. Choose another destination")
        if (dst / ROUTER_FILE).exists() and not force:
            raise ConvertError(f"{dst / ROUTER_FILE} already exists. Pass --force to replace it")
        dst.mkdir(parents=True, exist_ok=True)
        target = dtypes[dtype or "float32"]
        _save_atomic({k: v.to(target) for k, v in state.items()}, dst / ROUTER_FILE)
        record = {"router": {"weights": ROUTER_FILE, "names": "published (model.router.*)",
                             "config": config.to_dict()}}
        if "ladder" not in read_checkpoint_record(dst):
            from .scaler import Ladder

            record["ladder"] = Ladder.parse(config.ladder, config.grid).spec
        write_checkpoint_record(dst, **record)
        return ExportReport(str(router_path), str(dst), "standalone", len(state), str(target).removeprefix("torch."),
                            [ROUTER_FILE, CHECKPOINT_RECORD])

    # merge into an original-layout checkpoint
    files = weight_files(dst)
    existing = _router_tensors(files)
    if existing and not force:
        raise ConvertError(
            f"{dst} already holds {len(existing)} {ROUTER_PREFIX}* tensors. Pass --force to replace them"
        )
    if dtype is not None:
        target = dtypes[dtype]
    elif existing:
        target = next(iter(existing.values())).dtype
    else:
        target = getattr(torch, str(original.get("torch_dtype") or "float32"), torch.float32)
    hidden = original.get("hidden_size")
    if hidden != config.hidden_size:
        raise ConvertError(f"router width {config.hidden_size} != the checkpoint's hidden_size {hidden}")
    grid = _vision_grid(original, files)
    if grid != config.grid:
        raise ConvertError(f"router grid {config.grid}x{config.grid} != the checkpoint's vision grid {grid}x{grid}")
    state = {k: v.to(target) for k, v in state.items()}
    written: list[str] = []
    index_path = dst / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
        for shard in sorted({weight_map[k] for k in existing if k in weight_map}):  # drop the old router
            from safetensors import safe_open

            with safe_open(str(dst / shard), framework="pt") as f:
                meta = f.metadata()
                kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(ROUTER_PREFIX)}
            _save_atomic(kept, dst / shard, meta)
            written.append(shard)
        name = "model-avg-llava-router.safetensors"
        _save_atomic(state, dst / name)
        written.append(name)
        weight_map = {k: v for k, v in weight_map.items() if not k.startswith(ROUTER_PREFIX)}
        weight_map.update(dict.fromkeys(state, name))
        index["weight_map"] = dict(sorted(weight_map.items()))
        _write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
        written.append(index_path.name)
    else:
        if len(files) != 1 or files[0].suffix != ".safetensors":
            raise ConvertError(f"{dst}: cannot merge into {[f.name for f in files]}; convert .bin weights to safetensors first")
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as f:
            meta = f.metadata()
            kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(ROUTER_PREFIX)}
        _save_atomic({**kept, **state}, files[0], meta)
        written.append(files[0].name)
    changes: dict[str, Any] = {}
    from .scaler import Ladder

    tokens = list(Ladder.parse(config.ladder, config.grid).tokens)
    try:
        current_ladder = parse_granularity(original.get("vis_token_granularity"), grid)
    except ConvertError:
        current_ladder = None
    if current_ladder != Ladder.parse(config.ladder, config.grid).spec:
        changes["vis_token_granularity"] = tokens
    if (original.get("filtered_text_num") or 32) != config.top_k:
        changes["filtered_text_num"] = config.top_k
    if original.get("router_select") is not True:
        changes["router_select"] = True
    if changes:
        _write_text_atomic(dst / "config.json", json.dumps({**original, **changes}, indent=2) + "\n")
        written.append("config.json")
    return ExportReport(str(router_path), str(dst), "merged", len(state), str(target).removeprefix("torch."),
                        written, changes)
