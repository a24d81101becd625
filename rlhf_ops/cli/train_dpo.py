"""`python -m rlhf_ops.cli.train_dpo` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.trainers.dpo import DPOConfig

PROG = "python -m rlhf_ops.cli.train_dpo"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, DPOConfig, "rlhf_ops.trainers.dpo:train_dpo", argv)


if __name__ == "__main__":
    main()
