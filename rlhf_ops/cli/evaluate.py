"""`python -m rlhf_ops.cli.evaluate`: score a pipeline run's models on its held-out prompts.

    python -m rlhf_ops.cli.evaluate --run_dir runs/tiny --output_dir runs/tiny/eval

Greedy accuracy and reward of base, sft and rl (`--models`), the RL-vs-SFT win rate judged by a
reward model (`--reward_pretrain`, default <run_dir>/rm when it exists) and KL(rl || sft); writes
metrics.json, report.md, curves.png and plots/*.csv (see `rlhf_ops.eval`). Exit code 2 with one
line naming the problem for bad options, a missing model directory, bad data or a broken reward function.
"""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.eval.config import EvalConfig

PROG = "python -m rlhf_ops.cli.evaluate"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, EvalConfig, "rlhf_ops.eval.run:evaluate", argv)


if __name__ == "__main__":
    main()
