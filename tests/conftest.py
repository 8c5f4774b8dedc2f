"""Test session setup: without CUDA, Triton kernels run under the interpreter, which must be enabled before
triton is imported (importing torch does not import triton)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine oversubscribed OpenMP threads made
# decoding loops up to 100x slower: one thread keeps the suite's run time stable.
torch.set_num_threads(1)

from helpers import HAS_CUDA, INTERPRETING  # noqa: E402 (after TRITON_INTERPRET is set: helpers reads it)

# (device, backend) pairs every kernel test runs on: the Triton kernels (compiled on CUDA, interpreted on CPU)
# and the PyTorch path.
ROUTES = [pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda)] if HAS_CUDA else []
ROUTES += [pytest.param(("cpu", "torch"), id="cpu-torch")]
if INTERPRETING:
    ROUTES += [pytest.param(("cpu", "triton"), id="cpu-interpreter")]


@pytest.fixture(params=ROUTES)
def route(request):
    return request.param


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like in the code under test returns poison (NaN, or -7777 for integers), so a
    result element the kernel forgot to write cannot pass by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.device.type == "meta":
            return tensor
        if tensor.is_floating_point():
            return tensor.fill_(float("nan"))
        return tensor.fill_(True if tensor.dtype == torch.bool else 255 if tensor.dtype == torch.uint8 else -7777)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One private Ray instance for the whole run (tests/ray/): 127.0.0.1 only, no dashboard, the
    machine's CPUs; shut down at the end. Ray's start-up costs seconds, so it is never started twice."""
    ray = pytest.importorskip("ray", reason="the Ray tests need Ray (pip install 'ray[data,serve]')")
    from sprm_kernels.model.ray.cluster import connect

    connect(None, num_cpus=max(2, os.cpu_count() or 1))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def vllm_shipped():
    """One vLLM engine on the shipped model for the whole session (each engine start costs 20 s or more)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from sprm_kernels.model import load_engine
    from sprm_kernels.model.shipped import SHIPPED_DIR

    engine = load_engine(SHIPPED_DIR, engine="vllm")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_async_shipped():
    """The server's vLLM engine (vLLM's AsyncLLM, `AsyncVLLMReflectiveModel`) on the shipped model, for the session."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from sprm_kernels.model import load_engine
    from sprm_kernels.model.shipped import SHIPPED_DIR

    engine = load_engine(SHIPPED_DIR, engine="vllm", serving=True)
    yield engine
    engine.close()
