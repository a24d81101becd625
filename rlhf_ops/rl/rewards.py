"""Scoring completions: a reward function from a Python file and/or a reward model.

Reward function file (`--reward_func path.py`, alias `--remote_rm_url` as in OpenRLHF) defines

    def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> list[float] | Tensor | dict

`queries[i]` is prompt + completion as text, `prompts[i]` the prompt text, `labels[i]` the
row's `--label_key` value. It returns one float per query, or a dict
`{"rewards": [...], "extra_logs": {"name": [...per query...]}}` whose extra logs are averaged
into the step metrics (the built-in task logs `accuracy` that way). Wrong length, NaN or an
exception is reported with the file, the batch and the offending value.

With both a reward model and a function, the reward is their sum. Rewards are clipped to
`--reward_clip_range` last.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


class RewardError(RuntimeError):
    """The reward function or model produced something unusable; the message says what and where."""


def load_reward_func(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"reward_func_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise RewardError(f"{path}: cannot import this file as Python")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "reward_func", None)
    if not callable(fn):
        raise RewardError(f"{path}: defines no function reward_func(queries, prompts, labels)")
    return fn


@dataclass(frozen=True)
class ScoringOptions:
    """What scoring reads (`rl.setup.make_scorer`, `reward_model_scores`): the RL stage takes them from
    its config (`of`); evaluation asks for raw scores (no clipping, no normalisation), padded."""
    reward_func: str | None = None
    micro_batch_size: int = 16  # reward-model forwards per chunk of sequences
    packing_samples: bool = False
    normalize_reward: bool = False
    reward_clip_range: tuple[float, float] = (-math.inf, math.inf)

    @classmethod
    def of(cls, cfg: Any) -> "ScoringOptions":
        """From an RLConfig (--reward_func, --micro_rollout_batch_size, --packing_samples, ...)."""
        return cls(cfg.reward_func, cfg.micro_rollout_batch_size, cfg.packing_samples, cfg.normalize_reward,
                   tuple(cfg.reward_clip_range))


@dataclass
class Scores:
    rewards: torch.Tensor  # [B] float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]


def call_reward_func(fn: Callable[..., Any], path: str, queries: list[str], prompts: list[str], labels: list[Any],
                     batch_id: str) -> Scores:
    """Run the user's function and check what it returns."""
    where = f"reward function {path} on {batch_id}"
    try:
        out = fn(queries, prompts, labels)
    except Exception as e:  # the user's code: report it with context, keep the cause
        raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
    extra = {}
    if isinstance(out, dict):
        if "rewards" not in out:
            raise RewardError(f"{where}: returned a dict without 'rewards' (keys: {', '.join(out)})")
        extra = {k: _vector(v, len(queries), f"{where}: extra_logs[{k!r}]") for k, v in out.get("extra_logs", {}).items()}
        out = out["rewards"]
    return Scores(_vector(out, len(queries), where), extra)


def _vector(values: Any, n: int, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"{where}: expected {n} numbers, got {str(values)[:120]!r}") from e
    if t.numel() != n:
        raise RewardError(f"{where}: expected {n} rewards (one per query), got {t.numel()}")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{where}: non-finite reward {t[bad[0]].item()} at query {bad[0]} (of {n})")
    return t


def normalize(rewards: torch.Tensor, mean: float | None, std: float | None) -> torch.Tensor:
    if mean is None or std is None or not math.isfinite(std) or std <= 0:
        raise RewardError("--normalize_reward: the reward model's config has no usable mean/std "
                          f"(mean={mean}, std={std}); train it with rlhf_ops.cli.train_rm or drop the flag")
    return (rewards - mean) / std
