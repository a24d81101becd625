"""`train_ppo_ray(cfg)`: connect to Ray, place the role groups, run the RL loop, clean up.

Where Ray comes from, in order:
  * a `ray.init()` this process already made (tests): used as is, left running;
  * `RAY_ADDRESS` (set by `ray job submit`, or by hand): `ray.init(address=...)`. A head started
    with token authentication (Ray's default) also needs `RAY_AUTH_MODE=token` and its
    `RAY_AUTH_TOKEN` in the environment, as `tasks/ray_jobs.py` passes to its jobs;
  * otherwise a local Ray started here (127.0.0.1, no dashboard, usage stats off, one logical CPU
    per core) and shut down at the end.
Only what this run started is stopped: its workers, its placement group, and a local Ray it
started itself. Never `ray stop`, which kills every Ray process on the machine.
"""
from __future__ import annotations

import logging
import os

import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.ray_rl.driver import RaySetup, RemoteGenerator, RemoteModels, lockstep, remote_reward_scores
from rlhf_ops.ray_rl.group import RoleGroup
from rlhf_ops.ray_rl.placement import describe, place, plan_groups
from rlhf_ops.rl.ray_config import RayPPOConfig

logger = logging.getLogger(__name__)


def connect() -> bool:
    """Make sure Ray is initialised; True when this call started a local Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def build_ray(cfg: RayPPOConfig) -> RaySetup:
    """Prompts, scorer, metrics on the driver; every model in its group, started in parallel."""
    import ray

    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.rl.rewards import ScoringOptions
    from rlhf_ops.rl.setup import build_prompts, kl_controller, make_scorer, total_steps
    from rlhf_ops.utils.tracking import run_metrics

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    prompts = build_prompts(cfg, tok, cfg.prompt_data, cfg.prompt_split, cfg.prompt_data_probs)
    evals = build_prompts(cfg, tok, cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    specs = plan_groups(cfg)
    hybrid = cfg.colocate_all and cfg.vllm_num_engines > 0  # the engines share the actor's bundles: none of their own
    engines = (0 if hybrid else cfg.vllm_num_engines, cfg.vllm_tensor_parallel_size)
    if cfg.vllm_enable_sleep and not ray.cluster_resources().get("GPU"):
        raise ConfigError("--vllm_enable_sleep: vLLM's sleep mode needs CUDA GPUs, and this Ray cluster has none")
    pg, gpu = place(specs, cfg.ray_cpus_per_rank, cfg.placement_timeout, *engines)
    logger.info("placed %s%s on %s", describe(specs, *engines),
                f" with {cfg.vllm_num_engines} vLLM engine(s) on the actor's bundles" if hybrid else "",
                "GPUs" if gpu else f"CPU processes ({cfg.ray_cpus_per_rank:g} CPU each)")
    groups, first, gen = {}, 0, None
    try:
        for spec in specs:
            groups[spec.name] = RoleGroup(spec, pg, first, gpu, cfg.ray_cpus_per_rank, share=0.5 if hybrid else 1.0)
            first += spec.ranks
        holder = {role: g for g in groups.values() for role in g.spec.roles}
        steps = total_steps(cfg, len(prompts))
        pending = [(g, g.start(cfg, steps)) for g in groups.values()]  # all groups load their models at once
        if cfg.vllm_num_engines:  # the engines start (from --pretrain) while the groups load their models
            from rlhf_ops.ray_rl.engines import RayEngines

            try:
                gen = RayEngines(cfg, tok, holder["actor"], pg, 0 if hybrid else first, gpu,
                                 share=0.5 if hybrid else 1.0)
            except BaseException:
                for g, refs in pending:  # a group that failed to load says why first (a bad --pretrain fails both)
                    g.gather(refs, "setup")
                raise
        for g, refs in pending:
            g.gather(refs, "setup")
        if gen is None:
            gen = RemoteGenerator(holder["actor"], cfg.micro_rollout_batch_size, lockstep(cfg, holder["actor"]))
    except BaseException:
        if gen is not None:
            gen.close()
        for g in groups.values():
            g.kill()
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)
        raise
    rm = remote_reward_scores(holder["reward"], cfg.micro_rollout_batch_size) if "reward" in holder else None
    models = RemoteModels(holder, gen, make_scorer(ScoringOptions.of(cfg), tok, None, rm_scores=rm), tok.pad_token_id)
    return RaySetup(cfg, tok, prompts, evals, None, None, models, gen, kl_controller(cfg), run_metrics(cfg, 0),
                    tok.pad_token_id, groups, holder, pg)


def train_ppo_ray(cfg: RayPPOConfig) -> dict[str, float]:
    import ray

    from rlhf_ops.trainers.rl import run_rl

    from rlhf_ops.ray_rl.group import RoleDied
    from rlhf_ops.utils.checkpoint import latest_checkpoint

    started = connect()
    try:
        s = build_ray(cfg)
        try:
            return run_rl(s)
        except RoleDied as e:
            raise RoleDied(f"{e}; last good checkpoint: {latest_checkpoint(cfg.ckpt_path) or 'none'} in "
                           f"{cfg.ckpt_path} (resume with --load_checkpoint)") from None
        finally:
            s.close()
    finally:
        if started:
            ray.shutdown()
