"""Option groups shared by every trainer, named as in the reference CLI (OpenRLHF's flags).

A stage config is a frozen dataclass that inherits the groups it needs, e.g.
`SFTConfig(SFTDataOptions, TrainOptions)`. Cross-field checks live in `validate_*` helpers
called from the stage's `__post_init__`, so they run exactly once, when the config is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from rlhf_ops.config import check, opt

LRScheduler = Literal["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup",
                      "polynomial", "inverse_sqrt", "warmup_stable_decay"]


@dataclass(frozen=True)
class ModelOptions:
    pretrain: Optional[str] = opt(None, "Base model: a local Hugging Face directory or a hub name", required=True)
    bf16: bool = opt(False, "Train in bfloat16 (fp32 otherwise; bf16 is ~10x slower on most CPUs)")
    flash_attn: bool = opt(False, "Use Flash Attention 2 (GPU only; needs the flash-attn package)")
    use_liger_kernel: bool = opt(False, "Use Liger kernels for the model (GPU only; needs liger-kernel)")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory")
    seed: int = opt(42, "Random seed for data order, initialisation and sampling")


@dataclass(frozen=True)
class TrainOptions(ModelOptions):
    save_path: str = opt("./ckpt/model", "Final Hugging Face model save path")
    ckpt_path: str = opt("./ckpt/checkpoints", "Directory of resumable DeepSpeed checkpoints")
    save_steps: int = opt(-1, "Save a resumable checkpoint every N optimizer steps (-1: never)")
    max_ckpt_num: int = opt(3, "Keep at most N resumable checkpoints (oldest deleted first)")
    load_checkpoint: bool = opt(False, "Resume from the latest checkpoint in --ckpt_path if one exists")
    logging_steps: int = opt(1, "Log metrics every N optimizer steps")
    eval_steps: int = opt(-1, "Evaluate every N optimizer steps (-1: only at the end of training)")
    use_wandb: Optional[str] = opt(None, "W&B API key, or True to use `wandb login` credentials; offline unless a key is given")
    wandb_project: str = opt("rlhf_ops", "W&B project")
    wandb_group: Optional[str] = opt(None, "W&B group")
    wandb_run_name: Optional[str] = opt(None, "W&B run name")
    use_tensorboard: Optional[str] = opt(None, "Directory for TensorBoard logs")
    micro_train_batch_size: int = opt(8, "Batch size per device (process) for one forward/backward")
    train_batch_size: int = opt(128, "Global batch size per optimizer step (micro x accumulation x world size)")
    max_epochs: int = opt(1, "Training epochs", aliases=["max_epoch"])
    learning_rate: float = opt(5e-6, "Peak learning rate")
    lr_scheduler: LRScheduler = opt("cosine_with_min_lr", "Learning-rate schedule (min lr = 0.1 x peak for cosine_with_min_lr)")
    lr_warmup_ratio: float = opt(0.03, "Fraction of the optimizer steps spent in linear warm-up")
    l2: float = opt(0.0, "Weight decay (not applied to biases and norm weights)")
    adam_betas: tuple[float, float] = opt((0.9, 0.95), "Adam betas")
    max_norm: float = opt(1.0, "Gradient clipping norm (0 disables)")
    zero_stage: Literal[0, 1, 2, 3] = opt(2, "DeepSpeed ZeRO stage")
    adam_offload: bool = opt(False, "Offload Adam states to CPU (ZeRO-Offload)")
    overlap_comm: bool = opt(False, "Overlap gradient reduction with backward")
    ds_tensor_parallel_size: int = opt(1, "DeepSpeed AutoTP size (only with --zero_stage 0/1/2)")
    aux_loss_coef: float = opt(0.0, "MoE balancing loss coefficient (used when the model returns aux_loss)")
    profile_steps: Optional[str] = opt(None, "Record optimizer steps A-B (1-based, inclusive; or one step A) with "
                                             "torch.profiler: traces and an op table in <ckpt_path>/profile")
    local_rank: int = opt(-1, "Set by the `deepspeed` launcher; leave alone")


def validate_train(cfg: TrainOptions) -> None:
    check(cfg.micro_train_batch_size > 0, "micro_train_batch_size", f"must be > 0, got {cfg.micro_train_batch_size}")
    check(cfg.train_batch_size > 0, "train_batch_size", f"must be > 0, got {cfg.train_batch_size}")
    check(cfg.train_batch_size % cfg.micro_train_batch_size == 0, "train_batch_size",
          f"{cfg.train_batch_size} is not divisible by --micro_train_batch_size {cfg.micro_train_batch_size}")
    check(cfg.max_epochs > 0, "max_epochs", f"must be > 0, got {cfg.max_epochs}")
    check(cfg.learning_rate >= 0, "learning_rate", f"must be >= 0, got {cfg.learning_rate}")
    check(0.0 <= cfg.lr_warmup_ratio <= 1.0, "lr_warmup_ratio", f"must be in [0, 1], got {cfg.lr_warmup_ratio}")
    check(cfg.max_norm >= 0, "max_norm", f"must be >= 0, got {cfg.max_norm}")
    check(cfg.logging_steps > 0, "logging_steps", f"must be > 0, got {cfg.logging_steps}")
    check(cfg.max_ckpt_num > 0, "max_ckpt_num", f"must be > 0, got {cfg.max_ckpt_num}")
    check(all(0.0 <= b < 1.0 for b in cfg.adam_betas), "adam_betas", f"each must be in [0, 1), got {cfg.adam_betas}")
    check(cfg.ds_tensor_parallel_size >= 1, "ds_tensor_parallel_size", "must be >= 1")
    check(cfg.ds_tensor_parallel_size == 1 or cfg.zero_stage < 3, "ds_tensor_parallel_size",
          "AutoTP works only with --zero_stage 0, 1 or 2")
    if cfg.profile_steps is not None:
        from rlhf_ops.utils.profiling import parse_steps
        parse_steps(cfg.profile_steps)
    check(not os.path.isfile(cfg.save_path), "save_path", f"{cfg.save_path} is an existing file, expected a directory")
    check(not os.path.isfile(cfg.ckpt_path), "ckpt_path", f"{cfg.ckpt_path} is an existing file, expected a directory")
    check_model_path("pretrain", cfg.pretrain)


def check_model_path(field: str, path: str | None) -> None:
    """A local-looking model path must exist (hub names are left to the loader)."""
    if path is not None and _looks_local(path):
        check(os.path.isdir(path), field, f"{path} does not exist (expected a model directory or a hub name)")


def _looks_local(path: str) -> bool:
    """Hub names are `name` or `org/name`; anything else (./x, /x, a/b/c) is a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


@dataclass(frozen=True)
class DataOptions:
    dataset: Optional[str] = opt(None, "Training data: comma-separated local files (json/jsonl/parquet/csv), saved dataset dirs or hub names", required=True)
    dataset_probs: Optional[str] = opt(None, "Comma-separated mixing probabilities, one per --dataset source")
    dataset_split: str = opt("train", "Split to read from each --dataset source")
    eval_dataset: Optional[str] = opt(None, "Evaluation data, same forms as --dataset")
    eval_split: str = opt("eval", "Split to read from --eval_dataset (eval, test and validation are aliases for local dirs)")
    max_samples: int = opt(100_000_000, "Use at most N training rows (after mixing)")
    max_len: int = opt(2048, "Maximum tokens per sample; longer samples are truncated, samples whose prompt fills it are dropped (both counted in the log)")
    input_key: str = opt("input", "JSON key of the input (a string, or a message list with --apply_chat_template)")
    input_template: Optional[str] = opt(None, "Template for the input when not using the chat template, e.g. $'User: {}\\nAssistant: '; None disables it")
    apply_chat_template: bool = opt(False, "Format with tokenizer.apply_chat_template")
    tokenizer_chat_template: Optional[str] = opt(None, "A Jinja chat template that replaces the tokenizer's own")
    packing_samples: bool = opt(False, "Pack each micro-batch into one row (no padding; attention stays within each sample)")


def validate_data(cfg: DataOptions) -> None:
    check(cfg.max_len > 1, "max_len", f"must be > 1, got {cfg.max_len}")
    check(cfg.max_samples > 0, "max_samples", f"must be > 0, got {cfg.max_samples}")
    if cfg.input_template is not None:
        check("{}" in cfg.input_template, "input_template", f"must contain '{{}}' where the input goes, got {cfg.input_template!r}")


@dataclass(frozen=True)
class LoRAOptions:
    lora_rank: int = opt(0, "LoRA rank; > 0 enables LoRA (only the adapter is trained and saved)")
    lora_alpha: int = opt(16, "LoRA alpha (scaling = alpha / rank)")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(["all-linear"], "Modules that get adapters (default: all linear layers but the head)")
    load_in_4bit: bool = opt(False, "QLoRA: load the base weights in 4-bit (needs a CUDA GPU and bitsandbytes)")


def validate_lora(cfg: LoRAOptions) -> None:
    check(cfg.lora_rank >= 0, "lora_rank", f"must be >= 0, got {cfg.lora_rank}")
    check(cfg.lora_alpha > 0, "lora_alpha", f"must be > 0, got {cfg.lora_alpha}")
    check(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    check(not cfg.load_in_4bit or cfg.lora_rank > 0, "load_in_4bit", "QLoRA needs --lora_rank > 0")


def validate_prefix_sharing(cfg: Any) -> None:
    """--prefix_sharing needs a packed row, and a kernel that reads branches (`models.attention`)."""
    check(not cfg.prefix_sharing or cfg.packing_samples, "prefix_sharing",
          "needs --packing_samples (a shared prompt lives in a packed row)")
    check(not cfg.prefix_sharing or not cfg.flash_attn, "prefix_sharing", "is not supported with --flash_attn: "
          "flash-attn's varlen kernel cannot read a sample that continues another's prompt")
