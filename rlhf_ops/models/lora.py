"""LoRA / QLoRA for every trainer: wrap a model in PEFT adapters from `LoRAOptions`.

With LoRA on, only adapter weights (plus any `modules_to_save`, e.g. a reward model's value
head) are trainable, and `utils.checkpoint.save_hf_model` saves only those: the adapter
directory that `rlhf_ops.cli.lora_combiner` merges back into the base model.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_ops.config import ConfigError


def quantization_config(load_in_4bit: bool) -> Any:
    """The bitsandbytes 4-bit config for QLoRA, or a clear error where it cannot run."""
    if not load_in_4bit:
        return None
    import importlib.util

    if not torch.cuda.is_available():
        raise ConfigError("--load_in_4bit (QLoRA) needs a CUDA GPU for bitsandbytes; none is visible on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load_in_4bit needs the bitsandbytes package: pip install -e '.[gpu]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


def apply_lora(model: torch.nn.Module, cfg: Any, *, task_type: str = "CAUSAL_LM",
               modules_to_save: Sequence[str] = ()) -> torch.nn.Module:
    """Return `model` wrapped with LoRA adapters when `cfg.lora_rank > 0`, else `model` itself."""
    if getattr(cfg, "lora_rank", 0) <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    if getattr(cfg, "load_in_4bit", False):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = list(cfg.target_modules)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      modules_to_save=list(modules_to_save) or None, task_type=task_type, bias="none")
    model = get_peft_model(model, lora)
    if getattr(cfg, "gradient_checkpointing", False):
        model.enable_input_require_grads()
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")
