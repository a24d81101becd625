"""Experience making: prompts -> samples -> rewards -> reference/old logprobs, values -> advantages.

One `Experience` holds B = P x G sequences (rows ordered p*G + g, G = --n_samples_per_prompt)
and their per-action tensors, [B, Tr] right-padded. Everything here runs without gradients;
the RL loop then trains on it for --max_epochs passes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhf_ops.algos.advantages import compute_advantages
from rlhf_ops.algos.kl import kl_estimate
from rlhf_ops.generation.base import Generator, SamplingParams
from rlhf_ops.rl.forward import action_logprobs, action_mask, action_values, response_batch, to_BT
from rlhf_ops.rl.rewards import Scores


@dataclass
class PromptSet:
    """Tokenized prompts with their text (for the reward function) and reference labels."""
    ids: list[list[int]]
    texts: list[str]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Experience:
    sequences: list[list[int]]
    prompt_lens: list[int]
    response_lens: list[int]
    mask_BT: torch.Tensor          # bool, valid action positions
    old_logp_BT: torch.Tensor
    ref_logp_BT: torch.Tensor | None
    values_BT: torch.Tensor | None
    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor
    rewards_B: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class Models:
    """What experience making needs: the live actor, a frozen reference, an optional critic.

    The three forwards are methods so that models living elsewhere (Ray role groups,
    `rlhf_ops.ray_rl`) can stand in for local modules; each returns per-action values [N] in
    row-major order, computed over --micro_rollout_batch_size chunks of the rows.
    """
    actor: torch.nn.Module
    ref: torch.nn.Module | None
    critic: torch.nn.Module | None
    generator: Generator
    score: Callable[..., Scores]  # (prompt set, sequences, prompt rows, prompt lens, batch=name) -> Scores
    pad_id: int

    def _forward(self, model: torch.nn.Module, fn: Callable[[Any], torch.Tensor], sequences: list[list[int]],
                 prompt_lens: list[int], cfg: Any) -> torch.Tensor:
        from rlhf_ops.distributed.device import param_device

        return forward_all(fn, sequences, prompt_lens, self.pad_id, cfg.micro_rollout_batch_size, cfg.packing_samples,
                           param_device(model), cfg.prefix_sharing)

    def old_logprobs(self, sequences: list[list[int]], prompt_lens: list[int], cfg: Any) -> torch.Tensor:
        """logp_N of the actor, in eval mode (no dropout) as the samples were drawn (a forward; with
        --use_rollout_logprobs `make_experience` is handed the sampler's own and skips this)."""
        was = self.actor.training
        self.actor.eval()
        try:
            return self._forward(self.actor, lambda b: action_logprobs(self.actor, b, cfg.temperature)[0], sequences, prompt_lens, cfg)
        finally:
            self.actor.train(was)

    def ref_logprobs(self, sequences: list[list[int]], prompt_lens: list[int], cfg: Any) -> torch.Tensor | None:
        """logp_N of the frozen reference; None without one."""
        if self.ref is None:
            return None
        return self._forward(self.ref, lambda b: action_logprobs(self.ref, b, cfg.temperature)[0], sequences, prompt_lens, cfg)

    def values(self, sequences: list[list[int]], prompt_lens: list[int], cfg: Any) -> torch.Tensor | None:
        """values_N of the critic; None without one."""
        if self.critic is None:
            return None
        return self._forward(self.critic, lambda b: action_values(self.critic, b), sequences, prompt_lens, cfg)


def rollout_logprobs(generator: Any, sequences: list[list[int]], prompt_lens: list[int]) -> torch.Tensor | None:
    """logp_N the generator recorded for `sequences` (row-major), or None when any is missing.
    Clears the generator's record: each rollout is looked up once."""
    table = getattr(generator, "rollout_logprobs", None)
    if not table:
        return None
    try:
        rows = [table[tuple(s)] for s in sequences]
    except KeyError:
        return None
    finally:
        table.clear()
    if any(len(r) != len(s) - p for r, s, p in zip(rows, sequences, prompt_lens)):
        return None
    return torch.tensor([x for r in rows for x in r], dtype=torch.float32)


def sample(models: Models, prompts: PromptSet, idx: Sequence[int], n: int, params: SamplingParams
           ) -> tuple[list[list[int]], list[int], list[int]]:
    """G samples of each prompt in `idx`: (sequences, prompt_lens, prompt index of each row)."""
    rows = [i for i in idx for _ in range(n)]
    completions = models.generator.generate([prompts.ids[i] for i in rows], params)
    seqs = [prompts.ids[i] + c for i, c in zip(rows, completions)]
    return seqs, [len(prompts.ids[i]) for i in rows], rows


@torch.no_grad()
def forward_all(fn: Callable[[Any], torch.Tensor], sequences: list[list[int]], prompt_lens: list[int],
                pad_id: int, micro: int, packed: bool, device: torch.device | None = None,
                share_prefix: bool = False) -> torch.Tensor:
    """Concatenate fn(batch on `device`) -> per-action values over micro-batches: [N] in row-major order, on the CPU."""
    out = []
    for i in range(0, len(sequences), micro):
        b = response_batch(sequences[i:i + micro], prompt_lens[i:i + micro], pad_id, packed, share_prefix)
        out.append(fn(b if device is None else b.to(device)).float().cpu())
    return torch.cat(out)


def make_experience(models: Models, cfg: Any, sequences: list[list[int]], prompt_lens: list[int],
                    scores: Scores, kl_coef: float, recorded_logp_N: torch.Tensor | None = None) -> Experience:
    """Reference/old logprobs, values, KL and advantages for sampled, scored sequences (`recorded_logp_N`:
    the sampler's logprobs of them, which then stand in for the actor's old-logprob forward)."""
    t0 = time.perf_counter()
    resp = [len(s) - p for s, p in zip(sequences, prompt_lens)]
    mask_BT = action_mask(resp)
    as_BT = lambda t_N: None if t_N is None else to_BT(t_N, resp)  # noqa: E731
    old_logp = as_BT(recorded_logp_N if recorded_logp_N is not None else models.old_logprobs(sequences, prompt_lens, cfg))
    ref_logp = as_BT(models.ref_logprobs(sequences, prompt_lens, cfg))
    values = as_BT(models.values(sequences, prompt_lens, cfg)) if cfg.needs_critic else None
    kl_BT = (kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask_BT) if ref_logp is not None else torch.zeros_like(old_logp)
    G = cfg.n_samples_per_prompt
    adv = compute_advantages(cfg.advantage_estimator, scores_PG=scores.rewards.view(-1, G), kl_BT=kl_BT,
                             mask_BT=mask_BT, values_BT=values, kl_coef=0.0 if cfg.use_kl_loss else kl_coef,
                             gamma=cfg.gamma, lambd=cfg.lambd, std_norm=not cfg.no_advantage_std_norm)
    m = mask_BT.float()
    metrics = {"reward": scores.rewards.mean().item(), "reward_std": scores.rewards.std().item() if len(resp) > 1 else 0.0,
               "response_length": float(sum(resp) / len(resp)),
               "kl": ((kl_BT * m).sum(1) / m.sum(1).clamp(min=1)).mean().item(),
               "time_logprobs": time.perf_counter() - t0}
    metrics.update({k: v.mean().item() for k, v in scores.extra.items()})
    return Experience(sequences, prompt_lens, resp, mask_BT, old_logp, ref_logp, values, adv.advantages_BT,
                      adv.returns_BT, scores.rewards, metrics)


def keep_groups(rewards_B: torch.Tensor, G: int, low: float, high: float) -> torch.Tensor:
    """Dynamic filtering: bool [P], groups whose rewards differ and whose mean lies in (low, high)."""
    r_PG = rewards_B.view(-1, G)
    mean_P = r_PG.mean(1)
    return (r_PG.max(1).values > r_PG.min(1).values) & (mean_P > low) & (mean_P < high)
