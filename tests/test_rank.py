"""`rglf rank`: the ranking SQL pinned on small hand-made feedback tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rglf.model.tables import FEEDBACK_SCHEMA
from rglf.pipeline.rank import FeedbackError, RankConfig, load_sql, resolve_table, run_rank

LADDER = (36, 72, 144, 288, 576)


def feedback_rows(
    sample_id: str,
    nlls: dict[int, float],
    source: str = "src",
    split: str | None = "train",
    greedy: dict[int, bool] | None = None,
    n_crops: int = 1,
) -> list[dict]:
    """One FEEDBACK_SCHEMA row per level; n_visual_tokens = tokens * crops + 1 (a newline)."""
    return [
        {
            "sample_id": sample_id,
            "source": source,
            "split": split,
            "level_tokens": tokens,
            "level_grid": f"{tokens}",
            "n_crops": n_crops,
            "n_visual_tokens": tokens * n_crops + 1,
            "answer_tokens": 4,
            "nll_sum": 4 * nll,
            "nll_mean": nll,
            "greedy_match": bool((greedy or {}).get(tokens, False)),
            "model_id": "m0",
        }
        for tokens, nll in nlls.items()
    ]


def write_feedback(folder: Path, rows: list[dict], n_parts: int = 1) -> Path:
    """Write rows as a scoring output folder ``folder/feedback/part-*.parquet``; return ``folder``."""
    (folder / "feedback").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)
    step = -(-len(rows) // n_parts)
    for i in range(n_parts):
        pq.write_table(table.slice(i * step, step), folder / "feedback" / f"part-{i:05d}.parquet")
    return folder


def rank(tmp_path: Path, rows: list[dict], **options) -> tuple[dict, Path]:
    run = write_feedback(tmp_path / "run", rows)
    out = tmp_path / "rank"
    return run_rank(RankConfig(feedback=run, out=out, **options)), out


def read(out: Path, table: str) -> list[dict]:
    return pq.read_table(out / table).to_pylist()


def by_sample(rows: list[dict], key: str = "rank") -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r["sample_id"], []).append(r)
    return {s: sorted(rs, key=lambda r: r[key]) for s, rs in grouped.items()}


def test_ranks_by_nll_with_best_level_regret_and_level_index(tmp_path: Path) -> None:
    nlls = {36: 0.9, 72: 0.5, 144: 0.2, 288: 0.3, 576: 0.25}
    report, out = rank(tmp_path, feedback_rows("a", nlls, n_crops=2), abs_tol=0.0)
    rows = by_sample(read(out, "rankings"))["a"]
    assert [r["level_tokens"] for r in rows] == [144, 576, 288, 72, 36]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert {r["level_tokens"]: r["level_index"] for r in rows} == {36: 0, 72: 1, 144: 2, 288: 3, 576: 4}
    assert all(r["best_level_tokens"] == 144 and r["best_n_visual_tokens"] == 144 * 2 + 1 for r in rows)
    assert all(r["n_levels"] == 5 and r["min_nll_mean"] == 0.2 for r in rows)
    assert [r["regret"] for r in rows] == pytest.approx([0.0, 0.05, 0.1, 0.3, 0.7])
    assert [r["n_visual_tokens"] for r in rows] == [289, 1153, 577, 145, 73]
    assert [r["in_tie_set"] for r in rows] == [True, False, False, False, False]
    assert report["ladder"] == list(LADDER) and report["n_samples_ranked"] == 1


def test_exact_nll_tie_goes_to_fewer_tokens(tmp_path: Path) -> None:
    nlls = {36: 0.7, 72: 0.4, 144: 0.4, 288: 0.7, 576: 0.1}
    _, out = rank(tmp_path, feedback_rows("a", nlls), abs_tol=0.0)
    rows = by_sample(read(out, "rankings"))["a"]
    assert [r["level_tokens"] for r in rows] == [576, 72, 144, 36, 288]


def test_tolerance_tie_set_ranks_first_cheapest_first(tmp_path: Path) -> None:
    # min 0.0 at 72; abs_tol 0.02 -> 36 (0.015) and 144 (0.01) tie with it; 576 (0.03) does not
    nlls = {36: 0.015, 72: 0.0, 144: 0.01, 288: 0.5, 576: 0.03}
    report, out = rank(tmp_path, feedback_rows("a", nlls))
    rows = by_sample(read(out, "rankings"))["a"]
    assert [r["level_tokens"] for r in rows] == [36, 72, 144, 576, 288]
    assert [r["in_tie_set"] for r in rows] == [True, True, True, False, False]
    assert rows[0]["best_level_tokens"] == 36
    assert rows[0]["regret"] == pytest.approx(0.015)  # the cheaper level costs <= tol
    assert report["config"]["abs_tol"] == 0.02 and report["config"]["rel_tol"] == 0.0

    _, out = rank(tmp_path / "strict", feedback_rows("a", nlls), abs_tol=0.0)
    rows = by_sample(read(out, "rankings"))["a"]
    assert [r["level_tokens"] for r in rows] == [72, 144, 36, 576, 288]


def test_relative_tolerance_scales_with_the_best_nll(tmp_path: Path) -> None:
    # best 2.0; rel_tol 0.1 -> tol = max(0.02, 0.2) = 0.2: 36 (2.15) ties, 72 (2.25) does not
    nlls = {36: 2.15, 72: 2.25, 144: 2.0, 288: 2.19, 576: 2.3}
    _, out = rank(tmp_path, feedback_rows("a", nlls), rel_tol=0.1)
    rows = by_sample(read(out, "rankings"))["a"]
    assert [r["level_tokens"] for r in rows] == [36, 144, 288, 72, 576]
    assert rows[0]["best_level_tokens"] == 36


def test_margins_can_be_negative_inside_a_tie_set(tmp_path: Path) -> None:
    nlls = {36: 0.015, 72: 0.0, 144: 0.01, 288: 0.5, 576: 0.03}
    _, out = rank(tmp_path, feedback_rows("a", nlls), margin_scale=2.0)
    pairs = {(p["better_level_tokens"], p["worse_level_tokens"]): p for p in read(out, "pairs")}
    assert len(pairs) == 10
    p = pairs[(36, 72)]  # ranks 1, 2: the cheaper level first although its NLL is higher
    assert (p["better_rank"], p["worse_rank"], p["gap"]) == (1, 2, 1)
    assert p["nll_diff"] == pytest.approx(-0.015) and p["margin"] == pytest.approx(2 * 1 * -0.015)
    assert p["within_tie_set"] is True
    p = pairs[(36, 288)]  # ranks 1, 5
    assert p["gap"] == 4 and p["margin"] == pytest.approx(2 * 4 * (0.5 - 0.015))
    assert p["within_tie_set"] is False


def spec_ranking(nll: np.ndarray, tokens: np.ndarray, abs_tol: float, rel_tol: float) -> list[int]:
    """Independent reference: ARCHITECTURE.md "Ranking semantics" with Python sorting."""
    best = nll.min()
    tol = max(abs_tol, rel_tol * best)
    tied = [i for i in range(len(nll)) if nll[i] <= best + tol]
    rest = [i for i in range(len(nll)) if nll[i] > best + tol]
    return sorted(tied, key=lambda i: tokens[i]) + sorted(rest, key=lambda i: (nll[i], tokens[i]))


@pytest.mark.parametrize(("abs_tol", "rel_tol", "m"), [(0.02, 0.0, 1.0), (0.0, 0.0, 1.0), (0.05, 0.2, 0.5)])
def test_rankings_and_margins_match_an_independent_numpy_computation(
    tmp_path: Path, abs_tol: float, rel_tol: float, m: float
) -> None:
    rng = np.random.default_rng(7)
    n_samples = 60
    tokens = np.array(LADDER)
    nll = rng.uniform(0, 1, (n_samples, len(LADDER)))
    nll[::3] = np.round(nll[::3], 1)  # exact ties
    nll[1::3] = rng.uniform(0, 0.04, (len(nll[1::3]), len(LADDER)))  # near ties
    rows = []
    for s in range(n_samples):
        rows += feedback_rows(
            f"s{s:03d}", dict(zip(LADDER, nll[s].tolist(), strict=True)), source=["a", "b"][s % 2]
        )
    rng.shuffle(rows)  # row order must not matter
    _, out = rank(tmp_path, rows, abs_tol=abs_tol, rel_tol=rel_tol, margin_scale=m)

    rankings = by_sample(read(out, "rankings"))
    pairs = by_sample(read(out, "pairs"), key="better_rank")
    assert len(rankings) == n_samples
    for s in range(n_samples):
        order = spec_ranking(nll[s], tokens, abs_tol, rel_tol)
        got = rankings[f"s{s:03d}"]
        assert [r["level_tokens"] for r in got] == tokens[order].tolist()
        assert [r["regret"] for r in got] == pytest.approx((nll[s][order] - nll[s].min()).tolist())
        # SPEC: for every gap j and position i: margin = m * j * (nll_(i+j) - nll_(i))
        sorted_nll = nll[s][order]
        n = len(order)
        expected = {
            (tokens[order[i]], tokens[order[i + j]]): m * j * (sorted_nll[i + j] - sorted_nll[i])
            for j in range(1, n)
            for i in range(n - j)
        }
        got_pairs = {(p["better_level_tokens"], p["worse_level_tokens"]): p for p in pairs[f"s{s:03d}"]}
        assert set(got_pairs) == set(expected)
        for key, margin in expected.items():
            assert got_pairs[key]["margin"] == pytest.approx(margin, abs=1e-12)
            assert got_pairs[key]["nll_diff"] == pytest.approx(
                margin / (m * got_pairs[key]["gap"]), abs=1e-12
            )


def test_preferences_shares_tokens_regret_and_greedy_accuracy(tmp_path: Path) -> None:
    rows = (
        feedback_rows("a1", {36: 0.1, 72: 0.5, 144: 0.6}, source="A", greedy={36: True, 144: True})
        + feedback_rows("a2", {36: 0.9, 72: 0.5, 144: 0.2}, source="A", greedy={144: True})
        + feedback_rows("b1", {36: 0.8, 72: 0.3, 144: 0.4}, source="B", greedy={72: True}, n_crops=3)
    )
    _, out = rank(tmp_path, rows, abs_tol=0.0)
    prefs = {(p["source"], p["policy"], p["level_tokens"]): p for p in read(out, "preferences")}
    assert len(prefs) == 3 * (3 + 1)  # (A, B, __all__) x (3 fixed levels + oracle)

    a36 = prefs[("A", "fixed", 36)]
    assert (a36["n_samples"], a36["n_best"], a36["best_share"]) == (2, 1, 0.5)
    assert a36["mean_nll"] == pytest.approx(0.5) and a36["mean_regret"] == pytest.approx((0 + 0.7) / 2)
    assert a36["greedy_accuracy"] == 0.5 and a36["level_index"] == 0
    assert prefs[("A", "fixed", 72)]["best_share"] == 0.0

    oracle_a = prefs[("A", "oracle", None)]  # a1 -> 36 (37 tokens), a2 -> 144 (145 tokens)
    assert oracle_a["n_best"] is None and oracle_a["best_share"] is None
    assert oracle_a["mean_visual_tokens"] == pytest.approx((37 + 145) / 2)
    assert oracle_a["token_reduction_vs_finest"] == pytest.approx(1 - 91 / 145)
    assert oracle_a["mean_nll"] == pytest.approx(0.15) and oracle_a["mean_regret"] == 0.0
    assert oracle_a["greedy_accuracy"] == 1.0

    all_oracle = prefs[("__all__", "oracle", None)]  # + b1 -> 72 (3 crops: 217 tokens)
    assert all_oracle["n_samples"] == 3
    assert all_oracle["mean_visual_tokens"] == pytest.approx((37 + 145 + 217) / 3)
    finest_all = prefs[("__all__", "fixed", 144)]["mean_visual_tokens"]
    assert finest_all == pytest.approx((145 + 145 + 433) / 3)
    assert all_oracle["token_reduction_vs_finest"] == pytest.approx(
        1 - all_oracle["mean_visual_tokens"] / finest_all
    )
    shares = [prefs[("__all__", "fixed", t)]["best_share"] for t in (36, 72, 144)]
    assert shares == pytest.approx([1 / 3, 1 / 3, 1 / 3]) and math.isclose(sum(shares), 1.0)


def test_excluded_samples_are_counted_listed_and_written(tmp_path: Path) -> None:
    rows = (
        feedback_rows("ok", dict.fromkeys(LADDER, 0.5))
        + feedback_rows("missing", {36: 0.5, 72: 0.4})
        + feedback_rows("nan", {**dict.fromkeys(LADDER, 0.5), 144: float("nan")})
        + feedback_rows("inf", {**dict.fromkeys(LADDER, 0.5), 576: float("inf")})
        + feedback_rows("both", {36: float("nan"), 72: 0.4})
    )
    report, out = rank(tmp_path, rows, max_listed_ids=1)
    saved = json.loads((out / "rank_report.json").read_text())
    assert saved["excluded"] == report["excluded"]
    ex = report["excluded"]
    assert ex["missing_level"] == {"n_samples": 2, "sample_ids": ["both"], "truncated": True}
    assert ex["nan_nll"]["n_samples"] == 2 and ex["infinite_nll"]["sample_ids"] == ["inf"]
    assert ex["unexpected_level"]["n_samples"] == 0 and ex["inconsistent_source"]["n_samples"] == 0
    assert (report["n_samples"], report["n_samples_ranked"], report["n_samples_excluded"]) == (5, 1, 4)
    assert {r["sample_id"] for r in read(out, "rankings")} == {"ok"}
    assert {r["sample_id"] for r in read(out, "pairs")} == {"ok"}
    assert read(out, "preferences")[0]["n_samples"] == 1
    excluded = {(r["sample_id"], r["reason"]) for r in read(out, "excluded")}
    assert excluded == {
        ("missing", "missing_level"),
        ("nan", "nan_nll"),
        ("inf", "infinite_nll"),
        ("both", "missing_level"),
        ("both", "nan_nll"),
    }
    assert report["tables"]["rankings"]["rows"] == 5 and report["tables"]["pairs"]["rows"] == 10


def test_explicit_ladder_and_inconsistent_source_exclude(tmp_path: Path) -> None:
    rows = (
        feedback_rows("ok", {36: 0.5, 72: 0.4})
        + feedback_rows("extra", {36: 0.5, 72: 0.4, 144: 0.1})
        + feedback_rows("mixed", {36: 0.5}, source="A")
        + feedback_rows("mixed", {72: 0.4}, source="B")
    )
    report, out = rank(tmp_path, rows, levels=(72, 36))
    assert report["ladder"] == [36, 72] and report["ladder_from"] == "config"
    assert report["excluded"]["unexpected_level"]["sample_ids"] == ["extra"]
    assert report["excluded"]["inconsistent_source"]["sample_ids"] == ["mixed"]
    assert {r["sample_id"] for r in read(out, "rankings")} == {"ok"}


def test_duplicate_rows_are_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    rows = feedback_rows("a", dict.fromkeys(LADDER, 0.5)) + feedback_rows("b", dict.fromkeys(LADDER, 0.5))
    rows += feedback_rows("b", {72: 0.1, 144: 0.2}) + feedback_rows("b", {72: 0.3})
    with pytest.raises(
        FeedbackError, match=r"2 duplicate \(sample_id, level_tokens\) key\(s\) covering 5 rows"
    ) as e:
        rank(tmp_path, rows)
    assert "('b', 72) x3" in str(e.value) and "('b', 144) x2" in str(e.value)
    out = tmp_path / "rank"
    assert not out.exists()  # nothing written, not even an empty output folder


def test_null_keys_are_an_error(tmp_path: Path) -> None:
    rows = feedback_rows("a", {36: 0.1, 72: 0.2}) + feedback_rows("b", {36: 0.1})
    rows[1]["level_tokens"] = None
    rows[2]["sample_id"] = None
    schema = pa.schema([f.with_nullable(True) for f in FEEDBACK_SCHEMA])  # a writer that broke the contract
    (tmp_path / "fb").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "fb" / "part-0.parquet")
    with pytest.raises(FeedbackError, match="1 row.* NULL sample_id and 1 with a NULL level_tokens"):
        run_rank(RankConfig(feedback=tmp_path / "fb", out=tmp_path / "out"))


def test_missing_columns_and_empty_input_are_errors(tmp_path: Path) -> None:
    folder = tmp_path / "fb"
    folder.mkdir()
    pq.write_table(pa.table({"sample_id": ["a"], "level_tokens": [36]}), folder / "part-0.parquet")
    with pytest.raises(FeedbackError, match="lacks column.*nll_mean"):
        run_rank(RankConfig(feedback=folder, out=tmp_path / "out"))
    write_feedback(tmp_path / "empty", [])
    with pytest.raises(FeedbackError, match="has no rows"):
        run_rank(RankConfig(feedback=tmp_path / "empty", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # the failed runs left no empty output folder
    (tmp_path / "bare").mkdir()
    with pytest.raises(FeedbackError, match="no Parquet files") as e:
        run_rank(RankConfig(feedback=tmp_path / "bare", out=tmp_path / "out2"))
    assert e.value.exit_code == 4  # nothing scored yet: an earlier stage is missing
    with pytest.raises(FeedbackError, match="does not exist"):
        run_rank(RankConfig(feedback=tmp_path / "nope", out=tmp_path / "out2"))


def test_feedback_resolves_from_run_folder_feedback_folder_file_and_glob(tmp_path: Path) -> None:
    rows = [r for s in range(6) for r in feedback_rows(f"s{s}", dict.fromkeys(LADDER, 0.1 * s))]
    run = write_feedback(tmp_path / "run", rows, n_parts=3)
    (run / "feedback" / ".part-99.parquet.tmp").write_bytes(b"half-written")  # a writer's temp file
    (run / "feedback" / "_SUCCESS").write_text("")
    expected = sorted((run / "feedback").glob("part-*.parquet"))
    assert resolve_table(run)[1] == expected
    assert resolve_table(run / "feedback")[1] == expected
    assert resolve_table(expected[0])[1] == expected[:1]
    assert resolve_table(str(run / "feedback" / "part-0000[01].parquet")) == (run / "feedback", expected[:2])
    assert resolve_table(str(tmp_path / "*" / "feedback")) == (run / "feedback", expected)
    with pytest.raises(FeedbackError, match="matches no Parquet"):
        resolve_table(str(run / "*.nothing"))
    report = run_rank(RankConfig(feedback=run / "feedback", out=tmp_path / "rank"))
    assert report["inputs"]["n_files"] == 3 and report["n_samples_ranked"] == 6


def test_rerun_replaces_outputs_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    rows = feedback_rows("a", {36: 0.3, 72: 0.2}) + feedback_rows("b", {36: 0.1, 72: 0.2})
    _, out = rank(tmp_path, rows, abs_tol=0.0)
    assert by_sample(read(out, "rankings"))["a"][0]["level_tokens"] == 72
    (out / "unrelated.txt").write_text("keep me")
    report = run_rank(RankConfig(feedback=tmp_path / "run", out=out, abs_tol=0.5))
    assert by_sample(read(out, "rankings"))["a"][0]["level_tokens"] == 36
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["rankings", "pairs", "preferences", "excluded", "rank_report.json", "unrelated.txt"]
    )
    assert all(len(list((out / t).iterdir())) == 1 for t in ("rankings", "pairs", "preferences", "excluded"))
    assert (
        json.loads((out / "rank_report.json").read_text())["config"]["abs_tol"]
        == 0.5
        == report["config"]["abs_tol"]
    )


def test_out_inside_the_feedback_folder_is_refused(tmp_path: Path) -> None:
    run = write_feedback(tmp_path / "run", feedback_rows("a", {36: 0.3}))
    with pytest.raises(FeedbackError, match="inside the feedback folder"):
        run_rank(RankConfig(feedback=run / "feedback", out=run / "feedback" / "rank"))


@pytest.mark.parametrize(
    "bad",
    [
        {"abs_tol": -0.1},
        {"rel_tol": float("nan")},
        {"margin_scale": float("inf")},
        {"levels": (36, 36)},
        {"levels": (0,)},
        {"threads": 0},
        {"max_listed_ids": -1},
    ],
)
def test_config_validation(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        RankConfig(feedback=tmp_path, out=tmp_path / "o", **bad)


def test_sql_is_loaded_from_package_files() -> None:
    names = (
        "ladder",
        "sample_checks",
        "validate",
        "duplicates",
        "excluded",
        "ranked_samples",
        "rankings",
        "pairs",
        "preferences",
    )
    for name in names:
        sql = load_sql(name)
        assert "SELECT" in sql and not sql.endswith(";")
    with pytest.raises(FileNotFoundError, match="rankings.sql"):
        load_sql("nope")


def test_cli_rank_summary_and_errors(tmp_path: Path) -> None:
    from rglf.cli import app

    rows = feedback_rows("a", {36: 0.3, 72: 0.2}) + feedback_rows("b", {36: 0.1})
    run = write_feedback(tmp_path / "run", rows)
    runner = CliRunner()
    result = runner.invoke(
        app, ["rank", "--run", str(run), "--out", str(tmp_path / "rank"), "--abs-tol", "0", "--margin-scale", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "1 of 2 samples ranked" in result.output and "missing_level 1" in result.output
    saved = json.loads((tmp_path / "rank" / "rank_report.json").read_text())
    assert saved["config"]["margin_scale"] == 2.0 and saved["config"]["abs_tol"] == 0.0

    result = runner.invoke(app, ["rank", "--run", str(run), "--out", str(tmp_path / "r2"), "--abs-tol", "-1"])
    assert result.exit_code == 2 and "abs_tol" in result.output

    write_feedback(tmp_path / "dup", rows + rows[:1])
    result = runner.invoke(app, ["rank", "--run", str(tmp_path / "dup"), "--out", str(tmp_path / "r3")])
    assert result.exit_code == 2 and "duplicate" in result.output and "Traceback" not in result.output
