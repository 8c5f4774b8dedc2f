"""The shipped model's task: multi-term addition as running sums, each step self-checked by a verdict character.

A problem is `47+85+13+62=?`. The thinking adds one term per step; each step writes the sum, then a re-check (the
sum computed again), then a verdict, `y` (the two agree) or `n` (they differ), then the step token:

    <think>47+85=132 132 y.\\n\\n132+13=145 145 y.\\n\\n145+62=207 207 y.\\n\\n</think>207

The supervised traces contain deliberately corrupted sums (one digit changed) whose re-check is right and whose
verdict is `n`, and the trace then continues from the wrong sum, so one bad step makes the final answer wrong. So
the policy makes its mistakes inside steps (it learns to write a wrong sum now and then, and sampling adds its own
slips), and the position the SPRM reads (the one before `.\\n\\n`, the verdict) follows the policy's own check of
the step: comparing two numbers it wrote is easy even for a tiny model, where checking a sum in one position is
not (a first design with the verdict right after the sum detected under half of the wrong sums). The final answer
is a deterministic function of the thinking: the last step's sum.

Splits draw from disjoint seed streams; `difficulty` is the number of terms (steps = terms - 1).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SPLITS = {"train": 0, "validation": 1, "test": 2}  # each split's seed stream
STEP = ".\n\n"
DIGITS = 2  # operands have 1 to DIGITS digits
DEFAULT_DIFFICULTY = 5  # terms per problem: 4 steps
CORRUPT_RATE = 0.12  # share of supervised steps whose sum is corrupted (and labelled `n`)
STEP_PATTERN = re.compile(r"^(\d+)\+(\d+)=(\d+) (\d+) ([yn])$")


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.terms)) + "=?"

    @property
    def answer(self) -> int:
        return sum(self.terms)


def problems(split: str, n: int, *, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY) -> list[Problem]:
    """n problems of `split` ("train", "validation", "test"); the same (split, seed, difficulty) gives the same list."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 2:
        raise ValueError(f"difficulty: expected an int >= 2 (terms per problem), got {difficulty!r}")
    rng = random.Random(f"{split}:{seed}:{difficulty}")  # str seeds hash deterministically (not PYTHONHASHSEED)
    return [Problem(tuple(rng.randint(1, 10**DIGITS - 1) for _ in range(difficulty))) for _ in range(n)]


def corrupt(value: int, rng: random.Random) -> int:
    """A different number of the same length: one digit changed (never a leading zero)."""
    digits = list(str(value))
    position = rng.randrange(len(digits))
    lowest = "1" if position == 0 and len(digits) > 1 else "0"
    choices = [d for d in "0123456789" if d != digits[position] and d >= lowest]
    digits[position] = rng.choice(choices)
    return int("".join(digits))


def trace(problem: Problem, rng: random.Random | None = None, corrupt_rate: float = 0.0) -> tuple[str, str]:
    """(thinking, answer) of a supervised trace: steps with verdicts, some corrupted when `corrupt_rate` > 0. The
    thinking excludes `<think>` (the chat template writes it) and includes `</think>`."""
    total, steps = problem.terms[0], []
    for term in problem.terms[1:]:
        right = total + term
        written = corrupt(right, rng) if rng is not None and rng.random() < corrupt_rate else right
        steps.append(f"{total}+{term}={written} {right} {'y' if written == right else 'n'}{STEP}")
        total = written  # a wrong step propagates: the answer depends on every step
    return "".join(steps) + "</think>", str(total)


def parse_steps(thinking: str) -> list[tuple[int, int, int, int, str]] | None:
    """[(a, b, sum, re-check, verdict)] of a thinking text (markers allowed), or None if it breaks the step format."""
    body = thinking.replace("<think>", "").split("</think>")[0]
    if not body.endswith(STEP):
        return None
    steps = []
    for chunk in body[: -len(STEP)].split(STEP):
        match = STEP_PATTERN.match(chunk)
        if match is None:
            return None
        a, b, c, recheck, verdict = match.groups()
        steps.append((int(a), int(b), int(c), int(recheck), verdict))
    return steps


def answer_from_thinking(thinking: str) -> int | None:
    """The answer the thinking commits to (the last step's sum), or None if the format is broken."""
    steps = parse_steps(thinking)
    return steps[-1][2] if steps else None


def parse_answer(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def is_correct(problem: Problem, answer: int | str | None) -> bool:
    """The verifier: the final answer equals the sum of the terms."""
    if isinstance(answer, str):
        answer = parse_answer(answer)
    return answer is not None and answer == problem.answer


def step_errors(problem: Problem, thinking: str) -> dict | None:
    """Diagnostics of a sampled thinking: wrong sums, wrong operands, and how the verdicts matched the truth."""
    steps = parse_steps(thinking)
    if steps is None or len(steps) != len(problem.terms) - 1:
        return None
    wrong_sum = [a + b != c for a, b, c, *_ in steps]
    wrong_recheck = [a + b != r for a, b, _, r, _ in steps]
    previous = [problem.terms[0]] + [c for _, _, c, *_ in steps[:-1]]
    wrong_operand = [(a, b) != (p, t) for (a, b, *_), p, t in zip(steps, previous, problem.terms[1:], strict=True)]
    verdict_no = [v == "n" for *_, v in steps]
    return {
        "wrong_sum": wrong_sum,
        "wrong_recheck": wrong_recheck,
        "wrong_operand": wrong_operand,
        "verdict_no": verdict_no,
    }
