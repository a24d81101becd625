"""The built-in verifiable task: short multi-step integer arithmetic with a step-by-step solution.

    question: "What is 47 + 8 - 9?"
    solution: "47 + 8 = 55\n55 - 9 = 46\nAnswer: 46"

Why this task: every answer is checkable by a regex (so RL needs no learned reward model), wrong
solutions with a known first wrong step are cheap to make (preference and PRM negatives), and a
~1M-parameter model learns it in a CPU budget (10 SFT epochs, ~8 min: 0.87 greedy accuracy on
clean demonstrations). RL's room comes from the demonstrations' own slips (`prepare --sft_noise`).
The operand ranges are tuned for that budget (see docs/data_layout.md): mostly
one-digit right-hand operands, so the model first learns to copy the operands and the one-digit
tables, solves many "easy" problems, fewer "medium" chains and few "hard" products.

Difficulties: "easy" (a ± b), "medium" (a ± b ± c), "hard" (a * b ± c, a and b one digit),
"mixed" (50% easy, 30% medium, 20% hard). In easy and medium problems the first number has one
digit half the time and every later one 80% of the time; in hard ones the number after the
product has one digit half the time. Other numbers have 2 digits. `*` only ever appears as the
first operation, so left-to-right evaluation agrees with operator precedence. Every
intermediate value is >= 0. Everything is driven by a seeded `random.Random`, so the same
(n, seed, difficulty) always gives the same problems.
"""
from __future__ import annotations

import dataclasses
import random
import re

DIFFICULTIES = ("easy", "medium", "hard", "mixed")
MIX_WEIGHTS = {"easy": 5, "medium": 3, "hard": 2}  # of "mixed"
# probability that a number is one digit (else two), for the first number / every later one
ONE_DIGIT_SHARE = {"easy": (0.5, 0.8), "medium": (0.5, 0.8), "hard": (1.0, 0.5)}
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


def _number(rng: random.Random, one_digit: float, hi: int = 99) -> int:
    """A 1-digit number with probability `one_digit`, otherwise a 2-digit one (capped at `hi`)."""
    if hi < 10 or rng.random() < one_digit:
        return rng.randint(1, min(9, hi))
    return rng.randint(10, hi)


def _operand(rng: random.Random, value: int, op: str, one_digit: float) -> int:
    """A right-hand operand for `value op ?` that keeps the result >= 0."""
    if op == "*":
        return rng.randint(2, 9)
    if op == "-":
        return _number(rng, one_digit, hi=min(value, 99))
    return _number(rng, one_digit)


def _level(rng: random.Random, difficulty: str) -> str:
    if difficulty != "mixed":
        return difficulty
    return rng.choices(list(MIX_WEIGHTS), weights=list(MIX_WEIGHTS.values()))[0]


def _ops(rng: random.Random, level: str) -> list[str]:
    if level == "easy":
        return [rng.choice("+-")]
    if level == "medium":
        return [rng.choice("+-"), rng.choice("+-")]
    return ["*", rng.choice("+-")]


def make_problem(rng: random.Random, difficulty: str = "mixed") -> Problem:
    """One random problem of the given difficulty."""
    level = _level(rng, difficulty)
    ops = _ops(rng, level)
    first_share, rest_share = ONE_DIGIT_SHARE[level]
    value = _number(rng, first_share)
    terms, steps = [str(value)], []
    for op in ops:
        op = "+" if op == "-" and value == 0 else op
        b = _operand(rng, value, op, rest_share)
        new = _apply(value, op, b)
        steps.append(f"{value} {op} {b} = {new}")
        terms += [op, str(b)]
        value = new
    return Problem(question=f"What is {' '.join(terms)}?", steps=steps, answer=str(value))


def make_problems(n: int, seed: int | str, difficulty: str = "mixed") -> list[Problem]:
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


CORRUPTIONS = ("slip", "copy", "answer")


def _carry(problem: Problem, parsed: list[tuple[int, str, int]], bad: int, first: tuple[int, int]) -> list[str]:
    """The steps with step `bad` rewritten as (right operand, result) = `first` and every later
    step computed correctly from the value it carries."""
    steps, value = list(problem.steps[:bad]), None
    for i, (a, op, b) in enumerate(parsed[bad:], start=bad):
        a = a if value is None else value
        b, value = first if i == bad else (b, _apply(a, op, b))
        steps.append(f"{a} {op} {b} = {value}")
    return steps


def _copy_candidates(rng: random.Random, op: str, b: int) -> list[int]:
    """Miscopied right-hand operands for `? op b`: a digit off, or digits swapped."""
    cands = [b + d for d in (1, -1, 2, -2, 10, -10)]
    rng.shuffle(cands)
    if b >= 10 and b % 10 != b // 10:
        cands.insert(0, int(str(b)[::-1]))
    low = 2 if op == "*" else 1
    return [c for c in cands if c != b and c >= low and (op != "*" or c <= 9)]


def corrupt_solution(problem: Problem, rng: random.Random, kind: str = "slip") -> tuple[list[str], str, int]:
    """A wrong solution of one of three `kind`s, as (steps, final answer, index of the first wrong line).

    * "slip": one arithmetic slip at a random step (its result is off), carried through the later
      steps, which are computed correctly from the wrong value;
    * "copy": one step copies its right-hand operand wrongly from the question ("47 + 8" written
      "47 + 9"), computes that correctly and carries the wrong value on;
    * "answer": every step is right but the "Answer:" line (index len(steps)) states another number.

    The final answer is wrong in every kind. Why several kinds: a reward model the size of the tiny
    one cannot re-check every sum, but it can learn to compare copied numbers, so the preference
    and PRM data hold errors of graded difficulty, as real ones do.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {', '.join(CORRUPTIONS)}, got {kind!r}")
    parsed = [_parse_step(s) for s in problem.steps]
    if kind == "answer":
        wrong = next(c for c in _slip(rng, int(problem.answer)))
        return list(problem.steps), str(wrong), len(problem.steps)
    bad = rng.randrange(len(parsed))
    a, op, b = parsed[bad]
    if kind == "copy":
        firsts = [(c, _apply(a, op, c)) for c in _copy_candidates(rng, op, b)]
    else:
        firsts = [(b, w) for w in _slip(rng, _apply(a, op, b))]
    for first in firsts:
        steps = _carry(problem, parsed, bad, first)
        value = final_value(steps)
        if int(value) >= 0 and value != problem.answer and all(int(s.rsplit("=", 1)[1]) >= 0 for s in steps):
            return steps, value, bad
    return corrupt_solution(problem, rng, "slip" if kind == "copy" else "answer")


def truncate_solution(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """The solution cut off before its "Answer:" line, as a generation that ran out of tokens:
    (text, number of lines kept whole). Half the time the last kept step also loses its result
    ("47 + 8 =")."""
    keep = rng.randint(1, len(problem.steps))
    lines = list(problem.steps[:keep])
    if rng.random() < 0.5:
        lines[-1] = lines[-1].rsplit(" ", 1)[0]
        keep -= 1
    return "\n".join(lines), keep


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


_QUESTION_RE = re.compile(r"What is ([0-9+*\- ]+)\?")
_STEP_RE = re.compile(r"^\s*(\d+) ([+*-]) (\d+) = (\d+)\s*$")


def checks_out(prompt: str, completion: str) -> bool:
    """Whether the completion's work is right, not only its answer: one line per operation of the
    question in `prompt`, each "a op b = c" with a the previous result (the question's first number
    at first), op and b the question's next operation, c = a op b, then "Answer: " the last result.

    A right answer reached by wrong steps ("16 - 6 = 7\n7 + 6 = 16\nAnswer: 16") fails: an outcome
    reward pays for such lucky chains, and they teach wrong facts (see README, RL diagnostics).
    """
    q = _QUESTION_RE.search(prompt or "")
    if not q:
        return False
    terms = q[1].split()
    if len(terms) < 3 or len(terms) % 2 == 0:
        return False
    nums, ops = [int(x) for x in terms[0::2]], terms[1::2]
    lines = [x for x in (completion or "").strip().split("\n") if x.strip()]
    if len(lines) != len(ops) + 1:
        return False
    value = nums[0]
    for op, b, line in zip(ops, nums[1:], lines):
        m = _STEP_RE.match(line)
        if not m or (int(m[1]), m[2], int(m[3])) != (value, op, b) or int(m[4]) != _apply(value, op, b):
            return False
        value = int(m[4])
    return extract_answer(lines[-1]) == str(value) and lines[-1].strip().startswith("Answer")


def is_correct(completion: str, label: str) -> bool:
    """Whether the completion's final "Answer: N" equals `label` (as integers)."""
    got = extract_answer(completion)
    return got is not None and got == _normalize(str(label))
