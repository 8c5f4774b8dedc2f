"""Engines behind one interface (`base.Engine`): `hf` (transformers) and `vllm`, loaded by `registry.load_engine`.
Importing this package imports neither engine."""
