"""The `sprm` command: one subcommand per module of this package (vLLM's `entrypoints/cli` layout).

    sprm generate "What is 2+3?" [--model DIR] [--mode low|medium|high | --k N] [--seed S] [--json] [--search beam]
    sprm score texts.jsonl [--model DIR]        # lines {"text": ..., "return_all_scores": false}
    sprm serve [--model DIR] [--host 127.0.0.1] [--port 8001] [--token T] [--ray]
    sprm eval [--model DIR] [--n N] [--json] [--plot FILE.png] [--search beam,dvts] [--ray]
    sprm train collect|fit ...                  # train an SPRM head on your own policy
    sprm bench                                  # the quick benchmarks (from a source checkout)

--model defaults to the small model shipped in the package (model/shipped); it must be a local folder (never a Hub
id: nothing is downloaded). Each subcommand imports its heavy stacks (torch, transformers, FastAPI, Ray) only when
it runs. Usage errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys

from sprm_kernels import __version__
from sprm_kernels.model.cli import bench, generate, score, serve, train
from sprm_kernels.model.cli import eval as evaluate
from sprm_kernels.model.cli.common import PROG, USAGE_ERROR, Parser, UsageError

SUBCOMMANDS = (generate, score, serve, evaluate, train, bench)  # each: add_parser(subparsers), run(args)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="SPRM scoring and reflective best-of-k generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(commands).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 after printing its message (0 for --help)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    try:
        return args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
