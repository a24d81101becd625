"""`train_ppo_ray --vllm_num_engines 1`: rollouts from a vLLM engine that follows the actor.

Needs `.venv-vllm` (`make vllm-cpu-env`); skipped with the reason otherwise. The proof of the
weight sync end to end: with greedy rollouts (temperature 0) and a learning rate large enough
that the actor's greedy completions change within three steps, the run sampling through the
vLLM engine logs the same per-step rewards and response lengths as the run sampling with the
actor itself. An engine that missed a sync would generate the old policy's completions. With
--async_train and two engines (each sampling half of every rollout), the engines sample rollout
k+1 during update k; the run then equals a local `train_ppo --async_train` run (same one-update
lag) and differs from the synchronous one. The engines are Ray actors with bundles of their own.
The first run's engine has two tensor-parallel workers and syncs through Ray's object store
(--vllm_sync_with_ray). A third run puts the engine on the actor rank's bundle (--colocate_all, the
hybrid engine, without sleep: that is CUDA-only). The async run's engines have one worker each and keep the
reference's default `nccl`, which becomes a gloo broadcast from actor rank 0 on a machine without GPUs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import LENGTH_REWARD, TEMPLATE, forget_ray_auth, to_argv
from rlhf_ops.generation.vllm_engine import vllm_available

_OK, _WHY = vllm_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"vLLM CPU venv unusable: {_WHY}")


def run(opts: dict) -> list[dict]:
    from rlhf_ops.cli.train_ppo_ray import main

    main([str(a) for a in to_argv(opts)])
    rows = [json.loads(x) for x in (Path(opts["ckpt_path"]) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def greedy(model_dir: Path, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_causal_lm

    gen = HFGenerator(load_causal_lm(str(model_dir)), tokenizer, micro_batch_size=8)
    return gen.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))


def test_vllm_engine_rollouts_follow_the_actor_like_its_own_generation(tiny_model_dir, builtin_data_dir, tmp_path):
    from rlhf_ops.models.loading import load_tokenizer

    forget_ray_auth()
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    base = {"pretrain": tiny_model_dir, "prompt_data": Path(builtin_data_dir) / "prompts", "input_template": TEMPLATE,
            "input_key": "input", "label_key": "label", "reward_func": tmp_path / "reward.py",
            "advantage_estimator": "reinforce", "init_kl_coef": 0.0, "n_samples_per_prompt": 1,
            "rollout_batch_size": 8, "micro_rollout_batch_size": 8, "train_batch_size": 8, "micro_train_batch_size": 8,
            "max_samples": 24, "generate_max_len": 12, "temperature": 0.0, "actor_learning_rate": 3e-3,
            "lr_warmup_ratio": 0.0, "seed": 3, "logging_steps": 1}
    hf = run({**base, "save_path": tmp_path / "hf" / "model", "ckpt_path": tmp_path / "hf" / "ckpt"})
    vl = run({**base, "save_path": tmp_path / "vllm" / "model", "ckpt_path": tmp_path / "vllm" / "ckpt",
              "vllm_num_engines": 1, "vllm_tensor_parallel_size": 2, "vllm_sync_with_ray": True,
              "ray_cpus_per_rank": 0.5})  # the actor's bundle and the engine's (2 x 0.5) on 2 cores
    assert len(hf) == len(vl) == 3
    # the actor's greedy completions did change over the run, so an unsynced engine would show
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = [tok(TEMPLATE.format(q), add_special_tokens=False)["input_ids"]
               for q in ("What is 3 + 4?", "What is 12 - 5?", "What is 7 * 6 + 1?", "What is 9 - 8?")]
    assert greedy(tmp_path / "hf" / "model", tok, prompts) != greedy(tiny_model_dir, tok, prompts)
    for a, b in zip(hf, vl):
        assert a["response_length"] == b["response_length"] and a["reward"] == pytest.approx(b["reward"], abs=1e-6), (a, b)
    # the hybrid engine: the engine on the actor rank's bundle (half of it each), synced over gloo
    hy = run({**base, "save_path": tmp_path / "hybrid" / "model", "ckpt_path": tmp_path / "hybrid" / "ckpt",
              "vllm_num_engines": 1, "colocate_all": True})
    assert len(hy) == 3
    for a, b in zip(hf, hy):
        assert a["response_length"] == b["response_length"] and a["reward"] == pytest.approx(b["reward"], abs=1e-6), (a, b)

    # --async_train over two engines: rollout k+1 is sampled by the engines (half the prompts each) while update k
    # trains, from the weights before it. The local run samples from its own copy of the actor with the same
    # one-update lag, so the two must agree; and the lag shows: some step's rollout differs from the synchronous run's.
    from rlhf_ops.config import parse_config
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.trainers.rl import train_rl

    local = {**base, "save_path": tmp_path / "local_async" / "model", "ckpt_path": tmp_path / "local_async" / "ckpt",
             "async_train": True}
    train_rl(parse_config(RLConfig, [str(a) for a in to_argv(local)]))
    la = [json.loads(x) for x in (tmp_path / "local_async" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    la = [r for r in la if r["split"] == "train"]
    va = run({**base, "save_path": tmp_path / "vllm_async" / "model", "ckpt_path": tmp_path / "vllm_async" / "ckpt",
              "vllm_num_engines": 2, "async_train": True, "ray_cpus_per_rank": 0.5})  # 3 bundles on 2 cores
    assert len(la) == len(va) == 3
    for a, b in zip(la, va):
        assert a["response_length"] == b["response_length"] and a["reward"] == pytest.approx(b["reward"], abs=1e-6), (a, b)
    assert va[0]["reward"] == pytest.approx(vl[0]["reward"], abs=1e-6)  # rollout 1: the start weights either way
    assert any((a["reward"], a["response_length"]) != (b["reward"], b["response_length"]) for a, b in zip(va, vl)), \
        "the async run's rollouts equal the synchronous run's: the one-update lag is not visible in this setup"
