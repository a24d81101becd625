"""One pass of policy (and value) updates over an `Experience`.

The experience is shuffled and cut into --train_batch_size mini-batches (one optimizer step
each), themselves cut into --micro_train_batch_size micro-batches that the DeepSpeed engine
accumulates. The estimator changes only the loss aggregation (Dr. GRPO: token sums over a
constant, --generate_max_len) and whether a KL term joins the loss (--use_kl_loss).
"""
from __future__ import annotations

from typing import Any

import torch

from rlhf_ops.algos.losses import entropy_loss, kl_loss, ppo_policy_loss, value_loss
from rlhf_ops.rl.experience import Experience
from rlhf_ops.rl.forward import action_logprobs, action_values, response_batch, to_BT


def _micro(exp: Experience, idx: list[int], pad_id: int, cfg: Any, device: Any):
    resp = [exp.response_lens[i] for i in idx]
    T = max(resp)
    batch = response_batch([exp.sequences[i] for i in idx], [exp.prompt_lens[i] for i in idx], pad_id,
                           cfg.packing_samples, cfg.prefix_sharing).to(device)
    take = lambda t: None if t is None else t[idx, :T].to(device)  # noqa: E731
    return batch, resp, take


def actor_step(engine: Any, exp: Experience, idx: list[int], cfg: Any, kl_coef: float, pad_id: int,
               scale: float = 1.0) -> dict[str, float]:
    """One micro-batch of the clipped policy loss (+ KL loss, - entropy bonus); backward x `scale`."""
    batch, resp, take = _micro(exp, idx, pad_id, cfg, engine.module.device)
    logp_N, ent_N = action_logprobs(engine.module, batch, cfg.temperature, with_entropy=True,
                                    entropy_grad=cfg.entropy_loss_coef != 0)
    logp_BT, mask_BT = to_BT(logp_N, resp), take(exp.mask_BT)
    dr = cfg.advantage_estimator == "dr_grpo"
    agg = dict(loss_agg="seq_mean_token_sum_norm" if dr else "token_mean",
               norm_constant=float(cfg.generate_max_len) if dr else None)
    pl = ppo_policy_loss(logp_BT, take(exp.old_logp_BT), take(exp.advantages_BT), mask_BT,
                         clip_eps_low=cfg.eps_clip, clip_eps_high=cfg.eps_clip, **agg)
    ent = entropy_loss(to_BT(ent_N, resp), mask_BT, **agg)
    loss = pl.loss - cfg.entropy_loss_coef * ent
    out = {"policy_loss": pl.loss.item(), "clip_frac": pl.clip_frac.item(), "approx_kl": pl.approx_kl.item(),
           "entropy": ent.item()}
    if cfg.use_kl_loss and exp.ref_logp_BT is not None:
        kl = kl_loss(logp_BT, take(exp.ref_logp_BT), mask_BT, kind=cfg.kl_estimator, **agg)
        loss = loss + kl_coef * kl
        out["kl_loss"] = kl.item()
    if not torch.isfinite(loss.detach()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in out.items())
        raise FloatingPointError(f"non-finite actor loss {loss.item()} ({parts}) on the micro-batch of experience rows {idx}")
    engine.backward_step(loss * scale)
    return out


def critic_step(engine: Any, exp: Experience, idx: list[int], cfg: Any, pad_id: int,
                scale: float = 1.0) -> dict[str, float]:
    """One micro-batch of the clipped value loss; backward x `scale`."""
    batch, resp, take = _micro(exp, idx, pad_id, cfg, engine.module.device)
    values_BT = to_BT(action_values(engine.module, batch), resp)
    vl = value_loss(values_BT, take(exp.values_BT), take(exp.returns_BT), take(exp.mask_BT), clip_eps=cfg.value_clip)
    if not torch.isfinite(vl.loss.detach()):
        raise FloatingPointError(f"non-finite value loss {vl.loss.item()} on the micro-batch of experience rows {idx}")
    engine.backward_step(vl.loss * scale)
    return {"value_loss": vl.loss.item(), "value_clip_frac": vl.clip_frac.item()}


def token_mean_scales(resp_lens: list[int], micro_batches: list[list[int]]) -> list[float]:
    """Per-micro-batch loss scales that turn DeepSpeed's average of micro-batch token means into
    the token mean of the whole optimizer step (so micro-batch size never changes the gradient).

    A micro-batch's token mean times (its tokens x accumulation steps / the step's tokens),
    averaged over the accumulation steps, is the step's token sum over the step's tokens.
    Across data-parallel ranks the same holds with `micro_batches` = every rank's micro-batches of
    the step: DeepSpeed divides by accumulation steps x world size, which is their number.
    """
    tokens = [sum(resp_lens[i] for i in mb) for mb in micro_batches]
    total = sum(tokens)
    return [t * len(micro_batches) / total for t in tokens]


MicroBatch = tuple[list[int], float]  # (experience rows, loss scale)


def plan_updates(resp_lens: list[int], cfg: Any, seed: int) -> list[list[MicroBatch]]:
    """The optimizer steps of --max_epochs passes over an experience of len(resp_lens) rows: each a
    shuffled --train_batch_size slice cut into --micro_train_batch_size micro-batches, with their
    loss scales (`token_mean_scales`; Dr. GRPO's constant normaliser needs no rescaling). With
    --prefix_sharing the prompt groups (rows p*G..p*G+G-1) are shuffled instead of the rows."""
    g = torch.Generator().manual_seed(seed)
    mb, steps, G = cfg.micro_train_batch_size, [], cfg.n_samples_per_prompt
    for _ in range(cfg.max_epochs):
        if cfg.prefix_sharing and len(resp_lens) % G == 0:  # whole groups, so their samples share the prompt
            order = [k * G + j for k in torch.randperm(len(resp_lens) // G, generator=g).tolist() for j in range(G)]
        else:
            order = torch.randperm(len(resp_lens), generator=g).tolist()
        for start in range(0, len(order), cfg.train_batch_size):
            step = order[start:start + cfg.train_batch_size]
            micro = [step[i:i + mb] for i in range(0, len(step), mb)]
            scales = [1.0] * len(micro) if cfg.advantage_estimator == "dr_grpo" else token_mean_scales(resp_lens, micro)
            steps.append(list(zip(micro, scales)))
    return steps


def run_updates(exp: Experience, actor: Any | None, critic: Any | None, cfg: Any, kl_coef: float, pad_id: int,
                steps: list[list[MicroBatch]]) -> tuple[dict[str, float], int]:
    """Run planned micro-batches through the actor (None: frozen) and critic engines: (metric sums, micro-batches)."""
    sums: dict[str, float] = {}
    n = 0
    for step in steps:
        for idx, scale in step:
            m = actor_step(actor, exp, idx, cfg, kl_coef, pad_id, scale) if actor is not None else {}
            if critic is not None:
                m.update(critic_step(critic, exp, idx, cfg, pad_id, scale))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    return sums, n


def train_on(exp: Experience, actor: Any, critic: Any | None, cfg: Any, kl_coef: float, pad_id: int,
             train_actor: bool, seed: int) -> dict[str, float]:
    """--max_epochs passes over the experience; returns metrics averaged over micro-batches.

    Each --train_batch_size slice of the shuffled experience is one optimizer step (`plan_updates`).
    """
    sums, n = run_updates(exp, actor if train_actor else None, critic, cfg, kl_coef, pad_id,
                          plan_updates(exp.response_lens, cfg, seed))
    return {k: v / n for k, v in sums.items()}
