"""Masked reductions over padded token tensors.

Masks are 0/1 (bool, int or float) tensors broadcastable to ``x``; a position with mask 0 is
padding. Masked positions are excluded with ``torch.where`` rather than ``x * mask``, so a NaN or
inf sitting in padding never leaks into a result (``inf * 0`` would be NaN).

None of these functions synchronise with the device (no ``.item()``, no data-dependent raise):
an empty selection gives 0 instead of NaN (the count is clamped to at least 1).
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is nonzero (all dims if ``dim`` is None)."""
    kept = torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _count(x: torch.Tensor, mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    ones = torch.ones_like(x)
    return masked_sum(ones, mask, dim).clamp(min=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions; 0 where nothing is valid (no NaN, no sync)."""
    return masked_sum(x, mask, dim) / _count(x, mask, dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (a scalar).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` like TRL's ``masked_var``;
    deviation: with ``n <= 1`` valid positions this returns 0 instead of raising/inf.
    """
    mean = masked_mean(x, mask)
    centered_sq = (x - mean) ** 2
    n = _count(x, mask, None)
    denom = (n - 1).clamp(min=1) if unbiased else n
    return masked_sum(centered_sq, mask) / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean/variance of its valid positions: ``(x - mean) / sqrt(var + eps)``.

    As TRL's ``masked_whiten`` (unbiased variance). ``shift_mean=False`` adds the mean back
    (rescale only). Masked positions of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_as_bool(mask), whitened, torch.zeros((), dtype=x.dtype, device=x.device))
