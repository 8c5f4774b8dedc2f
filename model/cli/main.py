"""The `sprm` command: `serve` (HTTP server), `generate` (best-of-k answer to one question), `score` (a JSONL file).

    sprm serve --model DIR [--host 127.0.0.1] [--port 8001] [--max-batch-tokens N] [--max-queue N] [--token T]
    sprm generate "What is 2+3?" [--model DIR] [--mode low|medium|high | --k N] [--seed S] [--json]
    sprm score texts.jsonl [--model DIR]        # lines {"text": ..., "return_all_scores": false}
    sprm eval [--model DIR] [--n N] [--json] [--plot FILE.png]
    sprm bench                                  # the quick benchmarks (from a source checkout)

--model defaults to the small model shipped in the package (model/shipped, trained by build_shipped.py); it must
be a local folder (never a Hub id: nothing is downloaded). --threads sets torch's CPU threads (`default_threads`).

Usage errors (a missing or malformed model folder, an unknown mode, an empty question, a bad input line) print one
line on stderr and exit with status 2. This module also holds the JSON forms of results shared with the server,
so that `generate` and `score` need neither FastAPI nor uvicorn (only `serve` does: the `serve` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sprm_kernels import __version__
from sprm_kernels.model.cli.common import *  # noqa: F403 (split in progress)
from sprm_kernels.model.cli.common import (
    PROG,
    THREADS_HELP,
    USAGE_ERROR,
    Parser,
    UsageError,
    load_model,
    non_negative_int,
    positive_int,
)
from sprm_kernels.model.core.selection import MODES
from sprm_kernels.model.core.types import generation_json, score_json
from sprm_kernels.model.engines.common import context_limit, generation_options, generation_overflow, token_problem
from sprm_kernels.model.engines.registry import ENGINES
from sprm_kernels.model.evaluation.best_of_k import add_eval_arguments
from sprm_kernels.model.shipped import SHIPPED_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="SPRM scoring and reflective best-of-k generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_model_options(command):
        command.add_argument(
            "--model", default=SHIPPED_DIR, metavar="DIR", help="official-layout folder (default: the shipped one)"
        )
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        command.add_argument(
            "--engine", choices=sorted(ENGINES), default="hf", help="hf (transformers) or vllm (default hf)"
        )
        command.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)

    serve = commands.add_parser("serve", help="HTTP server: /score, /score_batch, /generate, /health")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default loopback; there is no TLS (see README)")
    serve.add_argument("--port", type=int, default=8001, help="default: %(default)s")
    serve.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=16384,
        help="tokens per scoring batch and per forward, padding included (default 16384)",
    )
    serve.add_argument(
        "--max-queue",
        type=positive_int,
        default=1024,
        help="texts and generations in hand (queued or running); beyond: 503 (default 1024)",
    )
    serve.add_argument(
        "--max-text-tokens",
        type=positive_int,
        default=None,
        help="longest text accepted (default the model's max_position_embeddings)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=None,
        help="largest request body, refused with 413 before it is read (default: 12 bytes per character of the "
        "longest text that fits, at least 1 MiB)",
    )
    serve.add_argument(
        "--token",
        default=os.environ.get("SPRM_SERVER_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default $SPRM_SERVER_TOKEN; the environment "
        "keeps it out of the process list; an empty token is refused)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="one log line per request (default: per batch)")
    from sprm_kernels.model.ray.serve import add_arguments as add_ray_serve_arguments

    add_ray_serve_arguments(serve)

    generate = commands.add_parser("generate", help="best-of-k reflective answer to one question")
    generate.add_argument("question")
    add_model_options(generate)
    size = generate.add_mutually_exclusive_group()
    size.add_argument("--mode", choices=list(MODES), default=None, help="k = 2 / 8 / 32 (default medium)")
    size.add_argument("--k", type=positive_int, default=None, help="number of candidates")
    generate.add_argument(
        "--seed", type=int, default=None, help="sampling seed (default: none, so two runs differ: not reproducible)"
    )
    generate.add_argument("--max-think-tokens", type=positive_int, default=None, help="default: 4096, or what fits")
    generate.add_argument("--max-answer-tokens", type=non_negative_int, default=None, help="default: 1024, or 1/8")
    generate.add_argument("--temperature", type=float, default=None, help="default: the model's, else 0.6")
    generate.add_argument("--top-p", type=float, default=None, help="default: the model's, else 0.95")
    generate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    generate.add_argument(
        "--search", choices=["beam", "dvts"], default=None,
        help="step-level search guided by the step scores instead of best-of-k (hf engine)",
    )  # fmt: skip
    generate.add_argument("--beam-width", type=positive_int, default=4, help="--search: beams / subtrees (default 4)")
    generate.add_argument("--expansions", type=positive_int, default=2, help="--search: children per beam (default 2)")

    score = commands.add_parser("score", help='score a JSONL file of {"text", "return_all_scores"} lines ("-": stdin)')
    score.add_argument("file", metavar="FILE.jsonl")
    add_model_options(score)
    score.add_argument("--max-batch-tokens", type=positive_int, default=16384)

    evaluate = commands.add_parser("eval", help="best-of-k accuracy on held-out problems (the shipped task)")
    add_eval_arguments(evaluate)
    bench = commands.add_parser("bench", help="the quick benchmarks: python -m bench in the source checkout")
    bench.add_argument("--full", action="store_true", help="the full kernel and pipeline benchmarks")
    bench.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 after printing its message (0 for --help)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    try:
        commands = {"serve": run_serve, "generate": run_generate, "score": run_score, "eval": run_eval}
        return commands.get(args.command, run_bench)(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def run_serve(args) -> int:
    if args.ray is not None:
        return run_serve_on_ray(args)
    if args.replicas != 1 or args.max_replicas is not None:
        raise UsageError("--replicas, --max-replicas: only with --ray")
    try:
        from sprm_kernels.model.serving.app import serve
    except ImportError as error:
        raise UsageError(f"serve needs the serve extra (pip install 'sprm-kernels[serve]'): {error}") from None
    if args.token is not None and not args.token.strip():
        raise UsageError(
            "--token: expected a non-empty token, got an empty one (from --token or $SPRM_SERVER_TOKEN); it would "
            "turn authentication off: unset SPRM_SERVER_TOKEN to serve without a token"
        )
    model = load_model(args.model, args.device, args.threads, args.engine)
    serve(
        model, host=args.host, port=args.port, max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
        max_text_tokens=args.max_text_tokens, max_body_bytes=args.max_body_bytes, token=args.token,
        log_level=args.log_level, access_log=args.access_log,
    )  # fmt: skip
    return 0


def run_serve_on_ray(args) -> int:
    """`sprm serve --ray`: the same app as N Ray Serve replicas (serving/ray_serve.py)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise UsageError("serve --ray needs Ray Serve and the serve extra (pip install 'ray[serve]' "
                         "'sprm-kernels[serve]')")  # fmt: skip
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model}: not a model folder (no config.json)")
    from sprm_kernels.model.ray import serve as ray_serve

    try:
        ray_serve.options_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return ray_serve.run(args)


def run_generate(args) -> int:
    if not args.question.strip():
        raise UsageError("the question is empty")
    model = load_model(args.model, args.device, args.threads, args.engine)
    options = generation_options(
        model, args.question, seed=args.seed, max_think_tokens=args.max_think_tokens,
        max_answer_tokens=args.max_answer_tokens, temperature=args.temperature, top_p=args.top_p,
    )  # fmt: skip
    overflow = generation_overflow(model, args.question, options["max_think_tokens"], options["max_answer_tokens"])
    if overflow:
        raise UsageError(f"--max-think-tokens, --max-answer-tokens: the {overflow}")
    if args.search and not hasattr(model, "search"):
        raise UsageError(f"--search: the {args.engine} engine has no step-level search (use --engine hf)")
    if args.search and (args.mode or args.k):
        raise UsageError("--search: the batch is --beam-width x --expansions rows; --mode and --k do not apply")
    try:
        if args.search:
            result = model.search(args.question, method=args.search, beam_width=args.beam_width,
                                  expansions=args.expansions, **options)  # fmt: skip
        else:
            result = model.generate(args.question, mode=args.mode or "medium", k=args.k, **options)
    except ValueError as error:  # e.g. a temperature or top_p out of range
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(generation_json(result)))
    else:
        print(describe_generation(result))
    return 0


def run_eval(args) -> int:
    from sprm_kernels.model.evaluation.best_of_k import run_eval as evaluate_from_args

    return evaluate_from_args(args)


def source_checkout() -> str | None:
    """The source checkout this package runs from (an editable install: the folder holding model/ and bench/), or
    the current directory when it is one; None for a plain install, which has no benchmarks."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in (here, os.getcwd()):
        if os.path.isfile(os.path.join(folder, "bench", "__main__.py")) and os.path.isfile(
            os.path.join(folder, "pyproject.toml")
        ):
            return folder
    return None


def run_bench(args) -> int:
    """`python -m bench` in the source checkout, as a child process (the package itself never imports `bench`)."""
    import subprocess

    checkout = source_checkout()
    if checkout is None:
        raise UsageError(
            "bench: the benchmarks live in the source checkout (bench/), which this install does not come from: "
            "clone the repository, pip install -e it, and run sprm bench (or python -m bench) there"
        )
    command = [sys.executable, "-m", "bench"] + (["--full"] if args.full else [])
    command += [] if args.threads is None else ["--threads", str(args.threads)]
    return subprocess.run(command, cwd=checkout).returncode


def describe_generation(result) -> str:
    lines = [f"{len(result.candidates)} candidates, prompt {len(result.prompt_token_ids)} tokens"]
    lines.append("     #    score  steps  tokens  finished  thinking")
    for index, candidate in enumerate(result.candidates):
        mark = "*" if index == result.best else " "
        lines.append(
            f"  {mark} {index:2d}  {candidate.score:7.4f}  {len(candidate.score_positions):5d}  "
            f"{len(candidate.token_ids):6d}  {'yes' if candidate.finished else 'no':8s}  {summary(candidate.text)}"
        )
    stats = result.stats
    timings = ", ".join(f"{phase} {1000 * seconds:.1f} ms" for phase, seconds in stats.seconds.items())
    searched = f", {stats.think_generated_tokens} thinking tokens sampled in {stats.rounds} search rounds"
    lines += [
        f"chosen: candidate {result.best} (score {result.candidates[result.best].score:.4f})",
        f"answer: {result.answer!r}",
        f"timings: {timings}; {stats.total_tokens} tokens through the model" + (searched if stats.rounds else ""),
    ]
    return "\n".join(lines)


def summary(text: str, width: int = 60) -> str:
    """The start and the end of a thinking, escaped onto one line."""
    if len(text) <= width:
        return repr(text)
    half = width // 2
    return f"{text[:half]!r} ... {text[-half:]!r}"


def run_score(args) -> int:
    requests = read_score_requests(args.file)
    model = load_model(args.model, args.device, args.threads, args.engine)
    limit = context_limit(model)
    texts = [text for _, text, _ in requests]
    sequences = model.encode(texts)
    for (line_number, _, _), ids in zip(requests, sequences, strict=True):
        problem = token_problem(ids, limit)  # the server's checks: 422 / 413 there, exit 2 here
        if problem is not None:
            raise UsageError(f"{args.file}:{line_number}: {problem[1]}")
    results = model.score(sequences, return_all_scores=True, batch_tokens=args.max_batch_tokens)
    for (_, _, return_all_scores), result in zip(requests, results, strict=True):
        print(json.dumps(score_json(result, return_all_scores)))
    return 0


def read_score_requests(path: str) -> list[tuple[int, str, bool]]:
    """(line number, text, return_all_scores) of each line, checked; blank lines are skipped. Lines are read as
    bytes and decoded one by one, so invalid UTF-8 is reported with its line."""
    try:
        handle = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    requests = []
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"{where}: not UTF-8 (byte {error.start + 1} of the line: {error.reason})") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise UsageError(f'{where}: expected an object with a string "text"')
            unknown = set(item) - {"text", "return_all_scores"}
            if unknown:
                raise UsageError(f"{where}: unknown fields {sorted(unknown)}")
            if not item["text"]:
                raise UsageError(f"{where}: empty text")
            return_all_scores = item.get("return_all_scores", False)
            if not isinstance(return_all_scores, bool):
                raise UsageError(f'{where}: expected "return_all_scores" to be true or false')
            requests.append((number, item["text"], return_all_scores))
    return requests


if __name__ == "__main__":
    sys.exit(main())
