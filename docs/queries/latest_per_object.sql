-- Latest committed prediction per object (key), across rescans and model versions.
-- Only runs with a manifest under runs/ count: an uncommitted run's rows are never read.
-- Replace {{output}} with the output root (a local folder; for S3 see docs/queries.md).
WITH runs AS (
    SELECT run_id, finished_at FROM read_json_auto('{{output}}/runs/*.json')
), predictions AS (
    SELECT * FROM read_parquet('{{output}}/predictions/*/*/*.parquet', hive_partitioning = true)
)
SELECT * EXCLUDE (rn, finished_at)
FROM (
    SELECT p.*, r.finished_at,
           row_number() OVER (PARTITION BY p.key ORDER BY r.finished_at DESC, p.etag) AS rn
    FROM predictions p JOIN runs r USING (run_id)
)
WHERE rn = 1
ORDER BY key;
