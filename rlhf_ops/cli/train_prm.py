"""`python -m rlhf_ops.cli.train_prm` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.cli import stage_main
from rlhf_ops.trainers.prm import PRMConfig

PROG = "python -m rlhf_ops.cli.train_prm"


def main(argv: list[str] | None = None) -> dict:
    return stage_main(PROG, PRMConfig, "rlhf_ops.trainers.prm:train_prm", argv)


if __name__ == "__main__":
    main()
