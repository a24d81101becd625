"""Process reward model: a causal LM scored at each step placeholder (Math-Shepherd, Lightman 2023).

OpenRLHF's PRM is a plain causal LM: at every `--placeholder_token` position its logits,
restricted to the K `--reward_tokens` ("+", "-"), are the step's score. Training is
cross-entropy over those K logits (hard labels) or against [p, 1 - p] (soft labels), at the
placeholders only (`algos.preference.prm_loss`); the LM head runs only at those positions. The
shared loop (`trainers.loop`) does the rest; `--packing_samples` gives the same loss as padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_ops.config import check, opt
from rlhf_ops.data.prm import PRMBatch, PRMSet, build_prm_rows, collate_prm, step_token_ids, tokenize_prm
from rlhf_ops.data.sources import load_mixture, require_keys
from rlhf_ops.options import DataOptions, LoRAOptions, TrainOptions, validate_data, validate_lora, validate_train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PRMConfig(LoRAOptions, DataOptions, TrainOptions):
    """Process reward model training (python -m rlhf_ops.cli.train_prm)."""
    label_key: str = opt("label", "JSON key of the step labels: the input with each placeholder replaced by a "
                                  "reward token (Math-Shepherd), a list of reward tokens, or a list of probabilities")
    placeholder_token: str = opt("ки", "Step placeholder in the input; must be exactly one token")
    reward_tokens: list[str] = opt(["+", "-"], "Reward label tokens, positive first; each must be exactly one token")
    save_path: str = opt("./ckpt/prm", "Final Hugging Face model save path")
    ckpt_path: str = opt("./ckpt/checkpoints_prm", "Directory of resumable DeepSpeed checkpoints")

    def __post_init__(self) -> None:
        validate_train(self)
        validate_data(self)
        validate_lora(self)
        check(len(self.reward_tokens) >= 2, "reward_tokens", f"needs at least 2 tokens, got {self.reward_tokens}")
        check(len(set(self.reward_tokens)) == len(self.reward_tokens), "reward_tokens",
              f"must be distinct, got {self.reward_tokens}")
        check(self.placeholder_token != "" and self.placeholder_token not in self.reward_tokens, "placeholder_token",
              f"must be non-empty and not one of --reward_tokens, got {self.placeholder_token!r}")
        check(not self.apply_chat_template, "apply_chat_template",
              "is not supported for PRM data (plain text with step placeholders); use --input_template")


def build_prm_set(cfg: PRMConfig, tokenizer: Any, spec: str, split: str, probs: str | None = None,
                  max_samples: int | None = None) -> PRMSet:
    ds = load_mixture(spec, probs, split=split, max_samples=max_samples, seed=cfg.seed)
    require_keys(ds, [cfg.input_key, cfg.label_key], spec)
    source = f"{spec} ({split})"
    texts, labels = build_prm_rows(ds, input_key=cfg.input_key, label_key=cfg.label_key,
                                   input_template=cfg.input_template, placeholder=cfg.placeholder_token,
                                   reward_tokens=cfg.reward_tokens, source=source)
    ph_id, _ = step_token_ids(tokenizer, cfg.placeholder_token, cfg.reward_tokens)
    return tokenize_prm(texts, labels, tokenizer, placeholder=cfg.placeholder_token, placeholder_id=ph_id,
                        max_len=cfg.max_len, source=source)


def step_logits(model: torch.nn.Module, batch: PRMBatch, reward_ids: list[int]) -> torch.Tensor:
    """[N, K] logits of the reward tokens at the N placeholders; the LM head runs at those only.

    Goes through `model(...)` (a DeepSpeed engine's forward, which its backward needs), with
    `logits_to_keep` as the boolean step mask, as `models.forward.target_nll` does for SFT.
    """
    from rlhf_ops.models.rows import only_rows

    with only_rows(batch.steps_BT):  # the last layer's MLP at the step positions only (models.rows)
        logits_NV = model(**batch.inputs.model_inputs(), use_cache=False, logits_to_keep=batch.steps_BT).logits
    return logits_NV[:, reward_ids]


def prm_step(model: torch.nn.Module, batch: PRMBatch, reward_ids: list[int]):
    """Step-mean PRM loss for one micro-batch, and (sum, weight) metrics: loss and step accuracy."""
    from rlhf_ops.algos.preference import prm_loss

    out = prm_loss(step_logits(model, batch, reward_ids), batch.labels_N)
    n = int(batch.labels_N.numel())
    return out.loss, {"loss": (out.loss.detach().double() * n, n), "acc": (out.accuracy.detach().double() * n, n)}


def batch_maker(data: PRMSet, pad_id: int, placeholder_id: int, packed: bool, device: Any):
    def make(indices: list[int]) -> PRMBatch:
        return collate_prm([data.input_ids[i] for i in indices], [data.labels[i] for i in indices], pad_id=pad_id,
                           placeholder_id=placeholder_id, soft=data.soft, packed=packed).to(device)
    return make


def train_prm(cfg: PRMConfig) -> dict[str, float]:
    from rlhf_ops.distributed.engine import create_engine, ds_config, init_distributed
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.trainers.loop import LoopData, SupervisedLoop, steps_per_epoch
    from rlhf_ops.utils.tracking import run_metrics

    rank, world = init_distributed()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    ph_id, reward_ids = step_token_ids(tokenizer, cfg.placeholder_token, cfg.reward_tokens)
    train = build_prm_set(cfg, tokenizer, cfg.dataset, cfg.dataset_split, cfg.dataset_probs, cfg.max_samples)
    evals = build_prm_set(cfg, tokenizer, cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    logger.info("PRM data: %d train rows (%d steps, %s labels), %d eval rows", len(train), train.num_steps,
                "soft" if train.soft else "hard", len(evals) if evals else 0)
    model = load_causal_lm(cfg.pretrain, bf16=cfg.bf16, flash_attn=cfg.flash_attn, use_liger_kernel=cfg.use_liger_kernel,
                           ds_config=ds_config(cfg, world), load_in_4bit=cfg.load_in_4bit)
    model = apply_lora(model, cfg)
    engine = create_engine(model, cfg, steps_per_epoch(len(train), cfg.train_batch_size) * cfg.max_epochs)
    device, pad = engine.module.device, tokenizer.pad_token_id
    make = lambda ts: batch_maker(ts, pad, ph_id, cfg.packing_samples, device)  # noqa: E731
    data = LoopData(len(train), make(train), len(evals) if evals else 0, make(evals) if evals else None)
    metrics = run_metrics(cfg, rank)
    loop = SupervisedLoop(cfg, engine, tokenizer, data, lambda m, b: prm_step(m, b, reward_ids), metrics, "prm")
    try:
        return loop.fit()
    finally:
        metrics.close()
