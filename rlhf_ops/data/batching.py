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
from itertools import chain
from typing import Any, Sequence

import numpy as np
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


def _flat(rows: Sequence[Sequence[int]] | Sequence[torch.Tensor], n: int, dtype: Any) -> torch.Tensor:
    """The rows' `n` values concatenated into one 1-D tensor of numpy `dtype`. Lists are read by numpy's
    iterator in C, ~15 ns a value; `torch.tensor(list)` takes ~60."""
    if len(rows) and isinstance(rows[0], torch.Tensor):
        return torch.cat([r.reshape(-1) for r in rows]).to({np.int64: torch.long, np.bool_: torch.bool}[dtype])
    return torch.from_numpy(np.fromiter(chain.from_iterable(rows), dtype=dtype, count=n))


def collate(ids_rows: Sequence[Sequence[int]], mask_rows: Sequence[Sequence[int]], pad_id: int,
            packed: bool = False) -> Batch:
    """Rows (token ids and 0/1 loss masks, one per sample) -> a padded or packed `Batch`.

    A sample's position t gets target ids[t+1] when mask[t+1] is set, -100 otherwise (its last
    position too). Built with a handful of tensor ops over all the micro-batch's tokens: collation
    runs on the host while the device may wait for the next batch: 0.68 ms for 8 x 2048 packed tokens
    on the CPU against 2.85 ms for a Python loop per token (`benchmarks/collate.py`).
    """
    lens = [len(r) for r in ids_rows]
    lens_S = torch.tensor(lens, dtype=torch.long)
    ids_N, mask_N = _flat(ids_rows, sum(lens), np.int64), _flat(mask_rows, sum(lens), np.bool_)
    nxt_N = mask_N[1:].clone()  # position t: is token t+1 a target ...
    nxt_N[lens_S.cumsum(0)[:-1] - 1] = False  # ... of the same sample (not the next sample's first token)
    tgt_N = torch.full_like(ids_N, -100)
    tgt_N[:-1] = torch.where(nxt_N, ids_N[1:], -100)
    if packed:
        starts_N = torch.repeat_interleave(lens_S.cumsum(0) - lens_S, lens_S)
        return Batch(ids_N[None], (torch.arange(len(ids_N)) - starts_N)[None], None, tgt_N[None], lens)
    B, T = len(lens), max(lens)
    valid_BT = torch.arange(T)[None] < lens_S[:, None]  # row-major order of valid_BT's set positions = ids_N's
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    ids[valid_BT] = ids_N
    tgt = torch.full((B, T), -100, dtype=torch.long)
    tgt[valid_BT] = tgt_N
    pos = torch.arange(T).expand(B, T).contiguous()
    return Batch(ids, pos, valid_BT.long(), tgt, lens)

