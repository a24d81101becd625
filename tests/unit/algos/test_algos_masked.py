"""rlhf_ops.algos.masked: hand values, a Python-loop reference, and padding that holds NaN/inf."""

import math

import pytest
import torch

from rlhf_ops.algos.masked import masked_mean, masked_sum, masked_var, masked_whiten

NAN, INF = float("nan"), float("inf")


def _xm():
    # valid values are 1, 2 (row 0) and 3 (row 1); padding holds 100, NaN and inf
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, NAN, INF]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return x, mask


def test_masked_reductions_hand_values_ignore_nan_inf_padding():
    x, mask = _xm()
    assert masked_sum(x, mask).item() == 6.0  # 1 + 2 + 3
    assert masked_mean(x, mask).item() == 2.0  # 6 / 3
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))
    # squared deviations from 2: 1, 0, 1 -> sum 2; unbiased 2 / (3 - 1) = 1, biased 2 / 3
    assert masked_var(x, mask, unbiased=True).item() == 1.0
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0, abs=1e-15)


def test_masked_whiten_hand_values():
    x, mask = _xm()
    # (x - 2) / sqrt(1 + eps): valid -> -1, 0, 1; padding -> exactly 0
    w = masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    w_no_shift = masked_whiten(x, mask, shift_mean=False, eps=0.0)  # adds the mean (2) back
    torch.testing.assert_close(w_no_shift, torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64))


def test_empty_mask_gives_zero_not_nan():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mask = torch.zeros(2, dtype=torch.bool)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_var(x, mask).item() == 0.0
    assert torch.equal(masked_whiten(x, mask), torch.zeros(2, dtype=torch.float64))
    # a single valid element: unbiased variance is 0 (not inf / NaN)
    assert masked_var(x, torch.tensor([True, False])).item() == 0.0


def _loop_stats(x, mask):
    vals = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    n = len(vals)
    mean = sum(vals) / n
    var_u = sum((v - mean) ** 2 for v in vals) / (n - 1)
    var_b = sum((v - mean) ** 2 for v in vals) / n
    return sum(vals), mean, var_u, var_b


@pytest.mark.parametrize("seed", range(5))
def test_masked_reductions_match_python_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 7, generator=g) < 0.6
    mask[0, 0] = True
    s, mean, var_u, var_b = _loop_stats(x, mask)
    assert masked_sum(x, mask).item() == pytest.approx(s, abs=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(var_u, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(var_b, abs=1e-12)
    w = masked_whiten(x, mask)
    for i in range(4):
        for j in range(7):
            want = (x[i, j].item() - mean) / math.sqrt(var_u + 1e-8) if mask[i, j] else 0.0
            assert w[i, j].item() == pytest.approx(want, abs=1e-10)
    row_means = masked_mean(x, mask, dim=-1)
    for i in range(4):
        vals = [x[i, j].item() for j in range(7) if mask[i, j]]
        want = sum(vals) / len(vals) if vals else 0.0
        assert row_means[i].item() == pytest.approx(want, abs=1e-12)
