"""Supervised fine-tuning: next-token loss on response tokens (or every assistant turn).

Rows become segments (`data.templates`), segments become ids with exact loss masks
(`data.tokenize`), and the shared loop (`trainers.loop`) does the rest. With
`--packing_samples` each micro-batch is one packed row: no padding is computed at all.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf_ops.config import check, opt
from rlhf_ops.data.batching import collate
from rlhf_ops.data.sources import load_mixture, require_keys
from rlhf_ops.data.templates import Segment, multiturn_segments, pair_segments
from rlhf_ops.data.tokenize import TokenizedSet, tokenize_rows
from rlhf_ops.options import DataOptions, LoRAOptions, TrainOptions, validate_data, validate_lora, validate_train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig(LoRAOptions, DataOptions, TrainOptions):
    """Supervised fine-tuning of a causal LM (python -m rlhf_ops.cli.train_sft)."""
    output_key: Optional[str] = opt(None, "JSON key of the response; None when --input_key holds the whole conversation")
    multiturn: bool = opt(False, "Train on every assistant turn of a conversation (needs --apply_chat_template)")
    pretrain_mode: bool = opt(False, "Continued pre-training: loss on every token, no prompt masking")
    save_path: str = opt("./ckpt/sft", "Final Hugging Face model save path")
    ckpt_path: str = opt("./ckpt/checkpoints_sft", "Directory of resumable DeepSpeed checkpoints")

    def __post_init__(self) -> None:
        validate_train(self)
        validate_data(self)
        validate_lora(self)
        check(not self.multiturn or self.apply_chat_template, "multiturn", "needs --apply_chat_template")
        check(self.pretrain_mode or self.output_key is not None or self.apply_chat_template, "output_key",
              "is required unless --apply_chat_template (conversation in --input_key) or --pretrain_mode")


def row_segments(row: dict, cfg: SFTConfig, tokenizer: Any, where: str) -> list[Segment]:
    if cfg.pretrain_mode:
        text = row[cfg.input_key] + (row[cfg.output_key] if cfg.output_key else "")
        return [Segment(text, True)]
    if cfg.multiturn:
        return multiturn_segments(row[cfg.input_key], tokenizer, where)
    return pair_segments(row[cfg.input_key] if cfg.output_key else None,
                         row[cfg.output_key] if cfg.output_key else row[cfg.input_key], tokenizer,
                         apply_chat_template=cfg.apply_chat_template, input_template=cfg.input_template, where=where)


def build_sft_set(cfg: SFTConfig, tokenizer: Any, spec: str, split: str, probs: str | None = None,
                  max_samples: int | None = None) -> TokenizedSet:
    ds = load_mixture(spec, probs, split=split, max_samples=max_samples, seed=cfg.seed)
    require_keys(ds, [k for k in (cfg.input_key, None if cfg.multiturn else cfg.output_key) if k], spec)
    rows = [row_segments(r, cfg, tokenizer, f"{spec} ({split}) row {i}") for i, r in enumerate(ds)]
    plain = not cfg.apply_chat_template
    return tokenize_rows(rows, tokenizer, max_len=cfg.max_len, add_bos=plain, append_eos=plain and not cfg.pretrain_mode,
                         source=f"{spec} ({split})", progress=int(os.environ.get("RANK", 0)) == 0)


def sft_step(model: torch.nn.Module, batch: Any, aux_loss_coef: float = 0.0):
    from rlhf_ops.models.forward import causal_lm_loss

    out = causal_lm_loss(model, batch, aux_loss_coef)
    return out["loss"], {"loss": (out["nll_sum"].double(), out["num_targets"])}


def batch_maker(data: TokenizedSet, pad_id: int, packed: bool, device: Any):
    def make(indices: list[int]):
        return collate([data.input_ids[i] for i in indices], [data.loss_mask[i] for i in indices],
                       pad_id, packed=packed).to(device)
    return make


def train_sft(cfg: SFTConfig) -> dict[str, float]:
    from rlhf_ops.distributed.engine import create_engine, ds_config, init_distributed
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.trainers.loop import LoopData, SupervisedLoop, steps_per_epoch
    from rlhf_ops.utils.tracking import run_metrics

    torch.manual_seed(cfg.seed)
    # data first: bad data is refused before DeepSpeed and the process group start (seconds per rank)
    tokenizer = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    train = build_sft_set(cfg, tokenizer, cfg.dataset, cfg.dataset_split, cfg.dataset_probs, cfg.max_samples)
    evals = build_sft_set(cfg, tokenizer, cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    logger.info("SFT data: %d train rows (%d tokens), %d eval rows", len(train), train.num_tokens,
                len(evals) if evals else 0)
    rank, world = init_distributed()
    model = load_causal_lm(cfg.pretrain, bf16=cfg.bf16, flash_attn=cfg.flash_attn, use_liger_kernel=cfg.use_liger_kernel,
                           ds_config=ds_config(cfg, world), load_in_4bit=cfg.load_in_4bit)
    model = apply_lora(model, cfg)
    total = steps_per_epoch(len(train), cfg.train_batch_size) * cfg.max_epochs
    engine = create_engine(model, cfg, total)
    device = engine.module.device
    pad = tokenizer.pad_token_id
    data = LoopData(len(train), batch_maker(train, pad, cfg.packing_samples, device),
                    len(evals) if evals else 0,
                    batch_maker(evals, pad, cfg.packing_samples, device) if evals else None)
    metrics = run_metrics(cfg, rank)
    loop = SupervisedLoop(cfg, engine, tokenizer, data, lambda m, b: sft_step(m, b, cfg.aux_loss_coef), metrics, "sft")
    try:
        return loop.fit()
    finally:
        metrics.close()
