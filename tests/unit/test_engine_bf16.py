"""--bf16 with --zero_stage 0 (rlhf_ops.distributed.engine.train_stage): DeepSpeed 0.19 refuses bf16
weights with fp32 gradient accumulation at stage 0, so such a run trains at stage 1, whose BF16_Optimizer
keeps fp32 master weights (in a world of one, `LocalEngine` does the same without DeepSpeed). Found on an
H100 (benchmarks/gpu.py); the check is DeepSpeed's, not the device's."""
from __future__ import annotations

import pytest
import torch

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _cfg(model_dir, **kw):
    from rlhf_ops.trainers.sft import SFTConfig
    base = dict(pretrain=str(model_dir), dataset="unused", input_key="text", pretrain_mode=True,
                train_batch_size=2, micro_train_batch_size=2, zero_stage=0, bf16=True, max_norm=1.0,
                learning_rate=1e-4, lr_warmup_ratio=0.0, lr_scheduler="constant")
    return SFTConfig(**(base | kw))


@pytest.mark.parametrize("bf16,stage,trained", [(True, 0, 1), (False, 0, 0), (True, 2, 2), (True, 3, 3), (False, 1, 1)])
def test_only_bf16_at_stage_0_trains_at_stage_1(tmp_path, bf16, stage, trained):
    from rlhf_ops.distributed.engine import ds_config
    c = _cfg(tmp_path, bf16=bf16, zero_stage=stage)
    assert ds_config(c, 1)["zero_optimization"]["stage"] == trained
    assert ds_config(c, 1, train=False)["zero_optimization"]["stage"] == stage  # frozen models: no optimizer


@pytest.mark.parametrize("local", [True, False])
def test_bf16_zero0_engine_keeps_fp32_master_weights(tmp_path, monkeypatch, local):
    """Adam's first step moves each weight by about lr (1e-4). Around 1.0 (the RMSNorm weights) bf16's
    spacing is 2^-7, so the bf16 weight stays 1.0 exactly, and only an fp32 master copy records the move.
    In a world of one the engine is `LocalEngine` (its `master_weights`); DeepSpeed's is stage 1."""
    from rlhf_ops.distributed.engine import create_engine
    from rlhf_ops.models.loading import load_causal_lm
    from rlhf_ops.models.tiny import make_tiny

    monkeypatch.setenv("RLHF_OPS_LOCAL_ENGINE", "1" if local else "0")
    model_dir = make_tiny(tmp_path / "model", seed=0, **TINY)
    model = load_causal_lm(str(model_dir), bf16=True)
    eng = create_engine(model, _cfg(model_dir), total_steps=1)
    assert eng.module.zero_optimization_stage() == (0 if local else 1)
    norm = model.model.norm.weight
    assert norm.dtype == torch.bfloat16 and torch.all(norm == 1.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = eng.module(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    eng.backward_step(loss)
    if local:
        master = eng.module.master.fp32_param(norm)
    else:
        from deepspeed.utils import safe_get_full_fp32_param
        master = safe_get_full_fp32_param(norm)
    assert master is not None and master.dtype == torch.float32
    moved = (master - 1.0).abs()
    assert torch.all(norm == 1.0)                               # below bf16's resolution at 1.0
    assert torch.all((moved > 0.5e-4) & (moved < 1.5e-4))       # but the fp32 master moved by ~lr
