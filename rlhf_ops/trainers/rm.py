"""Reward-model training: a pairwise Bradley-Terry loss on a value-head model.

loss = -log sigmoid(r(chosen) - r(rejected) - margin) (Ouyang et al. 2022, eq. 1; the optional
per-pair margin of Llama 2, Touvron et al. 2023), with r the value head's output at a sample's
last token (`models.reward`). Each micro-batch scores its chosen and rejected sides in one
forward (`data.preference.PairBatch`), padded or packed.

As in OpenRLHF, every evaluation stores the eval reward mean/std in the model config
(`config.mean`, `config.std`, `config.normalize_reward = False`) for RL's `--normalize_reward`.
Without `--eval_dataset`, the first 1% of the training pairs (at least 64) are evaluated at the
end, to measure those statistics; their accuracy is then not a held-out figure.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from rlhf_ops.config import check, opt
from rlhf_ops.data.preference import (PairBatch, PreferenceOptions, PreferenceSet, build_preference_set,
                                      pair_batch_maker, split_pairs, validate_preference)
from rlhf_ops.models.reward import HEAD, check_value_head_prefix
from rlhf_ops.options import (DataOptions, LoRAOptions, TrainOptions, validate_data, validate_lora,
                              validate_prefix_sharing, validate_train)
from rlhf_ops.trainers.loop import Metrics, SupervisedLoop

logger = logging.getLogger(__name__)
STATS_MIN_PAIRS = 64  # pairs evaluated for reward mean/std when there is no eval set


@dataclass(frozen=True)
class RMConfig(PreferenceOptions, LoRAOptions, DataOptions, TrainOptions):
    """Reward-model training on preference pairs (python -m rlhf_ops.cli.train_rm)."""
    margin_key: Optional[str] = opt(None, "JSON key of a per-pair margin m: loss = -logsigmoid(r_chosen - r_rejected - m) (Llama 2); None: no margin")
    value_head_prefix: str = opt(HEAD, "Name of the value head in the saved state dict; 'score' loads with AutoModelForSequenceClassification")
    prefix_sharing: bool = opt(False, "With --packing_samples, each pair's rejected side carries only what follows "
                                      "the tokens it shares with the chosen side (the prompt): same rewards and "
                                      "gradients, fewer tokens; not with --flash_attn")
    loss: Literal["sigmoid", "logexp"] = opt("sigmoid", "Pairwise loss: sigmoid = -logsigmoid(diff), logexp = log(1 + exp(-diff)) (equal maths; OpenRLHF's names)")
    save_path: str = opt("./ckpt/rm", "Final Hugging Face model save path")
    ckpt_path: str = opt("./ckpt/checkpoints_rm", "Directory of resumable DeepSpeed checkpoints")

    def __post_init__(self) -> None:
        validate_train(self)
        validate_data(self)
        validate_lora(self)
        validate_preference(self)
        check_value_head_prefix(self.value_head_prefix)
        validate_prefix_sharing(self)
        check(self.lora_rank == 0 or self.value_head_prefix == HEAD, "value_head_prefix",
              f"must be {HEAD!r} with --lora_rank > 0 (the PEFT adapter stores the head as {HEAD!r})")


def pair_metrics(loss: torch.Tensor, chosen_P: torch.Tensor, rejected_P: torch.Tensor) -> Metrics:
    """(sum, weight) pairs: loss, acc (chosen > rejected), margin and the mean reward of each side."""
    c, r = chosen_P.detach().double(), rejected_P.detach().double()
    P = len(c)
    loss_sum, acc, margin, cs, rs = torch.stack([loss.detach().double() * P, (c > r).sum(), (c - r).sum(),
                                                 c.sum(), r.sum()])  # on the device: read once per logging step
    return {"loss": (loss_sum, P), "acc": (acc, P), "margin": (margin, P),
            "chosen_reward": (cs, P), "rejected_reward": (rs, P)}


def rm_step(model: torch.nn.Module, pb: PairBatch, kind: str = "sigmoid") -> tuple[torch.Tensor, Metrics]:
    """Pairwise loss of one pair micro-batch, plus the reward moments for mean/std."""
    from rlhf_ops.algos.preference import pairwise_reward_loss
    from rlhf_ops.models.reward import sequence_scores

    rewards_S = sequence_scores(model, pb.batch, pb.last_index_S)
    chosen_P, rejected_P = split_pairs(rewards_S, pb.num_pairs)
    out = pairwise_reward_loss(chosen_P, rejected_P, pb.margin_P, kind)
    metrics = pair_metrics(out.loss, chosen_P, rejected_P)
    all_S = rewards_S.detach().double()
    s, sq = all_S.sum(), (all_S ** 2).sum()
    metrics.update(reward_mean=(s, len(all_S)), reward_sq=(sq, len(all_S)))
    return out.loss, metrics


class RewardLoop(SupervisedLoop):
    """The shared loop plus reward statistics and the head's on-disk name.

    `reward_std` is derived exactly from E[r] and E[r^2] (population std over both sides of
    every pair); each evaluation writes mean/std into the model config before the final save.
    """

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = dict(means)
        if "reward_sq" in out:
            out["reward_std"] = math.sqrt(max(out.pop("reward_sq") - out["reward_mean"] ** 2, 0.0))
        return out

    def evaluate(self) -> dict[str, float]:
        from rlhf_ops.models.reward import set_reward_stats

        result = super().evaluate()
        if result:
            set_reward_stats(self.engine.module, result["reward_mean"], result["reward_std"])
        return result

    def save_model(self) -> None:
        from rlhf_ops.models.forward import unwrap
        from rlhf_ops.models.lora import is_peft
        from rlhf_ops.models.reward import head_key_prefixes
        from rlhf_ops.utils.checkpoint import save_hf_model

        extra = {"metrics.jsonl": str(self.metrics.path)}
        with tempfile.TemporaryDirectory() as tmp:
            if is_peft(self.engine.module):  # an adapter dir has no config.json: add the one with mean/std
                extra["config.json"] = os.path.join(tmp, "config.json")
                unwrap(self.engine.module).config.to_json_file(extra["config.json"])
            save_hf_model(self.engine.module, self.tokenizer, self.cfg.save_path, extra,
                          key_prefixes=head_key_prefixes(self.cfg.value_head_prefix))


def build_sets(cfg: RMConfig, tokenizer: Any) -> tuple[PreferenceSet, PreferenceSet, int]:
    """(train, eval, number of eval pairs); without --eval_dataset, eval = the head of train."""
    train = build_preference_set(cfg, tokenizer, cfg.dataset, cfg.dataset_split, cfg.dataset_probs,
                                 cfg.max_samples, margin_key=cfg.margin_key)
    if cfg.eval_dataset:
        evals = build_preference_set(cfg, tokenizer, cfg.eval_dataset, cfg.eval_split, margin_key=cfg.margin_key)
        return train, evals, len(evals)
    n = min(len(train), max(len(train) // 100, STATS_MIN_PAIRS))
    logger.info("no --eval_dataset: reward mean/std are measured on the first %d training pairs", n)
    return train, train, n


def train_rm(cfg: RMConfig) -> dict[str, float]:
    from rlhf_ops.distributed.engine import create_engine, ds_config, init_distributed
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.trainers.loop import LoopData, steps_per_epoch
    from rlhf_ops.utils.tracking import run_metrics

    rank, world = init_distributed()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        logger.warning("pad token == EOS: AutoModelForSequenceClassification pools at the last non-pad token, so "
                       "it will not score a sample that ends with EOS at the EOS as training does")
    train, evals, n_eval = build_sets(cfg, tokenizer)
    logger.info("RM data: %d train pairs, %d eval pairs", len(train), n_eval)
    model = load_value_model(cfg.pretrain, value_head_prefix=cfg.value_head_prefix, bf16=cfg.bf16,
                             flash_attn=cfg.flash_attn, ds_config=ds_config(cfg, world),
                             load_in_4bit=cfg.load_in_4bit, pad_token_id=tokenizer.pad_token_id)
    model = apply_lora(model, cfg, task_type="SEQ_CLS", modules_to_save=[HEAD])
    engine = create_engine(model, cfg, steps_per_epoch(len(train), cfg.train_batch_size) * cfg.max_epochs)
    kw = dict(packed=cfg.packing_samples, device=engine.module.device, share_prefix=cfg.prefix_sharing)
    data = LoopData(len(train), pair_batch_maker(train, tokenizer.pad_token_id, **kw),
                    n_eval, pair_batch_maker(evals, tokenizer.pad_token_id, **kw))
    metrics = run_metrics(cfg, rank)
    loop = RewardLoop(cfg, engine, tokenizer, data, lambda m, b: rm_step(m, b, cfg.loss), metrics, "rm")
    try:
        return loop.fit()
    finally:
        metrics.close()
