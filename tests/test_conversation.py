"""model/conversation.py with the tiny word-level tokenizer: layout, labels, image placement, instruction ids,
rejected conversations, template names and which template a checkpoint folder uses.

The real-vocabulary comparisons with the reference code are in test_templates.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rglf.model.conversation import (
    CHECKPOINT_RECORD,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    LLAVA_V1_SYSTEM,
    TEMPLATES,
    VICUNA_SYSTEM,
    ConversationError,
    TemplateError,
    get_template,
    resolve_template,
    template_for_chat_template,
    tokenize_conversation,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def tokenize(tok, turns, has_image=True, **kw):
    return tokenize_conversation(
        turns, tok, has_image=has_image, image_token_id=tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), **kw
    )


def test_vicuna_v1_is_the_whole_llava_prompt_string_tokenised_at_once(tok):
    """ids = the tokenizer's own encoding (with its BOS) of conv_vicuna_v1.get_prompt(), image in place."""
    turns = [("human", "<image>\nWhat colour is the circle?"), ("gpt", "Red."),
             ("human", "And the background?"), ("gpt", "Blue, plain.")]
    conv = tokenize(tok, turns)
    prompt = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
        f"USER: And the background? ASSISTANT: Blue, plain.</s>"
    )
    assert "curious user" in VICUNA_SYSTEM and "user's questions" in VICUNA_SYSTEM  # conv_vicuna_v1, not llava_v1
    assert conv.text == prompt
    assert list(conv.input_ids) == tok(prompt)["input_ids"] and conv.input_ids[0] == tok.bos_token_id
    assert conv.input_ids[conv.image_index] == tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert conv.input_ids.count(tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)) == 1
    llava_v1 = tokenize(tok, turns, template="llava_v1")
    assert llava_v1.text == prompt.replace(VICUNA_SYSTEM, LLAVA_V1_SYSTEM)


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
    "question", ["<image>\nwhat colour is the circle ?", "what colour is the circle ? <image>",
                 "what <image> colour is the circle ?", "what colour is the circle ?"]
)
def test_image_anywhere_in_first_turn_moves_to_the_front(tok, question):
    front = tokenize(tok, [("human", "<image>\nwhat colour is the circle ?"), ("gpt", "red")])
    conv = tokenize(tok, [("human", question), ("gpt", "red")])
    assert conv == front  # ids, labels, image position (the text keeps LLaVA's inner double space)
    if "what <image> colour" in question:
        assert "what  colour" in conv.text


def test_text_only_conversation_has_no_image(tok):
    conv = tokenize(tok, [("human", "what colour ?"), ("gpt", "red")], has_image=False)
    assert conv.image_index is None
    assert tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) not in conv.input_ids


def test_instruction_ids_keep_bos_and_drop_answers_and_image(tok):
    """As AVG-LLaVA's get_pure_text_embedding: every id with label -100 except the image; BOS kept."""
    conv = tokenize(tok, [("human", "<image>\nwhat colour ?"), ("gpt", "red"), ("human", "shape ?"), ("gpt", "circle")])
    ids = conv.instruction_ids()
    assert ids[0] == tok.bos_token_id
    assert ids == [t for i, (t, lab) in enumerate(zip(conv.input_ids, conv.labels, strict=True))
                   if lab == IGNORE_INDEX and i != conv.image_index]
    text = tok.decode(ids)
    assert "what colour" in text and "shape" in text
    assert "red" not in text and "circle" not in text
    assert tok.eos_token_id not in ids and tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) not in ids


def test_generation_prompt_is_the_training_ids_up_to_the_answer(tok):
    turns = [("human", "<image>\nwhat colour ?"), ("gpt", "red"), ("human", "shape ?"), ("gpt", "circle")]
    full = tokenize(tok, turns)
    prompt = tokenize(tok, turns[:3], generation=True)
    assert prompt.text.endswith("USER: shape ? ASSISTANT:")
    start = max(i for i, lab in enumerate(full.labels) if lab == IGNORE_INDEX and i < len(full.labels) - 2) + 1
    assert prompt.input_ids == full.input_ids[:start] and set(prompt.labels) == {IGNORE_INDEX}


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
        ([("human", "<image> what <image> ?"), ("gpt", "red")], True, "2 times"),
    ],
    ids=["empty-answer", "assistant-first", "two-humans", "image-later-turn", "no-answer", "no-turns",
         "text-only-image", "two-images"],
)
def test_bad_conversations_raise(tok, turns, has_image, message):
    with pytest.raises(ConversationError, match=message):
        tokenize(tok, turns, has_image=has_image)


# --- template names and checkpoint folders ----------------------------------------------------------


def test_template_names_and_aliases():
    assert sorted(TEMPLATES) == ["chatml_direct", "llava_llama_3", "llava_v1", "mistral_instruct", "qwen", "vicuna_v1"]
    assert get_template("v1").name == "vicuna_v1" and get_template("qwen_1_5").name == "qwen"
    assert get_template("mistral_direct").name == "chatml_direct"
    with pytest.raises(TemplateError, match="unknown template 'vicuna_v2'. Use one of: chatml_direct, "):
        get_template("vicuna_v2")


# llava-hf's chat templates as transformers' conversion scripts write them (abridged to their markers).
CHAT_VICUNA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
               "{% else %}{{ message['role'].upper() + ': '}}{% endif %}...{% if add_generation_prompt %}"
               "{{ 'ASSISTANT:' }}{% endif %}")
CHAT_MISTRAL = "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}...{{' [/INST]' }}"
CHAT_YI = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}...{{'<|im_end|>' + '\n'}}"
CHAT_LLAMA3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"


@pytest.mark.parametrize(
    ("chat", "model_type", "expected"),
    [(CHAT_VICUNA, "llama", "vicuna_v1"), (CHAT_MISTRAL, "mistral", "mistral_instruct"),
     (CHAT_YI, "llama", "chatml_direct"), (CHAT_YI, "qwen2", "qwen"), (CHAT_LLAMA3, "llama", "llava_llama_3"),
     ("{{ messages }}", "llama", None)],
)
def test_hf_chat_templates_map_to_named_templates(chat, model_type, expected):
    assert template_for_chat_template(chat, model_type) == expected


def test_resolve_template_order(tmp_path):
    """--template NAME, else the folder's record, else its HF chat template, else vicuna_v1."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"model_type": "mistral"}}))
    assert resolve_template(folder) == ("vicuna_v1", "default (no template recorded in the checkpoint)")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_MISTRAL}))
    assert resolve_template(folder)[0] == "mistral_instruct"
    (folder / CHECKPOINT_RECORD).write_text(json.dumps({"template": "chatml_direct", "template_source": "test"}))
    assert resolve_template(folder) == ("chatml_direct", f"{CHECKPOINT_RECORD} (test)")
    assert resolve_template(folder, "qwen_2") == ("qwen", "--template")
    (folder / CHECKPOINT_RECORD).write_text("{not json")
    with pytest.raises(TemplateError, match="not valid JSON"):
        resolve_template(folder)


def test_embedded_default_scores_what_it_was_trained_with():
    """The committed checkpoint was trained with llava_v1 ('curious human'), BOS first, by the old segment-wise
    code; on its word-level vocabulary the whole-prompt ids are the same. Snapshot of that code's ids:
    tests/fixtures/toy_default_ids.json (main@487563d)."""
    from rglf.model.lmm import FrozenLMM
    from rglf.model.toy import DEFAULT_CHECKPOINT

    lmm = FrozenLMM.from_pretrained(DEFAULT_CHECKPOINT)
    assert lmm.template.name == "llava_v1" and lmm.template_source.startswith(CHECKPOINT_RECORD)
    snapshot = json.loads((FIXTURES / "toy_default_ids.json").read_text())["cases"]
    assert len(snapshot) == 7
    for case in snapshot:
        conv = lmm.tokenize([tuple(t) for t in case["turns"]], case["has_image"])
        assert (list(conv.input_ids), list(conv.labels), conv.image_index) == (
            case["input_ids"], case["labels"], case["image_index"]
        )
        # the old instruction ids dropped BOS (and every special id); the reference keeps BOS
        assert lmm.instruction_ids(conv) == [lmm.tokenizer.bos_token_id] + case["instruction_ids_without_specials"]
