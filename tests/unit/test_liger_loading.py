"""--use_liger_kernel: load_causal_lm asks Liger for its kernels and not for its fused linear cross-entropy
forward, whose `logits_to_keep` takes no boolean [B, T] mask (the losses here pass one; on an H100 that
forward failed with "too many indices for tensor of dimension 3"). Liger needs Triton on a GPU, so here a
stand-in records the call; the loading code itself is the real one."""
import sys
import types

import pytest
import torch

from rlhf_ops.config import ConfigError


def test_liger_is_asked_for_its_kernels_without_the_fused_loss_forward(tmp_path, monkeypatch):
    from rlhf_ops.models import loading
    from rlhf_ops.models.tiny import make_tiny

    model_dir = make_tiny(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                          intermediate_size=64)
    calls = []

    class FakeAutoLiger:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            from transformers import AutoModelForCausalLM
            calls.append(dict(kwargs))
            liger = {k: kwargs.pop(k) for k in ("fused_linear_cross_entropy", "cross_entropy", "rope", "rms_norm",
                                                "swiglu") if k in kwargs}
            assert liger == {"fused_linear_cross_entropy": False}
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub.AutoLigerKernelForCausalLM = FakeAutoLiger
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    monkeypatch.setattr(loading, "_require_gpu_package", lambda *a: None)
    model = loading.load_causal_lm(str(model_dir), use_liger_kernel=True)
    assert len(calls) == 1 and calls[0]["fused_linear_cross_entropy"] is False
    assert calls[0]["dtype"] == torch.float32 and calls[0]["attn_implementation"] == "rlhf_sdpa"
    ids = torch.tensor([[1, 5, 7, 9]])
    mask = torch.tensor([[False, True, False, True]])
    assert model(input_ids=ids, logits_to_keep=mask).logits.shape[:-1] == (2,)  # HF's forward takes the mask


def test_without_a_gpu_liger_is_refused_with_the_flag_named(tmp_path):
    from rlhf_ops.models.loading import load_causal_lm
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(ConfigError, match="--use_liger_kernel needs a CUDA GPU"):
        load_causal_lm(str(tmp_path), use_liger_kernel=True)
