"""What every `sprm` subcommand shares: the usage error, the parser, argument types, loading a model folder.

A usage error (a missing or malformed model folder, a bad option) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from sprm_kernels.model.core.head import PT_NAME, SAFETENSORS_NAME
from sprm_kernels.model.core.threads import THREADS_HELP, set_threads
from sprm_kernels.model.engines.registry import ENGINES, load_engine
from sprm_kernels.model.shipped import SHIPPED_DIR

PROG = "sprm"
USAGE_ERROR = 2


class UsageError(Exception):
    """Printed as `sprm: error: <message>`, exit status 2."""


# -- the command line -------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (`sprm eval: error: argument --n: expected a positive int, got '0' (see ...)`), exit
    status 2 (argparse's default prints the usage first)."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """`1,2,8` -> [1, 2, 8]: comma-separated positive ints, at least one."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints such as 1,2,8, got {text!r}")
    return values


def add_model_options(command: argparse.ArgumentParser) -> None:
    """--model, --device, --engine, --threads: how every model-loading subcommand picks and runs its model."""
    command.add_argument(
        "--model", default=SHIPPED_DIR, metavar="DIR", help="official-layout folder (default: the shipped one)"
    )
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    command.add_argument(
        "--engine", choices=sorted(ENGINES), default="hf", help="hf (transformers) or vllm (default hf)"
    )
    command.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)


def check_model_folder(path: str, option: str = "--model") -> None:
    """A local official-layout folder, or a one-line UsageError. Never a Hub id: a path that is not a folder here is
    an error, so nothing is ever downloaded."""
    if not os.path.isdir(path):
        raise UsageError(f"{option} {path}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{option} {path}: not a model folder (no config.json)")
    check_head_folder(path, option)


def check_head_folder(path: str, option: str = "--bce-head") -> None:
    if not os.path.isdir(path):
        raise UsageError(f"{option} {path}: no such folder")
    if not any(os.path.isfile(os.path.join(path, name)) for name in (PT_NAME, SAFETENSORS_NAME)):
        raise UsageError(f"{option} {path}: no SPRM head ({PT_NAME} or {SAFETENSORS_NAME})")


def load_model(path: str, device: str | None, threads: int | None = None, engine: str = "hf", serving: bool = False):
    """`load_engine` (an `Engine`: ReflectiveModel for "hf"; `serving`: the server's variant), with a one-line
    UsageError for a missing or malformed folder; then `set_threads`."""
    check_model_folder(path)
    # The folder is local: keep the Hub client offline, so a missing file is an error, never a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bars on a command's stderr
    try:
        model = load_engine(path, engine=engine, serving=serving, device=device)
    except Exception as error:  # a malformed folder fails in many ways (json, safetensors, tokenizer, head shape)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model {path}: cannot load the model: {message}") from None
    set_model_threads(threads, model)
    return model


def set_model_threads(threads: int | None, engine) -> None:
    """`--threads N`, else the default for this engine's device and size (`core.threads.default_threads`)."""
    info = engine.info()
    set_threads(threads, device=info.device, num_parameters=info.num_parameters)


# -- options built from a params object's fields (core/params.py): one spelling, one help text, one default ----


def add_params_options(
    parser, params_cls, names: list[str], *, flags: dict[str, str] | None = None, use_defaults: bool = False
) -> None:
    """One option per field of `params_cls` (`GenerationParams`, `SearchParams`) named in `names`: the flag is the
    field's name in kebab case (or `flags[name]`), the help, choices and minimum come from the field's metadata.
    Defaults are None ("not given": the model folder's default, `engines.common.generation_options`) unless
    `use_defaults`, which puts the field's own default in."""
    by_name = {f.name: f for f in fields(params_cls)}
    for name in names:
        field_ = by_name[name]
        meta = field_.metadata
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        default = field_.default if use_defaults else None
        help_text = meta["help"] + (f" (default {field_.default})" if use_defaults else "")
        kind = str(field_.type)
        options = dict(dest=name, default=default, help=help_text)
        if kind.startswith("bool"):
            parser.add_argument(flag, action="store_true", **{**options, "default": False})
            continue
        if "choices" in meta:
            options["choices"] = list(meta["choices"])
        elif kind.startswith("int"):
            options["type"] = {1: positive_int, 0: non_negative_int}[meta["minimum"]] if "minimum" in meta else int
            options["metavar"] = "N"
        elif kind.startswith("float"):
            options["type"] = float
            options["metavar"] = "X"
        parser.add_argument(flag, **options)


def params_given(args, params_cls, names: list[str] | None = None) -> dict:
    """The fields of `params_cls` found on `args` (None: not given), as keyword arguments."""
    return {f.name: getattr(args, f.name) for f in fields(params_cls) if hasattr(args, f.name)
            and (names is None or f.name in names)}  # fmt: skip
