"""Which implementation runs: compiled Triton on CUDA, the Triton interpreter on CPU when TRITON_INTERPRET=1,
and the vectorised PyTorch path on CPU otherwise. Callers may force one with `backend=`."""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """'triton' or 'torch' for tensors on `device`; `backend` forces a choice (and is checked)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton":
            if not triton_available():
                raise RuntimeError("backend='triton' needs the triton package, which is not installed")
            if device.type == "cpu" and not interpreter_enabled():
                raise RuntimeError(
                    "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
                )
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and interpreter_enabled() and triton_available():
        return "triton"
    return "torch"
