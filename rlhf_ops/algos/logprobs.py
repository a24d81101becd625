"""Per-token log-probabilities and entropies from logits, computed in row chunks.

A full ``log_softmax`` over ``[B, T, V]`` costs another ``B*T*V`` floats (several GiB for a
150k vocabulary); here the ``B*T`` rows are processed ``chunk_rows`` at a time and only a
``[chunk_rows, V]`` temporary (the upcast / temperature-scaled logits of one chunk) exists at once.
Half-precision logits are upcast to float32 per chunk; float64 stays float64.
"""

from __future__ import annotations

import torch

from rlhf_ops.algos.masked import masked_sum

__all__ = ["IGNORE_INDEX", "token_logprobs", "token_entropy", "sequence_logprob_sums"]

IGNORE_INDEX = -100


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled_chunk(logits_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    chunk = logits_NV.to(_out_dtype(logits_NV))
    return chunk if temperature == 1.0 else chunk / temperature


def _rows(logits_BTV: torch.Tensor, temperature: float, chunk_rows: int) -> torch.Tensor:
    """Check the chunking arguments and flatten [B, T, V] logits to [B*T, V] rows."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return logits_BTV.reshape(-1, logits_BTV.shape[-1])


def token_logprobs(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[label]`` per token, as ``gather(z) - logsumexp(z)``.

    ``labels_BT`` must already be aligned with ``logits_BTV`` (``logits_BTV[:, t]`` scores
    ``labels_BT[:, t]``; the caller does the usual one-step shift). Positions with label
    ``-100`` get logprob 0 (and no gradient). Returns float32 (float64 for float64 logits).
    """
    logits_NV = _rows(logits_BTV, temperature, chunk_rows)
    B, T = logits_BTV.shape[:2]
    labels_N = labels_BT.reshape(B * T)
    valid_N = labels_N != IGNORE_INDEX
    safe_labels_N = torch.where(valid_N, labels_N, torch.zeros_like(labels_N))
    pieces = []
    for start in range(0, B * T, chunk_rows):
        z = _scaled_chunk(logits_NV[start : start + chunk_rows], temperature)
        picked = z.gather(-1, safe_labels_N[start : start + chunk_rows, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(z, dim=-1))
    logprobs_N = torch.cat(pieces) if pieces else logits_NV.new_zeros(0, dtype=_out_dtype(logits_NV))
    logprobs_N = torch.where(valid_N, logprobs_N, torch.zeros_like(logprobs_N))
    return logprobs_N.reshape(B, T)


def token_entropy(
    logits_BTV: torch.Tensor, temperature: float = 1.0, *, chunk_rows: int = 1024
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per token: ``logsumexp(z) - sum(p * z)``.

    Chunked over rows like :func:`token_logprobs`. Mask padding with the caller's mask.
    """
    logits_NV = _rows(logits_BTV, temperature, chunk_rows)
    B, T = logits_BTV.shape[:2]
    pieces = []
    for start in range(0, B * T, chunk_rows):
        z = _scaled_chunk(logits_NV[start : start + chunk_rows], temperature)
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        # where(): a -inf logit (banned token) has p == 0 and must add 0, not 0 * -inf = NaN.
        pieces.append(lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(dim=-1))
    entropy_N = torch.cat(pieces) if pieces else logits_NV.new_zeros(0, dtype=_out_dtype(logits_NV))
    return entropy_N.reshape(B, T)


def sequence_logprob_sums(
    logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence sum of token logprobs over valid tokens ``[B]``.

    ``average=True`` divides by the number of valid tokens (length-averaged logps, as IPO wants;
    see :func:`rlhf_ops.algos.losses.dpo_loss`). A row without valid tokens gives 0.
    """
    sums_B = masked_sum(logprobs_BT, mask_BT, dim=-1)
    if not average:
        return sums_B
    counts_B = masked_sum(torch.ones_like(logprobs_BT), mask_BT, dim=-1).clamp(min=1)
    return sums_B / counts_B
