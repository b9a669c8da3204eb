"""Training on Ray Train: the configs, the per-worker loop, `run_train` (split -> members ->
ensemble fit -> bundle), held-out evaluation and patient-level cross-validation."""
