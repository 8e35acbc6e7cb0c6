"""Every template against the reference's own prompt building and masks, with the real vocabularies.

Vocabularies (tests/fixtures/tokenizers, rebuilt by tests/fixtures/make_tokenizer_fixtures.py from
the llama-cpp-python 0.3.36 sdist): LLaMA-2 SentencePiece for vicuna_v1, llava_v1 and
mistral_instruct (no Mistral vocabulary ships in the sdist), Qwen2 BPE as the stand-in for
chatml_direct (the real 34B uses Yi's SentencePiece, also not in the sdist) and for qwen,
Llama-3 BPE for llava_llama_3. The reference side is tests/reference_llava.py.
"""

from __future__ import annotations

import pytest
import reference_llava as ref

from rglf.model.conversation import (
    IGNORE_INDEX,
    ConversationError,
    TemplateError,
    chunk_encoder,
    needs_leading_space_rule,
    tokenize_conversation,
)

IMG = ref.IMAGE_TOKEN_INDEX  # the placeholder id both sides use here
LONG = " ".join(f"word{i} is followed by another sentence, and then some more text." for i in range(120))
CASES = {
    "image-start": ("<image>\nWhat is in the picture?", "A red bus."),
    "image-middle": ("What is <image> in the picture?", "A red bus."),
    "image-end": ("What is in the picture?\n<image>", "A red bus."),
    "image-start-space": ("<image> What is in the picture?", "A red bus."),
    "three-rounds": ("<image>\nWhat is this?", "A cat.", "Why?", "Because it is.", "Sure?", "Yes, quite sure."),
    "non-ascii": ("<image>\nWas ist das? 这是什么？ 🦙 café", "Das ist ein Lama 🦙. 这是羊驼。 Ça va."),
    "newlines": ("<image>\nLine one.\nLine two.\n\nLine three?", "First.\nSecond.\n\n- item\n- item two"),
    "long-answer": ("<image>\nDescribe at length.", LONG),
    "answer-digit": ("<image>\nHow many?", "42 apples."),
    "answer-newline": ("<image>\nList them.", "\n1. one\n2. two"),
    "answer-space": ("<image>\nSay it.", " spaced answer"),
    "answer-cjk": ("<image>\n用中文回答。", "这是一辆红色的公共汽车。"),
}
TEXT_ONLY = ("Hi there.", "Hello!", "How are you?", "Fine.")


def turns_of(values, has_image=True):
    return [("human" if i % 2 == 0 else "gpt", v) for i, v in enumerate(values)]


def ours(values, tokenizer, template, has_image=True, generation=False):
    return tokenize_conversation(
        turns_of(values), tokenizer, has_image=has_image, image_token_id=IMG, template=template, generation=generation
    )


def answer_spans(tokenizer, ids, labels) -> list[str]:
    spans, current = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def check_spans(spans: list[str], answers: list[str], end: str) -> None:
    """One labelled span per answer: the answer + its end token. An answer starting with whitespace may
    share its first token with the role marker (BPE merges 'assistant\\n' + '\\n1.' into 'ĊĊ'): that
    merged token is labelled (it carries answer text), so the span may start with the marker's tail."""
    assert len(spans) == len(answers)
    for span, answer in zip(spans, answers, strict=True):
        if answer[:1].isspace():
            assert span.endswith(answer + end) and len(span) <= len(answer + end) + 1, (span, answer)
        else:
            assert span == answer + end


def pieces(tokenizer, ids):
    return ["<IMG>" if t == IMG else tokenizer.convert_ids_to_tokens(t) for t in ids]


@pytest.fixture(scope="module")
def spm(llama2_tokenizer):
    return llama2_tokenizer


@pytest.fixture(scope="module")
def slow_spm(llama2_tokenizer):
    return ref.SlowSpm(llama2_tokenizer)


# --- the vocabularies themselves ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2"])
def test_fixture_vocabularies_reproduce_llama_cpp_vectors(name, request):
    """llama.cpp's vectors (the upstream HF tokenizers' encode(add_special_tokens=False)) through rglf's encoder."""
    from conftest import FIXTURE_TOKENIZERS

    tok = request.getfixturevalue({"llama-spm": "llama2_tokenizer", "llama-bpe": "llama3_tokenizer",
                                   "qwen2": "qwen2_tokenizer"}[name])
    folder = FIXTURE_TOKENIZERS / name
    texts = (folder / "llama_cpp_vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(x) for x in line.split()] for line in (folder / "llama_cpp_vectors.out").read_text().split("\n")[: len(texts)]]
    encode = chunk_encoder(tok, special_tokens=False)
    assert len(texts) == 46
    assert [t for t, w in zip(texts, want, strict=True) if encode(t) != w] == []
    assert needs_leading_space_rule(tok) == (name == "llama-spm")


def test_leading_space_rule_is_what_sentencepiece_does(spm):
    """Metaspace drops sentencepiece's dummy '▁' before a leading space; the training tokenizer keeps it."""
    assert spm(" Hello", add_special_tokens=False).input_ids == [15043]  # the fast backend alone
    assert chunk_encoder(spm, special_tokens=False)(" Hello") == [29871, 15043]  # slow sentencepiece
    assert chunk_encoder(spm, special_tokens=True)("Hello") == [1, 15043]


# --- vicuna_v1 (and llava_v1): LLaMA-2 SentencePiece --------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1"])
def test_vicuna_ids_and_labels_equal_the_reference(spm, slow_spm, case, template):
    values = CASES[case]
    want = ref.preprocess_v1(ref.preprocess_multimodal(ref.conv_source(*values)), slow_spm, True, name=template)
    assert want["mismatch"] is None
    got = ours(values, spm, template)
    assert list(got.input_ids) == want["input_ids"], (pieces(spm, got.input_ids), pieces(spm, want["input_ids"]))
    assert list(got.labels) == want["labels"]
    assert got.text == want["prompt"]
    answers = [v for i, v in enumerate(values) if i % 2]
    assert [s.strip() for s in answer_spans(spm, got.input_ids, got.labels)] == [a.strip() + "</s>" for a in answers]


def test_vicuna_boundaries_as_the_issue_reports(spm):
    """The tokens around the image, the answer and round 2, and the lone '▁' of an answer starting with a digit."""
    conv = ours(CASES["three-rounds"], spm, "vicuna_v1")
    p = pieces(spm, conv.input_ids)
    i = conv.image_index
    assert p[:2] == ["<s>", "▁A"] and p[i - 4: i + 4] == ["▁US", "ER", ":", "▁", "<IMG>", "▁", "<0x0A>", "What"]
    assert "▁questions . ▁US ER" in " ".join(p)
    assert "</s> USER : ▁Why" in " ".join(p)  # no '▁' after </s> (the old segment-wise code gave '</s> ▁US ER')
    start = next(k for k, lab in enumerate(conv.labels) if lab != IGNORE_INDEX)
    assert p[start - 1: start + 1] == [":", "▁A"]  # 'ASSISTANT: A' -> ':' '▁A', and '▁A' is the first answer token
    digit = ours(CASES["answer-digit"], spm, "vicuna_v1")
    start = next(k for k, lab in enumerate(digit.labels) if lab != IGNORE_INDEX)
    assert pieces(spm, digit.input_ids)[start: start + 3] == ["▁", "4", "2"]  # the lone '▁' is labelled


def test_vicuna_text_only_and_generation_prompt(spm, slow_spm):
    values = TEXT_ONLY
    want = ref.preprocess_v1(ref.conv_source(*values), slow_spm, False)
    got = ours(values, spm, "vicuna_v1", has_image=False)
    assert (list(got.input_ids), list(got.labels), got.image_index) == (want["input_ids"], want["labels"], None)
    for case in ("image-start", "image-middle", "three-rounds", "answer-digit"):
        src = ref.preprocess_multimodal(ref.conv_source(*CASES[case]))
        prompt = ours(CASES[case][:1], spm, "vicuna_v1", generation=True)
        assert list(prompt.input_ids) == ref.inference_ids("vicuna_v1", src, slow_spm)  # eval scripts' ids
        full = ours(CASES[case], spm, "vicuna_v1")
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids  # the prompt is a prefix of training
        assert set(prompt.labels) == {IGNORE_INDEX}


def test_reference_masking_with_legacy_arithmetic_drops_multi_turn_samples(spm, slow_spm):
    """The reference's 'tokenization mismatch': preprocess_v1's legacy adjustment. With the vicuna-v1.5
    family's legacy=False it matches (and equals ours); the legacy=True arithmetic on the same ids is off
    by one token per later round, so the reference drops the sample (labels all -100). rglf builds the
    labels by construction: they equal the legacy=False reference's."""
    src = ref.preprocess_multimodal(ref.conv_source(*CASES["three-rounds"]))
    legacy = ref.preprocess_v1(src, slow_spm, True, legacy=True)
    assert legacy["mismatch"] == (82, 80) and set(legacy["labels"]) == {IGNORE_INDEX}
    text = ref.preprocess_v1(ref.conv_source(*TEXT_ONLY), slow_spm, False, legacy=True)
    assert text["mismatch"] == (60, 59)
    good = ref.preprocess_v1(src, slow_spm, True, legacy=False)
    assert list(ours(CASES["three-rounds"], spm, "vicuna_v1").labels) == good["labels"]


# --- mistral_instruct: LLaMA-2 SentencePiece (no Mistral vocabulary in the sdist) ---------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistral_ids_and_labels_equal_the_reference(spm, slow_spm, case):
    values = CASES[case]
    want = ref.preprocess_llama_2(ref.preprocess_multimodal(ref.conv_source(*values)), slow_spm, True)
    assert want["mismatch"] is None
    got = ours(values, spm, "mistral_instruct")
    assert list(got.input_ids) == want["input_ids"], (pieces(spm, got.input_ids), pieces(spm, want["input_ids"]))
    assert list(got.labels) == want["labels"]
    assert got.text == want["prompt"]
    prompt = ours(values[:1], spm, "mistral_instruct", generation=True)
    assert got.input_ids[: len(prompt.input_ids)] == prompt.input_ids


def test_mistral_layout(spm):
    conv = ours(CASES["three-rounds"], spm, "mistral_instruct")
    assert conv.text.startswith("[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] Why? [/INST]")
    labelled = [pieces(spm, [t])[0] for t, lab in zip(conv.input_ids, conv.labels, strict=True) if lab != IGNORE_INDEX]
    assert labelled[:6] == ["▁A", "▁cat", ".", "▁", "</s>", "▁Because"]  # the space before </s> is a labelled '▁'


# --- chatml_direct: Qwen2 BPE as a stand-in for Yi ------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_chatml_direct_ids_equal_the_reference_and_labels_are_answer_plus_im_end(qwen2_tokenizer, case):
    tok, values = qwen2_tokenizer, CASES[case]
    src = ref.preprocess_multimodal(ref.conv_source(*values))
    llava = ref.preprocess_mpt(src, tok, True, flavour="llava")
    nxt = ref.preprocess_mpt(src, tok, True, flavour="next")
    got = ours(values, tok, "chatml_direct")
    assert list(got.input_ids) == llava["input_ids"] == nxt["input_ids"]
    assert got.text == llava["prompt"] and "<|im_end|><|im_start|>" in got.text  # no newline after <|im_end|>
    # LLaVA's preprocess_mpt (cur_len 0) labels nothing for a BOS-less vocabulary, every time:
    assert llava["mismatch"] is not None and set(llava["labels"]) == {IGNORE_INDEX}
    answers = [v for i, v in enumerate(values) if i % 2]
    check_spans(answer_spans(tok, got.input_ids, got.labels), answers, "<|im_end|>")
    if nxt["mismatch"] is None and not answers[0][:1].isspace():  # LLaVA-NeXT's (cur_len 1): right for one round
        assert list(got.labels) == nxt["labels"]


# --- llava_llama_3: Llama-3 BPE --------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama3_ids_equal_the_reference_and_labels_are_answer_plus_eot(llama3_tokenizer, case):
    tok, values = llama3_tokenizer, CASES[case]
    want = ref.preprocess_llama3(ref.preprocess_multimodal(ref.conv_source(*values), "next"), tok, True)
    got = ours(values, tok, "llava_llama_3")
    assert list(got.input_ids) == want["input_ids"], (pieces(tok, got.input_ids), pieces(tok, want["input_ids"]))
    # rglf scores answer + <|eot_id|> only; the reference also labels BOS, every header and <|eot_id|>:
    assert all(lab == IGNORE_INDEX or lab == w for lab, w in zip(got.labels, want["labels"], strict=True))
    answers = [v for i, v in enumerate(values) if i % 2]
    check_spans(answer_spans(tok, got.input_ids, got.labels), [a.strip() for a in answers], "<|eot_id|>")  # '| trim'
    assert got.input_ids.count(tok.bos_token_id) == 1  # the training ids have one BOS (inference doubles it)
    prompt = ours(values[:1], tok, "llava_llama_3", generation=True)
    assert got.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tok.decode(prompt.input_ids[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


# --- qwen: Qwen2 BPE -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen_ids_equal_the_reference_and_labels_are_answer_plus_im_end(qwen2_tokenizer, case):
    tok, values = qwen2_tokenizer, CASES[case]
    want = ref.preprocess_qwen(ref.preprocess_multimodal(ref.conv_source(*values), "next"), tok, True)
    got = ours(values, tok, "qwen")
    assert list(got.input_ids) == want["input_ids"], (pieces(tok, got.input_ids), pieces(tok, want["input_ids"]))
    assert all(lab == IGNORE_INDEX or lab == w for lab, w in zip(got.labels, want["labels"], strict=True))
    answers = [v for i, v in enumerate(values) if i % 2]
    check_spans(answer_spans(tok, got.input_ids, got.labels), answers, "<|im_end|>")
    prompt = ours(values[:1], tok, "qwen", generation=True)
    n = len(prompt.input_ids) - (1 if answers[0][:1].isspace() else 0)  # 'assistant\n' + '\n1.': merged token
    assert got.input_ids[:n] == prompt.input_ids[:n]
    first = ref.preprocess_multimodal(ref.conv_source(*values), "next")[0]["value"]
    assert prompt.text == (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{first}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.decode([t for t in prompt.input_ids if t != IMG]) == prompt.text.replace("<image>", "")


def test_next_templates_keep_an_image_already_first(qwen2_tokenizer, llama3_tokenizer):
    """LLaVA-NeXT moves <image> only when it is not first: '<image> What' keeps its space (LLaVA's rule would not)."""
    assert "<image> What" in ours(CASES["image-start-space"], qwen2_tokenizer, "qwen").text
    assert "<image>\nWhat" in ours(CASES["image-start-space"], qwen2_tokenizer, "chatml_direct").text
    assert "<image> What" in ours(CASES["image-start-space"], llama3_tokenizer, "llava_llama_3").text


def test_a_template_needing_another_vocabulary_is_refused(spm):
    with pytest.raises(TemplateError, match="needs a Llama-3 tokenizer"):
        ours(CASES["image-start"], spm, "llava_llama_3")
    with pytest.raises(TemplateError, match="unknown template 'vicuna'"):
        ours(CASES["image-start"], spm, "vicuna")
    with pytest.raises(ConversationError, match="end with a human turn"):
        ours(CASES["image-start"], spm, "vicuna_v1", generation=True)
