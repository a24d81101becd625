"""Autograd functions over the fused CPU kernels (`kernels.cpu`): RMSNorm, RoPE, SwiGLU's elementwise part.

Why: on the tiny models this project trains on CPU, a decoder layer's GEMMs run near the core's peak,
and most of the rest of a step is small elementwise ops, each a pass over memory plus a dispatch.
Hugging Face's RMSNorm is 8 ops forward and ~12 backward; RoPE 6 forward per tensor; SwiGLU's
elementwise part 2 forward and 5 backward (with `models.mlp`'s recompute). Each becomes one pass here.

Same arithmetic as the PyTorch ops up to rounding (a polynomial exp, fused multiply-adds, another
summation order for the norm's reductions); `tests/unit/test_fused_kernels.py` checks them against
float64 references. Callers ask `available(...)` first and keep their PyTorch ops otherwise: fp32 CPU
tensors only (bf16 on CPU, and every GPU tensor, take PyTorch's path).
"""
from __future__ import annotations

import torch

from rlhf_ops.kernels import cpu


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and every tensor is an fp32 CPU tensor."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and cpu.lib() is not None


def _nt() -> int:
    return torch.get_num_threads()


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(g) * u for contiguous fp32 g, u of one shape (`out` may be g or u)."""
    out = torch.empty_like(g) if out is None else out
    cpu.lib().swiglu_fwd(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), _nt())
    return out


def swiglu_backward(grad_p: torch.Tensor, g: torch.Tensor, u: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, grad_g, grad_u) of p = silu(g) * u from p's gradient; grad_g is written over `grad_p`."""
    p, grad_u = torch.empty_like(g), torch.empty_like(u)
    cpu.lib().swiglu_bwd(grad_p.data_ptr(), g.data_ptr(), u.data_ptr(), p.data_ptr(), grad_p.data_ptr(),
                         grad_u.data_ptr(), g.numel(), _nt())
    return p, grad_p, grad_u


def _rms_norm_forward(x: torch.Tensor, w_H: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, rstd per row, x contiguous) for a contiguous fp32 weight."""
    x = x.contiguous()
    H = x.shape[-1]
    y, rstd = torch.empty_like(x), x.new_empty(x.numel() // H)
    cpu.lib().rmsnorm_fwd(x.data_ptr(), w_H.data_ptr(), y.data_ptr(), rstd.data_ptr(), rstd.numel(), H, eps, _nt())
    return y, rstd, x


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_H: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd, x = _rms_norm_forward(x, w_H, eps)
        ctx.save_for_backward(x, w_H, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_H, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        H, nt = x.shape[-1], _nt()
        dx, parts = torch.empty_like(x), x.new_zeros(nt, H)
        cpu.lib().rmsnorm_bwd(dy.data_ptr(), x.data_ptr(), w_H.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                              parts.data_ptr(), rstd.numel(), H, nt)
        return dx, parts[0] if nt == 1 else parts.sum(0), None


def rms_norm(x: torch.Tensor, w_H: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2, -1) + eps) for fp32 CPU tensors (check `available` first)."""
    if torch.is_grad_enabled() and (x.requires_grad or w_H.requires_grad):
        return _RMSNormFn.apply(x, w_H.contiguous(), eps)
    return _rms_norm_forward(x, w_H.contiguous(), eps)[0]


def _rope_BTHD(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel on x [B, H, T, D] (any strides with a unit last stride); returns [B, H, T, D] whose memory
    is [B, T, H, D], the layout Hugging Face's `q * cos + ...` gives a transposed projection output."""
    x = x_BHTD.transpose(1, 2)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, T, H, D = x.shape
    out = x.new_empty(B, T, H, D)
    cb = 0 if cos_BTD.shape[0] == 1 else cos_BTD.stride(0)
    cpu.lib().rope(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos_BTD.data_ptr(), sin_BTD.data_ptr(), cb,
                   cos_BTD.stride(1), out.data_ptr(), B, T, H, D, int(backward), _nt())
    return out.transpose(1, 2)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_BTD, sin_BTD)
        return _rope_BTHD(x_BHTD, cos_BTD, sin_BTD, backward=False)

    @staticmethod
    def backward(ctx, grad_BHTD: torch.Tensor):
        cos_BTD, sin_BTD = ctx.saved_tensors
        return _rope_BTHD(grad_BHTD, cos_BTD, sin_BTD, backward=True), None, None


def rope_eligible(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> bool:
    """Whether `rope` takes these: [B, H, T, D] with D even, cos/sin [1 or B, T, D] (unit last stride, no
    gradient), all fp32 on the CPU with the kernels loaded."""
    if x_BHTD.dim() != 4 or cos_BTD.dim() != 3 or cos_BTD.shape != sin_BTD.shape or cos_BTD.stride() != sin_BTD.stride():
        return False
    B, _, T, D = x_BHTD.shape
    return (D % 2 == 0 and cos_BTD.shape[1:] == (T, D) and cos_BTD.shape[0] in (1, B) and cos_BTD.stride(-1) == 1
            and not (cos_BTD.requires_grad or sin_BTD.requires_grad) and available(x_BHTD, cos_BTD, sin_BTD))


def rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Hugging Face's `x * cos + rotate_half(x) * sin` (cos/sin unsqueezed at dim 1), one pass each way."""
    if torch.is_grad_enabled() and x_BHTD.requires_grad:
        return _RopeFn.apply(x_BHTD, cos_BTD, sin_BTD)
    return _rope_BTHD(x_BHTD, cos_BTD, sin_BTD, backward=False)
