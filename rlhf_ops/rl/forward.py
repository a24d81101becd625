"""Policy and critic forwards over response tokens only.

A rollout's sequences are prompt + response; only response tokens are actions. `response_batch`
marks them as the targets of a `Batch` (padded or packed), so the LM head and log-softmax run at
action positions alone (N of them), and `to_BT` lays per-action values out as [B, Tr] for the
advantage maths. Values for action t are read at the position that predicts it, i.e. the state
before the action, as in PPO for language models.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rlhf_ops.algos.logprobs import token_entropy, token_logprobs
from rlhf_ops.data.batching import Batch, collate


def response_batch(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                   packed: bool = False) -> Batch:
    masks = [[0] * p + [1] * (len(s) - p) for s, p in zip(sequences, prompt_lens)]
    return collate(sequences, masks, pad_id, packed=packed)


def action_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                    with_entropy: bool = False, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp_N, entropy_N or None) at the N action positions, row-major.

    `entropy_grad=False` computes the entropy outside autograd (a metric only: no graph over [N, V]).
    """
    sel_BT = batch.targets_BT != -100
    logits_NV = model(**batch.model_inputs(), use_cache=False, logits_to_keep=sel_BT).logits
    if temperature not in (0.0, 1.0):
        logits_NV = logits_NV / temperature
    logits_1NV = logits_NV[None]
    logp_N = token_logprobs(logits_1NV, batch.targets_BT[sel_BT][None])[0]
    entropy_N = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy_N = token_entropy(logits_1NV)[0]
    return logp_N, entropy_N


def action_values(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """values_N: the critic's value at the position predicting each action."""
    from rlhf_ops.models.reward import token_values

    return token_values(model, batch)[batch.targets_BT != -100]


def to_BT(values_N: torch.Tensor, response_lens: Sequence[int]) -> torch.Tensor:
    """Lay out N per-action values (row-major, sample by sample) as [B, max_len], zero-padded."""
    lens = torch.as_tensor(response_lens)
    mask_BT = torch.arange(int(lens.max()))[None, :] < lens[:, None]
    out = values_N.new_zeros(mask_BT.shape)
    out[mask_BT.to(values_N.device)] = values_N
    return out


def action_mask(response_lens: Sequence[int]) -> torch.Tensor:
    lens = torch.as_tensor(response_lens)
    return torch.arange(int(lens.max()))[None, :] < lens[:, None]
