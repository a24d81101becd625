"""fp32 Linear layers through oneDNN on CPU: the same fp32 products at about twice the speed.

PyTorch's CPU wheels run fp32 `F.linear` (and its backward) through MKL's sgemm. MKL picks its
AVX-512 kernels only on Intel processors; on an AMD CPU with AVX-512 (this project's CI and
benchmark machines: Zen 5) it runs AVX2 code at about half the machine's peak: ~105 GFLOP/s per core
here against ~215-235 GFLOP/s for oneDNN's fp32 matmul on the same shapes and thread
(`benchmarks/onednn_linear.py`). oneDNN, which PyTorch also ships, dispatches on the CPU's features.

`patch(model)` turns each plain `nn.Linear` of a model into `Linear` below (a subclass: same
parameters, state dict, `repr` and save format). On CPU with fp32 tensors its forward is one call to
oneDNN (`torch.ops.mkldnn._linear_pointwise`, dense in and out), and its backward two more (grad of
the input; grad of the weight, from transposed views, left to MKL for weights under SMALL_WEIGHT
elements, where oneDNN gains least). Arithmetic stays IEEE fp32, with
oneDNN's summation order in place of MKL's: results agree to fp32 rounding, not bitwise
(tests/unit/test_onednn.py). Under ZeRO-3 DeepSpeed gathers a layer's weight around its forward
and its backward, as for `F.linear` (tests/integration/test_rl_loop.py: ZeRO 0, 2 and 3 end within
1e-6). Anything else falls back to `F.linear`: GPU tensors, bf16/fp16, autocast, fewer than
MIN_ROWS rows (a decode step of a few sequences, where MKL is faster), and PyTorch builds without
the op.

On an Intel CPU MKL runs its own AVX-512 kernels, and there it was the faster of the two: tiny packed
SFT (`train_sft` on the tiny preset, packed, 8 rows per step, one thread), 46.5-47.3 ms per step with
MKL against 60.9-61.5 with oneDNN in two alternating pairs (Intel Xeon with AVX-512 and AMX,
2026-12-07; benchmarks/trl_compare.py is the comparison of record). So the loader patches by default
only on other CPUs (`wanted()`); `RLHF_OPS_ONEDNN_LINEAR=1` forces oneDNN on any CPU, `=0` turns it
off (A/B runs).

The price is memory: oneDNN compiles kernels per GEMM shape and keeps them (~0.65 MB a shape), so
row counts are padded (`padded_rows`: multiples of BUCKET, at most PER_OCTAVE sizes per octave) and
the caches are capped at CACHE_CAPACITY shapes (unless the environment sets
ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY). On the tiny SFT run that is ~+22 MB of peak
memory over MKL. Keep runs under the cap: evicting and recompiling was measured to grow memory, not
free it (60 shapes cycled through a 16-shape cache: +154 MB).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENV = "RLHF_OPS_ONEDNN_LINEAR"
CACHE_CAPACITY = "256"  # GEMM shapes kept compiled (oneDNN's and ideep's caches; 1024 by default): <= ~170 MB
MIN_ROWS = 16  # fewer rows go to F.linear (MKL is faster there: a decode step of a few sequences)
BUCKET = 64  # more are zero-padded up to a multiple of this, or of a 1/PER_OCTAVE octave: see padded_rows
PER_OCTAVE = 8  # at most this many padded sizes per octave of rows (1024-2047 rows: multiples of 128)
SMALL_WEIGHT = 65536  # weight gradients of fewer elements go to MKL


def available() -> bool:
    """oneDNN's dense linear op exists in this PyTorch build and the env switch is not "0"."""
    return (os.environ.get(ENV, "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...; "" where unknown)."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def wanted() -> bool:
    """Route fp32 Linear layers through oneDNN: where it is available, and, unless RLHF_OPS_ONEDNN_LINEAR=1
    asks for it anyway, not on an Intel CPU, where MKL's own AVX-512 kernels were faster."""
    return available() and (os.environ.get(ENV) == "1" or cpu_vendor() != "GenuineIntel")


_last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (x, x._version, padded rows): q/k/v share x


def _mm_t(x_NI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """x_NI @ w_OI.T (+ b_O) in oneDNN; either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x_NI, w_OI, b_O, "none", [], "")


def padded_rows(n: int) -> int:
    """`n` rounded up to a multiple of BUCKET, or of 1/PER_OCTAVE of its octave where that is larger:
    at most PER_OCTAVE sizes between n and 2n, so that the shapes a run compiles stay few as rows grow."""
    step = max(BUCKET, (1 << (n.bit_length() - 1)) // PER_OCTAVE) if n > 0 else BUCKET
    return -(-n // step) * step


def _pad_rows(x_NI: torch.Tensor) -> torch.Tensor:
    """`x_NI` (contiguous) with zero rows appended up to `padded_rows` (itself when it has that many).

    oneDNN JIT-compiles its kernels for each GEMM shape (~0.4 ms) and keeps them (~0.65 MB per shape
    here, whatever its size) in caches of CACHE_CAPACITY entries. Packed micro-batches change length
    every step, so exact shapes would pay the compilation on most steps and grow memory by ~90 MB over
    a tiny SFT run (rows padded to 16: 132 shapes). Multiples of 64, with the backward sharing the
    forward's kernels, cost ~+22 MB over MKL's run at ~9% more rows through the GEMMs; above 1024
    rows `padded_rows` coarsens further (the RL step's reference forward has 3000-4300 rows)."""
    n = x_NI.shape[0]
    n_pad = padded_rows(n)
    if n_pad == n:
        return x_NI
    out = x_NI.new_empty(n_pad, x_NI.shape[1])
    out[:n].copy_(x_NI)
    out[n:].zero_()
    return out


def _rows_PI(x: torch.Tensor) -> torch.Tensor:
    """`x` as padded rows [P, I]; the same `x` (unchanged) given to several layers is padded once."""
    global _last
    last = _last
    if last is not None and last[0] is x and last[1] == x._version:
        return last[2]
    padded = _pad_rows(x.reshape(-1, x.shape[-1]).contiguous())
    _last = (x, x._version, padded)
    return padded


class _LinearFn(torch.autograd.Function):
    """y = x @ w_OI.T + b_O over the last dim, oneDNN forward and backward on row-padded operands."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None) -> torch.Tensor:
        x_PI = _rows_PI(x)
        ctx.save_for_backward(x_PI, w_OI)
        ctx.x_shape = x.shape
        n = x.numel() // x.shape[-1]
        return _mm_t(x_PI, w_OI, b_O)[:n].view(*x.shape[:-1], w_OI.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_PI, w_OI = ctx.saved_tensors
        grad_NO = grad.reshape(-1, grad.shape[-1]).contiguous()
        n = grad_NO.shape[0]
        grad_PO = _pad_rows(grad_NO)
        grad_x = input_grad(grad_PO, w_OI)[:n].view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(grad_PO, x_PI, w_OI) if ctx.needs_input_grad[1] else None
        grad_b = grad_NO.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def input_grad(grad_PO: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """grad_PO @ w_OI in oneDNN. W^T is made contiguous so that this GEMM has the shape of some forward
    GEMM (gate's input gradient is down's forward): one compiled kernel set serves both."""
    return _mm_t(grad_PO, w_OI.t().contiguous())


def weight_grad(grad_PO: torch.Tensor, x_PI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """grad_PO.T @ x_PI: oneDNN for weights of SMALL_WEIGHT elements or more, MKL below (the least
    speed-up there, for the same ~0.65 MB a compiled shape)."""
    return _mm_t(grad_PO.t(), x_PI.t()) if w_OI.numel() >= SMALL_WEIGHT else grad_PO.t() @ x_PI


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU, fp32, at least MIN_ROWS rows, no autocast: the inputs `linear` sends to oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.numel() >= MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN where eligible (CPU, fp32, at least MIN_ROWS rows, no autocast)."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearFn.apply(x, weight, bias)
    n = x.numel() // x.shape[-1]
    return _mm_t(_rows_PI(x), weight, bias)[:n].view(*x.shape[:-1], weight.shape[0])


class Linear(torch.nn.Linear):
    """`nn.Linear` whose forward is `linear` above; `patch` sets it as a module's class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def patch(model: torch.nn.Module) -> int:
    """Make every plain `nn.Linear` in `model` a oneDNN `Linear`; returns how many (0 when not `wanted()`)."""
    if not wanted():
        return 0
    # read when oneDNN creates its first primitive, so before any forward; a user's setting wins
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", CACHE_CAPACITY)
    os.environ.setdefault("LRU_CACHE_CAPACITY", CACHE_CAPACITY)
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
            n += 1
    return n


def unpatch(model: torch.nn.Module) -> None:
    """Back to `nn.Linear` (tests compare the two)."""
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = torch.nn.Linear
