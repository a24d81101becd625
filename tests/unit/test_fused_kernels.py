"""rlhf_ops.kernels: the fused fp32 CPU kernels (RMSNorm, RoPE, SwiGLU) against float64 references, on one
thread and on two (the OpenMP paths), and a whole model with them against the same model without."""
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama as llama

from rlhf_ops.data.batching import collate
from rlhf_ops.kernels import cpu, fused
from rlhf_ops.models import rope as rope_patch
from rlhf_ops.models.loading import load_causal_lm

if not (shutil.which("cc") or shutil.which("gcc")):
    pytest.skip("no C compiler on this machine: the kernels cannot be built", allow_module_level=True)

REL = 2e-6  # fp32 rounding against a float64 reference, relative to the reference's largest entry


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == want.shape
    err, scale = float((got.detach().double() - want).abs().max()), float(want.abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_library_builds_and_loads():
    assert cpu.lib() is not None  # a machine with a C compiler must get the kernels, not a silent fallback


@pytest.mark.parametrize("shape", [(351, 128), (2, 300, 64)])
def test_rms_norm_forward_and_backward(threads, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    y64.backward(dy)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    y32 = fused.rms_norm(x32, w32, 1e-6)
    y32.backward(dy.float())
    _close(y32, y64.detach())
    _close(x32.grad, x64.grad)
    _close(w32.grad, w64.grad)
    with torch.no_grad():  # the forward-only path
        _close(fused.rms_norm(x.float(), w.float(), 1e-6), y64.detach())


def test_swiglu_forward_and_backward(threads):
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(600, 160, generator=g, dtype=torch.float64) * 4
    gate[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0], dtype=torch.float64)  # the exp's clamps, and 0
    up = torch.randn(600, 160, generator=g, dtype=torch.float64)
    grad_p = torch.randn(600, 160, generator=g, dtype=torch.float64)
    g64, u64 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    p64 = F.silu(g64) * u64
    p64.backward(grad_p)
    _close(fused.swiglu_forward(gate.float(), up.float()), p64.detach())
    g32 = gate.float()
    assert fused.swiglu_forward(g32, up.float(), out=g32) is g32  # in place, as the no-grad MLP calls it
    _close(g32, p64.detach())
    gp32 = grad_p.float()
    p, grad_g, grad_u = fused.swiglu_backward(gp32, gate.float(), up.float())
    assert grad_g.data_ptr() == gp32.data_ptr()  # written over the product's gradient
    _close(p, p64.detach())
    _close(grad_g, g64.grad)
    _close(grad_u, u64.grad)


@pytest.mark.parametrize("per_sample_positions", [False, True])
def test_rope_matches_hugging_face(threads, per_sample_positions):
    hf = getattr(llama, rope_patch._ORIGINAL, llama.apply_rotary_pos_emb)
    hf = rope_patch._plain(hf) or hf
    g = torch.Generator().manual_seed(2)
    B, T, Hq, Hk, D = 2, 150, 4, 2, 32
    proj_q = torch.randn(B, T, Hq * D, generator=g, dtype=torch.float64)
    proj_k = torch.randn(B, T, Hk * D, generator=g, dtype=torch.float64)
    angles = torch.randn(B if per_sample_positions else 1, T, D, generator=g, dtype=torch.float64) * 5
    cos, sin = angles.cos(), angles.sin()  # halves deliberately unequal: the kernel must not assume them equal
    q64 = proj_q.view(B, T, Hq, D).transpose(1, 2).requires_grad_()  # the attention's layout: a transposed view
    k64 = proj_k.view(B, T, Hk, D).transpose(1, 2).contiguous().requires_grad_()  # and a contiguous one
    oq64, ok64 = hf(q64, k64, cos, sin)
    gq, gk = torch.randn(oq64.shape, generator=g, dtype=torch.float64), torch.randn(ok64.shape, generator=g, dtype=torch.float64)
    (oq64 * gq).sum().backward()
    (ok64 * gk).sum().backward()
    q32 = proj_q.float().view(B, T, Hq, D).transpose(1, 2).detach().requires_grad_()
    k32 = proj_k.float().view(B, T, Hk, D).transpose(1, 2).contiguous().requires_grad_()
    assert fused.rope_eligible(q32, cos.float(), sin.float())
    oq, ok = fused.rope(q32, cos.float(), sin.float()), fused.rope(k32, cos.float(), sin.float())
    assert oq.transpose(1, 2).is_contiguous()  # memory [B, T, H, D], as Hugging Face's output of a transposed view
    (oq * gq.float()).sum().backward()
    (ok * gk.float()).sum().backward()
    _close(oq, oq64.detach())
    _close(ok, ok64.detach())
    _close(q32.grad, q64.grad)
    _close(k32.grad, k64.grad)


def test_rope_refuses_what_it_does_not_handle():
    x, cs = torch.randn(1, 2, 5, 8), torch.randn(1, 5, 8)
    assert fused.rope_eligible(x, cs, cs)
    assert not fused.rope_eligible(x.double(), cs.double(), cs.double())  # fp32 only
    assert not fused.rope_eligible(torch.randn(1, 2, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))  # odd D
    assert not fused.rope_eligible(x, cs.requires_grad_(), cs)  # a gradient into cos/sin
    assert not fused.rope_eligible(torch.randn(3, 2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def _spy(monkeypatch):
    calls = {"rms_norm": 0, "rope": 0, "swiglu_forward": 0, "swiglu_backward": 0}
    for name in calls:
        real = getattr(fused, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(fused, name, counted)
    return calls


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs(), use_cache=False).logits
    sel = batch.targets_BT != -100
    loss = F.cross_entropy(logits[sel].float(), batch.targets_BT[sel])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [True, False])
def test_a_model_with_the_kernels_matches_it_without(tiny_model_dir, monkeypatch, packed):
    model = load_causal_lm(str(tiny_model_dir))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (23, 9, 31, 17)]
    batch = collate(seqs, [[0] * 5 + [1] * (len(s) - 5) for s in seqs], 0, packed=packed)
    calls = _spy(monkeypatch)
    loss, grads = _loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    assert calls == {"rms_norm": 2 * layers + 1, "rope": 2 * layers, "swiglu_forward": layers, "swiglu_backward": layers}
    monkeypatch.setattr(cpu, "_lib", False)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert calls["rms_norm"] == 2 * layers + 1  # no kernel call without the library
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, want in ref_grads.items():
        _close(grads[name], want.double(), rel=1e-5)


def test_bf16_and_the_switch_keep_pytorch_ops(tiny_model_dir, monkeypatch):
    model = load_causal_lm(str(tiny_model_dir)).to(torch.bfloat16)
    calls = _spy(monkeypatch)
    batch = collate([[1, 5, 9, 13, 2], [1, 7, 2]], [[0, 1, 1, 1, 1], [0, 1, 1]], 0, packed=True)
    _loss_and_grads(model, batch)
    assert set(calls.values()) == {0}
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setenv(cpu.ENV, "0")
    assert cpu.lib() is None


def test_build_caches_by_key_and_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path))
    path = cpu.build()
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cpu.build() == path and path.stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.lib() is None
    assert "fused CPU kernels unavailable" in caplog.text
    assert not any((tmp_path / "other").iterdir())


def test_only_llama_style_norms_are_marked(tiny_model_dir, monkeypatch):
    from rlhf_ops.models import norm

    model = load_causal_lm(str(tiny_model_dir))
    assert norm.patch(model) == 2 * model.config.num_hidden_layers + 1  # idempotent: the loader marked them already
    assert norm.patch(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))) == 0
    calls = _spy(monkeypatch)
    norm.unpatch(model)
    batch = collate([[1, 5, 9, 13, 2]], [[0, 1, 1, 1, 1]], 0, packed=False)
    _loss_and_grads(model, batch)
    assert calls["rms_norm"] == 0 and calls["rope"] > 0  # unmarked norms run Hugging Face's forward
