-- excluded: one row per (excluded sample, reason); a sample failing several checks has several
-- rows. Input: table `sample_checks`.
WITH failed_checks AS (
    UNPIVOT (
        SELECT
            sample_id, source, split, n_levels,
            missing_level, unexpected_level, nan_nll, infinite_nll, inconsistent_source
        FROM sample_checks
        WHERE excluded
    )
    ON missing_level, unexpected_level, nan_nll, infinite_nll, inconsistent_source
    INTO NAME reason VALUE failed
)

SELECT sample_id, source, split, n_levels, reason
FROM failed_checks
WHERE failed
ORDER BY reason, sample_id
