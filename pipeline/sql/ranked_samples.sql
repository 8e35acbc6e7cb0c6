-- ranked_samples: one row per valid sample with its levels as a list in RANK order (the
-- ranking itself; `rankings` and `pairs` unnest it). ARCHITECTURE.md "Ranking semantics":
--   min_nll_mean = min(nll_mean) over the sample's levels
--   tol          = greatest($abs_tol, $rel_tol * min_nll_mean)
--   tie set      = the levels with nll_mean <= min_nll_mean + tol
--   order        = the tie set first, FEWER level_tokens first; then the other levels by
--                  nll_mean ascending, exact ties by fewer level_tokens. Total and
--                  deterministic, since level_tokens is unique within a sample.
-- Input: table `sample_checks`. Parameters: $abs_tol, $rel_tol (DOUBLE >= 0).
WITH valid AS (
    SELECT
        sample_id,
        source,
        split,
        n_levels,
        min_nll_mean,
        min_nll_mean + greatest($abs_tol, $rel_tol * min_nll_mean) AS tie_bound,
        levels
    FROM sample_checks
    WHERE NOT excluded
),

indexed AS (
    -- level_index: 0-based position by level_tokens (the structs sort on level_tokens first)
    SELECT
        * REPLACE (
            list_transform(
                list_sort(levels, 'ASC', 'NULLS LAST'),
                lambda l, i: {
                    'level_tokens': l.level_tokens,
                    'level_index': (i - 1)::INTEGER,
                    'n_visual_tokens': l.n_visual_tokens,
                    'nll_mean': l.nll_mean,
                    'greedy_match': l.greedy_match
                }
            ) AS levels
        )
    FROM valid
),

ranked AS (
    -- a struct sorts field by field: (outside the tie set, NLL outside it, level_tokens)
    SELECT
        sample_id,
        source,
        split,
        n_levels,
        min_nll_mean,
        list_sort(
            list_transform(
                levels,
                lambda l: {
                    'outside_tie_set': l.nll_mean > tie_bound,
                    'sort_nll': CASE WHEN l.nll_mean > tie_bound THEN l.nll_mean ELSE 0.0 END,
                    'level_tokens': l.level_tokens,
                    'level_index': l.level_index,
                    'n_visual_tokens': l.n_visual_tokens,
                    'nll_mean': l.nll_mean,
                    'greedy_match': l.greedy_match
                }
            ),
            'ASC',
            'NULLS LAST'
        ) AS by_rank
    FROM indexed
)

SELECT * FROM ranked
