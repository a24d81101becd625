"""models.rows: the last layer's MLP runs only at the positions a loss reads.

What a loss reads must not move beyond rounding: a GEMM over fewer rows may round its results
differently, and the MLP's weight gradients sum fewer (all-zero) rows. On the SFT batch here, with
MKL's GEMMs, the loss and every gradient outside that MLP are bitwise equal. With oneDNN's
(`models.onednn`, the CPU default) the row count also picks the kernel (fewer than 16 rows go to
MKL), so there they agree to fp32 rounding. And it must really skip rows.
"""
import pytest
import torch

from rlhf_ops.data.batching import collate
from rlhf_ops.models.forward import target_logprobs
from rlhf_ops.models import onednn
from rlhf_ops.models.loading import load_causal_lm
from rlhf_ops.models.reward import load_value_model, sequence_rewards, sequence_scores, token_values
from rlhf_ops.models.rows import last_mlp, only_rows, rows_at
from rlhf_ops.rl.forward import action_logprobs, action_values, response_batch

SEQS = [[1, 5, 9, 13, 17, 21, 2], [1, 7, 8, 2], [1, 30, 31, 32, 33, 34, 35, 2]]
PROMPT_LENS = [3, 2, 5]


def _sft_batch(packed):
    masks = [[0] * p + [1] * (len(s) - p) for s, p in zip(SEQS, PROMPT_LENS)]
    return collate(SEQS, masks, 0, packed=packed)


def _rows_seen(model):
    """How many positions the last MLP computes, per forward (its input after `only_rows`' pre-hook)."""
    seen = []
    handle = last_mlp(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[:-1].numel()))
    return seen, handle


def _loss_and_grads(model, batch, rows):
    model.zero_grad(set_to_none=True)
    if rows:
        logp_N, _ = target_logprobs(model, batch)
    else:  # the same forward with the MLP at every position
        sel = batch.targets_BT != -100
        logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=sel).logits
        logp_N = -torch.nn.functional.cross_entropy(logits, batch.targets_BT[sel], reduction="none")
    loss = -logp_N.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", ["mkl", "onednn"])
@pytest.mark.parametrize("packed", [True, False])
def test_sft_loss_and_gradients_are_unchanged(tiny_model_dir, packed, kernels):
    model = load_causal_lm(str(tiny_model_dir))
    if kernels == "mkl":
        onednn.unpatch(model)
    batch = _sft_batch(packed)
    seen, handle = _rows_seen(model)
    try:
        loss, grads = _loss_and_grads(model, batch, rows=True)
        full_loss, full_grads = _loss_and_grads(model, batch, rows=False)
    finally:
        handle.remove()
    targets = int((batch.targets_BT != -100).sum())
    assert seen == [targets, batch.input_ids_BT.numel()]  # rows skipped, then all of them
    assert targets < sum(map(len, SEQS))
    # A GEMM over fewer rows may round differently: MKL and oneDNN pick their blocking by size, and how depends
    # on the CPU (on AMD EPYC, MKL's loss and every gradient outside the last MLP were bitwise equal; on an
    # Intel Xeon with AMX the loss differs in its last bit). So: rounding-level agreement, gradients relative
    # to each tensor's scale, since cancellation leaves some entries near 0.
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        want = full_grads[name]
        assert float((g - want).abs().max()) <= 1e-5 * float(want.abs().max()), name


def test_rl_logprobs_and_values_with_a_shared_prefix(tiny_model_dir):
    actor, critic = load_causal_lm(str(tiny_model_dir)), load_value_model(str(tiny_model_dir), init_head_std=0.1)
    seqs = SEQS[:1] * 2 + SEQS[2:]
    plens = PROMPT_LENS[:1] * 2 + PROMPT_LENS[2:]
    shared = response_batch(seqs, plens, 0, packed=True, share_prefix=True)
    plain = response_batch(seqs, plens, 0, packed=True)
    seen, handle = _rows_seen(actor)
    try:
        logp, _ = action_logprobs(actor, shared)
    finally:
        handle.remove()
    assert seen == [len(set(shared.pred_idx_N.tolist()))]
    with only_rows(None):  # reference: every position, unshared
        sel = plain.targets_BT != -100
        logits = actor(**plain.model_inputs(), use_cache=False).logits[sel]
    want = torch.log_softmax(logits, -1).gather(-1, plain.targets_BT[sel][:, None])[:, 0]
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-5)
    values = action_values(critic, shared)
    torch.testing.assert_close(values, token_values(critic, plain)[sel], rtol=0, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_reward_scores_read_the_last_tokens_only(tiny_model_dir, packed):
    rm = load_value_model(str(tiny_model_dir), init_head_std=0.1).eval()
    batch = collate(SEQS, [[1] * len(s) for s in SEQS], 0, packed=packed)
    seen, handle = _rows_seen(rm)
    try:
        with torch.no_grad():
            scores = sequence_scores(rm, batch)
            full = sequence_rewards(token_values(rm, batch), batch)
    finally:
        handle.remove()
    assert seen == [len(SEQS), batch.input_ids_BT.numel()]
    torch.testing.assert_close(scores, full, rtol=0, atol=1e-6)  # a GEMM over 3 rows may round differently
    rows = torch.zeros_like(batch.input_ids_BT, dtype=torch.bool)
    rows[0, 0] = True
    with torch.no_grad():
        values = token_values(rm, batch, rows)
    assert values[0, 0].isfinite() and values.isnan().sum() == rows.numel() - 1  # unread positions are NaN


def test_gradient_checkpointing_computes_every_row(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _sft_batch(packed=True)
    seen, handle = _rows_seen(model)
    try:
        loss, grads = _loss_and_grads(model, batch, rows=True)
    finally:
        handle.remove()
    assert seen == [batch.input_ids_BT.numel()] * 2  # forward and its recomputation: all rows
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    loss2, grads2 = _loss_and_grads(model, batch, rows=True)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=1e-6)


def test_rows_at_marks_the_indexed_positions():
    rows = rows_at(torch.tensor([3, 3, 0, 5]), torch.Size([1, 7]))
    assert rows.tolist() == [[True, False, False, True, False, True, False]]


def test_a_deep_copy_checks_its_own_layer(tiny_model_dir):
    import copy

    from rlhf_ops.models.rows import _LAYER

    model = load_causal_lm(str(tiny_model_dir))
    clone = copy.deepcopy(model)
    assert last_mlp(clone).__dict__[_LAYER] is clone.model.layers[-1]
    assert last_mlp(model).__dict__[_LAYER] is model.model.layers[-1]
    assert not any(name.endswith(_LAYER) for name, _ in clone.named_modules())  # not a submodule
    assert clone.state_dict().keys() == model.state_dict().keys()
