"""`sprm eval`: best-of-k accuracy on held-out problems of the shipped task (`evaluation.best_of_k`), or with
`--search` the compute view (`evaluation.compute_view`), or with `--prune` best-of-k against pruning of the same
rows (`evaluation.pruning`); `--ray` spreads the sampling over Ray actors."""

from __future__ import annotations

import argparse
import json
import os

from sprm_kernels.model.cli.common import (
    THREADS_HELP,
    UsageError,
    check_head_folder,
    check_model_folder,
    positive_int,
    positive_int_list,
)
from sprm_kernels.model.core.params import SEARCH_METHODS
from sprm_kernels.model.evaluation.best_of_k import DEFAULT_KS

NAME = "eval"
PRUNE_VIEW_RULES = ("margin", "halving", "hybrid", "confidence")


def non_negative_float_list(text: str) -> list[float]:
    """`0.5,1,2` -> [0.5, 1.0, 2.0]: comma-separated finite floats >= 0, at least one."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated floats >= 0 such as 0.5,1,2, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="best-of-k accuracy on held-out problems (the shipped task)")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sprm_kernels.model.ray.cluster import add_ray_arguments

    parser.add_argument("--model", default=None, help="official-layout folder (default: the shipped model)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf (transformers) or vllm")
    parser.add_argument("--n", type=positive_int, default=500, help="held-out problems (default 500)")
    parser.add_argument(
        "--ks", type=positive_int_list, default=list(DEFAULT_KS), help="comma-separated k values (default 1,2,4,...,32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bce-head", default=None, help="folder of a BCE head (default: MODEL/bce_head if present)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", default=None, help="write accuracy against log2 k to this PNG")
    parser.add_argument(
        "--search", default=None, metavar="beam,dvts",
        help="the compute view: best-of-k and voting against these step-level searches, accuracy against decoded "
        "thinking tokens, on --engine (--ks up to 16 is plenty; --plot draws it)",
    )  # fmt: skip
    parser.add_argument(
        "--widths", type=positive_int_list, default=[1, 2, 4], help="--search: beam widths / DVTS subtrees (1,2,4)"
    )
    parser.add_argument("--expansions", type=positive_int, default=2, help="--search: children per beam (default 2)")
    parser.add_argument(
        "--prune", default=None, metavar="margin,halving",
        help="best-of-k (k: the largest of --ks) against these pruning rules on the same rows, accuracy against "
        "thinking tokens (vLLM engine; docs/pruning.md)",
    )  # fmt: skip
    parser.add_argument("--prune-margins", type=non_negative_float_list, default=[0.5, 1.0, 2.0],
                        help="--prune margin: the margins to run (default 0.5,1,2)")  # fmt: skip
    parser.add_argument("--prune-keeps", type=positive_int_list, default=[1, 2, 4],
                        help="--prune halving: the rows each run keeps at least (default 1,2,4)")  # fmt: skip
    parser.add_argument(
        "--prune-every",
        type=positive_int,
        default=1,
        help="--prune: scored steps before a row can be stopped; halving: steps per rung (default 1)",
    )
    parser.add_argument("--confidence-warmup", type=positive_int, default=2,
                        help="--prune confidence: warm-up rows per problem (default 2)")  # fmt: skip
    parser.add_argument("--confidence-window", type=positive_int, default=16,
                        help="--prune confidence: tokens per confidence window (default 16)")  # fmt: skip
    parser.add_argument("--difficulty", type=int, default=None, help="terms per problem (default: the model's)")
    add_ray_arguments(parser, out_help="with --ray: stream one row per problem to this .jsonl or .parquet file")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the run (which takes minutes): folders, the plot's folder."""
    if args.model is not None:
        check_model_folder(args.model)
    if args.bce_head is not None:
        check_head_folder(args.bce_head, "--bce-head")
    if args.plot is not None:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise UsageError(f"--plot {args.plot}: no such folder {folder}")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--plot {args.plot}: folder {folder} is not writable")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(f"--plot {args.plot}: needs matplotlib (pip install matplotlib)") from None
    if args.prune is not None:
        rules = tuple(m.strip() for m in args.prune.split(","))
        if not rules or any(m not in PRUNE_VIEW_RULES for m in rules):
            raise UsageError(f"--prune: expected a comma-separated list of {', '.join(PRUNE_VIEW_RULES)}, got "
                             f"{args.prune!r}")  # fmt: skip
        if args.engine != "vllm":
            raise UsageError(f"--prune: the {args.engine} engine does not prune (use --engine vllm)")
        if args.search is not None or args.ray is not None:
            raise UsageError("--prune: not with --search or --ray")
    if args.search is not None:
        methods = tuple(m.strip() for m in args.search.split(","))
        if not methods or any(m not in SEARCH_METHODS for m in methods):
            raise UsageError(f"--search: expected beam, dvts or beam,dvts, got {args.search!r}")
        if args.ray is not None:
            raise UsageError("--search: not with --ray (the compute view runs on one engine here)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    from sprm_kernels.model.ray.cluster import workers_from_args
    from sprm_kernels.model.ray.output import check_out_path

    check_arguments(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only (checked above): never a download
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar: stderr is for the progress below
    if args.search:
        return run_compute_view(args)
    if args.prune:
        return run_pruning_view(args)
    parser = parser or argparse.ArgumentParser(prog="sprm eval")
    workers = workers_from_args(parser, args)
    if args.out is not None:
        if args.ray is None:
            parser.error("--out: only with --ray")
        try:
            check_out_path(args.out)
        except ValueError as error:
            parser.error(f"--{error}")
    from sprm_kernels.model.evaluation.best_of_k import evaluate, format_table, plot

    options = dict(n=args.n, ks=args.ks, seed=args.seed, bce_head_dir=args.bce_head, progress=not args.quiet,
                   threads=args.threads, engine=args.engine)  # fmt: skip
    if args.ray is not None:
        from sprm_kernels.model.ray.eval_job import evaluate_with_workers

        result = evaluate_with_workers(args.model, address=args.ray, workers=workers, out=args.out, **options)
    else:
        result = evaluate(args.model, **options)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def run_compute_view(args: argparse.Namespace) -> int:
    from sprm_kernels.model.evaluation.compute_view import compute_view, format_table, plot

    methods = tuple(m.strip() for m in args.search.split(","))
    result = compute_view(
        args.model, engine=args.engine, n=args.n, ks=args.ks, widths=args.widths, expansions=args.expansions,
        search_methods=methods, seed=args.seed, difficulty=args.difficulty, progress=not args.quiet,
        threads=args.threads,
    )  # fmt: skip
    if args.plot:
        plot([result], args.plot)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def run_pruning_view(args: argparse.Namespace) -> int:
    from sprm_kernels.model.evaluation.pruning import configurations, format_table, pruning_view

    rules = tuple(m.strip() for m in args.prune.split(","))
    configs = configurations(rules, margins=args.prune_margins, keeps=args.prune_keeps, every=args.prune_every,
                             warmup=args.confidence_warmup, window=args.confidence_window)  # fmt: skip
    result = pruning_view(
        args.model, engine=args.engine, n=args.n, k=max(args.ks), configs=configs, seed=args.seed,
        difficulty=args.difficulty, progress=not args.quiet, threads=args.threads,
    )  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
