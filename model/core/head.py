"""The SPRM head: the reference's `nn.Sequential`, loadable from its `score_module.pt` as is (docs/method.md §2)."""

from __future__ import annotations

import os

import torch
from torch import nn

PT_NAME = "score_module.pt"  # the published checkpoints' file: a torch.save'd state dict
SAFETENSORS_NAME = "sprm_head.safetensors"  # this project's form of the same state dict
STATE_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


class SPRMHead(nn.Sequential):
    """`Linear(H, 2H) -> ReLU -> Dropout(0.5) -> Linear(2H, 1)`: one logit per step.

    It is an `nn.Sequential` with the reference's layer order, so its state dict keys are those of
    `score_module.pt` (`0.weight [2H, H]`, `0.bias [2H]`, `3.weight [1, 2H]`, `3.bias [1]`).
    The fused kernels read the weights through `w1, b1, w2, b2` (Dropout is inert at inference).
    """

    def __init__(self, hidden_size: int, dropout: float = 0.5):
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        super().__init__(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_size, 1),
        )

    @property
    def hidden_size(self) -> int:
        return self[0].in_features

    @property
    def w1(self) -> torch.Tensor:
        return self[0].weight.detach()

    @property
    def b1(self) -> torch.Tensor:
        return self[0].bias.detach()

    @property
    def w2(self) -> torch.Tensor:
        return self[3].weight.detach()

    @property
    def b2(self) -> torch.Tensor:
        return self[3].bias.detach()

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1 [2H, H], b1 [2H], W2 [1, 2H], b2 [1]), detached, as `sprm_score` and `StepScorer` take them."""
        return self.w1, self.b1, self.w2, self.b2

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], *, source: str = "state_dict") -> SPRMHead:
        """A head with H read from `0.weight`; `source` names the file in error messages."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"{source}: expected a state dict, got {type(state_dict).__name__}")
        missing = [key for key in STATE_KEYS if key not in state_dict]
        unexpected = sorted(set(state_dict) - set(STATE_KEYS))
        if missing or unexpected:
            raise ValueError(
                f"{source}: expected exactly the keys {list(STATE_KEYS)}, missing {missing}, unexpected {unexpected}"
            )
        for key in STATE_KEYS:
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{source}: expected {key} to be a floating-point tensor, got {got}")
        first = state_dict["0.weight"]
        if first.dim() != 2 or first.shape[1] < 1 or first.shape[0] != 2 * first.shape[1]:
            raise ValueError(f"{source}: expected 0.weight of shape [2H, H] with H >= 1, got {tuple(first.shape)}")
        head = cls(first.shape[1])
        try:
            head.load_state_dict(state_dict)
        except RuntimeError as error:  # shape mismatches among the other tensors
            raise ValueError(f"{source}: {error}") from None
        return head

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None) -> SPRMHead:
        """Load from a folder holding `sprm_head.safetensors` or `score_module.pt`.

        If both exist, `sprm_head.safetensors` wins: it is what `save_pretrained` writes (so a head saved into an
        official folder replaces the published one), and reading it runs no unpickler.
        The `.pt` is read with `torch.load(..., weights_only=True)`.
        """
        safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
        pt_path = os.path.join(directory, PT_NAME)
        if os.path.isfile(safetensors_path):
            from safetensors.torch import load_file

            source, read = safetensors_path, lambda: load_file(safetensors_path, device="cpu")
        elif os.path.isfile(pt_path):
            source, read = pt_path, lambda: torch.load(pt_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{directory}: expected {SAFETENSORS_NAME} or {PT_NAME} (the SPRM head)")
        try:
            state_dict = read()
        except Exception as error:  # corrupt, truncated, a pickle of objects (refused by weights_only), unreadable
            kind = (
                "a safetensors file"
                if source == safetensors_path
                else "a state dict torch.load can read with weights_only=True (tensors only, no pickled objects)"
            )
            raise ValueError(
                f"{source}: expected {kind}, could not read it: {type(error).__name__}: {error}"[:2000]
            ) from error
        return cls.from_state_dict(state_dict, source=source).to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | os.PathLike, *, save_pt: bool = False) -> None:
        """Write `sprm_head.safetensors` (and `score_module.pt`, the published layout, when `save_pt`)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state_dict = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        save_file(state_dict, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})
        if save_pt:
            torch.save(state_dict, os.path.join(directory, PT_NAME))
