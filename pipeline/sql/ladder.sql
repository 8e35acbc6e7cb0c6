-- ladder: the run's ladder when none is given = every distinct level_tokens in the feedback,
-- ascending. Input: view `feedback`.
SELECT DISTINCT level_tokens
FROM feedback
WHERE level_tokens IS NOT NULL
ORDER BY level_tokens
