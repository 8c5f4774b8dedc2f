"""Training an SPRM head on your own policy (docs/method.md §6), in layers that import downward:

- `rollouts`: `RolloutSet`, its file format and row helpers;
- `verifiers`: the verifier contract, `last_number_verifier`, `load_verifier`, `read_prompts`;
- `collect`: `collect(engine, prompts, verifier, k)`, labelled rollouts with the decoding's features;
- `metrics`: `evaluate` (within-problem selection metrics), `roc_auc`, `TrainReport`;
- `fit`: `train_head`, the training loop and its checkpoints.

The command line is `sprm train collect|fit` (model/cli/train.py); on Ray, model/ray/collect_job.py.
"""
