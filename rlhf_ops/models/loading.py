"""Load tokenizers and models from a local directory or a hub name, with clear errors.

Nothing here reaches a hub unless the user names a hub model. GPU-only options
(`--flash_attn`, `--use_liger_kernel`, `--load_in_4bit`) fail with a message that says what
is missing instead of an ImportError deep inside transformers.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from rlhf_ops.config import ConfigError


def _require_gpu_package(flag: str, package: str, module: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"--{flag} needs a CUDA GPU; none is visible on this machine (drop --{flag} on a CPU)")
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--{flag} needs the {package} package: pip install -e '.[gpu]'")


def attn_implementation(flash_attn: bool) -> str:
    """flash-attn's kernels, or SDPA with padding-free packed rows (`models.attention`)."""
    if flash_attn:
        _require_gpu_package("flash_attn", "flash-attn", "flash_attn")
        return "flash_attention_2"
    from rlhf_ops.models.attention import register
    return register()


def load_tokenizer(path: str, chat_template: str | None = None, padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--pretrain {path}: could not load a tokenizer ({str(e).splitlines()[0]})") from e
    if chat_template:
        tok.chat_template = open(chat_template).read() if os.path.isfile(chat_template) else chat_template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: str, *, bf16: bool = False, flash_attn: bool = False, use_liger_kernel: bool = False,
                   ds_config: dict | None = None, load_in_4bit: bool = False) -> torch.nn.Module:
    """A *ForCausalLM in train mode; with a ZeRO-3 `ds_config` the weights load partitioned."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation(flash_attn))
    if load_in_4bit:
        from rlhf_ops.models.lora import quantization_config
        kwargs["quantization_config"] = quantization_config(True)
    keep = _zero3_context(ds_config)  # noqa: F841  (must stay alive during from_pretrained)
    try:
        if use_liger_kernel:
            _require_gpu_package("use_liger_kernel", "liger-kernel", "liger_kernel")
            from liger_kernel.transformers import AutoLigerKernelForCausalLM
            # Liger's kernels (RoPE, RMSNorm, SwiGLU), not its fused linear cross-entropy forward: that
            # replaces the model's forward with one that takes `logits_to_keep` as an int or 1-D index
            # only, and the losses here pass a [B, T] boolean mask so the LM head runs at targets alone
            # (`models.forward`). Seen on an H100: "too many indices for tensor of dimension 3".
            model = AutoLigerKernelForCausalLM.from_pretrained(path, fused_linear_cross_entropy=False, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"--pretrain {path}: could not load a model ({str(e).splitlines()[0]})") from e
    fast_paths(model)
    model.config.use_cache = False
    return model.train()


def fast_paths(model: torch.nn.Module) -> None:
    """Cheaper forwards with the same results, for Llama-style models (others are left as they are):
    RoPE in fewer kernels, bitwise equal (`models.rope`; Liger's RoPE, where --use_liger_kernel put
    it, is not Llama's code and stays), and the last layer's MLP at the rows a loss reads
    (`models.rows`); and on CPU, fp32 Linear layers through oneDNN, which uses AVX-512 where MKL
    does not (`models.onednn`: not on Intel CPUs, where MKL does; same fp32 arithmetic, another
    summation order), and SwiGLU MLPs as one
    autograd node that keeps half the activations (`models.mlp`, bitwise equal); and for fp32 on CPU,
    RMSNorm, RoPE and SwiGLU's elementwise part as fused kernels (`kernels.fused`, equal to rounding:
    `RLHF_OPS_CPU_KERNELS=0` turns them off). Every loader calls it."""
    from rlhf_ops.models import mlp, norm, onednn, rope, rows

    rope.patch(model)
    rows.install(model)
    onednn.patch(model)
    mlp.patch(model)
    norm.patch(model)


def _zero3_context(ds_config: dict | None) -> Any:
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        from rlhf_ops.distributed.engine import import_deepspeed
        import_deepspeed()  # partitions over DeepSpeed's view of the world: its comm layer must be up
        return HfDeepSpeedConfig(ds_config)
    return None
