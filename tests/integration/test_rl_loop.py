"""The RL loop end to end, in this process (`train_rl`, or the CLI's `main`), on a very small Llama, CPU, fp32.

* every estimator runs two steps and moves the actor (and, for gae, the critic from --pretrain with a new
  head or from a reward model; packing and dynamic filtering included); ZeRO 0, 2 and 3 agree;
* a run resumed from its step-1 checkpoint ends with the same actor and critic weights and metrics;
* bad input stops with a message naming what is wrong: a broken reward function (file, batch, value),
  batch sizes that do not divide, group estimators with one sample, a missing reward model, NaN in the loss
  (step number and last good checkpoint, which still resumes);
* the tiny preset's rl.yaml loads.

One process group serves every run (init_distributed is idempotent; world size 1).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import LENGTH_REWARD, TEMPLATE, save_test_reward_model, tiny_policy, to_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_policy(tmp_path_factory, "rl")


@pytest.fixture(scope="module")
def rm_dir(model_dir, tmp_path_factory) -> Path:
    return save_test_reward_model(model_dir, tmp_path_factory.mktemp("rl_rm") / "rm")


def reward_file(tmp: Path, text: str, name: str = "reward.py") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(text)
    return tmp / name


def options(model_dir, data_dir, out: Path, **kw) -> dict:
    """2 prompts x 2 samples per step, 4 prompts: 2 steps per episode; micro-batches of 2, one optimizer step."""
    return {"pretrain": model_dir, "prompt_data": Path(data_dir) / "prompts", "input_template": TEMPLATE,
            "reward_func": kw.pop("reward_func", None) or reward_file(out, LENGTH_REWARD),
            "n_samples_per_prompt": 2, "rollout_batch_size": 2, "micro_rollout_batch_size": 8,
            "train_batch_size": 4, "micro_train_batch_size": 2, "generate_max_len": 12, "prompt_max_len": 64,
            "actor_learning_rate": 1e-3, "critic_learning_rate": 1e-3, "lr_warmup_ratio": 0, "zero_stage": 0,
            "max_samples": 4, "save_path": out / "actor", "ckpt_path": out / "ckpt", **kw}


def train(opts: dict) -> dict:
    from rlhf_ops.config import parse_config
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.trainers.rl import train_rl
    return train_rl(parse_config(RLConfig, to_argv(opts)))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))


def metrics(out: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == split]


def max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in keys)


# ---------------------------------------------------------------------------------------------- 1. estimators


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("gae", {"advantage_estimator": "gae", "save_value_network": True, "value_head_prefix": "value_head"}),
    ("gae_rm", {"advantage_estimator": "gae", "save_value_network": True, "reward_pretrain": "RM", "packing_samples": True,
                "reward_func": "ZERO"}),  # rewards from the reward model alone
    ("reinforce", {"advantage_estimator": "reinforce", "profile_steps": "2"}),
    ("reinforce_baseline", {"advantage_estimator": "reinforce_baseline"}),
    ("rloo", {"advantage_estimator": "rloo"}),
    ("group_norm", {"advantage_estimator": "group_norm", "use_kl_loss": True, "kl_estimator": "k3"}),
    ("dr_grpo", {"advantage_estimator": "dr_grpo", "use_kl_loss": True, "kl_estimator": "k3"}),
    ("group_norm_filtered_packed", {"advantage_estimator": "group_norm", "use_kl_loss": True, "kl_estimator": "k3",
                                    "dynamic_filtering": True, "packing_samples": True, "max_samples": 8}),
])
def test_each_estimator_runs_two_steps_and_moves_the_actor_and_critic(model_dir, rm_dir, builtin_data_dir, tmp_path,
                                                                      name, extra):
    out = tmp_path / name
    zero = reward_file(out, "def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n", "zero.py")
    extra = {k: {"RM": rm_dir, "ZERO": zero}.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    train(options(model_dir, builtin_data_dir, out, **extra))
    rows = metrics(out)
    if extra.get("dynamic_filtering"):  # 8 prompts, 2 per step: flat groups are dropped and refilled
        assert 1 <= len(rows) <= 4 and all(r["filtered_groups"] >= 0 for r in rows), rows
    else:
        assert [r["step"] for r in rows] == [1, 2], rows
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), rows
    assert all(r["reward_std"] > 0 and r["lr"] > 0 for r in rows), rows

    if "profile_steps" in extra:  # torch.profiler recorded step 2: generation, scoring and training
        prof = json.loads((out / "ckpt" / "profile" / "ops.json").read_text())
        assert (prof["steps"], prof["first_step"]) == (1, 2) and (out / "ckpt" / "profile" / "trace_rank0.json").is_file()
        assert any("Backward" in r["op"] for r in prof["ops"]), prof["ops"]
    init, actor = weights(model_dir), weights(out / "actor")
    assert actor.keys() == init.keys()
    assert max_change(actor, init, init) > 1e-4, "the actor did not move"
    if extra["advantage_estimator"] == "gae":
        assert all("value_loss" in r for r in rows)
        critic = weights(out / "actor_critic")
        start = weights(rm_dir) if "reward_pretrain" in extra else {k: v for k, v in init.items() if k.startswith("model.")}
        body = [k for k in start if k.startswith("model.")]
        head = extra.get("value_head_prefix", "score") + ".weight"  # saved under --value_head_prefix
        assert critic.keys() == set(body) | {head}
        assert max_change(critic, start, body) > 1e-4, "the critic did not move"
        if "reward_pretrain" in extra:  # the critic's head is the reward model's, moved by two small steps
            assert 1e-5 < max_change(critic, start, [head]) < 1e-2


@pytest.mark.slow
def test_zero_stages_give_the_same_actor_and_critic(model_dir, rm_dir, builtin_data_dir, tmp_path):
    # PPO with every model there is: actor, reference (KL in the reward), reward model, critic from it. Under
    # ZeRO-3 the trained models are partitioned (engines gather them) and the frozen ones load whole.
    opts = dict(advantage_estimator="gae", init_kl_coef=0.05, reward_pretrain=rm_dir, save_value_network=True)
    for z in (0, 2, 3):
        train(options(model_dir, builtin_data_dir, tmp_path / f"z{z}", zero_stage=z, **opts))
    for z in (2, 3):
        for sub in ("actor", "actor_critic"):
            ref, got = weights(tmp_path / "z0" / sub), weights(tmp_path / f"z{z}" / sub)
            assert ref.keys() == got.keys()
            for k in ref:  # ~1e-7 apart: fp32 summation order, magnified by Adam on near-zero gradients
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=lambda m: f"zero{z} {sub} {k}: {m}")
    assert metrics(tmp_path / "z3") and all(r["kl"] != 0 for r in metrics(tmp_path / "z3")[1:])


@pytest.mark.slow
def test_prefix_sharing_gives_the_same_actor_and_critic(model_dir, rm_dir, builtin_data_dir, tmp_path):
    """--prefix_sharing changes which tokens are computed, not the maths: with one optimizer step per RL step
    (the micro-batch partition then does not change the gradient), PPO with a critic, a reference and a
    reward model ends where the unshared packed run ends."""
    opts = dict(advantage_estimator="gae", init_kl_coef=0.05, reward_pretrain=rm_dir, save_value_network=True,
                packing_samples=True, micro_rollout_batch_size=4)
    train(options(model_dir, builtin_data_dir, tmp_path / "plain", **opts))
    train(options(model_dir, builtin_data_dir, tmp_path / "shared", prefix_sharing=True, **opts))
    for sub in ("actor", "actor_critic"):
        ref, got = weights(tmp_path / "plain" / sub), weights(tmp_path / "shared" / sub)
        assert ref.keys() == got.keys()
        for k in ref:  # an Adam step moves an element by up to lr = 1e-3; fp32 summation order, magnified
            # by Adam on near-zero gradients, left one element of 2048 1.3e-6 apart here
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=lambda m: f"{sub} {k}: {m}")
    plain, shared = metrics(tmp_path / "plain"), metrics(tmp_path / "shared")
    assert [r["step"] for r in shared] == [1, 2]
    for a, b in zip(plain, shared):
        for k in ("reward", "kl", "response_length"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert max_change(weights(tmp_path / "shared" / "actor"), weights(model_dir), weights(model_dir)) > 1e-4


# ---------------------------------------------------------------------------------------------- 2. resume


@pytest.mark.slow
def test_resume_from_the_step_1_checkpoint_ends_identical(model_dir, builtin_data_dir, tmp_path):
    # PPO with a critic and the adaptive KL controller (its coefficient changes every step, so a controller
    # not restored changes the rewards), an eval every 2 steps, 2 episodes of 2 steps: B resumes at step 1
    # and crosses the episode boundary.
    opts = dict(advantage_estimator="gae", init_kl_coef=0.01, kl_target=1e-4, kl_horizon=10, num_episodes=2,
                save_steps=1, max_ckpt_num=10, save_value_network=True, eval_dataset=Path(builtin_data_dir) / "prompts",
                eval_steps=2, eval_temperature=1.0)
    a, b = tmp_path / "a", tmp_path / "b"
    train(options(model_dir, builtin_data_dir, a, **opts))
    tags = [f"global_step{i}" for i in (1, 2, 3, 4)]
    assert sorted(p.name for p in (a / "ckpt").glob("global_step*")) == tags
    shutil.copytree(a / "ckpt", b / "ckpt")
    for tag in tags[1:]:
        shutil.rmtree(b / "ckpt" / tag)
    (b / "ckpt" / "latest_good").write_text("global_step1\n")
    train(options(model_dir, builtin_data_dir, b, load_checkpoint=True, **opts))
    assert (b / "ckpt" / "latest_good").read_text().strip() == "global_step4"

    for sub in ("actor", "actor_critic"):
        wa, wb = weights(a / sub), weights(b / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{sub} {k}: max diff {(wa[k] - wb[k]).abs().max().item()}"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    ra, rb = strip(metrics(a)), strip(metrics(b))
    assert [r["step"] for r in rb] == [1, 2, 3, 4] and [r["episode"] for r in rb] == [0, 0, 1, 1]
    assert rb == ra
    assert len({r["kl_coef"] for r in ra}) == 4, ra  # the controller moved at every step
    assert metrics(b, "eval") == metrics(a, "eval") and [r["step"] for r in metrics(a, "eval")] == [0, 2, 4]


# ---------------------------------------------------------------------------------------------- 3. bad input


def main_error(argv: list, capsys) -> str:
    from rlhf_ops.cli.train_ppo import main
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("body,expected", [
    ("    raise ZeroDivisionError('boom in my reward')", ["raised ZeroDivisionError: boom in my reward"]),
    ("    return [0.5] * 3", ["expected 4 rewards (one per query), got 3"]),
    ("    return [0.5, 0.5, float('nan'), 0.5]", ["non-finite reward nan at query 2 (of 4)"]),
])
def test_a_broken_reward_function_names_the_file_the_batch_and_the_value(model_dir, builtin_data_dir, tmp_path,
                                                                        capsys, body, expected):
    fn = reward_file(tmp_path / "fn", f"def reward_func(queries, prompts, labels):\n{body}\n", "my_reward.py")
    err = main_error(to_argv(options(model_dir, builtin_data_dir, tmp_path, reward_func=fn)), capsys)
    assert "train_ppo: error:" in err and str(fn) in err and "the rollout of step 1, prompt rows [" in err, err
    assert all(e in err for e in expected), err


@pytest.mark.parametrize("extra,expected", [
    ({"rollout_batch_size": 3, "train_batch_size": 4},
     ["--rollout_batch_size 3 x --n_samples_per_prompt 2 = 6 samples", "--train_batch_size 4"]),
    ({"train_batch_size": 4, "micro_train_batch_size": 3}, ["--train_batch_size", "--micro_train_batch_size 3"]),
    *[({"n_samples_per_prompt": 1, "train_batch_size": 2, "advantage_estimator": e},
       ["--n_samples_per_prompt", f"--advantage_estimator {e}", "needs --n_samples_per_prompt > 1"])
      for e in ("group_norm", "dr_grpo", "rloo", "reinforce_baseline")],
    ({"reward_pretrain": "MISSING"}, ["--reward_pretrain", "does not exist"]),
    ({"critic_pretrain": "MISSING", "advantage_estimator": "gae"}, ["--critic_pretrain", "does not exist"]),
])
def test_bad_options_are_refused_with_a_message(model_dir, builtin_data_dir, tmp_path, capsys, extra, expected):
    extra = {k: (tmp_path / "no" / "such_model" if v == "MISSING" else v) for k, v in extra.items()}
    err = main_error(to_argv(options(model_dir, builtin_data_dir, tmp_path, **extra)), capsys)
    assert all(e in err for e in expected), err


def test_rollout_batch_larger_than_the_prompt_set(model_dir, builtin_data_dir, tmp_path, capsys):
    err = main_error(to_argv(options(model_dir, builtin_data_dir, tmp_path, rollout_batch_size=8)), capsys)
    assert "--rollout_batch_size 8 is larger than the prompt set (4 prompts)" in err, err


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(model_dir, builtin_data_dir, tmp_path,
                                                                          monkeypatch):
    import rlhf_ops.rl.update as update
    from rlhf_ops.algos.losses import PolicyLossOut
    from rlhf_ops.utils.checkpoint import latest_checkpoint

    opts = options(model_dir, builtin_data_dir, tmp_path, advantage_estimator="group_norm", use_kl_loss=True,
                   max_samples=6, save_steps=1)  # 3 steps of 2 micro-batches
    real, calls = update.ppo_policy_loss, []

    def nan_from_step_2(*a, **k):  # the 3rd micro-batch is the first of step 2
        out = real(*a, **k)
        calls.append(1)
        return out if len(calls) <= 2 else PolicyLossOut(out.loss * float("nan"), out.clip_frac, out.approx_kl)

    monkeypatch.setattr(update, "ppo_policy_loss", nan_from_step_2)
    with pytest.raises(FloatingPointError) as exc:
        train(opts)
    msg = str(exc.value)
    assert "non-finite actor loss nan" in msg and "at step 2 (episode 0)" in msg, msg
    assert f"last good checkpoint: global_step1 in {tmp_path / 'ckpt'}" in msg, msg
    assert latest_checkpoint(str(tmp_path / "ckpt")) == "global_step1"
    assert [p.name for p in (tmp_path / "ckpt").glob("global_step*")] == ["global_step1"]

    monkeypatch.setattr(update, "ppo_policy_loss", real)  # the checkpoint resumes: steps 2 and 3 run
    train({**opts, "load_checkpoint": True})
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert latest_checkpoint(str(tmp_path / "ckpt")) == "global_step3"


# ---------------------------------------------------------------------------------------------- 4. preset


def test_tiny_preset_rl_yaml_loads_and_is_grpo(model_dir, builtin_data_dir, tmp_path):
    from rlhf_ops.config import load_yaml
    from rlhf_ops.rl.config import RLConfig

    values = load_yaml(ROOT / "params" / "presets" / "tiny" / "rl.yaml", RLConfig)
    paths = {"pretrain", "prompt_data", "eval_dataset", "reward_func", "reward_pretrain", "save_path", "ckpt_path"}
    assert not paths & values.keys(), "params files hold hyperparameters only"
    cfg = RLConfig(**values, pretrain=str(model_dir), prompt_data=str(builtin_data_dir / "prompts"),
                   eval_dataset=str(builtin_data_dir / "prompts"), reward_func=str(ROOT / "rlhf_ops/rewards/arith.py"))
    assert cfg.advantage_estimator == "group_norm" and cfg.use_kl_loss and cfg.kl_estimator == "k3"
    assert cfg.n_samples_per_prompt > 1 and cfg.input_template == TEMPLATE
    assert cfg.rollout_batch_size * cfg.n_samples_per_prompt % cfg.train_batch_size == 0


def test_rollout_logprobs_recorded_while_sampling_equal_the_actor_forward(model_dir):
    """--use_rollout_logprobs: what `generate` records is what the old-logprob forward computes
    (temperature-scaled, not truncated by top-p), so the forward can be skipped."""
    from types import SimpleNamespace

    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.rl.experience import Models, rollout_logprobs

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("User: 1 + 2\nAssistant: ", "User: hi\nAssistant: ")] * 3
    gen = HFGenerator(model, tok, micro_batch_size=4, record_logprobs=True)
    comps = gen.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=12, top_p=0.9, seed=3))
    seqs, plens = [p + c for p, c in zip(prompts, comps)], [len(p) for p in prompts]
    assert len(gen.rollout_logprobs) == len({tuple(s) for s in seqs})
    cfg = SimpleNamespace(temperature=0.7, micro_rollout_batch_size=4, packing_samples=False, prefix_sharing=False,
                          flash_attn=False)
    models = Models(model, None, None, gen, None, tok.pad_token_id)
    forward = models.old_logprobs(seqs, plens, cfg)
    recorded = rollout_logprobs(gen, seqs, plens)
    assert recorded.shape == forward.shape == (sum(map(len, comps)),)
    torch.testing.assert_close(recorded, forward, atol=1e-5, rtol=0)
    assert not gen.rollout_logprobs  # looked up once, then cleared
    # make_experience takes the recorded ones as the old logprobs, as they are (no forward)
    from rlhf_ops.rl.experience import make_experience
    from rlhf_ops.rl.rewards import Scores
    full = SimpleNamespace(**vars(cfg), needs_critic=False, kl_estimator="k1", n_samples_per_prompt=2,
                           advantage_estimator="rloo", use_kl_loss=False, gamma=1.0, lambd=1.0, no_advantage_std_norm=False)
    shifted = recorded - 0.25  # a value no forward would give
    exp = make_experience(models, full, seqs, plens, Scores(torch.arange(6.0), {}), 0.0, shifted)
    torch.testing.assert_close(exp.old_logp_BT[exp.mask_BT], shifted, rtol=0, atol=0)
    assert rollout_logprobs(gen, seqs, plens) is None  # no record left: the caller runs the forward
