"""The CUDA benchmark's unfused baseline (`bench.kernels.cublas_epilogue`) computes the same scores as the
reference, so that its timings compare like with like. It runs on CPU tensors too (addmm is not cuBLAS there)."""

import torch
from helpers import random_csr, random_head, truth

from bench.kernels import cublas_epilogue


def test_cublas_epilogue_baseline_matches_truth():
    hidden = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(1))
    head = random_head(32, seed=2)
    step_index, offsets = random_csr(60, [4, 0, 7, 2], seed=3)
    expected = truth(hidden, step_index, offsets, *head, group_size=2)
    score = cublas_epilogue(hidden, step_index, offsets, *head)
    assert (score.double() - expected.score).abs().max() < 1e-5
    assert score[1] == 0
    best = cublas_epilogue(hidden, step_index, offsets, *head, group_size=2)
    assert best.tolist() == expected.score.view(-1, 2).argmax(1).tolist()
