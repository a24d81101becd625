"""Preference and reward-model losses: pairwise Bradley-Terry, DPO / cDPO / IPO, process RM.

All losses are means over the batch and return a NamedTuple with a detached accuracy.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PairwiseLossOut",
    "DPOLossOut",
    "PRMLossOut",
    "pairwise_reward_loss",
    "dpo_loss",
    "prm_loss",
    "select_prm_logits",
]


class PairwiseLossOut(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor


class DPOLossOut(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor


class PRMLossOut(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor


def pairwise_reward_loss(
    chosen_B: torch.Tensor,
    rejected_B: torch.Tensor,
    margin_B: torch.Tensor | None = None,
    kind: Literal["sigmoid", "logexp"] = "sigmoid",
) -> PairwiseLossOut:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1), mean over pairs.

    * ``sigmoid``: ``-logsigmoid(chosen - rejected - margin)`` (margin as in Llama 2, Touvron 2023).
    * ``logexp``: ``log(1 + exp(rejected - chosen + margin))``, computed as ``softplus`` so a large
      gap cannot overflow. It equals ``sigmoid`` mathematically; it is kept for parity with
      OpenRLHF's ``--loss logexp`` (which ignores the margin; here both kinds apply it).

    ``accuracy``: fraction of pairs with ``chosen > rejected`` (margin not applied).
    """
    diff_B = chosen_B - rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B
    match kind:
        case "sigmoid":
            loss = -F.logsigmoid(diff_B).mean()
        case "logexp":
            loss = F.softplus(-diff_B).mean()
        case _:
            raise ValueError(f"unknown pairwise loss kind {kind!r}; expected 'sigmoid' or 'logexp'")
    accuracy = (chosen_B > rejected_B).to(diff_B.dtype).mean().detach()
    return PairwiseLossOut(loss, accuracy)


def dpo_loss(
    policy_chosen_logps_B: torch.Tensor,
    policy_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> DPOLossOut:
    """DPO loss (Rafailov et al. 2023, eq. 7), with conservative-DPO smoothing or IPO.

    ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (log-ratio margins of sequence logps).

    * DPO: ``-logsigmoid(beta * h)``; with ``label_smoothing = eps`` (cDPO, Mitchell 2023: the
      label is flipped with probability eps) ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``.
    * IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 * beta))^2``. IPO is defined on
      *length-averaged* log-probs: for ``ipo=True`` the caller passes averaged logps
      (:func:`rlhf_ops.algos.logprobs.sequence_logprob_sums` with ``average=True``).
      ``label_smoothing`` does not apply to IPO and must be 0.

    Implicit rewards ``beta * (pi - ref)`` are detached; ``reward_accuracy`` is the fraction of
    pairs with chosen reward > rejected reward.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if ipo and label_smoothing != 0.0:
        raise ValueError("label_smoothing is a (c)DPO option; IPO takes label_smoothing=0")
    chosen_logratio_B = policy_chosen_logps_B - ref_chosen_logps_B
    rejected_logratio_B = policy_rejected_logps_B - ref_rejected_logps_B
    h_B = chosen_logratio_B - rejected_logratio_B
    if ipo:
        losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    else:
        losses_B = -(1.0 - label_smoothing) * F.logsigmoid(beta * h_B) - label_smoothing * F.logsigmoid(
            -beta * h_B
        )
    chosen_rewards = (beta * chosen_logratio_B).detach()
    rejected_rewards = (beta * rejected_logratio_B).detach()
    reward_accuracy = (chosen_rewards > rejected_rewards).to(h_B.dtype).mean()
    return DPOLossOut(losses_B.mean(), chosen_rewards, rejected_rewards, reward_accuracy)


def prm_loss(logits_NK: torch.Tensor, labels_N: torch.Tensor) -> PRMLossOut:
    """Process-reward-model loss at N step placeholders (Lightman et al. 2023; Math-Shepherd).

    ``logits_NK``: logits restricted to the K reward tokens (e.g. K=2 for "+" / "-").
    ``labels_N``:
      * integer (hard) labels, an index into K -> cross-entropy; accuracy = argmax == label;
      * floating (soft) labels, the probability of the *first* (positive) token; needs K == 2
        -> cross-entropy against the soft target ``[p, 1 - p]``; accuracy = argmax agrees with
        ``argmax([p, 1 - p])`` (p = 0.5 counts as positive).
    """
    if logits_NK.dim() != 2 or labels_N.shape != logits_NK.shape[:1]:
        raise ValueError(
            f"expected logits [N, K] and labels [N], got {tuple(logits_NK.shape)} and "
            f"{tuple(labels_N.shape)}"
        )
    logits_NK = logits_NK.float() if logits_NK.dtype != torch.float64 else logits_NK
    if labels_N.is_floating_point():
        if logits_NK.shape[1] != 2:
            raise ValueError(f"soft PRM labels need exactly K=2 reward tokens, got K={logits_NK.shape[1]}")
        p_N = labels_N.to(logits_NK.dtype)
        target_NK = torch.stack([p_N, 1.0 - p_N], dim=-1)
        loss = F.cross_entropy(logits_NK, target_NK)
        hard_N = target_NK.argmax(dim=-1)
    else:
        loss = F.cross_entropy(logits_NK, labels_N)
        hard_N = labels_N
    accuracy = (logits_NK.argmax(dim=-1) == hard_N).to(logits_NK.dtype).mean().detach()
    return PRMLossOut(loss, accuracy)


def select_prm_logits(
    logits_BTV: torch.Tensor,
    input_ids_BT: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    placeholder_token_id: int,
    reward_token_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(logits_NK, labels_N)`` for :func:`prm_loss` from a full LM forward.

    Picks the N positions where ``input_ids == placeholder_token_id`` (logits at the placeholder
    itself, OpenRLHF's convention) and the K columns ``reward_token_ids``. Integer labels there
    are reward *token ids* and are mapped to their index in ``reward_token_ids`` (ValueError if
    one is not a reward token); floating labels are passed through unchanged.
    """
    at_step_BT = input_ids_BT == placeholder_token_id
    ids_K = torch.as_tensor(list(reward_token_ids), device=logits_BTV.device, dtype=torch.long)
    logits_NK = logits_BTV[at_step_BT][:, ids_K]
    labels_N = labels_BT[at_step_BT]
    if not labels_N.is_floating_point():
        hit_NK = labels_N[:, None] == ids_K[None, :]
        if not bool(hit_NK.any(dim=-1).all()):
            raise ValueError(
                f"a hard PRM label at a placeholder is not one of reward_token_ids={list(reward_token_ids)}"
            )
        labels_N = hit_NK.int().argmax(dim=-1)
    return logits_NK, labels_N
