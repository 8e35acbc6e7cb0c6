"""Visual granularity scaler: one crop's projected features pooled to a ladder of levels.

AVG-LLaVA's scaler is training-free. A crop's projected features form a ``grid x grid``
map (24 x 24 = 576 tokens for CLIP-L/336 with patch 14). Levels are made by average
pooling with kernel = stride (the paper alternately stacks 1x2 and 2x1 pools):

    tokens  grid (h x w)  kernel
    576     24 x 24       (1, 1)
    288     24 x 12       (1, 2)
    144     12 x 12       (2, 2)
     72     12 x  6       (2, 4)
     36      6 x  6       (4, 4)

The public checkpoints list levels ascending (``36,72,144,288,576``) and router expert ``i``
is level ``i`` of that list, so a ``Ladder`` is always sorted ascending by token count.

Going beyond the paper (its stated limitation): any ladder of levels, including
intermediate ones such as 432 (24 x 18) or 216 (18 x 12). A level whose grid divides the
crop grid is pooled exactly with kernel = stride; any other uses adaptive average pooling.
Pooling happens AFTER the multimodal projector (SPEC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_GRID = 24
DEFAULT_LEVELS = (36, 72, 144, 288, 576)


class LadderError(ValueError):
    """A ladder specification that cannot be realised on the crop grid."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass(frozen=True)
class Level:
    """One granularity: ``h x w`` pooled tokens per crop."""

    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.h * self.w

    @property
    def name(self) -> str:
        return f"{self.h}x{self.w}"

    def is_exact(self, grid: int) -> bool:
        """True when kernel = stride pooling realises this level (both sides divide the grid)."""
        return grid % self.h == 0 and grid % self.w == 0


def _shape_for_tokens(tokens: int, grid: int) -> Level:
    """Pick the grid shape for a token count.

    Rule (reproduces the paper's ladder and the SPEC's examples 432 = 24x18, 216 = 18x12):
    candidates are ``h x w = tokens`` with ``w <= h <= grid`` and ``h / w <= 2``; prefer
    shapes that pool exactly (both sides divide the grid), then the tallest.
    """
    candidates = [
        Level(h, tokens // h)
        for h in range(1, grid + 1)
        if tokens % h == 0 and tokens // h <= h and h <= 2 * (tokens // h)
    ]
    if not candidates:
        raise LadderError(
            f"level {tokens} tokens does not fit a {grid}x{grid} grid as an h x w shape with "
            f"w <= h <= {grid} and h/w <= 2; give it explicitly as 'HxW'"
        )
    candidates.sort(key=lambda lv: (lv.is_exact(grid), lv.h), reverse=True)
    return candidates[0]


def parse_level(spec: int | str, grid: int = DEFAULT_GRID) -> Level:
    """``576`` / ``"576"`` -> Level(24, 24); ``"24x18"`` -> Level(24, 18)."""
    text = str(spec).strip().lower()
    if "x" in text:
        try:
            h, w = (int(part) for part in text.split("x"))
        except ValueError as err:
            raise LadderError(f"level {spec!r} is not 'HxW' with integer sides") from err
        level = Level(h, w)
    else:
        try:
            tokens = int(text)
        except ValueError as err:
            raise LadderError(f"level {spec!r} is neither a token count nor 'HxW'") from err
        if tokens <= 0:
            raise LadderError(f"level {spec!r} must have a positive token count")
        if tokens > grid * grid:
            raise LadderError(f"level {tokens} exceeds the {grid}x{grid} = {grid * grid} tokens of a crop")
        level = _shape_for_tokens(tokens, grid)
    if not (1 <= level.h <= grid and 1 <= level.w <= grid):
        raise LadderError(f"level {spec!r} ({level.name}) does not fit the {grid}x{grid} crop grid")
    return level


@dataclass(frozen=True)
class Ladder:
    """Ascending list of levels on a ``grid x grid`` crop. Router expert ``i`` = ``levels[i]``."""

    levels: tuple[Level, ...]
    grid: int = DEFAULT_GRID

    def __post_init__(self) -> None:
        if not self.levels:
            raise LadderError("a ladder needs at least one level")
        tokens = [lv.tokens for lv in self.levels]
        if len(set(tokens)) != len(tokens):
            dupes = sorted({t for t in tokens if tokens.count(t) > 1})
            raise LadderError(f"ladder has duplicate levels (tokens per crop): {dupes}")
        if tokens != sorted(tokens):
            raise LadderError(f"ladder must be ascending by tokens per crop, got {tokens}")
        for lv in self.levels:
            if not (1 <= lv.h <= self.grid and 1 <= lv.w <= self.grid):
                raise LadderError(f"level {lv.name} does not fit the {self.grid}x{self.grid} crop grid")

    @classmethod
    def parse(cls, spec: str | Sequence[int | str] | None = None, grid: int = DEFAULT_GRID) -> Ladder:
        """Build from ``"36,72,144,288,576"``, ``[36, 72]`` or ``["24x18", 216]``; sorted ascending.

        ``None`` gives the paper's default ladder.
        """
        if spec is None:
            spec = [t * grid * grid // (DEFAULT_GRID * DEFAULT_GRID) for t in DEFAULT_LEVELS]
        if isinstance(spec, str):
            items: list[int | str] = [s for s in spec.replace(" ", "").split(",") if s]
        else:
            items = list(spec)
        levels = sorted((parse_level(item, grid) for item in items), key=lambda lv: lv.tokens)
        return cls(tuple(levels), grid)

    @classmethod
    def default(cls) -> Ladder:
        return cls.parse(None)

    def __len__(self) -> int:
        return len(self.levels)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(lv.tokens for lv in self.levels)

    @property
    def spec(self) -> str:
        """Canonical text form, e.g. ``"6x6,12x6,12x12,24x12,24x24"``, saved in configs."""
        return ",".join(lv.name for lv in self.levels)

    def index(self, tokens: int) -> int:
        """Position of the level with ``tokens`` tokens per crop."""
        for i, lv in enumerate(self.levels):
            if lv.tokens == tokens:
                return i
        raise LadderError(f"level {tokens} is not in the ladder {list(self.tokens)}")

    def pool(self, features: torch.Tensor, level: Level | int) -> torch.Tensor:
        """Pool ``(..., grid*grid, d)`` crop features to ``(..., h*w, d)`` for one level.

        ``level`` is a Level or a position in this ladder.
        """
        lv = self.levels[level] if isinstance(level, int) else level
        g = self.grid
        if features.shape[-2] != g * g:
            raise ValueError(
                f"expected {g * g} tokens per crop ({g}x{g} grid), got {features.shape[-2]} "
                f"(features of shape {tuple(features.shape)})"
            )
        lead, d = features.shape[:-2], features.shape[-1]
        if lv.h == g and lv.w == g:
            return features
        x = features.reshape(-1, g, g, d).permute(0, 3, 1, 2)  # (B, d, g, g)
        if lv.is_exact(g):
            kernel = (g // lv.h, g // lv.w)
            x = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)  # (B, d, h, w)
        else:
            x = F.adaptive_avg_pool2d(x, (lv.h, lv.w))  # (B, d, h, w)
        return x.permute(0, 2, 3, 1).reshape(*lead, lv.tokens, d)  # (..., h*w, d)

    def pool_all(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Every level of the ladder from ONE encoding, ascending: ``[(..., tokens_i, d)]``."""
        return [self.pool(features, i) for i in range(len(self.levels))]
