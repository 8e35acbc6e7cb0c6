"""The embedded default's synthetic task (model/toy.py): geometry, pooling property, dataset files."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rglf.model.toy import task as toy

KERNELS = {288: (1, 2), 144: (2, 2), 72: (2, 4), 36: (4, 4)}  # SPEC: tokens -> (rows, cols) kernel


# --- helpers: a simplified linear vision path ------------------------------------------------
def patch_vectors(crop: np.ndarray) -> np.ndarray:
    """(96, 96, 3) pixels -> (24, 24, 48) full patch pixel vectors (what a linear patch embedding sees).

    A linear embedding of pooled patch vectors equals the pooled embeddings, so comparing pooled
    patch vectors is comparing pooled features of any linear vision path.
    """
    g = toy.CROP_PX // toy.PATCH_PX
    x = crop.astype(np.float64).reshape(g, toy.PATCH_PX, g, toy.PATCH_PX, 3)  # (24, 4, 24, 4, 3)
    return x.transpose(0, 2, 1, 3, 4).reshape(g, g, -1)  # (24, 24, 48)


def pool(grid: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """Average-pool a (24, 24, d) grid with kernel = stride."""
    kh, kw = kernel
    g, _, d = grid.shape
    return grid.reshape(g // kh, kh, g // kw, kw, d).mean(axis=(1, 3))  # (24/kh, 24/kw, d)


def crops(image: Image.Image) -> list[np.ndarray]:
    """The 96 x 96 high-res crops of an image, row-major (what LLaVA-NeXT anyres cuts)."""
    pixels = np.asarray(image)
    c = toy.CROP_PX
    return [
        pixels[y : y + c, x : x + c]
        for y in range(0, pixels.shape[0], c)
        for x in range(0, pixels.shape[1], c)
    ]


def pooled(image: Image.Image, kernel: tuple[int, int] | None) -> list[np.ndarray]:
    grids = [patch_vectors(crop) for crop in crops(image)]
    return grids if kernel is None else [pool(grid, kernel) for grid in grids]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def scene_pair(seed: int, kind: str, aspect: str) -> tuple[toy.Scene, toy.Scene]:
    checkered = toy.sample_scene(np.random.default_rng(seed), aspect=aspect, square_kind=kind, checkered=True)
    return checkered, dataclasses.replace(checkered, checkered=False)


# --- scenes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("aspect", ["square", "wide", "tall"])
@pytest.mark.parametrize("seed", range(4))
def test_fine_square_is_destroyed_by_every_pooling_kernel(seed, aspect):
    checkered, plain = (toy.render(s) for s in scene_pair(seed, "fine", aspect))
    assert not same(pooled(checkered, None), pooled(plain, None)), "576 must tell them apart"
    for tokens, kernel in KERNELS.items():
        assert same(pooled(checkered, kernel), pooled(plain, kernel)), f"level {tokens} {kernel} must not"


@pytest.mark.parametrize("aspect", ["square", "wide", "tall"])
@pytest.mark.parametrize("seed", range(4))
def test_medium_square_survives_1x2_and_2x2_only(seed, aspect):
    checkered, plain = (toy.render(s) for s in scene_pair(seed, "medium", aspect))
    assert not same(pooled(checkered, None), pooled(plain, None))
    for tokens in (288, 144):
        assert not same(pooled(checkered, KERNELS[tokens]), pooled(plain, KERNELS[tokens])), tokens
    for tokens in (72, 36):
        assert same(pooled(checkered, KERNELS[tokens]), pooled(plain, KERNELS[tokens])), tokens


def test_checkered_and_plain_differ_only_inside_the_square():
    checkered, plain = scene_pair(3, "fine", "wide")
    diff = np.any(np.asarray(toy.render(checkered)) != np.asarray(toy.render(plain)), axis=-1)  # (H, W)
    r, c = checkered.square
    inside = np.zeros_like(diff)
    inside[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = True
    assert diff[inside].all() and not diff[~inside].any()


def test_render_has_exact_colours_and_aspect_sizes():
    sizes = {"square": (96, 96), "wide": (192, 96), "tall": (96, 192)}
    rng = np.random.default_rng(0)
    for i in range(60):
        scene = toy.sample_scene(rng, aspect=list(sizes)[i % 3])
        image = toy.render(scene)
        assert image.mode == "RGB" and image.size == sizes[scene.aspect] == (scene.width, scene.height)
        colours = {tuple(int(v) for v in px) for px in np.asarray(image).reshape(-1, 3)}
        expected = {toy.PALETTE[scene.background], toy.PALETTE[scene.block_colour]}
        if scene.checkered:
            expected |= {toy.PALETTE[name] for name in scene.checker_colours}
        else:
            expected.add(scene.square_colour)
        assert colours == expected  # no antialiasing, nothing else drawn
        # the plain colour is a half-tone, never a palette colour
        assert 127 in scene.square_colour and scene.square_colour not in toy.PALETTE.values()


def test_png_roundtrip_is_lossless(tmp_path):
    image = toy.render(toy.sample_scene(np.random.default_rng(5), square_kind="fine", checkered=True))
    image.save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")), np.asarray(image))


def test_scene_layout_invariants_hold_over_many_draws():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = toy.sample_scene(rng)
        (r0, c0), (r1, c1) = scene.block
        assert (r1 - r0, c1 - c0) in ((0, 1), (1, 0))
        assert scene.square not in scene.block
        assert len({scene.background, scene.block_colour, *scene.checker_colours}) == 4


def test_scene_rejects_broken_layouts():
    good = toy.sample_scene(np.random.default_rng(0), aspect="square")
    free = next(
        (r, c) for r in range(3) for c in range(3) if (r, c) not in good.block and (r, c) != good.square
    )
    with pytest.raises(ValueError, match="overlaps"):
        dataclasses.replace(good, square=good.block[0])
    with pytest.raises(ValueError, match="adjacent"):
        dataclasses.replace(good, block=(good.block[0], free))
    with pytest.raises(ValueError, match="distinct"):
        dataclasses.replace(good, block_colour=good.background)
    with pytest.raises(ValueError, match="outside"):
        dataclasses.replace(good, square=(0, 5))
    with pytest.raises(ValueError, match="palette"):
        dataclasses.replace(good, background="orange")


def test_overrides_change_nothing_else():
    base = toy.sample_scene(np.random.default_rng(7))
    for kind in toy.SQUARE_KINDS:
        for checkered in (True, False):
            other = toy.sample_scene(np.random.default_rng(7), square_kind=kind, checkered=checkered)
            assert other == dataclasses.replace(base, square_kind=kind, checkered=checkered)


def test_sample_scene_is_balanced():
    rng = np.random.default_rng(2)
    scenes = [toy.sample_scene(rng) for _ in range(8000)]
    n = len(scenes)
    aspects = Counter(s.aspect for s in scenes)
    assert abs(aspects["square"] / n - 0.8) < 0.02
    assert abs(aspects["wide"] / n - 0.1) < 0.015 and abs(aspects["tall"] / n - 0.1) < 0.015
    for attr in ("background", "block_colour"):
        counts = Counter(getattr(s, attr) for s in scenes)
        assert set(counts) == set(toy.COLOURS)
        assert all(abs(c / n - 1 / 8) < 0.02 for c in counts.values()), (attr, counts)
    for values in (
        [s.checkered for s in scenes],
        [s.square_kind for s in scenes],
        [s.block_orientation for s in scenes],
    ):
        assert all(abs(c / n - 0.5) < 0.025 for c in Counter(values).values())


# --- questions --------------------------------------------------------------------------------
def test_families_for_and_question_answer():
    fine, _ = scene_pair(0, "fine", "square")
    medium = dataclasses.replace(fine, square_kind="medium")
    assert toy.families_for(fine) == ["background", "block_colour", "block_shape", "fine"]
    assert toy.families_for(medium) == ["background", "block_colour", "block_shape", "medium"]
    assert toy.question_answer(fine, "background") == ("What colour is the background?", fine.background)
    assert toy.question_answer(fine, "block_colour")[1] == fine.block_colour
    assert toy.question_answer(fine, "block_shape")[1] == fine.block_orientation
    assert toy.question_answer(fine, "fine")[1] == "checkered"
    assert toy.question_answer(dataclasses.replace(medium, checkered=False), "medium")[1] == "plain"
    with pytest.raises(ValueError, match="does not apply"):
        toy.question_answer(medium, "fine")
    with pytest.raises(ValueError, match="does not apply"):
        toy.question_answer(fine, "medium")
    with pytest.raises(ValueError, match="unknown family"):
        toy.question_answer(fine, "texture")
    assert toy.GRANULARITY == {
        "background": "coarse",
        "block_colour": "coarse",
        "block_shape": "coarse",
        "medium": "medium",
        "fine": "fine",
    }


def test_block_shape_answer_matches_geometry():
    scene = toy.sample_scene(np.random.default_rng(0), aspect="square")
    horizontal = dataclasses.replace(scene, block=((2, 0), (2, 1)), square=(0, 0))
    vertical = dataclasses.replace(scene, block=((0, 2), (1, 2)), square=(0, 0))
    assert toy.question_answer(horizontal, "block_shape")[1] == "horizontal"
    assert toy.question_answer(vertical, "block_shape")[1] == "vertical"


def test_stage1_turns_cover_the_applicable_families_in_random_order():
    scene = toy.sample_scene(np.random.default_rng(0))
    expected = {toy.question_answer(scene, f) for f in toy.families_for(scene)}
    orders = set()
    for seed in range(20):
        turns = toy.stage1_turns(scene, np.random.default_rng(seed))
        assert len(turns) == 4 and set(turns) == expected
        orders.add(tuple(turns))
    assert len(orders) > 1
    assert toy.stage1_turns(scene, np.random.default_rng(3)) == toy.stage1_turns(
        scene, np.random.default_rng(3)
    )


def test_vocabulary_covers_every_question_and_answer():
    vocab = set(toy.TOY_VOCABULARY)
    assert len(vocab) == len(toy.TOY_VOCABULARY)
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = toy.sample_scene(rng)
        for question, answer in toy.stage1_turns(scene, rng):
            assert set(toy.words(question)) <= vocab
            assert answer in vocab and answer == answer.lower() and len(toy.words(answer)) == 1


# --- dataset ------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_is_byte_deterministic_and_seed_dependent(tmp_path):
    a = _files_of(tmp_path / "a", toy.ToyDatasetConfig(n_samples=30, seed=1))
    b = _files_of(tmp_path / "b", toy.ToyDatasetConfig(n_samples=30, seed=1))
    c = _files_of(tmp_path / "c", toy.ToyDatasetConfig(n_samples=30, seed=2))
    assert a == b
    assert len([k for k in a if k.startswith("images/")]) == 30
    assert not any(k.endswith(".tmp") for k in a)  # atomic writes leave no temp files
    assert a["train.json"] != c["train.json"]
    images_a = sorted(v for k, v in a.items() if k.startswith("images/"))
    images_c = sorted(v for k, v in c.items() if k.startswith("images/"))
    assert images_a != images_c


def _files_of(out: Path, cfg: toy.ToyDatasetConfig) -> dict[str, bytes]:
    toy.write_dataset(out, cfg)
    return _files(out)


def test_sample_does_not_depend_on_dataset_size(tmp_path):
    toy.write_dataset(tmp_path / "small", toy.ToyDatasetConfig(n_samples=12, seed=4))
    toy.write_dataset(tmp_path / "big", toy.ToyDatasetConfig(n_samples=25, seed=4))
    small = _records(tmp_path / "small")
    big = {r["id"]: r for r in _records(tmp_path / "big")}
    for record in small:
        other = big[record["id"]]
        assert record["conversations"] == other["conversations"] and record["source"] == other["source"]
        assert (tmp_path / "small" / record["image"]).read_bytes() == (
            tmp_path / "big" / other["image"]
        ).read_bytes()


def _records(root: Path) -> list[dict]:
    return [r for split in toy.SPLITS for r in json.loads((root / f"{split}.json").read_text())]


def test_written_dataset_is_valid_llava_format(tmp_path):
    summary = toy.write_dataset(tmp_path, toy.ToyDatasetConfig(n_samples=50, seed=0))
    ids = set()
    for split in toy.SPLITS:
        records = json.loads((tmp_path / f"{split}.json").read_text())
        assert isinstance(records, list) and len(records) == summary["counts"]["splits"][split]
        for r in records:
            assert set(r) == {"id", "image", "conversations", "source", "split"}
            assert isinstance(r["id"], str) and r["id"] not in ids
            ids.add(r["id"])
            assert r["split"] == split and r["source"] in toy.FAMILIES
            assert r["image"] == f"images/{r['id']}.png" and (tmp_path / r["image"]).is_file()
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) == 2
            assert turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
            question = turns[0]["value"].removeprefix("<image>\n")
            assert question == toy.QUESTIONS[r["source"]]
            assert turns[1]["value"] in toy.ANSWERS[r["source"]]
    assert len(ids) == 50
    saved = json.loads((tmp_path / "dataset.json").read_text())
    assert saved == summary and saved["config"]["n_samples"] == 50
    assert saved["counts"]["splits"] == {"train": 35, "val": 5, "test": 10}


def test_answers_match_the_rendered_image(tmp_path):
    """The square question's answer is readable from the PNG: checkered <=> no half-tone pixel."""
    toy.write_dataset(tmp_path, toy.ToyDatasetConfig(n_samples=40, seed=3))
    checked = 0
    for r in _records(tmp_path):
        if r["source"] in ("medium", "fine"):
            pixels = np.asarray(Image.open(tmp_path / r["image"]))
            has_half_tone = bool((pixels == 127).any())
            assert has_half_tone == (r["conversations"][1]["value"] == "plain")
            checked += 1
        elif r["source"] == "background":
            colours = Image.open(tmp_path / r["image"]).convert("RGB").getcolors()  # [(count, rgb)]
            assert max(colours)[1] == toy.PALETTE[r["conversations"][1]["value"]]  # the most common colour
    assert checked == 16


def test_dataset_is_balanced(tmp_path):
    cfg = toy.ToyDatasetConfig(n_samples=200, seed=0)
    summary = toy.write_dataset(tmp_path, cfg)
    counts = summary["counts"]
    for split, n in counts["splits"].items():
        assert all(c == n // 5 for c in counts["families"][split].values()), split
    for family in ("medium", "fine"):
        assert counts["answers"][family] == {"checkered": 20, "plain": 20}
        for split in toy.SPLITS:  # exact alternation: balanced to within one per split
            answers = Counter(
                r["conversations"][1]["value"]
                for r in json.loads((tmp_path / f"{split}.json").read_text())
                if r["source"] == family
            )
            assert abs(answers["checkered"] - answers["plain"]) <= 1
    assert sum(counts["aspects"].values()) == 200 and counts["aspects"]["square"] > 130


def test_family_weights_are_followed_exactly():
    families = toy.assign_families(30, {"fine": 2.0, "background": 1.0})
    assert Counter(families) == {"fine": 20, "background": 10}
    assert toy.assign_families(10, dict.fromkeys(toy.FAMILIES, 1.0)) == list(toy.FAMILIES) * 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_samples": 0},
        {"n_samples": 10, "seed": -1},
        {"n_samples": 10, "split_fractions": (0.5, 0.1, 0.1)},
        {"n_samples": 10, "split_fractions": (0.7, 0.3)},
        {"n_samples": 10, "family_weights": {"texture": 1.0}},
        {"n_samples": 10, "family_weights": {"fine": 0.0}},
        {"n_samples": 10, "family_weights": {"fine": -1.0, "medium": 2.0}},
        {"n_samples": 10, "aspect_probs": (1.0, 0.0)},
        {"n_samples": 10, "aspect_probs": (0.0, 0.0, 0.0)},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        toy.ToyDatasetConfig(**kwargs)


def test_config_defaults():
    cfg = toy.ToyDatasetConfig(n_samples=10)
    assert cfg.family_weights == dict.fromkeys(toy.FAMILIES, 1.0)
    assert cfg.split_fractions == (0.7, 0.1, 0.2) and cfg.aspect_probs == (0.8, 0.1, 0.1)
    assert toy.split_sizes(10, cfg.split_fractions) == {"train": 7, "val": 1, "test": 2}
