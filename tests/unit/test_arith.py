"""The arithmetic task generator, answer parsing and the rule-based reward."""
from __future__ import annotations

import random
import re

import pytest

from rlhf_ops.data.arith import (Problem, corrupt_solution, extract_answer, final_value, is_correct,
                                 make_problems)
from rlhf_ops.rewards.arith import FORMAT_BONUS, reward_func, rewards as reward_list


def _eval_steps(steps: list[str]) -> None:
    """Each step is one correct operation on the previous step's result."""
    for i, step in enumerate(steps):
        a, op, b, eq, c = step.split()
        assert eq == "=" and op in "+-*"
        assert eval(f"{a} {op} {b}") == int(c), step
        if i:
            assert int(a) == int(final_value(steps[:i]))


def test_problems_are_deterministic_distinct_and_well_formed():
    ps = make_problems(500, seed=7)
    assert ps == make_problems(500, seed=7)
    assert ps != make_problems(500, seed=8)
    assert make_problems(100, seed=7) == ps[:100]  # prefix-stable
    assert len({p.question for p in ps}) == 500
    for p in ps:
        assert len(p.question) < 60 and len(p.solution) < 120
        assert eval(p.question.removeprefix("What is ").rstrip("?")) == int(p.answer)
        assert all(1 <= len(n) <= 2 for n in re.findall(r"\d+", p.question))
        _eval_steps(p.steps)
        assert final_value(p.steps) == p.answer and int(p.answer) >= 0
        assert p.solution.endswith(f"\nAnswer: {p.answer}")
    assert {len(p.steps) for p in ps} == {1, 2}
    assert any("*" in p.question for p in ps) and any("-" in p.question for p in ps)


@pytest.mark.parametrize("difficulty,steps,has_mul", [("easy", 1, False), ("medium", 2, False), ("hard", 2, True)])
def test_difficulties(difficulty, steps, has_mul):
    for p in make_problems(50, seed=1, difficulty=difficulty):
        assert len(p.steps) == steps and ("*" in p.question) == has_mul
    with pytest.raises(ValueError, match="difficulty"):
        make_problems(1, seed=1, difficulty="insane")


def test_corrupted_solutions_are_wrong_from_the_reported_step_on():
    rng = random.Random(0)
    for p in make_problems(300, seed=3):
        steps, bad = corrupt_solution(p, rng)
        assert len(steps) == len(p.steps) and 0 <= bad < len(steps)
        assert steps[:bad] == p.steps[:bad] and steps[bad] != p.steps[bad]
        a, op, b, _, c = steps[bad].split()
        assert eval(f"{a} {op} {b}") != int(c)  # the slip
        for i in range(bad + 1, len(steps)):  # later steps carry the wrong value correctly
            a, op, b, _, c = steps[i].split()
            assert eval(f"{a} {op} {b}") == int(c) and int(a) == int(final_value(steps[:i]))
        assert final_value(steps) != p.answer and int(final_value(steps)) >= 0


def test_corrupt_is_deterministic_given_the_rng():
    p = Problem("What is 47 + 38 - 19?", ["47 + 38 = 85", "85 - 19 = 66"], "66")
    assert corrupt_solution(p, random.Random(5)) == corrupt_solution(p, random.Random(5))


@pytest.mark.parametrize("text,expected", [
    ("47 + 38 = 85\n85 - 19 = 66\nAnswer: 66", "66"),
    ("Answer:66", "66"),
    ("Answer :   66  \n", "66"),
    ("Answer: 12\nAnswer: 13", "13"),  # the last one counts
    ("Answer: -4", "-4"),
    ("Answer: 007", "7"),
    ("85 - 19 = 66", None),
    ("Answer: sixty", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("47 + 38 = 85\n85 - 19 = 66\nAnswer: 66", "66")
    assert is_correct("Answer: 66<eos>", " 66 ")
    assert not is_correct("Answer: 67", "66")
    assert not is_correct("66", "66")  # no Answer line
    assert not is_correct("Answer: 66", "not a number")


def test_reward_func():
    prompt = "User: What is 47 + 38 - 19?\nAssistant: "
    queries = [prompt + "47 + 38 = 85\n85 - 19 = 66\nAnswer: 66",
               prompt + "47 + 38 = 84\n84 - 19 = 65\nAnswer: 65",
               prompt + "I don't know",
               "<s>" + prompt + "Answer: 66"]  # prompt not at the start: cut after it
    rewards = reward_list(queries, [prompt] * 4, ["66"] * 4)
    assert rewards == [1.0, FORMAT_BONUS, 0.0, 1.0]
    assert all(isinstance(r, float) for r in rewards)
    assert reward_func(queries, [prompt] * 4, ["66"] * 4) == {
        "rewards": [1.0, FORMAT_BONUS, 0.0, 1.0], "extra_logs": {"accuracy": [1.0, 0.0, 0.0, 1.0]}}
    assert reward_list([], [], []) == []
    with pytest.raises(ValueError, match="length"):
        reward_func(["a"], [], ["1"])


def test_reward_ignores_answers_inside_the_prompt():
    prompt = "User: Answer: 5\nAssistant: "
    assert reward_list([prompt + "no answer"], [prompt], ["5"]) == [0.0]
