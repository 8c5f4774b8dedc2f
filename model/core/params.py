"""`GenerationParams`: the options of a best-of-k generation, checked once, for every engine.

Engines, the server, the CLI, the evaluation and the collectors build one of these (or pass the same keyword
arguments to `generate`, which builds it), so that a bad value gets the same error everywhere, before any work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from sprm_kernels.model.core.selection import PRUNE_RULES, check_int, resolve_k


def option(default, help: str, **extra):
    """A params field with the help text that the CLI options and the server's request schema are built from."""
    return field(default=default, metadata={"help": help, **extra})


def check_fields(params) -> None:
    """Every field of a params object against its type and metadata (choices, minimum, exclusive_minimum,
    maximum): one rule for all, a ValueError naming the field. Bools are never ints nor floats here."""
    for field_ in fields(params):
        name, value, meta, kind = field_.name, getattr(params, field_.name), field_.metadata, str(field_.type)
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected a bool, got {value!r}")
        elif "choices" in meta:
            if value not in meta["choices"]:
                raise ValueError(f"{name}: expected one of {list(meta['choices'])}, got {value!r}")
        elif kind.startswith("int"):
            if "minimum" in meta:
                check_int(name, value, minimum=meta["minimum"])
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an int{' or None' if 'None' in kind else ''}, got {value!r}")
        elif kind.startswith("float"):
            check_float(name, value, meta)


def check_float(name: str, value, meta) -> None:
    low, low_open, high = meta.get("minimum"), meta.get("exclusive_minimum"), meta.get("maximum")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (
        not number
        or not math.isfinite(value)
        or (low is not None and value < low)
        or (low_open is not None and value <= low_open)
        or (high is not None and value > high)
    ):
        if low_open is not None and high is not None:
            wanted = f"in ({low_open}, {high}]"
        elif low is not None and high is not None:
            wanted = f"in [{low}, {high}]"
        else:
            wanted = " ".join(part for part in (f">= {low}" if low is not None else "", "(0 is greedy)"
                                                if name.endswith("temperature") else "") if part)  # fmt: skip
        raise ValueError(f"{name}: expected a finite float {wanted}, got {value!r}".replace("  ", " "))


@dataclass(frozen=True)
class GenerationParams:
    """The options of one best-of-k generation. A field left out of a call takes the model folder's default
    (`generation_defaults`): the folder's recommended temperature / top_p, budgets fitted to the context."""

    mode: str = option("medium", "k = 2 / 8 / 32 candidates", choices=("low", "medium", "high"))
    k: int | None = option(None, "number of candidates (overrides the mode)", minimum=1)
    max_think_tokens: int = option(
        4096, "thinking budget per candidate (default 4096, or what fits the context)", minimum=1, model_default=True
    )
    max_answer_tokens: int = option(
        1024, "answer budget (default 1024, or 1/8 of the context)", minimum=0, model_default=True
    )
    temperature: float = option(0.6, "sampling temperature, 0 is greedy (default: the model's, else 0.6)",
                                minimum=0, model_default=True)  # fmt: skip
    top_p: float = option(
        0.95, "nucleus sampling (default: the model's, else 0.95)", exclusive_minimum=0, maximum=1, model_default=True
    )
    answer_temperature: float | None = option(None, "temperature of the answer (default: --temperature)", minimum=0)
    seed: int | None = option(None, "sampling seed (default: none, so two runs differ: not reproducible)")
    return_features: bool = option(False, "keep the layer L-2 rows of every scored step (for training the head)")
    answer_all: bool = option(False, "also answer after every losing candidate")
    prune: str = option(
        "none", "stop thinking rows that fall behind (vLLM engine; docs/pruning.md): margin (below the prompt's best "
        "row by --prune-margin), halving (keep the better half every --prune-every steps), hybrid (both), or "
        "confidence (DeepConf online: token confidence below a threshold from warm-up rows)",
        choices=PRUNE_RULES,
    )  # fmt: skip
    prune_margin: float = option(1.0, "margin: the gap in mean log p (nats) below the best row that stops a row",
                                 minimum=0)  # fmt: skip
    prune_every: int = option(
        1, "scored steps a row writes before it can be stopped; halving: steps per rung", minimum=1
    )
    prune_keep: int = option(2, "pruning never leaves fewer rows than this per prompt", minimum=1)
    prune_poll: int = option(12, "pruning: engine steps (tokens per row) between two reads of the rows' scores",
                             minimum=1)  # fmt: skip
    confidence_window: int = option(16, "confidence: tokens per sliding window of token confidence", minimum=1)
    return_confidence: bool = option(
        False, "give each candidate its DeepConf confidence, the lowest window mean (vLLM engine; for selection)"
    )
    confidence_warmup: int = option(
        2, "confidence: rows per prompt that run first, to the end, and set the threshold", minimum=1
    )
    confidence_percentile: float = option(
        10.0, "confidence: the threshold is this percentile of the warm-up rows' lowest window confidence "
        "(10: DeepConf-high, 90: DeepConf-low)", minimum=0, maximum=100,
    )  # fmt: skip

    def __post_init__(self):
        check_fields(self)
        resolve_k(self.mode, self.k)

    @property
    def num_candidates(self) -> int:
        return resolve_k(self.mode, self.k)

    @property
    def answer_sampling_temperature(self) -> float:
        return self.temperature if self.answer_temperature is None else self.answer_temperature

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def params_from(cls, caller: str, options: dict):
    """`cls(**options)` with an unknown keyword refused by name (a TypeError listing the accepted ones): how an
    engine's `generate(prompt, **options)` takes the fields of `GenerationParams` without spelling them again."""
    unknown = sorted(set(options) - set(cls.names()))
    if unknown:
        raise TypeError(f"{caller}: unknown option {unknown[0]!r} (expected the fields of {cls.__name__}: "
                        f"{', '.join(cls.names())})")  # fmt: skip
    return cls(**options)


SEARCH_METHODS = ("beam", "dvts")
AGGREGATES = ("mean", "last", "min")


@dataclass(frozen=True)
class SearchParams:
    """Step-level search guided by the streaming step scores (docs/search.md)."""

    method: str = option("beam", "beam search or DVTS (diverse verifier tree search)", choices=SEARCH_METHODS)
    beam_width: int = option(4, "beam: survivors per round; DVTS: subtrees", minimum=1)
    expansions: int = option(2, "children per survivor (the batch holds beam_width x expansions rows)", minimum=1)
    aggregate: str = option("mean", "how a beam's step scores rank it", choices=AGGREGATES)

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# The sampling fields of GenerationParams a search takes (its batch is beam_width x expansions rows, not k).
SEARCH_SAMPLING_OPTIONS = (
    "max_think_tokens", "max_answer_tokens", "temperature", "top_p", "answer_temperature", "seed",
)  # fmt: skip


def search_options(options: dict) -> tuple[SearchParams, GenerationParams]:
    """`search`'s keyword options split and checked: (its shape, its sampling as GenerationParams with k = the
    batch, beam_width x expansions). TypeError names an option that is neither (e.g. `k`)."""
    shape = params_from(SearchParams, "search", {n: v for n, v in options.items() if n in SearchParams.names()})
    sampling = {n: v for n, v in options.items() if n not in SearchParams.names()}
    unknown = sorted(set(sampling) - set(SEARCH_SAMPLING_OPTIONS))
    if unknown:
        raise TypeError(f"search: unknown option {unknown[0]!r} (expected the fields of SearchParams and "
                        f"{', '.join(SEARCH_SAMPLING_OPTIONS)})")  # fmt: skip
    return shape, GenerationParams(k=shape.beam_width * shape.expansions, **sampling)


# -- defaults read from a model folder -----------------------------------------------------------------------------

TASK_FILE = "sprm_task.json"  # a model folder's recommended sampling settings (the shipped model has one)


def folder_task(folder: str | None) -> dict:
    """A model folder's `sprm_task.json` (what it recommends: sampling settings, the task's difficulty), or {}
    when it has none or it is not a JSON object."""
    if folder is None:
        return {}
    try:
        with open(os.path.join(folder, TASK_FILE)) as f:
            task = json.load(f)
    except (OSError, ValueError):
        return {}
    return task if isinstance(task, dict) else {}


def folder_sampling(folder: str | None) -> dict[str, float]:
    """The sampling settings ("temperature", "top_p") a model folder recommends in its `sprm_task.json` (the
    shipped model was trained and evaluated at temperature 1, top_p 1); {} when it recommends none."""
    found = {}
    for name, value in folder_task(folder).items():
        if name in ("temperature", "top_p") and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def fitted_budgets(
    context_length: int | None, prompt_tokens: int, max_think_tokens: int | None, max_answer_tokens: int | None
) -> tuple[int, int]:
    """Budgets not given default to 4096 thinking / 1024 answer tokens, shrunk to fit a small model's context
    (the answer to 1/8 of it, the thinking to what the prompt and the answer leave)."""
    if max_answer_tokens is None:
        max_answer_tokens = 1024 if context_length is None else min(1024, max(1, context_length // 8))
    if max_think_tokens is None:
        room = None if context_length is None else context_length - prompt_tokens - max_answer_tokens
        max_think_tokens = 4096 if room is None else max(1, min(4096, room))
    return max_think_tokens, max_answer_tokens


def generation_defaults(
    folder: str | None, context_length: int | None, prompt_tokens: int, given: Mapping[str, object]
) -> dict[str, object]:
    """`given` (GenerationParams keyword arguments; None means "not given") completed with the model's defaults:
    temperature and top_p from the folder (`folder_sampling`), else the class defaults; budgets fitted to the
    context (`fitted_budgets`). The one place the CLI, the server and the evaluation take defaults from."""
    options = {name: value for name, value in given.items() if value is not None}
    for name, value in folder_sampling(folder).items():
        options.setdefault(name, value)
    options["max_think_tokens"], options["max_answer_tokens"] = fitted_budgets(
        context_length, prompt_tokens, options.get("max_think_tokens"), options.get("max_answer_tokens")
    )
    return options
