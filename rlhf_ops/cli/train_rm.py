"""`python -m rlhf_ops.cli.train_rm` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import run_stage
from rlhf_ops.config import parse_config
from rlhf_ops.trainers.rm import RMConfig

PROG = "python -m rlhf_ops.cli.train_rm"


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(RMConfig, argv, prog=PROG)
    setup_logging()
    from rlhf_ops.trainers.rm import train_rm
    return run_stage(PROG, train_rm, cfg)


if __name__ == "__main__":
    main()
