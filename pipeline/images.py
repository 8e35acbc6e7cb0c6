"""Stage 2 of ``rglf score``: load every sample's image, check it, make it 8-bit RGB, cut its crops.

Runs as stateless Ray tasks on CPUs (``load_images``), so GPU actors only receive ready crops
(or inside the scorer actors when the cluster has no CPU left beside them).

Input columns (from the read stage): ``sample_id, source, split, image, image_root, turns, levels``.
Output columns: the input ones, plus

    pixels        large_binary  float32, C order, shape ``pixels_shape`` = (n_crops, 3, S, S);
                                null for text-only and rejected samples
    pixels_shape  list<int32>
    image_size    list<int32>   (height, width) of the original image (what anyres un-padding uses)
    error_stage, error_code, error_reason, error_detail   string, null when the image is fine

A bad image does not fail the task: its row carries the error and the scorer writes it to the
errors table with its batch. Rejections (``code``: reason) -- the defaults reject only what
cannot be scored:

    outside_root      the reference leaves the image root: an absolute path elsewhere, ``../``,
                      or a symlink whose target is outside (``realpath`` is checked); never opened
    missing_file      no file at ``image_root / image``
    empty_file        a 0-byte file
    corrupt_image     not a decodable image (unknown format, bad header)
    truncated_image   the file ends early / decoding failed part-way
    too_large         more pixels than Pillow's decompression-bomb limit (2 x ``Image.MAX_IMAGE_PIXELS``)
    extreme_aspect    longer side / shorter side above the limit. Default: derived from the
                      checkpoint's processor -- none for LLaVA-NeXT (anyres resizes into a bounded
                      grid; a 100000x10 image still scores), and for a single-crop (CLIP) processor
                      the aspect at which resizing the shorter side to the crop size would exceed
                      Pillow's pixel limit (e.g. 89.5M px / 336^2 = 793:1); ``--max-aspect`` sets one
    too_small         a side shorter than ``--min-side`` px (default 1: off; the processors upscale)
    unsupported_mode  a pixel mode with no faithful 8-bit RGB form (32-bit float "F")
    preprocess_failed the checkpoint's image processor raised on this image (its message is kept)

Valid modes and how they become 8-bit RGB (``to_rgb``):

    RGB                      as is
    1, L, P, CMYK, YCbCr ...  Pillow's own conversion
    I;16, I;16L/B/N, I       16-bit range scaled: round(v * 255 / 65535), never clipped at 255
                             ("I", 32-bit, is what some Pillow versions report for 16-bit files;
                             values outside 0..65535 are clipped to it first)
    LA, PA, RGBA, La, RGBa,  alpha composited over the processor's mean colour (``image_mean *
    P with transparency      255``, the neutral colour LLaVA pads with: it normalises to zero)

EXIF orientation is not applied (LLaVA trains on ``Image.open(...).convert("RGB")``).
The crops come from the checkpoint's own image processor, the same one ``FrozenLMM.preprocess``
uses (a test pins the equality).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
from PIL import Image

from rglf.model.images import (  # noqa: F401 -- shared with the pixels-mode router trainer
    ALPHA_MODES,
    SIXTEEN_BIT_MODES,
    ImageRejected,
    check_geometry,
    load_rgb,
    neutral_background,
    resolve_inside,
    to_rgb,
)

OUTPUT_FIELDS = [
    pa.field("pixels", pa.large_binary()),
    pa.field("pixels_shape", pa.list_(pa.int32())),
    pa.field("image_size", pa.list_(pa.int32())),
    pa.field("error_stage", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_reason", pa.string()),
    pa.field("error_detail", pa.string()),
]


# --------------------------------------------------------------------------------------
# The checkpoint's image processor (no weights are loaded)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def image_processor(model: str):
    """(processor, is_llava_next) of a local checkpoint: the classes ``FrozenLMM.from_pretrained`` picks.

    Cached per worker process: a Ray worker reuses it across tasks.
    """
    from transformers import AutoConfig, CLIPImageProcessorPil, LlavaNextImageProcessorPil

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    is_next = config.model_type == "llava_next"
    cls = LlavaNextImageProcessorPil if is_next else CLIPImageProcessorPil
    return cls.from_pretrained(model, local_files_only=True), is_next


def derived_max_aspect(processor, is_next: bool) -> float | None:
    """The most elongated image the checkpoint's preprocessing can handle (None: any).

    LLaVA-NeXT (anyres) resizes the image into the best of its grid pinpoints and the base crop
    to a fixed square: bounded work at any aspect. A single-crop CLIP processor first resizes the
    SHORTER side to its crop size, so an elongated image grows without bound: the limit is where
    that resized image would pass Pillow's own pixel limit.
    """
    if is_next:
        return None
    size = getattr(processor, "size", None) or {}
    edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if not edge:
        return None
    limit = Image.MAX_IMAGE_PIXELS or 0
    return round(limit / float(edge) ** 2, 1) if limit else None


def preprocess(processor, is_next: bool, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (crops ``(n_crops, 3, S, S)`` float32, original (height, width)); = ``FrozenLMM.preprocess``."""
    out = processor(image, return_tensors="pt")  # as FrozenLMM.preprocess does, so the values are identical
    pixels = out["pixel_values"].numpy().astype(np.float32, copy=False)
    if is_next:
        size = tuple(int(v) for v in out["image_sizes"][0])
        pixels = pixels[0]  # (n_crops, 3, S, S): one image, no batch padding of crops
    else:
        size = (image.height, image.width)
    return np.ascontiguousarray(pixels), size  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# The Ray stage
# --------------------------------------------------------------------------------------


def load_images(batch: pa.Table, *, model: str, max_aspect: float | str | None = "auto", min_side: int = 1) -> pa.Table:
    """Stage 2 (a Ray task, or inside the scorer actor): add crops or an error to every row.

    ``max_aspect="auto"``: ``derived_max_aspect`` of the checkpoint's processor.
    """
    processor, is_next = image_processor(str(model))
    background = neutral_background(processor)
    if max_aspect == "auto":
        max_aspect = derived_max_aspect(processor, is_next)
    columns: dict[str, list] = {f.name: [] for f in OUTPUT_FIELDS}
    for image, root in zip(batch.column("image").to_pylist(), batch.column("image_root").to_pylist(), strict=True):
        out = dict.fromkeys(columns)
        if image is not None:
            where = image if not root else os.path.join(root, image)
            try:
                path = resolve_inside(image, root)
                where = str(path)
                rgb = load_rgb(path, max_aspect=max_aspect, min_side=min_side, background=background)
                try:
                    pixels, size = preprocess(processor, is_next, rgb)
                except Exception as err:  # noqa: BLE001 -- the processor's own failure on one image
                    raise ImageRejected("preprocess_failed", f"the image processor failed: {type(err).__name__}: {err}") from err
                out.update(pixels=pixels.tobytes(), pixels_shape=list(pixels.shape), image_size=list(size))
            except ImageRejected as err:
                out.update(
                    error_stage="load_image", error_code=err.code, error_reason=f"{image}: {err.reason}", error_detail=where
                )
        for name, value in out.items():
            columns[name].append(value)
    for f in OUTPUT_FIELDS:
        batch = batch.append_column(f, pa.array(columns[f.name], type=f.type))
    return batch
