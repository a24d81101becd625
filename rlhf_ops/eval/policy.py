"""Scoring policies on a prompt set with the RL loop's own pieces.

* `greedy_eval`: greedy responses (`rl.experience.sample` on an `HFGenerator`), scored by the
  reward function through `rl.setup.make_scorer`: mean reward and the function's extra logs (accuracy);
* `sampled_eval`: the same means over n seeded samples per prompt at a temperature (the policy RL trains);
* `kl_to_reference`: one response per prompt sampled from the policy at temperature 1 (seeded);
  k1 = log p_policy - log p_ref summed over response tokens (`models.forward.target_logprob_sums`,
  LM head at response tokens only), averaged per sequence and per token;
* `win_rate`: reward-model scores of two models' responses to the same prompts, ties count 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf_ops.generation.base import HFGenerator, SamplingParams
from rlhf_ops.rl.experience import Models, PromptSet, sample
from rlhf_ops.rl.rewards import Scores


@dataclass
class Responses:
    """One response per prompt: sequences (prompt + response ids), prompt lengths, prompt row of each."""
    seqs: list[list[int]]
    plens: list[int]
    rows: list[int]

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode(s[p:], skip_special_tokens=True) for s, p in zip(self.seqs, self.plens)]


def load_policy(path: str, bf16: bool = False) -> torch.nn.Module:
    """A causal LM in eval mode without gradients."""
    from rlhf_ops.models.loading import load_causal_lm

    model = load_causal_lm(path, bf16=bf16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def respond(model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, params: SamplingParams,
            micro_batch_size: int) -> Responses:
    """One response per prompt from `model` (greedy when params.temperature is 0)."""
    gen = HFGenerator(model, tokenizer, micro_batch_size)
    models = Models(model, None, None, gen, score=None, pad_id=tokenizer.pad_token_id)  # type: ignore[arg-type]
    return Responses(*sample(models, prompts, range(len(prompts)), 1, params))


def greedy_eval(model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, score: Callable[..., Scores],
                max_new_tokens: int, micro_batch_size: int, name: str = "the model"
                ) -> tuple[dict[str, float], Responses, Scores]:
    """({"reward", <extra logs, e.g. accuracy>, "response_length"}, the greedy responses, their scores)."""
    resp = respond(model, tokenizer, prompts, SamplingParams(0.0, max_new_tokens, 1.0), micro_batch_size)
    sc = score(prompts, resp.seqs, resp.rows, resp.plens, batch=f"the greedy responses of {name}")
    metrics = {"reward": sc.rewards.mean().item(), **{k: v.mean().item() for k, v in sc.extra.items()},
               "response_length": sum(len(s) - p for s, p in zip(resp.seqs, resp.plens)) / len(resp.seqs)}
    return metrics, resp, sc


def sampled_eval(model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, score: Callable[..., Scores],
                 max_new_tokens: int, micro_batch_size: int, n: int, temperature: float, seed: int,
                 name: str = "the model") -> dict[str, float]:
    """{"sampled_reward", "sampled_<extra log>"...}: means over `n` seeded samples per prompt at `temperature`.

    The RL stage trains the policy it samples (temperature 1), so this is the figure RL optimises;
    greedy decoding only sees the mode, which is unchanged when RL removes low-probability mistakes."""
    gen = HFGenerator(model, tokenizer, micro_batch_size)
    models = Models(model, None, None, gen, score=None, pad_id=tokenizer.pad_token_id)  # type: ignore[arg-type]
    seqs, plens, rows = sample(models, prompts, range(len(prompts)), n, SamplingParams(temperature, max_new_tokens, 1.0, seed=seed))
    sc = score(prompts, seqs, rows, plens, batch=f"the sampled responses of {name}")
    return {"sampled_reward": sc.rewards.mean().item(), **{f"sampled_{k}": v.mean().item() for k, v in sc.extra.items()}}


@torch.no_grad()
def response_logprob_sums(model: torch.nn.Module, resp: Responses, pad_id: int, micro_batch_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(response token), number of response tokens) per sequence, float32 / long [S]."""
    from rlhf_ops.models.forward import target_logprob_sums
    from rlhf_ops.rl.forward import response_batch

    sums, counts = [], []
    for i in range(0, len(resp.seqs), micro_batch_size):
        b = response_batch(resp.seqs[i:i + micro_batch_size], resp.plens[i:i + micro_batch_size], pad_id)
        s, c = target_logprob_sums(model, b)
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)


def kl_to_reference(policy: torch.nn.Module, ref: torch.nn.Module, tokenizer: Any, prompts: PromptSet,
                    max_new_tokens: int, micro_batch_size: int, seed: int) -> dict[str, float]:
    """k1 KL(policy || ref) on one temperature-1 sample per prompt from the policy.

    per_sequence: mean over prompts of sum_t (log p_policy - log p_ref); per_token: the same total
    divided by the number of response tokens (token-weighted)."""
    resp = respond(policy, tokenizer, prompts, SamplingParams(1.0, max_new_tokens, 1.0, seed=seed), micro_batch_size)
    pad = tokenizer.pad_token_id
    lp_pol, n_tok = response_logprob_sums(policy, resp, pad, micro_batch_size)
    lp_ref, _ = response_logprob_sums(ref, resp, pad, micro_batch_size)
    kl_S = lp_pol - lp_ref
    return {"per_sequence": kl_S.mean().item(), "per_token": (kl_S.sum() / n_tok.sum().clamp(min=1)).item()}


def win_rate(rm_score: Callable[..., Scores], prompts: PromptSet, a: Responses, b: Responses) -> float:
    """Fraction of prompts where the reward model prefers a's response to b's; ties count 0.5."""
    if a.rows != b.rows:
        raise ValueError("win_rate: the two response sets answer different prompts")
    ra = rm_score(prompts, a.seqs, a.rows, a.plens, batch="the win-rate responses (first model)").rewards
    rb = rm_score(prompts, b.seqs, b.rows, b.plens, batch="the win-rate responses (second model)").rewards
    return ((ra > rb).float() + 0.5 * (ra == rb).float()).mean().item()
