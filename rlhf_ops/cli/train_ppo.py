"""`python -m rlhf_ops.cli.train_ppo`: the RL loop on one machine (the options of `train_ppo_ray`)."""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.rl.config import RLConfig

PROG = "python -m rlhf_ops.cli.train_ppo"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, RLConfig, "rlhf_ops.trainers.rl:train_rl", argv)


if __name__ == "__main__":
    main()
