"""Packed (padding-free) attention for CPU and non-flash GPUs: "rlhf_sdpa".

A packed micro-batch is one row of samples laid end to end, position ids restarting at each
sample. flash-attn reads the sample boundaries from the position ids and runs a varlen kernel.
Plain SDPA has no varlen kernel, so Hugging Face builds a [1, 1, N, N] block-diagonal mask and
attends over all N packed tokens: quadratic in the micro-batch's total length, and on CPU a
masked (slower) kernel. That made packing slower than padding here (benchmarks/trl_compare.py).

"rlhf_sdpa" is SDPA with one change: for a packed row it gathers each sample's q/k/v into a
padded [S, H, L, D] layout (L = longest sample), runs the mask-free causal kernel on that and
scatters the outputs back. Attention costs S * L^2 instead of N^2, and every other matmul
(projections, MLP, LM head) still runs on the N real tokens only: packing without padding
waste. Right padding inside a sample's slot is never attended by a real query (causal), so the
result equals running each sample alone. Any other call (an explicit attention mask, a KV cache,
one sample per row) is plain SDPA, unchanged.

Sample boundaries come from the position ids (a position that does not continue its
predecessor starts a sample, as in flash-attn's varlen path), so callers pass what they pass
to any HF model. One extension that flash-attn lacks: a sample whose positions start at s > 0
(not at a row's start) is a branch that also attends to the first s tokens of the group it
follows, so the G samples of one prompt can carry the prompt once (`packed_layout`; RL's
--prefix_sharing). Gathering the shared tokens into each branch's slot makes autograd sum their
gradients over the branches, as computing them G times would. `register()` adds the name to
transformers; `load_causal_lm` and `load_value_model` call it and load with it when --flash_attn
is off. Saved configs do not record it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "rlhf_sdpa"
GATHER_BACKWARD = os.environ.get("RLHF_OPS_PACKED_GATHER", "1") != "0"  # 0: autograd's index_add (A/B runs)


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed token sits in the padded [S, L] layout, and back.

    pad_src_SL: [S * L] index into the flat [B * T] tokens (padding slots point at token 0).
    slot_N: [B * T] index of each token's slot in the flat [S * L] layout.
    zero_src_SL: as pad_src_SL, but padding slots point at row B * T (a zero row appended), or None
        when a token fills several slots (shared prefixes).
    """
    num_samples: int
    max_len: int
    pad_src_SL: torch.Tensor
    slot_N: torch.Tensor
    zero_src_SL: torch.Tensor | None = None


class _Gather(torch.autograd.Function):
    """`x.index_select(0, src)` whose backward is a gather as well, where autograd's is an index_add.

    Valid when each row of x is read by one output row (`back`: that row) or by none of them (`back`
    points at a zero row appended to the gradient), and every other output row reads row `src` whose
    gradient there is zero: true of the packed layout without shared prefixes, whose padding slots
    are never attended by a real query. The sum autograd would form adds only exact zeros, so the
    gradient is the same. On an H100 (benchmarks/gpu.py) the index_add took ~150 us per call against
    ~25 us for a gather, 112 calls per step of the 0.47B model: 7% of the step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, back: torch.Tensor, zero_row: bool) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.zero_row = zero_row
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (back,) = ctx.saved_tensors
        if ctx.zero_row:
            g = torch.cat((g, g.new_zeros((1, *g.shape[1:]))))
        return g.index_select(0, back), None, None, None


def packed_layout(position_ids_BT: torch.Tensor) -> PackedLayout | None:
    """The layout of the samples in `position_ids_BT`, or None when each row holds one sample.

    A segment starts wherever a position does not continue its predecessor (and at each row's
    start). A segment starting at position 0 (or at a row's start) is a sample of its own and opens
    a group. A segment starting at a position s > 0 elsewhere is a *branch*: its context is the first
    s tokens of its group (the samples of one prompt sharing one copy of it: `rl.forward.prefix_batch`),
    which its slot holds ahead of its own tokens.
    """
    B, T = position_ids_BT.shape
    pos = position_ids_BT.reshape(-1)
    device = pos.device
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::T] = True  # a sample never spans two rows
    seg_N = starts.cumsum(0) - 1
    num_samples = int(seg_N[-1]) + 1
    if num_samples == B:
        return None
    start_S = torch.nonzero(starts).squeeze(1)
    len_S = torch.diff(start_S, append=start_S.new_tensor([pos.numel()]))
    ctx_S = torch.where(start_S % T == 0, 0, pos[start_S])      # context tokens taken from the group
    opens_S = ctx_S == 0
    first_S = torch.nonzero(opens_S).squeeze(1)[opens_S.cumsum(0) - 1]  # the segment that opened each one's group
    short_S = ctx_S > len_S[first_S]
    if bool(short_S.any()):
        bad = int(torch.nonzero(short_S)[0, 0])
        raise ValueError(f"packed position ids: the sample at token {int(start_S[bad])} starts at position "
                         f"{int(ctx_S[bad])}, but the sample opening its group holds only {int(len_S[first_S[bad]])} tokens")
    max_len = int((ctx_S + len_S).max())
    j_L = torch.arange(max_len, device=device)[None, :]
    src_SL = torch.where(j_L < ctx_S[:, None], start_S[first_S][:, None] + j_L,
                         start_S[:, None] + j_L - ctx_S[:, None])
    pad_src = torch.where(j_L < (ctx_S + len_S)[:, None], src_SL, 0).reshape(-1)
    offset_N = torch.arange(pos.numel(), device=device) - start_S[seg_N]
    slot_N = seg_N * max_len + ctx_S[seg_N] + offset_N
    zero_src = None
    if GATHER_BACKWARD and not bool(ctx_S.any()):  # no branches: each token fills one slot
        zero_src = torch.where(j_L < len_S[:, None], src_SL, pos.numel()).reshape(-1)
    return PackedLayout(num_samples, max_len, pad_src, slot_N, zero_src)


_last: tuple[torch.Tensor, PackedLayout | None] | None = None  # every layer sees the same position_ids tensor


def _layout(position_ids: torch.Tensor) -> PackedLayout | None:
    global _last
    last = _last
    if last is not None and last[0] is position_ids:
        return last[1]
    layout = packed_layout(position_ids)
    _last = (position_ids, layout)
    return layout


def packed_sdpa_BHTD(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                     scale: float | None) -> torch.Tensor:
    """Causal attention within each sample; q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, T, Hq, D]."""
    B, Hq, T, D = q.shape
    S, L = layout.num_samples, layout.max_len

    fast = layout.zero_src_SL is not None

    def to_slots(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [S, H, L, D]
        H = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * T, H, D)
        slots = (_Gather.apply(flat, layout.pad_src_SL, layout.slot_N, False) if fast
                 else flat.index_select(0, layout.pad_src_SL))
        return slots.view(S, L, H, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(to_slots(q), to_slots(k), to_slots(v), is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != Hq)
    out = out.transpose(1, 2).reshape(S * L, Hq, D)
    out = (_Gather.apply(out, layout.slot_N, layout.zero_src_SL, True) if fast
           else out.index_select(0, layout.slot_N))
    return out.view(B, T, Hq, D)


def rlhf_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; packed rows take `packed_sdpa_BHTD`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    plain = (attention_mask is not None or pos is None or pos.dim() != 2 or query.shape[2] != key.shape[2]
             or query.shape[2] == 1 or (dropout > 0 and module.training) or not getattr(module, "is_causal", True))
    if not plain and pos.shape[0] != query.shape[0]:  # [1, T] ids broadcast over the batch
        pos = pos.expand(query.shape[0], -1)
    layout = None if plain else _layout(pos)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if getattr(module, "sliding_window", None):
        raise NotImplementedError(f"{NAME}: packed rows with sliding-window attention; use --flash_attn or "
                                  "--no-packing_samples for this model")
    return packed_sdpa_BHTD(query, key, value, layout, scaling), None


def _mask(*args, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
    """No mask without a padding mask (causal and packing are the attention function's job)."""
    from transformers.masking_utils import sdpa_mask

    windowed = config is not None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if attention_mask is None and not windowed:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, config=config, **kwargs)


def register() -> str:
    """Register "rlhf_sdpa" with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, rlhf_sdpa_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
