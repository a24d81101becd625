"""An experimental reward for the built-in task with partial credit per verified step (issue 4 diagnostics).

    .venv/bin/python benchmarks/rl_estimators.py --extra "--reward_func benchmarks/step_credit_reward.py"

1.0 for a right final answer (as `rlhf_ops/rewards/arith.py`); otherwise 0.5 x (leading steps that
are right, checked against the question) / (steps the question needs), plus the 0.1 format bonus
when there is an "Answer:" line. Kept to reproduce the README's RL diagnostics: this denser reward
did not make RL beat SFT on the tiny preset.
"""
from __future__ import annotations

import re

from rlhf_ops.data.arith import extract_answer, is_correct
from rlhf_ops.rewards.arith import FORMAT_BONUS, completion_of

_QUESTION = re.compile(r"What is (.*?)\?")
_STEP = re.compile(r"^\s*(-?\d+) ([+*-]) (-?\d+) = (-?\d+)\s*$")


def verified_steps(question: str, completion: str) -> tuple[int, int]:
    """(leading steps of `completion` that are right for "a op b [op c]", steps needed)."""
    terms = question.split()
    nums, ops = [int(x) for x in terms[0::2]], terms[1::2]
    lines = [x for x in completion.strip().split("\n") if not x.startswith("Answer")]
    prev, ok = nums[0], 0
    for i, op in enumerate(ops):
        m = _STEP.match(lines[i]) if i < len(lines) else None
        if not m:
            break
        a, o, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if (a, o, b) != (prev, op, nums[i + 1]) or c != (a + b if o == "+" else a - b if o == "-" else a * b):
            break
        ok, prev = ok + 1, c
    return ok, len(ops)


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> dict:
    rewards, acc = [], []
    for q, p, label in zip(queries, prompts, labels):
        completion = completion_of(q, p)
        if is_correct(completion, str(label)):
            rewards.append(1.0)
            acc.append(1.0)
            continue
        found = _QUESTION.search(p)
        ok, n = verified_steps(found[1], completion) if found else (0, 1)
        rewards.append(0.5 * ok / n + (FORMAT_BONUS if extract_answer(completion) is not None else 0.0))
        acc.append(0.0)
    return {"rewards": rewards, "extra_logs": {"accuracy": acc}}
