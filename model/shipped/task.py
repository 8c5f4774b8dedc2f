"""The shipped model's task: additions of one-digit terms as running sums, each step judged by a verdict character.

A problem is `4+8+1+6+9+3=?`. The thinking adds one term per step and writes every running sum with two digits
(zero-padded), then a verdict, `y` (the step is right) or `n` (it is wrong), then the step token:

    <think>04+8=12 y.\\n\\n12+1=13 y.\\n\\n13+6=19 y.\\n\\n19+9=28 y.\\n\\n28+3=31 y.\\n\\n</think>31

The SPRM reads the position before `.\\n\\n`, the verdict, so the policy must have checked the step there. Two
choices make that check learnable by a 0.8M-parameter model (an earlier design with 1-2-digit terms, variable-width
sums and a re-check that the tiny policy mostly copied missed 40% of the wrong sums, and every head trained on its
features chose worse than random at k=32; bench/experiments/README.md):
- fixed-width sums of a one-digit term: the digits that decide the verdict sit at fixed offsets before it;
- supervised traces with wrong steps of two kinds: *slips* (`slip_rate`: a sum with one digit changed, in the
  loss, so the policy learns to write a wrong sum now and then, which is where its mistakes come from) and
  *checks* (`check_rate` wrong sums, `operand_check_rate` wrongly copied operands: in the input only, they teach
  the verdict what an error looks like without teaching more slips). A step is right when its operands are the
  previous sum and the next term and its sum is their sum; a wrong step's verdict is `n` and the trace continues
  from its sum, so one wrong step makes the final answer wrong.
The final answer is a deterministic function of the thinking: the last step's sum.

Splits draw from disjoint seed streams; `difficulty` is the number of terms (steps = terms - 1).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SPLITS = {"train": 0, "validation": 1, "test": 2}  # each split's seed stream
STEP = ".\n\n"
DIGITS = 1  # terms have DIGITS digits
WIDTH = 2  # running sums are zero-padded to WIDTH digits
DEFAULT_DIFFICULTY = 6  # terms per problem: 5 steps
SLIP_RATE = 0.12  # share of supervised steps whose (wrong) sum is in the loss: the policy's own slips
CHECK_RATE = 0.15  # share of steps whose wrong sum is only in the input: verdict training
# Wrongly copied operands (previous sum or term) only in the input: the verdict learns to check the copies too. With
# 0.25 sum checks on top, half the training steps were `n` and the policy said `n` on 12% of right steps; with 0.15
# it does so on 4% (bench/experiments/README.md).
OPERAND_CHECK_RATE = 0.10
STEP_PATTERN = re.compile(r"^(\d+)\+(\d+)=(\d+) ([yn])$")


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


def padded(value: int) -> str:
    return f"{value:0{WIDTH}d}"


def corrupt(value: int, rng: random.Random) -> int:
    """A different number with the same padded width: one digit of `padded(value)` changed."""
    digits = list(padded(value))
    position = rng.randrange(len(digits))
    digits[position] = rng.choice([d for d in "0123456789" if d != digits[position]])
    return int("".join(digits))


def trace_segments(
    problem: Problem,
    rng: random.Random | None = None,
    slip_rate: float = 0.0,
    check_rate: float = 0.0,
    operand_check_rate: float = 0.0,
) -> list[tuple[str, bool]]:
    """(text, supervised) pieces of a trace: thinking (without `<think>`, with `</think>`) then the answer. Wrong
    steps: `slip_rate` wrong sums in the loss, `check_rate` wrong sums and `operand_check_rate` wrongly copied
    operands (the previous sum or the term; the sum is then right for the operands written) only in the input."""
    total, segments = problem.terms[0], []
    for term in problem.terms[1:]:
        draw = rng.random() if rng is not None else 1.0
        previous, written_term = total, term
        if slip_rate + check_rate <= draw < slip_rate + check_rate + operand_check_rate:
            if rng.random() < 0.5:
                previous = corrupt(total, rng)
            else:
                written_term = rng.choice([t for t in range(1, 10**DIGITS) if t != term])
        # a wrongly copied operand stays out of the loss; the sum of the operands written is supervised
        segments += [(padded(previous), previous == total), ("+", True), (str(written_term), written_term == term)]
        written, sum_in_loss = previous + written_term, True
        if draw < slip_rate + check_rate:
            written, sum_in_loss = corrupt(written, rng), draw < slip_rate
        right = (previous, written_term, written) == (total, term, total + term)
        segments += [("=", True), (padded(written), sum_in_loss), (f" {'y' if right else 'n'}{STEP}", True)]
        total = written  # a wrong step propagates: the answer depends on every step
    return segments + [("</think>", True), (str(total), True)]


def trace(problem: Problem, rng: random.Random | None = None, corrupt_rate: float = 0.0) -> tuple[str, str]:
    """(thinking, answer) of a trace whose steps are wrong at `corrupt_rate` (needs `rng`). The thinking excludes
    `<think>` (the chat template writes it) and includes `</think>`."""
    segments = trace_segments(problem, rng, slip_rate=corrupt_rate)
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]


def parse_steps(thinking: str) -> list[tuple[int, int, int, str]] | None:
    """[(a, b, sum, verdict)] of a thinking text (markers allowed), or None if it breaks the step format."""
    body = thinking.replace("<think>", "").split("</think>")[0]
    if not body.endswith(STEP):
        return None
    steps = []
    for chunk in body[: -len(STEP)].split(STEP):
        match = STEP_PATTERN.match(chunk)
        if match is None:
            return None
        a, b, c, verdict = match.groups()
        steps.append((int(a), int(b), int(c), verdict))
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
    """Diagnostics of a sampled thinking: wrong sums, wrong operands, and the verdicts."""
    steps = parse_steps(thinking)
    if steps is None or len(steps) != len(problem.terms) - 1:
        return None
    previous = [problem.terms[0]] + [c for _, _, c, _ in steps[:-1]]
    return {
        "wrong_sum": [a + b != c for a, b, c, _ in steps],
        "wrong_operand": [
            (a, b) != (p, t) for (a, b, *_), p, t in zip(steps, previous, problem.terms[1:], strict=True)
        ],
        "verdict_no": [v == "n" for *_, v in steps],
    }
