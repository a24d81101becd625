"""train_ppo_ray's arithmetic, without Ray: groups and bundles from the flags, fail-fast messages, row shares,
config validation, and the cross-rank loss scales (2 data-parallel ranks give one process's gradient).
"""
from __future__ import annotations

import pytest
import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.ray_rl.placement import GroupSpec, PlacementError, bundles, check_fits, describe, plan_groups
from rlhf_ops.rl.ray_config import RayPPOConfig


@pytest.fixture
def make_cfg(tiny_model_dir, tmp_path):
    fn = tmp_path / "r.py"
    fn.write_text("def reward_func(q, p, l):\n    return [0.0] * len(q)\n")

    def make(**kw) -> RayPPOConfig:
        base = dict(pretrain=str(tiny_model_dir), prompt_data="unused", reward_func=str(fn), rollout_batch_size=4,
                    n_samples_per_prompt=2, train_batch_size=8, micro_train_batch_size=2)
        return RayPPOConfig(**{**base, **kw})
    return make


# ---------------------------------------------------------------------------------------------- groups


def test_every_role_gets_its_own_group_without_colocation(make_cfg, tmp_path):
    cfg = make_cfg(advantage_estimator="gae", reward_pretrain=str(tmp_path), actor_num_gpus_per_node=2,
                   critic_num_nodes=2, critic_num_gpus_per_node=2)
    groups = plan_groups(cfg)
    assert [(g.name, g.roles, g.ranks) for g in groups] == [
        ("actor", ("actor",), 2), ("critic", ("critic",), 4), ("ref", ("ref",), 1), ("reward", ("reward",), 1)]
    assert len(bundles(groups, gpu=False, cpus_per_rank=0.5)) == 8
    assert bundles(groups, gpu=True, cpus_per_rank=1)[0] == {"GPU": 1.0, "CPU": 1}


def test_colocation_flags_put_roles_in_the_actor_and_critic_processes(make_cfg, tmp_path):
    cfg = make_cfg(advantage_estimator="gae", reward_pretrain=str(tmp_path), colocate_actor_ref=True,
                   colocate_critic_reward=True)
    assert [(g.name, g.roles) for g in plan_groups(cfg)] == [("actor", ("actor", "ref")), ("critic", ("reward", "critic"))]
    assert describe(plan_groups(cfg)) == "actor+ref (1 nodes x 1), critic+reward (1 nodes x 1)"
    for flag in ("colocate_all_models", "colocate_all"):  # the hybrid engine colocates every model too
        everything = plan_groups(make_cfg(advantage_estimator="gae", reward_pretrain=str(tmp_path), **{flag: True}))
        assert [(g.name, g.roles) for g in everything] == [("actor", ("actor", "ref", "reward", "critic"))]


def test_roles_the_run_does_not_need_get_no_group(make_cfg):
    # GRPO without a KL term or a reward model: the actor alone (the reward function runs on the driver)
    cfg = make_cfg(advantage_estimator="group_norm", init_kl_coef=0.0, colocate_critic_reward=True)
    assert [(g.name, g.roles) for g in plan_groups(cfg)] == [("actor", ("actor",))]


def test_placement_that_cannot_fit_names_the_numbers():
    groups = [GroupSpec("actor", ("actor", "ref"), 2, 4), GroupSpec("critic", ("critic",), 1, 2)]
    with pytest.raises(PlacementError, match=r"^asked for 10 GPUs for actor\+ref \(2 nodes x 4\), critic \(1 nodes x 2\), "
                                             r"the cluster has 8$"):
        check_fits(groups, True, 1.0, {"GPU": 8.0, "CPU": 64.0})
    with pytest.raises(PlacementError, match=r"asked for 10 ranks x 0.5 CPU = 5 CPUs \(no GPUs .*the cluster has 2 CPUs"):
        check_fits(groups, False, 0.5, {"CPU": 2.0})
    check_fits(groups, False, 0.2, {"CPU": 2.0})  # 10 x 0.2 = 2: fits exactly


# ---------------------------------------------------------------------------------------------- shares


def test_shares_are_contiguous_balanced_and_in_order():
    from rlhf_ops.ray_rl.driver import chunk_shares
    from rlhf_ops.ray_rl.group import shares

    assert shares(5, 2) == [range(0, 3), range(3, 5)]
    assert shares(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]
    # 7 rows in chunks of 2 (4 chunks) over 3 ranks: rank 0 two chunks, then one each; the last chunk is short
    assert chunk_shares(7, 2, 3) == [range(0, 4), range(4, 6), range(6, 7)]
    assert [i for r in chunk_shares(9, 4, 2) for i in r] == list(range(9))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("extra,expected", [
    ({"vllm_num_engines": -1}, "--vllm_num_engines: must be >= 0, got -1"),
    ({"async_train": True}, "--async_train: needs --vllm_num_engines >= 1"),
    ({"vllm_gpu_memory_utilization": 1.5}, "--vllm_gpu_memory_utilization: must be in (0, 1]"),
    ({"vllm_tensor_parallel_size": 0}, "--vllm_tensor_parallel_size: must be >= 1"),
    ({"colocate_all": True, "vllm_num_engines": 2}, "--colocate_all: puts engine e on actor rank e's bundle: "
                                                      "--vllm_num_engines 2 must equal the actor's ranks, 1"),
    ({"colocate_all": True, "vllm_num_engines": 1, "vllm_tensor_parallel_size": 2},
     "--colocate_all: puts each engine on one actor rank's bundle, so it needs --vllm_tensor_parallel_size 1"),
    ({"vllm_enable_sleep": True}, "--vllm_enable_sleep: needs --vllm_num_engines >= 1"),
    ({"actor_num_nodes": 0}, "--actor_num_nodes: must be >= 1"),
    ({"colocate_actor_ref": True, "actor_num_gpus_per_node": 2},
     "--colocate_actor_ref: colocated roles need the same layout: actor is 1 nodes x 2 GPUs, ref is 1 nodes x 1 GPUs"),
    ({"actor_num_gpus_per_node": 3}, "--train_batch_size: 8 is not divisible by --micro_train_batch_size 2 x actor ranks 3"),
    ({"ray_cpus_per_rank": 0.0}, "--ray_cpus_per_rank: must be > 0"),
    ({"profile_steps": "2"}, "--profile_steps: records the process it runs in, and with Ray the models run in actor "
                             "processes: profile with train_ppo (one process) instead"),
])
def test_bad_ray_options_are_refused_naming_the_field(make_cfg, extra, expected):
    with pytest.raises(ConfigError) as exc:
        make_cfg(**extra)
    assert expected in str(exc.value)


def test_a_valid_layout_loads(make_cfg):
    cfg = make_cfg(actor_num_gpus_per_node=2, ref_num_gpus_per_node=2, colocate_actor_ref=True, vllm_sync_backend="gloo")
    assert cfg.ranks("actor") == 2 and cfg.vllm_num_engines == 0


# ---------------------------------------------------------------------------------------------- loss scales


def test_token_mean_scales_over_all_ranks_give_one_process_gradient():
    """DeepSpeed data parallel: each rank accumulates loss_mb x scale / gas over its micro-batches, then the
    ranks' gradients are averaged. With the scales computed over every micro-batch of the step (all ranks),
    2 ranks x 2 micro-batches, 1 rank x 4, and the step's token mean taken directly all give one gradient."""
    from rlhf_ops.rl.update import token_mean_scales

    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 3, 7, 2, 6, 4, 1]
    x = [torch.randn(n, 3, generator=g) for n in lens]  # one feature row per response token
    w0 = torch.randn(3, generator=g)
    micro = [[0, 1], [2, 3], [4, 5], [6, 7]]
    scales = token_mean_scales(lens, micro)

    def grad(loss_fn) -> torch.Tensor:
        w = w0.clone().requires_grad_(True)
        loss_fn(w).backward()
        return w.grad

    token_mean = lambda w, rows: torch.cat([x[i] @ w for i in rows]).square().mean()  # noqa: E731
    direct = grad(lambda w: token_mean(w, range(8)))
    one_rank = grad(lambda w: sum(token_mean(w, mb) * s for mb, s in zip(micro, scales)) / 4)  # gas 4
    two_ranks = (grad(lambda w: sum(token_mean(w, mb) * s for mb, s in zip(micro[:2], scales[:2])) / 2)  # gas 2
                 + grad(lambda w: sum(token_mean(w, mb) * s for mb, s in zip(micro[2:], scales[2:])) / 2)) / 2
    torch.testing.assert_close(one_rank, direct, rtol=1e-6, atol=0)
    torch.testing.assert_close(two_ranks, direct, rtol=1e-6, atol=0)
    # per-rank scales (each rank normalising by its own tokens) would not: rank 0 holds 16 tokens, rank 1 13
    own = [*token_mean_scales(lens, micro[:2]), *token_mean_scales(lens, micro[2:])]
    wrong = (grad(lambda w: sum(token_mean(w, mb) * s for mb, s in zip(micro[:2], own[:2])) / 2)
             + grad(lambda w: sum(token_mean(w, mb) * s for mb, s in zip(micro[2:], own[2:])) / 2)) / 2
    assert (wrong - direct).abs().max() > 1e-3


def test_engines_get_disjoint_contiguous_cpu_shares():
    from rlhf_ops.ray_rl.engines import binds_per_node, engine_cpu_binds

    assert engine_cpu_binds(2, {0, 1}) == ["0-0", "1-1"]
    assert engine_cpu_binds(2, [4, 5, 6, 7, 0, 1, 2, 3]) == ["0-3", "4-7"]
    assert engine_cpu_binds(3, range(8)) == ["0-1", "2-3", "4-5"]  # the spare cores stay unbound
    assert engine_cpu_binds(1, range(8)) == [None]  # one engine: vLLM's default
    assert engine_cpu_binds(4, [0, 1]) == [None] * 4  # fewer cores than engines: no binding at all
    # engines on different nodes split their own node's cores, not one another's
    where = [("a", range(8)), ("b", [0, 1, 2, 3]), ("a", range(8)), ("b", [0, 1, 2, 3]), ("c", range(4))]
    assert binds_per_node(where) == ["0-3", "0-1", "4-7", "2-3", None]
    # tensor parallel engines: one range per TP worker process
    assert engine_cpu_binds(1, [0, 1], tp=2) == ["0-0|1-1"]
    assert engine_cpu_binds(2, range(8), tp=2) == ["0-1|2-3", "4-5|6-7"]
    assert engine_cpu_binds(2, range(3), tp=2) == [None, None]
    assert binds_per_node([("a", range(4)), ("b", range(2))], tp=2) == ["0-1|2-3", "0-0|1-1"]


def test_engines_get_bundles_after_the_groups_and_count_in_the_fit():
    groups = [GroupSpec("actor", ("actor",), 1, 2)]
    assert bundles(groups, gpu=True, cpus_per_rank=1, engines=2) == [{"GPU": 1.0, "CPU": 1}] * 4
    assert describe(groups, 2) == "actor (1 nodes x 2), 2 vLLM engines"
    check_fits(groups, True, 1.0, {"GPU": 4.0, "CPU": 4.0}, engines=2)
    with pytest.raises(PlacementError, match=r"^asked for 4 GPUs for actor \(1 nodes x 2\), 2 vLLM engines, the cluster has 3$"):
        check_fits(groups, True, 1.0, {"GPU": 3.0, "CPU": 8.0}, engines=2)
    with pytest.raises(PlacementError, match=r"asked for 3 ranks x 1 CPU = 3 CPUs .*1 vLLM engine, the cluster has 2 CPUs"):
        check_fits(groups, False, 1.0, {"CPU": 2.0}, engines=1)
    # an engine of TP 2: one bundle of two GPUs (its workers share a node), counted twice in the fit
    assert bundles(groups, gpu=True, cpus_per_rank=1, engines=1, tp=2)[-1] == {"GPU": 2.0, "CPU": 2}
    assert bundles(groups, gpu=False, cpus_per_rank=0.5, engines=2, tp=2)[2:] == [{"CPU": 1.0}] * 2
    with pytest.raises(PlacementError, match=r"^asked for 6 GPUs for actor \(1 nodes x 2\), 2 vLLM engines x TP 2, "):
        check_fits(groups, True, 1.0, {"GPU": 5.0, "CPU": 8.0}, engines=2, tp=2)
