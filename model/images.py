"""How an image file becomes the frozen LMM's 8-bit RGB input: one definition for every stage.

The scoring job (``pipeline/images.py``) and the pixels-mode router trainer
(``model/router_inputs.py``: ``--router-inputs pixels`` recomputes the vision features from the
image files) must decode an image exactly alike, or the trainer would see other features than
the ones the feedback was scored with. Rules (``to_rgb``, rejection codes): see
``pipeline/images.py``'s docstring.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "PA", "RGBA", "La", "RGBa")


class ImageRejected(ValueError):
    """An image that cannot be scored; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W): uint16 or int32
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
        grey = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "F":
        raise ImageRejected("unsupported_mode", "32-bit float pixels (mode F) have no defined 8-bit range")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info) or (mode == "L" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageRejected("unsupported_mode", f"mode {mode} cannot be converted to RGB ({err})") from err


def check_geometry(width: int, height: int, *, max_aspect: float | None, min_side: int = 1) -> None:
    """Reject images outside the size limits (``max_aspect=None``: no aspect limit)."""
    if min(width, height) < min_side:
        raise ImageRejected(
            "too_small", f"image is {width}x{height} px: a side is shorter than the minimum of {min_side} px"
        )
    aspect = max(width, height) / max(1, min(width, height))
    if max_aspect is not None and aspect > max_aspect:
        raise ImageRejected(
            "extreme_aspect",
            f"image is {width}x{height} px: aspect ratio {aspect:.1f}:1 exceeds the limit of {max_aspect:g}:1",
        )


def load_rgb(path: Path, *, max_aspect: float | None = None, min_side: int = 1, background=(128, 128, 128)) -> Image.Image:
    """Open, check, decode and convert one image file; ``ImageRejected`` with a code when it is bad."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageRejected("missing_file", "file not found") from None
    except OSError as err:
        raise ImageRejected("missing_file", f"cannot stat the file ({err})") from err
    if size == 0:
        raise ImageRejected("empty_file", "file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            check_geometry(image.width, image.height, max_aspect=max_aspect, min_side=min_side)
            image.load()
            return to_rgb(image, background)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("corrupt_image", f"not a recognised image ({size} bytes; corrupt or not an image)") from None
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        code = "truncated_image" if "truncated" in str(err) or isinstance(err, EOFError) else "corrupt_image"
        raise ImageRejected(code, f"cannot decode the image ({err})") from err


def neutral_background(processor) -> tuple[int, int, int]:
    """The processor's mean colour in 8 bits (LLaVA pads with it): the alpha background."""
    mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def resolve_inside(image: str, image_root: str | None) -> Path:
    """The file an image reference names, which must lie inside the (absolute) image root.

    ``outside_root`` when the reference -- an absolute path, a ``../`` path or a symlink, once
    resolved with ``realpath`` -- leaves the root, or when the sample has no root.
    """
    if not image_root:
        raise ImageRejected("outside_root", "no image root is recorded for this sample (re-ingest with --image-root)")
    root = os.path.realpath(image_root)
    real = os.path.realpath(os.path.join(image_root, image))
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ImageRejected("outside_root", f"resolves to {real}, outside the image root {root}; not opened")
    return Path(real)
