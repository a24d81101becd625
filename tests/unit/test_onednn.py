"""models.onednn: fp32 Linear layers through oneDNN, as accurate as MKL's, and really through oneDNN.

Accuracy is judged against float64: oneDNN sums in another order than MKL, so the two fp32 results
differ in the last bits, and the question is only whether oneDNN's error is of fp32 size.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_ops.models import onednn
from rlhf_ops.models.loading import load_causal_lm

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture
def calls(monkeypatch):
    """Count oneDNN matmuls (forward and backward)."""
    seen = []
    real = onednn._mm_t

    def counting(*args):
        seen.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(onednn, "_mm_t", counting)
    return seen


def _padded(rows):
    return onednn.padded_rows(rows)


def test_rows_pad_to_64_then_to_an_eighth_of_their_octave():
    """Few compiled shapes as rows grow: multiples of 64 up to 1024, then at most 8 sizes per octave."""
    got = {n: onednn.padded_rows(n) for n in (1, 64, 65, 700, 1024, 1025, 1100, 2047, 2049, 3008, 4288)}
    assert got == {1: 64, 64: 64, 65: 128, 700: 704, 1024: 1024, 1025: 1152, 1100: 1152, 2047: 2048, 2049: 2304,
                   3008: 3072, 4288: 4608}
    sizes = {onednn.padded_rows(n) for n in range(2049, 4097)}
    assert len(sizes) == 8 and all(s % 256 == 0 for s in sizes)


def _grads64(x, w, b):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = F.linear(x64, w64, b64)
    return y, torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], torch.ones_like(y).sin())


@pytest.mark.parametrize("out_in", [(24, 48), (256, 256)])  # weight gradient by MKL (small), by oneDNN
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64_forward_and_backward(calls, bias, out_in):
    O, I = out_in
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, I, generator=g, requires_grad=True)  # 74 rows: padded inside
    w = torch.randn(O, I, generator=g, requires_grad=True)
    b = torch.randn(O, generator=g, requires_grad=True) if bias else None
    y = onednn.linear(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], torch.ones_like(y).sin())
    y64, grads64 = _grads64(x, w, b)
    assert y.shape == (2, 37, O) and y.dtype == torch.float32
    P = _padded(74)
    big = O * I >= onednn.SMALL_WEIGHT
    assert calls == [(P, I), (P, O)] + ([(O, P)] if big else [])  # forward; grad of the input; of the weight
    for got, want in zip((y, *grads), (y64, *grads64)):  # fp32-sized error, relative to the tensor's scale
        assert got.shape == want.shape
        assert float((got.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_frozen_weight_and_no_grad_paths(calls):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 32, generator=g, requires_grad=True), torch.randn(16, 32, generator=g)
    (gx,) = torch.autograd.grad(onednn.linear(x, w).sum(), [x])
    torch.testing.assert_close(gx, torch.ones(40, 16) @ w)
    assert calls == [(_padded(40), 32), (_padded(40), 16)]  # no weight-gradient matmul for a frozen weight
    with torch.no_grad():
        y = onednn.linear(x, w)
    assert not y.requires_grad and len(calls) == 3
    torch.testing.assert_close(y, x.detach() @ w.T, rtol=1e-5, atol=1e-5)


def test_what_falls_back_to_f_linear(calls):
    w = torch.randn(8, 16)
    few = torch.randn(onednn.MIN_ROWS - 1, 16)
    assert torch.equal(onednn.linear(few, w), F.linear(few, w))
    bf16 = torch.randn(32, 16, dtype=torch.bfloat16)
    assert torch.equal(onednn.linear(bf16, w.bfloat16()), F.linear(bf16, w.bfloat16()))
    many = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn.linear(many, w).dtype == torch.bfloat16
    assert calls == []


def test_an_input_changed_in_place_is_padded_again():
    """Layers sharing one input share its padded copy; an in-place change must not reuse a stale one."""
    x, w = torch.randn(20, 8), torch.randn(4, 8)
    first = onednn.linear(x, w)
    x.mul_(2)
    torch.testing.assert_close(onednn.linear(x, w), 2 * first, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach().double(), [p.grad.detach().double() for p in model.parameters()]


def test_a_model_trains_as_accurately_as_with_mkl(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    assert all(type(m) is not torch.nn.Linear for m in model.modules())  # the loader patched every Linear
    ids = torch.randint(3, 500, (3, 41), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    onednn.unpatch(model)
    mkl_loss, mkl_grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(model).double(), ids)
    assert not torch.equal(loss, mkl_loss) or any(not torch.equal(a, b) for a, b in zip(grads, mkl_grads))
    assert abs(loss - ref_loss) <= 4 * abs(mkl_loss - ref_loss) + 1e-6
    err = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref_grads))
    mkl_err = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(mkl_grads, ref_grads))
    assert err <= 4 * mkl_err + 1e-6, (err, mkl_err)


def test_patch_keeps_parameters_state_dict_and_copies(tiny_model_dir, tmp_path, monkeypatch):
    model = load_causal_lm(str(tiny_model_dir))
    onednn.unpatch(model)
    keys = list(model.state_dict())
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert onednn.patch(model) == n_linear > 0
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, torch.nn.Linear) for m in model.modules() if type(m) is onednn.Linear)
    clone = copy.deepcopy(model)
    assert type(clone.lm_head) is onednn.Linear and clone.lm_head.weight is not model.lm_head.weight
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(model).from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    monkeypatch.setenv(onednn.ENV, "0")
    onednn.unpatch(model)
    assert onednn.patch(model) == 0 and type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("env,vendor,expected", [
    (None, "AuthenticAMD", True),   # MKL runs AVX2 code on AMD: oneDNN was ~2x faster (Zen 5)
    (None, "GenuineIntel", False),  # MKL runs its own AVX-512 kernels: it was the faster one
    (None, "", True),
    ("1", "GenuineIntel", True),    # forced
    ("0", "AuthenticAMD", False),   # off
])
def test_the_loader_uses_onednn_by_default_except_on_intel(monkeypatch, tiny_model_dir, env, vendor, expected):
    monkeypatch.delenv(onednn.ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(onednn.ENV, env)
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    assert onednn.wanted() is expected
    model = load_causal_lm(str(tiny_model_dir))
    assert any(type(m) is onednn.Linear for m in model.modules()) is expected
    assert all(type(m) is not torch.nn.Linear for m in model.modules()) is expected


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n\nprocessor\t: 1\n"
                    "vendor_id\t: AuthenticAMD\n")
    assert onednn.cpu_vendor(str(info)) == "AuthenticAMD"
    assert onednn.cpu_vendor(str(tmp_path / "missing")) == ""  # not Linux: treated as not Intel
