"""`GenerationParams`: the options of a best-of-k generation, checked once, for every engine.

Engines, the server, the CLI, the evaluation and the collectors build one of these (or pass the same keyword
arguments to `generate`, which builds it), so that a bad value gets the same error everywhere, before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from sprm_kernels.model.core.selection import check_int, resolve_k


@dataclass(frozen=True)
class GenerationParams:
    mode: str = "medium"  # low / medium / high = k 2 / 8 / 32
    k: int | None = None  # overrides the mode
    max_think_tokens: int = 4096
    max_answer_tokens: int = 1024
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.95
    answer_temperature: float | None = None  # None: `temperature`
    seed: int | None = None  # None: not reproducible
    return_features: bool = False  # keep the layer L-2 rows of every scored step (for training the head)
    answer_all: bool = False  # also answer after every losing candidate

    def __post_init__(self):
        resolve_k(self.mode, self.k)
        check_int("max_think_tokens", self.max_think_tokens, minimum=1)
        check_int("max_answer_tokens", self.max_answer_tokens, minimum=0)
        for name in ("temperature", "answer_temperature"):
            value = getattr(self, name)
            if name == "answer_temperature" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: expected a finite float >= 0 (0 is greedy), got {value!r}")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed: expected an int or None, got {self.seed!r}")
        for name in ("return_features", "answer_all"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    @property
    def num_candidates(self) -> int:
        return resolve_k(self.mode, self.k)

    @property
    def answer_sampling_temperature(self) -> float:
        return self.temperature if self.answer_temperature is None else self.answer_temperature

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


SEARCH_METHODS = ("beam", "dvts")
AGGREGATES = ("mean", "last", "min")


@dataclass(frozen=True)
class SearchParams:
    method: str = "beam"
    beam_width: int = 4  # beam: survivors per round; DVTS: subtrees
    expansions: int = 2  # children per survivor (the batch holds beam_width * expansions rows)
    aggregate: str = "mean"

    def __post_init__(self):
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"method: expected one of {list(SEARCH_METHODS)}, got {self.method!r}")
        check_int("beam_width", self.beam_width, minimum=1)
        check_int("expansions", self.expansions, minimum=1)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate: expected one of {list(AGGREGATES)}, got {self.aggregate!r}")
