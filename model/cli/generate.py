"""`sprm generate "QUESTION"`: the best-of-k reflective answer to one question (or, with --search, a step-level
beam search / DVTS), printed as a table or as one JSON object. Options are the fields of `GenerationParams` and
`SearchParams`; those not given take the model folder's defaults (`engines.common.generation_options`), exactly as
`POST /generate` does."""

from __future__ import annotations

import argparse
import json

from sprm_kernels.model.cli.common import UsageError, add_model_options, add_params_options, load_model, params_given
from sprm_kernels.model.core.params import GenerationParams, SearchParams
from sprm_kernels.model.core.types import generation_json

NAME = "generate"
GENERATION_OPTIONS = ["seed", "max_think_tokens", "max_answer_tokens", "temperature", "top_p", "answer_temperature"]
PRUNE_OPTIONS = [
    "prune",
    "prune_margin",
    "prune_every",
    "prune_keep",
    "prune_poll",
    "confidence_window",
    "confidence_warmup",
    "confidence_percentile",
]
SEARCH_OPTIONS = ["beam_width", "expansions", "aggregate"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="best-of-k reflective answer to one question")
    parser.add_argument("question")
    add_model_options(parser)
    size = parser.add_mutually_exclusive_group()
    add_params_options(size, GenerationParams, ["mode", "k"])
    add_params_options(parser, GenerationParams, GENERATION_OPTIONS)
    add_params_options(parser, GenerationParams, PRUNE_OPTIONS)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # --search METHOD turns best-of-k into a step-level search; its options below only apply with it.
    add_params_options(parser, SearchParams, ["method"], flags={"method": "--search"})
    add_params_options(parser, SearchParams, SEARCH_OPTIONS, use_defaults=True)
    return parser


def run(args) -> int:
    from sprm_kernels.model.engines.base import supports_search
    from sprm_kernels.model.engines.common import generation_plan

    if not args.question.strip():
        raise UsageError("the question is empty")
    pruning = params_given(args, GenerationParams, PRUNE_OPTIONS)
    pruning = {name: value for name, value in pruning.items() if value is not None}
    if pruning and args.method:
        raise UsageError(f"--{next(iter(pruning)).replace('_', '-')}: pruning is for best-of-k, not --search")
    if pruning.get("prune", "none") != "none" and args.engine != "vllm":
        raise UsageError(f"--prune: the {args.engine} engine does not prune (use --engine vllm)")
    if args.method and (args.mode or args.k):
        raise UsageError("--search: the batch is --beam-width x --expansions rows; --mode and --k do not apply")
    model = load_model(args.model, args.device, args.threads, args.engine)
    options, overflow = generation_plan(
        model, args.question, **params_given(args, GenerationParams, GENERATION_OPTIONS)
    )
    if overflow:
        raise UsageError(f"--max-think-tokens, --max-answer-tokens: the {overflow}")
    if args.method and not supports_search(model):
        raise UsageError(f"--search: the {args.engine} engine has no step-level search")
    try:
        if args.method:
            search = params_given(args, SearchParams)
            result = model.search(args.question, **search, **options)
        else:
            result = model.generate(args.question, mode=args.mode or "medium", k=args.k, **options, **pruning)
    except ValueError as error:  # e.g. a temperature or top_p out of range
        raise UsageError(str(error)) from None
    print(json.dumps(generation_json(result)) if args.json else describe_generation(result))
    return 0


def describe_generation(result) -> str:
    lines = [f"{len(result.candidates)} candidates, prompt {len(result.prompt_token_ids)} tokens"]
    lines.append("     #    score  steps  tokens  finished  thinking")
    for index, candidate in enumerate(result.candidates):
        mark = "*" if index == result.best else " "
        lines.append(
            f"  {mark} {index:2d}  {candidate.score:7.4f}  {len(candidate.score_positions):5d}  "
            f"{len(candidate.token_ids):6d}  {finished_mark(candidate):8s}  {summary(candidate.text)}"
        )
    stats = result.stats
    timings = ", ".join(f"{phase} {1000 * seconds:.1f} ms" for phase, seconds in stats.seconds.items())
    searched = f", {stats.think_generated_tokens} thinking tokens sampled in {stats.rounds} search rounds"
    pruned = stats.pruned_rows
    if pruned:
        searched = (f"; {pruned} rows pruned, about {stats.pruned_think_tokens} thinking tokens saved "
                    f"({stats.think_generated_tokens} written)")  # fmt: skip
    lines += [
        f"chosen: candidate {result.best} (score {result.candidates[result.best].score:.4f})",
        f"answer: {result.answer!r}",
        f"timings: {timings}; {stats.total_tokens} tokens through the model"
        + (searched if stats.rounds or pruned else ""),
    ]
    return "\n".join(lines)


def finished_mark(candidate) -> str:
    if candidate.pruned:  # stopped by --prune: a candidate that lost
        return "pruned"
    return "yes" if candidate.finished else "no"


def summary(text: str, width: int = 60) -> str:
    """The start and the end of a thinking, escaped onto one line."""
    if len(text) <= width:
        return repr(text)
    half = width // 2
    return f"{text[:half]!r} ... {text[-half:]!r}"
