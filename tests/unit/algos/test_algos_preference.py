"""rlhf_ops.algos.preference: pairwise RM, DPO / cDPO / IPO and PRM losses."""

import math

import pytest
import torch

from rlhf_ops.algos.preference import dpo_loss, pairwise_reward_loss, prm_loss, select_prm_logits

F64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def softplus(x):  # log(1 + e^x), in plain Python
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("kind", ["sigmoid", "logexp"])
def test_pairwise_loss_hand_values(kind):
    # gaps c - r = [1, -1]: losses softplus(-1) = 0.313262, softplus(1) = 1.313262 -> mean 0.813262
    out = pairwise_reward_loss(t64([2.0, 0.0]), t64([1.0, 1.0]), kind=kind)
    assert out.loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-15)
    assert out.accuracy.item() == 0.5
    # margins [0.5, 0]: gaps [0.5, -1] -> (softplus(-0.5) + softplus(1)) / 2
    out_m = pairwise_reward_loss(t64([2.0, 0.0]), t64([1.0, 1.0]), margin_B=t64([0.5, 0.0]), kind=kind)
    assert out_m.loss.item() == pytest.approx((softplus(-0.5) + softplus(1)) / 2, abs=1e-15)


def test_pairwise_logexp_is_stable_for_large_gaps():
    chosen, rejected = torch.tensor([0.0]), torch.tensor([1000.0])
    assert math.isinf(torch.log(1 + torch.exp(rejected - chosen)).item())  # the naive formula overflows
    for kind in ("sigmoid", "logexp"):
        assert pairwise_reward_loss(chosen, rejected, kind=kind).loss.item() == 1000.0
    with pytest.raises(ValueError, match="unknown pairwise"):
        pairwise_reward_loss(chosen, rejected, kind="hinge")


def _dpo_hand_inputs():
    # pair 0: pi_c -1, pi_r -3, ref -2 / -2 -> chosen logratio 1, rejected -1, h = 2
    # pair 1: everything -1 -> h = 0
    return t64([-1.0, -1.0]), t64([-3.0, -1.0]), t64([-2.0, -1.0]), t64([-2.0, -1.0])


def test_dpo_hand_values():
    # beta 0.5: beta h = [1, 0] -> losses softplus(-1) = 0.313262, ln 2 = 0.693147
    out = dpo_loss(*_dpo_hand_inputs(), beta=0.5)
    assert out.loss.item() == pytest.approx((softplus(-1) + math.log(2)) / 2, abs=1e-15)
    torch.testing.assert_close(out.chosen_rewards, t64([0.5, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, t64([-0.5, 0.0]))
    assert out.reward_accuracy.item() == 0.5  # the tie does not count


def test_cdpo_label_smoothing_hand_values():
    # eps 0.1: 0.9 softplus(-beta h) + 0.1 softplus(beta h); softplus(x) = x + softplus(-x) so
    # pair 0: softplus(-1) + 0.1 * 1 = 0.413262; pair 1: ln 2 (symmetric)
    out = dpo_loss(*_dpo_hand_inputs(), beta=0.5, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx((softplus(-1) + 0.1 + math.log(2)) / 2, abs=1e-15)


def test_ipo_hand_values():
    # beta 0.25 -> target 1 / (2 beta) = 2: (2 - 2)^2 = 0, (0 - 2)^2 = 4 -> mean 2
    out = dpo_loss(*_dpo_hand_inputs(), beta=0.25, ipo=True)
    assert out.loss.item() == 2.0
    torch.testing.assert_close(out.chosen_rewards, t64([0.25, 0.0]))


def test_dpo_matches_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, generator=g, dtype=F64) * 5 for _ in range(4)]
    out = dpo_loss(*xs, beta=0.2, label_smoothing=0.2)
    want = 0.0
    for pc, pr, rc, rr in zip(*(x.tolist() for x in xs)):
        h = 0.2 * ((pc - rc) - (pr - rr))
        want += 0.8 * -math.log(1 / (1 + math.exp(-h))) + 0.2 * -math.log(1 / (1 + math.exp(h)))
    assert out.loss.item() == pytest.approx(want / 8, abs=1e-12)


def test_dpo_invalid_arguments():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_dpo_hand_inputs(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_dpo_hand_inputs(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="IPO"):
        dpo_loss(*_dpo_hand_inputs(), label_smoothing=0.1, ipo=True)


def test_prm_hard_labels_hand_values():
    # row 0 logits [2, 0], label 0: -log softmax = softplus(-2); row 1 logits [0, 1], label 0: softplus(1)
    logits, labels = t64([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    out = prm_loss(logits, labels)
    assert out.loss.item() == pytest.approx((softplus(-2) + softplus(1)) / 2, abs=1e-15)
    assert out.accuracy.item() == 0.5  # argmax [0, 1] vs labels [0, 0]


def test_prm_soft_labels_hand_values():
    # p(positive) = [0.8, 0.3]; soft CE = -(p log s0 + (1 - p) log s1)
    # row 0 [2, 0]: 0.8 softplus(-2) + 0.2 softplus(2); row 1 [0, 1]: 0.3 softplus(1) + 0.7 softplus(-1)
    logits, p = t64([[2.0, 0.0], [0.0, 1.0]]), t64([0.8, 0.3])
    out = prm_loss(logits, p)
    want = (0.8 * softplus(-2) + 0.2 * softplus(2) + 0.3 * softplus(1) + 0.7 * softplus(-1)) / 2
    assert out.loss.item() == pytest.approx(want, abs=1e-15)
    assert out.accuracy.item() == 1.0  # targets argmax [0, 1] == predictions [0, 1]
    with pytest.raises(ValueError, match="K=2"):
        prm_loss(torch.zeros(2, 3), torch.tensor([0.5, 0.5]))


def test_select_prm_logits_picks_placeholders_and_maps_token_ids():
    V, placeholder, plus, minus = 10, 9, 5, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, V, generator=g, dtype=F64)
    input_ids = torch.tensor([[1, 9, 2, 9], [9, 3, 3, 3]])
    labels = torch.tensor([[-100, 5, -100, 6], [6, -100, -100, -100]])
    logits_NK, labels_N = select_prm_logits(
        logits, input_ids, labels, placeholder_token_id=placeholder, reward_token_ids=[plus, minus]
    )
    want = torch.stack([logits[0, 1, [5, 6]], logits[0, 3, [5, 6]], logits[1, 0, [5, 6]]])
    assert torch.equal(logits_NK, want)
    assert labels_N.tolist() == [0, 1, 1]
    soft = torch.tensor([[0.0, 0.9, 0.0, 0.2], [0.4, 0.0, 0.0, 0.0]], dtype=F64)
    assert select_prm_logits(logits, input_ids, soft, placeholder_token_id=9, reward_token_ids=[5, 6])[1].tolist() == [
        0.9, 0.2, 0.4,
    ]
    with pytest.raises(ValueError, match="not one of reward_token_ids"):
        select_prm_logits(logits, input_ids, labels.masked_fill(labels == 6, 7), placeholder_token_id=9, reward_token_ids=[5, 6])
