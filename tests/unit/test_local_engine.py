"""rlhf_ops.distributed.local_engine: a world of one at ZeRO-0 in fp32 trains without DeepSpeed, with the
same losses and weights as DeepSpeed's engine, and its checkpoints resume exactly."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _engine_runs import TINY, micro_batches as _micro_batches, resume_halfway, train as _train
from rlhf_ops.config import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("local_engine") / "model", seed=0, **TINY)


def _cfg(model_dir, **kw):
    from rlhf_ops.trainers.sft import SFTConfig
    base = dict(pretrain=str(model_dir), dataset="unused", input_key="text", pretrain_mode=True,
                train_batch_size=4, micro_train_batch_size=2, zero_stage=0, max_norm=0.05,  # clips every step
                learning_rate=1e-3, lr_warmup_ratio=0.5, lr_scheduler="cosine_with_min_lr")
    return SFTConfig(**(base | kw))


def _engine(model_dir, monkeypatch, local: bool, **kw):
    from rlhf_ops.distributed.engine import create_engine
    from rlhf_ops.models.loading import load_causal_lm
    monkeypatch.setenv("RLHF_OPS_LOCAL_ENGINE", "1" if local else "0")
    eng = create_engine(load_causal_lm(str(model_dir)), _cfg(model_dir, **kw), total_steps=4)
    assert (type(eng.module).__name__ == "LocalEngine") == local
    return eng


def _weights(eng):
    return {n: p.detach().clone() for n, p in eng.model.named_parameters()}


def test_same_losses_lrs_and_weights_as_deepspeeds_engine(model_dir, monkeypatch):
    batches = _micro_batches(6)  # 3 optimizer steps of 2 accumulated micro-batches, clipped, warmup then cosine
    ours, theirs = _engine(model_dir, monkeypatch, True), _engine(model_dir, monkeypatch, False)
    assert ours.grad_accum == theirs.grad_accum == 2
    run_ours, run_theirs = _train(ours, batches), _train(theirs, batches)
    assert run_ours == run_theirs
    assert run_ours[1] == pytest.approx([0.0, 5e-4, 5e-4, 1e-3, 1e-3, 5.5e-4])  # moved at optimizer steps only
    w_ours, w_theirs, w0 = _weights(ours), _weights(theirs), _weights(_engine(model_dir, monkeypatch, True))
    assert all(torch.equal(w_ours[n], w_theirs[n]) for n in w_ours)
    assert all(not torch.equal(w_ours[n], w0[n]) for n in w_ours)  # every weight trained


def test_a_resumed_run_continues_exactly(model_dir, monkeypatch, tmp_path):
    straight, resumed, rest, rest_straight = resume_halfway(lambda: _engine(model_dir, monkeypatch, True), tmp_path)
    assert [p.name for p in (tmp_path / "global_step2" / "model").iterdir()] == ["local_engine_states.pt"]
    assert rest == rest_straight                           # losses, and the schedule resumes where it stopped
    w_straight, w_resumed = _weights(straight), _weights(resumed)
    assert all(torch.equal(w_straight[n], w_resumed[n]) for n in w_straight)


def test_a_deepspeed_checkpoint_is_refused_with_what_to_do(model_dir, monkeypatch, tmp_path):
    theirs = _engine(model_dir, monkeypatch, False)
    theirs.module.save_checkpoint(str(tmp_path / "global_step1"), tag="model", client_state={}, save_latest=False)
    ours = _engine(model_dir, monkeypatch, True)
    with pytest.raises(ConfigError, match=r"global_step1/model: no local_engine_states.pt .*DeepSpeed's files"):
        ours.module.load_checkpoint(str(tmp_path / "global_step1"), tag="model")


@pytest.mark.parametrize("kw,local", [(dict(zero_stage=2), False), (dict(zero_stage=1), False), ({}, True)])
def test_only_zero0_in_a_world_of_one_is_local(model_dir, monkeypatch, kw, local):
    _engine(model_dir, monkeypatch, local, **kw)  # asserts the engine's kind


def test_such_a_process_never_imports_deepspeed(model_dir, tmp_path):
    """Nor does its final save: accelerate's unwrapping inside `save_pretrained` would import DeepSpeed
    only to test isinstance(model, DeepSpeedEngine), ~20 MB at the end of the run (its peak)."""
    code = f"""
import sys, torch
from rlhf_ops.distributed.engine import create_engine
from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
from rlhf_ops.trainers.sft import SFTConfig
from rlhf_ops.utils.checkpoint import save_hf_model
cfg = SFTConfig(pretrain={str(model_dir)!r}, dataset="unused", input_key="text", pretrain_mode=True,
                train_batch_size=2, micro_train_batch_size=2, zero_stage=0, learning_rate=1e-3, lr_warmup_ratio=0)
eng = create_engine(load_causal_lm(cfg.pretrain), cfg, total_steps=1)
ids = torch.tensor([[5, 6, 7, 8]])
eng.backward_step(eng.module(input_ids=ids).logits.float().mean())
save_hf_model(eng.module, load_tokenizer(cfg.pretrain), {str(tmp_path / "saved")!r})
print("deepspeed" in sys.modules, type(eng.module).__name__, torch.distributed.is_initialized())
"""
    env = {k: v for k, v in os.environ.items()  # a fresh world of one, not this test process's
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-3:] == ["False", "LocalEngine", "True"]
    from rlhf_ops.models.loading import load_causal_lm
    saved = dict(load_causal_lm(str(tmp_path / "saved")).named_parameters())
    trained = {n for n, w in load_causal_lm(str(model_dir)).named_parameters() if not torch.equal(w, saved[n])}
    assert trained  # the saved weights are the stepped ones


def test_the_models_attributes_show_through_as_deepspeeds_do(model_dir, monkeypatch):
    from rlhf_ops.models.lora import is_peft
    ours, theirs = _engine(model_dir, monkeypatch, True), _engine(model_dir, monkeypatch, False)
    for eng in (ours, theirs):
        assert eng.module.get_input_embeddings() is eng.model.get_input_embeddings() and not is_peft(eng.module)
    with pytest.raises(AttributeError):
        ours.module.no_such_attribute
