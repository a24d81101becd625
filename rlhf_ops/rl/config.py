"""The RL stage's typed config: `train_ppo`'s options under the reference's names.

One loop serves every estimator (`--advantage_estimator`); what differs is validated here once:
group estimators need several samples per prompt, `gae` needs a critic, and the KL goes either
into the reward (`--init_kl_coef`) or into the loss (`--use_kl_loss`, k3 for GRPO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rlhf_ops.config import check, opt
import os

from rlhf_ops.options import (LoRAOptions, TrainOptions, check_model_path, validate_lora, validate_prefix_sharing,
                              validate_train)

Estimator = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"]
GROUP_ESTIMATORS = ("reinforce_baseline", "rloo", "group_norm", "dr_grpo")


@dataclass(frozen=True)
class PromptOptions:
    prompt_data: Optional[str] = opt(None, "RL prompts: comma-separated files/dirs/hub names (rows with --input_key and --label_key)", required=True)
    prompt_data_probs: Optional[str] = opt(None, "Mixing probabilities for --prompt_data")
    prompt_split: str = opt("train", "Split of --prompt_data")
    eval_dataset: Optional[str] = opt(None, "Held-out prompts, evaluated every --eval_steps")
    eval_split: str = opt("eval", "Split of --eval_dataset")
    input_key: str = opt("input", "JSON key of the prompt (a string, or messages with --apply_chat_template)")
    label_key: Optional[str] = opt("label", "JSON key of the reference answer passed to the reward function")
    input_template: Optional[str] = opt(None, "Prompt template when not using the chat template, e.g. $'User: {}\\nAssistant: '")
    apply_chat_template: bool = opt(False, "Format prompts with tokenizer.apply_chat_template (generation prompt added)")
    tokenizer_chat_template: Optional[str] = opt(None, "A Jinja chat template replacing the tokenizer's")
    max_samples: int = opt(100_000_000, "Use at most N prompts")


@dataclass(frozen=True)
class RLConfig(PromptOptions, LoRAOptions, TrainOptions):
    """PPO / REINFORCE++ / GRPO / RLOO / Dr. GRPO on one machine (python -m rlhf_ops.cli.train_ppo)."""
    advantage_estimator: Estimator = opt("gae", "gae (PPO with a critic), reinforce (REINFORCE++), reinforce_baseline, rloo, group_norm (GRPO), dr_grpo")
    reward_pretrain: Optional[str] = opt(None, "Reward model (value-head checkpoint); also initialises the critic")
    reward_func: Optional[str] = opt(None, "Python file defining reward_func(queries, prompts, labels)", aliases=["remote_rm_url"])
    critic_pretrain: Optional[str] = opt(None, "Critic initialisation (default: --reward_pretrain, else --pretrain with a new head)")
    value_head_prefix: str = opt("score", "Name of the value head in reward/critic checkpoints")
    normalize_reward: bool = opt(False, "Normalise reward-model scores with the mean/std stored in its config")
    reward_clip_range: tuple[float, float] = opt((-10.0, 10.0), "Clip rewards to this range")
    n_samples_per_prompt: int = opt(1, "Completions sampled per prompt (a group)")
    rollout_batch_size: int = opt(1024, "Prompts per RL step (the replay buffer holds this x --n_samples_per_prompt)")
    micro_rollout_batch_size: int = opt(8, "Sequences per generation / scoring forward")
    prompt_max_len: int = opt(1024, "Prompts longer than this (in tokens) are dropped, and counted in the log")
    generate_max_len: int = opt(1024, "Maximum new tokens per completion")
    temperature: float = opt(1.0, "Sampling temperature")
    top_p: float = opt(1.0, "Nucleus sampling")
    num_episodes: int = opt(1, "Passes over the prompt data")
    actor_learning_rate: float = opt(1e-6, "Actor learning rate")
    critic_learning_rate: float = opt(9e-6, "Critic learning rate")
    freezing_actor_steps: int = opt(-1, "Train only the critic for the first N steps")
    init_kl_coef: float = opt(0.01, "KL coefficient (in the reward, or of the KL loss with --use_kl_loss)")
    kl_target: Optional[float] = opt(None, "Target KL for the adaptive controller (None: fixed coefficient)")
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller")
    use_kl_loss: bool = opt(False, "Put the KL in the loss instead of the reward (GRPO)")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "KL estimator (k3 is the usual choice with --use_kl_loss)")
    gamma: float = opt(1.0, "Discount")
    lambd: float = opt(1.0, "GAE lambda")
    eps_clip: float = opt(0.2, "PPO ratio clip")
    value_clip: float = opt(0.2, "Value clip")
    entropy_loss_coef: float = opt(0.0, "Entropy bonus coefficient")
    no_advantage_std_norm: bool = opt(False, "Keep mean-centering of advantages but do not divide by the std")
    dynamic_filtering: bool = opt(False, "Drop groups whose rewards are all equal or whose mean is outside the range, refill the batch")
    dynamic_filtering_reward_range: tuple[float, float] = opt((0.0, 1.0), "Keep groups whose mean reward lies strictly inside this range")
    eval_n_samples_per_prompt: int = opt(1, "Samples per eval prompt")
    eval_temperature: float = opt(0.6, "Eval sampling temperature (0: greedy)")
    save_value_network: bool = opt(False, "Also save the critic (to <save_path>_critic)")
    save_path: str = opt("./ckpt/ppo", "Final actor save path (Hugging Face format)")
    ckpt_path: str = opt("./ckpt/checkpoints_ppo", "Resumable checkpoints (actor, critic, optimizers, data position, RNG, KL controller)")
    packing_samples: bool = opt(False, "Pack each micro-batch into one row in the training and scoring forwards")
    prefix_sharing: bool = opt(False, "With --packing_samples, the samples of one prompt in a micro-batch carry it once "
                                      "(attention reads it from each); training micro-batches then take whole prompt "
                                      "groups. Same losses and gradients, fewer tokens; not with --flash_attn")
    use_rollout_logprobs: bool = opt(False, "PPO old logprobs from the sampler (HF generate records them) instead of a "
                                            "second actor forward; same weights and fp32: equal within ~1e-6")
    async_train: bool = opt(False, "Sample the next rollout while the current one trains (one update of policy lag "
                                   "at most; the generator keeps its own copy of the weights, synced after each step)")
    micro_train_batch_size: int = opt(4, "Sequences per training forward/backward")
    train_batch_size: int = opt(128, "Sequences per optimizer step (PPO mini-batch)")

    @property
    def needs_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    def __post_init__(self) -> None:
        validate_train(self)
        validate_lora(self)
        n = self.n_samples_per_prompt
        check(n >= 1, "n_samples_per_prompt", f"must be >= 1, got {n}")
        check(n > 1 or self.advantage_estimator not in GROUP_ESTIMATORS, "n_samples_per_prompt",
              f"--advantage_estimator {self.advantage_estimator} compares samples within a group and needs "
              "--n_samples_per_prompt > 1 (with 1 every advantage would be zero)")
        check(not self.dynamic_filtering or n > 1, "dynamic_filtering", "needs --n_samples_per_prompt > 1")
        validate_prefix_sharing(self)
        samples = self.rollout_batch_size * n
        check(self.rollout_batch_size > 0, "rollout_batch_size", "must be > 0")
        check(samples % self.train_batch_size == 0, "rollout_batch_size",
              f"--rollout_batch_size {self.rollout_batch_size} x --n_samples_per_prompt {n} = {samples} samples "
              f"is not divisible by --train_batch_size {self.train_batch_size}")
        check(self.micro_rollout_batch_size > 0, "micro_rollout_batch_size", "must be > 0")
        check(self.reward_pretrain is not None or self.reward_func is not None, "reward_pretrain",
              "give a reward model (--reward_pretrain) and/or a reward function (--reward_func FILE.py)")
        check(self.generate_max_len > 0 and self.prompt_max_len > 0, "generate_max_len", "lengths must be > 0")
        check(self.temperature >= 0 and self.eval_temperature >= 0, "temperature", "must be >= 0")
        check(self.reward_clip_range[0] < self.reward_clip_range[1], "reward_clip_range", "low must be < high")
        check(self.num_episodes > 0, "num_episodes", "must be > 0")
        check(self.eval_n_samples_per_prompt > 0, "eval_n_samples_per_prompt", "must be > 0")
        if self.input_template is not None:
            check("{}" in self.input_template, "input_template", "must contain '{}'")
        check_model_path("reward_pretrain", self.reward_pretrain)
        check_model_path("critic_pretrain", self.critic_pretrain)
        check(self.reward_func is None or os.path.isfile(self.reward_func), "reward_func",
              f"{self.reward_func} is not a file (expected a Python file defining reward_func)")
