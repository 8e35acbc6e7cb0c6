"""``rglf score --router-inputs fp16|fp8|pixels|none``: the codecs, the frozen vision side, the scorer's write path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rglf.model.lmm import FrozenLMM
from rglf.model.router_inputs import (
    VISION_DIR,
    RouterInputsError,
    VisionSide,
    decode_vision,
    encode_row,
    fp8_decode,
    fp8_encode,
    row_nbytes,
)
from rglf.model.tables import ROUTER_INPUTS_SCHEMA, SAMPLES_SCHEMA
from rglf.model.toy.task import TOY_VOCABULARY, ToyDatasetConfig, write_dataset
from rglf.model.toy.tiny import build_tiny_model, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp8_round_trip_is_close_and_half_the_bytes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64, 16)).astype(np.float32)
    x[:, :, 5] *= 40.0  # an outlier channel: its own scale keeps the other channels precise
    x[1, :, 7] = 0.0  # an all-zero channel (scale 1, no division by zero)
    codes, scales = fp8_encode(x)
    assert len(codes) == x.size and len(scales) == 3 * 16 * 4  # 1 byte per value + float32 (crop, channel) scales
    y = fp8_decode(codes, scales, 3, 64, 16)
    assert y.dtype == np.float32 and y.shape == x.shape
    # e4m3 keeps 3 mantissa bits: every value within 2^-4 of itself relative to its channel's max
    amax = np.abs(x).max(axis=1, keepdims=True)
    assert np.all(np.abs(y - x) <= amax / 448 * 0.5 + np.abs(x) * 2**-4 + 1e-7)
    assert np.all(y[1, :, 7] == 0) and np.abs(y).max() <= np.abs(x).max() * (1 + 2**-4)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert 0.005 < rel < 0.04, rel  # really quantised, and to e4m3's precision


def test_rows_per_mode_and_decode():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, 16, 8)).astype(np.float32)
    common = dict(sample_id="s", vision=torch.from_numpy(v), grid=4, instruction_ids=[5, 6, 7], image_size=(30, 40),
                  image="images/a.png", image_root="/data")
    fp16, fp8, pix = (encode_row(m, **common) for m in ("fp16", "fp8", "pixels"))
    assert encode_row("none", **common) is None
    with pytest.raises(ValueError, match="one of"):
        encode_row("int4", **common)
    table = pa.Table.from_pylist([fp16, fp8, pix], schema=ROUTER_INPUTS_SCHEMA)  # every mode fits the schema
    assert table.column("encoding").to_pylist() == ["fp16", "fp8", "pixels"]
    assert row_nbytes(fp16) == 2 * 16 * 8 * 2 + 12 and row_nbytes(fp8) == 2 * 16 * 8 + 2 * 8 * 4 + 12
    assert pix["vision_features"] == b"" and pix["image"] == "images/a.png" and row_nbytes(pix) < 30
    np.testing.assert_allclose(decode_vision("fp16", fp16["vision_features"], None, 2, 4, 8), v, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(decode_vision(None, fp16["vision_features"], None, 2, 4, 8), v, rtol=1e-3, atol=1e-3)
    got = decode_vision("fp8", fp8["vision_features"], fp8["feature_scales"], 2, 4, 8)
    np.testing.assert_allclose(got, v, rtol=0.07, atol=np.abs(v).max() / 448)
    with pytest.raises(RouterInputsError, match="feature bytes"):
        decode_vision("fp16", fp16["vision_features"][:-2], None, 2, 4, 8)
    with pytest.raises(RouterInputsError, match="scales"):
        decode_vision("fp8", fp8["vision_features"], None, 2, 4, 8)


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    """A tiny LLaVA-NeXT on the toy vocabulary (48 px crops, 12x12 grid)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny",
                                *build_tiny_model(TOY_VOCABULARY, image_size=48))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_dataset(data, ToyDatasetConfig(n_samples=12, seed=3))
    return data


def test_vision_side_recomputes_exactly_what_the_scoring_job_stores(toy_ckpt, toy_data, tmp_path):
    """pixels mode: the trainer's frozen vision tower (no language model) gives the scoring job's features."""
    from rglf.model.images import load_rgb

    lmm = FrozenLMM.from_pretrained(toy_ckpt)
    VisionSide.from_lmm(lmm).save(tmp_path / VISION_DIR)
    assert not any(p.stat().st_size > 2**20 for p in (tmp_path / VISION_DIR).iterdir())  # no LM weights in there
    side = VisionSide.load(tmp_path / VISION_DIR)
    records = json.loads((toy_data / "train.json").read_text())[:3]
    got = side.encode([(r["image"], str(toy_data)) for r in records])
    for r, feats in zip(records, got, strict=True):
        pixels, size = lmm.preprocess(load_rgb(toy_data / r["image"]))
        expected = lmm.encode([pixels], [size])[0].vision
        torch.testing.assert_close(torch.from_numpy(feats), expected.float(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="pixels"):
        VisionSide.load(tmp_path / "nothing")


def _scorer_batch(toy_data: Path, ckpt: Path, n: int) -> pa.Table:
    """The scorer actor's input for ``n`` toy samples: samples rows + levels + the image stage's columns."""
    from rglf.pipeline.images import load_images

    records = json.loads((toy_data / "train.json").read_text())[:n]
    rows = [{"sample_id": r["id"], "source": "toy", "split": "train", "image": r["image"], "image_root": str(toy_data),
             "turns": [{"role": t["from"], "text": t["value"]} for t in r["conversations"]]} for r in records]
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    lmm = FrozenLMM.from_pretrained(ckpt)
    table = table.append_column(pa.field("levels", pa.list_(pa.int32())),
                                pa.array([list(lmm.ladder.tokens)] * n, type=pa.list_(pa.int32())))
    return load_images(table, model=str(ckpt))


@pytest.mark.parametrize("mode", ["fp8", "pixels", "none"])
def test_scorer_writes_each_mode_and_the_trainer_reads_it(mode, toy_ckpt, toy_data, tmp_path):
    """The scoring job's write path (one Scorer call, no Ray) in each mode, read back by router.data."""
    from bench.synthetic import write_rankings
    from rglf.pipeline.score import Scorer
    from rglf.router.data import RouterDataError, load_router_data

    batch = _scorer_batch(toy_data, toy_ckpt, 4)
    lmm = FrozenLMM.from_pretrained(toy_ckpt)
    runs = {}
    for m in ("fp16", mode):
        out = tmp_path / m
        out.mkdir()
        scorer = Scorer(model=str(toy_ckpt), out=str(out), device="cpu", dtype="auto", ladder=lmm.ladder.spec,
                        model_id=lmm.model_id, max_batch_tokens=2048, max_batch_size=64, encode_batch=16,
                        router_inputs=m)
        summary = vars(scorer(batch))  # the BatchResult the driver gets
        runs[m] = (out, summary)
        (out / "run.json").write_text(json.dumps({"ladder": lmm.ladder.spec, "config": {"router_inputs": m}}))
    out, summary = runs[mode]
    fb = pq.read_table(out / "feedback").to_pandas()
    assert summary["scored"] == 4 and len(fb) == 4 * len(lmm.ladder)  # feedback whatever the mode
    ids = sorted(fb.sample_id.unique())
    nll = fb.sort_values(["sample_id", "level_tokens"]).nll_mean.to_numpy().reshape(4, -1)
    rank = tmp_path / "rank"
    write_rankings(rank, ids, ["toy"] * 4, ["train"] * 4, lmm.ladder.tokens, nll, nll < 1, np.ones_like(nll, int))
    if mode == "none":
        assert not (out / "router_inputs").exists() or not list((out / "router_inputs").glob("*.parquet"))
        with pytest.raises(RouterDataError, match="router-inputs none"):
            load_router_data(out, rank)
        return
    ref_bytes = runs["fp16"][1]["router_bytes"]
    ref = load_router_data(runs["fp16"][0], rank)
    data = load_router_data(out, rank)
    assert data.sample_ids == ref.sample_ids and set(data.encoding) == {mode}
    for i in range(4):
        want, got = ref.vision(i), data.vision(i)
        if mode == "pixels":  # recomputed by the frozen vision tower: the fp16-stored values up to fp16 rounding
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_allclose(got, want, rtol=0.07, atol=np.abs(want).max() / 400)
    if mode == "fp8":
        assert 0.45 < summary["router_bytes"] / ref_bytes < 0.56  # half, plus scales and the instruction ids
    else:
        assert (out / "router_side" / VISION_DIR / "vision_side.json").is_file()
        assert summary["router_bytes"] < 0.01 * ref_bytes
