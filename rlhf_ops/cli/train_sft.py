"""`python -m rlhf_ops.cli.train_sft` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.trainers.sft import SFTConfig

PROG = "python -m rlhf_ops.cli.train_sft"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, SFTConfig, "rlhf_ops.trainers.sft:train_sft", argv)


if __name__ == "__main__":
    main()
