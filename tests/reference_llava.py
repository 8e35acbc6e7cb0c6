"""The independent reference side of the template tests: LLaVA / LLaVA-NeXT prompt building and label masks.

Written for these tests from the upstream code, keeping its arithmetic and its quirks (the
upstream text itself is quoted in the issue's research notes, not here). Plain lists instead of
tensors, one sample at a time. Nothing here imports rglf.

Upstream sources:
- ``get_prompt`` (SeparatorStyle TWO / LLAMA_2 / MPT) and the templates conv_vicuna_v1,
  conv_llava_v1, conv_mistral_instruct, conv_chatml_direct:
  DeepLearnXMU/AVG-LLaVA@60cf44ca97df1e633b525fbaa358b626ecaf4be1 ``llava/conversation.py``
  (LLaVA v1.2.x's file plus AVG-LLaVA's additions).
- ``tokenizer_image_token``: haotian-liu/LLaVA@0f2e2150730e6b3ee37491ad6899a2ce69579a50 ``llava/mm_utils.py``.
- ``preprocess_multimodal`` (LLaVA flavour), ``preprocess_v1``, ``preprocess_llama_2``,
  ``preprocess_mpt`` (cur_len 0): AVG-LLaVA@60cf44ca ``llava/train/train.py``.
- ``preprocess_multimodal`` (NeXT flavour), ``preprocess_mpt`` (cur_len 1), ``preprocess_qwen``,
  ``preprocess_llama3``: LLaVA-VL/LLaVA-NeXT@45f2d920a6c678777da1d5141a82135f43825ae1 ``llava/train/train.py``.

Deliberate differences that change no id or label:
- ``tokenizer.legacy`` and "tokenizers >= 0.14" are arguments (the fixture tokenizers have no
  ``legacy`` attribute; vicuna-v1.5 / AVG-LLaVA ship ``legacy: false``).
- LLaVA trains with the slow sentencepiece tokenizer (``use_fast=False``); ``SlowSpm`` makes the
  fast LLaMA-2 fixture tokenise like it (it only differs for text starting with a space;
  checked on llama.cpp's vectors in test_templates.py).
- preprocess_qwen / preprocess_llama3 add ``<image>`` as a special token to a copy of the
  tokenizer; here the rendered text is split at ``<image>`` and the pieces encoded apart, which
  is what an added special token does. Qwen's ``additional_special_tokens_ids`` are looked up by name.
- The Llama-3-Instruct chat template is passed explicitly (the vocab-only fixture has none).
"""

from __future__ import annotations

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id
IMAGE = "<image>"

# Meta-Llama-3-8B-Instruct's chat template (what LLaVA-NeXT's preprocess_llama3 applies).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The template preprocess_qwen sets on its tokenizer copy.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES = {
    "vicuna_v1": dict(
        style="TWO", roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "llava_v1": dict(
        style="TWO", roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    ),
    "mistral_instruct": dict(style="LLAMA_2", roles=("USER", "ASSISTANT"), sep="", sep2="</s>", system=""),
    "chatml_direct": dict(
        style="MPT", roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>", sep2=None,
        system="<|im_start|>system\nAnswer the questions.",
    ),
}


class SlowSpm:
    """A fast LLaMA-2 tokenizer made to tokenise like the slow sentencepiece one (legacy=False):
    text starting with a space (or '▁') gets one more space in front; everything else is delegated."""

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    @staticmethod
    def _slow(text):
        return " " + text if isinstance(text, str) and text[:1] in (" ", "\u2581") else text

    def __call__(self, text, *args, **kwargs):
        return self._fast(self._slow(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        return self._fast.encode(self._slow(text), *args, **kwargs)


def conv_source(*values):
    """("q1", "a1", "q2", ...) -> LLaVA-format turns."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def preprocess_multimodal(source, flavour="llava"):
    """The image moves to the front of its turn + newline (NeXT: only a single image not already first)."""
    out = []
    for sentence in source:
        value = sentence["value"]
        if IMAGE in value:
            move = flavour == "llava" or (value.count(IMAGE) == 1 and not value.startswith(IMAGE))
            if move:
                value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({**sentence, "value": value})
    return out


def get_prompt(name, messages):
    """LLaVA's Conversation.get_prompt for the TWO / LLAMA_2 / MPT templates; messages = [(role, text or None)]."""
    t = TEMPLATES[name]
    style, sep, sep2, system = t["style"], t["sep"], t["sep2"], t["system"]
    if style == "TWO":
        ret = system + sep
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + (sep, sep2)[i % 2] if message else role + ":"
        return ret
    if style == "MPT":
        ret = system + sep
        for role, message in messages:
            ret += role + message + sep if message else role
        return ret
    if style == "LLAMA_2":
        ret = ""
        for i, (_, message) in enumerate(messages):
            if not message:
                continue
            if i == 0 and system:
                message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
            ret += sep + f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " " + sep2
        return ret.lstrip(sep)
    raise ValueError(style)


def render(name, source):
    roles = TEMPLATES[name]["roles"]
    messages = [(roles[0] if s["from"] == "human" else roles[1], s["value"]) for s in source]
    return get_prompt(name, messages)


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.extend(([image_token_index] * (offset + 1))[offset:])  # the separator is stripped like a chunk
        ids.extend(chunk[offset:])
    return ids


def _ids(text, tokenizer, has_image):
    return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids


def _finish(ids, target, cur_len, pad_token_id, model_max_length=4096):
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    total_len = sum(1 for t in ids if t != pad_token_id)
    mismatch = None
    if cur_len < model_max_length and cur_len != total_len:
        target[:] = [IGNORE_INDEX] * len(target)  # upstream: "WARNING: tokenization mismatch" and the sample is dropped
        mismatch = (cur_len, total_len)
    return {"input_ids": ids, "labels": target, "mismatch": mismatch}


def preprocess_v1(source, tokenizer, has_image, name="vicuna_v1", legacy=False, tokenizers_ge_0_14=True, pad_token_id=0):
    """vicuna_v1 / llava_v1 labels by the round arithmetic; pad = <unk> = 0 as in AVG-LLaVA."""
    t = TEMPLATES[name]
    prompt = render(name, source)
    ids = _ids(prompt, tokenizer, has_image)
    target = list(ids)
    sep = t["sep"] + t["roles"][1] + ": "
    cur_len = 1
    target[:1] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split(t["sep2"])):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenizer, has_image))
        instruction_len = len(_ids(parts[0] + sep, tokenizer, has_image)) - 2
        if i != 0 and not legacy and tokenizers_ge_0_14:
            round_len -= 1
            instruction_len -= 1
        target[cur_len: cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len: cur_len + instruction_len])
        cur_len += round_len
    return {**_finish(ids, target, cur_len, pad_token_id), "prompt": prompt}


def preprocess_llama_2(source, tokenizer, has_image, name="mistral_instruct", pad_token_id=0):
    t = TEMPLATES[name]
    prompt = render(name, source)
    ids = _ids(prompt, tokenizer, has_image)
    target = list(ids)
    sep = "[/INST] "
    cur_len = 1
    target[:1] = [IGNORE_INDEX]
    for rou in prompt.split(t["sep2"]):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenizer, has_image))
        instruction_len = len(_ids(parts[0] + sep, tokenizer, has_image)) - 2
        target[cur_len: cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len: cur_len + instruction_len])
        cur_len += round_len
    return {**_finish(ids, target, cur_len, pad_token_id), "prompt": prompt}


def preprocess_mpt(source, tokenizer, has_image, name="chatml_direct", flavour="llava", legacy=False, pad_token_id=None):
    """flavour 'llava' (AVG-LLaVA / LLaVA): cur_len starts at 0; 'next' (LLaVA-NeXT): at 1."""
    t = TEMPLATES[name]
    prompt = render(name, source)
    ids = _ids(prompt, tokenizer, has_image)
    target = list(ids)
    sep = t["sep"] + t["roles"][1]
    rounds = prompt.split(t["sep"])
    re_rounds = [t["sep"].join(rounds[:3])] + [t["sep"].join(rounds[k: k + 2]) for k in range(3, len(rounds), 2)]
    cur_len = 0 if flavour == "llava" else 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(re_rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenizer, has_image))
        instruction_len = len(_ids(parts[0] + sep, tokenizer, has_image)) - 1
        if i != 0 and legacy:
            round_len += 1
            instruction_len += 1
        target[cur_len: cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len: cur_len + instruction_len])
        cur_len += round_len
    return {**_finish(ids, target, cur_len, pad_token_id), "prompt": prompt}


def _template_ids(tokenizer, messages, chat_template, has_image):
    """``apply_chat_template(messages)`` token ids with <image> as a special token (-200 in its place)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template)
    ids = []
    for k, piece in enumerate(text.split(IMAGE) if has_image else [text]):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return ids


def _per_turn(source, tokenizer, has_image, chat_template, system, unmask, drop_first):
    roles = {"human": "user", "gpt": "assistant"}
    ids = _template_ids(tokenizer, [{"role": "system", "content": system}], chat_template, has_image)
    target = [IGNORE_INDEX] * len(ids)
    for sentence in source:
        role = roles[sentence["from"]]
        encoded = _template_ids(tokenizer, [{"role": role, "content": sentence["value"]}], chat_template, has_image)
        if drop_first:
            encoded = encoded[1:]
        ids += encoded
        target += encoded if role == "assistant" else [IGNORE_INDEX] * len(encoded)
    target = [tok if tok in unmask else lab for tok, lab in zip(ids, target, strict=True)]
    return {"input_ids": ids, "labels": target, "mismatch": None}


def preprocess_qwen(source, tokenizer, has_image, system="You are a helpful assistant."):
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    return _per_turn(source, tokenizer, has_image, QWEN_CHAT_TEMPLATE, system, {198, im_start, im_end}, False)


def preprocess_llama3(source, tokenizer, has_image, system=(
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.")):
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"]
    unmask = {tokenizer.convert_tokens_to_ids(n) for n in names} - {None}  # "\n\n" is no token name: None upstream
    return _per_turn(source, tokenizer, has_image, LLAMA3_CHAT_TEMPLATE, system, unmask, True)


def inference_ids(name, source, tokenizer):
    """What LLaVA's eval scripts feed: the first human turn, the assistant's slot empty (get_prompt + tokenizer_image_token)."""
    roles = TEMPLATES[name]["roles"]
    return tokenizer_image_token(get_prompt(name, [(roles[0], source[0]["value"]), (roles[1], None)]), tokenizer)
