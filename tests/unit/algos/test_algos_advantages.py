"""rlhf_ops.algos.advantages: hand values, a pure-Python reference of every estimator, masking."""

import statistics

import pytest
import torch

from rlhf_ops.algos.advantages import (
    compute_advantages,
    discounted_returns,
    dr_grpo_PG,
    gae,
    group_mean_baseline_PG,
    group_norm_PG,
    rloo_baseline_PG,
    token_rewards_with_kl,
)

F64 = torch.float64
ESTIMATORS = ["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"]
GROUP_ESTIMATORS = ["reinforce_baseline", "rloo", "group_norm", "dr_grpo"]


def t64(rows):
    return torch.tensor(rows, dtype=F64)


# ----------------------------------------------------------------------------- hand values
def test_gae_hand_values_three_tokens():
    # gamma 0.9, lambd 0.8 (gamma * lambd = 0.72); r = [0, 0, 1], V = [0.5, 0.4, 0.2], V_3 := 0
    # delta_2 = 1 + 0.9 * 0   - 0.2 =  0.8
    # delta_1 = 0 + 0.9 * 0.2 - 0.4 = -0.22
    # delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    # A_2 = 0.8;  A_1 = -0.22 + 0.72 * 0.8 = 0.356;  A_0 = -0.14 + 0.72 * 0.356 = 0.11632
    # returns = A + V = [0.61632, 0.756, 1.0]; the 4th (padded) token holds garbage -> 0
    rewards = t64([[0.0, 0.0, 1.0, 5.0]])
    values = t64([[0.5, 0.4, 0.2, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lambd=0.8)
    torch.testing.assert_close(adv, t64([[0.11632, 0.356, 0.8, 0.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, t64([[0.61632, 0.756, 1.0, 0.0]]), atol=1e-12, rtol=0)


def test_discounted_returns_hand_values():
    # gamma 0.9, r = [0.5, -1, 2]: G_2 = 2, G_1 = -1 + 0.9 * 2 = 0.8, G_0 = 0.5 + 0.9 * 0.8 = 1.22
    ret = discounted_returns(t64([[0.5, -1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.9)
    torch.testing.assert_close(ret, t64([[1.22, 0.8, 2.0, 0.0]]), atol=1e-12, rtol=0)


def test_token_rewards_with_kl_hand_values():
    # kl_coef 0.5: reward = -0.5 * kl, plus the score on the last valid token
    scores = t64([2.0, -1.0])
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    want = t64([[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 - 1.0, 0.0]])
    torch.testing.assert_close(token_rewards_with_kl(scores, kl, mask, kl_coef=0.5), want, atol=1e-15, rtol=0)


def test_rloo_baseline_excludes_self():
    scores = t64([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # mean of the others: (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5; row 2: 1.5, 1.5, 0
    torch.testing.assert_close(rloo_baseline_PG(scores), t64([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]]))
    for p in range(2):
        for g in range(3):
            bumped = scores.clone()
            bumped[p, g] += 100.0
            assert rloo_baseline_PG(bumped)[p, g].item() == rloo_baseline_PG(scores)[p, g].item()


def test_compute_advantages_rloo_hand_values_and_row_order():
    # P = 2, G = 2; row p * G + g. kl = 0, gamma 1: every token carries score - other score
    scores = t64([[1.0, 3.0], [10.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]])
    out = compute_advantages("rloo", scores_PG=scores, kl_BT=torch.zeros(4, 2, dtype=F64), mask_BT=mask, kl_coef=0.1)
    want = t64([[-2.0, -2.0], [2.0, 2.0], [6.0, 0.0], [-6.0, -6.0]])
    torch.testing.assert_close(out.advantages_BT, want, atol=0, rtol=0)
    torch.testing.assert_close(out.returns_BT, want, atol=0, rtol=0)


def test_group_norm_hand_values():
    # [1, 3]: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2
    s = 2.0**0.5 + 1e-6
    torch.testing.assert_close(group_norm_PG(t64([[1.0, 3.0]])), t64([[-1.0 / s, 1.0 / s]]), atol=1e-15, rtol=0)
    torch.testing.assert_close(group_norm_PG(t64([[1.0, 3.0]]), std_norm=False), t64([[-1.0, 1.0]]))
    torch.testing.assert_close(group_mean_baseline_PG(t64([[1.0, 3.0]])), t64([[2.0, 2.0]]))
    # broadcast to every response token by compute_advantages (gamma 1, kl_coef 0)
    out = compute_advantages(
        "group_norm", scores_PG=t64([[1.0, 3.0]]), kl_BT=torch.ones(2, 3, dtype=F64),
        mask_BT=torch.tensor([[1, 1, 1], [1, 1, 0]]), kl_coef=0.0,
    )
    torch.testing.assert_close(out.advantages_BT, t64([[-1 / s] * 3, [1 / s, 1 / s, 0.0]]), atol=1e-15, rtol=0)


def test_dr_grpo_equals_group_norm_without_std():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, generator=g, dtype=F64)
    assert torch.equal(dr_grpo_PG(scores), group_norm_PG(scores, std_norm=False))
    kl = torch.rand(12, 5, generator=g, dtype=F64)
    mask = torch.rand(12, 5, generator=g) < 0.7
    kw = dict(scores_PG=scores, kl_BT=kl, mask_BT=mask, kl_coef=0.05, gamma=0.95)
    a = compute_advantages("dr_grpo", **kw)
    b = compute_advantages("group_norm", std_norm=False, **kw)
    assert torch.equal(a.advantages_BT, b.advantages_BT) and torch.equal(a.returns_BT, b.returns_BT)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_estimator_rejects_single_sample(estimator):
    with pytest.raises(ValueError, match="G >= 2"):
        compute_advantages(
            estimator, scores_PG=torch.ones(4, 1), kl_BT=torch.zeros(4, 3), mask_BT=torch.ones(4, 3), kl_coef=0.0
        )


@pytest.mark.parametrize("fn", [rloo_baseline_PG, group_mean_baseline_PG, group_norm_PG, dr_grpo_PG])
def test_group_helpers_reject_single_sample(fn):
    with pytest.raises(ValueError, match="G >= 2"):
        fn(torch.ones(5, 1))


def test_bad_arguments_raise():
    kw = dict(scores_PG=torch.ones(2, 2), kl_BT=torch.zeros(4, 3), mask_BT=torch.ones(4, 3), kl_coef=0.0)
    with pytest.raises(ValueError, match="needs values_BT"):
        compute_advantages("gae", **kw)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", **kw)
    with pytest.raises(ValueError, match=r"P\*G=4"):
        compute_advantages("reinforce", **{**kw, "kl_BT": torch.zeros(3, 3), "mask_BT": torch.ones(3, 3)})


# ------------------------------------------------------------- independent Python reference
def ref_compute(estimator, scores, kl, mask, values, kl_coef, gamma, lambd, std_norm):
    """Pure-Python OpenRLHF semantics, row by row, skipping masked tokens."""
    P, G = len(scores), len(scores[0])
    B, T = len(kl), len(kl[0])
    shaped = []
    for p in range(P):
        grp = scores[p]
        mean = sum(grp) / G
        for g in range(G):
            s = grp[g]
            if estimator == "rloo":
                s -= sum(grp[h] for h in range(G) if h != g) / (G - 1)
            elif estimator in ("reinforce_baseline", "dr_grpo"):
                s -= mean
            elif estimator == "group_norm":
                s = (s - mean) / (statistics.stdev(grp) + 1e-6) if std_norm else s - mean
            shaped.append(s)
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t]]
        rew = {t: -kl_coef * kl[b][t] for t in idx}
        if idx:
            rew[idx[-1]] += shaped[b]
        running, next_v = 0.0, 0.0
        for t in reversed(idx):
            if estimator == "gae":
                running = rew[t] + gamma * next_v - values[b][t] + gamma * lambd * running
                next_v = values[b][t]
                adv[b][t], ret[b][t] = running, running + values[b][t]
            else:
                running = rew[t] + gamma * running
                adv[b][t] = ret[b][t] = running
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        vals = [adv[b][t] for b in range(B) for t in range(T) if mask[b][t]]
        mu = sum(vals) / len(vals)
        scale = statistics.variance(vals) + 1e-8 if std_norm else 1.0
        adv = [[(a - mu) / scale**0.5 if mask[b][t] else 0.0 for t, a in enumerate(row)] for b, row in enumerate(adv)]
    return adv, ret


def _random_batch(seed, holes, P=3, G=4, T=7):
    g = torch.Generator().manual_seed(seed)
    B = P * G
    scores = torch.randn(P, G, generator=g, dtype=F64)
    kl = torch.randn(B, T, generator=g, dtype=F64) * 0.3
    values = torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) < 0.75
        mask[:, 0] = True
    return scores, kl, values, mask


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("std_norm", [True, False])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compute_advantages_matches_python_reference(estimator, std_norm, holes):
    scores, kl, values, mask = _random_batch(seed=ESTIMATORS.index(estimator) + 10 * holes, holes=holes)
    hp = dict(kl_coef=0.07, gamma=0.97, lambd=0.9)
    out = compute_advantages(
        estimator, scores_PG=scores, kl_BT=kl, mask_BT=mask, values_BT=values, std_norm=std_norm, **hp
    )
    adv, ret = ref_compute(
        estimator, scores.tolist(), kl.tolist(), mask.tolist(), values.tolist(), std_norm=std_norm, **hp
    )
    torch.testing.assert_close(out.advantages_BT, t64(adv), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.returns_BT, t64(ret), atol=1e-10, rtol=0)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_positions_never_change_valid_outputs(estimator, holes):
    scores, kl, values, mask = _random_batch(seed=3, holes=holes)
    g = torch.Generator().manual_seed(99)
    junk_kl = torch.where(mask, kl, torch.randn(kl.shape, generator=g, dtype=F64) * 1e6)
    junk_values = torch.where(mask, values, torch.randn(kl.shape, generator=g, dtype=F64) * 1e6)
    kw = dict(scores_PG=scores, mask_BT=mask, kl_coef=0.1, gamma=0.9, lambd=0.8)
    a = compute_advantages(estimator, kl_BT=kl, values_BT=values, **kw)
    b = compute_advantages(estimator, kl_BT=junk_kl, values_BT=junk_values, **kw)
    assert torch.equal(a.advantages_BT, b.advantages_BT) and torch.equal(a.returns_BT, b.returns_BT)
    assert torch.all(a.advantages_BT[~mask] == 0) and torch.all(a.returns_BT[~mask] == 0)


def test_outputs_are_detached():
    scores, kl, values, mask = _random_batch(seed=5, holes=False)
    out = compute_advantages(
        "gae", scores_PG=scores.requires_grad_(), kl_BT=kl.requires_grad_(), mask_BT=mask,
        values_BT=values.requires_grad_(), kl_coef=0.1,
    )
    assert not out.advantages_BT.requires_grad and not out.returns_BT.requires_grad
