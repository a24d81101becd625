"""`python -m rlhf_ops.cli.train_rm` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.trainers.rm import RMConfig

PROG = "python -m rlhf_ops.cli.train_rm"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, RMConfig, "rlhf_ops.trainers.rm:train_rm", argv)


if __name__ == "__main__":
    main()
