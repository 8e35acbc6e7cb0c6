"""The embedded default: a synthetic multi-granularity VQA task (``task``), tiny configs and an
offline tokenizer (``tiny``), the Stage-1 trainer (``stage1``) and the committed checkpoint
(``default/avg-toy-llava-next``). Nothing here is part of the paper's method."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default" / "avg-toy-llava-next"
