-- sample_checks: one row per sample: its levels (as a list) and the reasons that exclude it
-- from rankings, pairs and preferences. Input: view `feedback`. Parameter: $ladder
-- (INTEGER[]: the level_tokens every sample must have).
-- Key problems are errors, raised from validate.sql before anything is ranked:
--   duplicate_levels    a level_tokens present more than once
--   n_null_level_tokens rows with a NULL level_tokens (a NULL sample_id forms its own group)
-- Exclusions (a sample can fail several checks; `excluded` = any of them):
--   missing_level       fewer of the ladder's levels than the ladder has
--   unexpected_level    a level_tokens outside the ladder (only possible with an explicit ladder)
--   nan_nll             nll_mean NaN or NULL at some level
--   infinite_nll        nll_mean +/-inf at some level
--   inconsistent_source the sample's rows disagree on source or split
-- One GROUP BY does the checks and collects the levels, so ranking needs no second pass
-- over the feedback (see bench/bench_rank.py).
WITH per_sample AS (
    SELECT
        sample_id,
        min(source) AS source,
        min(split) AS split,
        count(*) AS n_levels,
        min(nll_mean) AS min_nll_mean,
        list({
            'level_tokens': level_tokens,
            'n_visual_tokens': n_visual_tokens,
            'nll_mean': nll_mean,
            'greedy_match': greedy_match
        }) AS levels,
        count(*) FILTER (WHERE list_contains($ladder::INTEGER[], level_tokens)) AS n_ladder_levels,
        count(*) FILTER (WHERE NOT list_contains($ladder::INTEGER[], level_tokens)) AS n_unexpected_levels,
        count(level_tokens) AS n_level_tokens,
        count(*) FILTER (WHERE nll_mean IS NULL OR isnan(nll_mean)) AS n_nan,
        count(*) FILTER (WHERE isinf(nll_mean)) AS n_inf,
        -- min/max instead of count(DISTINCT ...): same answer, far cheaper
        min(source) IS DISTINCT FROM max(source) AS sources_differ,
        min(split) IS DISTINCT FROM max(split) AS splits_differ,
        count(split) AS n_split_set
    FROM feedback
    GROUP BY sample_id
),

flags AS (
    SELECT
        sample_id,
        source,
        split,
        n_levels,
        min_nll_mean,
        levels,
        n_levels - n_level_tokens AS n_null_level_tokens,
        -- list_distinct drops NULLs: compare with the non-NULL count
        len(list_distinct(list_transform(levels, lambda l: l.level_tokens))) < n_level_tokens AS duplicate_levels,
        n_ladder_levels < len($ladder::INTEGER[]) AS missing_level,
        n_unexpected_levels > 0 AS unexpected_level,
        n_nan > 0 AS nan_nll,
        n_inf > 0 AS infinite_nll,
        -- split may be NULL; NULL on some rows and set on others also disagrees
        sources_differ OR splits_differ OR (n_split_set > 0 AND n_split_set < n_levels) AS inconsistent_source
    FROM per_sample
)

SELECT
    *,
    missing_level OR unexpected_level OR nan_nll OR infinite_nll OR inconsistent_source AS excluded
FROM flags
