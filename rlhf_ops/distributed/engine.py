"""The one training engine every trainer uses (SFT, RM, PRM, DPO, actor, critic): DeepSpeed's, or in a
world of one at ZeRO-0 `local_engine.LocalEngine` (the same arithmetic, without importing DeepSpeed).

The same code runs on a CPU (gloo, fp32) and on GPUs (nccl, bf16). CPU-specific facts it
handles (see shared/STACK-FACTS.md):
- a single process started without a launcher needs RANK/WORLD_SIZE/MASTER_ADDR/PORT: we set them;
- DeepSpeed compiles its shared-memory comm op (~110 s) on first use: on CPU we mark it
  incompatible so plain gloo is used, and a fresh CI machine never pays that;
- DeepSpeed's own Adam would compile fused/cpu Adam (~130-160 s): we pass torch's AdamW
  (`zero_allow_untested_optimizer`), except on GPU with --adam_offload where DeepSpeedCPUAdam is
  the point of the option.
- the process group is torch's own (`init_distributed`); DeepSpeed's communication layer joins it
  when DeepSpeed is first needed (`import_deepspeed`);
- --bf16 with --zero_stage 0 trains as stage 1 under DeepSpeed (`train_stage`): DeepSpeed 0.19 has no
  optimizer with fp32 master weights at stage 0 and refuses bf16 weights with fp32 gradient
  accumulation there. In a world of one `LocalEngine` does what that stage 1 does, in flat buffers
  (`master_weights`).
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_ops.config import ConfigError

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world_size). Idempotent."""
    import datetime

    if "RANK" not in os.environ:  # a plain `python -m ...`: be a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    gpu = on_gpu()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():  # torch's own: DeepSpeed is imported only where an engine needs it
        torch.distributed.init_process_group(backend="nccl" if gpu else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
        if not gpu:
            import atexit
            atexit.register(_destroy_gloo_group)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _destroy_gloo_group() -> None:
    """At exit, while the interpreter is whole: Gloo's worker threads otherwise meet interpreter teardown
    and can abort the process after its work is done ("terminate called without an active exception",
    SIGABRT; seen once in a 2-process ZeRO-3 SFT run in CI; pytorch/pytorch#179291). Gloo's destroy is
    local to the rank. NCCL's is not registered: its abort is collective, and it has not run here."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        torch.distributed.destroy_process_group()


def import_deepspeed(timeout_minutes: int = 30) -> Any:
    """DeepSpeed, imported, with its communication layer on the process group `init_distributed` made
    (idempotent). Before anything of DeepSpeed's runs: an engine, or ZeRO-3's partitioned loading, which
    reads the world size from that layer."""
    import datetime

    import deepspeed

    gpu = on_gpu()
    if not gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo",
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return deepspeed


def grad_accumulation_steps(train_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    per_step = micro_batch_size * world_size
    if train_batch_size % per_step:
        raise ConfigError(
            f"--train_batch_size {train_batch_size} is not divisible by --micro_train_batch_size "
            f"{micro_batch_size} x world size {world_size} = {per_step}")
    return train_batch_size // per_step


def train_stage(cfg: Any) -> int:
    """The ZeRO stage a trained model runs at: --zero_stage, except 1 for --bf16 with --zero_stage 0.

    At stage 0 DeepSpeed 0.19 either trains bf16 weights with bf16 gradients and no fp32 copy (Adam's
    small updates round away in bf16's 8-bit mantissa) or, with the fp32 gradient accumulation asked
    for here, refuses to start ("unsupported mix of model_dtype=torch.bfloat16 and
    grad_accum_dtype=torch.float32"). Stage 1 with bf16 is its BF16_Optimizer: fp32 master weights,
    gradients accumulated in fp32, optimizer state split over data-parallel ranks, the same update.
    In a world of one nothing is split."""
    return 1 if cfg.bf16 and cfg.zero_stage == 0 else cfg.zero_stage


def ds_config(cfg: Any, world_size: int, *, train: bool = True) -> dict:
    """The DeepSpeed config dict for a TrainOptions-like `cfg`."""
    gas = grad_accumulation_steps(cfg.train_batch_size, cfg.micro_train_batch_size, world_size)
    offload = getattr(cfg, "adam_offload", False) and train
    zero = {
        "stage": train_stage(cfg) if train else cfg.zero_stage,
        "overlap_comm": getattr(cfg, "overlap_comm", False),
        "offload_optimizer": {"device": "cpu" if offload else "none", "pin_memory": on_gpu()},
        "offload_param": {"device": "none"},
        "stage3_gather_16bit_weights_on_model_save": True,
        "reduce_bucket_size": 5e7,
        "sub_group_size": 1e9,
    }
    conf = {
        "train_micro_batch_size_per_gpu": cfg.micro_train_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.train_batch_size,
        "gradient_clipping": cfg.max_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "data_types": {"grad_accum_dtype": "fp32"},
    }
    tp = getattr(cfg, "ds_tensor_parallel_size", 1)
    if tp > 1:
        conf["tensor_parallel"] = {"autotp_size": tp}
    return conf


def make_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   cpu_adam: bool = False, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with no decay on biases and norm weights (1-D parameters). Torch's fused AdamW on CPU, and
    on a GPU with `fused` (`LocalEngine`'s flat fp32 masters: one kernel per group and step); foreach on
    a GPU under DeepSpeed, the kind that ran on an H100 (benchmarks/results/gpu)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cpu_adam:  # GPU + --adam_offload: the fast CPU Adam DeepSpeed builds for ZeRO-Offload
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    if not on_gpu():  # torch's fused CPU AdamW: ~3x faster per step than foreach (benchmarks/trl_compare.py)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True) if fused else \
        torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_ratio: float, lr: float):
    from transformers import get_scheduler

    warmup = math.ceil(total_steps * warmup_ratio)
    kwargs = {"min_lr": lr * 0.1} if name == "cosine_with_min_lr" else {}
    if name == "warmup_stable_decay":
        kwargs = {"num_decay_steps": max(1, total_steps // 10)}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1),
                         scheduler_specific_kwargs=kwargs)


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of `grads` taken together: DeepSpeed's arithmetic (per-tensor norms, squared, summed,
    square root), bit for bit, in foreach kernels."""
    return torch.stack(torch._foreach_norm(grads)).pow(2).sum().pow(0.5)


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor | None = None) -> torch.Tensor:
    """Scale `grads` in place to a global L2 norm of at most `max_norm`; returns the norm before
    (`total`, where the caller has it already).

    The arithmetic of DeepSpeed's fp32 clipping (`global_grad_norm`, then min(1, max_norm / (norm +
    1e-6))), bit for bit, in three foreach kernels instead of a Python loop over parameters and an
    all-reduce over a world of one. On CPU an unclipped step skips the multiplication by 1.0, a
    memory-bound pass that reads and writes every gradient; on a GPU the test would cost a device
    sync, so the multiplication stays.
    """
    total = global_grad_norm(grads) if total is None else total
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if total.device.type != "cpu" or coef < 1:  # on CPU, skip multiplying by exactly 1 (a pass over every gradient)
        torch._foreach_mul_(grads, coef)
    return total


@dataclass
class Engine:
    """A DeepSpeed engine plus what the training loop needs to know about it.

    `clip_norm` > 0: this wrapper clips gradients itself (`clip_grad_norm`) at each optimizer step.
    `create_engine` sets it where DeepSpeed would clip the plain fp32 gradients (ZeRO-0, no bf16),
    after DeepSpeed's data-parallel all-reduce, and turns DeepSpeed's own clipping off.
    """
    module: Any  # deepspeed.DeepSpeedEngine, or local_engine.LocalEngine
    world_size: int
    rank: int
    grad_accum: int
    clip_norm: float = 0.0

    @property
    def model(self) -> torch.nn.Module:
        return self.module.module

    def backward_step(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)
        if self.clip_norm > 0 and self.module.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.module.module.parameters() if p.grad is not None]
            if grads:
                clip_grad_norm(grads, self.clip_norm)
        self.module.step()

    @property
    def lr(self) -> float:
        return self.module.get_lr()[0]


def create_engine(model: torch.nn.Module, cfg: Any, total_steps: int, *, lr: float | None = None) -> Engine:
    """Wrap `model` in a DeepSpeed engine with the optimizer and schedule that `cfg` describes; in a world
    of one at ZeRO-0 without offload, tensor parallelism or 4-bit weights, in a `LocalEngine` (the same
    arithmetic without importing DeepSpeed)."""
    from rlhf_ops.distributed import local_engine

    rank, world = init_distributed()
    conf = ds_config(cfg, world)
    # ZeRO-0 fp32: clip here, ~1.7 ms per optimizer step less than DeepSpeed's loop on the tiny model
    stage = conf["zero_optimization"]["stage"]
    own_clip = stage == 0 and not cfg.bf16 and conf["gradient_clipping"] > 0
    if own_clip:
        conf["gradient_clipping"] = 0.0
    lr = cfg.learning_rate if lr is None else lr
    if cfg.gradient_checkpointing:
        # transformers 5.25 renamed it (the old name warns, and goes in v6)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # LocalEngine: fp32 weights directly; with --bf16, every weight in bf16 (as DeepSpeed casts them: LoRA
    # adapters, which peft keeps in fp32, included) and the trained ones stepped through fp32 masters
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    local = (world == 1 and cfg.zero_stage == 0 and not cfg.adam_offload and "tensor_parallel" not in conf
             and not getattr(cfg, "load_in_4bit", False) and local_engine.wanted()
             and (trained <= {torch.float32, torch.bfloat16} and not getattr(model, "_keep_in_fp32_modules", None)
                  if cfg.bf16 else trained == {torch.float32}))
    if local and cfg.bf16:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
    opt = make_optimizer(model, lr, tuple(cfg.adam_betas), cfg.l2, cpu_adam=cfg.adam_offload and on_gpu(),
                         fused=local)
    sched = make_scheduler(opt, cfg.lr_scheduler, total_steps, cfg.lr_warmup_ratio, lr)
    gas = conf["gradient_accumulation_steps"]
    if local:
        device = f"cuda:{torch.cuda.current_device()}" if on_gpu() else "cpu"
        logger.info("training engine: LocalEngine (one process, ZeRO-0, %s)",
                    "bf16 with fp32 master weights" if cfg.bf16 else "fp32")
        # bf16: the masters' gradients are clipped in master_weights; fp32: in Engine.backward_step
        eng = local_engine.LocalEngine(model, opt, sched, gas, device, float(cfg.max_norm) if cfg.bf16 else None)
        return Engine(module=eng, world_size=world, rank=rank, grad_accum=gas,
                      clip_norm=0.0 if cfg.bf16 else float(cfg.max_norm))
    deepspeed = import_deepspeed()
    logger.info("training engine: DeepSpeed (ZeRO-%d, %d process(es)%s)", stage, world, ", bf16" if cfg.bf16 else "")
    module, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf,
                                      dist_init_required=False)
    if world == 1 and stage == 0:
        # a world of one has nothing to all-reduce; DeepSpeed would still flatten, "reduce" and copy back
        # every gradient at each optimizer step (~5 ms per step on the tiny model, benchmarks/trl_compare.py)
        module.enable_backward_allreduce = False
    return Engine(module=module, world_size=world, rank=rank, grad_accum=gas,
                  clip_norm=float(cfg.max_norm) if own_clip else 0.0)
