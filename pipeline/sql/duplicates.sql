-- duplicates: the duplicate (sample_id, level_tokens) keys, for the error message. Run only
-- when validate.sql found some. Inputs: view `feedback`, table `sample_checks`. One row:
--   n_duplicate_keys, n_duplicate_rows, duplicate_examples (up to 5 {sample_id, level_tokens, n}).
WITH keys AS (
    SELECT f.sample_id, f.level_tokens, count(*) AS n
    FROM feedback AS f
    SEMI JOIN sample_checks AS c ON f.sample_id = c.sample_id AND c.duplicate_levels
    GROUP BY f.sample_id, f.level_tokens
    HAVING count(*) > 1
)

SELECT
    count(*) AS n_duplicate_keys,
    coalesce(sum(n), 0) AS n_duplicate_rows,
    (list({'sample_id': sample_id, 'level_tokens': level_tokens, 'n': n}
          ORDER BY sample_id, level_tokens))[1:5] AS duplicate_examples
FROM keys
