"""model/convert.py on tiny synthetic checkpoints written in the ORIGINAL LLaVA / AVG-LLaVA layout.

A tiny HF model's weights are renamed to LLaVA's own module names (the map below is written
from LLaVA's ``LlavaLlamaForCausalLM``, independently of the converter), saved in shards with an
original-style ``config.json``; the converted folder must load with ``FrozenLMM.from_pretrained``
and hold exactly the source tensors, so it scores exactly like the source model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rglf.model.convert import ROUTER_FILE, ConvertError, convert_checkpoint
from rglf.model.lmm import FrozenLMM
from rglf.model.toy.tiny import build_tiny_model

# transformers 5.23 prefix -> LLaVA's original prefix (first match wins)
HF_TO_ORIGINAL = (
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
)
CONV = [("human", "<image>\nwhat colour is the circle ?"), ("gpt", "red"), ("human", "and the background ?"), ("gpt", "green")]


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        hf, orig = next((a, b) for a, b in HF_TO_ORIGINAL if key.startswith(a))
        out[orig + key[len(hf) :]] = value.detach().clone().contiguous()
    return out


def original_config(model, router: bool) -> dict:
    """config.json as LLaVA's LlavaLlamaForCausalLM writes it: Llama fields + mm_* keys (+ AVG-LLaVA's)."""
    cfg, text = model.config, model.config.text_config
    out = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "freeze_mm_mlp_adapter": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 4096,
    }
    if cfg.model_type == "llava_next":
        # LLaVA lists pinpoints as (width, height); transformers as (height, width)
        out.update(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                   image_grid_pinpoints=[[w, h] for h, w in cfg.image_grid_pinpoints])
    else:
        out.update(mm_patch_merge_type="flat", image_aspect_ratio="pad")
    if router:
        out.update(router_select=True, vis_token_granularity=[36, 72, 144, 288, 576], filtered_text_num=32)
    return out


def write_original(folder: Path, model, tokenizer, processor=None, *, shards: int = 2, router=None,
                   edit=None, config_edit=None) -> Path:
    """An original-layout folder: sharded safetensors + index, config.json, tokenizer (+ preprocessor)."""
    folder.mkdir(parents=True)
    state = to_original(model.state_dict())
    if router is not None:
        state.update(router)
    if edit is not None:
        edit(state)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = original_config(model, router is not None)
    if config_edit is not None:
        config_edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def router_state(hidden: int) -> dict[str, torch.Tensor]:
    from rglf.model.router import GranularityRouter, RouterConfig

    torch.manual_seed(0)
    router = GranularityRouter(RouterConfig(hidden_size=hidden))
    return {"model.router." + k: v.detach().clone() for k, v in router.state_dict().items()}


def image(size=(130, 70), seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def scores(lmm: FrozenLMM, pixels, image_size, levels=(36, 576)):
    enc = lmm.encode([pixels], [image_size])[0]
    return [(s.level_tokens, s.n_visual_tokens, s.answer_tokens, s.nll_sum, s.greedy_match)
            for s in lmm.score([("k", lmm.tokenize(CONV, has_image=True), enc)], levels=list(levels))]


@pytest.fixture(scope="module")
def clip_next(tiny_words):
    """A tiny LLaVA-NeXT in LLaVA's usual layout (CLIP, CLS dropped, GELU projector).

    Pinpoints (height, width) without their transpose: a converter that forgot LLaVA's (width,
    height) order would tile the test's wide image differently.
    """
    return build_tiny_model(
        tiny_words, vision="clip", linear_vision=False, seed=3, grid_pinpoints=[[96, 96], [96, 192]]
    )


@pytest.fixture(scope="module")
def vision_json(tmp_path_factory, clip_next) -> Path:
    """The one thing the weights do not tell: the tiny CLIP's head count (a CLIPConfig-style file)."""
    path = tmp_path_factory.mktemp("vision") / "clip_config.json"
    heads = clip_next[0].config.vision_config.num_attention_heads
    path.write_text(json.dumps({"model_type": "clip", "vision_config": {"num_attention_heads": heads}}))
    return path


def test_avg_llava_checkpoint_converts_to_identical_weights_and_scores(clip_next, vision_json, tmp_path):
    model, tok, processor = clip_next
    router = router_state(model.config.text_config.hidden_size)
    src = write_original(tmp_path / "avg-llava", model, tok, processor, shards=2, router=router)
    dst = tmp_path / "out" / "avg-llava-hf"
    report = convert_checkpoint(src, dst, vision_config=vision_json)

    assert sorted(p.name for p in dst.parent.iterdir()) == ["avg-llava-hf"]  # no temp folders left
    assert (report.model_type, report.router_tensors, report.image_token_id) == ("llava_next", len(router), 4)
    converted = FrozenLMM.from_pretrained(dst)
    cfg = converted.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (-1, "default", "gelu")
    assert cfg.image_grid_pinpoints == model.config.image_grid_pinpoints
    derived, given = cfg.vision_config.to_dict(), model.config.vision_config.to_dict()
    assert {k: v for k, v in derived.items() if k != "dtype"} == {k: v for k, v in given.items() if k != "dtype"}
    source_state, converted_state = model.state_dict(), converted.model.state_dict()
    assert sorted(source_state) == sorted(converted_state)
    for key, value in source_state.items():
        assert torch.equal(value, converted_state[key]), key

    source = FrozenLMM(model, tok, processor)
    pixels, image_size = source.preprocess(image())
    assert torch.equal(converted.preprocess(image())[0], pixels)  # preprocessor settings carried over
    assert scores(converted, pixels, image_size) == scores(source, pixels, image_size)

    saved_router = load_file(dst / ROUTER_FILE)
    assert sorted(saved_router) == sorted(router)
    assert all(torch.equal(saved_router[k], router[k]) for k in router)
    from rglf.model.router import GranularityRouter, RouterConfig, convert_avg_llava_router_state_dict

    GranularityRouter(RouterConfig(hidden_size=cfg.text_config.hidden_size)).load_state_dict(
        convert_avg_llava_router_state_dict(saved_router), strict=True
    )
    manifest = json.loads((dst / "convert.json").read_text())
    assert manifest["avg_llava"]["vis_token_granularity"] == [36, 72, 144, 288, 576]
    assert json.loads((dst / "llava_original_config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_single_crop_llava_with_out_of_vocabulary_image_token(tiny_words, tmp_path):
    """LLaVA-1.5 layout (flat), no preprocessor in SRC, image placeholder outside the vocabulary."""
    model, tok, processor = build_tiny_model(tiny_words, vision="clip", linear_vision=False, next=False, seed=4)
    src = write_original(tmp_path / "llava15", model, tok, shards=1)
    vocab = model.config.text_config.vocab_size
    heads = {"num_attention_heads": model.config.vision_config.num_attention_heads}
    report = convert_checkpoint(src, tmp_path / "hf", vision_config=heads, image_token_id=vocab)
    assert (report.model_type, report.image_token_id, report.router_tensors) == ("llava", vocab, 0)
    converted = FrozenLMM.from_pretrained(tmp_path / "hf")
    from transformers.utils.constants import OPENAI_CLIP_MEAN

    assert list(converted.image_processor.image_mean) == pytest.approx(OPENAI_CLIP_MEAN)  # CLIP's default
    assert converted.embed.weight.shape[0] == vocab  # weights untouched: no row added for <image>
    source = FrozenLMM(model, tok, processor)
    pixels, image_size = source.preprocess(image())
    assert scores(converted, pixels, image_size, levels=(144, 576)) == scores(source, pixels, image_size, levels=(144, 576))


def _drop_and_add(state):
    del state["model.norm.weight"]
    del state["model.mm_projector.2.bias"]
    state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    state["model.vision_resampler.query"] = torch.zeros(2)
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]


def test_missing_and_unexpected_keys_are_listed(clip_next, vision_json, tmp_path):
    src = write_original(tmp_path / "bad", *clip_next, edit=_drop_and_add)
    dst = tmp_path / "out" / "bad-hf"
    with pytest.raises(ConvertError) as err:
        convert_checkpoint(src, dst, vision_config=vision_json)
    message = str(err.value)
    for name in ("model.language_model.norm.weight", "model.multi_modal_projector.linear_2.bias",
                 "model.mm_projector.4.weight", "model.vision_resampler.query"):
        assert name in message
    assert "position_ids" not in message  # an old buffer: dropped, not an error
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def _shrink_embedding(state):
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1]


@pytest.mark.parametrize(
    ("edit", "config_edit", "vision", "message"),
    [
        (_shrink_embedding, None, None, r"shape mismatch 1: .*model.embed_tokens.weight"),
        (None, lambda c: c.update(mm_projector_type="linear"), None, "mm_projector_type 'linear' is not supported"),
        (None, lambda c: c.update(mm_patch_merge_type="spatial"), None, "'spatial' with image_aspect_ratio 'anyres'"),
        (None, lambda c: c.update(mm_hidden_size=1024), None, "mm_hidden_size 1024 != vision tower width 64"),
        (None, None, {"hidden_size": 32, "num_attention_heads": 2}, "contradicts the weights .*hidden_size=32 vs 64"),
        (lambda s: [s.pop(k) for k in list(s) if "vision_tower" in k], None, None, "no CLIP vision tower weights"),
    ],
    ids=["shape", "projector", "merge-type", "mm-hidden", "vision-config", "no-vision-tower"],
)
def test_unconvertible_checkpoints_raise_clear_errors(clip_next, tmp_path, edit, config_edit, vision, message):
    src = write_original(tmp_path / "src", *clip_next, shards=1, edit=edit, config_edit=config_edit)
    with pytest.raises(ConvertError, match=message):
        convert_checkpoint(src, tmp_path / "dst", vision_config=vision)
    assert not (tmp_path / "dst").exists()


def test_hf_folder_and_existing_destination_are_refused(tiny_ckpt, clip_next, vision_json, tmp_path):
    with pytest.raises(ConvertError, match="already in the HF layout"):
        convert_checkpoint(tiny_ckpt, tmp_path / "x")
    src = write_original(tmp_path / "src", *clip_next, shards=1)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(ConvertError, match="already exists"):
        convert_checkpoint(src, dst, vision_config=vision_json)
    convert_checkpoint(src, dst, vision_config=vision_json, force=True)
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_cli_convert(clip_next, vision_json, tmp_path):
    from rglf.cli import app

    model, tok, processor = clip_next
    src = write_original(tmp_path / "src", copy.deepcopy(model), tok, processor, shards=1)
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "dst"), "--vision-config", str(vision_json)])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and (tmp_path / "dst" / "config.json").exists()
    again = runner.invoke(app, ["convert", str(src), str(tmp_path / "dst")])
    assert again.exit_code == 2 and "already exists" in again.output


# --- every config form the reference writes, and nothing else ------------------------------------------


def _as_string_pinpoints(config):
    config["image_grid_pinpoints"] = json.dumps(config["image_grid_pinpoints"])  # AVG-LLaVA's train.py default form


def test_string_pinpoints_and_granularity_forms_convert_alike(clip_next, vision_json, tmp_path):
    """The issue's crash: AVG-LLaVA writes image_grid_pinpoints as a string ("[[336, 672], ...]")."""
    model, tok, processor = clip_next
    router = router_state(model.config.text_config.hidden_size)
    listed = convert_checkpoint(write_original(tmp_path / "list", model, tok, processor, router=router),
                                tmp_path / "list-hf", vision_config=vision_json)
    src = write_original(tmp_path / "str", model, tok, processor, router=router, config_edit=lambda c: (
        _as_string_pinpoints(c), c.update(vis_token_granularity="36,72,144,288,576"), c.pop("filtered_text_num")))
    stringed = convert_checkpoint(src, tmp_path / "str-hf", vision_config=vision_json)
    a, b = (json.loads((tmp_path / f"{n}-hf" / "config.json").read_text()) for n in ("list", "str"))
    assert a["image_grid_pinpoints"] == b["image_grid_pinpoints"] == model.config.image_grid_pinpoints
    assert listed.ladder == stringed.ladder == "6x6,12x6,12x12,24x12,24x24"
    ra, rb = (json.loads((tmp_path / f"{n}-hf" / "rglf_checkpoint.json").read_text()) for n in ("list", "str"))
    assert ra["router"] == rb["router"] and ra["router"]["config"]["top_k"] == 32  # absent filtered_text_num -> 32
    assert ra["template"] == "vicuna_v1"


@pytest.mark.parametrize(
    ("config_edit", "router", "message"),
    [
        (lambda c: c.update(image_grid_pinpoints="anyres_max_9"), False,
         r"^config.json: image_grid_pinpoints 'anyres_max_9' is not a list of \[width, height\] pairs"),
        (lambda c: c.update(image_grid_pinpoints=[[96, 96, 1]]), False, r"^config.json: image_grid_pinpoints \[\[96, 96, 1\]\]"),
        (lambda c: c.update(vis_token_granularity=[576, 36]), True, r"^config.json: vis_token_granularity \[576, 36\] must be ascending"),
        (lambda c: c.update(vis_token_granularity="a,b"), True, r"^config.json: vis_token_granularity 'a,b' is not a list"),
        (lambda c: c.update(vis_token_granularity=[36, 72, 144, 288, 1000]), True, r"^config.json: vis_token_granularity .*1000"),
        (lambda c: c.pop("vis_token_granularity"), True, r"^config.json: vis_token_granularity is missing but the weights hold"),
        (lambda c: c.update(filtered_text_num="32"), True, r"^config.json: filtered_text_num '32' must be of type int"),
        (lambda c: c.update(filtered_text_num=16), True, r"model.router.voter \(1148, 1\) != \(1132, 1\)"),
        (lambda c: c.update(router_select="yes"), True, r"^config.json: router_select 'yes' must be of type bool"),
        (lambda c: c.update(version="vicuna_v7"), False, r"^config.json: version: unknown template 'vicuna_v7'"),
    ],
    ids=["pinpoints-keyword", "pinpoints-triple", "granularity-order", "granularity-text", "granularity-level",
         "granularity-missing", "text-num-type", "text-num-shape", "router-select", "version"],
)
def test_unknown_config_forms_are_one_line_errors_naming_the_key(clip_next, vision_json, tmp_path, config_edit,
                                                                 router, message):
    model, tok, processor = clip_next
    state = router_state(model.config.text_config.hidden_size) if router else None
    src = write_original(tmp_path / "src", model, tok, processor, shards=1, router=state, config_edit=config_edit)
    with pytest.raises(ConvertError, match=message) as err:
        convert_checkpoint(src, tmp_path / "dst", vision_config=vision_json)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("config_edit", "expected"),
    [(None, "vicuna_v1"), (lambda c: c.update(model_type="llava_mistral"), "mistral_instruct"),
     (lambda c: c.update(version="v1"), "vicuna_v1"), (lambda c: c.update(version="qwen_1_5"), "qwen")],
)
def test_convert_records_the_template(clip_next, vision_json, tmp_path, config_edit, expected):
    model, tok, processor = clip_next
    src = write_original(tmp_path / "src", model, tok, processor, shards=1, config_edit=config_edit)
    report = convert_checkpoint(src, tmp_path / "dst", vision_config=vision_json)
    assert report.template == expected
    assert json.loads((tmp_path / "dst" / "rglf_checkpoint.json").read_text())["template"] == expected
    assert FrozenLMM.from_pretrained(tmp_path / "dst").template.name == expected
    given = convert_checkpoint(src, tmp_path / "given", vision_config=vision_json, template="llava_v1")
    assert given.template == "llava_v1"


def test_cli_convert_errors_are_one_line(clip_next, vision_json, tmp_path):
    from rglf.cli import app

    model, tok, processor = clip_next
    src = write_original(tmp_path / "src", model, tok, processor, shards=1,
                         config_edit=lambda c: c.update(image_grid_pinpoints="(1x1),...,(6x6)"))
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "dst"), "--vision-config", str(vision_json)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config.json: image_grid_pinpoints '(1x1),...,(6x6)'")
