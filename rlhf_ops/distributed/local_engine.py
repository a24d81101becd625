"""The training engine for a world of one at ZeRO-0, in fp32 or bf16, without importing DeepSpeed.

In that setting DeepSpeed's engine does nothing that torch does not: there is no peer to all-reduce
with (`create_engine` already turned that off), no partition, no loss scaling, and the gradient
clipping runs in `engine.Engine`. What is left is the loss / gradient-accumulation-steps scaling,
the optimizer and scheduler steps at each accumulation boundary, and checkpoints. Importing
DeepSpeed for that costs ~20 MB of private memory per process (its ~420 modules; measured with
transformers already loaded), about what the tiny CPU benchmarks' peak is above TRL's
(benchmarks/trl_compare.py), plus its import time at every stage start.

`LocalEngine` has the part of `deepspeed.DeepSpeedEngine`'s interface this project calls, with the
same arithmetic, so losses and weights are bitwise those of the DeepSpeed engine
(`tests/unit/test_local_engine.py`). A bf16 model steps through fp32 master weights
(`master_weights.MasterWeights`), as DeepSpeed's BF16_Optimizer at ZeRO-1 does, which is what
`--bf16 --zero_stage 0` otherwise trains with (`engine.train_stage`). Its checkpoint is one file per
engine, written atomically; DeepSpeed's checkpoints and these are not interchangeable, and a resume
that finds the other kind says so. `RLHF_OPS_LOCAL_ENGINE=0` keeps DeepSpeed's engine (A/B runs).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rlhf_ops.config import ConfigError

ENV = "RLHF_OPS_LOCAL_ENGINE"
STATE_FILE = "local_engine_states.pt"


def wanted() -> bool:
    return os.environ.get(ENV, "1") != "0"


class LocalEngine(torch.nn.Module):
    """DeepSpeedEngine's training calls (forward, backward, step, get_lr, checkpoints) for one process."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                 grad_accum: int, device: torch.device | str, master_weights_max_norm: float | None = None):
        """`master_weights_max_norm`: not None for a bf16 model, which then steps fp32 master weights and
        clips their gradients to that norm (0: no clipping)."""
        super().__init__()
        self.module = model.to(device)
        self.optimizer = optimizer
        self.master = None
        if master_weights_max_norm is not None:
            from rlhf_ops.distributed.master_weights import MasterWeights
            self.master = MasterWeights(optimizer, master_weights_max_norm)
        self.lr_scheduler = lr_scheduler
        self.grad_accum = grad_accum
        self.micro_steps = 0
        self.global_steps = 0

    def __getattr__(self, name: str) -> Any:
        """The wrapped model's attributes, as DeepSpeedEngine gives them (`peft_config`, `config`, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.grad_accum

    def zero_optimization_stage(self) -> int:
        return 0

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Scale by 1 / accumulation steps and backpropagate, as DeepSpeed does."""
        loss = loss / self.grad_accum
        loss.backward()
        return loss

    def step(self) -> None:
        """At an accumulation boundary: optimizer step, gradients dropped, scheduler step (with fp32
        master weights: no optimizer or scheduler step where the gradient norm was not finite)."""
        if self.is_gradient_accumulation_boundary():
            if self.master is not None:
                applied = self.master.step()
            else:
                self.optimizer.step()
                for p in self.module.parameters():
                    p.grad = None
                applied = True
            if self.lr_scheduler is not None and applied:
                self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = False) -> None:
        """Weights, optimizer, scheduler, counters and `client_state` in `save_dir/tag/` (one file in a
        directory built beside it and swapped in whole)."""
        from rlhf_ops.utils.atomic import atomic_dir

        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "micro_steps": self.micro_steps, "global_steps": self.global_steps,
                 "grad_accum": self.grad_accum, "client_state": dict(client_state or {}),
                 "master": self.master.state_dict() if self.master is not None else None}
        with atomic_dir(Path(save_dir) / tag) as tmp:
            torch.save(state, tmp / STATE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        **_: Any) -> tuple[str, dict]:
        """Restore what `save_checkpoint` wrote; returns (path, client_state) like DeepSpeed."""
        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            other = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
            raise ConfigError(
                f"checkpoint {path.parent}: no {STATE_FILE}"
                + (f" (it holds DeepSpeed's files {other[:3]}: it was written with other --zero_stage/--bf16 "
                   f"flags or more processes, or with {ENV}=0; resume with those)" if other else ""))
        state = torch.load(path, map_location=self.device, weights_only=False)
        if (self.master is None) != (state.get("master") is None):
            raise ConfigError(f"checkpoint {path.parent}: written by a "
                              f"{'bf16' if state.get('master') is not None else 'fp32'} run; resume it with "
                              f"{'--bf16' if state.get('master') is not None else 'no --bf16'}")
        self.module.load_state_dict(state["module"], strict=load_module_strict)
        if self.master is not None:
            self.master.load_state_dict(state["master"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        return str(path.parent), state["client_state"]
