"""Rewards, returns and advantages for the RL stage.

Shapes: ``B = P * G`` response rows (P prompts x G samples each), row index ``p * G + g``;
``T`` response tokens; ``mask_BT`` is 1 on response tokens that the policy generated.

Masked positions are *skipped* by the recursions (GAE, returns-to-go): a hole in the mask is
treated as if the token did not exist, and the value after the last valid token is 0. For the
usual right-padded responses this is exactly OpenRLHF's recursion. Masked outputs are 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from rlhf_ops.algos.masked import masked_mean, masked_whiten

__all__ = [
    "AdvantageEstimator",
    "AdvantageOut",
    "gae",
    "token_rewards_with_kl",
    "discounted_returns",
    "rloo_baseline_PG",
    "group_mean_baseline_PG",
    "group_norm_PG",
    "dr_grpo_PG",
    "compute_advantages",
]

AdvantageEstimator = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"]


class AdvantageOut(NamedTuple):
    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor


def _valid(mask_BT: torch.Tensor) -> torch.Tensor:
    return mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0


def _last_valid_BT(mask_BT: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: True only at the last valid token of each row (none for an empty row)."""
    valid_BT = _valid(mask_BT)
    pos_T = torch.arange(valid_BT.shape[-1], device=valid_BT.device)
    last_B = torch.where(valid_BT, pos_T, -1).amax(dim=-1)
    return valid_BT & (pos_T == last_B[:, None])


def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    lambd: float = 1.0,
) -> AdvantageOut:
    """Generalised Advantage Estimation (Schulman et al. 2016, eqs. 11-16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lambd * A_{t+1}``;
    ``returns_t = A_t + V_t`` (the value target). ``V`` after the last valid token is 0.
    """
    valid_BT = _valid(mask_BT)
    B, T = rewards_BT.shape
    zero_B = rewards_BT.new_zeros(B)
    next_value_B, last_gae_B = zero_B, zero_B
    adv_cols: list[torch.Tensor] = [zero_B] * T
    for t in reversed(range(T)):
        m_B = valid_BT[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        gae_B = delta_B + gamma * lambd * last_gae_B
        last_gae_B = torch.where(m_B, gae_B, last_gae_B)
        next_value_B = torch.where(m_B, values_BT[:, t], next_value_B)
        adv_cols[t] = torch.where(m_B, gae_B, zero_B)
    advantages_BT = torch.stack(adv_cols, dim=1) if T else rewards_BT.new_zeros(B, 0)
    returns_BT = torch.where(valid_BT, advantages_BT + values_BT, torch.zeros_like(advantages_BT))
    return AdvantageOut(advantages_BT, returns_BT)


def token_rewards_with_kl(
    scores_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward ``-kl_coef * kl_t`` plus the scalar score on the last valid token.

    InstructGPT (Ouyang et al. 2022, eq. 2) / OpenRLHF ``compute_reward``. Deviation: no reward
    clipping here (clip scores before calling if wanted). A row with no valid token gets nothing.
    """
    valid_BT = _valid(mask_BT)
    dtype = torch.promote_types(kl_BT.dtype, scores_B.dtype)
    zeros_BT = torch.zeros_like(kl_BT, dtype=dtype)
    rewards_BT = torch.where(valid_BT, -kl_coef * kl_BT.to(dtype), zeros_BT)
    score_BT = scores_B.to(dtype)[:, None].expand_as(zeros_BT)
    return rewards_BT + torch.where(_last_valid_BT(mask_BT), score_BT, zeros_BT)


def discounted_returns(
    rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Return-to-go ``G_t = r_t + gamma * G_{t+1}`` over valid tokens (REINFORCE++, Hu 2025)."""
    valid_BT = _valid(mask_BT)
    B, T = rewards_BT.shape
    zero_B = rewards_BT.new_zeros(B)
    running_B = zero_B
    cols: list[torch.Tensor] = [zero_B] * T
    for t in reversed(range(T)):
        running_B = torch.where(valid_BT[:, t], rewards_BT[:, t] + gamma * running_B, running_B)
        cols[t] = torch.where(valid_BT[:, t], running_B, zero_B)
    return torch.stack(cols, dim=1) if T else rewards_BT.new_zeros(B, 0)


def _check_group(scores_PG: torch.Tensor, name: str) -> int:
    if scores_PG.dim() != 2:
        raise ValueError(f"{name}: scores must be shaped [P, G], got {tuple(scores_PG.shape)}")
    G = scores_PG.shape[1]
    if G < 2:
        raise ValueError(
            f"{name} is a group estimator and needs G >= 2 samples per prompt, got G={G}: the "
            "baseline would be undefined or equal to the score itself, so every advantage would "
            "silently be 0. Raise n_samples_per_prompt or use 'gae' / 'reinforce'."
        )
    return G


def rloo_baseline_PG(scores_PG: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline (Ahmadian et al. 2024, RLOO): mean of the *other* G-1 scores.

    Returns the baseline ``b[p, g]``; the RLOO advantage is ``scores_PG - b``.
    """
    G = _check_group(scores_PG, "rloo")
    return (scores_PG.sum(dim=-1, keepdim=True) - scores_PG) / (G - 1)


def group_mean_baseline_PG(scores_PG: torch.Tensor) -> torch.Tensor:
    """Group-mean baseline (REINFORCE++-baseline): the mean of all G scores, broadcast to [P, G]."""
    _check_group(scores_PG, "group mean baseline")
    return scores_PG.mean(dim=-1, keepdim=True).expand_as(scores_PG)


def group_norm_PG(
    scores_PG: torch.Tensor, eps: float = 1e-6, std_norm: bool = True
) -> torch.Tensor:
    """GRPO advantage (Shao et al. 2024, sec. 4.1.2): ``(r - mean) / (std + eps)`` per group.

    ``std`` is the unbiased (Bessel) sample std, as ``torch.std`` in OpenRLHF/TRL.
    ``std_norm=False`` keeps only the mean-centering.
    """
    _check_group(scores_PG, "group_norm")
    centered_PG = scores_PG - scores_PG.mean(dim=-1, keepdim=True)
    if not std_norm:
        return centered_PG
    return centered_PG / (scores_PG.std(dim=-1, keepdim=True) + eps)


def dr_grpo_PG(scores_PG: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``r - mean``."""
    _check_group(scores_PG, "dr_grpo")
    return scores_PG - scores_PG.mean(dim=-1, keepdim=True)


def compute_advantages(
    estimator: AdvantageEstimator,
    *,
    scores_PG: torch.Tensor,
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    values_BT: torch.Tensor | None = None,
    kl_coef: float,
    gamma: float = 1.0,
    lambd: float = 1.0,
    std_norm: bool = True,
) -> AdvantageOut:
    """Advantages and returns for one rollout batch (the only dispatch on the estimator).

    Semantics follow OpenRLHF (``experience_maker.py``). "KL-shaped returns" below means:
    :func:`token_rewards_with_kl` on the (baselined) score, then :func:`discounted_returns`.

    * ``gae``: KL-shaped token rewards -> :func:`gae` with ``values_BT`` -> global whitening.
    * ``reinforce`` (REINFORCE++): KL-shaped returns -> global whitening.
    * ``reinforce_baseline``: score minus group mean -> KL-shaped returns -> global whitening.
    * ``rloo``: score minus leave-one-out mean -> KL-shaped returns; no whitening.
    * ``group_norm`` (GRPO): :func:`group_norm_PG` score -> KL-shaped returns; no whitening. With
      ``gamma=1`` and ``kl_coef=0`` (KL goes in the loss) this is the normalised score broadcast
      to every response token.
    * ``dr_grpo``: score minus group mean -> KL-shaped returns; no std anywhere. Dr. GRPO also drops
      length normalisation: the caller must aggregate the policy loss with
      ``loss_agg="seq_mean_token_sum_norm"`` and a constant ``norm_constant`` (generate_max_len).

    "Global whitening" is :func:`masked_whiten` over all valid tokens of this batch (pass the
    whole rollout, not a micro-batch). ``std_norm=False`` (``--no_advantage_std_norm``) keeps
    mean-centering but never divides by a std (global or group); it changes nothing for ``rloo``
    and ``dr_grpo``. ``returns_BT`` is the un-whitened value target (GAE) / return-to-go.
    ``lambd`` is used by ``gae`` only. Inputs are detached: outputs never carry gradient.
    """
    if scores_PG.dim() != 2:
        raise ValueError(f"scores_PG must be [P, G], got {tuple(scores_PG.shape)}")
    B = scores_PG.numel()
    if kl_BT.shape != mask_BT.shape or kl_BT.shape[0] != B:
        raise ValueError(
            f"kl_BT {tuple(kl_BT.shape)} and mask_BT {tuple(mask_BT.shape)} must both be "
            f"[P*G={B}, T] to match scores_PG {tuple(scores_PG.shape)}"
        )
    scores_PG, kl_BT = scores_PG.detach(), kl_BT.detach()

    def kl_shaped_returns(shaped_PG: torch.Tensor) -> torch.Tensor:
        rewards_BT = token_rewards_with_kl(shaped_PG.reshape(B), kl_BT, mask_BT, kl_coef)
        return discounted_returns(rewards_BT, mask_BT, gamma=gamma)

    match estimator:
        case "gae":
            if values_BT is None:
                raise ValueError("estimator 'gae' needs values_BT (a critic); got None")
            rewards_BT = token_rewards_with_kl(scores_PG.reshape(B), kl_BT, mask_BT, kl_coef)
            advantages_BT, returns_BT = gae(
                rewards_BT, values_BT.detach(), mask_BT, gamma=gamma, lambd=lambd
            )
            whiten = True
        case "reinforce":
            advantages_BT = returns_BT = kl_shaped_returns(scores_PG)
            whiten = True
        case "reinforce_baseline":
            advantages_BT = returns_BT = kl_shaped_returns(
                scores_PG - group_mean_baseline_PG(scores_PG)
            )
            whiten = True
        case "rloo":
            advantages_BT = returns_BT = kl_shaped_returns(scores_PG - rloo_baseline_PG(scores_PG))
            whiten = False
        case "group_norm":
            advantages_BT = returns_BT = kl_shaped_returns(group_norm_PG(scores_PG, std_norm=std_norm))
            whiten = False
        case "dr_grpo":
            advantages_BT = returns_BT = kl_shaped_returns(dr_grpo_PG(scores_PG))
            whiten = False
        case _:
            raise ValueError(
                f"unknown advantage estimator {estimator!r}; expected one of "
                "'gae', 'reinforce', 'reinforce_baseline', 'rloo', 'group_norm', 'dr_grpo'"
            )
    if whiten:
        if std_norm:
            advantages_BT = masked_whiten(advantages_BT, mask_BT)
        else:
            centered_BT = advantages_BT - masked_mean(advantages_BT, mask_BT)
            advantages_BT = torch.where(_valid(mask_BT), centered_BT, torch.zeros_like(centered_BT))
    return AdvantageOut(advantages_BT, returns_BT)
