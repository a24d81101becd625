"""`python -m rlhf_ops.cli.train_prm` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import run_stage
from rlhf_ops.config import parse_config
from rlhf_ops.trainers.prm import PRMConfig

PROG = "python -m rlhf_ops.cli.train_prm"


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(PRMConfig, argv, prog=PROG)
    setup_logging()
    from rlhf_ops.trainers.prm import train_prm
    return run_stage(PROG, train_prm, cfg)


if __name__ == "__main__":
    main()
