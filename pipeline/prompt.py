"""``rglf prompt DATA.json --model CKPT``: show exactly what the scoring job scores, record by record.

For every LLaVA-format record (validated as ``rglf ingest`` does): the rendered prompt in the
checkpoint's conversation template, the token pieces with the answer tokens marked, the image
placeholder's position, and the image's visual-token count at every level (from the image's
size and the checkpoint's config: no weights are loaded, no pixels decoded). The ids are
``FrozenLMM.tokenize``'s, i.e. the ones ``rglf score`` feeds the model; JSON output gives them
as ``input_ids`` and ``labels`` (-100 outside the answers), one object per line, so scripts can
diff them against another tokenisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rglf.model.conversation import IGNORE_INDEX, ConversationError, resolve_template, tokenize_conversation

from .ingest import RecordError, parse_record, read_records

FORMATS = ("table", "json")


@dataclass
class PromptConfig:
    """Options of ``rglf prompt``."""

    data: Path
    """LLaVA-format JSON (a list) or JSONL file."""
    model: Path
    """HF-format checkpoint folder: its tokenizer, config and recorded template are read (not its weights)."""
    template: str = "auto"
    """Conversation template name, or ``auto`` (the checkpoint's, see ``conversation.resolve_template``)."""
    image_root: Path | None = None
    """Folder the records' image paths are relative to (default: the data file's folder)."""
    ladder: str | None = None
    """Levels to count visual tokens for (default: the checkpoint's recorded ladder, else the paper's five)."""
    limit: int | None = None
    """Show at most this many records."""

    def __post_init__(self) -> None:
        self.data, self.model = Path(self.data), Path(self.model)
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not self.data.is_file():
            raise FileNotFoundError(f"{self.data}: no such file. Pass a LLaVA-format JSON or JSONL file")
        if not (self.model / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.model}: not an HF checkpoint folder (no config.json). Convert an original layout with `rglf convert`"
            )


def inspect_prompts(cfg: PromptConfig) -> Iterator[dict[str, Any]]:
    """One dict per record: what ``rglf score`` would feed the model (or ``error`` for a rejected record)."""
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer

    from rglf.model.conversation import read_checkpoint_record
    from rglf.model.lmm import visual_token_counts
    from rglf.model.scaler import Ladder

    config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    template, source = resolve_template(cfg.model, cfg.template)
    vc = config.vision_config
    ladder = Ladder.parse(cfg.ladder or read_checkpoint_record(cfg.model).get("ladder"), vc.image_size // vc.patch_size)
    image_root = cfg.image_root if cfg.image_root is not None else cfg.data.parent
    image_token_id = config.image_token_id
    seen: set[str] = set()
    shown = 0
    for where, record in read_records(cfg.data):
        if cfg.limit is not None and shown >= cfg.limit:
            return
        shown += 1
        try:
            if isinstance(record, RecordError):
                raise record
            row = parse_record(record, where, default_source=cfg.data.stem, default_split=None, image_root=str(image_root))
            if row["sample_id"] in seen:
                raise RecordError("duplicate_id", f"{where}: id {row['sample_id']!r} repeats an earlier record")
            seen.add(row["sample_id"])
            turns = [(t["role"], t["text"]) for t in row["turns"]]
            conv = tokenize_conversation(turns, tokenizer, has_image=row["image"] is not None,
                                         image_token_id=image_token_id, template=template)
        except (RecordError, ConversationError) as err:
            yield {"where": where, "id": _record_id(record), "error": str(err)}
            continue
        out: dict[str, Any] = {
            "id": row["sample_id"], "where": where, "template": template, "template_source": source,
            "prompt": conv.text, "input_ids": list(conv.input_ids), "labels": list(conv.labels),
            "pieces": pieces(tokenizer, conv.input_ids, conv.image_index),
            "image_index": conv.image_index, "answer_tokens": conv.answer_tokens,
            "image": row["image"], "image_size": None, "visual_tokens": None, "sequence_length": None,
        }
        if row["image"] is not None:
            path = Path(row["image"]) if Path(row["image"]).is_absolute() else image_root / row["image"]
            try:
                with Image.open(path) as im:
                    size = (im.height, im.width)  # header only; LLaVA uses the size as stored (no EXIF rotation)
            except (OSError, ValueError) as err:
                out["error"] = f"{path}: cannot read the image size ({err}); visual tokens unknown"
            else:
                counts = visual_token_counts(config, ladder, size)
                out.update(
                    image_size=list(size), visual_tokens={str(k): v for k, v in counts.items()},
                    sequence_length={str(k): len(conv.input_ids) - 1 + v for k, v in counts.items()},
                )
        yield out


def _record_id(record: Any) -> str | None:
    return str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None


def pieces(tokenizer, ids, image_index: int | None) -> list[str]:
    """Token strings, ``<image>`` for the placeholder (its id may lie outside the vocabulary)."""
    return ["<image>" if i == image_index else tokenizer.convert_ids_to_tokens(int(t)) for i, t in enumerate(ids)]


def format_record(rec: dict[str, Any]) -> str:
    """A human-readable block: header, prompt, visual tokens per level, pieces with answers in [brackets]."""
    head = f"== {rec.get('id') or '?'} ({rec['where']})"
    if "input_ids" not in rec:
        return f"{head}\nrejected: {rec['error']}"
    lines = [f"{head}  template {rec['template']} [{rec['template_source']}]"]
    lines.append("prompt: " + json.dumps(rec["prompt"], ensure_ascii=False))
    if rec["image"] is not None:
        where = f"image {rec['image']}"
        if rec["image_size"] is not None:
            h, w = rec["image_size"]
            levels = ", ".join(f"{k}: {v:,}" for k, v in rec["visual_tokens"].items())
            where += f" ({w}x{h} px): visual tokens per level {levels}"
        lines.append(f"{where}; placeholder at token {rec['image_index']}")
    if rec.get("error"):
        lines.append(f"warning: {rec['error']}")
    out, inside = [], False
    for piece, label in zip(rec["pieces"], rec["labels"], strict=True):
        is_answer = label != IGNORE_INDEX
        if is_answer and not inside:
            piece = "[" + piece
        elif not is_answer and inside:
            out[-1] += "]"
        inside = is_answer
        out.append(piece)
    if inside:
        out[-1] += "]"
    lines.append(f"tokens ({len(rec['input_ids'])}; {rec['answer_tokens']} answer tokens in [brackets]):")
    lines.append(" ".join(out))
    return "\n".join(lines)
