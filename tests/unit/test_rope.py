"""models.rope: Llama-style RoPE in fewer kernels, bitwise equal to Hugging Face's without the fused CPU kernels
(equal to rounding with them: tests/unit/test_fused_kernels.py)."""
import pytest
import torch
import transformers.models.llama.modeling_llama as llama

from rlhf_ops.data.batching import collate
from rlhf_ops.models import rope
from rlhf_ops.models.loading import load_causal_lm


def test_the_function_equals_hf_bit_for_bit(no_cpu_kernels):
    hf = getattr(llama, rope._ORIGINAL, llama.apply_rotary_pos_emb)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 32, generator=g), torch.randn(2, 2, 7, 32, generator=g)
    emb = torch.randn(2, 7, 32, generator=g)  # halves deliberately unequal: the identity holds for any sin
    for dim, (cos, sin) in [(1, (emb.cos(), emb.sin())), (2, (emb.cos(), emb.sin()))]:
        qq, kk = (q.transpose(1, 2), k.transpose(1, 2)) if dim == 2 else (q, k)
        for a, b in zip(rope.apply_rotary_pos_emb(qq, kk, cos, sin, dim), hf(qq, kk, cos, sin, dim)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [True, False])
def test_a_model_computes_the_same_loss_and_gradients(tiny_model_dir, packed, no_cpu_kernels):
    model = load_causal_lm(str(tiny_model_dir))
    assert llama.apply_rotary_pos_emb is rope.apply_rotary_pos_emb  # the loader swapped it in
    seqs = [[1, 5, 9, 13, 17, 21, 2], [1, 7, 8, 2], [1, 30, 31, 32, 33, 2]]
    batch = collate(seqs, [[1] * len(s) for s in seqs], 0, packed=packed)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(**batch.model_inputs(), use_cache=False).logits
        sel = batch.targets_BT != -100
        loss = torch.nn.functional.cross_entropy(logits[sel], batch.targets_BT[sel])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    rope.unpatch(model)
    try:
        assert llama.apply_rotary_pos_emb is not rope.apply_rotary_pos_emb
        theirs = loss_and_grads()
    finally:
        assert rope.patch(model)
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))


def test_another_rope_is_left_alone():
    from transformers import Phi3Config, Phi3ForCausalLM
    import transformers.models.phi3.modeling_phi3 as phi3

    before = phi3.apply_rotary_pos_emb  # partial rotary: not Llama's code
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    assert not rope.patch(model)
    assert phi3.apply_rotary_pos_emb is before


def test_a_third_party_swap_of_llamas_rope_is_left_in_place(tiny_model_dir, monkeypatch):
    """--use_liger_kernel swaps modeling_llama.apply_rotary_pos_emb for Liger's Triton kernel before the model
    loads. Compared with Llama's function, which it now is, it would match itself; it must stay."""
    def liger_like(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # a stand-in: Liger needs a GPU
        return llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    liger_like.__module__ = "liger_kernel.transformers.rope"
    model = load_causal_lm(str(tiny_model_dir))  # patched: ours is in place
    rope.unpatch(model)
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", liger_like)
    assert not rope.patch(model)
    assert llama.apply_rotary_pos_emb is liger_like
    monkeypatch.undo()
    assert rope.patch(model) and llama.apply_rotary_pos_emb is rope.apply_rotary_pos_emb  # Llama's own: swapped
