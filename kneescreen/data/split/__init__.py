"""Leakage-free splits of labelled collections: fingerprint, de-duplicate, group, assign, audit.

Public: `run.run_split`, `run.load_split`, `run.SplitConfig`, `collection.load_collection`,
`audit.audit_split`. The steps (no Ray in any of them): `collection` (labels -> items), `tables`
(the table functions both engines run), `components` (duplicate policy, union-find), `assign`
(stratified greedy assignment), `writer` (split.csv, audit files), `audit` (leaks, class counts).
The engines implement `engine.Engine`: `engine_local` (in process) and `engine_ray` (Ray Data
stages, bounded driver memory; the one module that imports Ray, inside its functions).
"""
