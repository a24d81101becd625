"""Llama's RMSNorm as one fused CPU kernel each way (`kernels.fused.rms_norm`).

Hugging Face's `LlamaRMSNorm.forward` is eight ops (cast, pow, mean, add, rsqrt, mul, cast, mul) and
its backward about twelve: on the tiny CPU models, where a layer's GEMMs run near the core's peak,
the 2L + 1 norms of a step cost more than their arithmetic. The fused kernel makes one pass over the
rows each way: on a [351, 128] micro-batch, 79 against 346 us per forward + backward (benchmarks/
fused_kernels.py).

`patch(model)` marks each module whose class runs Llama's RMSNorm forward (same bytecode: Llama,
Mistral, Qwen2/3, ...) and wraps that class's forward once. A marked module takes the kernel when its
input and weight are fp32 CPU tensors and the weight is not a ZeRO-3 partition (module hooks still run:
they wrap `forward`); anything else (bf16, GPU, `RLHF_OPS_CPU_KERNELS=0`, no C compiler) runs Hugging Face's
forward. Results agree with Hugging Face's to rounding, not bitwise (`tests/unit/test_fused_kernels.py`).
"""
from __future__ import annotations

from typing import Callable

import torch

_MARK = "_rlhf_ops_fused_norm"


def _code_key(fn: Callable) -> tuple | None:
    code = getattr(fn, "__code__", None)
    return None if code is None else (code.co_code, code.co_names)


def _is_llama_norm(module: torch.nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    llama = getattr(LlamaRMSNorm.forward, "__wrapped__", LlamaRMSNorm.forward)
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float) and _code_key(forward) == _code_key(llama))


def _fused(original: Callable) -> Callable:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from rlhf_ops.kernels import fused

        w = self.weight
        if (self.__dict__.get(_MARK) and hidden_states.shape[-1:] == w.shape and not hasattr(w, "ds_status")
                and fused.available(hidden_states, w)):
            return fused.rms_norm(hidden_states, w, self.variance_epsilon)
        return original(self, hidden_states)

    forward.__wrapped__ = original
    setattr(forward, _MARK, True)
    return forward


def patch(model: torch.nn.Module) -> int:
    """Mark `model`'s Llama-style RMSNorms for the fused kernel (their classes' forward is wrapped once,
    process-wide); returns how many."""
    n = 0
    for module in model.modules():
        if _is_llama_norm(module):
            cls = type(module)
            if not getattr(cls.forward, _MARK, False):
                cls.forward = _fused(cls.forward)
            module.__dict__[_MARK] = True
            n += 1
    return n


def unpatch(model: torch.nn.Module) -> None:
    """Unmark `model`'s norms: they run Hugging Face's forward again (tests compare the two)."""
    for module in model.modules():
        module.__dict__.pop(_MARK, None)
