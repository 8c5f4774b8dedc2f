"""Temperature / nucleus sampling of one token per row, reproducible through an explicit generator."""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy (argmax, lowest id on ties); top_p keeps the
    smallest set of most likely tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
