"""Llama's RMSNorm as one fused CPU kernel each way (`kernels.fused.rms_norm`).

Hugging Face's `LlamaRMSNorm.forward` is eight ops (cast, pow, mean, add, rsqrt, mul, cast, mul) and
its backward about twelve: on the tiny CPU models, where a layer's GEMMs run near the core's peak,
the 2L + 1 norms of a step cost more than their arithmetic. The fused kernel makes one pass over the
rows each way: on a [351, 128] micro-batch, 70 against 254 us per forward + backward (Intel Xeon, one
thread, 2026-12-07; benchmarks/fused_kernels.py).

`patch(model)` marks each module whose class runs Llama's RMSNorm forward (same bytecode: Llama,
Mistral, Qwen2/3, ...) and wraps that class's forward once. A marked module takes the kernel when its
input and weight are fp32 CPU tensors and the weight is not a ZeRO-3 partition (module hooks still run:
they wrap `forward`); anything else (bf16, GPU, `RLHF_OPS_CPU_KERNELS=0`, no C compiler) runs Hugging Face's
forward. Results agree with Hugging Face's to rounding, not bitwise (`tests/unit/test_fused_kernels.py`).
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ops.kernels import fused
from rlhf_ops.models import marking

_MARK = "_rlhf_ops_fused_norm"


def _is_llama_norm(module: torch.nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and marking.same_code(type(module).forward, LlamaRMSNorm.forward))


def _fused(original: Callable) -> Callable:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (marking.is_marked(self, _MARK) and hidden_states.shape[-1:] == w.shape and not hasattr(w, "ds_status")
                and fused.available(hidden_states, w)):
            return fused.rms_norm(hidden_states, w, self.variance_epsilon)
        return original(self, hidden_states)

    return forward


def patch(model: torch.nn.Module) -> int:
    """Mark `model`'s Llama-style RMSNorms for the fused kernel (their classes' forward is wrapped once,
    process-wide); returns how many."""
    return marking.mark(model, _MARK, _is_llama_norm, _fused)


def unpatch(model: torch.nn.Module) -> None:
    """Unmark `model`'s norms: they run Hugging Face's forward again (tests compare the two)."""
    marking.unmark(model, _MARK)
