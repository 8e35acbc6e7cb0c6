-- pairs: every pair of levels of a sample, oriented by the ranking (better = lower rank), with
-- the SPEC's adaptive margin. For N levels: N*(N-1)/2 rows per sample. Keyed by sample_id only
-- (join `rankings` for source / split: repeating them on every pair cost ~30% of the write).
-- Input: table `ranked_samples` (levels in rank order). Parameter: $margin_scale (m, DOUBLE).
--   gap      = j = worse_rank - better_rank (distance in the ranked order, 1..N-1)
--   nll_diff = worse_nll_mean - better_nll_mean (raw, unscaled)
--   margin   = m * j * nll_diff (SPEC: margin = m * j * (nll_(i+j) - nll_(i)))
-- Within a tie set the cheaper level ranks first even when its NLL is a little higher, so
-- nll_diff and margin can be NEGATIVE there (down to -m * j * tol). They are kept raw; the
-- trainer clamps (e.g. max(margin, 0)) if it wants hinge margins >= 0.
WITH positions AS (
    SELECT unnest(range(1, max(n_levels) + 1)) AS position FROM ranked_samples
),

rank_pairs AS (
    -- (better_rank, worse_rank) for every better_rank < worse_rank up to the largest ladder
    SELECT b.position AS better_rank, w.position AS worse_rank
    FROM positions AS b
    INNER JOIN positions AS w ON b.position < w.position
),

paired AS (
    SELECT
        s.sample_id,
        p.better_rank,
        p.worse_rank,
        s.by_rank[p.better_rank] AS better,
        s.by_rank[p.worse_rank] AS worse
    FROM ranked_samples AS s
    INNER JOIN rank_pairs AS p ON p.worse_rank <= s.n_levels
)

SELECT
    sample_id,
    better.level_tokens AS better_level_tokens,
    worse.level_tokens AS worse_level_tokens,
    better.level_index AS better_level_index,
    worse.level_index AS worse_level_index,
    better_rank::INTEGER AS better_rank,
    worse_rank::INTEGER AS worse_rank,
    (worse_rank - better_rank)::INTEGER AS gap,
    better.nll_mean AS better_nll_mean,
    worse.nll_mean AS worse_nll_mean,
    worse.nll_mean - better.nll_mean AS nll_diff,
    $margin_scale * (worse_rank - better_rank) * (worse.nll_mean - better.nll_mean) AS margin,
    NOT better.outside_tie_set AND NOT worse.outside_tie_set AS within_tie_set
FROM paired
