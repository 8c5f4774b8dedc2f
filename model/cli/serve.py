"""`sprm serve`: the HTTP server (/score, /score_batch, /generate, /health) on one model, or with --ray the same
app as Ray Serve replicas."""

from __future__ import annotations

import argparse
import os

from sprm_kernels.model.cli.common import UsageError, add_model_options, load_model, positive_float, positive_int
from sprm_kernels.model.engines.base import supports_close

NAME = "serve"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from sprm_kernels.model.ray.serve import add_arguments as add_ray_serve_arguments

    parser = subparsers.add_parser(NAME, help="HTTP server: /score, /score_batch, /generate, /health")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="default loopback; there is no TLS (see docs/serving.md)")
    parser.add_argument("--port", type=int, default=8001, help="default: %(default)s")
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=16384,
        help="tokens per scoring batch and per forward, padding included (default 16384)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=1024,
        help="texts and generations in hand (queued or running); beyond: 503 (default 1024)",
    )
    parser.add_argument(
        "--max-text-tokens",
        type=positive_int,
        default=None,
        help="longest text accepted (default the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=None,
        help="largest request body, refused with 413 before it is read (default: 12 bytes per character of the "
        "longest text that fits, at least 1 MiB)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SPRM_SERVER_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default $SPRM_SERVER_TOKEN; the environment "
        "keeps it out of the process list; an empty token is refused)",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=600.0,
        help="seconds a request may run before it is cancelled and answered 504 (--engine vllm; default %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="one log line per request (default: per batch)")

    add_ray_serve_arguments(parser)
    return parser


def run(args) -> int:
    if args.ray is not None:
        return run_on_ray(args)
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
    model = load_model(args.model, args.device, args.threads, args.engine, serving=True)
    serve(
        model, host=args.host, port=args.port, max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
        max_text_tokens=args.max_text_tokens, max_body_bytes=args.max_body_bytes, token=args.token,
        request_timeout=args.request_timeout, log_level=args.log_level, access_log=args.access_log,
    )  # fmt: skip
    if supports_close(model):  # vLLM's engine process: stopped now, not by an interpreter exiting
        model.close()
    return 0


def run_on_ray(args) -> int:
    """`sprm serve --ray`: the same app as N Ray Serve replicas (ray/serve.py)."""
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
