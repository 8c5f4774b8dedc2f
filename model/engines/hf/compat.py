"""Every transformers version fork of the HF engine, and the KV cache row operations best-of-k and search need, on
`DynamicCache` (verified on transformers 4.45.2 and 5.24). transformers' private attributes (`_name_or_path`,
`_attn_implementation`, a 4.x cache's `_seen_tokens`) are read here and nowhere else."""

from __future__ import annotations

import copy
import inspect

import torch

# -- the model and its config -------------------------------------------------------------------------------------


def dtype_keyword() -> str:
    """`from_pretrained`'s keyword for the weights' dtype: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def text_config(config):
    """The text model's config (multimodal configs nest it; `get_text_config` exists since 4.46)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def name_or_path(config) -> str:
    """The folder (or hub name) the model was loaded from, "" when unknown."""
    return getattr(config, "_name_or_path", "") or ""


def uses_flash_attention(model) -> bool:
    """Whether the model runs a flash-attention implementation (its varlen kernels skip masked blocks)."""
    return str(getattr(model.config, "_attn_implementation", None) or "").startswith("flash_attention")


def masks_packed_sequences() -> bool:
    """transformers >= 4.53 builds per-sequence causal masks from restarting position_ids for every attention."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def last_logits_kwargs(model) -> dict:
    """The forward keywords that ask for the last position's logits only (the name changed across versions); {}
    when the forward takes neither."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


# -- the KV cache -------------------------------------------------------------------------------------------------


def cache_argument(model) -> str:
    """The forward's keyword for the KV cache: `cache` where the model's forward takes it (transformers 5.24+, which
    warns that `past_key_values` is deprecated), else `past_key_values` (4.x and earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty `DynamicCache` for `model`. Passing one in also keeps 4.x from returning legacy tuples."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)  # 5.x: per-layer types (sliding-window layers)
    except TypeError:  # 4.x takes no config
        cache = DynamicCache()
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # 5.x sliding-window layers: keep what `crop` will need to roll back
    return cache


def keep_row(cache, row: int, length: int) -> None:
    """Keep only batch row `row` of `cache`, cropped to its first `length` tokens (in place).

    `batch_select_indices` exists since 4.38. `crop` took the length to keep up to 4.x and takes minus the number
    of tokens to remove in 5.x (a positive value raises); a negative value means "remove that many" in both.
    """
    cache.batch_select_indices(torch.tensor([row]))
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"length: expected at most the cached {cache.get_seq_length()} tokens, got {length}")
    if extra > 0:  # crop(0) would empty the whole cache in 4.x
        cache.crop(-extra)


def take_rows(cache, rows: list[int]):
    """A new cache holding batch rows `rows` of `cache`, which is left as it is (no full-cache copy).

    The copy is shallow down to the per-layer tensors, which `batch_select_indices` then replaces by the selected
    rows: `layers` of per-layer objects in 5.x, `key_cache` / `value_cache` lists in 4.x.
    """
    taken = copy.copy(cache)
    if hasattr(cache, "layers"):
        taken.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        taken.key_cache, taken.value_cache = list(cache.key_cache), list(cache.value_cache)
    taken.batch_select_indices(torch.tensor(rows))
    return taken


def compact_row(cache, row: int, keep: torch.Tensor):
    """A new one-row cache holding row `row` of `cache` at sequence positions `keep` only (in order): the KV of a
    row whose masked holes (search: padding while it waited) are dropped, so it continues like a row without them.
    Full-attention caches only (a sliding-window layer's positions are not its slots)."""
    taken = take_rows(cache, [row])
    layers = taken.layers if hasattr(taken, "layers") else None
    if layers is not None:
        for layer in layers:
            if getattr(layer, "is_sliding", False):
                raise ValueError("cache: search needs full-attention layers (this model has sliding-window layers)")
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
    else:
        taken.key_cache = [k[:, :, keep] for k in taken.key_cache]
        taken.value_cache = [v[:, :, keep] for v in taken.value_cache]
        if hasattr(taken, "_seen_tokens"):
            taken._seen_tokens = int(keep.numel())
    return taken
