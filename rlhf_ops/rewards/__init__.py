"""Rule-based reward functions for RL, one module per task.

Each module exposes `reward_func(queries, prompts, labels) -> list[float]` (the signature of a
custom reward file): `queries` are prompt + completion texts, `prompts` the prompts they start
with, `labels` the reference answers from the prompt dataset's "label" key.
"""
