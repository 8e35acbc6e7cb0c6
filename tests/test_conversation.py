"""LLaVA's vicuna_v1 template: layout, labels, image placement, rejected conversations."""

from __future__ import annotations

import pytest

from rglf.model.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VICUNA_SYSTEM,
    ConversationError,
    tokenize_conversation,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def tokenize(tok, turns, has_image=True):
    return tokenize_conversation(
        turns, tok, has_image=has_image, image_token_id=tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    )


def test_vicuna_v1_layout_matches_llava_prompt_string(tok):
    """ids = <s> + the whole vicuna_v1 prompt as LLaVA writes it (sep ' ', sep2 '</s>'), tokenised at once."""
    turns = [("human", "<image>\nWhat colour is the circle?"), ("gpt", "Red."),
             ("human", "And the background?"), ("gpt", "Blue, plain.")]
    conv = tokenize(tok, turns)
    prompt = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        f"USER: And the background? ASSISTANT: Blue, plain.</s>"
    )
    expected = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert list(conv.input_ids) == expected
    assert conv.input_ids[conv.image_index] == tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert conv.input_ids.count(tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)) == 1
    # the image sits right after the first "USER:"
    user = tok("USER:", add_special_tokens=False)["input_ids"]
    assert list(conv.input_ids[conv.image_index - len(user) : conv.image_index]) == user


def test_labels_are_every_answer_and_its_eos(tok):
    turns = [("human", "<image>\nWhat colour?"), ("gpt", "red"), ("human", "shape?"), ("gpt", "a green circle")]
    conv = tokenize(tok, turns)
    runs, current = [], []
    for tid, label in zip(conv.input_ids, conv.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r) for r in runs] == ["red </s>", "a green circle </s>"]
    assert conv.answer_tokens == 1 + 1 + 3 + 1


@pytest.mark.parametrize(
    "question", ["<image>\nwhat colour is the circle ?", "what colour is the circle ? <image>", "what <image> colour is the circle ?"]
)
def test_image_anywhere_in_first_turn_moves_to_the_front(tok, question):
    front = tokenize(tok, [("human", "<image>\nwhat colour is the circle ?"), ("gpt", "red")])
    conv = tokenize(tok, [("human", question), ("gpt", "red")])
    assert conv == front


def test_text_only_conversation_has_no_image(tok):
    conv = tokenize(tok, [("human", "what colour ?"), ("gpt", "red")], has_image=False)
    assert conv.image_index is None
    assert tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) not in conv.input_ids


def test_instruction_ids_skip_answers_image_and_special_tokens(tok):
    conv = tokenize(tok, [("human", "<image>\nwhat colour ?"), ("gpt", "red"), ("human", "shape ?"), ("gpt", "circle")])
    ids = conv.instruction_ids(tok.all_special_ids)
    text = tok.decode(ids)
    assert "what colour" in text and "shape" in text
    assert "red" not in text and "circle" not in text
    assert not set(ids) & set(tok.all_special_ids)


@pytest.mark.parametrize(
    ("turns", "has_image", "message"),
    [
        ([("human", "<image>\nwhat ?"), ("gpt", "   ")], True, "empty"),
        ([("gpt", "red"), ("human", "what ?")], True, "should be from the human"),
        ([("human", "what ?"), ("human", "again ?")], True, "should be from the assistant"),
        ([("human", "<image>\nwhat ?"), ("gpt", "red"), ("human", "<image> and now ?"), ("gpt", "blue")], True,
         "only the first turn may hold the image"),
        ([("human", "<image>\nwhat ?")], True, "ends with a human turn"),
        ([], True, "no turns"),
        ([("human", "what <image> ?"), ("gpt", "red")], False, "text-only sample contains"),
    ],
    ids=["empty-answer", "assistant-first", "two-humans", "image-later-turn", "no-answer", "no-turns", "text-only-image"],
)
def test_bad_conversations_raise(tok, turns, has_image, message):
    with pytest.raises(ConversationError, match=message):
        tokenize(tok, turns, has_image=has_image)
