"""`python -m rlhf_ops.cli.train_dpo` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import run_stage
from rlhf_ops.config import parse_config
from rlhf_ops.trainers.dpo import DPOConfig

PROG = "python -m rlhf_ops.cli.train_dpo"


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(DPOConfig, argv, prog=PROG)
    setup_logging()
    from rlhf_ops.trainers.dpo import train_dpo
    return run_stage(PROG, train_dpo, cfg)


if __name__ == "__main__":
    main()
