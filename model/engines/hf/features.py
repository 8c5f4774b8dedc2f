"""The head's features: the output of decoder layer L-2 (HF `hidden_states[-2]`), captured by a forward hook so
that no forward ever materialises all hidden states. Scoring stops the forward right after that layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class FeaturesReady(Exception):
    """Raised by the hook to end a scoring forward once layer L-2 has run."""


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's list of `num_layers` decoder layers (at least 2: the head reads layer L-2)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):  # other layouts (e.g. GPT-2's transformer.h): the layer list
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers), None)
    if layers is None:
        raise ValueError(f"model: expected a list of {num_layers} decoder layers, found none")
    if len(layers) < 2:
        raise ValueError(f"model: expected at least 2 decoder layers (the head reads layer L-2), got {len(layers)}")
    return layers


@contextmanager
def capture_layer_output(layer: nn.Module, *, stop: bool) -> Iterator[dict]:
    """Yields a dict whose "features" is `layer`'s output [B, T, H] (model dtype) of the latest forward. `stop`:
    raise `FeaturesReady` right after the layer, ending the forward there."""
    captured = {}

    def hook(module, args, output):
        captured["features"] = output[0] if isinstance(output, tuple) else output  # tuple in transformers 4.x
        if stop:
            raise FeaturesReady

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def run_until_layer(
    model: nn.Module, layer: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T, H] output of `layer` for `input_ids` [B, T] long (`position_ids` [B, T] or None); the forward stops
    right after it and keeps no cache."""
    with capture_layer_output(layer, stop=True) as captured:
        try:
            model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        except FeaturesReady:
            pass
    return captured["features"]
