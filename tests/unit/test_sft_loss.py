"""The SFT loss: `target_nll` / `sft_step` against slow references, and packed == padded.

Numerics use a small in-memory Llama (hidden 64, 2 layers, 4 heads / 2 kv heads,
intermediate 128, fp32) for speed; one test also loads the default-size model from
`tiny_model_dir` the way the trainers do. References are computed from full logits:
`F.cross_entropy(..., ignore_index=-100)` over the whole padded batch, and a per-sample
forward of each row alone (no padding, no packing) scored token by token.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_ops.data.batching import collate
from rlhf_ops.models.forward import target_nll
from rlhf_ops.models.tiny import build_model
from rlhf_ops.trainers.sft import SFTConfig, batch_maker, build_sft_set, sft_step

TEMPLATE = "User: {}\nAssistant: "
PICK = [3, 0, 17, 8, 11]  # a micro-batch of rows with different lengths


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, seed=0)


@pytest.fixture(scope="module")
def sft_data(tiny_tokenizer, builtin_data_dir):
    cfg = SFTConfig(pretrain="tiny-model", dataset=str(builtin_data_dir / "sft"), input_key="input",
                    output_key="output", input_template=TEMPLATE)
    ts = build_sft_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=20)
    assert len({len(ts.input_ids[i]) for i in PICK}) > 2  # padding really happens
    return ts


@pytest.fixture(scope="module")
def multiturn_data(tiny_tokenizer, builtin_data_dir):
    cfg = SFTConfig(pretrain="tiny-model", dataset=str(builtin_data_dir / "sft_multiturn"), input_key="messages",
                    apply_chat_template=True, multiturn=True)
    return build_sft_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=8)


def make(ts, pad_id, packed):
    return batch_maker(ts, pad_id, packed=packed, device="cpu")(PICK)


def per_sample_reference(model, ids_rows, mask_rows) -> tuple[torch.Tensor, int]:
    """Sum of -log p(ids[t+1] | ids[:t+1]) over t with mask[t+1] = 1, one unpadded row at a time."""
    total, n = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for ids, mask in zip(ids_rows, mask_rows):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    total -= logp[t, ids[t + 1]]
                    n += 1
    return total, n


def test_target_nll_equals_full_logits_cross_entropy_over_the_padded_batch(tiny_tokenizer, tiny_model_dir,
                                                                          sft_data):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = make(sft_data, tiny_tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        nll, n = target_nll(hf, batch)
        logits = hf(**batch.model_inputs()).logits.float()
        ref = F.cross_entropy(logits.flatten(0, 1), batch.targets_BT.flatten(), ignore_index=-100, reduction="sum")
    assert n == batch.num_targets == int((batch.targets_BT != -100).sum())
    assert n == sum(sum(sft_data.loss_mask[i][1:]) for i in PICK)
    torch.testing.assert_close(nll, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_target_nll_equals_a_per_sample_unpadded_forward(model, tiny_tokenizer, sft_data, multiturn_data, packed):
    for ts in (sft_data, multiturn_data):
        picks = [i for i in PICK if i < len(ts)]
        batch = batch_maker(ts, tiny_tokenizer.pad_token_id, packed=packed, device="cpu")(picks)
        with torch.no_grad():
            nll, n = target_nll(model, batch)
        ref, ref_n = per_sample_reference(model, [ts.input_ids[i] for i in picks], [ts.loss_mask[i] for i in picks])
        assert n == ref_n
        torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-4)


def test_padding_id_does_not_change_the_loss(model, sft_data):
    ids, masks = [sft_data.input_ids[i] for i in PICK], [sft_data.loss_mask[i] for i in PICK]
    with torch.no_grad():
        a, _ = sft_step(model, collate(ids, masks, pad_id=0))
        b, _ = sft_step(model, collate(ids, masks, pad_id=123))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sft_step_loss_is_token_mean_and_reports_sum_and_count(model, tiny_tokenizer, sft_data):
    batch = make(sft_data, tiny_tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        loss, logs = sft_step(model, batch)
        nll, n = target_nll(model, batch)
    nll_sum, count = logs["loss"]
    assert count == n == batch.num_targets
    assert isinstance(nll_sum, torch.Tensor)  # read back once per logging step, not here (trainers.loop)
    assert float(nll_sum) == pytest.approx(nll.item(), rel=1e-6)
    assert loss.item() == pytest.approx(nll.item() / n, rel=1e-6)


def test_packed_and_padded_micro_batch_give_the_same_loss_and_gradients(model, tiny_tokenizer, sft_data):
    results = {}
    for packed in (False, True):
        batch = make(sft_data, tiny_tokenizer.pad_token_id, packed=packed)
        if packed:
            assert batch.input_ids_BT.shape[0] == 1
            assert batch.position_ids_BT[0].tolist() == [t for i in PICK for t in range(len(sft_data.input_ids[i]))]
        model.zero_grad(set_to_none=True)
        loss, logs = sft_step(model, batch)
        loss.backward()
        results[packed] = (loss.detach(), logs["loss"][1], {k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    (loss_pad, n_pad, g_pad), (loss_pack, n_pack, g_pack) = results[False], results[True]
    assert n_pad == n_pack
    torch.testing.assert_close(loss_pack, loss_pad, rtol=0, atol=1e-5)
    assert g_pad.keys() == g_pack.keys()
    assert all(g.abs().sum() > 0 for g in g_pad.values())  # every parameter gets a gradient
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_right_padded_rows_need_no_padding_mask(model, tiny_tokenizer, sft_data):
    """The training forward leaves the [B, T] mask out (SDPA's mask-free causal kernel); a real token's
    logits equal those of the masked forward, and the mask is still there when asked for."""
    batch = make(sft_data, tiny_tokenizer.pad_token_id, packed=False)
    assert batch.attention_mask.ndim == 2 and not bool(batch.attention_mask.all())  # the rows really are padded
    assert batch.model_inputs()["attention_mask"] is None
    assert batch.model_inputs(padding_mask=True)["attention_mask"] is batch.attention_mask
    real = batch.attention_mask.bool()
    with torch.no_grad():
        free = model(**batch.model_inputs()).logits[real]
        masked = model(**batch.model_inputs(padding_mask=True)).logits[real]
    torch.testing.assert_close(free, masked, rtol=0, atol=1e-5)
