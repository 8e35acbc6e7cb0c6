"""LLaVA's ``vicuna_v1`` conversation template -> token ids, labels and the image position.

The prompt LLaVA-NeXT (Vicuna) was trained with:

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

A sample is one conversation. The answer tokens are every assistant turn plus its ``</s>``
(the reference's labels: everything else is -100); the instruction is every other text
token. As LLaVA's ``preprocess_multimodal`` does, an ``<image>`` found anywhere in the first
human turn is moved to its start, followed by a newline.

Each segment is tokenised on its own (no special tokens) and the ids are concatenated, so
answer boundaries are exact whatever the tokenizer merges across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # labels that are not answer tokens (the reference's value)
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training/scoring sequence."""


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids with the image as ONE placeholder position (expanded later per level)."""

    input_ids: tuple[int, ...]  # the image placeholder is a single id at image_index
    labels: tuple[int, ...]  # IGNORE_INDEX except answer tokens
    image_index: int | None  # position of the image placeholder, None for text-only samples

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def instruction_ids(self, special_ids: Sequence[int] = ()) -> list[int]:
        """Every non-answer text token, without the image placeholder and special tokens."""
        skip = set(special_ids)
        return [
            tok
            for i, (tok, label) in enumerate(zip(self.input_ids, self.labels, strict=True))
            if label == IGNORE_INDEX and i != self.image_index and tok not in skip
        ]


def normalise_turns(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Check roles alternate human/assistant, starting with human; returns (role, text) with canonical roles."""
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
    if len(out) % 2:
        raise ConversationError("conversation ends with a human turn: there is no answer to score")
    for i, (role, text) in enumerate(out):
        if role == "gpt" and not text.strip():
            raise ConversationError(f"turn {i} (an answer) is empty")
        if i > 0 and IMAGE_PLACEHOLDER in text:
            raise ConversationError(f"turn {i} contains {IMAGE_PLACEHOLDER}: only the first turn may hold the image")
    return out


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer,
    *,
    has_image: bool,
    image_token_id: int,
    system: str = VICUNA_SYSTEM,
) -> TokenizedConversation:
    """Apply ``vicuna_v1`` and tokenise. ``turns`` are (role, text) with roles human/gpt."""
    turns = normalise_turns(turns)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    ids: list[int] = []
    labels: list[int] = []
    image_index: int | None = None

    def add(tokens: list[int], is_answer: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if is_answer else [IGNORE_INDEX] * len(tokens))

    if tokenizer.bos_token_id is not None:
        add([tokenizer.bos_token_id], False)
    add(encode(system + " "), False)
    for i in range(0, len(turns), 2):
        question, answer = turns[i][1], turns[i + 1][1]
        add(encode("USER: "), False)
        if i == 0 and has_image:
            # LLaVA's preprocess_multimodal: the image goes first, then a newline.
            question = question.replace(IMAGE_PLACEHOLDER, "").strip()
            image_index = len(ids)
            add([image_token_id], False)
            add(encode("\n" + question), False)
        else:
            if IMAGE_PLACEHOLDER in question:
                raise ConversationError(f"text-only sample contains {IMAGE_PLACEHOLDER}")
            add(encode(question), False)
        add(encode(" ASSISTANT:"), False)
        answer_ids = encode(" " + answer.strip())
        if not answer_ids:
            raise ConversationError(f"answer {answer!r} tokenises to nothing")
        add(answer_ids + [tokenizer.eos_token_id], True)  # </s> closes every assistant turn
    return TokenizedConversation(tuple(ids), tuple(labels), image_index)
