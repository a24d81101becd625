"""Micro-batches: which rows each rank sees per step, and how rows become tensors.

Order. Each epoch draws one permutation (seeded by seed + epoch). Optimizer step k consumes
rows `perm[k*B:(k+1)*B]` (B = --train_batch_size), cut into micro-batches of
--micro_train_batch_size; micro-batch c goes to rank `c % world`. So the set of micro-batches
behind every optimizer step is the same for any world size, which is what makes one process
and two processes give the same loss curve. A trailing partial step is dropped.

Layout. Unpacked: rows right-padded to the longest row. Packed (`--packing_samples`): the
micro-batch's rows concatenated into one row, position ids restarting at each sample, and no
mask: the position ids mark the samples, and attention stays within each (flash-attn's varlen
kernels, `models.attention`'s padding-free SDPA, or the block mask Hugging Face builds from the
position ids for its own sdpa/eager).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def epoch_micro_batches(num_rows: int, train_batch_size: int, micro_batch_size: int, world_size: int,
                        rank: int, epoch: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """This rank's micro-batches (lists of row indices) for one epoch, in order."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_rows, generator=g).tolist() if shuffle else list(range(num_rows))
    steps = num_rows // train_batch_size
    used = perm[: steps * train_batch_size]
    chunks = [used[i:i + micro_batch_size] for i in range(0, len(used), micro_batch_size)]
    return chunks[rank::world_size]


def eval_micro_batches(num_rows: int, micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Every row exactly once across ranks (the last micro-batch may be short)."""
    chunks = [list(range(i, min(i + micro_batch_size, num_rows))) for i in range(0, num_rows, micro_batch_size)]
    return chunks[rank::world_size]


@dataclass
class Batch:
    """Model inputs for one micro-batch.

    input_ids_BT, position_ids_BT: [B, T] long.
    attention_mask: [B, T] long (padded) or None (packed: the position ids mark the samples).
    targets_BT: [B, T] long, the token to predict at each position (-100 where there is none:
        prompt tokens, padding, sample boundaries). Already shifted: targets_BT[:, t] = input_ids[:, t+1].
    seq_lens: tokens per sample, in order (one entry per sample, packed or not).
    """
    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    attention_mask: torch.Tensor | None
    targets_BT: torch.Tensor
    seq_lens: list[int]

    @property
    def num_targets(self) -> int:
        return int((self.targets_BT != -100).sum())

    def model_inputs(self, padding_mask: bool = False) -> dict:
        """Keyword arguments for a Hugging Face forward.

        Padded rows are right-padded, so the causal mask alone is exact for every real token (none
        ever attends to a later pad): the [B, T] mask is left out unless `padding_mask` asks for it
        (MoE router statistics must not count pads). Without it HF builds no [B, 1, T, T] mask and
        SDPA takes its mask-free causal kernel, which is faster on CPU and GPU alike.
        """
        mask = self.attention_mask
        if mask is not None and mask.ndim == 2 and not padding_mask:
            mask = None
        return {"input_ids": self.input_ids_BT, "position_ids": self.position_ids_BT, "attention_mask": mask}

    def to(self, device: torch.device | str) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids_BT), mv(self.position_ids_BT), mv(self.attention_mask),
                     mv(self.targets_BT), self.seq_lens)


def _targets(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """Shifted targets for one sample: position t predicts ids[t+1] when mask[t+1] is set."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def collate(ids_rows: Sequence[Sequence[int]], mask_rows: Sequence[Sequence[int]], pad_id: int,
            packed: bool = False) -> Batch:
    lens = [len(r) for r in ids_rows]
    if packed:
        ids = torch.tensor([t for r in ids_rows for t in r], dtype=torch.long)[None]
        tgt = torch.tensor([t for r, m in zip(ids_rows, mask_rows) for t in _targets(r, m)], dtype=torch.long)[None]
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        return Batch(ids, pos, None, tgt, lens)
    T = max(lens)
    ids = torch.full((len(lens), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(lens), T), -100, dtype=torch.long)
    att = torch.zeros((len(lens), T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(ids_rows, mask_rows)):
        ids[i, : len(r)] = torch.as_tensor(r)
        tgt[i, : len(r)] = torch.as_tensor(_targets(r, m))
        att[i, : len(r)] = 1
    pos = torch.arange(T).expand(len(lens), T).contiguous()
    return Batch(ids, pos, att, tgt, lens)

