"""``rglf score`` (pipeline/score.py, images.py, writer.py): image conversion, commit protocol, end to end on Ray."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rglf.cli import app
from rglf.model.lmm import FrozenLMM, RouterSide
from rglf.model.scaler import Ladder
from rglf.model.tables import ERRORS_SCHEMA, FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA
from rglf.model.toy.task import TOY_VOCABULARY, ToyDatasetConfig, write_dataset
from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint
from rglf.pipeline import images
from rglf.pipeline.score import ScoreConfig, ScoreRefused, prepare_output
from rglf.pipeline.writer import RunIndex, batch_key, dedupe, part_path, scan_output, write_batch

BG = (128, 128, 128)
MAX_POSITIONS = 1024  # small context, so a long answer is "too long" without a huge file


# --------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint (12x12 crop grid: cheap on CPU) and a local Ray instance
# --------------------------------------------------------------------------------------


def make_checkpoint(path: Path) -> Path:
    """A tiny random LLaVA-NeXT: 48 px crops, patch 4 -> 12x12 grid, ladder 9,18,36,72,144."""
    return save_tiny_checkpoint(path, *build_tiny_model(TOY_VOCABULARY, image_size=48, max_positions=MAX_POSITIONS))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray instance for the module (short temp dir: unix socket paths are limited)."""
    import ray

    temp = tempfile.mkdtemp(prefix="/tmp/rglf-ray-")
    try:
        ray.init(num_cpus=2, object_store_memory=300 * 2**20, _temp_dir=temp, include_dashboard=False)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Images: conversion to 8-bit RGB and rejection of bad files
# --------------------------------------------------------------------------------------


def test_sixteen_bit_and_grey_modes_are_scaled_not_clipped():
    raw = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)  # 32896 = 128 * 257
    img16 = Image.fromarray(raw)
    assert img16.mode == "I;16"
    assert np.asarray(images.to_rgb(img16))[0, :, 0].tolist() == [0, 128, 255, 1]
    img32 = Image.fromarray(np.array([[0, 32896, 65535, 70000, -5]], dtype=np.int32))
    assert img32.mode == "I"
    assert np.asarray(images.to_rgb(img32))[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    grey = images.to_rgb(Image.new("L", (2, 2), 77))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]


def test_alpha_and_palette_modes_are_composited_on_the_neutral_background():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)  # transparent -> background
    rgba[0, 1] = (200, 100, 50, 255)  # opaque -> itself
    rgba[0, 2] = (255, 255, 255, 128)  # half -> in between
    out = np.asarray(images.to_rgb(Image.fromarray(rgba, "RGBA"), BG))
    assert out[0, 0].tolist() == list(BG) and out[0, 1].tolist() == [200, 100, 50]
    assert all(128 < v < 255 for v in out[0, 2])
    la = Image.fromarray(np.array([[[200, 0], [200, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(images.to_rgb(la, BG)).tolist() == [[list(BG), [200, 200, 200]]]
    pa_img = la.convert("RGBA").convert("PA")
    assert np.asarray(images.to_rgb(pa_img, BG)).tolist() == [[list(BG), [200, 200, 200]]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(images.to_rgb(pal)).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    pal.info["transparency"] = 0
    assert np.asarray(images.to_rgb(pal, BG)).tolist() == [[list(BG), [40, 50, 60]]]


def test_bad_image_files_are_rejected_with_a_named_reason(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really" + bytes(range(200)))
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (420, 20)).save(tmp_path / "wide.png")
    Image.new("RGB", (60, 6)).save(tmp_path / "thin.png")
    Image.fromarray(np.ones((16, 16), dtype=np.float32), "F").save(tmp_path / "float.tif")
    expected = {
        "missing.png": ("missing_file", "not found"),
        "empty.png": ("empty_file", "0 bytes"),
        "truncated.png": ("truncated_image", "truncated"),
        "corrupt.png": ("corrupt_image", "not a recognised image"),
        "wide.png": ("extreme_aspect", "21.0:1 exceeds the limit of 20:1"),
        "thin.png": ("too_small", "shorter than the minimum of 10 px"),
        "float.tif": ("unsupported_mode", "mode F"),
    }
    for name, (code, words) in expected.items():
        with pytest.raises(images.ImageRejected) as info:
            images.load_rgb(tmp_path / name, max_aspect=20, min_side=10)  # explicit limits (off by default)
        assert info.value.code == code and words in info.value.reason, (name, info.value.reason)
    assert images.load_rgb(good).size == (64, 48)
    # the defaults reject only what cannot be scored: elongated and tiny images are fine
    assert images.load_rgb(tmp_path / "wide.png").size == (420, 20)
    assert images.load_rgb(tmp_path / "thin.png").size == (60, 6)


def test_image_stage_crops_equal_frozen_lmm_preprocess(ckpt):
    lmm = FrozenLMM.from_pretrained(ckpt)
    processor, is_next = images.image_processor(str(ckpt))
    assert is_next and images.neutral_background(processor) == BG
    rng = np.random.default_rng(0)
    for w, h in ((96, 96), (192, 96), (50, 130)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels, size = images.preprocess(processor, is_next, img)
        ref, ref_size = lmm.preprocess(img)
        assert size == ref_size
        np.testing.assert_array_equal(pixels, ref.numpy())


# --------------------------------------------------------------------------------------
# Config, provenance and the commit protocol (no Ray)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "cuda"}, "gpus_per_worker > 0"),
        ({"gpus_per_worker": 1.0}, "never used"),
        ({"batch_size": 0}, "batch_size"),
        ({"workers": 1.5}, "workers"),
        ({"max_aspect": 0.5}, "max_aspect"),
        ({"placement_timeout": -1}, "placement_timeout"),
    ],
)
def test_score_config_rejects_bad_values(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        ScoreConfig(run_dir=tmp_path, model=tmp_path, **kwargs)


def _feedback(ids, levels=(9, 36)) -> pa.Table:
    rows = [
        {"sample_id": s, "source": "t", "split": None, "level_tokens": t, "level_grid": "3x3", "n_crops": 2,
         "n_visual_tokens": 20, "answer_tokens": 2, "nll_sum": 1.0, "nll_mean": 0.5, "greedy_match": False,
         "model_id": "m"}
        for s in ids for t in levels
    ]
    return pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)


def _errors(ids) -> pa.Table:
    rows = [{"sample_id": s, "stage": "load_image", "reason": "x", "source": "t", "detail": None, "code": "c"} for s in ids]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def test_commit_protocol_leftovers_are_removed_and_duplicates_compacted(tmp_path):
    assert batch_key(["b", "a"]) == batch_key(["a", "b"]) != batch_key(["a", "c"])
    empty_router = ROUTER_INPUTS_SCHEMA.empty_table()
    write_batch(tmp_path, batch_key(["a", "b"]), _feedback(["a"]), empty_router, _errors(["b"]))
    # a batch killed before its feedback part: its errors part is an orphan
    orphan = part_path(tmp_path, "errors", batch_key(["c"]))
    pq.write_table(_errors(["c"]), orphan)
    tmp = tmp_path / "feedback" / ".part-x.parquet.1234.tmp"
    tmp.write_bytes(b"half")
    state = scan_output(tmp_path)
    assert sorted(state.removed) == sorted([str(orphan), str(tmp)]) and not orphan.exists()
    assert state.rejected == {"b"} and state.feedback_keys.num_rows == 2

    # the same sample committed by two different batches: the first part by name wins
    write_batch(tmp_path, batch_key(["a", "d"]), _feedback(["a", "d"]), empty_router, ERRORS_SCHEMA.empty_table())
    assert dedupe(tmp_path) == 2
    keys = scan_output(tmp_path).feedback_keys
    assert sorted(zip(keys["sample_id"].to_pylist(), keys["level_tokens"].to_pylist(), strict=True)) == [
        ("a", 9), ("a", 36), ("d", 9), ("d", 36)
    ]
    assert dedupe(tmp_path) == 0


def test_a_batch_committed_without_its_router_inputs_is_uncommitted(tmp_path):
    write_batch(tmp_path, "k1", _feedback(["a"]), ROUTER_INPUTS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table())
    index = RunIndex.load(tmp_path)
    assert index.check_router_inputs() == ["k1"]
    assert not part_path(tmp_path, "feedback", "k1").exists()  # "a" is pending again
    assert RunIndex.load(tmp_path).check_router_inputs() == []
    assert index.done([9, 36])[0].to_pylist() == []


def test_changed_model_or_ladder_is_refused_and_force_moves_outputs_aside(tmp_path):
    ladder = Ladder.parse("9,36", 12)
    (tmp_path / "run.json").write_text(json.dumps({"model_id": "m@1", "ladder": {"spec": ladder.spec}}))
    write_batch(tmp_path, "k", _feedback(["a"]), ROUTER_INPUTS_SCHEMA.empty_table(), _errors(["b"]))
    (tmp_path / "errors" / "ingest-00000.parquet").write_bytes(b"ingest errors stay")
    cfg = ScoreConfig(run_dir=tmp_path, model=tmp_path)
    assert prepare_output(cfg, "m@1", ladder, print)["model_id"] == "m@1"  # same: resume
    with pytest.raises(ScoreRefused, match="model m@1 -> m@2"):
        prepare_output(cfg, "m@2", ladder, print)
    with pytest.raises(ScoreRefused, match="ladder"):
        prepare_output(cfg, "m@1", Ladder.parse("9,36,144", 12), print)
    forced = ScoreConfig(run_dir=tmp_path, model=tmp_path, force=True)
    assert prepare_output(forced, "m@2", ladder, print) is None
    (aside,) = tmp_path.glob(".replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["errors", "feedback", "run.json"]  # no index was written
    assert not (tmp_path / "feedback").exists() and not (tmp_path / "run.json").exists()
    assert [p.name for p in (tmp_path / "errors").iterdir()] == ["ingest-00000.parquet"]


def test_changed_template_is_refused_like_a_changed_model(tmp_path):
    ladder = Ladder.parse("9,36", 12)
    record = {"model_id": "m@1", "ladder": {"spec": ladder.spec}, "template": {"name": "vicuna_v1", "source": "x"}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    cfg = ScoreConfig(run_dir=tmp_path, model=tmp_path, template="v1")
    assert cfg.template == "vicuna_v1"  # aliases resolve to the canonical name
    assert prepare_output(cfg, "m@1", ladder, print, "vicuna_v1")["model_id"] == "m@1"
    with pytest.raises(ScoreRefused, match="template vicuna_v1 -> llava_v1"):
        prepare_output(cfg, "m@1", ladder, print, "llava_v1")
    (tmp_path / "run.json").write_text(json.dumps({"model_id": "m@1", "ladder": {"spec": ladder.spec}}))
    with pytest.raises(ScoreRefused, match="template unrecorded .* -> vicuna_v1"):
        prepare_output(cfg, "m@1", ladder, print, "vicuna_v1")  # scored before templates were recorded
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        ScoreConfig(run_dir=tmp_path, model=tmp_path, template="vicuna")


# --------------------------------------------------------------------------------------
# End to end: ingest -> score on a local Ray instance, against FrozenLMM run directly
# --------------------------------------------------------------------------------------


def _conv(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def build_dataset(root: Path) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    """Toy samples + special-mode images (valid) + planted bad inputs.

    Returns (input files, {score-time rejected id: code}, {ingest rejected id or '': code}).
    """
    data = root / "data"
    write_dataset(data, ToyDatasetConfig(n_samples=6, seed=1, aspect_probs=(0.4, 0.3, 0.3)))
    toy_image = json.loads((data / "train.json").read_text())[0]["image"]
    special = data / "special"
    special.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (64, 64), dtype=np.uint16)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(special / "p.png")
    p_alpha = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    p_alpha.save(special / "p_alpha.png", transparency=0)
    alpha = rng.integers(0, 256, (64, 80, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(special / "rgba.png")
    Image.fromarray(np.concatenate([rgb[..., :1], alpha], axis=2), "LA").save(special / "la.png")
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").convert("PA").save(special / "pa.tif")
    Image.fromarray(rgb[..., 0]).save(special / "l.png")
    Image.fromarray(grey16.astype(np.int32)).save(special / "i.tif")
    Image.fromarray(grey16).save(special / "i16.png")
    assert Image.open(special / "i16.png").mode == "I;16" and Image.open(special / "pa.tif").mode == "PA"
    good = special / "good.png"
    Image.fromarray(rgb).save(good)
    (special / "truncated.png").write_bytes(good.read_bytes()[:300])
    (special / "corrupt.png").write_bytes(bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    (special / "empty.png").write_bytes(b"")
    Image.new("RGB", (2000, 40), (9, 9, 9)).save(special / "wide.png")  # 50:1, scored (issue 13, case 7)
    Image.new("RGB", (60, 6), (9, 9, 9)).save(special / "thin.png")
    # references leaving the image root (issue 13, case 3): never opened, whatever they point at
    outside = root / "outside.png"
    Image.fromarray(rgb).save(outside)
    (special / "link-out.png").symlink_to(outside)
    (special / "link-in.png").symlink_to(good)  # a symlink that stays inside the root is fine

    q = "<image>\nWhat colour is the background?"
    records = [
        {"id": f"mode-{name.split('.')[0]}", "image": f"special/{name}", "conversations": _conv(q, "red")}
        for name in ("p.png", "p_alpha.png", "rgba.png", "la.png", "pa.tif", "l.png", "i.tif", "i16.png",
                     "wide.png", "thin.png", "link-in.png")
    ]
    records += [
        {"id": "text-only", "conversations": _conv("Is the square plain?", "yes")},
        {"id": "multi-turn", "image": toy_image,
         "conversations": _conv("What colour is <image> the big block?", "red", "Is it horizontal?", "no")},
    ]
    rejected = {
        "bad-missing": ("special/missing.png", "missing_file"),
        "bad-truncated": ("special/truncated.png", "truncated_image"),
        "bad-corrupt": ("special/corrupt.png", "corrupt_image"),
        "bad-empty": ("special/empty.png", "empty_file"),
        "bad-absolute": (str(outside), "outside_root"),
        "bad-dotdot": ("special/../../outside.png", "outside_root"),
        "bad-symlink": ("special/link-out.png", "outside_root"),
    }
    records += [{"id": sid, "image": image, "conversations": _conv(q, "red")} for sid, (image, _) in rejected.items()]
    records.append({"id": "bad-too-long", "image": toy_image, "conversations": _conv(q, " ".join(["red"] * 1100))})
    score_rejected = {sid: code for sid, (_, code) in rejected.items()} | {"bad-too-long": "too_long"}
    records += [
        {"image": toy_image, "conversations": _conv(q, "red")},  # missing id
        {"id": "mode-p", "image": toy_image, "conversations": _conv(q, "blue")},  # duplicate id
        {"id": "bad-empty-answer", "image": toy_image, "conversations": _conv(q, "")},
    ]
    ingest_rejected = {"": "missing_id", "mode-p": "duplicate_id", "bad-empty-answer": "empty_answer"}
    extra = data / "extra.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in records))
    inputs = [data / f"{s}.json" for s in ("train", "val", "test")] + [extra]
    return inputs, score_rejected, ingest_rejected


def direct_scores(lmm: FrozenLMM, samples: list[dict]):
    """FrozenLMM run directly on the samples (the reference), plus each sample's encoding and conversation."""
    items, encodings = [], {}
    for s in samples:
        turns = [(t["role"], t["text"]) for t in s["turns"]]
        conv = lmm.tokenize(turns, has_image=s["image"] is not None)
        enc = None
        if s["image"] is not None:
            rgb = images.load_rgb(Path(s["image_root"]) / s["image"], background=BG)
            pixels, size = lmm.preprocess(rgb)
            enc = lmm.encode([pixels], [size])[0]
            encodings[s["sample_id"]] = (enc, conv)
        items.append((s["sample_id"], conv, enc))
    scores = {(r.key, r.level_tokens): r for r in lmm.score(items)}
    return scores, encodings


@pytest.mark.slow
def test_ingest_then_score_end_to_end(tmp_path, ckpt, ray_local):
    inputs, score_rejected, ingest_rejected = build_dataset(tmp_path)
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["ingest", *map(str, inputs), "--image-root", str(tmp_path / "data"), "--run", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output  # some records were rejected
    result = runner.invoke(app, ["score", "--run", str(run), "--model", str(ckpt), "--batch-size", "4"])
    assert result.exit_code == 3, result.output  # some inputs were rejected
    assert "8 rejected" in result.output and "MB/sample" in result.output

    samples = pq.read_table(run / "samples").to_pylist()
    valid = [s for s in samples if s["sample_id"] not in score_rejected]
    assert len(valid) == 6 + 11 + 2
    lmm = FrozenLMM.from_pretrained(ckpt)
    levels = lmm.ladder.tokens

    # exactly one feedback row per (valid sample, level), nothing for rejected ones
    feedback = pq.read_table(run / "feedback", schema=FEEDBACK_SCHEMA).to_pylist()
    keys = [(r["sample_id"], r["level_tokens"]) for r in feedback]
    assert len(keys) == len(set(keys)) == len(valid) * len(levels)
    assert set(keys) == {(s["sample_id"], t) for s in valid for t in levels}

    # errors: every planted bad input, with its code and a reason naming the input
    errors = pq.read_table(run / "errors").to_pylist()
    at_score = {e["sample_id"]: e for e in errors if e["stage"] != "ingest"}
    assert {sid: e["code"] for sid, e in at_score.items()} == score_rejected
    for sid, e in at_score.items():
        image = next(s["image"] for s in samples if s["sample_id"] == sid)
        assert e["reason"].startswith(f"{image}: "), e["reason"]  # names the input
        if e["code"] == "outside_root":
            assert "outside the image root" in e["reason"] and "not opened" in e["reason"]
    assert "exceed the model's context of 1024" in at_score["bad-too-long"]["reason"]
    at_ingest = {e["sample_id"] or "": e["code"] for e in errors if e["stage"] == "ingest"}
    assert at_ingest == ingest_rejected

    # values equal FrozenLMM.score run directly on the same samples
    reference, encodings = direct_scores(lmm, valid)
    assert set(reference) == set(keys)
    for r in feedback:
        ref = reference[(r["sample_id"], r["level_tokens"])]
        assert r["nll_mean"] == pytest.approx(ref.nll_mean, abs=1e-5)
        assert r["nll_sum"] == pytest.approx(ref.nll_sum, abs=1e-5 * max(1, ref.answer_tokens))
        assert (r["answer_tokens"], r["n_visual_tokens"], r["n_crops"], r["greedy_match"], r["level_grid"]) == (
            ref.answer_tokens, ref.n_visual_tokens, ref.n_crops, ref.greedy_match, ref.level_grid
        )
        assert r["model_id"] == lmm.model_id
    text_only = [r for r in feedback if r["sample_id"] == "text-only"]
    assert {r["n_visual_tokens"] for r in text_only} == {0} and len({r["nll_mean"] for r in text_only}) == 1

    # router inputs: one row per scored image sample; features = lmm.encode(...).vision in fp16
    router = pq.read_table(run / "router_inputs", schema=ROUTER_INPUTS_SCHEMA).to_pylist()
    assert sorted(r["sample_id"] for r in router) == sorted(encodings)
    for r in router:
        enc, conv = encodings[r["sample_id"]]
        shape = (r["n_crops"], r["grid"] ** 2, r["vision_hidden"])
        assert shape == tuple(enc.vision.shape)
        decoded = torch.from_numpy(np.frombuffer(r["vision_features"], dtype="<f2").reshape(shape).astype(np.float32))
        torch.testing.assert_close(decoded, enc.vision.float(), atol=2e-3, rtol=2e-3)
        assert r["instruction_ids"] == lmm.instruction_ids(conv)
        assert tuple(r["image_size"]) == enc.image_size
        assert len(r["vision_features"]) == r["n_crops"] * r["grid"] ** 2 * r["vision_hidden"] * 2

    # router_side, written once by an actor, and the resolved run.json
    side = RouterSide.load(run / "router_side")
    torch.testing.assert_close(side.embed_tokens.weight, lmm.embed.weight.float())
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["model_id"] == lmm.model_id
    assert record["template"] == {"name": "vicuna_v1", "source": "default (no template recorded in the checkpoint)"}
    refused = runner.invoke(app, ["score", "--run", str(run), "--model", str(ckpt), "--template", "llava_v1"])
    assert refused.exit_code == 2 and "template vicuna_v1 -> llava_v1" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert record["ladder"]["tokens"] == list(levels) and record["config"]["batch_size"] == 4
    assert record["counts"]["feedback_rows"] == len(feedback) and record["counts"]["rejected_samples"] == 8
    assert record["counts"]["ingest_rejected"] == 3 and record["exit_code"] == 3
    assert record["router_inputs"]["bytes_per_sample_mean"] > 0


def test_index_rows_read_in_bulk_equal_those_read_part_by_part(tmp_path):
    from rglf.pipeline.writer import _part_keys, _read_part, _read_parts

    router = pa.Table.from_pylist(
        [{"sample_id": s, "n_crops": 2, "grid": 3, "vision_hidden": 4, "vision_features": b"\0" * 144,
          "instruction_ids": [1, 2], "image_size": [9, 9]} for s in ("a0", "a1")], schema=ROUTER_INPUTS_SCHEMA)
    for k in range(6):
        ids = [f"{chr(97 + k)}{i}" for i in range(3)]
        write_batch(tmp_path, f"k{k}", _feedback(ids[:2]), router if k == 0 else ROUTER_INPUTS_SCHEMA.empty_table(),
                    _errors(ids[2:]) if k % 2 else ERRORS_SCHEMA.empty_table())
    write_batch(tmp_path, "k9", _feedback([]), ROUTER_INPUTS_SCHEMA.empty_table(), _errors(["z"]))  # all rejected
    listing = _part_keys(tmp_path, "feedback", with_stat=True)

    def canonical(t: pa.Table) -> list[dict]:
        return sorted(({**r, "levels": sorted(r["levels"])} for r in t.to_pylist()), key=lambda r: (r["part"], r["sample_id"]))

    one_by_one = pa.concat_tables([_read_part(tmp_path, k, listing[k]) for k in sorted(listing)])
    assert canonical(_read_parts(tmp_path, sorted(listing), listing)) == canonical(one_by_one)
    rows = {(r["part"], r["sample_id"]): r for r in one_by_one.to_pylist()}
    assert rows[("k0", "a0")]["router_bytes"] == 2 * 9 * 4 * 2 + 8 and rows[("k1", "b2")]["code"] == "c"
    assert rows[("k9", "z")]["levels"] == [] and rows[("k9", "z")]["n_crops"] is None
