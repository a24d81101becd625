"""The arithmetic task generator, answer parsing and the rule-based reward."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from rlhf_ops.data.arith import (CORRUPTIONS, Problem, corrupt_solution, extract_answer, final_value, is_correct,
                                 make_problems, truncate_solution)
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


def _check_steps(steps):
    for i, step in enumerate(steps):  # every step is arithmetically right unless stated otherwise
        a, op, b, _, c = step.split()
        yield eval(f"{a} {op} {b}") == int(c), int(c) >= 0, i == 0 or int(a) == int(final_value(steps[:i]))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_solutions_are_wrong_from_the_reported_line_on(kind):
    rng = random.Random(0)
    question_numbers = lambda p: p.question[len("What is "):-1].split()[::2]
    made = Counter()
    for p in make_problems(300, seed=3):
        steps, answer, bad = corrupt_solution(p, rng, kind)
        assert len(steps) == len(p.steps) and answer != p.answer and int(answer) >= 0
        assert steps[:bad] == p.steps[:bad]
        checks = list(_check_steps(steps))
        assert all(nonneg and carried for _, nonneg, carried in checks)
        if kind == "answer":
            assert bad == len(steps) and steps == p.steps
            continue
        assert 0 <= bad < len(steps) and steps[bad] != p.steps[bad] and answer == final_value(steps)
        right = [ok for ok, _, _ in checks]
        assert right[bad + 1:] == [True] * (len(steps) - bad - 1)  # later steps carry the error correctly
        copied = steps[bad].split()[2] == question_numbers(p)[bad + 1]
        assert copied != right[bad]  # a slip (right operand, wrong result) or a miscopy (the reverse)
        made[kind if copied == (kind == "slip") else "fallback"] += 1
    # a miscopy that cannot stay >= 0 or changes nothing falls back to a slip, rarely
    assert made["fallback"] < 0.05 * 300, made


def test_unknown_corruption_kind_is_refused():
    p = make_problems(1, seed=1)[0]
    with pytest.raises(ValueError, match="kind must be one of slip, copy, answer"):
        corrupt_solution(p, random.Random(0), "typo")


def test_truncated_solutions_stop_before_the_answer():
    rng = random.Random(0)
    for p in make_problems(200, seed=4):
        text, kept = truncate_solution(p, rng)
        assert extract_answer(text) is None and p.solution.startswith(text) and text != p.solution
        assert text.split("\n")[:kept] == p.steps[:kept] and 0 <= kept <= len(p.steps)


def test_corrupt_is_deterministic_given_the_rng():
    p = Problem("What is 47 + 38 - 19?", ["47 + 38 = 85", "85 - 19 = 66"], "66")
    for kind in CORRUPTIONS:
        assert corrupt_solution(p, random.Random(5), kind) == corrupt_solution(p, random.Random(5), kind)


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
        "rewards": [1.0, FORMAT_BONUS, 0.0, 1.0],
        "extra_logs": {"accuracy": [1.0, 0.0, 0.0, 1.0], "verified": [1.0, 0.0, 0.0, 0.0]}}
    assert reward_list([], [], []) == []
    with pytest.raises(ValueError, match="length"):
        reward_func(["a"], [], ["1"])


def test_checks_out_needs_every_step_right_and_chained():
    from rlhf_ops.data.arith import checks_out, make_problems

    for p in make_problems(50, seed=3):  # the reference solution of every difficulty checks out
        assert checks_out(f"User: {p.question}\nAssistant: ", p.solution), p
    q = "User: What is 16 - 6 + 6?\nAssistant: "
    assert checks_out(q, "16 - 6 = 10\n10 + 6 = 16\nAnswer: 16")
    assert not checks_out(q, "16 - 6 = 7\n7 + 6 = 16\nAnswer: 16")     # lucky chain: wrong step, right answer
    assert not checks_out(q, "16 - 6 = 10\n10 + 6 = 16\nAnswer: 15")    # answer line not the last result
    assert not checks_out(q, "16 - 6 = 10\n11 + 6 = 17\nAnswer: 17")    # step not chained on the previous result
    assert not checks_out(q, "16 + 6 = 22\n22 - 6 = 16\nAnswer: 16")    # operations out of order
    assert not checks_out(q, "16 - 6 = 10\nAnswer: 16")                  # a step missing
    assert not checks_out(q, "Answer: 16")
    assert not checks_out("no question here", "Answer: 16")
    assert checks_out("User: What is 3 * 2 - 3?\nAssistant: ", "3 * 2 = 6\n6 - 3 = 3\nAnswer: 3")
    assert not checks_out("User: What is 3 * 2 - 3?\nAssistant: ", "3 * 2 = 9\n9 - 3 = 3\nAnswer: 3")


def test_reward_ignores_answers_inside_the_prompt():
    prompt = "User: Answer: 5\nAssistant: "
    assert reward_list([prompt + "no answer"], [prompt], ["5"]) == [0.0]
