"""rlhf_ops.algos.kl: estimator hand values, unbiasedness on a categorical, clamp, controllers."""

import math

import pytest
import torch

from rlhf_ops.algos.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3

LN2 = math.log(2.0)


def test_estimators_hand_values():
    # policy prob 1/2, reference prob 1/4: log_ratio = ln 2
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    assert kl_k1(logp, ref).item() == pytest.approx(LN2, abs=1e-15)  # 0.693147
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * LN2**2, abs=1e-15)  # 0.240227
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - 1.0 + LN2, abs=1e-15)  # exp(-ln2) - 1 + ln2 = 0.193147
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(logp, ref, kind), fn(logp, ref))


def test_k1_k3_are_unbiased_for_exact_categorical_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(13, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(13, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    exact = float(sum(pi * (lp - lq) for pi, lp, lq in zip(p.tolist(), logp.tolist(), ref.tolist())))
    for kind in ("k1", "k3"):  # E_policy[k] = KL(policy || ref) exactly
        assert (p * kl_estimate(logp, ref, kind, log_ratio_clip=None)).sum().item() == pytest.approx(exact, abs=1e-12)
    assert torch.all(kl_k3(logp, ref) >= 0) and torch.all(kl_k2(logp, ref) >= 0)


def test_log_ratio_clamp():
    logp = torch.tensor([0.0, -50.0, -100.0], dtype=torch.float32)
    ref = torch.tensor([-50.0, 0.0, 0.0], dtype=torch.float32)
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([10.0, -10.0, -10.0]))
    torch.testing.assert_close(kl_k1(logp, ref, log_ratio_clip=None), torch.tensor([50.0, -50.0, -100.0]))
    # clamped k3 at log_ratio = -10: exp(10) - 1 - 10; unclamped float32 exp(100) overflows to inf
    k3 = kl_k3(logp, ref)
    assert k3[2].item() == pytest.approx(math.exp(10.0) - 11.0, rel=1e-6)
    assert math.isinf(kl_k3(logp, ref, log_ratio_clip=None)[2].item())


def test_bf16_inputs_are_upcast():
    logp = torch.tensor([-1.0], dtype=torch.bfloat16)
    ref = torch.tensor([-2.0], dtype=torch.bfloat16)
    assert kl_k3(logp, ref).dtype == torch.float32


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_adaptive_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9: error 9/6 - 1 = 0.5 -> clipped 0.2; mult 1 + 0.2 * 1000 / 10000 = 1.02 -> 0.102
    assert ctl.update(9.0, n_steps=1000) == pytest.approx(0.102, abs=1e-15)
    # KL 3: error -0.5 -> -0.2; mult 1 - 0.2 * 500 / 10000 = 0.99 -> 0.10098
    assert ctl.update(3.0, n_steps=500) == pytest.approx(0.10098, abs=1e-15)
    # KL 6.6: error 0.1 (not clipped); mult 1 + 0.1 * 0.1 = 1.01
    assert ctl.update(6.6, n_steps=1000) == pytest.approx(0.10098 * 1.01, abs=1e-15)


def test_controller_state_round_trip():
    ctl = AdaptiveKLController(init_kl_coef=0.05, target=1.0, horizon=100)
    ctl.update(2.0, n_steps=10)
    restored = AdaptiveKLController(init_kl_coef=9.0, target=9.0, horizon=9)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    assert restored.update(0.5, n_steps=7) == ctl.update(0.5, n_steps=7)
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, n_steps=10) == 0.3
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3 and other.state_dict() == {"value": 0.3}
