"""`python -m rlhf_ops.cli.train_ppo`: the RL loop on one machine (the options of `train_ppo_ray`)."""
from __future__ import annotations

from rlhf_ops.cli import run_stage
from rlhf_ops.config import parse_config
from rlhf_ops.rl.config import RLConfig

PROG = "python -m rlhf_ops.cli.train_ppo"


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(RLConfig, argv, prog=PROG)
    setup_logging()
    from rlhf_ops.trainers.rl import train_rl
    return run_stage(PROG, train_rl, cfg)


if __name__ == "__main__":
    main()
