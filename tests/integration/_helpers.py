"""Shared by the integration tests: subprocess environment, option dicts -> argv, tiny sizes."""
from __future__ import annotations

import os

TINY_SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """This process's environment minus torch.distributed variables, offline, one thread, CPU."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return env


def to_argv(opts: dict) -> list[str]:
    """{"flag": value} -> ["--flag", "value"]; True -> bare flag; None/False -> left out."""
    argv: list[str] = []
    for k, v in opts.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv
