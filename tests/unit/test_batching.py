"""rlhf_ops.data.batching: per-rank micro-batch order, padded/packed collate."""
from __future__ import annotations

import random

import pytest
import torch

from rlhf_ops.data.batching import collate, epoch_micro_batches, eval_micro_batches

PAD = 0


def rank_step_micro_batches(num_rows, B, M, world, epoch, seed, shuffle=True):
    """{step k: [micro-batches behind step k, from all ranks]} as a data-parallel loop consumes them:
    rank r runs grad_accum = B / (M * world) micro-batches of its own list per optimizer step."""
    accum = B // (M * world)
    per_rank = [epoch_micro_batches(num_rows, B, M, world, r, epoch, seed, shuffle) for r in range(world)]
    steps = {len(mbs) // accum for mbs in per_rank}
    assert len(steps) == 1 and all(len(mbs) % accum == 0 for mbs in per_rank)
    return {k: [mb for mbs in per_rank for mb in mbs[k * accum:(k + 1) * accum]] for k in range(steps.pop())}


def reference_permutation(num_rows, epoch, seed):
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


@pytest.mark.parametrize("num_rows,B,M", [(50, 8, 2), (64, 16, 4), (37, 4, 2), (20, 4, 1)])
def test_every_step_sees_the_same_global_slice_for_world_sizes_1_and_2(num_rows, B, M):
    for epoch in (0, 3):
        perm = reference_permutation(num_rows, epoch, seed=7)
        by_world = {w: rank_step_micro_batches(num_rows, B, M, w, epoch, seed=7) for w in (1, 2)}
        assert len(by_world[1]) == len(by_world[2]) == num_rows // B  # a partial final step is dropped
        for k in range(num_rows // B):
            expected = perm[k * B:(k + 1) * B]
            for w in (1, 2):
                mbs = by_world[w][k]
                assert all(len(mb) == M for mb in mbs)
                assert sorted(i for mb in mbs for i in mb) == sorted(expected)
            # identical micro-batches (same rows together), whichever rank runs them
            assert sorted(map(tuple, by_world[1][k])) == sorted(map(tuple, by_world[2][k]))
            assert {tuple(expected[j:j + M]) for j in range(0, B, M)} == set(map(tuple, by_world[1][k]))


def test_partial_final_step_is_dropped_and_no_row_repeats_within_an_epoch():
    num_rows, B, M = 37, 8, 2
    perm = reference_permutation(num_rows, 0, seed=1)
    for w in (1, 2):
        used = [i for r in range(w) for mb in epoch_micro_batches(num_rows, B, M, w, r, 0, 1) for i in mb]
        assert len(used) == len(set(used)) == 32
        assert set(used) == set(perm[:32]) and not set(used) & set(perm[32:])


def test_order_is_deterministic_for_a_seed_and_differs_across_epochs_and_seeds():
    args = dict(num_rows=100, train_batch_size=10, micro_batch_size=5, world_size=2, rank=1)
    a = epoch_micro_batches(**args, epoch=0, seed=42)
    assert a == epoch_micro_batches(**args, epoch=0, seed=42)
    assert a != epoch_micro_batches(**args, epoch=1, seed=42)
    assert a != epoch_micro_batches(**args, epoch=0, seed=43)
    flat = lambda mbs: sorted(i for mb in mbs for i in mb)  # noqa: E731
    both = [epoch_micro_batches(**{**args, "rank": r}, epoch=1, seed=42) for r in (0, 1)]
    assert flat(both[0] + both[1]) == list(range(100))  # 100 = 10 full steps: every row, once


def test_no_shuffle_keeps_file_order():
    assert epoch_micro_batches(10, 4, 2, 2, 0, epoch=5, seed=3, shuffle=False) == [[0, 1], [4, 5]]
    assert epoch_micro_batches(10, 4, 2, 2, 1, epoch=5, seed=3, shuffle=False) == [[2, 3], [6, 7]]


@pytest.mark.parametrize("num_rows,M,world", [(1, 4, 1), (23, 4, 1), (23, 4, 2), (23, 5, 3), (8, 4, 2), (3, 2, 4)])
def test_eval_micro_batches_cover_every_row_exactly_once(num_rows, M, world):
    per_rank = [eval_micro_batches(num_rows, M, world, r) for r in range(world)]
    rows = [i for mbs in per_rank for mb in mbs for i in mb]
    assert sorted(rows) == list(range(num_rows))
    assert all(1 <= len(mb) <= M for mbs in per_rank for mb in mbs)


# --- collate -----------------------------------------------------------------------------------


IDS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
MASKS = [[0, 1, 1, 1], [0, 1], [0, 0, 1]]


def test_padded_collate_by_hand():
    b = collate(IDS, MASKS, PAD)
    assert b.input_ids_BT.tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD], [11, 12, 13, PAD]]
    assert b.targets_BT.tolist() == [[6, 7, 8, -100], [10, -100, -100, -100], [-100, 13, -100, -100]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert b.position_ids_BT.tolist() == [[0, 1, 2, 3]] * 3
    assert b.seq_lens == [4, 2, 3] and b.num_targets == 5
    assert b.input_ids_BT.dtype == b.targets_BT.dtype == b.position_ids_BT.dtype == torch.long


def test_packed_collate_by_hand_positions_restart_per_sample():
    b = collate(IDS, MASKS, PAD, packed=True)
    assert b.input_ids_BT.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b.position_ids_BT.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    # the last token of a sample never predicts the first token of the next one
    assert b.targets_BT.tolist() == [[6, 7, 8, -100, 10, -100, -100, 13, -100]]
    assert b.seq_lens == [4, 2, 3] and b.num_targets == 5
    assert b.attention_mask is None  # the position ids mark the samples (models.attention, flash-attn)


def test_packed_and_padded_carry_the_same_targets_in_the_same_order():
    rng = random.Random(1)
    ids = [[rng.randint(6, 500) for _ in range(rng.randint(2, 12))] for _ in range(6)]
    masks = [[int(rng.random() < 0.6) for _ in r] for r in ids]
    padded, packed = collate(ids, masks, PAD), collate(ids, masks, PAD, packed=True)
    assert packed.num_targets == padded.num_targets
    kept = lambda b: b.targets_BT[b.targets_BT != -100].tolist()  # noqa: E731
    assert kept(padded) == kept(packed)


def _reference_targets(ids: list[int], mask: list[int]) -> list[int]:
    """One sample's targets, token by token: position t predicts ids[t+1] when mask[t+1] is set."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("as_tensors", [False, True])
def test_collate_matches_the_per_token_definition(seed, as_tensors):
    # masks set at random, first tokens included (a sample's target never comes from the next sample's
    # first token), one-token samples included
    rng = random.Random(seed)
    ids = [[rng.randint(6, 500) for _ in range(rng.choice([1, 2, rng.randint(3, 40)]))] for _ in range(rng.randint(1, 7))]
    masks = [[int(rng.random() < 0.7) for _ in r] for r in ids]
    args = ([torch.tensor(r) for r in ids], [torch.tensor(m) for m in masks]) if as_tensors else (ids, masks)
    tgts = [_reference_targets(r, m) for r, m in zip(ids, masks)]
    packed, padded = collate(*args, PAD, packed=True), collate(*args, PAD)
    assert packed.input_ids_BT.tolist() == [[t for r in ids for t in r]]
    assert packed.targets_BT.tolist() == [[t for r in tgts for t in r]]
    assert packed.position_ids_BT.tolist() == [[p for r in ids for p in range(len(r))]]
    T = max(map(len, ids))
    assert padded.input_ids_BT.tolist() == [r + [PAD] * (T - len(r)) for r in ids]
    assert padded.targets_BT.tolist() == [r + [-100] * (T - len(r)) for r in tgts]
    assert padded.attention_mask.tolist() == [[1] * len(r) + [0] * (T - len(r)) for r in ids]
    assert padded.position_ids_BT.tolist() == [list(range(T))] * len(ids)
    assert packed.seq_lens == padded.seq_lens == [len(r) for r in ids]
    for b in (packed, padded):
        assert b.input_ids_BT.dtype == b.targets_BT.dtype == b.position_ids_BT.dtype == torch.long
