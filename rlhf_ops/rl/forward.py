"""Policy and critic forwards over response tokens only.

A rollout's sequences are prompt + response; only response tokens are actions. `response_batch`
marks them as the targets of a `Batch` (padded or packed), so the LM head and log-softmax run at
action positions alone (N of them), and `to_BT` lays per-action values out as [B, Tr] for the
advantage maths. Values for action t are read at the position that predicts it, i.e. the state
before the action, as in PPO for language models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_ops.algos.logprobs import token_entropy, token_logprobs
from rlhf_ops.data.batching import Batch, collate


@dataclass
class PrefixBatch:
    """One packed row in which consecutive samples with the same prompt carry it once.

    A group is laid out as prompt + completion 1, then each further completion with positions
    continuing from the prompt's length: `models.attention.packed_layout` reads such a sample as a
    branch that also attends to the group's prompt. input_ids_BT, position_ids_BT: [1, T].
    pred_idx_N: the position whose output predicts action n (row-major over samples and actions,
    as `response_batch` orders them; a prompt's last token predicts every completion's first
    action); targets_N: the actions. seq_lens: each sample's length as if it carried its prompt.
    """
    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    pred_idx_N: torch.Tensor
    targets_N: torch.Tensor
    seq_lens: list[int]
    attention_mask: None = None

    def model_inputs(self, padding_mask: bool = False) -> dict:
        return {"input_ids": self.input_ids_BT, "position_ids": self.position_ids_BT, "attention_mask": None}

    def to(self, device: torch.device | str) -> "PrefixBatch":
        return PrefixBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids_BT, self.position_ids_BT,
                                                                       self.pred_idx_N, self.targets_N)), self.seq_lens)


def prefix_batch(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> PrefixBatch:
    """`PrefixBatch` of the samples: runs of consecutive samples with the same prompt share it."""
    ids: list[int] = []
    pos: list[int] = []
    pred: list[int] = []
    tgt: list[int] = []
    i, n = 0, len(sequences)
    while i < n:
        p = prompt_lens[i]
        if p < 1:
            raise ValueError(f"sample {i}: an empty prompt has no position to predict the first action from")
        prompt = list(sequences[i][:p])
        j = i + 1
        while j < n and prompt_lens[j] == p and list(sequences[j][:p]) == prompt:
            j += 1
        last = len(ids) + p - 1  # the prompt's last token: predicts every completion's first action
        ids += prompt
        pos += range(p)
        for r in range(i, j):
            comp = list(sequences[r][p:])
            start = len(ids)
            ids += comp
            pos += range(p, p + len(comp))
            pred += [last, *range(start, start + len(comp) - 1)][:len(comp)]
            tgt += comp
        i = j
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PrefixBatch(as_t(ids)[None], as_t(pos)[None], as_t(pred), as_t(tgt), [len(x) for x in sequences])


def response_batch(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                   packed: bool = False, share_prefix: bool = False) -> Batch | PrefixBatch:
    """The samples as one micro-batch whose targets are the actions: padded, packed, or packed with
    each run of samples of one prompt sharing it (`share_prefix`, --prefix_sharing)."""
    if share_prefix:
        return prefix_batch(sequences, prompt_lens)
    masks = [[0] * p + [1] * (len(s) - p) for s, p in zip(sequences, prompt_lens)]
    return collate(sequences, masks, pad_id, packed=packed)


def _where_and_targets(batch: Batch | PrefixBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(what selects the action positions from [B, T] outputs, the actions in the same order)."""
    if isinstance(batch, PrefixBatch):
        return batch.pred_idx_N, batch.targets_N
    sel_BT = batch.targets_BT != -100
    return sel_BT, batch.targets_BT[sel_BT]


def _rows(where: torch.Tensor, batch: Batch | PrefixBatch) -> torch.Tensor:
    """[B, T] bool: the positions `where` selects (a mask already, or a PrefixBatch's index list)."""
    from rlhf_ops.models.rows import rows_at

    return where if where.dtype == torch.bool else rows_at(where, batch.input_ids_BT.shape)


def action_logprobs(model: torch.nn.Module, batch: Batch | PrefixBatch, temperature: float = 1.0,
                    with_entropy: bool = False, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp_N, entropy_N or None) at the N action positions, row-major.

    `entropy_grad=False` computes the entropy outside autograd (a metric only: no graph over [N, V]).
    """
    from rlhf_ops.models.rows import only_rows

    where, targets_N = _where_and_targets(batch)
    with only_rows(_rows(where, batch)):  # the last layer's MLP at the action positions only
        logits_NV = model(**batch.model_inputs(), use_cache=False, logits_to_keep=where).logits
    logits_NV = logits_NV.reshape(-1, logits_NV.shape[-1])  # a [1, N, V] from index positions
    if temperature not in (0.0, 1.0):
        logits_NV = logits_NV / temperature
    logits_1NV = logits_NV[None]
    logp_N = token_logprobs(logits_1NV, targets_N[None])[0]
    entropy_N = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy_N = token_entropy(logits_1NV)[0]
    return logp_N, entropy_N


def action_values(model: torch.nn.Module, batch: Batch | PrefixBatch) -> torch.Tensor:
    """values_N: the critic's value at the position predicting each action."""
    from rlhf_ops.models.reward import token_values

    where, _ = _where_and_targets(batch)
    values_BT = token_values(model, batch, _rows(where, batch))
    return values_BT[0, where] if isinstance(batch, PrefixBatch) else values_BT[where]


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
