"""Data contracts between the stages: explicit pyarrow schemas of every table.

``pipeline/`` writes these tables and ``router/`` reads them; both import the schemas from
here (they never import each other). Token counts are always stored explicitly
(``level_tokens``), never implied by a ladder index.

Tables (Parquet; a "table" is a folder of part files readable as one dataset):

- ``samples``: one row per ingested conversation.
- ``feedback``: one row per (sample, level): the frozen LMM's answer NLL at that level.
- ``errors``: one row per rejected input, with the stage and a reason.
- ``router_inputs``: what the router trainer needs per sample, so it never loads the LMM:
  the vision tower's selected-layer features of every crop (before the projector) in
  fp16 plus the instruction token ids. The trainer applies the frozen projector and the
  input-embedding table saved beside them (``router_side/``, see ``model.lmm``). Bytes per
  sample = ``n_crops * grid^2 * vision_hidden * 2`` (+ 4 per instruction token): at 7B
  scale (CLIP-L, 1024) 1.18 MB per crop, 4x smaller than the projected 4096-wide features.
- ``rankings`` / ``pairs`` / ``preferences``: built from feedback by ``pipeline/sql``.
"""

from __future__ import annotations

import pyarrow as pa

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("image", pa.string()),  # path relative to image_root (null: text-only sample)
        pa.field("image_root", pa.string()),
        # conversation turns in order; role is "human" or "gpt" (LLaVA's names)
        pa.field(
            "turns",
            pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())])),
            nullable=False,
        ),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("level_tokens", pa.int32(), nullable=False),  # tokens per crop at this level
        pa.field("level_grid", pa.string(), nullable=False),  # e.g. "24x12"
        pa.field("n_crops", pa.int16(), nullable=False),  # base crop + high-res crops
        pa.field("n_visual_tokens", pa.int32(), nullable=False),  # after packing (newlines included)
        pa.field("answer_tokens", pa.int32(), nullable=False),
        pa.field("nll_sum", pa.float64(), nullable=False),
        pa.field("nll_mean", pa.float64(), nullable=False),  # the RGLF feedback
        # teacher-forced argmax equals the answer at every answer token, i.e. greedy decoding
        # reproduces the reference answer exactly (the answer ends with the stop token)
        pa.field("greedy_match", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # ingest | load_image | score | ...
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("detail", pa.string()),  # the offending record / path, truncated
        # short machine-readable reason (missing_file, corrupt_image, too_long, duplicate_id, ...):
        # GROUP BY code in SQL; ``reason`` is the human sentence naming the input
        pa.field("code", pa.string()),
    ]
)

ROUTER_INPUTS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("n_crops", pa.int16(), nullable=False),
        pa.field("grid", pa.int16(), nullable=False),
        pa.field("vision_hidden", pa.int32(), nullable=False),
        # fp16, little-endian, C order, shape (n_crops, grid*grid, vision_hidden); crop 0 = base crop
        pa.field("vision_features", pa.large_binary(), nullable=False),
        # instruction token ids: every text token that is not an answer token and not the image
        pa.field("instruction_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("image_size", pa.list_(pa.int32()), nullable=False),  # (height, width) of the original image
    ]
)
