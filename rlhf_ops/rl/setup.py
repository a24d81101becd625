"""Build everything the RL loop needs from an `RLConfig`: prompts, models, engines, scoring, eval."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.data.batching import collate
from rlhf_ops.generation.base import HFGenerator, SamplingParams
from rlhf_ops.rl.config import RLConfig
from rlhf_ops.rl.experience import Models, PromptSet, sample
from rlhf_ops.rl.rewards import Scores, ScoringOptions, call_reward_func, load_reward_func, normalize
from rlhf_ops.rl.update import train_on
from rlhf_ops.utils import checkpoint as ckpt

logger = logging.getLogger(__name__)


def build_prompts(cfg: RLConfig, tokenizer: Any, spec: str, split: str, probs: str | None = None) -> PromptSet:
    from rlhf_ops.data.sources import load_mixture, require_keys
    from rlhf_ops.data.templates import prompt_text
    from rlhf_ops.data.tokenize import special_prefix

    ds = load_mixture(spec, probs, split=split, max_samples=cfg.max_samples, seed=cfg.seed)
    require_keys(ds, [cfg.input_key] + ([cfg.label_key] if cfg.label_key else []), spec)
    texts = [prompt_text(r[cfg.input_key], tokenizer, apply_chat_template=cfg.apply_chat_template,
                         input_template=cfg.input_template, where=f"{spec} ({split}) row {i}") for i, r in enumerate(ds)]
    labels = [r[cfg.label_key] for r in ds] if cfg.label_key else [None] * len(texts)
    prefix = [] if cfg.apply_chat_template else special_prefix(tokenizer)
    ids = [prefix + x for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, x in enumerate(ids) if len(x) <= cfg.prompt_max_len]
    if len(keep) < len(ids):
        logger.info("%s: %d of %d prompts longer than --prompt_max_len %d were dropped", spec, len(ids) - len(keep),
                    len(ids), cfg.prompt_max_len)
    if not keep:
        raise ConfigError(f"--prompt_max_len {cfg.prompt_max_len} is shorter than every prompt in {spec}")
    return PromptSet([ids[i] for i in keep], [texts[i] for i in keep], [labels[i] for i in keep])


@dataclass
class RLSetup:
    cfg: RLConfig
    tokenizer: Any
    prompts: PromptSet
    eval_prompts: PromptSet | None
    actor: Any           # Engine
    critic: Any | None   # Engine
    models: Models
    generator: HFGenerator
    kl: Any
    metrics: Any
    pad_id: int

    def engines(self) -> dict[str, Any]:
        return {"actor": self.actor.module, **({"critic": self.critic.module} if self.critic else {})}

    def train(self, exp: Any, train_actor: bool, kl_coef: float, seed: int) -> dict[str, float]:
        return train_on(exp, self.actor, self.critic, self.cfg, kl_coef, self.pad_id, train_actor, seed)

    def sync_weights(self) -> None:
        self.generator.sync_weights(self.actor.module)

    def lr(self) -> float:
        return self.actor.lr

    def load_checkpoint(self) -> dict | None:
        return ckpt.load_checkpoint(self.engines(), self.cfg.ckpt_path)

    def save_checkpoint(self, step: int, state: dict) -> None:
        ckpt.save_checkpoint(self.engines(), self.cfg.ckpt_path, step, state, self.cfg.max_ckpt_num)

    def evaluate(self, step: int) -> dict[str, float]:
        cfg, ev = self.cfg, self.eval_prompts
        params = SamplingParams(cfg.eval_temperature, cfg.generate_max_len, cfg.top_p if cfg.eval_temperature > 0 else 1.0,
                                seed=cfg.seed)
        seqs, plens, rows = sample(self.models, ev, range(len(ev)), cfg.eval_n_samples_per_prompt, params)
        sc = self.models.score(ev, seqs, rows, plens, batch=f"the eval at step {step}")
        result = {"reward": sc.rewards.mean().item(), **{k: v.mean().item() for k, v in sc.extra.items()},
                  "response_length": sum(len(s) - p for s, p in zip(seqs, plens)) / len(seqs)}
        self.metrics.log(step, result, split="eval")
        logger.info("rl eval @ step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def save(self) -> None:
        from rlhf_ops.models.reward import head_key_prefixes
        from rlhf_ops.utils.checkpoint import save_hf_model

        save_hf_model(self.actor.module, self.tokenizer, self.cfg.save_path, {"metrics.jsonl": str(self.metrics.path)})
        if self.critic is not None and self.cfg.save_value_network:  # the head on disk under --value_head_prefix
            save_hf_model(self.critic.module, self.tokenizer, self.cfg.save_path.rstrip("/") + "_critic",
                          key_prefixes=head_key_prefixes(self.cfg.value_head_prefix))


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def reward_model_scores(reward_model: torch.nn.Module, opts: ScoringOptions, pad_id: int,
                        seqs: list[list[int]]) -> torch.Tensor:
    """[B] sequence scores of a reward model over `opts.micro_batch_size` chunks (normalised with
    --normalize_reward by the mean/std its config stores)."""
    from rlhf_ops.distributed.device import param_device
    from rlhf_ops.models.reward import sequence_scores

    parts = []
    for i in range(0, len(seqs), opts.micro_batch_size):
        chunk = seqs[i:i + opts.micro_batch_size]
        b = collate(chunk, [[1] * len(c) for c in chunk], pad_id, packed=opts.packing_samples).to(param_device(reward_model))
        parts.append(sequence_scores(reward_model, b).float().cpu())
    rm = torch.cat(parts)
    if opts.normalize_reward:
        c = reward_model.config
        rm = normalize(rm, getattr(c, "mean", None), getattr(c, "std", None))
    return rm


def make_scorer(opts: ScoringOptions, tokenizer: Any, reward_model: torch.nn.Module | None,
                rm_scores: Callable[[list[list[int]]], torch.Tensor] | None = None):
    """(prompt set, sequences, prompt rows, prompt lens, batch=name) -> Scores: reward model + function, clipped.

    `batch` names the batch in error messages ("the rollout of step 3"); default: the call's number.
    `rm_scores(seqs)` stands in for `reward_model_scores` of a reward model that lives elsewhere (Ray)."""
    fn = load_reward_func(opts.reward_func) if opts.reward_func else None
    calls = {"n": 0}
    if rm_scores is None and reward_model is not None:
        rm_scores = functools.partial(reward_model_scores, reward_model, opts, tokenizer.pad_token_id)

    @torch.no_grad()
    def score(ps: PromptSet, seqs: list[list[int]], rows: list[int], plens: list[int], batch: str | None = None) -> Scores:
        calls["n"] += 1
        total = torch.zeros(len(seqs))
        extra: dict[str, torch.Tensor] = {}
        if rm_scores is not None:
            total += rm_scores(seqs)
        if fn is not None:
            queries = [ps.texts[r] + tokenizer.decode(s[p:], skip_special_tokens=True) for s, r, p in zip(seqs, rows, plens)]
            sc = call_reward_func(fn, opts.reward_func, queries, [ps.texts[r] for r in rows], [ps.labels[r] for r in rows],
                                  batch or f"scoring call {calls['n']}")
            total += sc.rewards
            extra = sc.extra
        return Scores(total.clamp(*opts.reward_clip_range), extra)

    return score


def model_roles(cfg: RLConfig) -> list[str]:
    """The models a run needs, in load order: actor, ref (a KL term), reward (a reward model), critic (gae)."""
    return (["actor"] + (["ref"] if cfg.init_kl_coef > 0 or cfg.use_kl_loss else [])
            + (["reward"] if cfg.reward_pretrain else []) + (["critic"] if cfg.needs_critic else []))


def total_steps(cfg: RLConfig, num_prompts: int) -> int:
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    G = cfg.n_samples_per_prompt
    return (num_prompts // cfg.rollout_batch_size) * cfg.num_episodes * cfg.max_epochs \
        * (cfg.rollout_batch_size * G // cfg.train_batch_size)


def load_models(cfg: RLConfig, tokenizer: Any, roles: list[str], steps: int) -> dict[str, Any]:
    """The models of `roles` in this process's group: actor and critic as engines, ref and reward frozen.

    Trained models load ZeRO-3-partitioned (their engines gather); the frozen reference and reward models are
    never wrapped in an engine, so they load whole (ds_config None): a partitioned one has empty weights. They go
    to the accelerator, or with --ref_reward_offload (train_ppo_ray) stay in host memory between uses."""
    from rlhf_ops.distributed.device import accelerator
    from rlhf_ops.distributed.engine import create_engine, ds_config, init_distributed
    from rlhf_ops.models.loading import load_causal_lm
    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.models.reward import load_value_model

    _, world = init_distributed()
    conf = ds_config(cfg, world) if {"actor", "critic"} & set(roles) else None  # only trained models need one
    lm = lambda path, c=conf: load_causal_lm(path, bf16=cfg.bf16, flash_attn=cfg.flash_attn, ds_config=c)  # noqa: E731
    vm = lambda path, c=conf: load_value_model(path, value_head_prefix=cfg.value_head_prefix, bf16=cfg.bf16,  # noqa: E731
                                               flash_attn=cfg.flash_attn, ds_config=c, pad_token_id=tokenizer.pad_token_id)
    out: dict[str, Any] = {}
    frozen = lambda m: _frozen(m).to("cpu" if getattr(cfg, "ref_reward_offload", False) else accelerator())  # noqa: E731
    if "actor" in roles:
        out["actor"] = create_engine(apply_lora(lm(cfg.pretrain), cfg), cfg, steps, lr=cfg.actor_learning_rate)
    if "ref" in roles:
        out["ref"] = frozen(lm(cfg.pretrain, None))
    if "reward" in roles:
        out["reward"] = frozen(vm(cfg.reward_pretrain, None))
    if "critic" in roles:
        out["critic"] = create_engine(vm(cfg.critic_pretrain or cfg.reward_pretrain or cfg.pretrain), cfg, steps,
                                      lr=cfg.critic_learning_rate)
    return out


def build(cfg: RLConfig) -> RLSetup:
    from rlhf_ops.distributed.engine import init_distributed
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.utils.tracking import run_metrics

    rank, world = init_distributed()
    if world != 1:
        raise ConfigError(f"rlhf_ops.cli.train_ppo runs on one process (world size is {world}); "
                          "multi-process RL is the job of the Ray entry point")
    if cfg.async_train and cfg.zero_stage == 3:
        raise ConfigError("--async_train samples from a whole copy of the actor, which ZeRO-3 partitions; "
                          "use --zero_stage 2 or less (or train_ppo_ray with a vLLM engine)")
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    prompts = build_prompts(cfg, tok, cfg.prompt_data, cfg.prompt_split, cfg.prompt_data_probs)
    evals = build_prompts(cfg, tok, cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    m = load_models(cfg, tok, model_roles(cfg), total_steps(cfg, len(prompts)))
    actor, critic = m["actor"], m.get("critic")
    gen = HFGenerator(actor.module, tok, cfg.micro_rollout_batch_size, cfg.use_rollout_logprobs, own_copy=cfg.async_train)
    models = Models(actor.module, m.get("ref"), critic.module if critic else None, gen, make_scorer(ScoringOptions.of(cfg), tok, m.get("reward")),
                    tok.pad_token_id)
    metrics = run_metrics(cfg, rank)
    return RLSetup(cfg, tok, prompts, evals, actor, critic, models, gen, kl_controller(cfg), metrics, tok.pad_token_id)


def kl_controller(cfg: RLConfig) -> Any:
    from rlhf_ops.algos.kl import AdaptiveKLController, FixedKLController

    return AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKLController(cfg.init_kl_coef)
