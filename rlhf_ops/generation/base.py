"""The one generator interface of the RL loop, and its default backend: Hugging Face `generate`.

A backend takes token-id prompts and returns token-id completions; everything about tensors,
padding and stopping stays inside it. The RL loop only ever calls `generate(...)` and, after
each actor update, `sync_weights(...)`, so a vLLM backend (the Ray/vLLM issue) drops in behind
the same two calls.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from rlhf_ops.generation import decode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    max_new_tokens: int = 1024
    top_p: float = 1.0
    seed: int | None = None  # per-call seed: the same seed and weights give the same samples


class Generator(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """One completion per prompt (repeat a prompt to sample it several times)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` use `model`'s current weights."""


class HFGenerator:
    """Sampling from the Hugging Face training model itself (the CPU default).

    A completion ends at (and includes) the first EOS, or at `max_new_tokens`. Each micro-batch
    of `micro_batch_size` prompts runs through `rlhf_ops.generation.decode` (a KV-cached sampler
    ~1.8x faster than `generate` on the tiny model) when it covers the model, else through
    `model.generate` on left-padded prompts. Under ZeRO-3 the full weights are gathered for the
    duration of a call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, micro_batch_size: int = 16,
                 record_logprobs: bool = False, own_copy: bool = False, kv_sampler: bool = True):
        self.tokenizer, self.micro_batch_size = tokenizer, micro_batch_size
        self.kv_sampler = kv_sampler  # False: always transformers' generate (benchmarks/generation.py compares)
        # with record_logprobs, every sampled completion's per-token log p under the sampling
        # distribution (softmax(logits / temperature)), keyed by the full sequence (prompt +
        # completion): the RL loop's old logprobs without a second forward (--use_rollout_logprobs)
        self.record_logprobs = record_logprobs
        self.rollout_logprobs: dict[tuple[int, ...], list[float]] = {}
        # own_copy: sample from a frozen copy of the weights, refreshed by sync_weights, so that sampling can
        # overlap training of the live model (--async_train); otherwise sample from the live model itself
        self.own_copy = own_copy
        self.model = _frozen_copy(model) if own_copy else model

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current weights from now on (copied when this generator owns a copy)."""
        if not self.own_copy:
            self.model = model
            return
        from rlhf_ops.models.forward import unwrap

        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), unwrap(model).parameters(), strict=True):
                dst.copy_(src)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 chunks: range | None = None) -> list[list[int]]:
        """Completions of `prompts`; with `chunks`, only of those micro-batches (by index).

        Each micro-batch's sampling seed is drawn in turn from the call's seed, skipped ones
        included, so a rank that samples chunks 2-3 of a call gets exactly the completions one
        process gets for them (`rlhf_ops.ray_rl`: N actor ranks make one process's rollout).
        """
        from rlhf_ops.models.forward import unwrap

        hf = unwrap(self.model)
        was_training = hf.training
        hf.eval()
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        out: list[list[int]] = []
        try:
            with _gathered(self.model):
                for k, i in enumerate(range(0, len(prompts), self.micro_batch_size)):
                    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                    if chunks is None or k in chunks:
                        out += self._generate_batch(hf, prompts[i:i + self.micro_batch_size], params, seed)
        finally:
            hf.train(was_training)
        return out

    def _generate_batch(self, hf: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        seed: int) -> list[list[int]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        sample = params.temperature > 0
        why_not = decode.unsupported(hf, max(map(len, prompts)) + params.max_new_tokens) if self.kv_sampler else "off"
        if why_not is None:
            record = self.record_logprobs and sample
            completions, logps = decode.sample(hf, prompts, params.max_new_tokens, params.temperature if sample else 0.0,
                                               params.top_p if sample else 1.0, seed, eos, pad, record)
            for p, c, lp in zip(prompts, completions, logps or ()):
                self.rollout_logprobs[tuple(p) + tuple(c)] = lp
            return completions
        if self.kv_sampler:
            _log_fallback(why_not)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.as_tensor(p)
            att[r, width - len(p):] = 1
        device = next(hf.parameters()).device
        # the micro-batch's seed (drawn from the call's generator) makes sampling reproducible, in a
        # forked RNG so that the caller's global random state (dropout, data order) is untouched
        devices = [device] if device.type == "cuda" else []
        record = _StepLogprobs(params.temperature) if (self.record_logprobs and sample) else None
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            seqs = self._sample(hf, ids.to(device), att.to(device), params, sample, record)
        completions = [_until_eos(row[width:].tolist(), eos) for row in seqs.cpu()]
        if record is not None:
            lp = record.finish(seqs).cpu()
            for p, c, row in zip(prompts, completions, lp):
                self.rollout_logprobs[tuple(p) + tuple(c)] = row[:len(c)].tolist()
        return completions

    def _sample(self, hf: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, params: SamplingParams,
                sample: bool, record: Any = None) -> torch.Tensor:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        extra = {"logits_processor": [record]} if record is not None else {}
        return hf.generate(input_ids=ids, attention_mask=att, do_sample=sample,
                           temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                           max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True,
                           **NEUTRAL, **(NEUTRAL_WARPERS if sample else {}), **extra)


# What a checkpoint's generation_config may set that would reshape softmax(logits / T), at the values that
# leave it alone: `generate` fills every argument left None from the checkpoint, and the RL loss scores the plain
# distribution, so rollouts shaped by a repetition penalty (Qwen's 1.05) or top_k (50) would be off-policy.
# The warpers only act when sampling (and transformers warns when they are set for greedy decoding).
NEUTRAL = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
NEUTRAL_WARPERS = dict(top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


@functools.lru_cache(maxsize=None)
def _log_fallback(reason: str) -> None:
    """Say once per reason that sampling goes through `generate` (rlhf_ops.generation.decode does not cover the model)."""
    logger.info("sampling with transformers' generate: the KV-cached sampler does not cover this model (%s)", reason)


@functools.lru_cache(maxsize=None)
def _step_logprobs_class():
    from transformers import LogitsProcessor

    class StepLogprobs(LogitsProcessor):
        """Records log p(sampled token) step by step while `generate` samples, in O(batch x vocab).

        `generate` applies custom processors before its temperature / top-p warpers, so the scores
        seen here are the raw logits; log_softmax(logits / T) is the distribution the RL loss uses.
        The token drawn at step t is only known at step t + 1 (the last one in `finish`).
        """

        def __init__(self, temperature: float):
            self.temperature, self.prev, self.steps = temperature, None, []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.prev is not None:
                self.steps.append(self.prev.gather(1, input_ids[:, -1:]))
            self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
            return scores

        def finish(self, sequences: torch.Tensor) -> torch.Tensor:
            """[B, new tokens] log p of each generated token (rows past EOS hold padding's)."""
            if self.prev is not None:
                self.steps.append(self.prev.gather(1, sequences[:, -1:]))
                self.prev = None
            return torch.cat(self.steps, dim=1) if self.steps else sequences.new_zeros((len(sequences), 0), dtype=torch.float)

    return StepLogprobs


def _StepLogprobs(temperature: float):  # noqa: N802 (a factory: transformers is imported on first use)
    return _step_logprobs_class()(temperature)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A gradient-free copy of the Hugging Face model under `model`'s DeepSpeed wrapper (LoRA layers included)."""
    import copy

    from rlhf_ops.models.forward import unwrap

    hf = unwrap(model)
    if any(hasattr(p, "ds_id") for p in hf.parameters()):
        raise ValueError("cannot copy a ZeRO-3 partitioned model for generation; use --zero_stage 2 or less")
    twin = copy.deepcopy(hf).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


class _gathered:
    """Gather ZeRO-3 partitioned weights for generation (no-op otherwise)."""

    def __init__(self, model: torch.nn.Module):
        params = [p for p in model.parameters() if hasattr(p, "ds_id")]
        self.ctx = None
        if params:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(params)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False
