"""Archive screening on Ray Data: the config, the output schemas, the pipeline stages (decode,
ensemble predictor, postprocess), the run ledger (commits, garbage collection, incremental diff)
and per-subgroup statistics."""
