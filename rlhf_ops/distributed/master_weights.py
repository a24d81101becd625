"""fp32 master weights for a bf16 model trained in one process (`--bf16 --zero_stage 0`, world of one).

Adam's updates are ~lr (1e-5 .. 1e-4) while bf16 resolves only ~2^-8 of a weight's magnitude, so a
bf16 model is stepped through an fp32 copy: gradients accumulate in fp32, the optimizer steps the fp32
copy, and the bf16 weights are that copy rounded. DeepSpeed's BF16_Optimizer (ZeRO-1, what such a run
trained with before) does the same with the same arithmetic, but spends several small kernels and a
Python loop per parameter tensor per micro-batch and per step (the gradient copy-in, the norm, the
clip, the clearing), and keeps a bf16 gradient per parameter alive between micro-batches. On an H100
the trainer's step was 46 ms above the bare model step with it (benchmarks/results/gpu/README.md).

Here every optimizer group is one flat buffer: the bf16 weights become views into a flat bf16 tensor,
the optimizer steps one flat fp32 master per group with one flat fp32 gradient, and a step is the
norm and clip over the gradient views (foreach kernels), the optimizer, one copy back into the bf16
buffer and one zeroing. Each bf16 gradient is added into its fp32 slot by a hook the moment autograd
has accumulated it, and freed there, so no bf16 gradient outlives its backward.

The numbers are DeepSpeed's: the per-tensor L2 norms squared and summed, a non-finite norm skips the
step (no optimizer or scheduler step, gradients dropped), clipping by min(1, max_norm / (norm + 1e-6)),
the same torch optimizer on the same flat fp32 values, round-to-nearest back to bf16
(`tests/unit/test_master_weights.py` checks bitwise equality with DeepSpeed's engine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlatGroup:
    """One optimizer group: its bf16 parameters as views of `lp_N`, their fp32 master `hp_N`, whose
    `.grad` is the flat fp32 gradient that `grads` (one view per parameter, shaped like it) slice."""
    params: list[torch.nn.Parameter]
    lp_N: torch.Tensor
    hp_N: torch.Tensor
    grads: list[torch.Tensor]


def _flatten(params: list[torch.nn.Parameter]) -> FlatGroup:
    sizes = [p.numel() for p in params]
    lp_N = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, lp_N.split(sizes)):
        p.data = view.view_as(p)  # the module's weights now live in the flat buffer
    hp_N = lp_N.float().requires_grad_()  # a leaf the optimizer steps; never part of a graph
    hp_N.grad = torch.zeros_like(hp_N)
    grads = [g.view_as(p) for p, g in zip(params, hp_N.grad.split(sizes))]
    return FlatGroup(params, lp_N, hp_N, grads)


class MasterWeights:
    """Rewires `optimizer` (built over a model's bf16 parameters) to step flat fp32 masters instead,
    as DeepSpeed's BF16_Optimizer rewires the optimizer it is given."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm
        self.groups: list[FlatGroup] = []
        for group in optimizer.param_groups:
            if any(p.dtype != torch.bfloat16 for p in group["params"]):
                raise ValueError("MasterWeights takes bf16 parameters only")
            flat = _flatten(list(group["params"]))
            for p, grad in zip(flat.params, flat.grads):
                p.register_post_accumulate_grad_hook(_move_grad_into(grad))
            group["params"] = [flat.hp_N]
            self.groups.append(flat)
        self.grads = [g for flat in self.groups for g in flat.grads]
        self.skipped_steps = 0

    def fp32_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """`p`'s fp32 master, shaped like it (a view: DeepSpeed's `safe_get_full_fp32_param`)."""
        for flat in self.groups:
            offset = 0
            for q in flat.params:
                if q is p:
                    return flat.hp_N[offset:offset + p.numel()].view_as(p)
                offset += q.numel()
        raise KeyError("not a parameter these master weights hold")

    @torch.no_grad()
    def step(self) -> bool:
        """Norm, clip, optimizer step, bf16 weights refreshed, gradients zeroed. False where the
        gradient norm was not finite and the step was skipped (its gradients dropped)."""
        from rlhf_ops.distributed.engine import clip_grad_norm, global_grad_norm

        norm = global_grad_norm(self.grads)
        finite = bool(torch.isfinite(norm))  # the one host sync per step, as DeepSpeed's overflow check
        if finite:
            if self.max_norm > 0:
                clip_grad_norm(self.grads, self.max_norm, norm)
            self.optimizer.step()
            for flat in self.groups:
                flat.lp_N.copy_(flat.hp_N)
        else:
            self.skipped_steps += 1
        for flat in self.groups:
            flat.hp_N.grad.zero_()
        return finite

    def state_dict(self) -> dict:
        return {"hp": [flat.hp_N.detach().clone() for flat in self.groups], "skipped_steps": self.skipped_steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The fp32 masters as saved (the bf16 weights alone would lose their low bits), then the bf16
        weights rounded from them."""
        if len(state["hp"]) != len(self.groups) or any(
                s.shape != flat.hp_N.shape for s, flat in zip(state["hp"], self.groups)):
            raise ValueError(f"fp32 master weights of shapes {[tuple(s.shape) for s in state['hp']]} do not fit "
                             f"this model's {[tuple(f.hp_N.shape) for f in self.groups]}")
        for saved, flat in zip(state["hp"], self.groups):
            flat.hp_N.copy_(saved)
            flat.lp_N.copy_(flat.hp_N)
        self.skipped_steps = state["skipped_steps"]


def _move_grad_into(grad: torch.Tensor):
    """A post-accumulate-grad hook: add the parameter's bf16 gradient into its fp32 slot, then free it."""
    def hook(p: torch.nn.Parameter) -> None:
        with torch.no_grad():
            grad.add_(p.grad)
        p.grad = None
    return hook
