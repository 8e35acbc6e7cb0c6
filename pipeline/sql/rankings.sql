-- rankings: one row per (sample, level) of every valid sample. Input: table `ranked_samples`
-- (the ranking, see ranked_samples.sql). Rows of a sample are contiguous, in rank order.
--   rank          1 = best
--   in_tie_set    within tolerance of the sample's minimum NLL
--   best_*        the rank-1 level: the cheapest level within tolerance of the minimum
--   regret        nll_mean - min_nll_mean (>= 0; the rank-1 level's regret is <= tol)
--   level_index   0-based position of the level among the sample's levels by level_tokens
WITH flat AS (
    SELECT
        sample_id,
        source,
        split,
        n_levels,
        min_nll_mean,
        by_rank[1] AS best,
        unnest(by_rank) AS level,
        generate_subscripts(by_rank, 1) AS rank
    FROM ranked_samples
)

SELECT
    sample_id,
    source,
    split,
    level.level_tokens AS level_tokens,
    level.level_index AS level_index,
    level.n_visual_tokens AS n_visual_tokens,
    level.nll_mean AS nll_mean,
    level.greedy_match AS greedy_match,
    rank::INTEGER AS rank,
    NOT level.outside_tie_set AS in_tie_set,
    best.level_tokens AS best_level_tokens,
    best.n_visual_tokens AS best_n_visual_tokens,
    min_nll_mean,
    level.nll_mean - min_nll_mean AS regret,
    n_levels::INTEGER AS n_levels
FROM flat
