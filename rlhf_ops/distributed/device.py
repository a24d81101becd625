"""Where models run: the accelerator of this process, a model's device, and `--ref_reward_offload`.

A DeepSpeed engine moves its trained model to the accelerator; the frozen reference and reward
models are plain modules and are moved here. With `--ref_reward_offload` they stay in host memory
and visit the accelerator only for their forwards (`resident`), which frees its memory for the
trained models between uses at the price of two copies per use. On a machine without GPUs the
accelerator is the CPU and all of this is a no-op.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def accelerator() -> torch.device:
    """This process's GPU (Ray and torchrun make it the current device), or the CPU."""
    from rlhf_ops.distributed.engine import on_gpu

    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def param_device(model: torch.nn.Module) -> torch.device:
    """The device of `model`'s first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@contextmanager
def resident(model: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """`model` on `device` for the block and back in host memory after it, also when the block raises.
    A no-op when `device` is the CPU."""
    if torch.device(device).type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
