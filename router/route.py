"""Route images + questions: the router's level, its probabilities, and optionally the answer.

``Router`` loads the router and the frozen model ONCE and routes many (image, question) pairs
in batches; ``route()`` (one image, ``rglf route --image``) and ``route_dataset()`` (a whole
LLaVA-format file, ``rglf route --data``) are built on it.

The router's inputs are built as the reference builds them at inference, from the live model:
the projected features of every crop (the vision tower and projector run once per batch of
images, ``FrozenLMM.encode``) and the embeddings of the prompt's ids without the image, BOS
kept (AVG-LLaVA's ``get_pure_text_embedding`` on the prompt), in the checkpoint's conversation
template: for a question, ``lmm.instruction_ids(lmm.prompt([("human", "<image>\\n" + q)], True))``.
For a single vicuna_v1 question these are exactly the instruction ids the scoring job stores for
training. A batch pads crops and instruction tokens and passes their masks, so a batch routes
exactly as one image at a time does.

The router is a folder written by ``rglf train``, or a published AVG-LLaVA router: a converted
checkpoint (``rglf convert``), a folder from ``rglf export-router``, or an original AVG-LLaVA
checkpoint (``load_router_any``); with such a converted checkpoint the model defaults to it.

The chosen level is the router's argmax (the paper), or with a budget
``argmax_i(log p_i - lam * tokens_i / tokens_finest)`` with ``lam`` from the router folder's
``budget.json`` (``rglf eval --save-budget``). With ``answer=True`` the LMM then answers
greedily at that level only.

``route_dataset`` output (one Parquet file, written to a temporary name and renamed), one row
per input record, input order::

    sample_id, source, image          from the record (source: the record's, else the file's stem)
    question                          the first human turn's text
    level_index, level_tokens, level_grid    the chosen level (tokens per crop, h x w)
    n_crops, n_visual_tokens          crops of the image; visual tokens after packing at the level
    finest_visual_tokens              visual tokens the finest level would have used
    token_fraction                    n_visual_tokens / finest_visual_tokens
    p_<tokens>                        the router's probability of each level (one column per level)
    answer                            the greedy answer at the chosen level (null without --answer)
    error_code, error                 why the record was not routed (null when it was); such a
                                      row has nulls in the routing columns
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rglf.model.conversation import IMAGE_PLACEHOLDER, ConversationError, normalise_turns
from rglf.model.router import ROUTER_CONFIG, ROUTER_WEIGHTS, load_router
from rglf.router.budget import budget_choice, lam_for_budget, level_costs, log_softmax

if TYPE_CHECKING:
    from PIL.Image import Image

    from rglf.model.lmm import Encoded, FrozenLMM
    from rglf.model.router import GranularityRouter

Progress = Callable[[int, "int | None", "dict[str, Any] | None"], None]


class RouteInputError(ValueError):
    """One input that cannot be routed (a bad record, a missing or unreadable image)."""

    exit_code = 2  # cli.EXIT_CODES: bad input (``route_dataset`` turns it into an error row instead)

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RouteError(ValueError):
    """The routing cannot run at all (no records, router and model that do not fit together)."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class Prepared:
    """One (image, conversation) ready to route: crops, the instruction ids, the turns to answer."""

    pixels: torch.Tensor  # (n_crops, 3, S, S)
    image_size: tuple[int, int]
    instruction_ids: list[int]
    prompt_turns: list[tuple[str, str]]  # the conversation up to (and including) the last question


@dataclass
class Routed:
    """Routing decisions of a batch, one entry per input, ladder order for the level axis."""

    ladder: tuple[int, ...]  # tokens per crop of each level, ascending
    level_index: np.ndarray  # (B,) chosen level
    level_tokens: np.ndarray  # (B,) tokens per crop of the chosen level
    probabilities: np.ndarray  # (B, N) the router's softmax (before any budget)
    n_visual_tokens: np.ndarray  # (B,) visual tokens after packing at the chosen level
    visual_tokens_per_level: np.ndarray  # (B, N) what every level would have used
    n_crops: np.ndarray  # (B,)
    image_sizes: list[tuple[int, int]]
    lam: float | None = None
    budget: float | None = None
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.level_index)

    @property
    def token_fraction(self) -> np.ndarray:
        """(B,) visual tokens at the chosen level / at the finest level."""
        return self.n_visual_tokens / self.visual_tokens_per_level[:, -1]


@dataclass
class Router:
    """A trained router and the frozen model it routes for, loaded once.

    >>> router = Router.load("runs/demo/router")            # the embedded default model
    >>> routed = router.route(["a.png", "b.png"], ["What colour is the background?"] * 2)
    >>> routed.level_tokens, routed.probabilities, routed.n_visual_tokens
    """

    router: GranularityRouter
    lmm: FrozenLMM
    router_dir: Path | None = None

    @classmethod
    def load(
        cls, router_dir: str | Path, model: str | Path | None = None, *, device: str = "auto", template: str = "auto"
    ) -> Router:
        """Load ``router_dir`` (a ``rglf train`` folder or a published router, ``load_router_any``) and the
        frozen ``model`` (an HF-format LLaVA(-NeXT) folder; default: ``router_dir`` when it is a converted
        checkpoint, else the embedded default) once. ``device``: auto, cpu or cuda. ``template``: the
        conversation template (``auto``: the checkpoint's, see ``conversation.resolve_template``)."""
        from rglf.model.lmm import FrozenLMM

        device = resolve_device(device)
        model = Path(model) if model is not None else default_model(router_dir)
        router = load_router_any(router_dir, device)
        lmm = FrozenLMM.from_pretrained(model, device=device, ladder=router.config.ladder, template=template)
        if lmm.grid != router.config.grid or lmm.hidden_size != router.config.hidden_size:
            raise RouteError(
                f"router {router_dir} expects a {router.config.grid}x{router.config.grid} grid of width "
                f"{router.config.hidden_size}; model {model} has {lmm.grid}x{lmm.grid}, width {lmm.hidden_size}"
            )
        return cls(router=router, lmm=lmm, router_dir=Path(router_dir))

    @property
    def ladder(self) -> tuple[int, ...]:
        return tuple(self.router.ladder.tokens)

    # ---- inputs ----------------------------------------------------------------------------

    def prepare(self, image: str | Path | Image, question: str | Sequence[tuple[str, str]]) -> Prepared:
        """An image (path or PIL image) and a question (or LLaVA turns) -> router inputs.

        Raises ``RouteInputError`` for a missing or unreadable image or a bad conversation.
        """
        turns = _prompt_turns(question)
        pil = _open_rgb(image)
        pixels, size = self.lmm.preprocess(pil)
        ids = self.lmm.instruction_ids(self.lmm.prompt(turns, True))  # the prompt's ids but the image, BOS kept
        return Prepared(pixels=pixels, image_size=size, instruction_ids=ids, prompt_turns=turns)

    # ---- routing ---------------------------------------------------------------------------

    def lam_for(self, budget: float | None, lam: float | None) -> float | None:
        """The budget penalty: ``lam`` as given, or the one calibrated for ``budget`` in budget.json."""
        if budget is not None and lam is not None:
            raise RouteError("give a budget (calibrated lam from budget.json) or a lam, not both")
        if budget is None:
            return lam
        if self.router_dir is None:
            raise RouteError("a budget needs the router folder's budget.json; pass lam instead")
        return lam_for_budget(self.router_dir, budget).lam  # read each time: `rglf eval --save-budget` may rewrite it

    def route(
        self,
        images: Sequence[str | Path | Image],
        questions: Sequence[str] | str,
        *,
        batch_size: int = 16,
        budget: float | None = None,
        lam: float | None = None,
        answer: bool = False,
        max_new_tokens: int = 32,
    ) -> Routed:
        """Route every (image, question) pair, ``batch_size`` images per vision + router pass.

        ``questions``: one per image, or one string for all. ``budget`` / ``lam``: see the module
        docstring. ``answer``: also generate the greedy answer at each chosen level.
        """
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        items = [self.prepare(im, q) for im, q in zip(images, questions, strict=True)]
        return self.route_prepared(items, batch_size=batch_size, budget=budget, lam=lam, answer=answer,
                                   max_new_tokens=max_new_tokens)

    def route_prepared(
        self,
        items: Sequence[Prepared],
        *,
        batch_size: int = 16,
        budget: float | None = None,
        lam: float | None = None,
        answer: bool = False,
        max_new_tokens: int = 32,
    ) -> Routed:
        """``route`` for inputs already ``prepare``d (the dataset path prepares them one by one
        to turn a bad image into an error row)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lam = self.lam_for(budget, lam)
        n_levels = len(self.ladder)
        logits = np.zeros((len(items), n_levels))
        visual = np.zeros((len(items), n_levels), dtype=np.int64)
        n_crops = np.zeros(len(items), dtype=np.int64)
        encodings: list[Encoded] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = self.lmm.encode([p.pixels for p in chunk], [p.image_size for p in chunk])  # one vision pass
            logits[start : start + len(chunk)] = self._logits(enc, [p.instruction_ids for p in chunk])
            for k, e in enumerate(enc):
                n_crops[start + k] = e.n_crops
                visual[start + k] = [self.lmm.n_visual_tokens(e.image_size, e.n_crops, i) for i in range(n_levels)]
            if answer:
                encodings.extend(enc)
        tokens = np.asarray(self.ladder)
        choice = budget_choice(logits, level_costs(tokens), lam or 0.0) if len(items) else np.zeros(0, dtype=np.int64)
        rows = np.arange(len(items))
        routed = Routed(
            ladder=self.ladder,
            level_index=choice,
            level_tokens=tokens[choice],
            probabilities=np.exp(log_softmax(logits)) if len(items) else np.zeros((0, n_levels)),
            n_visual_tokens=visual[rows, choice],
            visual_tokens_per_level=visual,
            n_crops=n_crops,
            image_sizes=[tuple(p.image_size) for p in items],
            lam=lam,
            budget=budget,
        )
        if answer:
            routed.answers = [
                self.lmm.generate(p.prompt_turns, e, int(c), max_new_tokens=max_new_tokens)
                for p, e, c in zip(items, encodings, choice, strict=True)
            ]
        return routed

    @torch.inference_mode()
    def _logits(self, encoded: Sequence[Encoded], instruction_ids: Sequence[list[int]]) -> np.ndarray:
        """Router logits ``(B, N)`` of encoded images: crops and instruction tokens padded with masks."""
        lmm = self.lmm
        bsz = len(encoded)
        c_max = max(e.n_crops for e in encoded)
        first = encoded[0].projected
        feats = first.new_zeros(bsz, c_max, *first.shape[1:]).float()  # (B, C, grid^2, d)
        crop_mask = torch.zeros(bsz, c_max, dtype=torch.bool, device=first.device)
        for b, e in enumerate(encoded):
            feats[b, : e.n_crops] = e.projected.float()
            crop_mask[b, : e.n_crops] = True
        t_max = max((len(t) for t in instruction_ids), default=0)
        ids = torch.zeros(bsz, t_max, dtype=torch.long)
        text_mask = torch.zeros(bsz, t_max, dtype=torch.bool)
        for b, t in enumerate(instruction_ids):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            text_mask[b, : len(t)] = True
        text = lmm.embed(ids.to(lmm.device)).float()  # (B, T, d); padding rows are masked by the router
        logits = self.router(feats, crop_mask, text, text_mask.to(lmm.device))  # (B, N)
        return logits.double().cpu().numpy()


def load_router_any(path: str | Path, device: str = "cpu") -> GranularityRouter:
    """A router folder from ``rglf train``, or a published AVG-LLaVA router (``model.convert.load_published_router``)."""
    from rglf.model.convert import is_published_router, load_published_router

    path = Path(path)
    if (path / ROUTER_CONFIG).is_file():
        return load_router(path, device)
    if is_published_router(path):
        return load_published_router(path, device)
    raise FileNotFoundError(
        f"{path}: neither a router folder ({ROUTER_CONFIG}, from `rglf train`) nor a published AVG-LLaVA router "
        "(a `rglf convert` / `rglf export-router` output, or an original AVG-LLaVA checkpoint). Pass one of those"
    )


def default_model(router_dir: str | Path) -> Path:
    """``router_dir`` itself when it is an HF-format checkpoint (a converted AVG-LLaVA carries its router),
    else the embedded default."""
    from rglf.model.toy import DEFAULT_CHECKPOINT

    config = Path(router_dir) / "config.json"
    try:
        return Path(router_dir) if config.is_file() and "text_config" in json.loads(config.read_text()) else DEFAULT_CHECKPOINT
    except (json.JSONDecodeError, OSError):
        return DEFAULT_CHECKPOINT


def _prompt_turns(question: str | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """A question, or LLaVA turns, -> the turns up to the last question, the image placeholder first."""
    if isinstance(question, str):
        if not question.strip():
            raise RouteInputError("empty_question", "the question is empty")
        return [("human", question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}")]
    turns = list(question)
    if turns and turns[-1][0].lower() in ("human", "user"):
        turns = [*turns, ("gpt", "x")]  # normalise_turns wants an answer last; cut off below
    try:
        turns = normalise_turns(turns)[:-1]
    except ConversationError as err:
        raise RouteInputError("bad_conversation", str(err)) from err
    first = turns[0][1]
    if IMAGE_PLACEHOLDER not in first:
        turns[0] = ("human", f"{IMAGE_PLACEHOLDER}\n{first}")
    elif first.count(IMAGE_PLACEHOLDER) > 1:
        raise RouteInputError("several_placeholders", f"the first turn holds {IMAGE_PLACEHOLDER} more than once")
    return turns


def _open_rgb(image: str | Path | Image) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise RouteInputError("missing_file", f"{path}: no such image file")
    try:
        with PILImage.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RouteInputError("corrupt_image", f"{path}: not a readable image ({err})") from err


# ---- one image (``rglf route --image``) ------------------------------------------------------


def _stamp(path: Path) -> tuple[str, float, int]:
    stat = path.stat() if path.exists() else None
    return (str(path.resolve()), stat.st_mtime if stat else 0.0, stat.st_size if stat else 0)


@functools.lru_cache(maxsize=2)
def _cached_router(router_key: tuple, model_key: tuple, device: str, template: str) -> Router:
    # keys carry the files' mtimes and sizes: a router re-trained in place is reloaded
    return Router.load(router_key[0][0], model_key[0], device=device, template=template)


def load_cached(router_dir: str | Path, model: str | Path, device: str = "auto", template: str = "auto") -> Router:
    """``Router.load`` once per (router, model, device, template): repeated ``route()`` calls reuse it."""
    from rglf.model.conversation import CHECKPOINT_RECORD
    from rglf.model.convert import ROUTER_FILE

    router_dir = Path(router_dir)
    router_key = (_stamp(router_dir), *(_stamp(router_dir / f) for f in (ROUTER_CONFIG, ROUTER_WEIGHTS, ROUTER_FILE)))
    model_key = (str(Path(model).resolve()), _stamp(Path(model) / "config.json"), _stamp(Path(model) / CHECKPOINT_RECORD))
    return _cached_router(router_key, model_key, resolve_device(device), template)


def route(
    router_dir: str | Path,
    model: str | Path,
    image: str | Path,
    question: str,
    *,
    answer: bool = False,
    budget: float | None = None,
    lam: float | None = None,
    max_new_tokens: int = 32,
    device: str = "auto",
    template: str = "auto",
) -> dict[str, Any]:
    """Route one (image, question); returns a JSON-ready dict (``rglf route --format json``).

    The router and the model are loaded once per (router, model, device) and reused by later
    calls; to route many images, use ``Router.load(...).route(images, questions)``.
    """
    r = load_cached(router_dir, model, device, template)
    item = r.prepare(image, question)  # RouteInputError (exit 2) for a missing or unreadable image
    routed = r.route_prepared([item], budget=budget, lam=lam, answer=answer, max_new_tokens=max_new_tokens)
    tokens = r.ladder
    choice = int(routed.level_index[0])
    level = r.router.ladder.levels[choice]
    visual = [int(v) for v in routed.visual_tokens_per_level[0]]
    return {
        "level_index": choice,
        "level_tokens": level.tokens,
        "level_grid": level.name,
        "n_visual_tokens": visual[choice],
        "n_crops": int(routed.n_crops[0]),
        "image_size": list(routed.image_sizes[0]),
        "probabilities": {str(t): float(p) for t, p in zip(tokens, routed.probabilities[0], strict=True)},
        "visual_tokens_per_level": {str(t): v for t, v in zip(tokens, visual, strict=True)},
        "token_fraction": visual[choice] / visual[-1],
        "budget": budget,
        "lam": routed.lam,
        "question": question,
        "template": r.lmm.template.name,
        "answer": routed.answers[0] if routed.answers else None,
    }


def format_route(result: dict[str, Any]) -> str:
    """Human-readable summary of ``route``'s result."""
    lines = [
        f"level: {result['level_tokens']} tokens per crop ({result['level_grid']}), "
        f"{result['n_visual_tokens']} visual tokens ({100 * result['token_fraction']:.0f}% of the finest level)",
        "probabilities: " + "  ".join(f"{t}: {p:.3f}" for t, p in result["probabilities"].items()),
    ]
    if result["lam"] is not None:
        lines.append(f"budget: {result['budget']}  lam: {result['lam']:.4f}")
    if result["answer"] is not None:
        lines.append(f"answer: {result['answer']}")
    return "\n".join(lines)


# ---- a whole dataset (``rglf route --data``) -------------------------------------------------


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) of a LLaVA-format JSON list or JSONL file; a JSONL line that does not
    parse becomes a ``RouteInputError`` in place of its record."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise RouteError(f"{path}: not valid JSON ({err})") from err
        return [(f"{path}[{i}]", r) for i, r in enumerate(records)]
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                out.append((f"{path}:{lineno}", RouteInputError("invalid_json", f"{path}:{lineno}: {err.msg}")))
    return out


def parse_record(record: Any, where: str) -> tuple[str, str, list[tuple[str, str]]]:
    """A LLaVA record -> (sample_id, image path, turns); ``RouteInputError`` when it cannot be routed."""
    if isinstance(record, RouteInputError):
        raise record
    if not isinstance(record, dict):
        raise RouteInputError("not_an_object", f"{where}: record is a {type(record).__name__}, not a JSON object")
    sid = record.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int) or not str(sid).strip():
        raise RouteInputError("missing_id", f"{where}: record has no usable 'id'")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise RouteInputError("no_image", f"{where} (id {sid}): no 'image' path (the router needs an image)")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv or not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in conv
    ):
        raise RouteInputError("bad_conversation", f"{where} (id {sid}): 'conversations' must be a list of {{from, value}}")
    return str(sid), image, [(t["from"], t["value"]) for t in conv]


@dataclass
class RouteDatasetReport:
    """What ``route_dataset`` did (the one-line summary of ``rglf route --data``)."""

    records: int = 0
    routed: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    mean_visual_tokens: float | None = None
    finest_mean_visual_tokens: float | None = None
    level_share: dict[str, float] = field(default_factory=dict)
    out: str = ""

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_code.values())

    @property
    def exit_code(self) -> int:
        """0: every record routed; 3: some were rejected, or the input held no record."""
        return 3 if self.rejected or self.records == 0 else 0

    def summary(self) -> str:
        if self.records == 0:
            return f"route: the input holds no records (empty); wrote an empty table -> {self.out}"
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected_by_code.items()))
        head = f"route: {self.routed:,} of {self.records:,} records routed" + (
            f" ({self.rejected:,} rejected: {codes}; see error_code)" if self.rejected else ""
        )
        if not self.routed:
            return f"{head} -> {self.out}"
        reduction = 1.0 - self.mean_visual_tokens / self.finest_mean_visual_tokens
        return (
            f"{head}; mean {self.mean_visual_tokens:,.0f} visual tokens per sample vs "
            f"{self.finest_mean_visual_tokens:,.0f} at the finest level ({100 * reduction:.1f}% fewer) -> {self.out}"
        )


def route_dataset(
    router: Router,
    data: str | Path,
    image_root: str | Path,
    out: str | Path,
    *,
    batch_size: int = 16,
    budget: float | None = None,
    lam: float | None = None,
    answer: bool = False,
    max_new_tokens: int = 32,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> RouteDatasetReport:
    """Route every record of a LLaVA-format file (JSON list or JSONL) in batches; write ``out``
    (Parquet, see the module docstring) atomically. Bad records and images become error rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, image_root, out = Path(data), Path(image_root), Path(out)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file")
    lam = router.lam_for(budget, lam)  # a budget that is not calibrated fails before any work
    records = read_records(data)
    tokens = router.ladder
    schema = pa.schema(
        [
            ("sample_id", pa.string()), ("source", pa.string()), ("image", pa.string()), ("question", pa.string()),
            ("level_index", pa.int16()), ("level_tokens", pa.int32()), ("level_grid", pa.string()),
            ("n_crops", pa.int16()), ("n_visual_tokens", pa.int32()), ("finest_visual_tokens", pa.int32()),
            ("token_fraction", pa.float64()),
            *[(f"p_{t}", pa.float64()) for t in tokens],
            ("answer", pa.string()), ("error_code", pa.string()), ("error", pa.string()),
        ]
    )
    report = RouteDatasetReport(records=len(records), out=str(out))
    codes: Counter[str] = Counter()
    chosen: Counter[int] = Counter()
    visual_sum = finest_sum = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = pq.ParquetWriter(tmp, schema)
    try:
        for start in range(0, max(len(records), 1), batch_size):
            rows: list[dict[str, Any]] = []
            ready: list[tuple[int, Prepared]] = []
            for where, record in records[start : start + batch_size]:
                row: dict[str, Any] = {name: None for name in schema.names}
                if isinstance(record, dict):
                    row["sample_id"] = None if record.get("id") is None else str(record.get("id"))
                    row["image"] = record.get("image") if isinstance(record.get("image"), str) else None
                    src = record.get("source")
                    row["source"] = src if isinstance(src, str) and src.strip() else data.stem
                try:
                    sid, image, turns = parse_record(record, where)
                    row["question"] = next((t for r, t in turns if r.lower() in ("human", "user")), "")
                    row["question"] = row["question"].replace(IMAGE_PLACEHOLDER, "").strip()
                    ready.append((len(rows), router.prepare(image_root / image, turns)))
                except RouteInputError as err:
                    row.update(error_code=err.code, error=err.reason if where in err.reason else f"{where}: {err.reason}")
                    codes[err.code] += 1
                rows.append(row)
            routed = _route_or_reject(router, ready, rows, codes, batch_size, lam, answer, max_new_tokens)
            for k, (pos, _) in enumerate(routed[1]):
                r, row, choice = routed[0], rows[pos], int(routed[0].level_index[k])
                row.update(
                    level_index=choice, level_tokens=int(tokens[choice]),
                    level_grid=router.router.ladder.levels[choice].name, n_crops=int(r.n_crops[k]),
                    n_visual_tokens=int(r.n_visual_tokens[k]), finest_visual_tokens=int(r.visual_tokens_per_level[k, -1]),
                    token_fraction=float(r.token_fraction[k]),
                    **{f"p_{t}": float(p) for t, p in zip(tokens, r.probabilities[k], strict=True)},
                    answer=r.answers[k] if r.answers is not None else None,
                )
                visual_sum += row["n_visual_tokens"]
                finest_sum += row["finest_visual_tokens"]
                chosen[int(tokens[choice])] += 1
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            if progress is not None:
                done = min(start + batch_size, len(records))
                progress(done, len(records), {"rejected": sum(codes.values())} if codes else {})
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    report.rejected_by_code = dict(codes)
    report.routed = sum(chosen.values())
    if report.routed:
        report.mean_visual_tokens = visual_sum / report.routed
        report.finest_mean_visual_tokens = finest_sum / report.routed
        report.level_share = {str(t): chosen[t] / report.routed for t in tokens}
    if log is not None:
        log(report.summary())
    return report


def _route_or_reject(router, ready, rows, codes, batch_size, lam, answer, max_new_tokens):
    """Route the prepared items of one batch; an image the model cannot encode becomes an error row
    (the batch is retried one by one so the others are still routed)."""
    if not ready:
        return None, []
    items = [p for _, p in ready]
    try:
        return router.route_prepared(items, batch_size=batch_size, lam=lam, answer=answer,
                                     max_new_tokens=max_new_tokens), ready
    except ValueError:
        if len(ready) == 1:
            pos = ready[0][0]
            rows[pos].update(error_code="encode_failed", error=f"{rows[pos]['image']}: the model could not encode it")
            codes["encode_failed"] += 1
            return None, []
    kept: list[tuple[int, Prepared]] = []
    for pos, item in ready:
        r, ok = _route_or_reject(router, [(pos, item)], rows, codes, 1, lam, False, max_new_tokens)
        if ok:
            kept.append((pos, item))
    return _route_or_reject(router, kept, rows, codes, batch_size, lam, answer, max_new_tokens)
