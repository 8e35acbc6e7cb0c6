"""Conversation templates of the LLaVA families -> the exact token ids and labels a checkpoint was trained on.

A sample is one LLaVA-format conversation (human/gpt turns; the first human turn may hold the
image as ``<image>``). ``tokenize_conversation`` renders it with a named template and returns the
ids the model saw in training, the labels (``-100`` outside the answers) and the position of
the image placeholder (one id, expanded per granularity later). It follows the reference code
(file paths and commits in the docstrings below; verbatim copies and the observations behind
every rule: ``tests/reference_llava.py`` and its tests):

Templates (``TEMPLATES``; aliases in ``ALIASES``):

- ``vicuna_v1`` -- vicuna LLaVA-1.5/1.6 and AVG-LLaVA (``--version v1``): ``conv_vicuna_v1`` of
  LLaVA's ``llava/conversation.py`` (DeepLearnXMU/AVG-LLaVA@60cf44ca)::

      {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

  system = "A chat between a curious user and an artificial intelligence assistant. The
  assistant gives helpful, detailed, and polite answers to the user's questions."
- ``llava_v1`` -- the same with the "curious human" system text (``conv_llava_v1``: what
  LLaVA's ``run_llava.py`` picks for "v1" model names; the embedded default was trained with it).
- ``mistral_instruct`` -- llava-v1.6-mistral-7b: ``[INST] {q1} [/INST] {a1} </s>[INST] {q2} [/INST] ...``
  (no system; a space before every ``</s>``).
- ``chatml_direct`` -- llava-v1.6-34b (Yi): ``<|im_start|>system\\nAnswer the questions.<|im_end|>``
  ``<|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>`` (no newline after ``<|im_end|>``).
- ``llava_llama_3`` -- llama3-llava-next-8b (LLaVA-VL/LLaVA-NeXT ``preprocess_llama3``,
  @45f2d920 ``llava/train/train.py``): Meta-Llama-3-Instruct's chat template applied turn by turn.
- ``qwen`` -- LLaVA-NeXT/OneVision Qwen models (``preprocess_qwen``, same file): ChatML with a
  newline after every ``<|im_end|>`` and the system "You are a helpful assistant.", turn by turn.

How the ids are built (the reference's rules, each one tested against it):

1. The image: for the LLaVA templates (vicuna_v1, llava_v1, mistral_instruct, chatml_direct) an
   ``<image>`` anywhere in the first human turn is removed, the text stripped, and ``<image>\\n``
   put in front (LLaVA's ``preprocess_multimodal``; inner double spaces stay, ``"What is <image>
   in it?"`` -> ``"<image>\\nWhat is  in it?"``). LLaVA-NeXT's version (llava_llama_3, qwen) moves it
   only when it is not already first (``"<image> What"`` stays). A sample with an image but no
   ``<image>`` in its text gets ``<image>\\n`` in front (LLaVA itself would drop the image).
2. LLaVA templates: the WHOLE prompt string (``Conversation.get_prompt()``) is tokenised at once,
   split only at ``<image>`` (``tokenizer_image_token``, LLaVA ``llava/mm_utils.py``): every chunk
   is tokenised on its own with the tokenizer's special tokens, and the BOS of every chunk but the
   first is dropped. So ``... USER: <image>\\nWhat`` gives ``'▁US' 'ER' ':' '▁' <image> '▁' '<0x0A>'
   'What'`` with the LLaMA-2 vocabulary, not what segment-wise tokenisation gives.
   LLaVA-NeXT templates (llava_llama_3, qwen): each turn is rendered and tokenised on its own
   (``apply_chat_template`` per message, no special tokens added; llama3 drops the BOS the
   template writes at the start of every turn but the system's), ``<image>`` split out as a
   special token.
3. SentencePiece tokenizers (LLaMA-2 / Vicuna / Mistral / Yi) trained with the slow tokenizer
   (``use_fast=False``, ``legacy=False``). transformers 5 loads them as the fast Metaspace
   (``prepend_scheme="first"``) backend, which differs from the slow one for text that STARTS
   with a space: sentencepiece still adds its ``▁`` there (``" Hello"`` -> ``'▁' '▁Hello'``),
   Metaspace does not (``'▁Hello'``). Such a chunk is tokenised as ``" " + chunk`` (equal to the
   slow tokenizer on all 46 of llama.cpp's vectors for this vocabulary).
4. Labels: every assistant turn's tokens plus its end token (``</s>``, ``<|im_end|>``,
   ``<|eot_id|>``), nothing else. An answer starts right after the role marker (``ASSISTANT:``,
   ``[/INST]``, ``assistant\\n``): the separating space belongs to the answer, so ``ASSISTANT: A``
   labels ``'▁A'`` and ``ASSISTANT: 42`` labels a lone ``'▁'`` then ``'4' '2'`` -- exactly the
   reference's ``preprocess_v1`` / ``preprocess_llama_2`` labels. Boundaries are found by
   tokenising the text up to the boundary the same way and taking the common prefix with the
   whole sequence (a token merged across a boundary goes to the answer).

Where the reference's own masking is off (documented choices, see the tests):

- ``preprocess_v1``'s round arithmetic assumes ``legacy=False`` tokenizers (vicuna-v1.5 family);
  with a legacy tokenizer it warns "tokenization mismatch" and drops the sample (all labels
  -100) for multi-turn conversations. Labels here are built by construction and equal the
  reference's whenever the reference does not drop the sample.
- ``preprocess_mpt`` (chatml_direct) labels nothing for a BOS-less vocabulary (the warning of
  upstream issues haotian-liu/LLaVA#1166 and #1706): labels here are answer + ``<|im_end|>``.
- ``preprocess_llama3`` / ``preprocess_qwen`` label the assistant headers and every special and
  newline token of the system and user turns too; rglf scores the answer + end token only (the
  SPEC's "answer tokens", comparable across templates). The ids are the reference's exactly.
- The inference prompt of LLaVA-NeXT's llama3 template doubles BOS and ``<|start_header_id|>``
  (LLaVA-VL/LLaVA-NeXT#21, #78); the training ids (scored here) do not.

Which template a checkpoint uses: ``resolve_template(folder, "auto")`` reads the template
recorded in ``rglf_checkpoint.json`` (written by ``rglf convert``, and committed with the
embedded default), else maps the folder's HF chat template to a named template (llava-hf
chat templates do not reproduce the training prompts, so they are recognised, never rendered),
else ``vicuna_v1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # labels that are not answer tokens (the reference's value)
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
DEFAULT_TEMPLATE = "vicuna_v1"
CHECKPOINT_RECORD = "rglf_checkpoint.json"  # {"template": NAME, "template_source": ..., ...} in a checkpoint folder

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
LLAMA3_BOS = "<|begin_of_text|>"  # Meta-Llama-3's bos_token, written by its chat template


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training/scoring sequence."""


class TemplateError(ValueError):
    """An unknown template name, or a template that does not fit the tokenizer."""

    exit_code = 2  # cli.EXIT_CODES: bad input or refused


@dataclass(frozen=True)
class Template:
    """One conversation template: how a conversation becomes the text (and ids) the model was trained on."""

    name: str
    style: str
    """'two' (vicuna), 'llama_2' (mistral), 'mpt' (chatml_direct): LLaVA's get_prompt, tokenised whole;
    'llama_3', 'chatml': LLaVA-NeXT's per-turn preprocess_llama3 / preprocess_qwen."""
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = ""
    sep2: str = ""
    image_rule: str = "llava"
    """'llava': <image> always moved to the front + newline; 'next': only when not already first."""
    reference: str = ""
    """Where the reference defines it (repo@commit:path)."""
    description: str = ""

    @property
    def end_token(self) -> str:
        """The token that closes every answer (labelled with it)."""
        return {"two": self.sep2, "llama_2": self.sep2, "mpt": self.sep, "llama_3": "<|eot_id|>",
                "chatml": "<|im_end|>"}[self.style]

    @property
    def per_turn(self) -> bool:
        """True: ids built turn by turn (LLaVA-NeXT); False: the whole prompt tokenised at once (LLaVA)."""
        return self.style in ("llama_3", "chatml")


_LLAVA = "DeepLearnXMU/AVG-LLaVA@60cf44ca97df1e633b525fbaa358b626ecaf4be1:llava/conversation.py"
_NEXT = "LLaVA-VL/LLaVA-NeXT@45f2d920a6c678777da1d5141a82135f43825ae1:llava/train/train.py"
TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("vicuna_v1", "two", VICUNA_SYSTEM, sep=" ", sep2="</s>", reference=_LLAVA + " conv_vicuna_v1",
                 description="vicuna LLaVA-1.5/1.6, AVG-LLaVA (LLaMA-2 SentencePiece vocabulary)"),
        Template("llava_v1", "two", LLAVA_V1_SYSTEM, sep=" ", sep2="</s>", reference=_LLAVA + " conv_llava_v1",
                 description="vicuna_v1 with the 'curious human' system text (the embedded default)"),
        Template("mistral_instruct", "llama_2", "", sep="", sep2="</s>", reference=_LLAVA + " conv_mistral_instruct",
                 description="llava-v1.6-mistral-7b"),
        Template("chatml_direct", "mpt", "<|im_start|>system\nAnswer the questions.",
                 roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>",
                 reference=_LLAVA + " conv_chatml_direct", description="llava-v1.6-34b (Yi)"),
        Template("llava_llama_3", "llama_3", LLAMA3_SYSTEM, roles=("user", "assistant"), image_rule="next",
                 reference=_NEXT + " preprocess_llama3", description="llama3-llava-next-8b (Llama-3 vocabulary)"),
        Template("qwen", "chatml", "You are a helpful assistant.", roles=("user", "assistant"), image_rule="next",
                 reference=_NEXT + " preprocess_qwen", description="LLaVA-NeXT / OneVision Qwen models (Qwen2 vocabulary)"),
    )
}
# Other names the reference code uses for the same templates (LLaVA's / LLaVA-NeXT's conv_templates keys).
ALIASES = {
    "v1": "vicuna_v1", "llava_mistral_instruct": "mistral_instruct", "mistral_direct": "chatml_direct",
    "llama_v3": "llava_llama_3", "qwen_1_5": "qwen", "qwen_2": "qwen",
}


def get_template(name: str | Template) -> Template:
    """A template by name (or alias); ``TemplateError`` listing the known names otherwise."""
    if isinstance(name, Template):
        return name
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        raise TemplateError(f"unknown template {name!r}. Use one of: {known} (or 'auto')")
    return TEMPLATES[key]


# --------------------------------------------------------------------------------------
# Conversations -> text
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids with the image as ONE placeholder position (expanded later per level)."""

    input_ids: tuple[int, ...]  # the image placeholder is a single id at image_index
    labels: tuple[int, ...]  # IGNORE_INDEX except answer tokens
    image_index: int | None  # position of the image placeholder, None for text-only samples
    text: str = field(default="", compare=False)  # the rendered prompt (LLaVA templates: the get_prompt() string; NeXT: the turns joined)

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def instruction_ids(self) -> list[int]:
        """The router's instruction: every non-answer id but the image placeholder, BOS and specials kept.

        As AVG-LLaVA's ``get_pure_text_embedding`` (``llava/model/llava_arch.py``): the input ids
        without the image, masked to ``labels == -100`` in training (so ``</s>`` closing an answer
        is out, the BOS and later user turns are in); at inference the prompt's ids.
        """
        return [
            tok
            for i, (tok, label) in enumerate(zip(self.input_ids, self.labels, strict=True))
            if label == IGNORE_INDEX and i != self.image_index
        ]


def normalise_turns(turns: Sequence[tuple[str, str]], *, needs_answer: bool = True) -> list[tuple[str, str]]:
    """Check roles alternate human/assistant, starting with human; returns (role, text) with canonical roles.

    ``needs_answer=False`` accepts a conversation ending with a human turn (a generation prompt).
    """
    if not turns:
        raise ConversationError("conversation has no turns")
    out = []
    for i, (role, text) in enumerate(turns):
        role = role.lower()
        want_human = i % 2 == 0
        if want_human and role not in HUMAN_ROLES:
            raise ConversationError(f"turn {i} should be from the human, got role {role!r}")
        if not want_human and role not in ASSISTANT_ROLES:
            raise ConversationError(f"turn {i} should be from the assistant (gpt), got role {role!r}")
        if not isinstance(text, str):
            raise ConversationError(f"turn {i} has no text")
        out.append(("human" if want_human else "gpt", text))
    if needs_answer and len(out) % 2:
        raise ConversationError("conversation ends with a human turn: there is no answer to score")
    if not needs_answer and not len(out) % 2:
        raise ConversationError("a generation prompt must end with a human turn")
    for i, (role, text) in enumerate(out):
        if role == "gpt" and not text.strip():
            raise ConversationError(f"turn {i} (an answer) is empty")
        if i > 0 and IMAGE_PLACEHOLDER in text:
            raise ConversationError(f"turn {i} contains {IMAGE_PLACEHOLDER}: only the first turn may hold the image")
    return out


def place_image(text: str, rule: str) -> str:
    """The first human turn as the reference's ``preprocess_multimodal`` leaves it (rule 'llava' or 'next').

    A turn without ``<image>`` (the record has an image all the same) is treated as if it ended
    with one: ``<image>\\n`` goes in front, where every template expects it (LLaVA itself would train without
    the image: ``tokenizer_image_token`` finds no placeholder).
    """
    count = text.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise ConversationError(f"the first turn holds {IMAGE_PLACEHOLDER} {count} times; one image per sample")
    if rule == "next" and text.startswith(IMAGE_PLACEHOLDER):
        return text
    return (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


@dataclass
class Unit:
    """Text tokenised in one call (LLaVA: the whole prompt; NeXT: one turn), as (text, is_answer) segments."""

    segments: list[tuple[str, bool]]
    drop_first: bool = False  # llama3: the BOS the chat template writes at the start of each turn is dropped

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def render(template: Template, turns: Sequence[tuple[str, str]], *, generation: bool = False) -> list[Unit]:
    """The template's text as tokenisation units; ``turns`` are normalised (image already placed).

    ``generation``: the turns end with a human turn and the assistant's header follows (the prompt
    a model answers), rendered exactly as the training text up to the first answer token.
    """
    t, s = template, template.style
    seg: list[tuple[str, bool]] = []
    if s == "two":  # LLaVA SeparatorStyle.TWO
        seg.append((t.system + t.sep, False))
        for role, text in turns:
            if role == "human":
                seg.append((f"{t.roles[0]}: {text}{t.sep}" if text else f"{t.roles[0]}:", False))
            else:
                seg += [(f"{t.roles[1]}:", False), (f" {text}{t.sep2}", True)]
        if generation:
            seg.append((f"{t.roles[1]}:", False))
        return [Unit(seg)]
    if s == "llama_2":  # LLaVA SeparatorStyle.LLAMA_2 (sep '' for mistral_instruct)
        for i, (role, text) in enumerate(turns):
            if role == "human":
                system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if i == 0 and t.system else ""
                seg.append((f"{t.sep}[INST] {system}{text} [/INST]" if text else "", False))
            else:
                seg.append((f" {text} {t.sep2}", True))
        if t.sep and seg:
            seg[0] = (seg[0][0].lstrip(t.sep), False)
        return [Unit(seg)]
    if s == "mpt":  # LLaVA SeparatorStyle.MPT
        seg.append((t.system + t.sep, False))
        for role, text in turns:
            if role == "human":
                seg.append((t.roles[0] + text + t.sep if text else t.roles[0], False))
            else:
                seg += [(t.roles[1], False), (text + t.sep, True)]
        if generation:
            seg.append((t.roles[1], False))
        return [Unit(seg)]
    if s == "llama_3":  # LLaVA-NeXT preprocess_llama3: Llama-3-Instruct's chat template, one message at a time
        def header(role: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

        units = [Unit([(LLAMA3_BOS + header("system") + t.system.strip() + "<|eot_id|>", False)])]
        for role, text in turns:
            if role == "human":
                units.append(Unit([(LLAMA3_BOS + header(t.roles[0]) + text.strip() + "<|eot_id|>", False)], True))
            else:
                units.append(Unit([(LLAMA3_BOS + header(t.roles[1]), False), (text.strip() + "<|eot_id|>", True)], True))
        if generation:
            units.append(Unit([(LLAMA3_BOS + header(t.roles[1]), False)], True))
        return units
    if s == "chatml":  # LLaVA-NeXT preprocess_qwen: plain ChatML, one message at a time
        units = [Unit([(f"<|im_start|>system\n{t.system}<|im_end|>\n", False)])]
        for role, text in turns:
            if role == "human":
                units.append(Unit([(f"<|im_start|>{t.roles[0]}\n{text}<|im_end|>\n", False)]))
            else:
                units.append(Unit([(f"<|im_start|>{t.roles[1]}\n", False), (text + "<|im_end|>", True), ("\n", False)]))
        if generation:
            units.append(Unit([(f"<|im_start|>{t.roles[1]}\n", False)]))
        return units
    raise TemplateError(f"template {t.name!r} has an unknown style {s!r}")


# --------------------------------------------------------------------------------------
# Text -> ids
# --------------------------------------------------------------------------------------


def needs_leading_space_rule(tokenizer) -> bool:
    """True for a fast SentencePiece tokenizer that drops sentencepiece's ``▁`` before a leading space (rule 3)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    try:
        from tokenizers.pre_tokenizers import Metaspace
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return False
    return isinstance(pre, Metaspace) and getattr(pre, "prepend_scheme", None) == "first"


def chunk_encoder(tokenizer, *, special_tokens: bool) -> Callable[[str], list[int]]:
    """``text -> ids`` as the training tokenizer did (with or without its special tokens, rule 3 applied)."""
    fix = needs_leading_space_rule(tokenizer)

    def encode(text: str) -> list[int]:
        if fix and text[:1] in (" ", "\u2581"):
            text = " " + text
        return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    return encode


def tokenizer_image_token(prompt: str, encode: Callable[[str], list[int]], image_token_id: int, bos_id: int | None) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` (``llava/mm_utils.py``): chunks between ``<image>`` tokenised
    on their own, the image as one id, the BOS of every chunk but the first dropped."""
    chunks = [encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    offset = 1 if chunks and chunks[0] and bos_id is not None and chunks[0][0] == bos_id else 0
    ids = chunks[0][:offset]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


def _image_split_encode(text: str, encode: Callable[[str], list[int]], image_token_id: int) -> list[int]:
    """LLaVA-NeXT's per-turn encoding: ``<image>`` is an added special token, the pieces around it are encoded apart."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(image_token_id)
        if piece:
            ids.extend(encode(piece))
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer,
    *,
    has_image: bool,
    image_token_id: int,
    template: str | Template = DEFAULT_TEMPLATE,
    generation: bool = False,
) -> TokenizedConversation:
    """Render ``turns`` with ``template`` and tokenise them as the model was trained (see the module docstring).

    ``turns`` are (role, text) with roles human/gpt (or user/assistant). ``generation=True``: the
    turns end with a human turn; the result is the prompt the model answers (labels all -100).
    """
    template = get_template(template)
    turns = normalise_turns(turns, needs_answer=not generation)
    if has_image:
        turns[0] = (turns[0][0], place_image(turns[0][1], template.image_rule))
    elif IMAGE_PLACEHOLDER in turns[0][1]:
        raise ConversationError(f"text-only sample contains {IMAGE_PLACEHOLDER}")
    units = render(template, turns, generation=generation)

    if template.per_turn:
        plain = chunk_encoder(tokenizer, special_tokens=False)
        bos = tokenizer.convert_tokens_to_ids(LLAMA3_BOS) if template.style == "llama_3" else None

        def encode_unit(unit: Unit, text: str) -> list[int]:
            ids = _image_split_encode(text, plain, image_token_id)
            if not unit.drop_first or not ids:
                return ids
            if ids[0] != bos:  # the template's BOS must be the tokenizer's one special token
                raise TemplateError(
                    f"template {template.name!r} needs a Llama-3 tokenizer ({LLAMA3_BOS} as one special token), "
                    f"this one encodes it as {ids[:3]}. Pick the checkpoint's own template with --template"
                )
            return ids[1:]
    else:
        with_specials = chunk_encoder(tokenizer, special_tokens=True)

        def encode_unit(unit: Unit, text: str) -> list[int]:
            return tokenizer_image_token(text, with_specials, image_token_id, tokenizer.bos_token_id)

    ids: list[int] = []
    labels: list[int] = []
    for unit in units:
        text = unit.text
        unit_ids = encode_unit(unit, text)
        unit_labels = [IGNORE_INDEX] * len(unit_ids)
        pos = 0
        for seg_text, is_answer in unit.segments:
            if is_answer:
                start = _common_prefix(encode_unit(unit, text[:pos]), unit_ids)
                stop = _common_prefix(encode_unit(unit, text[: pos + len(seg_text)]), unit_ids)
                if stop <= start:
                    raise ConversationError(f"answer {seg_text!r} tokenises to nothing")
                unit_labels[start:stop] = unit_ids[start:stop]
            pos += len(seg_text)
        ids += unit_ids
        labels += unit_labels
    if generation:  # a prompt to answer: nothing in it is scored (its instruction ids are all its ids but the image)
        labels = [IGNORE_INDEX] * len(ids)
    image_index = None
    if has_image:
        where = [i for i, t in enumerate(ids) if t == image_token_id]
        if len(where) != 1:
            raise ConversationError(f"expected one image placeholder in the tokenised prompt, found {len(where)}")
        image_index = where[0]
    prompt = "".join(u.text.removeprefix(LLAMA3_BOS) if u.drop_first else u.text for u in units)
    return TokenizedConversation(tuple(ids), tuple(labels), image_index, prompt)


# --------------------------------------------------------------------------------------
# Which template a checkpoint uses
# --------------------------------------------------------------------------------------


def read_checkpoint_record(folder: str | Path) -> dict:
    """``rglf_checkpoint.json`` of a checkpoint folder (empty if absent)."""
    path = Path(folder) / CHECKPOINT_RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TemplateError(f"{path}: not valid JSON ({err.msg}). Fix or delete the file") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a JSON object. Fix or delete the file")
    return data


def write_checkpoint_record(folder: str | Path, **fields) -> Path:
    """Merge ``fields`` into the folder's ``rglf_checkpoint.json`` (written to a temp name, then renamed)."""
    import os

    path = Path(folder) / CHECKPOINT_RECORD
    data = {**read_checkpoint_record(folder), **fields}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def hf_chat_template(folder: str | Path) -> str | None:
    """The chat template an HF-format folder ships (chat_template.jinja / .json, or tokenizer_config.json)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        path = folder / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, list):  # several named templates: the default one
                value = next((v.get("template") for v in value if v.get("name") == "default"), None)
            if isinstance(value, str):
                return value
    return None


def template_for_chat_template(chat_template: str, text_model_type: str | None = None) -> str | None:
    """The named template an HF chat template stands for (llava-hf's templates, recognised by their markers)."""
    if "[INST]" in chat_template:
        return "mistral_instruct"
    if "<|start_header_id|>" in chat_template:
        return "llava_llama_3"
    if "<|im_start|>" in chat_template:
        return "qwen" if (text_model_type or "").startswith("qwen") else "chatml_direct"
    if "ASSISTANT" in chat_template and ("USER" in chat_template or ".upper()" in chat_template):
        return "vicuna_v1"
    return None


def resolve_template(folder: str | Path, requested: str = "auto") -> tuple[str, str]:
    """(template name, where it came from) for a checkpoint folder and ``--template NAME|auto``."""
    if requested != "auto":
        return get_template(requested).name, "--template"
    folder = Path(folder)
    record = read_checkpoint_record(folder)
    if record.get("template"):
        return get_template(record["template"]).name, f"{CHECKPOINT_RECORD} ({record.get('template_source', 'recorded')})"
    chat = hf_chat_template(folder)
    if chat is not None:
        model_type = None
        if (folder / "config.json").is_file():
            model_type = json.loads((folder / "config.json").read_text()).get("text_config", {}).get("model_type")
        name = template_for_chat_template(chat, model_type)
        if name is not None:
            return name, "the folder's HF chat template"
    return DEFAULT_TEMPLATE, "default (no template recorded in the checkpoint)"
