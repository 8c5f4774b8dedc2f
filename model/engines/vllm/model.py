"""The policy with its SPRM head inside vLLM's forward: `SPRMQwen2ForCausalLM` and `SPRMLlamaForCausalLM`.

Each wraps vLLM's own model class and asks its decoder for the input of layer L-1, which is the output of layer
L-2 (the residual stream, `hidden + residual`: vLLM fuses the residual add into the next layer's norm), through
the same `aux_hidden_state_layers` path that EAGLE-3 uses. The head runs on that state for every token of the
step, in the same forward that produces the logits the sampler draws from: the step logit of position t is
computed from exactly the state that predicted token t+1. The logits land in a buffer that the worker extension
(`worker.py`) reads after the step; nothing else changes, so sampling, KV cache and scheduling are vLLM's.

The head is read from the model folder by the worker itself (`sprm_head.safetensors` or `score_module.pt`); vLLM's
loader reads every `*.safetensors` of the folder, so `load_weights` drops the head's tensors from its stream.

GPU notes (see CONTRIBUTING, "vLLM engine"): the head is two matmuls, a ReLU and a dot product on the [N, H]
slice, with no host synchronisation and no data-dependent shape, so it can be captured in a CUDA graph and traced
by torch.compile; on CUDA it is one Triton launch (`launch_step_logits`) instead.
"""

from __future__ import annotations

import torch
from torch import nn

import sprm_kernels.model.engines.vllm.compat as compat
from sprm_kernels.model.core.head import STATE_KEYS, SPRMHead
from sprm_kernels.torch_ops import head_logits_fp32


class _HeadState(nn.Module):
    """The head's weights and the outputs of the latest forward.

    The weights are rounded to the model's dtype at load (as the HF engine moves its head to the model's dtype) and
    then kept in the form the route reads, converted once there and never per step: on CUDA with triton, W1 in
    the model's dtype (the kernel's operand) and the vectors in fp32; elsewhere all four in fp32 (the PyTorch
    route's operands). On CUDA the launch reuses `buffers` (output, workspace, self-resetting tickets) and scores
    the rows in order with no index tensor: a forward allocates nothing for the head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        # Explicit fp32: vLLM builds the model under its dtype as torch's default; load() sets the dtypes used.
        self.register_buffer("w1", torch.zeros(2 * hidden_size, hidden_size, dtype=torch.float32), persistent=False)
        self.register_buffer("b1", torch.zeros(2 * hidden_size, dtype=torch.float32), persistent=False)
        self.register_buffer("w2", torch.zeros(2 * hidden_size, dtype=torch.float32), persistent=False)
        self.register_buffer("b2", torch.zeros(1, dtype=torch.float32), persistent=False)
        self.kernel_route = False  # set by load(): CUDA and triton, the fused step_logits launch
        self.buffers = None
        self.last = None  # (positions [N], input_ids [N], logits [N] fp32, features [N, H]) of the latest forward
        self.confidence_on = False  # set by the worker once an engine call prunes by confidence
        self.last_confidence = None  # [R] fp32 token confidence of the rows sampled in the latest step (or None)

    def load(self, path: str, dtype: torch.dtype) -> None:
        head = SPRMHead.from_pretrained(path)
        if head.hidden_size != self.hidden_size:
            raise ValueError(f"{path}: expected an SPRM head with H={self.hidden_size}, got H={head.hidden_size}")
        device = self.w1.device
        self.kernel_route = device.type == "cuda" and compat.triton_ready()
        for name, value in zip(("w1", "b1", "w2", "b2"), head.kernel_weights(), strict=True):
            rounded = value.to(dtype).reshape(getattr(self, name).shape)
            kept = dtype if name == "w1" and self.kernel_route else torch.float32
            setattr(self, name, rounded.to(device=device, dtype=kept).contiguous())  # a buffer: replaced in place
        if self.kernel_route:
            from sprm_kernels.kernels.step_logits import StepLogitsBuffers

            self.buffers = StepLogitsBuffers()

    def forward(self, features: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor | None) -> None:
        if self.kernel_route and features.is_cuda and features.dtype == self.w1.dtype:
            from sprm_kernels.kernels.step_logits import launch_step_logits

            logits = launch_step_logits(features, None, self.w1, self.b1, self.w2, self.b2, buffers=self.buffers)
        else:
            logits = head_logits_fp32(features, self.w1, self.b1, self.w2, self.b2)
        self.last = (positions, input_ids, logits, features)

    def confidence(self, logits: torch.Tensor) -> None:
        """DeepConf's token confidence of each sampled row: minus the mean log-probability of its top-k tokens
        (k = CONFIDENCE_TOP_K, or the vocabulary), from the model's own distribution (before temperature)."""
        if self.confidence_on:
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(CONFIDENCE_TOP_K, logits.shape[-1]), dim=-1)
            self.last_confidence = -top.values.mean(dim=-1)


CONFIDENCE_TOP_K = 20  # DeepConf's k


def _with_sprm_head(base: type) -> type:
    class SPRMForCausalLM(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = vllm_config.model_config.hf_config
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = config.num_hidden_layers
            if num_layers < 2:
                raise ValueError(
                    f"model: expected at least 2 decoder layers (the head reads layer L-2), got {num_layers}"
                )
            compat.capture_layer_input(self, num_layers - 1)  # the input of layer L-1 = the output of layer L-2
            self.sprm_path = vllm_config.model_config.model
            self.sprm_dtype = vllm_config.model_config.dtype
            self.sprm = _HeadState(config.hidden_size)

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            output = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            hidden, captured = compat.split_captured(output)
            self.sprm(captured, positions, input_ids)
            return hidden

        def compute_logits(self, hidden_states):
            logits = super().compute_logits(hidden_states)
            if logits is not None:
                self.sprm.confidence(logits)
            return logits

        def load_weights(self, weights):
            # vLLM's loader streams every *.safetensors of the folder, sprm_head.safetensors included: its tensors
            # (named 0.weight ... 3.bias) are the head's, which is read from the folder below instead.
            loaded = super().load_weights((name, w) for name, w in weights if name not in STATE_KEYS)
            self.sprm.load(self.sprm_path, self.sprm_dtype)
            return loaded

    SPRMForCausalLM.__name__ = SPRMForCausalLM.__qualname__ = f"SPRM{base.__name__}"
    return SPRMForCausalLM


_BASES = compat.base_classes()
SPRMQwen2ForCausalLM = _with_sprm_head(_BASES["SPRMQwen2ForCausalLM"])
SPRMLlamaForCausalLM = _with_sprm_head(_BASES["SPRMLlamaForCausalLM"])
