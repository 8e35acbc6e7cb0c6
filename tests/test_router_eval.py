"""Router evaluation (hand-computed metrics and baselines) and the token-budget knob."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.synthetic import write_rankings, write_router_inputs, write_synthetic_tables
from rglf.router.budget import (
    BUDGET_FILE,
    budget_choice,
    calibrate,
    lam_for_budget,
    level_costs,
    save_budget,
    token_fraction,
)
from rglf.router.data import load_router_data
from rglf.router.evaluate import (
    CONFUSION_PNG,
    EVAL_JSON,
    EVAL_PNG,
    TRAINING_CURVE_PNG,
    EvalConfig,
    apgr,
    baseline_policies,
    confusion_matrix,
    cpt,
    evaluate_router,
    kendall_tau,
    oracle_curve,
    pgr,
    policy_metrics,
)
from rglf.router.train import TrainConfig, train_router

TOKENS = [36, 144, 576]
# 4 samples x 3 levels; the hand-computed expectations below follow from these rows
NLL = np.array([[0.0, 0.0, 0.0], [0.9, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.6, 0.6]])
GREEDY = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
VISUAL = np.array([[36, 144, 576], [72, 288, 1152], [36, 144, 576], [36, 144, 576]])
ROUTER_SCORES = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_table(tmp_path):
    ids = [f"s{i}" for i in range(4)]
    write_rankings(tmp_path / "rank", ids, ["a", "b", "a", "b"], ["test"] * 4, TOKENS, NLL, GREEDY, VISUAL)
    rows = [{"sample_id": s, "vision": np.zeros((1, 576, 2)), "instruction_ids": [5]} for s in ids]
    write_router_inputs(tmp_path / "run", rows)
    return load_router_data(tmp_path / "run", tmp_path / "rank")


def test_tiny_table_ranking_is_as_specified(tiny_table):
    # s0: all tie -> fewest tokens first; s3: 144 and 576 tie exactly outside the tie set -> 144 first
    assert tiny_table.order.tolist() == [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert tiny_table.best.tolist() == [0, 2, 1, 0]


def test_kendall_tau_hand_checked():
    order = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2], [1, 2, 0]])
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    np.testing.assert_allclose(kendall_tau(scores, order), [1.0, -1.0, 1 / 3, 1 / 3])


def test_router_metrics_hand_computed(tiny_table):
    rows = np.arange(4)
    m = policy_metrics(ROUTER_SCORES.argmax(1), tiny_table, rows, ROUTER_SCORES)  # choices 0, 2, 2, 1
    assert m["agreement"] == pytest.approx(0.5)  # best 0, 2, 1, 0
    assert m["kendall_tau"] == pytest.approx((1 + 1 + 1 / 3 - 1 / 3) / 4)
    assert m["regret"] == pytest.approx((0 + 0 + 0.3 + 0.4) / 4)
    assert m["nll"] == pytest.approx((0 + 0.1 + 0.4 + 0.6) / 4)
    assert m["mean_visual_tokens"] == pytest.approx((36 + 1152 + 576 + 144) / 4)
    assert m["token_fraction"] == pytest.approx(477 / 720) and m["token_reduction"] == pytest.approx(1 - 477 / 720)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["choice_share"] == {"36": 0.25, "144": 0.25, "576": 0.5}


def test_baselines_hand_computed(tiny_table):
    rows = np.arange(4)
    pol = {name: policy_metrics(c, tiny_table, rows, s) for name, (c, s) in baseline_policies(tiny_table, rows, 0).items()}
    assert set(pol) == {"oracle", "random", "fixed_36", "fixed_144", "fixed_576"}
    o = pol["oracle"]
    assert (o["agreement"], o["kendall_tau"], o["regret"], o["accuracy"]) == (1.0, 1.0, 0.0, 1.0)
    assert o["mean_visual_tokens"] == pytest.approx((36 + 1152 + 144 + 36) / 4)
    f = pol["fixed_576"]
    assert f["agreement"] == 0.25 and f["kendall_tau"] is None and f["token_fraction"] == 1.0
    assert f["regret"] == pytest.approx(0.175) and f["accuracy"] == 0.75
    f = pol["fixed_36"]
    assert f["agreement"] == 0.5 and f["regret"] == pytest.approx(0.3) and f["accuracy"] == 0.5
    assert f["mean_visual_tokens"] == pytest.approx(45.0)
    # random: seeded, its choice is the argmax of its own random ordering
    choice, scores = baseline_policies(tiny_table, rows, 0)["random"]
    again, _ = baseline_policies(tiny_table, rows, 0)["random"]
    np.testing.assert_array_equal(choice, again)
    np.testing.assert_array_equal(choice, np.random.default_rng(0).random((4, 3)).argmax(1))
    assert pol["random"]["agreement"] == pytest.approx(float((choice == tiny_table.best).mean()))


# ---- quality vs cost (RouteLLM's APGR / CPT), confusion -------------------------------------

WEAK, STRONG = (100.0, 0.5), (1000.0, 1.0)  # (mean visual tokens, accuracy) of always-coarsest / -finest


def test_pgr_hand_computed():
    np.testing.assert_allclose(pgr([0.5, 0.75, 1.0, 1.1], 0.5, 1.0), [0.0, 0.5, 1.0, 1.2])
    assert pgr(0.7, 0.8, 0.8) is None and pgr(0.7, 0.9, 0.8) is None  # no gap to recover


def test_apgr_hand_computed():
    # normalised costs 0, 1/3, 2/3, 1 with PGR 0, 0.8, 0.9, 1 -> trapezoids (0.8 + 1.7 + 1.9) / 6
    assert apgr([400, 700], [0.9, 0.95], WEAK, STRONG) == pytest.approx(2.2 / 3)
    assert apgr([], [], WEAK, STRONG) == pytest.approx(0.5)  # the straight line between weak and strong
    assert apgr([700, 400], [0.95, 0.9], WEAK, STRONG) == pytest.approx(2.2 / 3)  # order does not matter
    assert apgr([400], [0.9], (100.0, 0.5), (1000.0, 0.5)) is None


def test_cpt_hand_computed():
    costs, quality = [400, 700], [0.9, 0.95]
    assert cpt(costs, quality, WEAK, STRONG, 0.5) == pytest.approx(100 + 0.5 / 0.8 * 300)  # 287.5
    assert cpt(costs, quality, WEAK, STRONG, 0.8) == pytest.approx(400)
    assert cpt(costs, quality, WEAK, STRONG, 0.95) == pytest.approx(700 + 0.05 / 0.1 * 300)  # 850
    assert cpt(costs, quality, WEAK, STRONG, 1.2) is None  # never recovers 120% of the gap
    assert cpt([400], [1.05], WEAK, STRONG, 1.1) == pytest.approx(400)  # above strong already at 400
    assert cpt([], [], WEAK, STRONG, 0.0) == pytest.approx(100)  # the weak end point recovers 0%


def test_oracle_curve_hand_computed():
    # levels 36 / 144 / 576 (costs 1/16, 1/4, 1); s0 right everywhere, s1 only at 576, s2 from 144 up
    greedy = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 1]], dtype=bool)
    visual = np.array([[36, 144, 576]] * 3)
    points = oracle_curve(greedy, visual, [36, 144, 576])
    # lam = 0: the cheapest correct level (36, 576, 144); 16/15 < lam < 16/3: s1 drops to 36; then all 36
    np.testing.assert_allclose(points, [(36.0, 1 / 3), (72.0, 2 / 3), (252.0, 1.0)])


def test_confusion_matrix_hand_computed():
    m = confusion_matrix(np.array([0, 2, 1, 0]), np.array([0, 2, 2, 1]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]  # rows: oracle level, columns: chosen level
    assert m.sum() == 4 and np.trace(m) == 2


# ---- budget ----------------------------------------------------------------------------------


def budget_problem(n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.array([36, 72, 144, 288, 576])
    logits = 2.0 * rng.normal(size=(n, 5))
    crops = rng.choice([1, 3], size=(n, 1))
    return logits, tokens[None, :] * crops, tokens


@pytest.mark.parametrize("target", [0.12, 0.3, 0.5, 0.8])
def test_calibration_hits_the_budget(target):
    logits, visual, tokens = budget_problem()
    cal = calibrate(logits, visual, tokens, target)
    assert cal.reachable
    assert target - 0.01 <= cal.token_fraction <= target
    choice = budget_choice(logits, level_costs(tokens), cal.lam)
    assert token_fraction(choice, visual) == pytest.approx(cal.token_fraction)
    # held-out samples from the same distribution land close to the target too
    logits2, visual2, _ = budget_problem(seed=1)
    assert abs(token_fraction(budget_choice(logits2, level_costs(tokens), cal.lam), visual2) - target) < 0.03


def test_budget_is_monotone_with_the_paper_at_zero_and_clear_limits():
    logits, visual, tokens = budget_problem(500)
    costs = level_costs(tokens)
    fracs = [token_fraction(budget_choice(logits, costs, lam), visual) for lam in np.linspace(-20, 20, 81)]
    assert all(a >= b for a, b in zip(fracs, fracs[1:], strict=False))
    np.testing.assert_array_equal(budget_choice(logits, costs, 0.0), logits.argmax(1))
    low = calibrate(logits, visual, tokens, 0.01)  # below always-coarsest (36/576)
    assert not low.reachable and low.token_fraction == pytest.approx(36 / 576)
    full = calibrate(logits, visual, tokens, 1.0)
    assert full.reachable and full.token_fraction == 1.0


def test_budget_file_round_trip(tmp_path):
    logits, visual, tokens = budget_problem(300)
    cals = [calibrate(logits, visual, tokens, b) for b in (0.2, 0.5)]
    save_budget(tmp_path, cals, default=0.5)
    assert lam_for_budget(tmp_path, 0.2).lam == cals[0].lam
    data = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert data["default_budget"] == 0.5 and set(data["budgets"]) == {"0.2", "0.5"}
    with pytest.raises(KeyError, match="not calibrated"):
        lam_for_budget(tmp_path, 0.3)


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    write_synthetic_tables(d / "run", d / "rank", n_samples=240, seed=1)
    for name, image_only in (("router", False), ("img", True)):
        train_router(TrainConfig(run=d / "run", rank=d / "rank", out=d / name, max_steps=10, batch_size=16,
                                 lr=3e-3, progress=False, threads=1, image_only=image_only))
    return d


def test_evaluate_writes_json_png_and_budget(trained, tmp_path):
    d = trained
    cfg = EvalConfig(run=d / "run", rank=d / "rank", router=d / "router", image_only_router=d / "img", out=tmp_path,
                     budgets=(0.2, 0.5, 1.0), budget=0.4, save_budget=True)
    calls = []
    report = evaluate_router(cfg, progress=lambda done, total, _: calls.append((done, total)))
    assert json.loads((tmp_path / EVAL_JSON).read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / EVAL_PNG).stat().st_size > 10_000
    data = load_router_data(d / "run", d / "rank", splits=["test"])
    # progress: samples through both routers (test + val), counted up once each, in batches
    n_val = len(load_router_data(d / "run", d / "rank", splits=["val"]))
    assert calls[-1] == (2 * (len(data) + n_val),) * 2 and len(calls) >= 4
    assert all(a[0] < b[0] and a[1] == b[1] for a, b in zip(calls[:-1], calls[1:], strict=True))
    assert report["n_samples"] == len(data) and report["ladder"] == [4, 8, 16, 32, 64]
    assert set(report["policies"]) == {"router", "image_only", "oracle", "random", *(f"fixed_{t}" for t in report["ladder"])}
    assert report["policies"]["oracle"]["agreement"] == 1.0
    # the finest fixed level uses 100% of its own tokens; the per-source breakdown covers every policy
    assert report["policies"]["fixed_64"]["token_fraction"] == 1.0
    assert set(report["by_source"]) == set(data.source)
    assert all(set(v) == set(report["policies"]) for v in report["by_source"].values())
    n_by_source = sum(v["router"]["n"] for v in report["by_source"].values())
    assert n_by_source == report["n_samples"]
    # budget curve: one point per budget and router; lam calibrated on val, reported on test
    curve = report["budget_curve"]["router"]
    assert [c["budget"] for c in curve] == [0.2, 0.5, 1.0] and set(report["budget_curve"]) == {"router", "image_only"}
    assert all(c["val_token_fraction"] <= c["budget"] + 1e-9 for c in curve if c["reachable"])
    assert curve[-1]["token_fraction"] == 1.0
    assert report["calibration"]["split"] == "val"
    assert report["budget"]["budget"] == 0.4 and report["budget"]["val_token_fraction"] <= 0.4
    assert lam_for_budget(d / "router", 0.4).lam == report["budget"]["lam"]
    assert lam_for_budget(d / "router", 0.2).lam == curve[0]["lam"]
    # confusion: rows = oracle level, columns = the router's, counts add up to the split
    conf = np.asarray(report["confusion"]["matrix"])
    assert conf.shape == (5, 5) and conf.sum() == report["n_samples"]
    assert np.trace(conf) / conf.sum() == pytest.approx(report["policies"]["router"]["agreement"])
    assert conf.sum(axis=0).tolist() == [round(report["n_samples"] * v) for v in
                                         report["policies"]["router"]["choice_share"].values()]
    # RouteLLM summaries for both routers and the oracle; the oracle's curve ends at its best accuracy
    r = report["routellm"]
    assert set(r["curves"]) == {"router", "image_only", "oracle"} and r["weak"] == "fixed_4" and r["strong"] == "fixed_64"
    assert max(p["accuracy"] for p in report["oracle_curve"]) == pytest.approx(report["policies"]["oracle"]["accuracy"])
    for name, m in r["curves"].items():
        if r["quality_gap"] > 0:
            assert m["apgr"] is not None, name
            if m["cpt50"] is not None:
                assert 0 < m["cpt50"] <= 1.0 and (m["cpt80"] is None or m["cpt80"] >= m["cpt50"])
    for png in (EVAL_PNG, CONFUSION_PNG, TRAINING_CURVE_PNG):  # training curve: from ROUTER/metrics.json
        assert (tmp_path / png).stat().st_size > 10_000, png
        assert report["plots"][png.removesuffix(".png")] == png


def test_eval_cli(trained, tmp_path):
    from rglf.cli import app

    d = trained
    result = CliRunner().invoke(app, ["eval", "--run", str(d / "run"), "--rank", str(d / "rank"), "--router",
                                      str(d / "router"), "--out", str(tmp_path), "--budgets", "0.5,1.0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "oracle" in result.stdout and "fixed_64" in result.stdout and "router agreement" in result.stdout
    assert "by source" in result.stdout and "APGR" in result.stdout
    assert json.loads((tmp_path / EVAL_JSON).read_text())["split"] == "test"
    # --quiet: the summary line only
    quiet = CliRunner().invoke(app, ["eval", "--run", str(d / "run"), "--rank", str(d / "rank"), "--router",
                                     str(d / "router"), "--out", str(tmp_path / "q"), "--budgets", "0.5", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.startswith("eval: ") and quiet.stdout.count("\n") == 1 and quiet.stderr == ""


def test_a_subset_router_is_evaluated_on_its_subset(trained, tmp_path):
    d = trained
    train_router(TrainConfig(run=d / "run", rank=d / "rank", out=tmp_path / "sub", max_steps=2, batch_size=16,
                             progress=False, threads=1, levels="4,16,64"))
    report = evaluate_router(EvalConfig(run=d / "run", rank=d / "rank", router=tmp_path / "sub", budgets=(0.5,),
                                        plot=False))
    assert report["ladder"] == [4, 16, 64] and set(report["policies"]) >= {"fixed_4", "fixed_16", "fixed_64"}
    assert report["data"]["reranked_subset"] is True and report["plot"] is None
    with pytest.raises(ValueError, match="routes over levels"):
        evaluate_router(EvalConfig(run=d / "run", rank=d / "rank", router=tmp_path / "sub",
                                   image_only_router=d / "img", out=tmp_path / "x", plot=False))
