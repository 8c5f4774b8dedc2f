"""`RolloutSet`: k labelled rollouts per problem with the layer L-2 rows of their scored steps, and its file format
(`rollouts.safetensors` for the tensors + `rollouts.json` for the rest), so that the expensive generation runs once.

The row helpers (`csr`, `gather_features`, `chunks`) are shared by the collectors (here and on Ray), the metrics and
the training loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

ROLLOUTS_TENSORS = "rollouts.safetensors"
ROLLOUTS_JSON = "rollouts.json"
ROLLOUTS_FORMAT = "sprm-rollouts"
ROLLOUTS_VERSION = 1
LIST_FIELDS = ("prompts", "prompt_token_ids", "texts", "answers")  # the sidecar's lists, beside `info`


@dataclass(eq=False)
class RolloutSet:
    """R rollouts of P problems with S scored steps in all, H the backbone's hidden size.

    Tensors (CPU): features [S, H] layer L-2 rows (the model's dtype) at the scored positions, rollout after rollout;
    offsets [R+1] int64 CSR into features; step_positions [S] int64, each row's position in prompt + thinking;
    correct [R] bool (the verifier accepted the answer); finished [R] bool (the row closed its thinking); valid [R]
    bool (finished and the verifier gave a verdict: invalid rollouts are left out of the loss); problem_id [R] int64
    index into `prompts`; token_ids [T] int64 the thinking tokens of every rollout, token_offsets [R+1] int64 CSR.
    Lists: prompts [P] (text or chat messages), prompt_token_ids [P], texts [R] (the thinking, special tokens kept),
    answers [R] (None where no answer was decoded). info: how the set was made (model, k, sampling settings).
    """

    features: torch.Tensor
    offsets: torch.Tensor
    step_positions: torch.Tensor
    correct: torch.Tensor
    finished: torch.Tensor
    valid: torch.Tensor
    problem_id: torch.Tensor
    token_ids: torch.Tensor
    token_offsets: torch.Tensor
    prompts: list
    prompt_token_ids: list[list[int]]
    texts: list[str]
    answers: list[str | None]
    info: dict = field(default_factory=dict)

    TENSORS = ("features", "offsets", "step_positions", "correct", "finished", "valid", "problem_id", "token_ids",
               "token_offsets")  # fmt: skip

    def __post_init__(self):
        check_rollouts(self)

    @property
    def num_rollouts(self) -> int:
        return self.correct.numel()

    @property
    def num_problems(self) -> int:
        return len(self.prompts)

    @property
    def hidden_size(self) -> int:
        return self.features.shape[1]

    def rollouts_by_problem(self) -> dict[int, list[int]]:
        """Problem id -> indices of its rollouts, in their stored order (problems without rollouts are absent)."""
        by_problem = {}
        for rollout, problem in enumerate(self.problem_id.tolist()):
            by_problem.setdefault(problem, []).append(rollout)
        return by_problem

    def rollouts_of(self, problems: Sequence[int]) -> list[int]:
        """Indices of the rollouts of `problems`, problem by problem, in their stored order."""
        by_problem = self.rollouts_by_problem()
        return [rollout for p in problems for rollout in by_problem.get(p, [])]

    def save(self, directory: str | os.PathLike) -> None:
        """Write `rollouts.safetensors` (the tensors) and `rollouts.json` (everything else) into `directory`."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in self.TENSORS}
        save_file(tensors, os.path.join(directory, ROLLOUTS_TENSORS), metadata={"format": ROLLOUTS_FORMAT})
        sidecar = dict(
            format=ROLLOUTS_FORMAT, version=ROLLOUTS_VERSION, prompts=self.prompts,
            prompt_token_ids=self.prompt_token_ids, texts=self.texts, answers=self.answers, info=self.info,
        )  # fmt: skip
        with open(os.path.join(directory, ROLLOUTS_JSON), "w", encoding="utf-8") as file:
            json.dump(sidecar, file, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RolloutSet:
        from safetensors.torch import load_file

        with open(os.path.join(directory, ROLLOUTS_JSON), encoding="utf-8") as file:
            sidecar = json.load(file)
        if sidecar.get("format") != ROLLOUTS_FORMAT or sidecar.get("version") != ROLLOUTS_VERSION:
            raise ValueError(
                f"{directory}: expected {ROLLOUTS_FORMAT} version {ROLLOUTS_VERSION}, "
                f"got {sidecar.get('format')!r} version {sidecar.get('version')!r}"
            )
        tensors = load_file(os.path.join(directory, ROLLOUTS_TENSORS), device="cpu")
        lists = {key: sidecar[key] for key in (*LIST_FIELDS, "info")}
        return cls(**tensors, **lists)


def check_rollouts(rollouts: RolloutSet) -> None:
    """ValueError naming the first field whose shape, dtype or content disagrees with the others."""

    def fail(name, expected, got):
        raise ValueError(f"{name}: expected {expected}, got {got}")

    r = rollouts
    if not isinstance(r.features, torch.Tensor) or r.features.dim() != 2 or not r.features.is_floating_point():
        fail("features", "a float tensor [S, H]", getattr(r.features, "shape", type(r.features).__name__))
    num = r.correct.numel() if isinstance(r.correct, torch.Tensor) else -1
    for name, size, dtype in (("offsets", num + 1, torch.int64), ("token_offsets", num + 1, torch.int64),
                              ("step_positions", r.features.shape[0], torch.int64), ("correct", num, torch.bool),
                              ("finished", num, torch.bool), ("valid", num, torch.bool),
                              ("problem_id", num, torch.int64)):  # fmt: skip
        value = getattr(r, name)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.shape != (size,):
            fail(name, f"a {dtype} tensor of shape [{size}]", getattr(value, "shape", type(value).__name__))
    if r.token_ids.dim() != 1 or r.token_ids.dtype != torch.int64:
        fail("token_ids", "an int64 tensor [T]", tuple(r.token_ids.shape))
    for name, total in (("offsets", r.features.shape[0]), ("token_offsets", r.token_ids.numel())):
        value = getattr(r, name)
        if value[0] != 0 or value[-1] != total or (value[1:] < value[:-1]).any():
            fail(name, f"non-decreasing CSR offsets from 0 to {total}", f"{value[0]}..{value[-1]}")
    if num and (r.problem_id.min() < 0 or r.problem_id.max() >= len(r.prompts)):
        fail("problem_id", f"indices into the {len(r.prompts)} prompts", "out of range")
    if (r.valid & ~r.finished).any():
        fail("valid", "False wherever finished is False", "a valid unfinished rollout")
    if len(r.prompt_token_ids) != len(r.prompts):
        fail("prompt_token_ids", f"{len(r.prompts)} lists (one per prompt)", len(r.prompt_token_ids))
    for name in ("texts", "answers"):
        if len(getattr(r, name)) != num:
            fail(name, f"{num} entries (one per rollout)", len(getattr(r, name)))


# -- rows of a set ----------------------------------------------------------------------------------------------


def csr(counts: list[int]) -> torch.Tensor:
    """[len(counts)+1] int64 offsets: 0, then the running sums of `counts`."""
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


def gather_features(rollouts: RolloutSet, index: list[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [S_b, H] of the rollouts `index`, back to back, and their CSR offsets [B+1]) on `device`."""
    index_t = torch.tensor(index, dtype=torch.int64)
    starts, ends = rollouts.offsets[index_t], rollouts.offsets[index_t + 1]
    counts = ends - starts
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = torch.repeat_interleave(starts - offsets[:-1], counts) + torch.arange(int(offsets[-1]))
    return rollouts.features[rows].to(device=device, dtype=dtype), offsets.to(device)


def chunks(rollouts: RolloutSet, index: list[int], max_rows: int) -> Iterator[list[int]]:
    """`index` in consecutive pieces of at most `max_rows` feature rows (one rollout over the limit alone)."""
    counts = (rollouts.offsets[1:] - rollouts.offsets[:-1]).tolist()
    chunk, rows = [], 0
    for rollout in index:
        if chunk and rows + counts[rollout] > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(rollout)
        rows += counts[rollout]
    if chunk:
        yield chunk
