"""Forward passes that compute only what the loss needs.

A causal LM's head is the largest matmul for real vocabularies, and a full-vocabulary
log-softmax over every position (prompt and padding included) is the usual waste. Here the
decoder runs once, the hidden states at target positions are gathered, and only those go
through the LM head and the cross-entropy.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhf_ops.data.batching import Batch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under DeepSpeed / PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # deepspeed
            model = model.module
        else:
            return model


def _is_deepspeed_engine(model: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def decoder_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states [B, T, H] of a *ForCausalLM / *ForSequenceClassification model.

    This calls the decoder directly, bypassing `DeepSpeedEngine.forward`, whose hooks the engine's
    `backward` relies on (without them ZeRO-3 overwrites instead of accumulating gradients across
    micro-batches). So it refuses a DeepSpeed engine while autograd is on: train through `model(...)`.
    """
    if torch.is_grad_enabled() and _is_deepspeed_engine(model):
        raise RuntimeError("decoder_hidden() bypasses DeepSpeedEngine.forward; a training forward must call the "
                           "engine itself (see target_nll), or DeepSpeed's gradient accumulation breaks")
    hf = unwrap(model)
    out = hf.get_decoder()(**batch.model_inputs(), use_cache=False)
    return out.last_hidden_state


def target_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_N, sel_BT): log p(target) at the N target positions (row-major), and where they are.

    The forward goes through `model(...)` (for a DeepSpeed engine: `engine.forward`, which its
    backward needs) with `logits_to_keep` as a boolean mask, so the head runs at targets only, and
    so does the last layer's MLP (`models.rows`).
    """
    from rlhf_ops.models.rows import only_rows

    sel_BT = batch.targets_BT != -100
    with only_rows(sel_BT):
        logits_NV = model(**batch.model_inputs(), use_cache=False, logits_to_keep=sel_BT).logits
    logp_N = -F.cross_entropy(logits_NV.float(), batch.targets_BT[sel_BT], reduction="none")
    return logp_N, sel_BT


def target_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of -log p(target), number of targets) over the batch, LM head at targets only."""
    logp_N, _ = target_logprobs(model, batch)
    return -logp_N.sum(), int(logp_N.numel())


def is_packed(batch: Batch) -> bool:
    """True when the samples share one row (one sample in one row reads the same either way)."""
    return batch.input_ids_BT.shape[0] != len(batch.seq_lens)


def sample_index(batch: Batch) -> torch.Tensor:
    """[B, T] long: which sample each position belongs to (padding: its row's sample)."""
    B, T = batch.input_ids_BT.shape
    device = batch.input_ids_BT.device
    if is_packed(batch):
        lens = torch.as_tensor(batch.seq_lens, device=device)
        return torch.repeat_interleave(torch.arange(len(lens), device=device), lens)[None]
    return torch.arange(B, device=device)[:, None].expand(B, T)


def target_logprob_sums(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums_S, counts_S): per-sample sum of log p(target) and number of targets, padded or packed.

    Sequence log-likelihoods for DPO (divide by counts for IPO's length-averaged logps); the LM
    head runs at targets only, as in `target_nll`.
    """
    logp_N, sel_BT = target_logprobs(model, batch)
    sample_N = sample_index(batch)[sel_BT]
    S = len(batch.seq_lens)
    sums_S = logp_N.new_zeros(S).index_add(0, sample_N, logp_N)
    return sums_S, torch.bincount(sample_N, minlength=S)


def causal_lm_loss(model: torch.nn.Module, batch: Batch, aux_loss_coef: float = 0.0) -> dict[str, Any]:
    """Token-mean next-token loss over the batch's targets, plus MoE aux loss when asked."""
    if aux_loss_coef > 0:
        out = model(**batch.model_inputs(padding_mask=True), output_router_logits=True, use_cache=False)
        logits = out.logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch.targets_BT.flatten(), ignore_index=-100, reduction="sum")
        n = batch.num_targets
        loss = nll / max(n, 1) + aux_loss_coef * getattr(out, "aux_loss", 0.0)
        return {"loss": loss, "nll_sum": nll.detach(), "num_targets": n}
    nll, n = target_nll(model, batch)
    return {"loss": nll / max(n, 1), "nll_sum": nll.detach(), "num_targets": n}
