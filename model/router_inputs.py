"""Router inputs, the user's choice of size: how a sample's vision features are stored and recovered.

``rglf score --router-inputs MODE`` decides what the ``router_inputs`` table
(``model.tables.ROUTER_INPUTS_SCHEMA``) holds per image sample, besides the instruction ids:

    fp16    the vision tower's selected-layer features (before the projector), float16:
            ``n_crops * grid^2 * dv * 2`` bytes. Exact (the default).
    fp8     the same features as float8 e4m3 with one float32 scale per (crop, channel):
            ``n_crops * grid^2 * dv + n_crops * dv * 4`` bytes, half of fp16 (+0.4% at dv 1024).
            Scale = the channel's max |value| over the crop's tokens / 448 (e4m3's largest
            finite value), so every channel uses the full e4m3 range; round to nearest even.
            Relative error ~2.5% per value, ~0.7% after the (linear, averaging) projector.
    pixels  no features: a reference to the image (``image`` under ``image_root``), a few dozen
            bytes; the trainer loads the frozen vision tower + image processor saved in
            ``router_side/vision/`` (``VisionSide``; never the language model) and recomputes
            the features per batch. Bytes on disk ~ the image file, more compute per step.
    none    no router_inputs rows at all: feedback only (SQL analysis without router training).

``encode_row`` builds a table row from one encoded image (the scoring job's write path calls
it); ``decode_vision`` turns a stored row back into float32 features ``(n_crops, grid^2, dv)``;
``save_router_side`` writes the frozen parts the trainer needs for the mode.

The per-channel scale is chosen over a per-row (per token) one: CLIP-style towers carry a few
outlier channels of large magnitude at every token, which a per-token scale would let dominate
every row; on the embedded default both give the same error (2.5%).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROUTER_INPUT_MODES = ("fp16", "fp8", "pixels", "none")
ENCODINGS = ("fp16", "fp8", "pixels")  # what a stored row can hold (``none`` stores no row)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
VISION_DIR = "vision"
VISION_WEIGHTS = "vision_tower.safetensors"
VISION_META = "vision_side.json"

# float8 e4m3fn code -> float32 (256 entries; the two NaN codes are never written)
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


class RouterInputsError(ValueError):
    """A router_inputs row that cannot be decoded (unknown encoding, wrong byte count)."""

    exit_code = 2


# ---- fp8 ------------------------------------------------------------------------------------


def fp8_encode(vision: np.ndarray | torch.Tensor) -> tuple[bytes, bytes]:
    """``(n_crops, tokens, dv)`` floats -> (e4m3 codes, float32 scales ``(n_crops, dv)``) as bytes."""
    x = torch.as_tensor(vision).detach().to("cpu", torch.float32)
    if x.dim() != 3:
        raise ValueError(f"vision features must be (n_crops, tokens, dv), got shape {tuple(x.shape)}")
    amax = x.abs().amax(dim=1, keepdim=True)  # (C, 1, dv)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.numpy().tobytes(), scale[:, 0].numpy().astype("<f4").tobytes()


def fp8_decode(codes: bytes | memoryview, scales: bytes | memoryview, n_crops: int, tokens: int, dv: int) -> np.ndarray:
    """Inverse of ``fp8_encode``: float32 ``(n_crops, tokens, dv)``."""
    q = np.frombuffer(codes, dtype=np.uint8).reshape(n_crops, tokens, dv)
    s = np.frombuffer(scales, dtype="<f4").reshape(n_crops, 1, dv)
    return _E4M3_VALUES[q] * s


# ---- rows -----------------------------------------------------------------------------------


def encode_row(
    mode: str,
    *,
    sample_id: str,
    vision: torch.Tensor | np.ndarray,
    grid: int,
    instruction_ids: list[int],
    image_size: tuple[int, int] | list[int],
    image: str | None = None,
    image_root: str | None = None,
) -> dict[str, Any] | None:
    """One ``router_inputs`` row (ROUTER_INPUTS_SCHEMA) for an encoded image; None for mode ``none``.

    ``vision``: the selected layer's features ``(n_crops, grid^2, dv)``, any float dtype.
    ``image`` / ``image_root``: the sample's image reference as ingested (needed by ``pixels``).
    """
    if mode not in ROUTER_INPUT_MODES:
        raise ValueError(f"router inputs mode must be one of {ROUTER_INPUT_MODES}, got {mode!r}")
    if mode == "none":
        return None
    n_crops, tokens, dv = (int(s) for s in vision.shape)
    if tokens != grid * grid:
        raise ValueError(f"vision features have {tokens} tokens per crop, a {grid}x{grid} grid needs {grid * grid}")
    row: dict[str, Any] = {
        "sample_id": sample_id, "n_crops": n_crops, "grid": grid, "vision_hidden": dv,
        "instruction_ids": [int(i) for i in instruction_ids], "image_size": [int(v) for v in image_size],
        "encoding": mode, "feature_scales": None, "image": image, "image_root": image_root,
    }
    if mode == "fp16":
        v = torch.as_tensor(vision).detach().to("cpu", torch.float16).numpy().astype("<f2", copy=False)
        row["vision_features"] = np.ascontiguousarray(v).tobytes()
    elif mode == "fp8":
        row["vision_features"], row["feature_scales"] = fp8_encode(vision)
    else:  # pixels: the reference only; the trainer re-encodes the image
        if image is None:
            raise ValueError(f"sample {sample_id}: --router-inputs pixels needs the image path")
        row["vision_features"] = b""
    return row


def expected_nbytes(encoding: str, n_crops: int, grid: int, dv: int) -> int:
    """Bytes of ``vision_features`` for a row of this encoding (pixels: 0)."""
    if encoding == "fp16":
        return n_crops * grid * grid * dv * 2
    if encoding == "fp8":
        return n_crops * grid * grid * dv
    return 0


def decode_vision(
    encoding: str | None, data: bytes | memoryview, scales: bytes | memoryview | None, n_crops: int, grid: int, dv: int,
    *, sample_id: str = "?",
) -> np.ndarray:
    """A stored fp16 / fp8 row -> float32 features ``(n_crops, grid^2, dv)`` (``None`` = fp16: older runs)."""
    encoding = encoding or "fp16"
    if encoding not in ("fp16", "fp8"):
        raise RouterInputsError(f"sample {sample_id}: router inputs encoded as {encoding!r} hold no features to decode")
    want = expected_nbytes(encoding, n_crops, grid, dv)
    if len(data) != want:
        raise RouterInputsError(
            f"router_inputs: sample {sample_id!r} has {len(data)} feature bytes, expected {want} "
            f"({encoding}, {n_crops} crops x {grid}x{grid} x {dv})"
        )
    if encoding == "fp16":
        return np.frombuffer(data, dtype="<f2").reshape(n_crops, grid * grid, dv).astype(np.float32)
    if scales is None or len(scales) != n_crops * dv * 4:
        raise RouterInputsError(f"router_inputs: sample {sample_id!r} (fp8) lacks its {n_crops}x{dv} float32 scales")
    return fp8_decode(data, scales, n_crops, grid * grid, dv)


def row_nbytes(row: dict[str, Any]) -> int:
    """Bytes a row stores for the router: features + scales + 4 per instruction id (pixels: the image
    reference's characters; the image file itself is not counted here, see ``image_nbytes``)."""
    n = len(row.get("vision_features") or b"") + len(row.get("feature_scales") or b"")
    if row.get("encoding") == "pixels":
        n += len((row.get("image") or "").encode())
    return n + 4 * len(row.get("instruction_ids") or ())


BYTES_FORMULA = {
    "fp16": "n_crops * grid^2 * vision_hidden * 2 + 4 * n_instruction_ids",
    "fp8": "n_crops * grid^2 * vision_hidden + n_crops * vision_hidden * 4 (scales) + 4 * n_instruction_ids",
    "pixels": "the image reference + 4 * n_instruction_ids (the image file itself stays under the image root)",
    "none": "0 (no router inputs)",
}
STORED_COLUMNS = ("vision_features", "feature_scales", "instruction_ids", "image")


def stored_nbytes(files) -> tuple[int, int]:
    """(rows, bytes) that ``router_inputs`` part files store for the router: the uncompressed size of
    the feature, scale, instruction and image-reference columns, from the Parquet metadata alone."""
    import pyarrow.parquet as pq

    rows = total = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in STORED_COLUMNS:
                    total += col.total_uncompressed_size
    return rows, total


# ---- pixels: the frozen vision tower ----------------------------------------------------------


class VisionSide:
    """The frozen vision tower + image processor, for ``--router-inputs pixels`` (no language model).

    Saved by the scoring job into ``router_side/vision/`` (the checkpoint's config, the tower's
    weights, the processor's config); ``preprocess`` and ``vision_features`` ARE
    ``FrozenLMM``'s own methods (shared, not copied), so the trainer recomputes bit for bit the
    features the scoring job would have stored (tested).
    """

    def __init__(self, config, vision_tower: torch.nn.Module, image_processor) -> None:
        from .lmm import FrozenLMM

        self.config = config
        self.vision_tower = vision_tower.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.is_next = config.model_type == "llava_next"
        vc = config.vision_config
        self.grid = vc.image_size // vc.patch_size
        self._preprocess = FrozenLMM.preprocess
        self._vision_features = FrozenLMM.vision_features

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def vision_hidden(self) -> int:
        return self.config.vision_config.hidden_size

    def to(self, device: str | torch.device) -> VisionSide:
        self.vision_tower.to(device)
        return self

    @classmethod
    def from_lmm(cls, lmm) -> VisionSide:
        return cls(lmm.config, lmm.vision_tower, lmm.image_processor)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)  # config.json: the language model's CONFIG only, no weights
        self.image_processor.save_pretrained(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.vision_tower.state_dict().items()}
        tmp = path / f".{VISION_WEIGHTS}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / VISION_WEIGHTS)
        meta = {"processor_class": type(self.image_processor).__name__, "grid": self.grid,
                "vision_hidden": self.vision_hidden, "dtype": str(self.dtype).replace("torch.", "")}
        (path / VISION_META).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VisionSide:
        import transformers
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / VISION_META).is_file():
            raise FileNotFoundError(
                f"{path} has no {VISION_META}: the run was not scored with --router-inputs pixels, so there is no "
                "vision tower to recompute features with"
            )
        meta = json.loads((path / VISION_META).read_text())
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        tower = transformers.AutoModel.from_config(config.vision_config)
        tower.load_state_dict(load_file(str(path / VISION_WEIGHTS)))
        processor = getattr(transformers, meta["processor_class"]).from_pretrained(path, local_files_only=True)
        return cls(config, tower.to(device=device, dtype=dtype), processor)

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB PIL image -> (crops ``(n_crops, 3, S, S)``, (height, width)): ``FrozenLMM.preprocess``."""
        return self._preprocess(self, image)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops -> the selected layer's features ``(N, grid^2, dv)``: ``FrozenLMM.vision_features``."""
        return self._vision_features(self, pixel_values)

    def load_rgb(self, image: str, image_root: str | None):
        """The image file as the scoring job decoded it (``model.images``: same conversion rules)."""
        from .images import load_rgb, neutral_background, resolve_inside

        return load_rgb(resolve_inside(image, image_root), max_aspect=None, min_side=0,
                        background=neutral_background(self.image_processor))

    @torch.no_grad()
    def encode(self, images: list[tuple[str, str | None]]) -> list[np.ndarray]:
        """Image references -> float32 features ``(n_crops, grid^2, dv)`` each, one vision pass."""
        pixels = [self.preprocess(self.load_rgb(image, root))[0] for image, root in images]
        if not pixels:
            return []
        feats = self.vision_features(torch.cat(pixels)).float().cpu()
        return [f.numpy() for f in feats.split([p.shape[0] for p in pixels])]


def save_router_side(lmm, path: str | Path, mode: str = "fp16") -> Path:
    """``router_side/`` for a router-inputs mode: the frozen projector + embedding table (every
    mode), plus the vision tower + image processor in ``vision/`` for ``pixels``."""
    path = Path(path)
    lmm.router_side().save(path)
    if mode == "pixels":
        VisionSide.from_lmm(lmm).save(path / VISION_DIR)
    return path
