"""`sprm train collect|fit`: train an SPRM head on your own policy (model/training).

    sprm train collect --model DIR --prompts FILE.jsonl --out ROLLOUTS [--k 8] [--verifier module:function] [--ray]
    sprm train fit --rollouts ROLLOUTS --out HEAD [--mode spr] [--epochs 1] [--lr 1e-4] [--init DIR]

`collect` samples k rollouts per prompt, labels them with a verifier (default: the last number of the answer equals
the prompt's "reference") and saves a `RolloutSet`; with `--ray` a pool of Ray actors collects the same rollouts.
`fit` trains a head on saved rollouts and writes the head files, checkpoints and `train_report.json`.
"""

from __future__ import annotations

import argparse
import os
import sys

from sprm_kernels.loss import MODES
from sprm_kernels.model.cli.common import (
    PROG,
    USAGE_ERROR,
    Parser,
    UsageError,
    check_head_folder,
    check_model_folder,
    non_negative_int,
    positive_int,
)
from sprm_kernels.model.engines.registry import ENGINES
from sprm_kernels.model.training.verifiers import LABEL_SOURCES, last_number_verifier, load_verifier, read_prompts

NAME = "train"
BACKENDS = ("torch", "triton")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="train an SPRM head on your own policy (collect, then fit)")
    commands = parser.add_subparsers(dest="train_command", required=True, metavar="STEP", parser_class=Parser)
    add_collect_arguments(commands.add_parser("collect", help="sample k rollouts per prompt, label them, save them"))
    add_fit_arguments(commands.add_parser("fit", help="train a head on saved rollouts, write checkpoints"))
    return parser


def add_collect_arguments(parser: argparse.ArgumentParser) -> None:
    from sprm_kernels.model.ray.cluster import add_ray_arguments

    parser.add_argument("--model", required=True, help="official-layout folder (HF model + tokenizer + head)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="hf", help="hf (transformers) or vllm")
    parser.add_argument("--prompts", required=True, help="JSON lines {prompt, reference} or one prompt per line")
    parser.add_argument("--out", required=True, help="directory for rollouts.safetensors + rollouts.json")
    parser.add_argument("--verifier", help="module:function or file.py:function; default: last number == reference")
    parser.add_argument("--k", type=positive_int, default=8, help="rollouts per prompt (default 8)")
    parser.add_argument("--label-from", choices=LABEL_SOURCES, default="answer", help="what the verifier reads")
    parser.add_argument("--max-think-tokens", type=positive_int, default=4096)
    parser.add_argument("--max-answer-tokens", type=non_negative_int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--answer-temperature", type=float, help="default: --temperature")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i")
    parser.add_argument("--device")
    parser.add_argument("--backend", choices=BACKENDS)
    add_ray_arguments(parser, out_help="with --ray: stream per-prompt summaries to this .jsonl / .parquet file",
                      out_flag="--rows")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollouts", required=True, help="a directory written by collect")
    parser.add_argument("--out", required=True, help="directory for the head files, checkpoints and the report")
    parser.add_argument("--init", help="start from the head in this folder (default: a fresh head, seeded)")
    parser.add_argument("--backbone", help="recorded in sprm_train.json (default: the model the rollouts came from)")
    parser.add_argument("--mode", choices=MODES, default="spr")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps (default: --epochs passes)")
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--batch-problems", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-split", type=float, default=0.2)
    parser.add_argument("--eval-every", type=positive_int)
    parser.add_argument("--checkpoint-every", type=positive_int)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--bce-warmup-steps", type=non_negative_int, default=0,
                        help="mode spr: plain BCE for the first N steps")  # fmt: skip
    parser.add_argument("--no-balance", action="store_true", help="turn off the reference's class balancing")
    parser.add_argument("--device")
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


class RaiseUsageError:
    """Stands in for a parser where a shared check calls `parser.error`: the message becomes a UsageError."""

    def error(self, message: str):
        raise UsageError(message)


def run(args: argparse.Namespace) -> int:
    try:
        return run_collect(args) if args.train_command == "collect" else run_fit(args)
    except ValueError as error:  # a value the library rejects before any work (collect's, train_head's checks)
        raise UsageError(option_message(error, args)) from None


def option_message(error: ValueError, args: argparse.Namespace) -> str:
    """The error's first line, its leading argument name spelled as the option (`lr: ...` -> `--lr: ...`)."""
    message = (str(error).strip() or type(error).__name__).splitlines()[0]
    name, colon, rest = message.partition(":")
    if colon and name.isidentifier() and hasattr(args, name):
        return f"--{name.replace('_', '-')}:{rest}"
    return message


def run_collect(args: argparse.Namespace) -> int:
    from sprm_kernels.model.ray.cluster import workers_from_args

    check_model_folder(args.model)
    if not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts}: no such file")
    workers = workers_from_args(RaiseUsageError(), args)
    check_sampling(args)
    try:
        prompts, references = read_prompts(args.prompts)
    except (ValueError, KeyError) as error:  # not JSON, no "prompt"
        raise UsageError(f"--prompts {args.prompts}: {type(error).__name__}: {error}") from None
    if not prompts:
        raise UsageError(f"--prompts {args.prompts}: no prompts")
    if args.verifier:
        verifier = user_verifier(args.verifier)
    elif references:
        verifier = last_number_verifier(references)
    else:
        raise UsageError("--verifier is needed when the prompts carry no 'reference'")
    options = dict(
        label_from=args.label_from, max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
        temperature=args.temperature, top_p=args.top_p, answer_temperature=args.answer_temperature, seed=args.seed,
        progress=not args.quiet,
    )  # fmt: skip
    if workers is not None:  # --ray: the same rollouts from a pool of Ray actors
        from sprm_kernels.model.ray.collect_job import collect_on_ray

        engine_kwargs = {"backend": args.backend, **({"device": args.device} if args.device else {})}
        rollouts = collect_on_ray(
            args.model, prompts, verifier, args.k, engine=args.engine, address=args.ray, engine_kwargs=engine_kwargs,
            workers=workers, rows=args.rows, **options,
        )  # fmt: skip
    else:
        from sprm_kernels.model.engines.registry import load_engine
        from sprm_kernels.model.training.collect import collect

        model = load_engine(args.model, engine=args.engine, device=args.device, backend=args.backend)
        rollouts = collect(model, prompts, verifier, args.k, **options)
    rollouts.info["model"] = args.model
    rollouts.save(args.out)
    valid = rollouts.valid
    print(f"{rollouts.num_rollouts} rollouts of {rollouts.num_problems} prompts, {int(valid.sum())} valid, "
          f"{int((rollouts.correct & valid).sum())} correct, {rollouts.features.shape[0]} scored steps "
          f"-> {args.out}")  # fmt: skip
    return 0


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling options, checked as `generate` will check them, before the model is loaded (ValueError)."""
    from sprm_kernels.model.core.params import GenerationParams

    GenerationParams(
        k=args.k, max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
        temperature=args.temperature, top_p=args.top_p, answer_temperature=args.answer_temperature, seed=args.seed,
    )  # fmt: skip


def user_verifier(spec: str):
    """`load_verifier(spec)`, with a one-line UsageError when the module or function cannot be found."""
    try:
        verifier = load_verifier(spec)
    except (ImportError, OSError, AttributeError, ValueError) as error:
        raise UsageError(f"--verifier {spec}: {error}") from None
    if not callable(verifier):
        raise UsageError(f"--verifier {spec}: not a function")
    return verifier


def run_fit(args: argparse.Namespace) -> int:
    from sprm_kernels.model.training.rollouts import ROLLOUTS_JSON

    if not os.path.isfile(os.path.join(args.rollouts, ROLLOUTS_JSON)):
        raise UsageError(f"--rollouts {args.rollouts}: not a rollouts folder (no {ROLLOUTS_JSON}; see train collect)")
    if args.init:
        check_head_folder(args.init, "--init")
    import torch

    from sprm_kernels.model.core.head import SPRMHead
    from sprm_kernels.model.training.fit import train_head
    from sprm_kernels.model.training.rollouts import RolloutSet

    rollouts = RolloutSet.load(args.rollouts)
    if args.init:
        head = SPRMHead.from_pretrained(args.init)
    else:
        torch.manual_seed(args.seed)
        head = SPRMHead(rollouts.hidden_size)
    if args.device:
        head.to(args.device)
    report = train_head(
        head, rollouts, mode=args.mode, steps=args.steps, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, batch_problems=args.batch_problems, seed=args.seed,
        eval_split=args.eval_split, eval_every=args.eval_every, dropout=args.dropout, balance=not args.no_balance,
        bce_warmup_steps=args.bce_warmup_steps, output_dir=args.out, checkpoint_every=args.checkpoint_every,
        backbone=args.backbone or rollouts.info.get("model"), backend=args.backend, progress=not args.quiet,
    )  # fmt: skip
    print(f"head -> {args.out} ({report.eval_on} problems: {len(report.eval_problems or report.train_problems)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sprm train ...` on its own: `main(["fit", "--rollouts", ...])`; usage errors are one line, exit 2."""
    parser = Parser(prog=PROG)
    add_parser(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    try:
        args = parser.parse_args([NAME, *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exit_:  # argparse exits 2 after printing its one line (0 for --help)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    try:
        return run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
