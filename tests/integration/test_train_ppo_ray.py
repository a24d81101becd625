"""`train_ppo_ray` on a very small Llama, CPU, fp32: the single-process loop over Ray role groups.

* PPO (gae) with 2 actor ranks (ZeRO-2, gloo) holding the colocated reference, and a critic group holding
  the colocated reward model: two steps move the actor, metrics are logged and saved with the model;
  the same seed gives `train_ppo`'s first-step rollout (reward, kl, response length) and, since the
  loss scales span both ranks, `train_ppo`'s weights after two steps;
* placement the cluster cannot hold fails at once, with the numbers;
* ZeRO-3 actor ranks with uneven shares of the rows, the reference in a group of its own, train alike too;
* placement that fits the cluster's totals but not its free resources times out, naming the groups;
* a rank killed mid-run (--colocate_all_models: one group holds every model) is reported by group and rank,
  the last checkpoint stays good and resumes;
* --async_train without a vLLM engine is refused before Ray starts (engines: test_train_ppo_ray_vllm.py, test_vllm_cpu.py).

One local Ray (2 logical CPUs, 127.0.0.1) serves the module; each run starts and stops its own workers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from _helpers import LENGTH_REWARD, TEMPLATE, forget_ray_auth, save_test_reward_model, tiny_policy, to_argv

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_policy(tmp_path_factory, "ray")


@pytest.fixture(scope="module")
def rm_dir(model_dir, tmp_path_factory) -> Path:
    return save_test_reward_model(model_dir, tmp_path_factory.mktemp("ray_rm") / "rm")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already initialised in this process")
    forget_ray_auth()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()  # the Ray this fixture started, nothing else


def options(model_dir, data_dir, out: Path, **kw) -> dict:
    """2 prompts x 2 samples per step, 4 prompts: 2 steps; rollout chunks of 2 rows, micro-batches of 2."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward.py").write_text(LENGTH_REWARD)
    return {"pretrain": model_dir, "prompt_data": Path(data_dir) / "prompts", "input_template": TEMPLATE,
            "reward_func": out / "reward.py", "n_samples_per_prompt": 2, "rollout_batch_size": 2,
            "micro_rollout_batch_size": 2, "train_batch_size": 4, "micro_train_batch_size": 2, "generate_max_len": 12,
            "prompt_max_len": 64, "actor_learning_rate": 1e-3, "critic_learning_rate": 1e-3, "lr_warmup_ratio": 0,
            "zero_stage": 2, "max_samples": 4, "save_path": out / "actor", "ckpt_path": out / "ckpt", **kw}


def ppo(rm_dir: Path) -> dict:
    """PPO with every model: critic and reward model from the reward model, KL (in the reward) to the reference."""
    return dict(advantage_estimator="gae", init_kl_coef=0.05, reward_pretrain=rm_dir, save_value_network=True,
                save_steps=1)


def with_eval(opts: dict) -> dict:
    """An eval of the 4 prompts at steps 0 and 2 (the end)."""
    return {**opts, "eval_dataset": opts["prompt_data"], "eval_steps": -1}


LAYOUT = dict(actor_num_gpus_per_node=2, ref_num_gpus_per_node=2, colocate_actor_ref=True, colocate_critic_reward=True,
              ray_cpus_per_rank=0.5)  # 3 processes: actor+ref x 2, critic+reward


def ray_main(opts: dict) -> dict:
    from rlhf_ops.cli.train_ppo_ray import main
    return main([str(a) for a in to_argv(opts)])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))


def rows(path: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(ray_cluster, model_dir, rm_dir, builtin_data_dir, tmp_path_factory) -> dict[str, Path]:
    """The same PPO run twice: train_ppo_ray (2 actor ranks) and train_ppo (one process)."""
    from rlhf_ops.config import parse_config
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.trainers.rl import train_rl

    out = tmp_path_factory.mktemp("ray_runs")
    t0 = time.perf_counter()
    ray_main(with_eval(options(model_dir, builtin_data_dir, out / "ray", **ppo(rm_dir), **LAYOUT)))
    t1 = time.perf_counter()
    train_rl(parse_config(RLConfig, to_argv(with_eval(options(model_dir, builtin_data_dir, out / "one", **ppo(rm_dir))))))
    print(f"train_ppo_ray {t1 - t0:.1f} s, train_ppo {time.perf_counter() - t1:.1f} s")
    return {"ray": out / "ray", "one": out / "one"}


@pytest.mark.slow
def test_two_actor_ranks_train_like_one_process(runs, model_dir):
    got, want = rows(runs["ray"] / "ckpt" / "metrics.jsonl"), rows(runs["one"] / "ckpt" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2] and all("value_loss" in r and r["lr"] > 0 for r in got), got
    assert (runs["ray"] / "actor" / "metrics.jsonl").read_text() == (runs["ray"] / "ckpt" / "metrics.jsonl").read_text()
    for key in ("reward", "reward_std", "kl", "response_length"):  # the same rollout: sampled by chunk, not by rank
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-6, abs=1e-9), (key, got[0], want[0])
    assert got[0]["kl"] == 0.0 and got[1]["kl"] != 0.0  # the colocated reference is there, and the actor moved
    evals = [rows(runs[k] / "ckpt" / "metrics.jsonl", "eval") for k in ("ray", "one")]
    assert [r["step"] for r in evals[0]] == [0, 2] and evals[0][0] == evals[1][0], evals  # before training: equal
    assert evals[0][1].keys() == evals[1][1].keys()
    assert all(evals[0][1][k] == pytest.approx(v, rel=1e-4) for k, v in evals[1][1].items() if k != "split"), evals

    init = weights(model_dir)
    assert max((weights(runs["ray"] / "actor")[k] - v).abs().max().item() for k, v in init.items()) > 1e-4
    for sub in ("actor", "actor_critic"):
        a, b = weights(runs["ray"] / sub), weights(runs["one"] / sub)
        assert a.keys() == b.keys()
        for k in a:  # 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches, up to fp32 summation order
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=lambda m: f"{sub} {k}: {m}")


@pytest.mark.slow
def test_zero3_ranks_with_uneven_shares_and_a_group_per_role_train_like_one_process(ray_cluster, model_dir,
                                                                                      builtin_data_dir, tmp_path):
    # REINFORCE++ under ZeRO-3, nothing colocated: actor (2 ranks) and reference in groups of their own.
    # 3 prompts x 2 samples = 3 rollout chunks of 2 rows: rank 0 takes two, rank 1 one, and runs a filler forward
    # to keep its partitioned weight gathers in step; eval completions end at different lengths.
    from rlhf_ops.config import parse_config
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.trainers.rl import train_rl

    opts = lambda out: with_eval(options(  # noqa: E731
        model_dir, builtin_data_dir, out, advantage_estimator="reinforce", init_kl_coef=0.05, zero_stage=3,
        rollout_batch_size=3, train_batch_size=6, micro_train_batch_size=1, max_samples=6, generate_max_len=48))
    ray_main({**opts(tmp_path / "ray"), "actor_num_gpus_per_node": 2, "ray_cpus_per_rank": 0.5})
    train_rl(parse_config(RLConfig, to_argv(opts(tmp_path / "one"))))
    for split in ("train", "eval"):
        got, want = (rows(tmp_path / k / "ckpt" / "metrics.jsonl", split) for k in ("ray", "one"))
        assert [r["step"] for r in got] == [r["step"] for r in want] and len(got) == 2, (got, want)
        for key in ("reward", "response_length") + (("kl",) if split == "train" else ()):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6), (split, key)
    assert rows(tmp_path / "one" / "ckpt" / "metrics.jsonl", "eval")[0]["response_length"] < 48  # some ended early
    a, b = weights(tmp_path / "ray" / "actor"), weights(tmp_path / "one" / "actor")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=lambda m: f"actor {k}: {m}")


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_named_and_the_checkpoint_resumes(runs, model_dir, rm_dir, builtin_data_dir, tmp_path,
                                                                    monkeypatch, capsys):
    from rlhf_ops.ray_rl.driver import RaySetup
    from rlhf_ops.utils.checkpoint import latest_checkpoint

    real, calls = RaySetup.train, []

    def kill_rank_1_at_step_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            ray_cluster_kill(self.groups["actor"].workers[1])
        return real(self, *a, **k)

    monkeypatch.setattr(RaySetup, "train", kill_rank_1_at_step_2)
    # --colocate_all_models: 2 processes, each holding actor, critic, reference and reward model
    opts = options(model_dir, builtin_data_dir, tmp_path, **ppo(rm_dir), actor_num_gpus_per_node=2,
                   critic_num_gpus_per_node=2, ref_num_gpus_per_node=2, reward_num_gpus_per_node=2,
                   colocate_all_models=True, ray_cpus_per_rank=0.5)
    with pytest.raises(SystemExit) as exc:
        ray_main(opts)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "train_ppo_ray: error: actor rank 1 died during train" in err, err
    assert f"last good checkpoint: global_step1 in {tmp_path / 'ckpt'}" in err, err
    assert latest_checkpoint(str(tmp_path / "ckpt")) == "global_step1" and not (tmp_path / "actor").exists()

    monkeypatch.setattr(RaySetup, "train", real)
    ray_main({**opts, "load_checkpoint": True})
    assert [r["step"] for r in rows(tmp_path / "ckpt" / "metrics.jsonl")] == [1, 2]
    for sub in ("actor", "actor_critic"):  # the resumed run ends where an uninterrupted one does
        a, b = weights(tmp_path / sub), weights(runs["one"] / sub)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=lambda m: f"{sub} {k}: {m}")


def ray_cluster_kill(worker) -> None:
    import ray
    ray.kill(worker, no_restart=True)  # as an OOM kill or a lost node would: the process is gone


def test_unsatisfiable_placement_fails_fast_with_the_numbers(model_dir, builtin_data_dir, tmp_path):
    # a CLI process of its own: no RAY_ADDRESS, so it starts a local Ray (one CPU per core), finds that 512 ranks
    # cannot fit, says so with the numbers, and stops the Ray it started
    import re
    import subprocess
    import sys

    from _helpers import ROOT, subprocess_env

    opts = options(model_dir, builtin_data_dir, tmp_path, advantage_estimator="reinforce", init_kl_coef=0.0,
                   actor_num_nodes=64, actor_num_gpus_per_node=8, train_batch_size=512, micro_train_batch_size=1,
                   rollout_batch_size=256)
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlhf_ops.cli.train_ppo_ray", *map(str, to_argv(opts))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    err = proc.stderr
    assert re.search(r"train_ppo_ray: error: asked for 512 ranks x 1 CPU = 512 CPUs .*for actor \(64 nodes x 8\), "
                     r"the cluster has \d+ CPUs", err), err[-3000:]


def test_async_without_a_vllm_engine_is_refused_before_ray_starts(model_dir, builtin_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ray_main(options(model_dir, builtin_data_dir, tmp_path, advantage_estimator="reinforce", async_train=True))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--async_train: needs --vllm_num_engines >= 1" in err, err


def test_placement_that_fits_the_cluster_but_not_its_free_resources_times_out(ray_cluster):
    # another placement group holds both CPUs: ours fits the cluster's totals but never becomes ready
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlhf_ops.ray_rl.placement import GroupSpec, PlacementError, place

    other = placement_group([{"CPU": 2.0}])
    ray_cluster.get(other.ready(), timeout=60)
    try:
        t0 = time.perf_counter()
        with pytest.raises(PlacementError, match=r"^the placement group for actor \(1 nodes x 1\) was not ready after 2 s"):
            place([GroupSpec("actor", ("actor",), 1, 1)], 1.0, timeout=2.0)
        assert time.perf_counter() - t0 < 20
    finally:
        remove_placement_group(other)



def test_recorded_rollout_logprobs_on_two_actor_ranks_train_like_the_forward(ray_cluster, model_dir, builtin_data_dir,
                                                                              tmp_path):
    """--use_rollout_logprobs on 2 actor ranks (ZeRO-2), where each rank looks up the logprobs it recorded while
    sampling its chunks: the run ends with the weights of the run that computes them by a forward. (This checks
    the records are right where used; it would not notice a rank falling back to the forward.)"""
    opts = dict(advantage_estimator="reinforce", actor_num_gpus_per_node=2, ray_cpus_per_rank=0.5, temperature=0.8)
    ray_main(options(model_dir, builtin_data_dir, tmp_path / "forward", **opts))
    ray_main(options(model_dir, builtin_data_dir, tmp_path / "recorded", use_rollout_logprobs=True, **opts))
    a, b = weights(tmp_path / "forward" / "actor"), weights(tmp_path / "recorded" / "actor")
    # recorded and forward logprobs agree within ~1e-6 per token; Adam's first steps magnify that on near-zero
    # gradients to ~1e-5 in the weights, 100x below what two steps move them
    moved = max((a[k] - weights(model_dir)[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and moved > 1e-3 and gap < moved / 100, (gap, moved)


def test_a_dead_or_failing_vllm_engine_actor_is_named(ray_cluster):
    """RayEngines reports which engine died, or which failed and with what (no vLLM needed: stand-in actors)."""
    from rlhf_ops.generation.vllm_engine import VLLMError
    from rlhf_ops.ray_rl.engines import RayEngines
    from rlhf_ops.ray_rl.group import RoleDied

    class StandIn:
        def ok(self):
            return 1

        def die(self):
            os._exit(1)

        def fail(self):
            raise VLLMError("vLLM server exited (code 1)")

    actors = [ray_cluster.remote(num_cpus=0)(StandIn).remote() for _ in range(2)]
    engines = object.__new__(RayEngines)  # only its error handling, without starting engines
    assert engines._get([actors[0].ok.remote(), actors[1].ok.remote()], "generate") == [1, 1]
    with pytest.raises(VLLMError, match=r"^vLLM engine 1, receive: vLLM server exited \(code 1\)"):
        engines._get([actors[0].ok.remote(), actors[1].fail.remote()], "receive")
    with pytest.raises(RoleDied, match=r"^vLLM engine 1 died during generate: "):
        engines._get([actors[0].ok.remote(), actors[1].die.remote()], "generate")
    for a in actors:
        ray_cluster.kill(a)


def test_a_failure_is_reported_without_waiting_for_calls_still_running(ray_cluster):
    """Engine calls are awaited in the order they finish: an engine that dies while another call is still
    running (a sender blocked in a broadcast) fails at once by name, and a dead actor is blamed before its
    peer's ordinary error (a gloo send fails *because* the receiver died)."""
    import time

    from rlhf_ops.ray_rl.engines import RayEngines
    from rlhf_ops.ray_rl.group import RoleDied, await_all

    class StandIn:
        def hang(self):
            time.sleep(300)

        def die(self, after=0.0):
            time.sleep(after)
            os._exit(1)

        def fail(self):
            raise RuntimeError("Connection closed by peer")

    actors = [ray_cluster.remote(num_cpus=0)(StandIn).remote() for _ in range(4)]
    engines = object.__new__(RayEngines)
    t0 = time.perf_counter()
    with pytest.raises(RoleDied, match=r"^vLLM engine 1 died during receive: "):
        engines._get([actors[0].hang.remote(), actors[1].die.remote()], "receive")
    assert time.perf_counter() - t0 < 60  # engine 0's call would have held a ray.get for 300 s

    refs = {actors[2].fail.remote(): lambda r: ray_cluster.get(r),
            actors[3].die.remote(1.0): lambda r: engines._get_one(r, 1, "receive")}
    with pytest.raises(RoleDied, match=r"^vLLM engine 1 died during receive: "):
        await_all(refs, grace=30)
    for a in actors:
        ray_cluster.kill(a)


def test_vllm_sleep_on_a_cluster_without_gpus_is_refused_by_name(ray_cluster, model_dir, builtin_data_dir, tmp_path):
    from rlhf_ops.config import ConfigError, parse_config
    from rlhf_ops.ray_rl.run import train_ppo_ray
    from rlhf_ops.rl.ray_config import RayPPOConfig

    opts = options(model_dir, builtin_data_dir, tmp_path, advantage_estimator="reinforce", init_kl_coef=0.0,
                   vllm_num_engines=1, vllm_enable_sleep=True)
    cfg = parse_config(RayPPOConfig, [str(a) for a in to_argv(opts)])
    with pytest.raises(ConfigError, match=r"^--vllm_enable_sleep: vLLM's sleep mode needs CUDA GPUs, and this Ray "
                                          r"cluster has none$"):
        train_ppo_ray(cfg)
    assert not any(pg["state"] == "CREATED" for pg in ray_cluster.util.placement_group_table().values())
