-- preferences: long shape, one row per (source, policy). Input: table `rankings`.
--   source  a dataset name, or '__all__' for every ranked sample together
--   policy  'fixed'  = always use level `level_tokens`
--           'oracle' = use each sample's rank-1 level (level_tokens / level_index NULL)
-- Per row:
--   n_samples                 ranked samples in the source
--   n_best, best_share        fixed: samples whose rank-1 level is this level, and their share
--                             (shares of a source's fixed rows sum to 1); oracle: NULL
--   mean_level_tokens         tokens per crop under the policy
--   mean_visual_tokens        n_visual_tokens (after packing) under the policy
--   token_reduction_vs_finest 1 - mean_visual_tokens / (the finest fixed level's mean_visual_tokens)
--   mean_nll                  mean nll_mean under the policy
--   mean_regret               mean (nll_mean - the sample's min nll_mean); the oracle's is
--                             the price of the tolerance (0 with abs_tol = rel_tol = 0)
--   greedy_accuracy           share of samples whose greedy decode reproduces the answer
--                             (greedy_match) under the policy
WITH fixed AS (
    SELECT
        CASE WHEN grouping(source) = 1 THEN '__all__' ELSE source END AS source,
        'fixed' AS policy,
        level_tokens,
        count(*) AS n_samples,
        count(*) FILTER (WHERE rank = 1) AS n_best,
        avg(level_tokens) AS mean_level_tokens,
        avg(n_visual_tokens) AS mean_visual_tokens,
        avg(nll_mean) AS mean_nll,
        avg(regret) AS mean_regret,
        avg(greedy_match::DOUBLE) AS greedy_accuracy
    FROM rankings
    GROUP BY GROUPING SETS ((source, level_tokens), (level_tokens))
),

oracle AS (
    SELECT
        CASE WHEN grouping(source) = 1 THEN '__all__' ELSE source END AS source,
        'oracle' AS policy,
        NULL::INTEGER AS level_tokens,
        count(*) AS n_samples,
        NULL::BIGINT AS n_best,
        avg(level_tokens) AS mean_level_tokens,
        avg(n_visual_tokens) AS mean_visual_tokens,
        avg(nll_mean) AS mean_nll,
        avg(regret) AS mean_regret,
        avg(greedy_match::DOUBLE) AS greedy_accuracy
    FROM rankings
    WHERE rank = 1
    GROUP BY GROUPING SETS ((source), ())
),

policies AS (
    SELECT * FROM fixed
    UNION ALL BY NAME
    SELECT * FROM oracle
),

finest AS (
    -- the finest level's cost in each source group: the reference for token reduction
    SELECT source, arg_max(mean_visual_tokens, level_tokens) AS finest_visual_tokens
    FROM fixed
    GROUP BY source
),

level_positions AS (
    SELECT level_tokens, (row_number() OVER (ORDER BY level_tokens) - 1)::INTEGER AS level_index
    FROM (SELECT DISTINCT level_tokens FROM rankings)
)

SELECT
    p.source,
    p.policy,
    p.level_tokens,
    l.level_index,
    p.n_samples,
    p.n_best,
    p.n_best / p.n_samples AS best_share,
    p.mean_level_tokens,
    p.mean_visual_tokens,
    1 - p.mean_visual_tokens / f.finest_visual_tokens AS token_reduction_vs_finest,
    p.mean_nll,
    p.mean_regret,
    p.greedy_accuracy
FROM policies AS p
INNER JOIN finest AS f USING (source)
LEFT JOIN level_positions AS l USING (level_tokens)
ORDER BY p.source <> '__all__', p.source, p.policy = 'oracle', p.level_tokens
