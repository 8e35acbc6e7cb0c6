"""The embedded default's synthetic VQA task: answers that need different granularity BY CONSTRUCTION.

Why this task. The embedded default trains a tiny LLaVA-NeXT whose vision path is linear per
patch: a 4-px patch embedding on a 96-px crop (a 24 x 24 patch grid, SigLIP with
``vision_feature_layer=0``) and a linear projector. Average pooling therefore commutes with
the whole vision path: pooling the projected features equals projecting the pooled patch
pixels (the processor's rescale/normalise is affine per channel, so it commutes too). So a
region of alternating single-patch colours and a solid region in their exact average colour
are IDENTICAL after any pooling window that covers a whole period of the alternation. The answer is then not merely hard at a coarse level, it is absent (SPEC,
"Embedded default": a trainable nonlinear tower learned pooling-robust codes and the
separation vanished; with the linear path it held).

Scene (geometry in 4-px patches; everything aligned to 8-patch blocks, so no pooling window
of the ladder, at most 4 x 4 patches, ever straddles a boundary):

- A crop is 96 x 96 px = 24 x 24 patches = 3 x 3 blocks of 8 x 8 patches (32 x 32 px).
- Aspect ratios: ``square`` 96 x 96 (W x H, 3 x 3 blocks), ``wide`` 192 x 96 (6 x 3 blocks)
  and ``tall`` 96 x 192 (3 x 6 blocks); LLaVA-NeXT anyres then cuts 2 high-res crops of
  exactly 96 x 96 out of a wide/tall image, no resizing needed.
- Background: one pure palette colour. Big block: two adjacent blocks (a horizontal or a
  vertical pair, 2/9 of a crop's tokens) in another palette colour.
- Test square: one other block (1/9 of a crop's tokens, big enough to be learnable), either
  ``checkered`` in two saturated palette colours or ``plain`` in their exact average.
  Kind ``fine``: checker cell = 1 patch, so every kernel of the ladder ((1,2), (2,2), (2,4),
  (4,4)) averages it to the plain colour: only level 576 can tell. Kind ``medium``: cell =
  2 x 2 patches, which survives (1,2) and (2,2) (576, 288, 144 can tell) and is destroyed
  by (2,4) and (4,4) (72 and 36 cannot). Cells are aligned to the block origin.
- Palette channels are 0 or 254, so the average of two palette colours has channels in
  {0, 127, 254}: exact integers, never a palette colour (two distinct colours differ in at
  least one channel, which averages to 127). Pixels are written with numpy (no
  antialiasing) and saved as PNG (lossless).

Caveat: "fine" here is per-token information (is a patch saturated or half-tone?), not
spatial pattern reading. With a linear patch embedding each patch token carries its own
colour, and pooling mixes saturated patches into half-tones; reading a checkerboard's
layout is not what is tested. Also, LLaVA-NeXT's base crop is the whole image resized to
96 x 96: for a square image that is the image itself, but a wide/tall image is squashed by
the resampler, so there the exact construction holds in the 2 high-res crops only.

Question families are the ``source`` of a sample (SQL groups by it like by benchmark):

    family        granularity  question                                          answers
    background    coarse       What colour is the background?                    colour name
    block_colour  coarse       What colour is the big block?                     colour name
    block_shape   coarse       Is the big block horizontal or vertical?          horizontal / vertical
    medium        medium       Is the square checkered in big cells or plain?    checkered / plain
    fine          fine         Is the square finely checkered or plain?          checkered / plain

``medium`` is asked only of scenes whose square kind is medium, ``fine`` only of fine ones.
``write_dataset`` writes a LLaVA-format dataset (``images/<id>.png``, ``{train,val,test}.json``,
``dataset.json``), deterministic: sample ``i`` depends only on ``(seed, i)`` and the family
weights, never on ``n_samples`` or on the order of generation.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Geometry: 4-px patches (the tiny model's patch size), 8-patch blocks, 96-px crops.
PATCH_PX = 4
BLOCK_PATCHES = 8  # a multiple of 4, the largest pooling kernel side, so windows never straddle
BLOCK_PX = BLOCK_PATCHES * PATCH_PX  # 32
CROP_BLOCKS = 3
CROP_PX = CROP_BLOCKS * BLOCK_PX  # 96 = the tiny CLIP/SigLIP image size -> 24 x 24 patches

# aspect -> (cols, rows) of blocks; the order is the order of ``aspect_probs``
ASPECTS: dict[str, tuple[int, int]] = {"square": (3, 3), "wide": (6, 3), "tall": (3, 6)}

# Square kind -> checker cell side in patches. fine: 1 patch, averaged away by every kernel
# incl. (1,2); medium: 2 x 2 patches, survives (1,2) and (2,2), averaged away by (2,4), (4,4).
CELL_PATCHES: dict[str, int] = {"fine": 1, "medium": 2}
SQUARE_KINDS = tuple(CELL_PATCHES)

# Channels 0 or 254 (not 255): the average of two colours is then an exact integer (127).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (254, 0, 0),
    "green": (0, 254, 0),
    "blue": (0, 0, 254),
    "yellow": (254, 254, 0),
    "cyan": (0, 254, 254),
    "magenta": (254, 0, 254),
    "white": (254, 254, 254),
    "black": (0, 0, 0),
}
COLOURS = tuple(PALETTE)


def mix(a: str, b: str) -> tuple[int, int, int]:
    """The exact average of two palette colours (the plain square's colour)."""
    pa, pb = PALETTE[a], PALETTE[b]
    if any((x + y) % 2 for x, y in zip(pa, pb, strict=True)):
        raise ValueError(f"average of {a} {pa} and {b} {pb} is not an exact integer colour")
    return tuple((x + y) // 2 for x, y in zip(pa, pb, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Question families: the ``source`` of a sample.
FAMILIES: tuple[str, ...] = ("background", "block_colour", "block_shape", "medium", "fine")
GRANULARITY: dict[str, str] = {
    "background": "coarse",
    "block_colour": "coarse",
    "block_shape": "coarse",
    "medium": "medium",
    "fine": "fine",
}
QUESTIONS: dict[str, str] = {
    "background": "What colour is the background?",
    "block_colour": "What colour is the big block?",
    "block_shape": "Is the big block horizontal or vertical?",
    "medium": "Is the square checkered in big cells or plain?",
    "fine": "Is the square finely checkered or plain?",
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "background": COLOURS,
    "block_colour": COLOURS,
    "block_shape": ("horizontal", "vertical"),
    "medium": ("checkered", "plain"),
    "fine": ("checkered", "plain"),
}

# Words are split like ``tokenizers.pre_tokenizers.Whitespace`` does (``\w+|[^\w\s]+``), so
# "background?" is "background" + "?". Case is kept ("What", "Is", "is").
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Split a question or answer into vocabulary words."""
    return WORD_PATTERN.findall(text)


# Every word of every question and answer, in first-seen order (26 words; "<image>" and the
# conversation template's tokens are the tokenizer's business, not the task's).
TOY_VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        w for family in FAMILIES for text in (QUESTIONS[family], *ANSWERS[family]) for w in words(text)
    )
)


# ---------------------------------------------------------------------------------------------
# Scenes
Cell = tuple[int, int]  # (row, col) of a block in the image's block layout


@dataclass(frozen=True)
class Scene:
    """One synthetic image, in block coordinates. Checks its own invariants on construction."""

    aspect: str  # "square" | "wide" | "tall" (see ASPECTS)
    background: str  # palette colour name
    block: tuple[Cell, Cell]  # the big block: two adjacent blocks, row-major order
    block_colour: str  # palette colour name, != background
    square: Cell  # the test square's block, not part of the big block
    square_kind: str  # "fine" | "medium" (checker cell 1 or 2 x 2 patches)
    checkered: bool  # True: checkerboard of checker_colours; False: plain in their average
    checker_colours: tuple[str, str]  # (colour of cells with even parity, odd parity)

    def __post_init__(self) -> None:
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect {self.aspect!r} not in {tuple(ASPECTS)}")
        cols, rows = ASPECTS[self.aspect]
        for name in (self.background, self.block_colour, *self.checker_colours):
            if name not in PALETTE:
                raise ValueError(f"colour {name!r} not in the palette {COLOURS}")
        used = {self.background, self.block_colour}
        if len(used) != 2 or len(used | set(self.checker_colours)) != 4:
            raise ValueError(
                f"background {self.background}, block {self.block_colour} and checker colours "
                f"{self.checker_colours} must be four distinct colours"
            )
        for r, c in (*self.block, self.square):
            if not (0 <= r < rows and 0 <= c < cols):
                raise ValueError(f"block cell {(r, c)} outside the {rows} x {cols} layout of {self.aspect}")
        (r0, c0), (r1, c1) = self.block
        if (r1 - r0, c1 - c0) not in ((0, 1), (1, 0)):
            raise ValueError(f"big block {self.block} is not two adjacent blocks in row-major order")
        if self.square in self.block:
            raise ValueError(f"square {self.square} overlaps the big block {self.block}")
        if self.square_kind not in CELL_PATCHES:
            raise ValueError(f"square_kind {self.square_kind!r} not in {SQUARE_KINDS}")

    @property
    def width(self) -> int:
        return ASPECTS[self.aspect][0] * BLOCK_PX

    @property
    def height(self) -> int:
        return ASPECTS[self.aspect][1] * BLOCK_PX

    @property
    def block_orientation(self) -> str:
        return "horizontal" if self.block[0][0] == self.block[1][0] else "vertical"

    @property
    def square_colour(self) -> tuple[int, int, int]:
        """The plain square's colour: the exact average of the two checker colours."""
        return mix(*self.checker_colours)


def sample_scene(
    rng: np.random.Generator,
    *,
    aspect: str | None = None,
    square_kind: str | None = None,
    checkered: bool | None = None,
    aspect_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Scene:
    """Draw a scene; ``aspect``, ``square_kind`` and ``checkered`` override the random draw.

    Every value is drawn whether overridden or not, so overrides change nothing else. Colours
    are uniform (background over the palette, block colour over the rest), the orientation
    is 50/50, positions uniform given it, kind and checkered 50/50, and the checker pair
    uniform over ordered pairs of the 6 colours left (its average is then never the
    background or the block colour, which have no 127 channel).
    """
    probs = _probabilities(aspect_probs, len(ASPECTS), "aspect_probs")
    drawn_aspect = tuple(ASPECTS)[rng.choice(len(ASPECTS), p=probs)]
    aspect = drawn_aspect if aspect is None else aspect
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r} not in {tuple(ASPECTS)}")
    cols, rows = ASPECTS[aspect]

    bg, blk = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    if rng.random() < 0.5:  # horizontal pair
        r, c = int(rng.integers(rows)), int(rng.integers(cols - 1))
        block = ((r, c), (r, c + 1))
    else:  # vertical pair
        r, c = int(rng.integers(rows - 1)), int(rng.integers(cols))
        block = ((r, c), (r + 1, c))
    free = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in block]
    square = free[int(rng.integers(len(free)))]
    others = [name for name in COLOURS if name not in (bg, blk)]
    a, b = (others[i] for i in rng.choice(len(others), size=2, replace=False))

    # drawn last, so overriding them cannot shift the draws above
    drawn_kind = SQUARE_KINDS[int(rng.integers(len(SQUARE_KINDS)))]
    drawn_checkered = bool(rng.random() < 0.5)
    return Scene(
        aspect=aspect,
        background=bg,
        block=block,
        block_colour=blk,
        square=square,
        square_kind=drawn_kind if square_kind is None else square_kind,
        checkered=drawn_checkered if checkered is None else checkered,
        checker_colours=(a, b),
    )


def _block_slice(cell: Cell) -> tuple[slice, slice]:
    """Pixel rows and columns of a block: (row slice, col slice)."""
    r, c = cell
    return slice(r * BLOCK_PX, (r + 1) * BLOCK_PX), slice(c * BLOCK_PX, (c + 1) * BLOCK_PX)


def render(scene: Scene) -> Image.Image:
    """RGB image with exact palette colours (numpy fills, no antialiasing)."""
    pixels = np.empty((scene.height, scene.width, 3), dtype=np.uint8)  # (H, W, 3)
    pixels[:] = PALETTE[scene.background]
    for cell in scene.block:
        pixels[_block_slice(cell)] = PALETTE[scene.block_colour]
    if scene.checkered:
        cell_px = CELL_PATCHES[scene.square_kind] * PATCH_PX
        index = np.arange(BLOCK_PX) // cell_px  # checker cell index along one side
        odd = ((index[:, None] + index[None, :]) % 2).astype(bool)  # (32, 32), origin even
        a, b = (np.array(PALETTE[name], dtype=np.uint8) for name in scene.checker_colours)
        pixels[_block_slice(scene.square)] = np.where(odd[:, :, None], b, a)  # (32, 32, 3)
    else:
        pixels[_block_slice(scene.square)] = scene.square_colour
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------
# Questions and answers
def families_for(scene: Scene) -> list[str]:
    """The 4 families that apply to a scene: the coarse three and the square's own kind."""
    return [f for f in FAMILIES if GRANULARITY[f] == "coarse" or f == scene.square_kind]


def question_answer(scene: Scene, family: str) -> tuple[str, str]:
    """``(question, answer)``; ValueError if the family is unknown or doesn't apply to the scene."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families are {FAMILIES}")
    if family not in families_for(scene):
        raise ValueError(f"family {family!r} does not apply to a scene whose square is {scene.square_kind}")
    if family == "background":
        answer = scene.background
    elif family == "block_colour":
        answer = scene.block_colour
    elif family == "block_shape":
        answer = scene.block_orientation
    else:  # medium / fine: the square's own kind
        answer = "checkered" if scene.checkered else "plain"
    return QUESTIONS[family], answer


def stage1_turns(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """All applicable ``(question, answer)`` turns in a random order (multi-turn Stage-1 training)."""
    families = families_for(scene)
    return [question_answer(scene, families[i]) for i in rng.permutation(len(families))]


# ---------------------------------------------------------------------------------------------
# The dataset
SPLITS = ("train", "val", "test")


def _probabilities(values, n: int, name: str) -> np.ndarray:
    """Validate ``n`` non-negative weights with a positive sum; return them normalised."""
    p = np.asarray(values, dtype=np.float64)
    if p.shape != (n,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(
            f"{name} must be {n} non-negative finite numbers with a positive sum, got {values!r}"
        )
    return p / p.sum()


@dataclass
class ToyDatasetConfig:
    """What ``write_dataset`` writes; saved in ``dataset.json``."""

    n_samples: int
    """Number of samples (= images = questions; one question per sample)."""
    seed: int = 0
    """Sample ``i``'s scene is drawn from ``numpy.random.default_rng([seed, i])``."""
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """(train, val, test); must sum to 1. Splits are contiguous index ranges (samples are iid)."""
    family_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 1.0))
    """Share of each family (= ``source``); missing families get 0. Assigned deterministically
    by smooth weighted round-robin, so the counts match the weights to within one sample."""
    aspect_probs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Probability of the (square, wide, tall) aspect ratios."""

    def __post_init__(self) -> None:
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {self.n_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        fractions = np.asarray(self.split_fractions)
        if fractions.shape != (3,) or np.any(fractions < 0) or abs(fractions.sum() - 1.0) > 1e-9:
            raise ValueError(
                f"split_fractions (train, val, test) must be 3 non-negative numbers summing to 1, "
                f"got {self.split_fractions!r}"
            )
        unknown = set(self.family_weights) - set(FAMILIES)
        if unknown:
            raise ValueError(
                f"family_weights has unknown families {sorted(unknown)}; families are {FAMILIES}"
            )
        self.family_weights = {f: float(self.family_weights.get(f, 0.0)) for f in FAMILIES}
        _probabilities(list(self.family_weights.values()), len(FAMILIES), "family_weights")
        self.aspect_probs = tuple(float(p) for p in self.aspect_probs)  # type: ignore[assignment]
        _probabilities(self.aspect_probs, len(ASPECTS), "aspect_probs")


def assign_families(n: int, family_weights: dict[str, float]) -> list[str]:
    """Family of samples ``0..n-1`` by smooth weighted round-robin (uniform: plain round-robin).

    Each step every family earns its weight share in credit and the richest family (first in
    FAMILIES order on ties) is chosen and pays 1. Exact rational arithmetic, so ties are real
    ties; a prefix of a longer run is the shorter run, so sample ``i`` does not depend on ``n``.
    """
    _probabilities([family_weights.get(f, 0.0) for f in FAMILIES], len(FAMILIES), "family_weights")
    weights = [Fraction(family_weights.get(f, 0.0)) for f in FAMILIES]
    total = sum(weights)
    shares = [w / total for w in weights]
    credit = [Fraction(0)] * len(FAMILIES)
    out = []
    for _ in range(n):
        credit = [c + s for c, s in zip(credit, shares, strict=True)]
        j = max(range(len(FAMILIES)), key=lambda k: (credit[k], -k))
        credit[j] -= 1
        out.append(FAMILIES[j])
    return out


def split_sizes(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Rounded train and val sizes; test takes the rest."""
    n_train = min(n, round(n * fractions[0]))
    n_val = min(n - n_train, round(n * fractions[1]))
    return {"train": n_train, "val": n_val, "test": n - n_train - n_val}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless; no timestamp or metadata, so bytes are deterministic
    return buffer.getvalue()


def write_dataset(out_dir: Path, cfg: ToyDatasetConfig) -> dict:
    """Write a LLaVA-format dataset and return its summary (also saved as ``dataset.json``).

    ``out_dir/images/<id>.png``; ``out_dir/{train,val,test}.json``: JSON lists of
    ``{"id", "image": "images/<id>.png", "conversations": [{"from": "human", "value":
    "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}], "source": <family>,
    "split"}``. For the medium and fine families, checkered and plain alternate in index order
    (exact 50/50 balance, to within one per split); the rest of sample ``i``'s scene is drawn
    from ``(seed, i)``. Same config -> byte-identical files. ``dataset.json`` is written last
    (its presence marks a complete dataset).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").unlink(missing_ok=True)  # incomplete until rewritten at the end
    n = cfg.n_samples
    families = assign_families(n, cfg.family_weights)
    sizes = split_sizes(n, cfg.split_fractions)
    splits = [s for s in SPLITS for _ in range(sizes[s])]
    width = max(6, len(str(n - 1)))

    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    asked = dict.fromkeys(FAMILIES, 0)  # per-family counter: alternates checkered / plain
    counts = {
        "splits": dict.fromkeys(SPLITS, 0),
        "families": {s: dict.fromkeys(FAMILIES, 0) for s in SPLITS},
        "answers": {f: dict.fromkeys(ANSWERS[f], 0) for f in FAMILIES},
        "aspects": dict.fromkeys(ASPECTS, 0),
    }
    for i, (family, split) in enumerate(zip(families, splits, strict=True)):
        rng = np.random.default_rng([cfg.seed, i])
        if GRANULARITY[family] == "coarse":
            scene = sample_scene(rng, aspect_probs=cfg.aspect_probs)
        else:  # the family fixes the square's kind; checkered alternates for exact balance
            scene = sample_scene(
                rng, square_kind=family, checkered=asked[family] % 2 == 0, aspect_probs=cfg.aspect_probs
            )
        asked[family] += 1
        question, answer = question_answer(scene, family)
        sample_id = f"toy{cfg.seed}-{i:0{width}d}"
        image = f"images/{sample_id}.png"
        _write_atomic(out_dir / image, _png_bytes(render(scene)))
        records[split].append(
            {
                "id": sample_id,
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "source": family,
                "split": split,
            }
        )
        counts["splits"][split] += 1
        counts["families"][split][family] += 1
        counts["answers"][family][answer] += 1
        counts["aspects"][scene.aspect] += 1

    for split in SPLITS:
        _write_atomic(out_dir / f"{split}.json", _json_bytes(records[split]))
    summary = {
        "format": "llava",
        "config": asdict(cfg),
        "counts": counts,
        "families": {f: {"granularity": GRANULARITY[f], "question": QUESTIONS[f]} for f in FAMILIES},
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "vocabulary": list(TOY_VOCABULARY),
        "geometry": {
            "patch_px": PATCH_PX,
            "block_px": BLOCK_PX,
            "crop_px": CROP_PX,
            "aspects_px": {a: [c * BLOCK_PX, r * BLOCK_PX] for a, (c, r) in ASPECTS.items()},
        },
    }
    data = _json_bytes(summary)
    _write_atomic(out_dir / "dataset.json", data)
    return json.loads(data)  # exactly what was saved (tuples as lists)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
