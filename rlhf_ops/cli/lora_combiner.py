"""`python -m rlhf_ops.cli.lora_combiner`: merge a LoRA adapter into its base model.

A LoRA run (`--lora_rank > 0`) saves only the adapter (plus `modules_to_save`, e.g. a reward
model's `score` head). Later stages want a plain Hugging Face model, so this loads the base (a
causal LM, or with `--is_rm` an `AutoModelForSequenceClassification` with one label), applies the
adapter with PEFT, folds it in (`merge_and_unload`: W + scale * B @ A) and writes model and
tokenizer atomically. The tokenizer comes from the adapter directory when it has one (the trainer
saves it there), else from the base.

Refused with a clear error, before anything is written: a missing base or adapter, an adapter
recorded against a different local base or whose shapes do not fit the base, a reward-model
adapter without `--is_rm` (or an `--is_rm` merge with no trained head), and an `--output_path`
that already holds something unless `--overwrite`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rlhf_ops.config import ConfigError, check, opt, parse_config
from rlhf_ops.options import check_model_path

PROG = "python -m rlhf_ops.cli.lora_combiner"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class LoRACombinerConfig:
    """Merge a LoRA adapter into its base model and save the result in Hugging Face format."""
    model_path: str = opt(None, "Base model the adapter was trained on (local directory or hub name)", required=True)
    lora_path: str = opt(None, "Directory of the LoRA adapter (adapter_config.json + weights)", required=True)
    output_path: str = opt(None, "Where to write the merged model and tokenizer", required=True)
    is_rm: bool = opt(False, "The adapter is a reward model's: load the base as a 1-label sequence classifier")
    bf16: bool = opt(False, "Load, merge and save in bfloat16 (float32 otherwise)")
    value_head_prefix: str = opt("score", "With --is_rm: the head's name in the base's and the merged model's state dict "
                                          "(the adapter always holds it as 'score')")
    overwrite: bool = opt(False, "Replace --output_path if it already exists and is not empty")

    def __post_init__(self) -> None:
        for flag in ("model_path", "lora_path", "output_path"):
            check(bool(getattr(self, flag)), flag, "must be a non-empty path")


def _same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def read_adapter_config(cfg: LoRACombinerConfig) -> dict:
    """adapter_config.json of --lora_path, after checking the adapter is one."""
    lora = Path(cfg.lora_path)
    if not lora.is_dir():
        raise ConfigError(f"--lora_path {lora}: no such directory")
    if not (lora / ADAPTER_CONFIG).is_file():
        what = "a full model (config.json), not an adapter" if (lora / "config.json").is_file() else "no adapter"
        raise ConfigError(f"--lora_path {lora} holds {what}: {ADAPTER_CONFIG} is missing")
    return json.loads((lora / ADAPTER_CONFIG).read_text())


def check_paths(cfg: LoRACombinerConfig, adapter: dict) -> None:
    """Base exists and is the one the adapter recorded; output is free (or --overwrite)."""
    base = cfg.model_path
    check_model_path("model_path", base)
    recorded = adapter.get("base_model_name_or_path")
    if recorded and os.path.isdir(recorded) and os.path.isdir(base) and not _same_dir(recorded, base):
        raise ConfigError(f"--lora_path {cfg.lora_path} was trained on base {recorded}, but --model_path is {base}; "
                          f"merge into {recorded} (if the base was copied, edit base_model_name_or_path in "
                          f"{ADAPTER_CONFIG})")
    out = Path(cfg.output_path)
    for flag in ("model_path", "lora_path"):
        if _same_dir(str(out), getattr(cfg, flag)):
            raise ConfigError(f"--output_path {out} is --{flag}; write the merged model elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_path {out} is an existing file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        held = "a model" if (out / "config.json").is_file() or (out / ADAPTER_CONFIG).is_file() else "files"
        raise ConfigError(f"--output_path {out} already holds {held}; pass --overwrite to replace it")


def check_head(cfg: LoRACombinerConfig, adapter: dict) -> None:
    """A reward-model adapter needs --is_rm, and --is_rm needs a trained head to merge."""
    from rlhf_ops.models.reward import HEAD, check_value_head_prefix

    if adapter.get("task_type") == "SEQ_CLS" and not cfg.is_rm:
        raise ConfigError(f"--lora_path {cfg.lora_path} is a reward model's adapter (task_type SEQ_CLS); add --is_rm")
    if not cfg.is_rm:
        return
    check_value_head_prefix(cfg.value_head_prefix)
    saved = adapter.get("modules_to_save") or []
    if HEAD not in saved and not _base_has_head(cfg.model_path):
        raise ConfigError(f"--is_rm: the adapter in {cfg.lora_path} does not save the {HEAD!r} head "
                          f"(modules_to_save={saved}) and {cfg.model_path} is not a reward model, so the merged "
                          "head would be random")


def _base_has_head(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_base(cfg: LoRACombinerConfig, pad_token_id: int | None) -> Any:
    """The base as the adapter was trained on it: a causal LM, or the reward model of `models.reward`."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.is_rm:  # the head is read from `<value_head_prefix>.*` when the base already has one
        from rlhf_ops.models.reward import load_value_model
        return load_value_model(cfg.model_path, value_head_prefix=cfg.value_head_prefix, bf16=cfg.bf16,
                                pad_token_id=pad_token_id).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model_path {cfg.model_path}: could not load a model ({str(e).splitlines()[0]})") from e
    return model.eval()


def apply_adapter(base: Any, cfg: LoRACombinerConfig) -> Any:
    """PeftModel over `base`; shape or module mismatches become one error naming both paths."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, cfg.lora_path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ConfigError(f"--lora_path {cfg.lora_path} does not fit --model_path {cfg.model_path} "
                          f"(is it the adapter's base model?): {detail}") from e


def load_tokenizer_for(cfg: LoRACombinerConfig) -> Any:
    from transformers import AutoTokenizer

    lora = Path(cfg.lora_path)
    source = cfg.lora_path if any((lora / f).is_file() for f in TOKENIZER_FILES) else cfg.model_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: could not load a tokenizer ({str(e).splitlines()[0]})") from e


def combine(cfg: LoRACombinerConfig) -> str:
    """Merge and save; returns the output path."""
    from rlhf_ops.models.reward import head_key_prefixes
    from rlhf_ops.utils.atomic import atomic_dir
    from rlhf_ops.utils.checkpoint import _renamed

    adapter = read_adapter_config(cfg)
    check_paths(cfg, adapter)
    check_head(cfg, adapter)
    tokenizer = load_tokenizer_for(cfg)
    merged = apply_adapter(load_base(cfg, tokenizer.pad_token_id), cfg).merge_and_unload()
    renames = head_key_prefixes(cfg.value_head_prefix) if cfg.is_rm else None
    state = {_renamed(k, renames): v for k, v in merged.state_dict().items()} if renames else None
    with atomic_dir(cfg.output_path) as tmp:
        merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return cfg.output_path


def main(argv: Sequence[str] | None = None) -> str:
    from rlhf_ops.cli import run_stage
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(LoRACombinerConfig, argv, prog=PROG)
    setup_logging()
    out = run_stage(PROG, combine, cfg)
    print(f"merged {cfg.lora_path} into {cfg.model_path}: {out}")
    return out


if __name__ == "__main__":
    main()
