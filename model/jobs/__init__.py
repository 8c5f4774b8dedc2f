"""Batch jobs on Ray Data: `ray_eval` (best-of-k evaluation, `sprm eval --ray`) and `ray_collect` (rollouts,
`python -m sprm_kernels.model.train collect --ray`). `cluster` connects to Ray; `output` writes the per-problem rows.

Importing this package imports neither Ray nor transformers; each job imports Ray when it runs.
"""
