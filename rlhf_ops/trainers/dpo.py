"""Direct Preference Optimization (Rafailov et al. 2023), with cDPO label smoothing and IPO.

loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over sequence log-likelihoods of the
response tokens (`algos.preference.dpo_loss`); IPO (Azar et al. 2023) uses length-averaged
logps. `--nll_loss_coef` adds a token-mean NLL on the chosen responses (an SFT term).

The reference model is frozen, so its log-likelihood of each response is a fixed property of the
pair. It is computed once, before training, for the whole train and eval sets (no grad, eval
mode, micro-batched; ranks split the pairs and all-reduce the table), looked up per micro-batch,
and the reference model is freed before the policy loads. That is exact, costs one reference
forward per pair instead of one per pair per epoch, and leaves only the policy in memory while
training. The reference is loaded whole on each rank (not ZeRO-3 partitioned): it must fit one
device for inference.

Policy log-likelihoods run the LM head at response tokens only (`models.forward.target_logprob_sums`),
chosen and rejected in one forward, padded or packed. The policy is saved like SFT's.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from rlhf_ops.config import check, opt
from rlhf_ops.data.preference import (PairBatch, PreferenceOptions, PreferenceSet, build_preference_set,
                                      pair_batch_maker, split_pairs, validate_preference)
from rlhf_ops.options import DataOptions, LoRAOptions, TrainOptions, validate_data, validate_lora, validate_train
from rlhf_ops.trainers.loop import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPOConfig(PreferenceOptions, LoRAOptions, DataOptions, TrainOptions):
    """Direct Preference Optimization of a causal LM (python -m rlhf_ops.cli.train_dpo)."""
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL penalty to the reference (IPO: target margin 1/(2 beta))")
    ipo: bool = opt(False, "Use the IPO loss (Azar et al. 2023) on length-averaged log-likelihoods")
    label_smoothing: float = opt(0.0, "cDPO: probability that a preference label is wrong, in [0, 0.5)")
    ref_pretrain: Optional[str] = opt(None, "Reference model (frozen); default: --pretrain")
    nll_loss_coef: float = opt(0.0, "Weight of a token-mean NLL (SFT) loss on the chosen responses; 0 disables it")
    save_path: str = opt("./ckpt/dpo", "Final Hugging Face model save path")
    ckpt_path: str = opt("./ckpt/checkpoints_dpo", "Directory of resumable DeepSpeed checkpoints")

    def __post_init__(self) -> None:
        validate_train(self)
        validate_data(self)
        validate_lora(self)
        validate_preference(self)
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(not (self.ipo and self.label_smoothing), "label_smoothing", "is a (c)DPO option; leave it 0 with --ipo")
        check(self.nll_loss_coef >= 0, "nll_loss_coef", f"must be >= 0, got {self.nll_loss_coef}")
        ref = self.ref_pretrain
        check(ref is None or not ref.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(ref)),
              "ref_pretrain", f"{ref} does not exist (expected a model directory or a hub name)")


class RefLogps(NamedTuple):
    """The frozen reference's log-likelihood of each pair's responses, [N] float64 each
    (sums, or length-averaged sums for IPO)."""
    chosen_N: torch.Tensor
    rejected_N: torch.Tensor


@dataclass
class DPOBatch:
    """A pair micro-batch plus the reference log-likelihoods of its P pairs ([P] float32)."""
    pairs: PairBatch
    ref_chosen_P: torch.Tensor
    ref_rejected_P: torch.Tensor


def num_targets(masks: list[list[int]]) -> torch.Tensor:
    """[N] response tokens scored per sample (position t scores token t+1 where mask[t+1] is set)."""
    return torch.tensor([sum(m[1:]) for m in masks], dtype=torch.float64)


@torch.no_grad()
def reference_logps(ref_model: torch.nn.Module, data: PreferenceSet, make: Callable[[list[int]], PairBatch],
                    micro: int, *, average: bool, rank: int = 0, world: int = 1) -> RefLogps:
    """One no-grad pass of the reference over every pair; ranks split the pairs, then all-reduce."""
    from rlhf_ops.data.batching import eval_micro_batches
    from rlhf_ops.models.forward import target_logprob_sums

    was_training = ref_model.training
    ref_model.eval()
    table = torch.zeros(2, len(data), dtype=torch.float64)
    for idx in eval_micro_batches(len(data), micro, world, rank):
        pb = make(idx)
        sums_S, _ = target_logprob_sums(ref_model, pb.batch)
        c, r = split_pairs(sums_S.double().cpu(), pb.num_pairs)
        table[0, idx], table[1, idx] = c, r
    ref_model.train(was_training)
    if world > 1:
        from rlhf_ops.distributed.engine import on_gpu
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
        table = table.to(device)
        torch.distributed.all_reduce(table)  # each pair was filled by exactly one rank
        table = table.cpu()
    if average:
        table = table / torch.stack([num_targets(data.chosen_mask), num_targets(data.rejected_mask)]).clamp(min=1)
    return RefLogps(table[0], table[1])


def dpo_batch_maker(data: PreferenceSet, ref: RefLogps, pad_id: int, **kw: Any) -> Callable[[list[int]], DPOBatch]:
    make_pairs = pair_batch_maker(data, pad_id, **kw)

    def make(indices: list[int]) -> DPOBatch:
        pb = make_pairs(indices)
        dev = pb.batch.input_ids_BT.device
        return DPOBatch(pb, ref.chosen_N[indices].to(dev, torch.float32), ref.rejected_N[indices].to(dev, torch.float32))
    return make


def dpo_step(model: torch.nn.Module, b: DPOBatch, cfg: DPOConfig) -> tuple[torch.Tensor, Metrics]:
    """DPO/IPO loss of one pair micro-batch (+ the optional NLL term on chosen responses)."""
    from rlhf_ops.algos.preference import dpo_loss
    from rlhf_ops.models.forward import target_logprob_sums
    from rlhf_ops.trainers.rm import pair_metrics

    sums_S, counts_S = target_logprob_sums(model, b.pairs.batch)
    logps_S = sums_S / counts_S.clamp(min=1) if cfg.ipo else sums_S
    chosen_P, rejected_P = split_pairs(logps_S, b.pairs.num_pairs)
    out = dpo_loss(chosen_P, rejected_P, b.ref_chosen_P, b.ref_rejected_P, beta=cfg.beta,
                   label_smoothing=cfg.label_smoothing, ipo=cfg.ipo)
    loss = out.loss
    nll = None
    if cfg.nll_loss_coef > 0:
        P = b.pairs.num_pairs
        nll = -sums_S[:P].sum() / counts_S[:P].sum().clamp(min=1)
        loss = loss + cfg.nll_loss_coef * nll
    metrics = pair_metrics(loss, out.chosen_rewards, out.rejected_rewards)
    if nll is not None:
        metrics["nll"] = (nll.detach().double() * b.pairs.num_pairs, b.pairs.num_pairs)
    return loss, metrics


def load_reference(cfg: DPOConfig, device: torch.device) -> torch.nn.Module:
    from rlhf_ops.models.loading import load_causal_lm

    ref = load_causal_lm(cfg.ref_pretrain or cfg.pretrain, bf16=cfg.bf16, flash_attn=cfg.flash_attn)
    return ref.to(device).eval().requires_grad_(False)


def reference_tables(cfg: DPOConfig, sets: list[PreferenceSet], pad_id: int, rank: int, world: int) -> list[RefLogps]:
    """Load the reference, score every set once, free it."""
    from rlhf_ops.distributed.engine import on_gpu

    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
    t0 = time.perf_counter()
    ref = load_reference(cfg, device)
    kw = dict(packed=cfg.packing_samples, device=device)
    tables = [reference_logps(ref, s, pair_batch_maker(s, pad_id, **kw), cfg.micro_train_batch_size,
                              average=cfg.ipo, rank=rank, world=world) for s in sets]
    del ref
    logger.info("reference log-likelihoods of %d pairs computed once in %.1fs", sum(map(len, sets)),
                time.perf_counter() - t0)
    return tables


def train_dpo(cfg: DPOConfig) -> dict[str, float]:
    from rlhf_ops.distributed.engine import create_engine, ds_config, init_distributed
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.trainers.loop import LoopData, SupervisedLoop, steps_per_epoch
    from rlhf_ops.utils.tracking import run_metrics

    rank, world = init_distributed()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
    pad = tokenizer.pad_token_id
    train = build_preference_set(cfg, tokenizer, cfg.dataset, cfg.dataset_split, cfg.dataset_probs, cfg.max_samples)
    evals = build_preference_set(cfg, tokenizer, cfg.eval_dataset, cfg.eval_split) if cfg.eval_dataset else None
    logger.info("DPO data: %d train pairs, %d eval pairs", len(train), len(evals) if evals else 0)
    ref_train, *ref_eval = reference_tables(cfg, [train] + ([evals] if evals else []), pad, rank, world)
    model = load_causal_lm(cfg.pretrain, bf16=cfg.bf16, flash_attn=cfg.flash_attn, use_liger_kernel=cfg.use_liger_kernel,
                           ds_config=ds_config(cfg, world), load_in_4bit=cfg.load_in_4bit)
    model = apply_lora(model, cfg)
    engine = create_engine(model, cfg, steps_per_epoch(len(train), cfg.train_batch_size) * cfg.max_epochs)
    kw = dict(packed=cfg.packing_samples, device=engine.module.device)
    data = LoopData(len(train), dpo_batch_maker(train, ref_train, pad, **kw), len(evals) if evals else 0,
                    dpo_batch_maker(evals, ref_eval[0], pad, **kw) if evals else None)
    metrics = run_metrics(cfg, rank)
    loop = SupervisedLoop(cfg, engine, tokenizer, data, lambda m, b: dpo_step(m, b, cfg), metrics, "dpo")
    try:
        return loop.fit()
    finally:
        metrics.close()
