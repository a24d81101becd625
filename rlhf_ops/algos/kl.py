"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020) and KL-coef controllers.

With tokens sampled from the policy and ``log_ratio = logp - ref_logp`` (policy over reference),
each estimator's expectation under the policy is (or approximates) ``KL(policy || ref)``:

* ``k1 = log_ratio``                            unbiased, high variance, can be negative;
* ``k2 = 0.5 * log_ratio**2``                   biased, low variance, >= 0;
* ``k3 = exp(-log_ratio) - 1 + log_ratio``      unbiased, low variance, >= 0.

Deviation (documented): ``log_ratio`` is clamped to ``[-log_ratio_clip, log_ratio_clip]``
(default 10) *before* the estimator is applied, so k3's ``exp`` cannot overflow (``exp(10)`` ~
2.2e4). Outside the clamp the gradient is 0. OpenRLHF instead clamps the k3 *value* to
[-10, 10]. Pass ``log_ratio_clip=None`` to disable.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = [
    "KLKind",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "FixedKLController",
    "AdaptiveKLController",
]

KLKind = Literal["k1", "k2", "k3"]


def _log_ratio(
    logp: torch.Tensor, ref_logp: torch.Tensor, log_ratio_clip: float | None
) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    log_ratio = logp.to(dtype) - ref_logp.to(dtype)  # bf16 log-probs are upcast first
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(min=-log_ratio_clip, max=log_ratio_clip)
    return log_ratio


def kl_k1(
    logp: torch.Tensor, ref_logp: torch.Tensor, *, log_ratio_clip: float | None = 10.0
) -> torch.Tensor:
    """k1 = log_ratio (elementwise)."""
    return _log_ratio(logp, ref_logp, log_ratio_clip)


def kl_k2(
    logp: torch.Tensor, ref_logp: torch.Tensor, *, log_ratio_clip: float | None = 10.0
) -> torch.Tensor:
    """k2 = 0.5 * log_ratio**2 (elementwise)."""
    return 0.5 * _log_ratio(logp, ref_logp, log_ratio_clip) ** 2


def kl_k3(
    logp: torch.Tensor, ref_logp: torch.Tensor, *, log_ratio_clip: float | None = 10.0
) -> torch.Tensor:
    """k3 = exp(-log_ratio) - 1 + log_ratio = (r - 1) - log r with r = ref/policy (elementwise)."""
    log_ratio = _log_ratio(logp, ref_logp, log_ratio_clip)
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: KLKind = "k1",
    *,
    log_ratio_clip: float | None = 10.0,
) -> torch.Tensor:
    """Elementwise KL estimate of the chosen ``kind`` (the one place that dispatches on it)."""
    match kind:
        case "k1":
            return kl_k1(logp, ref_logp, log_ratio_clip=log_ratio_clip)
        case "k2":
            return kl_k2(logp, ref_logp, log_ratio_clip=log_ratio_clip)
        case "k3":
            return kl_k3(logp, ref_logp, log_ratio_clip=log_ratio_clip)
        case _:
            raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (same interface as the adaptive one)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences") eq. 2.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + K_beta * e)`` with
    ``K_beta = n_steps / horizon`` (the paper's K_beta = 0.1 per step, written as in TRL/OpenRLHF
    where ``n_steps`` is the number of samples since the last update).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=} {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
