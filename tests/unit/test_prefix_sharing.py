"""--prefix_sharing: the G samples of one prompt carry it once in a packed micro-batch.

The prompt's tokens are computed once; each further completion attends to them through
`packed_layout`'s branch slots. Everything a loss reads must equal the unshared packed batch:
the action logprobs, the critic's values, and the gradients (autograd sums the shared prompt's
over the branches, as computing it G times would).
"""
import pytest
import torch

from rlhf_ops.models.attention import packed_layout
from rlhf_ops.models.loading import load_causal_lm
from rlhf_ops.rl.forward import action_logprobs, prefix_batch, response_batch

# two prompts x three completions (one of length 1), then a prompt of its own
PROMPTS = [[1, 9, 8, 7], [1, 40, 41, 42, 43]]
COMPLETIONS = [[[30, 31, 2], [33, 2], [34, 35, 36, 37]], [[50], [51, 52, 2], [53, 54]]]
SEQS = [p + c for p, cs in zip(PROMPTS, COMPLETIONS) for c in cs] + [[1, 77, 78, 5, 6]]
PLENS = [len(p) for p, cs in zip(PROMPTS, COMPLETIONS) for _ in cs] + [3]


def test_layout_of_a_shared_row():
    b = prefix_batch(SEQS[:3], PLENS[:3])
    assert b.input_ids_BT[0].tolist() == [1, 9, 8, 7, 30, 31, 2, 33, 2, 34, 35, 36, 37]
    assert b.position_ids_BT[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 4, 5, 6, 7]
    assert b.targets_N.tolist() == [30, 31, 2, 33, 2, 34, 35, 36, 37]
    assert b.pred_idx_N.tolist() == [3, 4, 5, 3, 7, 3, 9, 10, 11]   # token 3 (the prompt's last) predicts 3 firsts
    lay = packed_layout(b.position_ids_BT)
    assert (lay.num_samples, lay.max_len) == (3, 8)
    # slot 1 = prompt (tokens 0-3) + completion 2 (tokens 7-8); slot 2 = prompt + completion 3 (tokens 9-12)
    assert lay.pad_src_SL.view(3, 8).tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 7, 8, 0, 0],
                                                  [0, 1, 2, 3, 9, 10, 11, 12]]
    assert lay.slot_N.tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 13, 20, 21, 22, 23]


def test_a_branch_longer_than_its_group_opening_is_refused():
    with pytest.raises(ValueError, match="starts at position 5.*holds only 3 tokens"):
        packed_layout(torch.tensor([[0, 1, 2, 5, 6, 0, 1]]))


def test_different_prompts_are_not_merged():
    b = prefix_batch([[1, 2, 3, 9], [1, 2, 4, 9]], [3, 3])  # same length, different last prompt token
    assert b.position_ids_BT[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.input_ids_BT.shape[1] == 8


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)).train()


def _logp_and_grads(model, batch):
    model.zero_grad()
    logp, ent = action_logprobs(model, batch, temperature=0.7, with_entropy=True)
    w = torch.linspace(-1, 1, logp.numel())
    ((logp * w).sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logprobs_entropies_and_gradients_equal_the_unshared_batch(model):
    shared = prefix_batch(SEQS, PLENS)
    assert shared.input_ids_BT.shape[1] < sum(map(len, SEQS))  # the prompts were carried once
    got = _logp_and_grads(model, shared)
    want = _logp_and_grads(model, response_batch(SEQS, PLENS, 0, packed=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == want[2].keys() and len(got[2]) > 10
    # relative to each gradient's scale: the two layouts sum the same terms in different orders, and entries
    # that cancel to near 0 keep an absolute rounding error of the size of the terms (3.8e-6 of 9.2 in the
    # embedding's gradient on an Intel Xeon with AMX; within 1e-6 on an AMD EPYC)
    for name in want[2]:
        diff, scale = float((got[2][name] - want[2][name]).abs().max()), float(want[2][name].abs().max())
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_critic_values_equal_the_unshared_batch(tiny_model_dir):
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.rl.forward import action_values

    critic = load_value_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        got = action_values(critic, prefix_batch(SEQS, PLENS))
        want = action_values(critic, response_batch(SEQS, PLENS, 0, packed=True))
    assert got.shape == (sum(len(s) - p for s, p in zip(SEQS, PLENS)),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_micro_batches_take_whole_prompt_groups(tmp_path):
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.rl.update import plan_updates

    fn = tmp_path / "r.py"
    fn.write_text("def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n")
    kw = dict(pretrain=str(tmp_path), prompt_data="unused", reward_func=str(fn), n_samples_per_prompt=4,
              rollout_batch_size=6, train_batch_size=8, micro_train_batch_size=4, max_epochs=2, packing_samples=True)
    lens = list(range(1, 25))  # 6 prompts x 4 samples
    shared = plan_updates(lens, RLConfig(**kw, prefix_sharing=True), seed=0)
    micro = [idx for step in shared for idx, _ in step]
    assert all(sorted(m) == list(range(m[0], m[0] + 4)) and m[0] % 4 == 0 for m in micro)  # one whole group each
    for epoch in (micro[:6], micro[6:]):
        assert sorted(i for m in epoch for i in m) == list(range(24))                      # every row once per epoch
    assert micro[:6] != micro[6:]                                                          # reshuffled each epoch
    rows = [idx for step in plan_updates(lens, RLConfig(**kw), seed=0) for idx, _ in step]
    assert any(len({i // 4 for i in m}) > 1 for m in rows)  # without sharing, rows are shuffled one by one


# ---------------------------------------------------------------------------------------------- reward model

CHOSEN = [[1, 9, 8, 7, 30, 31, 2], [1, 40, 41, 50, 2], [1, 5, 6, 2]]
REJECTED = [[1, 9, 8, 7, 33, 2], [1, 40, 41, 50, 51, 2], [1, 5, 6]]  # 2nd: chosen + more; 3rd: a prefix of chosen


def test_shared_pair_row_layout():
    from rlhf_ops.data.preference import shared_pair_row

    b, last = shared_pair_row(CHOSEN, REJECTED)
    assert b.input_ids_BT[0].tolist() == [1, 9, 8, 7, 30, 31, 2, 33, 2, 1, 40, 41, 50, 2, 51, 2, 1, 5, 6, 2, 6]
    assert b.position_ids_BT[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 3, 4, 4, 5, 0, 1, 2, 3, 2]
    assert last.tolist() == [6, 13, 19, 8, 15, 20]  # chosen then rejected; the 3rd rejected keeps its last token
    assert b.seq_lens == [len(x) for x in CHOSEN + REJECTED]


def test_reward_model_rewards_loss_and_gradients_equal_the_unshared_batch(tiny_model_dir):
    from rlhf_ops.data.batching import collate
    from rlhf_ops.data.preference import PairBatch, shared_pair_row
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.trainers.rm import rm_step

    rm = load_value_model(str(tiny_model_dir)).train()
    plain = PairBatch(collate(CHOSEN + REJECTED, [[1] * len(x) for x in CHOSEN + REJECTED], 0, packed=True), 3)
    shared = PairBatch(*shared_pair_row(CHOSEN, REJECTED)[:1], 3, None, shared_pair_row(CHOSEN, REJECTED)[1])
    assert shared.batch.input_ids_BT.numel() < plain.batch.input_ids_BT.numel()
    out = {}
    for name, pb in (("plain", plain), ("shared", shared)):
        rm.zero_grad()
        loss, m = rm_step(rm, pb)
        loss.backward()
        out[name] = (loss.detach(), m, {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["shared"][0], out["plain"][0], rtol=1e-5, atol=1e-6)
    for k in ("chosen_reward", "rejected_reward", "margin"):
        assert float(out["shared"][1][k][0]) == pytest.approx(float(out["plain"][1][k][0]), rel=1e-4, abs=1e-6), k
    assert out["plain"][2].keys() == out["shared"][2].keys() and len(out["plain"][2]) > 10
    for n in out["plain"][2]:
        torch.testing.assert_close(out["shared"][2][n], out["plain"][2][n], rtol=1e-4, atol=1e-6, msg=n)
