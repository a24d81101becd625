"""RL-stage losses: clipped PPO policy loss, clipped value loss, entropy and KL terms.

Preference / reward-model losses (pairwise Bradley-Terry, DPO/IPO, PRM) live in
:mod:`rlhf_ops.algos.preference`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from rlhf_ops.algos.kl import KLKind, kl_estimate, kl_k3
from rlhf_ops.algos.masked import masked_mean, masked_sum

__all__ = [
    "LossAgg",
    "PolicyLossOut",
    "ValueLossOut",
    "aggregate_loss",
    "ppo_policy_loss",
    "value_loss",
    "entropy_loss",
    "kl_loss",
]

LossAgg = Literal["token_mean", "seq_mean_token_sum_norm"]


class PolicyLossOut(NamedTuple):
    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


class ValueLossOut(NamedTuple):
    loss: torch.Tensor
    clip_frac: torch.Tensor


def aggregate_loss(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_agg: LossAgg = "token_mean",
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    * ``token_mean``: mean over all valid tokens of the batch (long responses weigh more).
    * ``seq_mean_token_sum_norm``: ``mean_b( sum_t loss[b, t] / norm_constant )`` over all B
      rows (Dr. GRPO, Liu et al. 2025, eq. 3: a constant normaliser, e.g. generate_max_len, so
      there is no per-response length bias). Empty rows count as 0 in the mean.
    """
    match loss_agg:
        case "token_mean":
            return masked_mean(loss_BT, mask_BT)
        case "seq_mean_token_sum_norm":
            if norm_constant is None or norm_constant <= 0:
                raise ValueError(
                    "loss_agg='seq_mean_token_sum_norm' needs a positive norm_constant "
                    f"(e.g. generate_max_len), got {norm_constant!r}"
                )
            return (masked_sum(loss_BT, mask_BT, dim=-1) / norm_constant).mean()
        case _:
            raise ValueError(
                f"unknown loss_agg {loss_agg!r}; expected 'token_mean' or 'seq_mean_token_sum_norm'"
            )


def ppo_policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    loss_agg: LossAgg = "token_mean",
    norm_constant: float | None = None,
) -> PolicyLossOut:
    """Clipped surrogate objective (Schulman et al. 2017, "PPO", eq. 7), negated as a loss.

    ``ratio = exp(logp - old_logp)``; per token
    ``-min(ratio * A, clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)``. Separate low/high
    epsilons are DAPO's "clip-higher" (Yu et al. 2025); equal epsilons give eq. 7.

    ``clip_frac``: fraction of valid tokens where the clipped term is strictly the binding one
    (as TRL's ``pg_clipfrac``). ``approx_kl``: mean k3 estimate of KL(old || new) over valid
    tokens (tokens were sampled from the old policy). Both are detached diagnostics.
    """
    log_ratio_BT = logp_BT - old_logp_BT
    ratio_BT = torch.exp(log_ratio_BT)
    surr_BT = ratio_BT * advantages_BT
    surr_clipped_BT = ratio_BT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages_BT
    loss_BT = -torch.min(surr_BT, surr_clipped_BT)
    loss = aggregate_loss(loss_BT, mask_BT, loss_agg, norm_constant)
    with torch.no_grad():
        clip_frac = masked_mean((surr_clipped_BT < surr_BT).to(loss_BT.dtype), mask_BT)
        approx_kl = masked_mean(kl_k3(old_logp_BT, logp_BT), mask_BT)
    return PolicyLossOut(loss, clip_frac, approx_kl)


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> ValueLossOut:
    """Clipped value loss (PPO2 baselines / OpenRLHF ``ValueLoss``).

    ``V_clip = old_V + clip(V - old_V, -clip_eps, clip_eps)``;
    ``loss = 0.5 * token_mean(max((V_clip - R)^2, (V - R)^2))``. ``clip_eps=None`` disables
    clipping (plain ``0.5 * MSE``). ``clip_frac``: fraction of valid tokens where the clipped
    error is strictly larger (i.e. the clipped branch is the one used).
    """
    err_BT = (values_BT - returns_BT) ** 2
    if clip_eps is None:
        return ValueLossOut(0.5 * masked_mean(err_BT, mask_BT), err_BT.new_zeros(()))
    values_clipped_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip_eps, clip_eps)
    err_clipped_BT = (values_clipped_BT - returns_BT) ** 2
    loss = 0.5 * masked_mean(torch.max(err_BT, err_clipped_BT), mask_BT)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped_BT > err_BT).to(err_BT.dtype), mask_BT)
    return ValueLossOut(loss, clip_frac)


def entropy_loss(
    entropy_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_agg: LossAgg = "token_mean",
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Mean token entropy over valid tokens (positive; verl's naming).

    It is a *bonus*: the trainer does ``loss = policy_loss - entropy_coef * entropy_loss(...)``.
    ``entropy_BT`` comes from :func:`rlhf_ops.algos.logprobs.token_entropy`.
    """
    return aggregate_loss(entropy_BT, mask_BT, loss_agg, norm_constant)


def kl_loss(
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: KLKind = "k3",
    loss_agg: LossAgg = "token_mean",
    norm_constant: float | None = None,
) -> torch.Tensor:
    """KL(policy || ref) penalty as a loss term (GRPO, Shao et al. 2024 eq. 4 uses k3).

    Added as ``loss += kl_coef * kl_loss(...)`` when the KL is not folded into the reward.
    """
    return aggregate_loss(kl_estimate(logp_BT, ref_logp_BT, kind), mask_BT, loss_agg, norm_constant)
