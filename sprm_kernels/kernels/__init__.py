"""Triton kernels and their launchers (imported lazily by the ops, so triton is optional off Linux)."""
