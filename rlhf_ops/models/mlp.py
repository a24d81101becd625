"""Llama's SwiGLU MLP, `down(silu(gate(x)) * up(x))`, as one autograd node that keeps 2 of its 4 activations.

Autograd keeps four [rows, intermediate] tensors per MLP for the backward: gate(x) for SiLU, silu(gate(x))
and up(x) for the product, and the product for down's weight gradient. They are most of a decoder
layer's activations (intermediate is ~2.7-3.5x hidden in Llama-style models). `_SwiGLUFn` keeps
gate(x) and up(x) only and recomputes silu and the product in the backward: two elementwise passes
over the rows, a fraction of one GEMM. On the tiny GRPO micro-batch (~1100 packed rows) that is 58 ->
~43 MB saved for the backward. With no gradient (rollout scoring, reference logprobs, eval), SiLU and the
product run in place, so the MLP holds two intermediate tensors at a time instead of four.

The elementwise part (silu and the product forward; the product, grad_g and grad_u backward) is one pass
of the fused CPU kernel (`kernels.fused`) for fp32 CPU tensors: 349 -> 178 us per backward on a [351, 512]
micro-batch, against the five PyTorch ops it replaces (Intel Xeon, one thread, benchmarks/fused_kernels.py);
equal to rounding.
Without the kernels (`RLHF_OPS_CPU_KERNELS=0`, no C compiler, bf16) the arithmetic is Hugging Face's, op
for op: the same GEMMs on the same (row-padded, `models.onednn`) operands, `F.silu`, the product,
`aten.silu_backward` and one two-term sum for the input gradient, so outputs and gradients are bitwise
equal to the unfused module (`tests/unit/test_mlp.py` checks both).

`patch(model)` marks each MLP whose class runs Llama's forward (same bytecode: Llama, Mistral, Qwen2/3,
...) with SiLU and bias-free plain Linear projections, and wraps that class's forward once. A marked
MLP takes the fused path per call when its input is an fp32 or bf16 CPU tensor outside autocast, and
the three projections are still plain Linear layers, without forward hooks, whose weights are not
ZeRO-3 partitions (LoRA, 4-bit and ZeRO-3 modules, and hooked ones, take Hugging Face's forward: the
fused path never calls the projections' modules, so their hooks would not run). GPU tensors also take
Hugging Face's forward: the fused path is plain PyTorch, but it has not been run on a GPU yet.
`RLHF_OPS_FUSED_MLP=0` leaves models unmarked (A/B runs).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from rlhf_ops.kernels import fused
from rlhf_ops.models import marking, onednn

ENV = "RLHF_OPS_FUSED_MLP"
_MARK = "_rlhf_ops_fused_mlp"
_PLAIN = (torch.nn.Linear, onednn.Linear)


def _fwd(x_PI: torch.Tensor, w_OI: torch.Tensor, dnn: bool) -> torch.Tensor:
    return onednn._mm_t(x_PI, w_OI) if dnn else F.linear(x_PI, w_OI)


def _input_grad(grad_PO: torch.Tensor, w_OI: torch.Tensor, dnn: bool) -> torch.Tensor:
    return onednn.input_grad(grad_PO, w_OI) if dnn else grad_PO @ w_OI


def _weight_grad(grad_PO: torch.Tensor, x_PI: torch.Tensor, w_OI: torch.Tensor, dnn: bool) -> torch.Tensor:
    return onednn.weight_grad(grad_PO, x_PI, w_OI) if dnn else grad_PO.t() @ x_PI


def _rows(x: torch.Tensor, dnn: bool) -> torch.Tensor:
    """`x` as rows [P, H]: padded to oneDNN's row bucket (zeros) when `dnn`, else as it is."""
    return onednn._rows_PI(x) if dnn else x.reshape(-1, x.shape[-1])


class _SwiGLUFn(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) over the last dim; saves x, gate(x) and up(x) only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_IH: torch.Tensor, w_up_IH: torch.Tensor, w_down_HI: torch.Tensor,
                dnn: bool) -> torch.Tensor:
        n = x.numel() // x.shape[-1]
        x_PH = _rows(x, dnn)
        g_PI, u_PI = _fwd(x_PH, w_gate_IH, dnn), _fwd(x_PH, w_up_IH, dnn)
        # padding rows of x are zero, so are their g, u and product: down sees the zero padding it would get
        y_PH = _fwd(_product(g_PI, u_PI), w_down_HI, dnn)
        ctx.save_for_backward(x_PH, g_PI, u_PI, w_gate_IH, w_up_IH, w_down_HI)
        ctx.dnn, ctx.x_shape = dnn, x.shape
        return y_PH[:n].view(*x.shape[:-1], w_down_HI.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_PH, g_PI, u_PI, w_gate_IH, w_up_IH, w_down_HI = ctx.saved_tensors
        dnn, need = ctx.dnn, ctx.needs_input_grad
        grad_NH = grad.reshape(-1, grad.shape[-1]).contiguous()
        n = grad_NH.shape[0]
        grad_PH = onednn._pad_rows(grad_NH) if dnn else grad_NH
        grad_p_PI = _input_grad(grad_PH, w_down_HI, dnn)
        if fused.available(g_PI, u_PI, grad_p_PI) and g_PI.is_contiguous() and u_PI.is_contiguous():  # one pass: the product, grad_g (over grad_p) and grad_u
            p_PI, grad_g_PI, grad_u_PI = fused.swiglu_backward(grad_p_PI.contiguous(), g_PI, u_PI)
            grad_w_down = _weight_grad(grad_PH, p_PI, w_down_HI, dnn) if need[3] else None
            del p_PI
        else:
            # the same ops as autograd's (silu, product, silu_backward), into as few new [P, I] buffers as
            # possible: a fresh one costs page faults that show next to these elementwise passes
            s_PI = F.silu(g_PI)
            p_PI = s_PI * u_PI
            grad_w_down = _weight_grad(grad_PH, p_PI, w_down_HI, dnn) if need[3] else None
            grad_u_PI = torch.mul(grad_p_PI, s_PI, out=p_PI)
            del s_PI
            grad_g_PI = grad_p_PI.mul_(u_PI)
            torch.ops.aten.silu_backward.grad_input(grad_g_PI, g_PI, grad_input=grad_g_PI)
        grad_x = None
        if need[0]:
            grad_x_PH = _input_grad(grad_g_PI, w_gate_IH, dnn) + _input_grad(grad_u_PI, w_up_IH, dnn)
            grad_x = grad_x_PH[:n].view(ctx.x_shape)
        grad_w_gate = _weight_grad(grad_g_PI, x_PH, w_gate_IH, dnn) if need[1] else None
        grad_w_up = _weight_grad(grad_u_PI, x_PH, w_up_IH, dnn) if need[2] else None
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None


def swiglu(x: torch.Tensor, w_gate_IH: torch.Tensor, w_up_IH: torch.Tensor, w_down_HI: torch.Tensor,
           dnn: bool = False) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for bias-free projections; `dnn`: the GEMMs through `models.onednn`
    (the caller checks the inputs qualify)."""
    if torch.is_grad_enabled() and (x.requires_grad or w_gate_IH.requires_grad or w_up_IH.requires_grad
                                    or w_down_HI.requires_grad):
        return _SwiGLUFn.apply(x, w_gate_IH, w_up_IH, w_down_HI, dnn)
    n = x.numel() // x.shape[-1]
    x_PH = _rows(x, dnn)
    g_PI = _fwd(x_PH, w_gate_IH, dnn)
    p_PI = _product(g_PI, _fwd(x_PH, w_up_IH, dnn), out=g_PI)
    return _fwd(p_PI, w_down_HI, dnn)[:n].view(*x.shape[:-1], w_down_HI.shape[0])


def _product(g_PI: torch.Tensor, u_PI: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(g) * u: the fused kernel for fp32 CPU tensors, else PyTorch's two ops (`out`: may be g)."""
    if fused.available(g_PI, u_PI) and g_PI.is_contiguous() and u_PI.is_contiguous():
        return fused.swiglu_forward(g_PI, u_PI, out=out)
    if out is g_PI:
        return F.silu(g_PI, inplace=True).mul_(u_PI)
    return F.silu(g_PI).mul_(u_PI)


def _weights(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The three weights when this call can take the fused path, else None (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_autocast_enabled("cpu"):
        return None
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(type(m) not in _PLAIN or m.bias is not None or m._forward_hooks or m._forward_pre_hooks for m in layers):
        return None
    ws = tuple(m.weight for m in layers)
    if any(hasattr(w, "ds_status") or w.dtype != x.dtype or w.device != x.device for w in ws):
        return None
    return ws


def _fused(original: Callable) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = _weights(self, x) if marking.is_marked(self, _MARK) else None
        if ws is None:
            return original(self, x)
        dnn = all(type(m) is onednn.Linear for m in (self.gate_proj, self.up_proj, self.down_proj)) \
            and onednn._eligible(x, ws[0])
        return swiglu(x, *ws, dnn=dnn)

    return forward


def _is_swiglu(module: torch.nn.Module) -> bool:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    if not type(module).__name__.endswith("MLP"):
        return False
    if not all(isinstance(getattr(module, n, None), _PLAIN) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    silu = type(act) is torch.nn.SiLU or (type(act) is SiLUActivation and type(act).forward is SiLUActivation.forward)
    return silu and marking.same_code(type(module).forward, LlamaMLP.forward)


def patch(model: torch.nn.Module) -> int:
    """Mark `model`'s SwiGLU MLPs for the fused forward (their classes' forward is wrapped once, process-wide);
    returns how many (0 with RLHF_OPS_FUSED_MLP=0)."""
    if os.environ.get(ENV, "1") == "0":
        return 0
    return marking.mark(model, _MARK, _is_swiglu, _fused)


def unpatch(model: torch.nn.Module) -> None:
    """Unmark `model`'s MLPs: they run Hugging Face's forward again (tests compare the two)."""
    marking.unmark(model, _MARK)
