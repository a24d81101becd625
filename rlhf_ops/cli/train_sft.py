"""`python -m rlhf_ops.cli.train_sft` (also under `deepspeed --module` and `torchrun`)."""
from __future__ import annotations

from rlhf_ops.config import parse_config
from rlhf_ops.trainers.sft import SFTConfig


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(SFTConfig, argv, prog="python -m rlhf_ops.cli.train_sft")
    setup_logging()
    from rlhf_ops.trainers.sft import train_sft
    return train_sft(cfg)


if __name__ == "__main__":
    main()
