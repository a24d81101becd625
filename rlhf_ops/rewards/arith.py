"""Verifiable reward for the built-in arithmetic task (rlhf_ops.data.arith).

    reward_func(queries, prompts, labels) -> {"rewards": [...], "extra_logs": {"accuracy": [...]}}

Per sample, with completion = the query minus its prompt:
    1.0  the completion's last "Answer: N" equals the label (compared as integers);
    0.1  (FORMAT_BONUS) it has an "Answer: N" line but the number is wrong;
    0.0  no "Answer: N" line at all.
So the fraction of rewards equal to 1.0 is the accuracy; the bonus only nudges a policy that has
lost the answer format back towards it. A second metric, `verified`, is the fraction whose work
checks out too (`checks_out`: every step right): right answers reached by wrong steps are
frequent in a weak policy (39% of the tiny SFT model's right samples), and the reward still
pays for them. Pure Python, no torch: usable in any reward worker.
"""
from __future__ import annotations

from rlhf_ops.data.arith import checks_out, extract_answer, is_correct

FORMAT_BONUS = 0.1


def completion_of(query: str, prompt: str) -> str:
    """The generated part of `query`: what follows `prompt` (its last occurrence), else all of it."""
    if prompt and query.startswith(prompt):
        return query[len(prompt):]
    cut = query.rfind(prompt) if prompt else -1
    return query[cut + len(prompt):] if cut >= 0 else query


def score(completion: str, label: str) -> float:
    """The reward of one completion against its reference answer."""
    if is_correct(completion, label):
        return 1.0
    return FORMAT_BONUS if extract_answer(completion) is not None else 0.0


def rewards(queries: list[str], prompts: list[str], labels: list[str]) -> list[float]:
    """Rewards for a batch; the three lists are parallel."""
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries, prompts and labels differ in length: {len(queries)}, {len(prompts)}, {len(labels)}")
    return [score(completion_of(q, p), str(lab)) for q, p, lab in zip(queries, prompts, labels)]


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> dict:
    """The RL loop's entry point: rewards plus per-sample accuracy and verified work, logged as metrics."""
    r = rewards(queries, prompts, labels)
    verified = [float(x == 1.0 and checks_out(p, completion_of(q, p))) for x, q, p in zip(r, queries, prompts)]
    return {"rewards": r, "extra_logs": {"accuracy": [float(x == 1.0) for x in r], "verified": verified}}
