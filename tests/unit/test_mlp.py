"""models.mlp: the SwiGLU MLP as one autograd node, bitwise equal to Hugging Face's without the fused CPU kernels
(equal to rounding with them: tests/unit/test_fused_kernels.py), with half the saved activations."""
import copy

import pytest
import torch

from rlhf_ops.data.batching import collate
from rlhf_ops.models import mlp, onednn, rows
from rlhf_ops.models.loading import load_causal_lm


def _mlps(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


def _loss_and_grads(model, batch, only=None):
    model.zero_grad(set_to_none=True)
    with rows.only_rows(only):
        logits = model(**batch.model_inputs(), use_cache=False).logits
    sel = batch.targets_BT != -100
    loss = torch.nn.functional.cross_entropy(logits[sel], batch.targets_BT[sel])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _batch(n_seqs=6, packed=True):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (int(torch.randint(9, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_seqs)]  # ~120 rows: padded to 128 for oneDNN, every kernel path exercised
    return collate(seqs, [[0] * 4 + [1] * (len(s) - 4) for s in seqs], 0, packed=packed)


@pytest.fixture
def fused_calls(monkeypatch):
    seen = []
    real = mlp._SwiGLUFn.apply

    def counting(*args):
        seen.append(args[-1])  # dnn
        return real(*args)

    monkeypatch.setattr(mlp._SwiGLUFn, "apply", counting)
    return seen


@pytest.mark.parametrize("kernels", ["onednn", "mkl", "bf16"])
@pytest.mark.parametrize("packed", [True, False])
def test_loss_and_every_gradient_are_bitwise_equal(tiny_model_dir, fused_calls, kernels, packed, no_cpu_kernels):
    model = load_causal_lm(str(tiny_model_dir))
    if kernels == "mkl":
        onednn.unpatch(model)
    if kernels == "bf16":  # oneDNN's Linear falls back to F.linear for bf16: the node runs over F.linear too
        model.to(torch.bfloat16)
    n_mlp = len(_mlps(model))
    batch = _batch(packed=packed)
    only = batch.targets_BT != -100  # the last layer's MLP at the loss rows (models.rows) goes through it too
    fused = _loss_and_grads(model, batch, only)
    assert fused_calls == [kernels == "onednn"] * n_mlp
    mlp.unpatch(model)
    plain = _loss_and_grads(model, batch, only)
    assert len(fused_calls) == n_mlp  # unmarked: Hugging Face's forward
    assert torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))


def test_no_grad_forward_is_bitwise_equal(tiny_model_dir, no_cpu_kernels):
    model = load_causal_lm(str(tiny_model_dir))
    batch = _batch()
    with torch.no_grad():
        fused = model(**batch.model_inputs(), use_cache=False).logits
        mlp.unpatch(model)
        plain = model(**batch.model_inputs(), use_cache=False).logits
    assert torch.equal(fused, plain)


def _saved_by_mlps(model, batch) -> int:
    """How many [rows, intermediate_size] tensors the MLPs keep for the backward (distinct storages)."""
    inter, inside, seen = model.config.intermediate_size, [False], set()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and t.shape[-1] == inter and ptr not in weights:
            seen.add(ptr)
        return t

    hooks = [h for m in _mlps(model) for h in (m.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
                                               m.register_forward_hook(lambda *_: inside.__setitem__(0, False)))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch.model_inputs(), use_cache=False).logits.sum()
    for h in hooks:
        h.remove()
    return len(seen)


def test_it_keeps_two_intermediate_activations_per_mlp_instead_of_four(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    n_mlp, batch = len(_mlps(model)), _batch()
    assert _saved_by_mlps(model, batch) == 2 * n_mlp  # gate(x) and up(x)
    mlp.unpatch(model)
    assert _saved_by_mlps(model, batch) == 4 * n_mlp  # + silu(gate(x)) and the product


def test_what_takes_hugging_faces_forward(tiny_model_dir, fused_calls, monkeypatch):
    model = load_causal_lm(str(tiny_model_dir))
    batch = _batch()
    first = _mlps(model)[0]
    first.gate_proj.weight.ds_status = "NOT_AVAILABLE"  # a ZeRO-3 partition: its hooks gather it in HF's forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch.model_inputs(), use_cache=False)
    assert fused_calls == []  # autocast: every MLP
    model(**batch.model_inputs(), use_cache=False)
    assert len(fused_calls) == len(_mlps(model)) - 1
    del first.gate_proj.weight.ds_status
    handle = first.down_proj.register_forward_hook(lambda *_: None)  # hooks must run: HF's forward
    fused_calls.clear()
    model(**batch.model_inputs(), use_cache=False)
    assert len(fused_calls) == len(_mlps(model)) - 1
    handle.remove()
    lora_like = copy.deepcopy(model)
    wrapped = _mlps(lora_like)[0]
    wrapped.up_proj = torch.nn.Sequential(wrapped.up_proj)  # not a plain Linear any more (LoRA, 4-bit)
    fused_calls.clear()
    lora_like(**batch.model_inputs(), use_cache=False)
    assert len(fused_calls) == len(_mlps(model)) - 1
    monkeypatch.setenv(mlp.ENV, "0")
    mlp.unpatch(model)
    assert mlp.patch(model) == 0


def test_only_swiglu_mlps_without_bias_take_it(fused_calls):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, pad_token_id=0)
    ids = torch.randint(1, 64, (1, 20))
    assert mlp.patch(LlamaForCausalLM(LlamaConfig(**kw, hidden_act="gelu"))) == 0
    biased = LlamaForCausalLM(LlamaConfig(**kw, mlp_bias=True))
    assert mlp.patch(biased) == 1  # marked; the bias is checked per call
    biased(input_ids=ids).logits.sum().backward()
    assert fused_calls == []
    plain = LlamaForCausalLM(LlamaConfig(**kw))
    assert mlp.patch(plain) == 1
    plain(input_ids=ids).logits.sum().backward()
    assert fused_calls == [False]  # not oneDNN-patched: the same node over F.linear / MKL


def test_gradient_checkpointing_recomputes_it_to_the_same_gradients(tiny_model_dir, fused_calls, no_cpu_kernels):
    model = load_causal_lm(str(tiny_model_dir))
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    batch = _batch()
    fused = _loss_and_grads(model, batch)
    assert len(fused_calls) == 2 * len(_mlps(model))  # the forward, then its recomputation in the backward
    mlp.unpatch(model)
    plain = _loss_and_grads(model, batch)
    assert torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))
