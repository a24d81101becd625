"""rlhf_ops.models.attention: padding-free packed SDPA ("rlhf_sdpa") against masked attention and HF's sdpa."""
import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_ops.data.batching import collate
from rlhf_ops.models import onednn
from rlhf_ops.models.attention import NAME, packed_layout, packed_sdpa_BHTD
from rlhf_ops.models.loading import load_causal_lm


def block_causal(position_ids_BT):
    """[B, 1, T, T] bool, built the slow way: same sample (positions continue) and key <= query."""
    B, T = position_ids_BT.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        owner, s = [], -1
        for t in range(T):
            s += int(t == 0 or int(position_ids_BT[b, t]) != int(position_ids_BT[b, t - 1]) + 1)
            owner.append(s)
        for q in range(T):
            for k in range(q + 1):
                mask[b, 0, q, k] = owner[q] == owner[k]
    return mask


def test_layout_by_hand():
    lay = packed_layout(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert (lay.num_samples, lay.max_len) == (3, 3)
    assert lay.slot_N.tolist() == [0, 1, 2, 3, 4, 6]
    assert lay.pad_src_SL.tolist() == [0, 1, 2, 3, 4, 0, 5, 0, 0]  # empty slots read token 0, never attended
    assert packed_layout(torch.tensor([[0, 1, 2], [0, 1, 2]])) is None  # one sample per row: plain SDPA
    two_rows = packed_layout(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]))  # a sample never spans two rows
    assert (two_rows.num_samples, two_rows.max_len) == (4, 3)
    assert two_rows.slot_N.tolist() == [0, 1, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_packed_sdpa_equals_block_masked_attention_values_and_grads(heads):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
    q = torch.randn(2, Hq, 10, 8, generator=g, requires_grad=True)
    k = torch.randn(2, Hkv, 10, 8, generator=g, requires_grad=True)
    v = torch.randn(2, Hkv, 10, 8, generator=g, requires_grad=True)
    out = packed_sdpa_BHTD(q, k, v, packed_layout(pos), None)  # [B, T, H, D]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                         attn_mask=block_causal(pos)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_backward_gives_autograds_gradients_bit_for_bit(dtype, monkeypatch):
    """The gathers' own backward (attention._Gather) against autograd's index_add, same inputs: with and
    without it the outputs and the q/k/v gradients are equal, each token's gradient read from its one slot."""
    from rlhf_ops.models import attention

    Hq, Hkv = 4, 2
    g = torch.Generator().manual_seed(1)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
    qkv = [torch.randn(2, h, 10, 8, generator=g).to(dtype).requires_grad_() for h in (Hq, Hkv, Hkv)]
    w = torch.randn(2, 10, Hq, 8, generator=g).to(dtype)

    def run(gather: bool):
        monkeypatch.setattr(attention, "GATHER_BACKWARD", gather)
        lay = packed_layout(pos)
        assert (lay.zero_src_SL is not None) == gather
        out = packed_sdpa_BHTD(*qkv, lay, None)
        return out, torch.autograd.grad((out.float() * w.float()).sum(), qkv)

    (out_a, grads_a), (out_b, grads_b) = run(True), run(False)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(bool(x.abs().sum() > 0) for x in grads_a)


def test_zero_src_reads_each_token_once_and_the_zero_row_for_padding():
    lay = packed_layout(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert lay.zero_src_SL.tolist() == [0, 1, 2, 3, 4, 6, 5, 6, 6]  # 6 = the zero row appended to 6 tokens
    # shared prefixes (branches starting at a position > 0) read a token into several slots: autograd's sum
    assert packed_layout(torch.tensor([[0, 1, 2, 3, 2, 3]])).zero_src_SL is None


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ours = load_causal_lm(str(tiny_model_dir)).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    onednn.patch(hf)  # the same Linear kernels as `ours` (models.onednn): only the attention differs
    assert ours.config._attn_implementation == NAME
    return ours, hf


ROWS = [[1, 9, 8, 7, 30, 31, 2], [1, 40, 41], [1, 5, 6, 7, 8, 9, 10, 11, 12, 2], [1, 77, 2], [1, 50, 51, 52, 53]]


def test_packed_logits_and_grads_equal_each_sample_alone(models):
    ours, hf = models
    packed = collate(ROWS, [[1] * len(r) for r in ROWS], 0, packed=True)
    got = ours(**packed.model_inputs(), use_cache=False).logits[0]
    alone = torch.cat([hf(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in ROWS])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    padded = collate(ROWS, [[1] * len(r) for r in ROWS], 0)
    sel = padded.targets_BT != -100
    ours.zero_grad()
    F.cross_entropy(ours(**packed.model_inputs(), use_cache=False).logits[0][packed.targets_BT[0] != -100],
                    packed.targets_BT[packed.targets_BT != -100], reduction="sum").backward()
    g_packed = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    F.cross_entropy(ours(**padded.model_inputs(), use_cache=False).logits[sel], padded.targets_BT[sel],
                    reduction="sum").backward()
    for a, p in zip(g_packed, ours.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    ours.zero_grad()


def test_padding_masks_and_generation_are_plain_sdpa(models, tiny_tokenizer, no_cpu_kernels):
    ours, hf = models
    tok = tiny_tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(["User: What is 3 + 4?\nAssistant: ", "User: 12 - 5?\nAssistant: "], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    assert (enc["attention_mask"] == 0).any()  # left padding: the mask matters
    torch.testing.assert_close(ours(**enc).logits, hf(**enc).logits, rtol=0, atol=0)
    assert torch.equal(ours.generate(**enc, max_new_tokens=12, do_sample=False),
                       hf.generate(**enc, max_new_tokens=12, do_sample=False))


def test_saved_config_does_not_need_the_registration(models, tmp_path):
    ours, _ = models
    ours.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert "attn" not in "".join(json.loads((tmp_path / "config.json").read_text()))


def test_position_ids_broadcast_over_the_batch_are_one_sample_per_row(models):
    ours, hf = models
    ids = torch.tensor([[1, 9, 8, 7, 30], [1, 40, 41, 42, 2]])
    pos = torch.arange(5)[None]  # [1, T] for a [2, T] batch
    torch.testing.assert_close(ours(input_ids=ids, position_ids=pos).logits, hf(input_ids=ids, position_ids=pos).logits,
                               rtol=0, atol=1e-6)
