"""Rotary embeddings in fewer kernels: Hugging Face's exact numbers, or one fused CPU kernel each way.

Hugging Face applies RoPE as `q * cos + rotate_half(q) * sin`, where `rotate_half(x) = cat(-x2, x1)`
slices, negates and concatenates the (transposed, strided) [B, H, T, D] query and key: six kernels
per tensor forward, and a longer backward. Here it is `q * cos + q.roll(D/2, -1) * sin_signed`,
with `sin_signed = cat(-sin1, sin2)` computed once per forward (every layer receives the same `sin`
tensor). Element by element both compute the same products and the same sums, since
`(-x2) * s == x2 * (-s)` exactly in IEEE arithmetic, so outputs and gradients are bitwise equal
to Hugging Face's (`tests/unit/test_rope.py` checks a whole model's loss and every gradient with
`torch.equal`), so it changes no result. On the tiny SFT benchmark (benchmarks/trl_compare.py) it
saves ~0.7 ms of a ~37 ms step (same process, alternating 8 x 40 steps). For fp32 CPU tensors the fused
CPU kernel (`kernels.fused.rope`) goes further: one pass per tensor each way, equal to rounding (323 ->
139 us per forward + backward of a tiny layer's q and k on an Intel Xeon, benchmarks/fused_kernels.py).

`patch(model)` swaps `apply_rotary_pos_emb` in the model's modeling module when that module's
function and its `rotate_half` are Llama's code (same bytecode: Llama, Mistral, Qwen2/3, Mixtral,
Gemma, ...). Any other model keeps its own. The swap is process-wide for that module, as
`--use_liger_kernel`'s is; a function another library put there (Liger's) is left in place. Where
Hugging Face's function is wrapped in a `kernels` hub module (transformers >= 5.25), the function
inside the wrapper is what is compared, and the swap replaces the wrapper.
"""
from __future__ import annotations

import sys
from types import CodeType, ModuleType
from typing import Any

import torch

from rlhf_ops.kernels import fused

_ORIGINAL = "_rlhf_ops_original_apply_rotary_pos_emb"
_last: tuple[torch.Tensor, torch.Tensor] | None = None  # (sin, sin_signed) of the latest forward


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """cat(-sin[..., :D/2], sin[..., D/2:]), cached for the `sin` tensor every layer of one forward shares."""
    global _last
    last = _last
    if last is not None and last[0] is sin:
        return last[1]
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    _last = (sin, signed)
    return signed


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's `apply_rotary_pos_emb` (same signature and broadcasting): the fused CPU kernel where it
    applies, else bitwise equal."""
    if unsqueeze_dim == 1 and fused.rope_eligible(q, cos, sin) and fused.rope_eligible(k, cos, sin):
        return fused.rope(q, cos, sin), fused.rope(k, cos, sin)
    half = q.shape[-1] // 2
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = _signed_sin(sin).unsqueeze(unsqueeze_dim)
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin


def _fingerprint(code: CodeType) -> tuple:
    return code.co_code, code.co_names, tuple(c for c in code.co_consts if not isinstance(c, str))


def _plain(fn: Any) -> Any:
    """The Python function behind `fn`: `fn` itself, or the one a `kernels` hub wrapper calls. With the
    `kernels` package installed (a dependency of transformers since 5.25), Hugging Face's
    `@use_kernel_forward_from_hub` turns `apply_rotary_pos_emb` into an `nn.Module` whose forward calls
    the original function unless `kernelize` gave it a hub kernel (this project never does)."""
    if getattr(fn, "__code__", None) is not None:
        return fn
    forward = getattr(type(fn), "forward", None)
    code, cells = getattr(forward, "__code__", None), getattr(forward, "__closure__", None) or ()
    inner = dict(zip(code.co_freevars, cells)).get("func") if code is not None else None
    try:
        inner = inner.cell_contents if inner is not None else None
    except ValueError:  # an empty cell
        return None
    return inner if getattr(inner, "__code__", None) is not None else None


def _is_llama_rope(module: ModuleType) -> bool:
    from transformers.models.llama import modeling_llama as llama

    fn, rot = _plain(getattr(module, "apply_rotary_pos_emb", None)), getattr(module, "rotate_half", None)
    if fn is None or getattr(rot, "__code__", None) is None:
        return False
    llama_fn = _plain(getattr(llama, _ORIGINAL, llama.apply_rotary_pos_emb))
    if llama_fn is None:
        return False
    # another library's swap (Liger's, under --use_liger_kernel) stays: compared with the function that
    # replaced Llama's own it would match itself. Seen on an H100: our RoPE had displaced Liger's kernel.
    if not (fn.__module__.startswith("transformers.") and llama_fn.__module__.startswith("transformers.")):
        return False
    return (_fingerprint(fn.__code__) == _fingerprint(llama_fn.__code__)
            and _fingerprint(rot.__code__) == _fingerprint(llama.rotate_half.__code__))


def patch(model: torch.nn.Module) -> bool:
    """Use `apply_rotary_pos_emb` above in `model`'s modeling module; True when it is (now) in use."""
    module = sys.modules.get(type(model).__module__)
    if module is None:
        return False
    if getattr(module, "apply_rotary_pos_emb", None) is apply_rotary_pos_emb:
        return True
    if not _is_llama_rope(module):
        return False
    setattr(module, _ORIGINAL, module.apply_rotary_pos_emb)
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def unpatch(model: torch.nn.Module) -> None:
    """Restore Hugging Face's function in `model`'s modeling module (tests compare the two)."""
    module = sys.modules.get(type(model).__module__)
    if module is not None and hasattr(module, _ORIGINAL):
        module.apply_rotary_pos_emb = getattr(module, _ORIGINAL)
        delattr(module, _ORIGINAL)
