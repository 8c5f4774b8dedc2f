"""The bottom layer of `sprm_kernels.model`: result types, options, the choice rule, the head, tokens, sampling,
the streaming step rule, progress and threads. Imports nothing else of `sprm_kernels.model`, and no transformers."""
