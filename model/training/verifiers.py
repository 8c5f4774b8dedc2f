"""Labels for rollouts: the verifier contract, the built-in last-number verifier, user verifiers by name, and the
prompts file that carries the references.

A verifier is `verifier(prompt, text) -> True | False | None`: True (correct), False (wrong) or None (a format
failure: the rollout is invalid and left out of the loss). `text` is the candidate's answer (label source "answer")
or its thinking (label source "thinking", for tasks whose thinking states the result).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable

Verifier = Callable[[object, str], object]  # (prompt, answer) -> True / False, or None for a format failure
LABEL_SOURCES = ("answer", "thinking")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def check_verdict(value) -> bool | None:
    """A verifier's return value as True / False / None; ValueError for anything else."""
    if value is None:
        return None
    if value not in (True, False):  # bool, numpy bool, 0 / 1
        raise ValueError(f"verifier: expected it to return True, False or None, got {value!r:.80}")
    return bool(value)


def prompt_key(prompt) -> str:
    """The key of a prompt (text, or chat messages as sorted JSON) in a references dict."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def last_number_verifier(references: dict) -> Verifier:
    """A verifier for prompts with known numeric answers: the last number in the answer equals the prompt's
    reference (as a number); None (format failure) when the answer has no number."""

    def verify(prompt, answer: str):
        reference = references.get(prompt_key(prompt))
        if reference is None:
            raise ValueError(f"verifier: no reference for the prompt {prompt!r:.80}")
        found = NUMBER.findall(answer or "")
        return float(found[-1]) == float(reference) if found else None

    return verify


def load_verifier(spec: str) -> Verifier:
    """A verifier from "package.module:function" or "path/to/file.py:function"."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"verifier: expected 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("sprm_user_verifier", module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)


def read_prompts(path: str) -> tuple[list, dict]:
    """(prompts, references by `prompt_key`): JSON lines {"prompt": text or messages, "reference": optional
    answer}, or plain text, one prompt per line."""
    prompts, references = [], {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                record = json.loads(line)
                prompts.append(record["prompt"])
                if "reference" in record:
                    references[prompt_key(record["prompt"])] = record["reference"]
            else:
                prompts.append(line.rstrip("\n"))
    return prompts, references
