"""The RL loop: one loop for PPO, REINFORCE++, REINFORCE++-baseline, RLOO, GRPO and Dr. GRPO.

    for episode: for step:  sample G completions of --rollout_batch_size prompts
                            score them (reward function and/or reward model)
                            reference/old logprobs, values -> advantages (the estimator's one `match`)
                            --max_epochs passes of clipped policy (+ value) updates

The estimator is a config value: only `compute_advantages` and the loss aggregation look at it.
`run_rl` takes a built setup: local engines (`rl.setup.build`, `train_ppo`) or Ray role groups
(`ray_rl.run.build_ray`, `train_ppo_ray`); the loop only calls the setup's methods (train,
sync_weights, lr, save/load_checkpoint, evaluate, save), so both run the same code.
Checkpoints hold actor and critic engines (weights, optimizers, schedulers), the data cursor,
RNG states and the KL controller, so `--load_checkpoint` resumes exactly.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ops.generation.base import SamplingParams
from rlhf_ops.rl.config import RLConfig
from rlhf_ops.rl.experience import Experience, keep_groups, make_experience, rollout_logprobs, sample
from rlhf_ops.rl.rewards import Scores
from rlhf_ops.rl.setup import RLSetup, build
from rlhf_ops.utils import checkpoint as ckpt
from rlhf_ops.utils.profiling import StepProfiler

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One step's sampled and scored groups, before any forward of the trained models.

    `recorded_logp_N`: the sampler's own logprobs of these sequences (--use_rollout_logprobs), taken
    from the generator in the thread that sampled them, so an overlapping rollout (--async_train)
    never reads or clears another's."""
    sequences: list[list[int]]
    prompt_lens: list[int]
    scores: Scores
    recorded_logp_N: torch.Tensor | None
    metrics: dict[str, float]


def rollout(s: RLSetup, cursor: int, order: list[int], step: int) -> tuple[Rollout | None, int]:
    """Sample and score the rollout of optimizer step `step` (1-based) until --rollout_batch_size groups are
    kept; None when prompts run out. Sampling is seeded by (--seed + step - 1, refill try)."""
    cfg, G = s.cfg, s.cfg.n_samples_per_prompt
    step_seed = cfg.seed + step - 1
    seqs: list[list[int]] = []
    plens: list[int] = []
    scores = []
    t_gen = t_score = 0.0
    filtered = 0
    tries = 0
    while len(seqs) < cfg.rollout_batch_size * G:
        need = cfg.rollout_batch_size - len(seqs) // G
        if cursor + need > len(order):
            return None, cursor
        idx = order[cursor:cursor + need]
        cursor += need
        t0 = time.perf_counter()
        params = SamplingParams(cfg.temperature, cfg.generate_max_len, cfg.top_p, seed=step_seed * 1000 + tries)
        q, p, r = sample(s.models, s.prompts, idx, G, params)  # sequences, prompt lens, prompt rows
        t1 = time.perf_counter()
        name = f"the rollout of step {step}" + (f" (refill {tries})" if tries else "")
        sc = s.models.score(s.prompts, q, r, p, batch=f"{name}, prompt rows {idx[:8]}" + ("..." if len(idx) > 8 else ""))
        t_score += time.perf_counter() - t1
        t_gen += t1 - t0
        keep = [True] * len(idx)
        if cfg.dynamic_filtering:
            keep = keep_groups(sc.rewards, G, *cfg.dynamic_filtering_reward_range).tolist()
            filtered += keep.count(False)
        for j, k in enumerate(keep):
            if k:
                sl = slice(j * G, (j + 1) * G)
                seqs += q[sl]
                plens += p[sl]
                scores.append((sc.rewards[sl], {n: v[sl] for n, v in sc.extra.items()}))
        tries += 1
    merged = Scores(torch.cat([x[0] for x in scores]),
                    {n: torch.cat([x[1][n] for x in scores]) for n in scores[0][1]} if scores else {})
    recorded = rollout_logprobs(s.models.generator, seqs, plens) if cfg.use_rollout_logprobs else None
    return Rollout(seqs, plens, merged, recorded,
                   {"time_generate": t_gen, "time_score": t_score, "filtered_groups": float(filtered)}), cursor


def experience(s: RLSetup, ro: Rollout) -> Experience:
    """Reference/old logprobs, values and advantages of a rollout; a non-finite one stops the run."""
    exp = make_experience(s.models, s.cfg, ro.sequences, ro.prompt_lens, ro.scores, s.kl.value, ro.recorded_logp_N)
    for name in ("old_logp_BT", "ref_logp_BT", "values_BT", "advantages_BT", "returns_BT"):
        t = getattr(exp, name)
        bad = None if t is None else t[exp.mask_BT][~torch.isfinite(t[exp.mask_BT])]
        if bad is not None and bad.numel():
            raise FloatingPointError(f"non-finite {name[:-3]} in the rollout ({bad.numel()} tokens, e.g. {bad[0].item()})")
    exp.metrics.update(ro.metrics)
    return exp


def train_rl(cfg: RLConfig) -> dict[str, float]:
    return run_rl(build(cfg))


def run_rl(s: RLSetup) -> dict[str, float]:
    """The loop over a built setup: local engines (`rl.setup.build`) or Ray role groups (`ray_rl.driver`)."""
    from tqdm.auto import tqdm

    cfg = s.cfg
    steps_per_episode = len(s.prompts) // cfg.rollout_batch_size
    if steps_per_episode == 0:
        from rlhf_ops.config import ConfigError
        raise ConfigError(f"--rollout_batch_size {cfg.rollout_batch_size} is larger than the prompt set ({len(s.prompts)} prompts)")
    state = s.load_checkpoint() if cfg.load_checkpoint else None
    step, episode, cursor = (state["global_step"], state["episode"], state["cursor"]) if state else (0, 0, 0)
    if state:
        s.kl.load_state_dict(state["kl"])
    s.sync_weights()  # a generator with its own copy of the weights (vLLM) starts from the actor's
    s.metrics.truncate_after(step)
    if step == 0 and s.eval_prompts is not None:
        s.evaluate(step)
    bar = tqdm(total=steps_per_episode * cfg.num_episodes, initial=step, desc="rl")
    final: dict[str, float] = {}
    # --async_train: the next step's rollout samples (with the weights of the last sync) while this step
    # trains; it is joined before the next sync, so a rollout is never more than one update behind
    pool = ThreadPoolExecutor(1, thread_name_prefix="rollout") if cfg.async_train else None
    prof = StepProfiler(cfg.profile_steps, Path(cfg.ckpt_path) / "profile",
                        total_steps=steps_per_episode * cfg.num_episodes)
    ahead: Future | None = None
    try:
        while episode < cfg.num_episodes:
            order = torch.randperm(len(s.prompts), generator=torch.Generator().manual_seed(cfg.seed + episode)).tolist()
            while True:
                prof.begin(step + 1)
                t0 = time.perf_counter()
                try:
                    ro, cursor_next = ahead.result() if ahead else rollout(s, cursor, order, step + 1)
                    ahead = None
                    if ro is None:
                        break
                    if pool is not None:
                        ahead = pool.submit(rollout, s, cursor_next, order, step + 2)
                    exp = experience(s, ro)
                    t1 = time.perf_counter()
                    train_actor = step >= cfg.freezing_actor_steps
                    m = s.train(exp, train_actor, s.kl.value, cfg.seed + step)
                except FloatingPointError as e:
                    raise FloatingPointError(
                        f"rl: {e} at step {step + 1} (episode {episode}); nothing of this step was saved; last good "
                        f"checkpoint: {ckpt.latest_checkpoint(cfg.ckpt_path) or 'none'} in {cfg.ckpt_path}") from e
                t_train = time.perf_counter() - t1
                if ahead is not None:
                    wait_s = time.perf_counter()
                    ahead.exception()  # the generator's weights change only once its rollout is done
                    m["time_wait_rollout"] = time.perf_counter() - wait_s
                sync_s = time.perf_counter()
                s.sync_weights()  # vLLM engines reload the new weights; the async sampler copies them
                m["time_sync"] = time.perf_counter() - sync_s
                s.kl.update(exp.metrics["kl"], len(exp))
                step += 1
                prof.end(step)
                cursor = cursor_next  # a checkpoint resumes at the first prompt no trained step has used
                bar.update(1)
                logs = {**exp.metrics, **m, "kl_coef": s.kl.value, "time_train": t_train,
                        "time_step": time.perf_counter() - t0, "episode": episode, "lr": s.lr()}
                if step % cfg.logging_steps == 0:
                    s.metrics.log(step, logs)
                bar.set_postfix(reward=f"{logs['reward']:.3f}", kl=f"{logs['kl']:.4f}")
                if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and s.eval_prompts is not None:
                    final = s.evaluate(step)
                if cfg.save_steps > 0 and step % cfg.save_steps == 0:
                    s.save_checkpoint(step, {"global_step": step, "episode": episode, "cursor": cursor,
                                             "kl": s.kl.state_dict()})
            episode, cursor = episode + 1, 0
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    prof.close()
    bar.close()
    if s.eval_prompts is not None and (cfg.eval_steps <= 0 or step % cfg.eval_steps):
        final = s.evaluate(step)
    s.save()
    s.metrics.close()
    return final
