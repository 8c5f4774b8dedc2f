"""`sprm score FILE.jsonl`: score each line {"text", "return_all_scores"} ("-": stdin) as the server's /score
would, one JSON result per line; a bad line is a usage error naming its line, before any scoring."""

from __future__ import annotations

import argparse
import json
import sys

from sprm_kernels.model.cli.common import UsageError, add_model_options, load_model, positive_int

NAME = "score"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help='score a JSONL file of {"text", "return_all_scores"} lines ("-": stdin)')
    parser.add_argument("file", metavar="FILE.jsonl")
    add_model_options(parser)
    parser.add_argument("--max-batch-tokens", type=positive_int, default=16384)
    return parser


def run(args) -> int:
    requests = read_score_requests(args.file)
    model = load_model(args.model, args.device, args.threads, args.engine)
    from sprm_kernels.model.core.types import score_json
    from sprm_kernels.model.engines.common import context_limit, token_problem

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
