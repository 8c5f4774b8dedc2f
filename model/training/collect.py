"""Rollouts for training a head (docs/method.md §6): k thinking rollouts per prompt from an engine's `generate`,
with the layer L-2 rows at the scored positions *as the decoding produced them* (`return_features=True`: no second
forward), every candidate's answer decoded from its own KV cache (`answer_all=True`), labelled by a verifier."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch

from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.progress import track
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.training.rollouts import RolloutSet, csr
from sprm_kernels.model.training.verifiers import LABEL_SOURCES, Verifier, check_verdict

# The GenerationParams fields a collection passes on (k, the seed per prompt and the features are its own).
SAMPLING_OPTIONS = ("max_think_tokens", "max_answer_tokens", "temperature", "top_p", "answer_temperature")


def collect(
    model: Engine,
    prompts: Sequence,
    verifier: Verifier,
    k: int,
    *,
    label_from: str = "answer",
    seed: int = 0,
    backend: str | None = None,
    progress: bool = True,
    **sampling,
) -> RolloutSet:
    """k rollouts per prompt from `model.generate`, with the features its decoding saw, labelled by `verifier`.

    `verifier(prompt, answer)` returns True (correct), False (wrong) or None (format failure: invalid). It gets the
    candidate's answer (label_from="answer", decoded after its own `</think>` from its own KV cache) or its thinking
    text (label_from="thinking": no answer is decoded, for tasks whose thinking states the result). A row that never
    closes its thinking is invalid and not shown to the verifier. Prompt i is sampled with seed `seed + i`, so a
    prompt's rollouts do not depend on the others. `sampling`: the sampling fields of `GenerationParams`
    (SAMPLING_OPTIONS), with its defaults.
    """
    check_collect_args(model, prompts, verifier, k, label_from, seed)
    unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
    if unknown:
        raise TypeError(f"collect: unknown option {unknown[0]!r} (expected {', '.join(SAMPLING_OPTIONS)})")
    decode_answers = label_from == "answer"
    defaults = {f.name: f.default for f in fields(GenerationParams)}
    settings = {"k": k, **{name: sampling.get(name, defaults[name]) for name in SAMPLING_OPTIONS}}
    if not decode_answers:
        settings["max_answer_tokens"] = 0  # the label reads the thinking: no answer is decoded
    backend_option = {} if backend is None else {"backend": backend}  # an engine-specific option
    parts = dict(features=[], positions=[], counts=[], correct=[], finished=[], valid=[], problem=[], tokens=[])
    prompt_token_ids, texts, answers = [], [], []
    for index, prompt in enumerate(track(prompts, "collect", progress)):
        result = model.generate(
            prompt, **settings, **backend_option, seed=seed + index, return_features=True, answer_all=decode_answers
        )
        prompt_token_ids.append(result.prompt_token_ids)
        for candidate in result.candidates:
            answer = candidate.answer if decode_answers else None
            verdict = None  # a row that never closed its thinking is a format failure
            if candidate.finished:
                verdict = check_verdict(verifier(prompt, answer if decode_answers else candidate.text))
            parts["features"].append(candidate.step_features.cpu())
            parts["positions"] += candidate.score_positions
            parts["counts"].append(len(candidate.score_positions))
            parts["correct"].append(verdict is True)
            parts["finished"].append(candidate.finished)
            parts["valid"].append(verdict is not None)
            parts["problem"].append(index)
            parts["tokens"].append(candidate.token_ids)
            texts.append(candidate.text)
            answers.append(answer)
    info = dict(settings, seed=seed, label_from=label_from, model=model.info().path)
    return RolloutSet(
        features=torch.cat(parts["features"]),
        offsets=csr(parts["counts"]),
        step_positions=torch.tensor(parts["positions"], dtype=torch.int64),
        correct=torch.tensor(parts["correct"], dtype=torch.bool),
        finished=torch.tensor(parts["finished"], dtype=torch.bool),
        valid=torch.tensor(parts["valid"], dtype=torch.bool),
        problem_id=torch.tensor(parts["problem"], dtype=torch.int64),
        token_ids=torch.tensor([t for tokens in parts["tokens"] for t in tokens], dtype=torch.int64),
        token_offsets=csr([len(tokens) for tokens in parts["tokens"]]),
        prompts=list(prompts),
        prompt_token_ids=prompt_token_ids,
        texts=texts,
        answers=answers,
        info=info,
    )


def check_collect_args(model, prompts, verifier, k, label_from, seed) -> None:
    """ValueError naming the first bad argument of `collect`, before any generation."""
    if not isinstance(model, Engine):
        raise ValueError(f"model: expected an Engine (e.g. a ReflectiveModel), got {type(model).__name__}")
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of prompts, got {prompts!r:.80}")
    if not callable(verifier):
        raise ValueError(f"verifier: expected a callable (prompt, answer) -> bool, got {type(verifier).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if label_from not in LABEL_SOURCES:
        raise ValueError(f"label_from: expected one of {LABEL_SOURCES}, got {label_from!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
