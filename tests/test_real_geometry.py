"""A random-weight AVG-LLaVA with the real geometry, end to end: convert, prompt, score, route, export.

The checkpoint is written in the ORIGINAL layout with AVG-LLaVA's published config.json values
(zhibinlan/AVG-LLaVA: string ``image_grid_pinpoints``, ``vis_token_granularity`` [36..576], no
``filtered_text_num``, ``mm_vision_select_layer`` -2, ``mlp2x_gelu``, ``spatial_unpad`` + ``anyres``,
pad 0, vocab 32,000), the real LLaMA-2 tokenizer, CLIP ViT-L/14-336 geometry (336 px, patch 14:
a 24x24 grid, 577 positions), the published router's module names -- only depth and widths are
cut so it runs on this CPU. It goes through ``rglf convert`` like a real download would.

Visual tokens are checked against the reference's formula, re-implemented here from LLaVA's
``llava/mm_utils.py`` (select_best_resolution, get_anyres_image_grid_shape) and AVG-LLaVA's
``llava/model/llava_arch.py`` (matryoshka pooling, non-square base grid, unpad_image with
``int()``, one ``image_newline`` per row) at DeepLearnXMU/AVG-LLaVA@60cf44ca, and against
transformers' own count at 576. With the newlines, 672x672 at 576 is 576 + 48 * 49 = 2,928
tokens (the issue's "2,880" leaves the 48 newlines out).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import reference_llava as ref
import torch
from conftest import write_fixture_tokenizer
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rglf.model.conversation import IGNORE_INDEX

pytestmark = pytest.mark.slow

AVG_CONFIG = {  # zhibinlan/AVG-LLaVA config.json (published values), sizes cut where marked
    "_name_or_path": "AVG-LLaVA", "architectures": ["LlavaLlamaForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 1, "ce_loss_weight": 0.1, "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
    "hidden_size": 64,  # 4096
    "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]",
    "initializer_range": 0.02,
    "intermediate_size": 128,  # 11008
    "margin": 1.0, "vis_token_granularity": [36, 72, 144, 288, 576], "max_position_embeddings": 4096,
    "mm_hidden_size": 32,  # 1024
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_vision_tower_lr": 0.001, "model_type": "llava_llama",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,  # 32, 32, 32
    "pad_token_id": 0, "pretraining_tp": 1, "rank_loss_weight": 1.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "router_select": True, "tie_word_embeddings": False, "tokenizer_model_max_length": 4096,
    "tokenizer_padding_side": "right",
    "torch_dtype": "float32",  # bfloat16 (the router tensors below are bf16, as published)
    "use_cache": True, "vocab_size": 32000,
}
VISION_HEADS = 2  # CLIP-L has 16 (hidden / 64); this cut-down tower has hidden 32
SIZES = {"672x672": (672, 672), "1008x336": (1008, 336), "336x1008": (336, 1008)}  # (width, height)
QA = [("human", "What is shown in this image? <image>"), ("gpt", "A red double-decker bus.")]
LEVELS = (36, 72, 144, 288, 576)


# --- the reference's visual-token formula ------------------------------------------------------------


def best_resolution(size_wh, pinpoints_wh):
    """LLaVA's select_best_resolution: most effective pixels, then least waste; (width, height)."""
    w, h = size_wh
    best, best_eff, best_waste = None, -1, math.inf
    for pw, ph in pinpoints_wh:
        scale = min(pw / w, ph / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (pw, ph), eff, waste
    return best


def reference_visual_tokens(size_wh, level_tokens, grid=24, patch_px=336):
    """AVG-LLaVA's packed length for one image at one level (spatial_unpad, anyres)."""
    pinpoints = json.loads(AVG_CONFIG["image_grid_pinpoints"])
    pw, ph = best_resolution(size_wh, pinpoints)
    cols, rows = pw // patch_px, ph // patch_px
    n = grid * grid
    if level_tokens == n // 2:  # matryoshka pooling kernels
        kh, kw = 1, 2
    elif level_tokens == n // 8:
        kh, kw = 2, 4
    else:
        kh = kw = int(np.sqrt(n / level_tokens))
    pooled = (grid // kh) * (grid // kw)
    if np.sqrt(pooled) % 1 != 0:  # the non-square base grid rule
        h = 2 * int(np.sqrt(pooled / 2))
        w = pooled // h
    else:
        h = w = int(np.sqrt(pooled))
    cur_h, cur_w = rows * h, cols * w
    ow, oh = size_wh
    if ow / oh > cur_w / cur_h:  # unpad_image
        new_h = int(oh * (cur_w / ow))
        pad = (cur_h - new_h) // 2
        cur_h -= 2 * pad
    else:
        new_w = int(ow * (cur_h / oh))
        pad = (cur_w - new_w) // 2
        cur_w -= 2 * pad
    return pooled + cur_h * (cur_w + 1)  # base crop + unpadded map with one newline per row


def test_reference_formula_counts():
    assert [reference_visual_tokens(SIZES[k], 576) for k in SIZES] == [2928, 2328, 2376]
    assert reference_visual_tokens((672, 672), 576) - 48 == 2880  # the figure, without the newlines


# --- the checkpoint ----------------------------------------------------------------------------------


def hf_to_original(state):
    from test_convert import to_original

    return to_original(state)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(original folder, converted folder, conversion report)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from rglf.model.convert import convert_checkpoint
    from rglf.model.router import GranularityRouter, RouterConfig

    root = tmp_path_factory.mktemp("avg-real")
    c = AVG_CONFIG
    vision = CLIPVisionConfig(hidden_size=c["mm_hidden_size"], intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=VISION_HEADS, image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                       num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                       num_key_value_heads=c["num_key_value_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=c["vocab_size"],
                         image_grid_pinpoints=[[h, w] for w, h in json.loads(c["image_grid_pinpoints"])],
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(hf).eval()
    with torch.no_grad():  # random weights with some spread (norms kept at 1), so levels and images score differently
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if name.startswith("lm_head") else 0.05)
    state = hf_to_original(model.state_dict())
    router = GranularityRouter(RouterConfig(hidden_size=c["hidden_size"]))
    state.update({"model.router." + k: v.detach().to(torch.bfloat16).clone() for k, v in router.state_dict().items()})
    src = root / "AVG-LLaVA"
    src.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::2]}
        save_file(part, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (src / "config.json").write_text(json.dumps(AVG_CONFIG, indent=2))
    write_fixture_tokenizer("llama-spm", src)
    dst = root / "AVG-LLaVA-hf"
    report = convert_checkpoint(src, dst, vision_config={"num_attention_heads": VISION_HEADS})
    return src, dst, report


@pytest.fixture(scope="module")
def lmm(ckpt):
    from rglf.model.lmm import FrozenLMM

    return FrozenLMM.from_pretrained(ckpt[1])


def image(size_wh, seed=0) -> Image.Image:
    w, h = size_wh
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def test_convert_reads_the_published_config(ckpt, lmm):
    src, dst, report = ckpt
    record = json.loads((dst / "rglf_checkpoint.json").read_text())
    assert record["template"] == "vicuna_v1" and "AVG-LLaVA" in record["template_source"]
    assert record["ladder"] == "6x6,12x6,12x12,24x12,24x24" and report.ladder == record["ladder"]
    router = record["router"]["config"]
    assert (router["top_k"], router["ladder"], router["grid"], router["merger_attends"]) == (
        32, "6x6,12x6,12x12,24x12,24x24", 24, "crops")  # filtered_text_num absent -> 32
    assert lmm.grid == 24 and lmm.template.name == "vicuna_v1"
    assert lmm.config.image_grid_pinpoints == [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]
    assert len(lmm.tokenizer) == 32000 and lmm.image_token_id == 32000  # outside the vocabulary, never embedded


def test_every_level_of_three_aspect_ratios_scores_with_the_reference_token_counts(lmm):
    conv = lmm.tokenize(QA, has_image=True)
    for name, size in SIZES.items():
        pixels, image_size = lmm.preprocess(image(size))
        assert image_size == (size[1], size[0])
        enc = lmm.encode([pixels], [image_size])[0]
        scores = lmm.score([(name, conv, enc)])
        assert [s.level_tokens for s in scores] == list(LEVELS)
        got = {s.level_tokens: s.n_visual_tokens for s in scores}
        assert got == {t: reference_visual_tokens(size, t) for t in LEVELS}, name
        # ▁A ▁red ▁double - de cker ▁bus . </s>
        assert all(np.isfinite(s.nll_mean) and s.answer_tokens == 9 for s in scores)
        assert len({round(s.nll_mean, 6) for s in scores}) == len(LEVELS)  # every level is a different input
    print({name: {t: reference_visual_tokens(size, t) for t in LEVELS} for name, size in SIZES.items()})


def test_576_equals_transformers_own_count_and_forward(ckpt, lmm):
    """n_visual_tokens = LlavaNextProcessor's count; nll_mean = transformers' forward(input_ids, pixel_values)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    hf = LlavaNextForConditionalGeneration.from_pretrained(ckpt[1], dtype=torch.float32).eval()
    processor = LlavaNextProcessor(image_processor=lmm.image_processor, tokenizer=copy.deepcopy(lmm.tokenizer),
                                   patch_size=14, vision_feature_select_strategy="default")
    conv = lmm.tokenize(QA, has_image=True)
    ids = list(conv.input_ids)
    assert 0 not in ids  # <unk> stands in for the out-of-vocabulary placeholder below
    for name, size in SIZES.items():
        pixels, image_size = lmm.preprocess(image(size, seed=1))
        enc = lmm.encode([pixels], [image_size])[0]
        ours = lmm.score([(name, conv, enc)], levels=[576])[0]
        assert ours.n_visual_tokens == processor._get_number_of_features(*image_size, 336, 336), name
        i = conv.image_index
        # The converted folder's placeholder id (32000) lies outside the vocabulary, like LLaVA's -200: point
        # transformers' placeholder at <unk> (0, absent from the prompt) and expand it as its processor does.
        hf.config.image_token_id = 0
        input_ids = torch.tensor([ids[:i] + [0] * ours.n_visual_tokens + ids[i + 1:]])
        labels = torch.tensor([list(conv.labels[:i]) + [IGNORE_INDEX] * ours.n_visual_tokens + list(conv.labels[i + 1:])])
        first = int((labels[0] != IGNORE_INDEX).nonzero()[0])
        keep = labels.shape[1] - first + 1
        with torch.inference_mode():
            out = hf(input_ids=input_ids, pixel_values=pixels[None], image_sizes=torch.tensor([image_size]),
                     logits_to_keep=keep)
        logits = out.logits[0, :-1].float()  # positions first-1 .. L-2 predict tokens first .. L-1
        target = labels[0, -(keep - 1):]
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="mean")
        torch.testing.assert_close(torch.tensor(ours.nll_mean), nll, rtol=1e-5, atol=1e-5)
        print(name, ours.n_visual_tokens, ours.nll_mean, float(nll), abs(ours.nll_mean - float(nll)))


def test_prompt_cli_shows_the_reference_ids(ckpt, lmm, tmp_path):
    """`rglf prompt --format json` with the real vocabulary: ids and labels = LLaVA's preprocess_v1."""
    from rglf.cli import app

    records = [
        {"id": "start", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                          {"from": "gpt", "value": "A bus."}]},
        {"id": "middle", "image": "b.png", "conversations": [
            {"from": "human", "value": "What is <image> in it?"}, {"from": "gpt", "value": "42 apples."},
            {"from": "human", "value": "Und jetzt? 这是什么？"}, {"from": "gpt", "value": "Ein Lama 🦙.\nZwei."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi there."}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "no question"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records, ensure_ascii=False))
    image(SIZES["672x672"]).save(tmp_path / "a.png")
    image(SIZES["1008x336"]).save(tmp_path / "b.png")
    runner = CliRunner()
    result = runner.invoke(app, ["prompt", str(tmp_path / "data.json"), "--model", str(ckpt[1]), "--format", "json"])
    assert result.exit_code == 3, result.output  # one record rejected
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["start", "middle", "text", "bad"] and "error" in rows[3]
    slow = ref.SlowSpm(lmm.tokenizer)
    for row, rec in zip(rows[:3], records[:3], strict=True):
        has_image = "image" in rec
        source = ref.preprocess_multimodal(rec["conversations"]) if has_image else rec["conversations"]
        want = ref.preprocess_v1(source, slow, has_image)
        assert want["mismatch"] is None
        swap = [32000 if t == ref.IMAGE_TOKEN_INDEX else t for t in want["input_ids"]]
        assert (row["input_ids"], row["labels"], row["prompt"]) == (swap, want["labels"], want["prompt"])
        assert row["template"] == "vicuna_v1"
    assert rows[0]["visual_tokens"] == {str(t): reference_visual_tokens(SIZES["672x672"], t) for t in LEVELS}
    assert rows[1]["visual_tokens"]["576"] == 2328 and rows[2]["visual_tokens"] is None
    assert rows[0]["pieces"][rows[0]["image_index"] - 4: rows[0]["image_index"] + 3] == [
        "▁US", "ER", ":", "▁", "<image>", "▁", "<0x0A>"]
    table = runner.invoke(app, ["prompt", str(tmp_path / "data.json"), "--model", str(ckpt[1]), "--limit", "1"])
    assert table.exit_code == 0, table.output
    assert "template vicuna_v1" in table.stdout and ": [▁A ▁bus . </s>]" in table.stdout
    assert "576: 2,928" in table.stdout


def test_route_accepts_the_converted_checkpoints_published_router(ckpt, lmm, tmp_path):
    from rglf.cli import app

    image(SIZES["336x1008"]).save(tmp_path / "tall.png")
    result = CliRunner().invoke(app, ["route", "--router", str(ckpt[1]), "--image", str(tmp_path / "tall.png"),
                                      "--question", "What is shown?", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["template"] == "vicuna_v1" and out["level_tokens"] in LEVELS
    assert out["visual_tokens_per_level"] == {str(t): reference_visual_tokens(SIZES["336x1008"], t) for t in LEVELS}
    prompt = lmm.prompt([("human", "<image>\nWhat is shown?")], True)
    assert lmm.instruction_ids(prompt)[0] == lmm.tokenizer.bos_token_id  # BOS kept, as get_pure_text_embedding


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def test_convert_export_convert_is_bit_identical(ckpt, tmp_path):
    """Published router -> rglf router folder -> export into the original layout -> convert: the same bytes."""
    from rglf.cli import app
    from rglf.model.convert import convert_checkpoint, load_published_router
    from rglf.model.router import save_router

    src, dst, _ = ckpt
    router = load_published_router(dst)
    save_router(tmp_path / "router", router)
    copy_src = tmp_path / "AVG-LLaVA"
    shutil.copytree(src, copy_src)
    runner = CliRunner()
    refused = runner.invoke(app, ["export-router", str(tmp_path / "router"), str(copy_src)])
    assert refused.exit_code == 2 and "already holds 19 model.router.* tensors. Pass --force" in refused.output
    done = runner.invoke(app, ["export-router", str(tmp_path / "router"), str(copy_src), "--force"])
    assert done.exit_code == 0, done.output
    assert (copy_src / "config.json").read_bytes() == (src / "config.json").read_bytes()  # nothing to change
    again = tmp_path / "again-hf"
    convert_checkpoint(copy_src, again, vision_config={"num_attention_heads": VISION_HEADS})
    files = sorted(p.name for p in dst.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:  # weights, index, router, configs, tokenizer: the same bytes
        if name not in ("convert.json", "rglf_checkpoint.json"):  # these name the source folder
            assert (dst / name).read_bytes() == (again / name).read_bytes(), name
    a, b = _tensors(dst), _tensors(again)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert a["avg_llava_router.safetensors:model.router.voter"].dtype == torch.bfloat16
    for name in ("config.json", "rglf_checkpoint.json"):
        assert json.loads((again / name).read_text()) == json.loads((dst / name).read_text())


def test_export_into_a_checkpoint_without_router_and_standalone(ckpt, tmp_path):
    from rglf.model.convert import ConvertError, export_router, load_published_router
    from rglf.model.router import GranularityRouter, RouterConfig, save_router

    src, _, _ = ckpt
    torch.manual_seed(5)
    trained = GranularityRouter(RouterConfig(hidden_size=AVG_CONFIG["hidden_size"], top_k=16, voter_init="balanced"))
    save_router(tmp_path / "trained", trained)
    plain = tmp_path / "LLaVA-1.6"  # the same weights without router and without AVG-LLaVA's keys
    shutil.copytree(src, plain)
    index = json.loads((plain / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        kept = {k: v for k, v in load_file(plain / shard).items() if not k.startswith("model.router.")}
        save_file(kept, str(plain / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.router.")}
    (plain / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((plain / "config.json").read_text())
    for key in ("vis_token_granularity", "router_select", "margin", "rank_loss_weight", "ce_loss_weight"):
        config.pop(key)
    (plain / "config.json").write_text(json.dumps(config))
    report = export_router(tmp_path / "trained", plain)
    assert report.mode == "merged" and report.dtype == "float32"
    assert report.config_changes == {"vis_token_granularity": list(LEVELS), "filtered_text_num": 16, "router_select": True}
    loaded = load_published_router(plain)
    assert loaded.config.top_k == 16
    for (k, v), w in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    alone = export_router(tmp_path / "trained", tmp_path / "standalone")
    assert alone.mode == "standalone" and (tmp_path / "standalone" / "avg_llava_router.safetensors").is_file()
    assert all(k.startswith("model.router.") for k in load_file(tmp_path / "standalone" / "avg_llava_router.safetensors"))
    again = load_published_router(tmp_path / "standalone")
    assert all(torch.equal(v, w) for v, w in zip(trained.state_dict().values(), again.state_dict().values(), strict=True))
    tokens = GranularityRouter(RouterConfig(hidden_size=AVG_CONFIG["hidden_size"], merger_attends="tokens"))
    save_router(tmp_path / "tokens", tokens)
    with pytest.raises(ConvertError, match="merger_attends 'tokens'"):
        export_router(tmp_path / "tokens", tmp_path / "x")
