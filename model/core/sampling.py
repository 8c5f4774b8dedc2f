"""Temperature / nucleus sampling of one token per row, reproducible through an explicit generator."""

from __future__ import annotations

import torch

# The smallest normal float32: a temperature below it (1e-300 as a Python float is 0 in float32) divides by it
# instead, which changes nothing but exact ties, and keeps every tiny temperature finite and greedy in effect.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def sample_tokens(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy (argmax, lowest id on ties); any temperature > 0
    samples softmax(logits / temperature), computed as exp((logits - max) / temperature) so that a tiny temperature
    (1e-300) puts all the mass on the most likely token(s) instead of overflowing. top_p keeps the smallest set of
    most likely tokens whose mass reaches top_p; the most likely token always stays (top_p 1e-300 is greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / max(float(temperature), MIN_TEMPERATURE)
    probs = torch.softmax(scaled, dim=-1)  # the max is 0, so no overflow and at least one exp(0) = 1
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= top_p
        drop[:, 0] = False  # the top token always stays, even when top_p rounds to 0 in float32
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
