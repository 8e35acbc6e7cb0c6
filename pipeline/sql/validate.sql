-- validate: whole-table key checks that make ranking impossible (an ERROR, not an exclusion),
-- read off `sample_checks` so the feedback is scanned once. One row:
--   n_rows                rows of feedback
--   n_samples             distinct sample_id (a NULL sample_id counts as one)
--   n_null_sample_id      rows with a NULL sample_id (FEEDBACK_SCHEMA forbids them)
--   n_null_level_tokens   rows with a NULL level_tokens (idem)
--   n_duplicate_samples   samples with a level_tokens present more than once (details:
--                         duplicates.sql)
SELECT
    coalesce(sum(n_levels), 0) AS n_rows,
    count(*) AS n_samples,
    coalesce(sum(n_levels) FILTER (WHERE sample_id IS NULL), 0) AS n_null_sample_id,
    coalesce(sum(n_null_level_tokens), 0) AS n_null_level_tokens,
    count(*) FILTER (WHERE duplicate_levels) AS n_duplicate_samples
FROM sample_checks
