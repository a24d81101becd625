"""--async_train on one machine (`train_ppo`): the next rollout samples while the current one trains.

* each rollout is sampled from the weights of exactly one update before the ones it trains (bounded
  staleness of one), from the generator's own copy, never from the live actor mid-update;
* the run logs every step, with the time the loop waited for the overlapping rollout, and moves the actor;
* a resumed async run starts at the first prompt no trained step used;
* what cannot work is refused: ZeRO-3 (no whole copy to sample from), Ray without a vLLM engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import LENGTH_REWARD, TEMPLATE, tiny_policy, to_argv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_policy(tmp_path_factory, "rl_async")


def options(model_dir: Path, data_dir: Path, out: Path, **kw) -> dict:
    """2 prompts x 2 samples per step, 6 prompts: 3 steps; one optimizer step per rollout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward.py").write_text(LENGTH_REWARD)
    return {"pretrain": model_dir, "prompt_data": Path(data_dir) / "prompts", "input_template": TEMPLATE,
            "reward_func": out / "reward.py", "advantage_estimator": "group_norm", "use_kl_loss": True,
            "kl_estimator": "k3", "n_samples_per_prompt": 2, "rollout_batch_size": 2, "micro_rollout_batch_size": 8,
            "train_batch_size": 4, "micro_train_batch_size": 2, "generate_max_len": 12, "prompt_max_len": 64,
            "actor_learning_rate": 1e-3, "lr_warmup_ratio": 0, "zero_stage": 0, "max_samples": 6,
            "use_rollout_logprobs": True, "async_train": True,
            "save_path": out / "actor", "ckpt_path": out / "ckpt", **kw}


def parse(opts: dict):
    from rlhf_ops.config import parse_config
    from rlhf_ops.rl.config import RLConfig
    return parse_config(RLConfig, to_argv(opts))


def fingerprint(model: torch.nn.Module) -> tuple[float, float]:
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    return round(flat.sum().item(), 9), round(flat.square().sum().item(), 9)


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "train"]


def test_each_rollout_samples_the_weights_of_one_update_before(model_dir, builtin_data_dir, tmp_path):
    from rlhf_ops.models.forward import unwrap
    from rlhf_ops.rl.setup import build
    from rlhf_ops.trainers.rl import run_rl

    s = build(parse(options(model_dir, builtin_data_dir, tmp_path / "run")))
    live = unwrap(s.actor.module)
    assert s.generator.model is not live  # the generator samples from its own copy
    sampled, trained = [], []
    generate, train = s.generator.generate, s.train

    def spy_generate(prompts, params, **kw):
        sampled.append(fingerprint(s.generator.model))
        return generate(prompts, params, **kw)

    def spy_train(exp, *args):
        trained.append(fingerprint(live))
        return train(exp, *args)

    s.generator.generate, s.train = spy_generate, spy_train
    run_rl(s)
    assert len(trained) == 3 and len(sampled) == 3
    assert len(set(trained)) == 3, "every update moves the actor"
    # rollout 1: the start weights; rollout k+1 samples while update k trains, from the weights update k started from
    assert sampled == [trained[0], trained[0], trained[1]]
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["time_wait_rollout"] >= 0 for r in rows)  # step 3's look-ahead finds the prompts used up


def test_a_resumed_async_run_starts_at_the_first_unused_prompt(model_dir, builtin_data_dir, tmp_path):
    """At step 1's checkpoint step 2's rollout (prompts 2-3) has already been sampled; the checkpoint
    still points at prompt 2, so a resumed run samples it again (from the checkpoint's weights)."""
    from rlhf_ops.rl.setup import build
    from rlhf_ops.trainers.rl import run_rl, train_rl

    out = tmp_path / "run"
    opts = options(model_dir, builtin_data_dir, out, save_steps=1, max_ckpt_num=10)
    train_rl(parse(opts))
    (out / "ckpt" / "latest_good").write_text("global_step1\n")
    s = build(parse({**opts, "load_checkpoint": True}))
    state = s.load_checkpoint()
    assert (state["global_step"], state["episode"], state["cursor"]) == (1, 0, 2)
    run_rl(s)
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert (out / "ckpt" / "latest_good").read_text().strip() == "global_step3"


@pytest.mark.parametrize("extra,expected", [
    ({"zero_stage": 3}, "--async_train samples from a whole copy of the actor"),
])
def test_async_with_zero3_is_refused(model_dir, builtin_data_dir, tmp_path, extra, expected):
    from rlhf_ops.config import ConfigError
    from rlhf_ops.trainers.rl import train_rl

    with pytest.raises(ConfigError, match=expected):
        train_rl(parse(options(model_dir, builtin_data_dir, tmp_path / "z3", **extra)))


def test_ray_async_without_a_vllm_engine_is_refused(model_dir, builtin_data_dir, tmp_path):
    from rlhf_ops.config import ConfigError, parse_config
    from rlhf_ops.rl.ray_config import RayPPOConfig

    opts = options(model_dir, builtin_data_dir, tmp_path / "ray")
    with pytest.raises((ConfigError, SystemExit)):
        parse_config(RayPPOConfig, to_argv(opts))
    opts["vllm_num_engines"] = 1
    assert parse_config(RayPPOConfig, to_argv(opts)).async_train
