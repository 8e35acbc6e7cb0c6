"""The committed embedded-default checkpoint: its feedback really depends on granularity.

A broken checkpoint, a broken scorer or broken packing fails here (held-out questions from a
seed stream training never used).
"""

from __future__ import annotations

import pytest

from rglf.model.lmm import FrozenLMM
from rglf.model.toy import DEFAULT_CHECKPOINT as CKPT  # noqa: E402
from rglf.model.toy.stage1 import evaluate, heldout_items


@pytest.fixture(scope="module")
def table():
    lmm = FrozenLMM.from_pretrained(CKPT)
    return evaluate(lmm, heldout_items(lmm, per_family=16, seed=5))


def test_fine_family_needs_the_finest_level(table):
    fine = table["fine"]
    assert fine[576]["accuracy"] >= 0.85
    assert fine[36]["accuracy"] <= 0.7
    assert fine[36]["nll"] > fine[576]["nll"] + 0.2


def test_medium_family_survives_2x2_pooling_only(table):
    medium = table["medium"]
    assert medium[576]["accuracy"] >= 0.85 and medium[144]["accuracy"] >= 0.85
    assert medium[36]["accuracy"] <= 0.7 and medium[72]["accuracy"] <= 0.75
    assert medium[36]["nll"] > medium[144]["nll"] + 0.2


@pytest.mark.parametrize("family", ["background", "block_colour"])
def test_coarse_families_are_answered_at_the_coarsest_level(table, family):
    assert table[family][36]["accuracy"] >= 0.9
    assert table[family][36]["accuracy"] >= table[family][576]["accuracy"] - 0.05
