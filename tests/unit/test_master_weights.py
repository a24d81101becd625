"""rlhf_ops.distributed.master_weights: a bf16 model at --zero_stage 0 in a world of one steps flat fp32
master weights in `LocalEngine`, bitwise as DeepSpeed's BF16_Optimizer (what such a run trained with
before), and no bf16 gradient outlives its backward."""
from __future__ import annotations

import pytest
import torch

from _engine_runs import TINY, micro_batches as _micro_batches, next_token_loss as _loss, resume_halfway
from _engine_runs import train as _train
from rlhf_ops.config import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("master_weights") / "model", seed=0, **TINY)


def _cfg(model_dir, **kw):
    from rlhf_ops.trainers.sft import SFTConfig
    base = dict(pretrain=str(model_dir), dataset="unused", input_key="text", pretrain_mode=True, bf16=True,
                train_batch_size=4, micro_train_batch_size=2, zero_stage=0, max_norm=0.05,  # clips every step
                learning_rate=1e-3, lr_warmup_ratio=0.5, lr_scheduler="cosine_with_min_lr")
    return SFTConfig(**(base | kw))


def _engine(model_dir, monkeypatch, local: bool, **kw):
    import rlhf_ops.distributed.engine as engine_mod
    from rlhf_ops.models.loading import load_causal_lm
    from rlhf_ops.models.lora import apply_lora
    monkeypatch.setenv("RLHF_OPS_LOCAL_ENGINE", "1" if local else "0")
    torch.manual_seed(0)  # the same LoRA initialisation for both engines
    # DeepSpeed's default all-reduce dtype is the model's: at each accumulation boundary it rounds the fp32
    # accumulated gradients to bf16, even in a world of one. LocalEngine keeps them in fp32, so the
    # reference is DeepSpeed with its all-reduce in fp32 (with one micro-batch per step the two agree).
    ds_config = engine_mod.ds_config
    monkeypatch.setattr(engine_mod, "ds_config", lambda *a, **k: ds_config(*a, **k) | {"communication_data_type": "fp32"})
    cfg = _cfg(model_dir, **kw)
    eng = engine_mod.create_engine(apply_lora(load_causal_lm(str(model_dir), bf16=True), cfg), cfg, total_steps=4)
    assert (type(eng.module).__name__ == "LocalEngine") == local
    return eng


def _fp32(eng) -> dict[str, torch.Tensor]:
    """Each trained weight's fp32 master."""
    named = [(n, p) for n, p in eng.model.named_parameters() if p.requires_grad]
    if type(eng.module).__name__ == "LocalEngine":
        return {n: eng.module.master.fp32_param(p).clone() for n, p in named}
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).clone() for n, p in named}


def _bf16(eng) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in eng.model.named_parameters()}


def test_same_losses_lrs_and_weights_as_deepspeeds_bf16_optimizer(model_dir, monkeypatch):
    batches = _micro_batches(6)  # 3 optimizer steps of 2 accumulated micro-batches, clipped, warmup then cosine
    ours, theirs = _engine(model_dir, monkeypatch, True), _engine(model_dir, monkeypatch, False)
    start = _fp32(ours)
    run_ours, run_theirs = _train(ours, batches), _train(theirs, batches)
    assert run_ours == run_theirs
    assert run_ours[1] == pytest.approx([0.0, 5e-4, 5e-4, 1e-3, 1e-3, 5.5e-4])  # moved at optimizer steps only
    m_ours, m_theirs, w_ours, w_theirs = _fp32(ours), _fp32(theirs), _bf16(ours), _bf16(theirs)
    assert all(torch.equal(m_ours[n], m_theirs[n]) and torch.equal(w_ours[n], w_theirs[n]) for n in m_ours)
    assert all(w_ours[n].dtype == torch.bfloat16 and torch.equal(w_ours[n], m_ours[n].bfloat16()) for n in w_ours)
    assert all(not torch.equal(m_ours[n], start[n]) for n in m_ours)  # every weight trained


def test_no_bf16_gradient_outlives_its_backward(model_dir, monkeypatch):
    """Each bf16 gradient is added to its fp32 slot and freed as autograd finishes it: between micro-batches
    the model holds no gradient (DeepSpeed keeps a bf16 one per weight), and the slots hold their sum."""
    from rlhf_ops.models.loading import load_causal_lm
    eng = _engine(model_dir, monkeypatch, True)
    ids_a, ids_b = _micro_batches(2)
    ref = load_causal_lm(str(model_dir), bf16=True)  # the same weights, plain autograd accumulating in bf16
    for ids in (ids_a, ids_b):
        (_loss(ref, ids) / 2).backward()
    eng.module.backward(_loss(eng.module, ids_a))
    assert all(p.grad is None for p in eng.model.parameters())
    eng.module.step()
    eng.module.backward(_loss(eng.module, ids_b))
    assert all(p.grad is None for p in eng.model.parameters())
    slots = {id(p): g for flat in eng.module.master.groups for p, g in zip(flat.params, flat.grads)}
    for (name, p), r in zip(eng.model.named_parameters(), ref.parameters()):
        # fp32 sum of the two bf16 gradients, against bf16 accumulation: equal where bf16 held the sum
        assert torch.allclose(slots[id(p)], r.grad.float(), rtol=2 ** -7, atol=0), name
    assert any(not torch.equal(slots[id(p)], r.grad.float()) for p, r in zip(eng.model.parameters(), ref.parameters()))


def test_a_non_finite_gradient_skips_the_step_as_deepspeed_does(model_dir, monkeypatch):
    """Step 2's first micro-batch is scaled by inf: no optimizer or scheduler step, its gradients
    dropped; step 3 then trains as DeepSpeed's engine does."""
    batches, scales = _micro_batches(6), [1.0, 1.0, float("inf"), 1.0, 1.0, 1.0]
    ours, theirs = _engine(model_dir, monkeypatch, True), _engine(model_dir, monkeypatch, False)
    _train(ours, batches[:2])
    after_one = _fp32(ours)
    rest_ours, rest_theirs = _train(ours, batches[2:], scales[2:]), _train(theirs, batches, scales)[1][2:]
    assert rest_ours[1] == rest_theirs == [5e-4, 5e-4, 5e-4, 1e-3]  # the scheduler did not step at the skip
    assert ours.module.master.skipped_steps == 1 and ours.module.global_steps == 3
    m_ours, m_theirs = _fp32(ours), _fp32(theirs)
    assert all(torch.equal(m_ours[n], m_theirs[n]) for n in m_ours)
    assert all(not torch.equal(m_ours[n], after_one[n]) for n in m_ours)  # the third step trained


def test_a_resumed_run_continues_exactly_from_the_fp32_masters(model_dir, monkeypatch, tmp_path):
    straight, resumed, rest, rest_straight = resume_halfway(lambda: _engine(model_dir, monkeypatch, True), tmp_path)
    assert rest == rest_straight
    m_straight, m_resumed = _fp32(straight), _fp32(resumed)
    assert all(torch.equal(m_straight[n], m_resumed[n]) for n in m_straight)
    # an fp32 run cannot resume it (nor the reverse): the message says which flag to use
    from rlhf_ops.distributed.engine import create_engine
    from rlhf_ops.models.loading import load_causal_lm
    fp32 = create_engine(load_causal_lm(str(model_dir)), _cfg(model_dir, bf16=False), total_steps=4)
    with pytest.raises(ConfigError, match=r"global_step2/model: written by a bf16 run; resume it with --bf16"):
        fp32.module.load_checkpoint(str(tmp_path / "global_step2"), tag="model")


@pytest.mark.parametrize("kw,local", [({}, True), (dict(zero_stage=1), False), (dict(adam_offload=True), False)])
def test_only_bf16_at_zero0_without_offload_is_local(model_dir, monkeypatch, kw, local):
    _engine(model_dir, monkeypatch, local, **kw)  # asserts the engine's kind


def test_lora_adapters_on_a_bf16_model_train_in_bf16_through_masters_as_deepspeed_does(model_dir, monkeypatch):
    """peft keeps LoRA adapters in fp32 on a bf16 model; DeepSpeed casts every weight to bf16 under --bf16,
    and so does LocalEngine, then steps the adapters' fp32 masters: the same losses and weights."""
    batches = _micro_batches(6)
    ours, theirs = (_engine(model_dir, monkeypatch, local, lora_rank=4, lora_alpha=8) for local in (True, False))
    trained = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {p.dtype for p in ours.model.parameters()} == {p.dtype for p in theirs.model.parameters()} == {torch.bfloat16}
    start = _fp32(ours)
    assert _train(ours, batches) == _train(theirs, batches)
    m_ours, m_theirs, w_ours, w_theirs = _fp32(ours), _fp32(theirs), _bf16(ours), _bf16(theirs)
    assert set(m_ours) == trained and all(torch.equal(m_ours[n], m_theirs[n]) for n in trained)
    assert all(torch.equal(w_ours[n], w_theirs[n]) for n in w_ours)
    assert all(not torch.equal(m_ours[n], start[n]) for n in trained)  # every adapter trained
