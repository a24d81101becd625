"""The built-in verifiable task: short multi-step integer arithmetic with a step-by-step solution.

    question: "What is 47 + 38 - 19?"
    solution: "47 + 38 = 85\\n85 - 19 = 66\\nAnswer: 66"

Why this task: every answer is checkable by a regex (so RL needs no learned reward model), wrong
solutions with a known first wrong step are cheap to make (preference and PRM negatives), and a
~1M-parameter model trained for a few CPU minutes learns it only partly: 2-operand sums come
first, 3-operand chains and products later, which leaves RL room to improve.

Difficulties: "easy" (a ± b), "medium" (a ± b ± c), "hard" (a * b ± c, b one digit), "mixed"
(one third each). `*` only ever appears as the first operation, so left-to-right evaluation
agrees with operator precedence. Every intermediate value is >= 0. Everything is driven by a
seeded `random.Random`, so the same (n, seed, difficulty) always gives the same problems.
"""
from __future__ import annotations

import dataclasses
import random
import re

DIFFICULTIES = ("easy", "medium", "hard", "mixed")
_ANSWER_RE = re.compile(r"Answer\s*:\s*([+-]?\d+)")


@dataclasses.dataclass
class Problem:
    """One question, its one-operation-per-line steps ("47 + 38 = 85") and the final answer."""

    question: str
    steps: list[str]
    answer: str

    @property
    def solution(self) -> str:
        """The SFT target: the steps, then "Answer: N"."""
        return format_solution(self.steps, self.answer)


def format_solution(steps: list[str], answer: str) -> str:
    return "\n".join([*steps, f"Answer: {answer}"])


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _number(rng: random.Random, hi: int = 99) -> int:
    """A 1-digit number 30% of the time, otherwise a 2-digit one (capped at `hi`)."""
    if hi < 10 or rng.random() < 0.3:
        return rng.randint(1, min(9, hi))
    return rng.randint(10, hi)


def _operand(rng: random.Random, value: int, op: str) -> int:
    """A right-hand operand for `value op ?` that keeps the result >= 0."""
    if op == "*":
        return rng.randint(2, 9)
    if op == "-":
        return _number(rng, hi=min(value, 99))
    return _number(rng)


def _ops(rng: random.Random, difficulty: str) -> list[str]:
    if difficulty == "mixed":
        difficulty = rng.choice(("easy", "medium", "hard"))
    if difficulty == "easy":
        return [rng.choice("+-")]
    if difficulty == "medium":
        return [rng.choice("+-"), rng.choice("+-")]
    return ["*", rng.choice("+-")]


def make_problem(rng: random.Random, difficulty: str = "mixed") -> Problem:
    """One random problem of the given difficulty."""
    ops = _ops(rng, difficulty)
    value = _number(rng)
    terms, steps = [str(value)], []
    for op in ops:
        op = "+" if op == "-" and value == 0 else op
        b = _operand(rng, value, op)
        new = _apply(value, op, b)
        steps.append(f"{value} {op} {b} = {new}")
        terms += [op, str(b)]
        value = new
    return Problem(question=f"What is {' '.join(terms)}?", steps=steps, answer=str(value))


def make_problems(n: int, seed: int, difficulty: str = "mixed") -> list[Problem]:
    """`n` distinct (by question) problems, deterministic in (n, seed, difficulty).

    The sequence is a prefix-stable stream: make_problems(k, s) == make_problems(n, s)[:k] for
    k <= n, so slicing one call into disjoint splits keeps train and eval apart.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot make {n} distinct {difficulty!r} problems (ran out of new questions)")
        p = make_problem(rng, difficulty)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _parse_step(step: str) -> tuple[int, str, int]:
    lhs = step.split(" = ")[0].split()
    return int(lhs[0]), lhs[1], int(lhs[2])


def _slip(rng: random.Random, true: int) -> list[int]:
    """Plausible wrong results for a step whose right result is `true`, best guesses first."""
    deltas = [1, -1, 10, -10, 2, -2]
    rng.shuffle(deltas)
    cands = [true + d for d in deltas]
    s = str(true)
    if len(s) >= 2 and s[-1] != s[-2]:  # swapped last two digits
        cands.insert(rng.randint(0, len(cands)), int(s[:-2] + s[-1] + s[-2]))
    return [c for c in cands if c != true and c >= 0] + [true + 1]


def corrupt_solution(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    """A wrong solution: one arithmetic slip at a random step, carried through the later steps.

    Returns (steps, index of the first wrong step). The later steps are computed correctly from
    the wrong value, so the final answer (last step's result) is wrong as well. Operands shown
    in each step stay the ones from the question up to the slip.
    """
    parsed = [_parse_step(s) for s in problem.steps]
    bad = rng.randrange(len(parsed))
    for wrong in _slip(rng, _apply(*parsed[bad])):
        steps, value = list(problem.steps[:bad]), None
        for i, (a, op, b) in enumerate(parsed[bad:], start=bad):
            a = a if value is None else value
            value = wrong if i == bad else _apply(a, op, b)
            steps.append(f"{a} {op} {b} = {value}")
        if value >= 0 and str(value) != problem.answer:
            return steps, bad
    raise AssertionError("unreachable: +1 always gives a wrong non-negative answer")


def final_value(steps: list[str]) -> str:
    """The result of the last step ("85 - 19 = 66" -> "66")."""
    return steps[-1].rsplit("=", 1)[1].strip()


def _normalize(number: str) -> str | None:
    try:
        return str(int(number.strip()))
    except ValueError:
        return None


def extract_answer(text: str) -> str | None:
    """The number on the last "Answer: N" in `text` ("066" -> "66"), or None when there is none."""
    matches = _ANSWER_RE.findall(text or "")
    return _normalize(matches[-1]) if matches else None


def is_correct(completion: str, label: str) -> bool:
    """Whether the completion's final "Answer: N" equals `label` (as integers)."""
    got = extract_answer(completion)
    return got is not None and got == _normalize(str(label))
