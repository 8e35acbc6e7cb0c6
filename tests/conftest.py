"""Shared fixtures: one tiny random LLaVA-NeXT checkpoint per test session, saved and reloaded offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Words the tests' conversations use, so they tokenise to real ids rather than <unk>.
TINY_WORDS = ("red", "green", "blue", "circle", "colour", "checkered", "plain", "background")


@pytest.fixture(scope="session")
def tiny_words() -> tuple[str, ...]:
    """Extra vocabulary of the tiny tokenizer: build other tiny models with ``build_tiny_model(tiny_words, ...)``."""
    return TINY_WORDS


@pytest.fixture(scope="session")
def tiny_model():
    """(model, tokenizer, image_processor) of ``build_tiny_model(TINY_WORDS)``: SigLIP, linear vision path, seed 0.

    In memory, read-only: tests must not change its weights.
    """
    from rglf.model.toy.tiny import build_tiny_model

    return build_tiny_model(TINY_WORDS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    return tiny_model[1]


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` saved as an HF-format folder (``save_tiny_checkpoint``)."""
    from rglf.model.toy.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llava-next", *tiny_model)


@pytest.fixture(scope="session")
def tiny_lmm(tiny_ckpt):
    """``FrozenLMM`` loaded from ``tiny_ckpt`` (read-only: tests must not change its weights)."""
    from rglf.model.lmm import FrozenLMM

    return FrozenLMM.from_pretrained(tiny_ckpt)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after (small router runs: deterministic, no oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- real vocabularies (tests/fixtures/tokenizers, see PROVENANCE.md there) ----------------------

FIXTURE_TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"


def write_fixture_tokenizer(name: str, dest: Path) -> Path:
    """Copy fixture tokenizer ``name`` (llama-spm, llama-bpe, qwen2) into ``dest``, decompressing tokenizer.json."""
    import lzma
    import shutil

    src = FIXTURE_TOKENIZERS / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "tokenizer.json.xz":
            with lzma.open(f) as fin, open(dest / "tokenizer.json", "wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif not f.name.startswith("llama_cpp_vectors"):
            shutil.copy(f, dest / f.name)
    return dest


def _fixture_tokenizer(name: str, tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_fixture_tokenizer(name, tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def llama2_tokenizer(tmp_path_factory):
    """The real LLaMA-2 / Vicuna SentencePiece vocabulary (32,000 tokens), as transformers 5 loads it (fast)."""
    return _fixture_tokenizer("llama-spm", tmp_path_factory)


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """The real Meta-Llama-3 byte-level BPE vocabulary (128,256 tokens)."""
    return _fixture_tokenizer("llama-bpe", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory):
    """The real Qwen1.5 / Qwen2 byte-level BPE vocabulary (151,936 ids)."""
    return _fixture_tokenizer("qwen2", tmp_path_factory)
