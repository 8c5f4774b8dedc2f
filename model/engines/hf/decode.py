"""Best-of-k reflective generation on the HF engine (docs/method.md §1, §5): prefill the prompt once, decode k
thinking rows as one batch (`thinking.decode_thinking`), choose (§4), then continue the answer from the chosen
row's own KV cache."""

from __future__ import annotations

import time
from functools import partial

import torch

from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.progress import progress_bar
from sprm_kernels.model.core.sampling import sample_tokens
from sprm_kernels.model.core.selection import choose_best
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats
from sprm_kernels.model.engines.hf.compat import keep_row
from sprm_kernels.model.engines.hf.thinking import decode_thinking, finalize_candidates


class Clock:
    """Wall time per phase; waits for the device so that queued kernels count in their own phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def prefill(rm, prompt_ids: list[int], captured: dict, *, last_logits_only: bool):
    """(cache, model output, features [T, H]) of one forward over the prompt; `captured` is the dict of an open
    `rm.capture_penultimate()`. `last_logits_only`: the output's logits are [1, 1, V] (the last position's)."""
    prompt = torch.tensor([prompt_ids], device=rm.device)
    cache = rm.new_cache()
    out = rm.forward_cached(prompt, cache, last_logits_only=last_logits_only)
    return cache, out, captured["features"][0]


def best_of_k(rm, prompt_ids: list[int], params: GenerationParams, backend, progress: bool) -> GenerationResult:
    """`ReflectiveModel.generate` on tokenized `prompt_ids`, options checked, `backend` resolved."""
    k, top_p = params.num_candidates, params.top_p
    generator = None if params.seed is None else torch.Generator(device=rm.device).manual_seed(params.seed)
    seconds = {}

    clock = Clock(rm.device)
    with rm.capture_penultimate() as captured:
        cache, out, features = prefill(rm, prompt_ids, captured, last_logits_only=True)
        prompt_step_probs = rm.prompt_step_probs(prompt_ids, features, backend)
        # Rows of the prompt positions that a later marker could bring into the span (see finalize_candidates).
        prompt_features = {t: features[t].clone() for t in prompt_step_probs} if params.return_features else None
        cache.batch_repeat_interleave(k)  # the k rows share the prompt: one prefill, k copies of its KV
        seconds["prefill"] = clock.lap()

        sample = partial(sample_tokens, temperature=params.temperature, top_p=top_p, generator=generator)
        think = decode_thinking(
            rm, cache, out.logits[:, -1].expand(k, -1), features[-1].expand(k, -1), prompt_ids, k,
            params.max_think_tokens, sample, captured, backend, progress, prompt_features,
        )  # fmt: skip
        seconds["think"] = clock.lap()

    candidates = finalize_candidates(rm, prompt_ids, think, prompt_step_probs, backend)
    best = choose_best([c.score for c in candidates], [c.finished for c in candidates])
    chosen = candidates[best]
    other_caches = {j: think.copy_cache(j) for j in range(k) if j != best} if params.answer_all else {}
    cache, row = think.take_cache(best)
    seconds["select"] = clock.lap()

    sample_answer = partial(
        sample_tokens, temperature=params.answer_sampling_temperature, top_p=top_p, generator=generator
    )
    max_answer = params.max_answer_tokens
    answer_ids, answer_fed = answer_candidate(rm, cache, row, prompt_ids, chosen, max_answer, sample_answer, progress)
    for j, (cache, row) in other_caches.items():  # after the chosen answer, which thus keeps its samples
        ids, fed = answer_candidate(rm, cache, row, prompt_ids, candidates[j], max_answer, sample_answer)
        candidates[j].answer_token_ids = ids
        candidates[j].answer = rm.tokenizer.decode(ids, skip_special_tokens=True)
        answer_fed += fed
    if params.answer_all:
        chosen.answer_token_ids = answer_ids
        chosen.answer = rm.tokenizer.decode(answer_ids, skip_special_tokens=True)
    seconds["answer"] = clock.lap()
    stats = GenerationStats(
        prefill_tokens=len(prompt_ids),
        think_decode_tokens=think.decode_tokens,
        think_generated_tokens=sum(len(c.token_ids) for c in candidates),
        answer_decode_tokens=answer_fed,
        seconds=seconds,
    )
    return GenerationResult(
        candidates=candidates,
        best=best,
        answer=rm.tokenizer.decode(answer_ids, skip_special_tokens=True),
        answer_token_ids=answer_ids,
        prompt_token_ids=prompt_ids,
        stats=stats,
    )


def answer_candidate(
    rm, cache, row: int, prompt_ids: list[int], candidate: Candidate, max_answer_tokens: int, sample, progress=False
) -> tuple[list[int], int]:
    """(answer ids, tokens fed) after `candidate`'s thinking, from row `row` of `cache`, which holds every token of
    the row but its last (not fed when the row stopped); `</think>` is fed first to a row that never wrote it. The
    cache is cut down to that row, in place. `sample` maps logits [1, V] to a token [1]."""
    keep_row(cache, row, len(prompt_ids) + len(candidate.token_ids) - 1)
    pending = candidate.token_ids[-1:] + ([] if candidate.finished else [rm.think_end_id])
    return decode_answer(rm, cache, pending, max_answer_tokens, sample, progress)


def decode_answer(rm, cache, pending: list[int], max_answer_tokens: int, sample, progress) -> tuple[list[int], int]:
    """Feed the chosen row's pending tokens, then decode one row until EOS or the budget."""
    answer, fed = [], 0
    input_ids = torch.tensor([pending], device=rm.device)
    bar = progress_bar(max_answer_tokens, "answer", progress, leave=False)
    for _ in range(max_answer_tokens):
        out = rm.forward_cached(input_ids, cache)
        fed += input_ids.shape[1]
        token = sample(out.logits[:, -1])
        answer.append(int(token))
        if bar is not None:
            bar.update(1)
        if answer[-1] in rm.eos_token_ids:
            break
        input_ids = token[:, None]
    if bar is not None:
        bar.close()
    return answer, fed
