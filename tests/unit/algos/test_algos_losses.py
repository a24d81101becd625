"""rlhf_ops.algos.losses (PPO policy / value, entropy, KL, aggregation): hand values, loops, masking."""

import math

import pytest
import torch

from rlhf_ops.algos.losses import aggregate_loss, entropy_loss, kl_loss, ppo_policy_loss, value_loss

F64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def _ppo_hand_inputs():
    # ratios [1.5, 0.5, 1.1, 0.7] with A = [1, 1, -1, -1]; 5th token is padding
    old = t64([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    logp = old + torch.log(t64([[1.5, 0.5, 1.1, 0.7, 40.0]]))
    adv = t64([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_ppo_policy_loss_hand_values_and_clip_frac():
    # eps 0.2 -> clip range [0.8, 1.2]; per token -min(r A, clip(r) A):
    #   r 1.5, A  1: min(1.5, 1.2)   =  1.2 -> loss -1.2, clipped term binds
    #   r 0.5, A  1: min(0.5, 0.8)   =  0.5 -> loss -0.5
    #   r 1.1, A -1: min(-1.1, -1.1) = -1.1 -> loss  1.1 (tie: not counted as clipped)
    #   r 0.7, A -1: min(-0.7, -0.8) = -0.8 -> loss  0.8, clipped term binds
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; clip_frac = 2 / 4
    out = ppo_policy_loss(*_ppo_hand_inputs())
    assert out.loss.item() == pytest.approx(0.05, abs=1e-12)
    assert out.clip_frac.item() == 0.5
    # approx_kl = mean k3 of KL(old || new) = mean(r - 1 - ln r)
    want_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)) / 4
    assert out.approx_kl.item() == pytest.approx(want_kl, abs=1e-12)


def test_ppo_clip_higher_hand_values():
    # eps_low 0.2, eps_high 0.28: token 1 becomes -1.28; token 4 still -0.8 -> (-1.28 - 0.5 + 1.1 + 0.8) / 4
    out = ppo_policy_loss(*_ppo_hand_inputs(), clip_eps_low=0.2, clip_eps_high=0.28)
    assert out.loss.item() == pytest.approx(0.03, abs=1e-12)
    assert out.clip_frac.item() == 0.5


def test_seq_mean_token_sum_norm_hand_value():
    # rows sum to 1 + 2 = 3 and 3; / norm_constant 4 -> 0.75 each; mean over rows 0.75
    loss_BT = t64([[1.0, 2.0, 50.0], [3.0, 60.0, 70.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(loss_BT, mask, "seq_mean_token_sum_norm", norm_constant=4).item() == 0.75
    assert aggregate_loss(loss_BT, mask, "token_mean").item() == 2.0  # (1 + 2 + 3) / 3
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_loss(loss_BT, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss_agg"):
        aggregate_loss(loss_BT, mask, "seq_sum")


def _loop_ppo(logp, old, adv, mask, lo, hi, agg, norm):
    per_row, all_tok, clipped = [], [], 0
    for b in range(len(logp)):
        row = []
        for t in range(len(logp[0])):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            s1, s2 = r * adv[b][t], min(max(r, 1 - lo), 1 + hi) * adv[b][t]
            row.append(-min(s1, s2))
            clipped += s2 < s1
        per_row.append(row)
        all_tok += row
    loss = sum(all_tok) / len(all_tok) if agg == "token_mean" else sum(sum(r) / norm for r in per_row) / len(per_row)
    return loss, clipped / len(all_tok)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("seed", range(3))
def test_ppo_policy_loss_matches_loop(seed, agg):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 6, generator=g, dtype=F64) - 2
    logp = old + torch.randn(4, 6, generator=g, dtype=F64) * 0.3
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[:, 0] = True
    out = ppo_policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.3, loss_agg=agg, norm_constant=6)
    loss, frac = _loop_ppo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.3, agg, 6)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(frac, abs=1e-15)


def test_value_loss_hand_values():
    # clip_eps 0.2, V_clip = old + clip(V - old, -0.2, 0.2):
    #   V 1.0, old 0.5, R 2.0: V_clip 0.7 -> (1 - 2)^2 = 1,    (0.7 - 2)^2 = 1.69 -> 1.69 (clipped)
    #   V 2.1, old 2.0, R 3.0: V_clip 2.1 -> 0.81, 0.81                          -> 0.81
    #   V 3.0, old 1.0, R 1.1: V_clip 1.2 -> (1.9)^2 = 3.61, (0.1)^2 = 0.01      -> 3.61
    # loss = 0.5 * (1.69 + 0.81 + 3.61) / 3 = 1.0183333; clip_frac = 1 / 3
    values, old = t64([[1.0, 2.1, 3.0, 99.0]]), t64([[0.5, 2.0, 1.0, -99.0]])
    returns, mask = t64([[2.0, 3.0, 1.1, 0.0]]), torch.tensor([[1, 1, 1, 0]])
    out = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 0.81 + 3.61) / 3, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(1 / 3, abs=1e-15)
    # unclipped: 0.5 * (1 + 0.81 + 3.61) / 3
    assert value_loss(values, old, returns, mask, clip_eps=None).loss.item() == pytest.approx(
        0.5 * (1.0 + 0.81 + 3.61) / 3, abs=1e-12
    )


def test_entropy_and_kl_loss_hand_values():
    ent, mask = t64([[1.0, 2.0, 77.0], [3.0, 77.0, 77.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert entropy_loss(ent, mask).item() == 2.0
    # log_ratio ln 2 on both valid tokens: k3 = 0.5 - 1 + ln 2, k1 = ln 2
    logp = t64([[math.log(0.5), math.log(0.5), 0.0]])
    ref = t64([[math.log(0.25), math.log(0.25), -30.0]])
    m = torch.tensor([[1, 1, 0]])
    assert kl_loss(logp, ref, m).item() == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_loss(logp, ref, m, kind="k1").item() == pytest.approx(math.log(2), abs=1e-15)


def test_losses_ignore_masked_positions():
    g = torch.Generator().manual_seed(7)
    shape = (3, 5)
    mask = torch.rand(shape, generator=g) < 0.6
    mask[:, 0] = True
    xs = [torch.randn(shape, generator=g, dtype=F64) for _ in range(4)]
    junk = [torch.where(mask, x, torch.randn(shape, generator=g, dtype=F64) * 30) for x in xs]
    for agg in ("token_mean", "seq_mean_token_sum_norm"):
        a = ppo_policy_loss(*xs[:3], mask, loss_agg=agg, norm_constant=5)
        b = ppo_policy_loss(*junk[:3], mask, loss_agg=agg, norm_constant=5)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(u, v) for u, v in zip(value_loss(*xs[:3], mask), value_loss(*junk[:3], mask)))
    assert torch.equal(entropy_loss(xs[0], mask), entropy_loss(junk[0], mask))
    assert torch.equal(kl_loss(xs[0], xs[1], mask), kl_loss(junk[0], junk[1], mask))


def test_ppo_gradient_is_zero_on_masked_tokens():
    logp, old, adv, mask = _ppo_hand_inputs()
    logp.requires_grad_(True)
    ppo_policy_loss(logp, old, adv, mask).loss.backward()
    # clipped-and-binding tokens (0 and 3) and padding (4) get no gradient; token 1: -A r / 4 = -0.125
    torch.testing.assert_close(logp.grad, t64([[0.0, -0.125, 1.1 / 4, 0.0, 0.0]]), atol=1e-12, rtol=0)
