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
    model.router.*  (AVG-LLaVA)                   -> DST/avg_llava_router.safetensors, names untouched
                                                     (load with model.router.convert_avg_llava_router_state_dict)

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
                                           reads (width, height), transformers' reads (height, width); order kept)
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

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

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

    def summary(self) -> str:
        router = f", {self.router_tensors} router tensors -> {ROUTER_FILE}" if self.router_tensors else ""
        return (
            f"converted {self.src} -> {self.dst}: {self.model_type}, {self.tensors} tensors ({self.dtype}){router}; "
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
        if not orig.get("image_grid_pinpoints"):
            raise ConvertError("image_aspect_ratio 'anyres' needs image_grid_pinpoints in the config")
        pinpoints = [[int(h), int(w)] for w, h in orig["image_grid_pinpoints"]]  # LLaVA (w, h) -> HF (h, w)
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
    overwrite: bool = False,
) -> ConvertReport:
    """Convert an original LLaVA / AVG-LLaVA folder ``src`` into a new HF-format folder ``dst``."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    orig = read_original_config(src)
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

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        router: dict[str, torch.Tensor] = {}
        shard_names = (
            ["model.safetensors"] if len(files) == 1
            else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        )
        for path, name in zip(files, shard_names, strict=True):
            tensors = load_weights(path)
            shard = {mapping[k]: t.contiguous() for k, t in tensors.items() if k in mapping}
            router.update({k: t.contiguous() for k, t in tensors.items() if k.startswith(ROUTER_PREFIX)})
            del tensors
            if shard:
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        if len(set(weight_map.values())) > 1:
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
        )
        (tmp / "convert.json").write_text(json.dumps(asdict(report), indent=2))

        old = None
        if dst.exists():  # overwrite: move the old folder aside first so dst is never half-written
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
