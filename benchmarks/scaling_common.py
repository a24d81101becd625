"""Numbers the scaling report's parts share: fitted growth exponents, their errors, the sweeps' axes."""
from __future__ import annotations

import math

BASE_MICRO = 64  # rl.yaml's micro_rollout_batch_size, the fallback for results that do not record it
PACK_CHECK = "n_samples_per_prompt, packing flipped (check)"

def model_state_bytes(P: int, stage: int, world: int) -> float:
    """fp32 weights (4 B) + grads (4 B) + Adam m, v (8 B) per parameter, per rank, as ZeRO partitions them
    (the textbook count; DeepSpeed adds flat buffers, a master copy of the partition and buckets)."""
    w, g, o = 4.0 * P, 4.0 * P, 8.0 * P
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return w + g + o


# ---------------------------------------------------------------------------------------------- report
def exponent(x0: float, x1: float, y0: float, y1: float) -> float | None:
    if min(x0, x1, y0, y1) <= 0 or x0 == x1:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def rel_se(r: dict, f: str) -> float:
    """Relative standard error of a point's mean `f` ("step_s", "generate_s", ...) over its measured steps."""
    vals = [x["time_" + f[:-2]] for x in r["per_step"][1:]] or [x["time_" + f[:-2]] for x in r["per_step"]]
    if len(vals) < 2 or not sum(vals):
        return 0.0
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return sd / m / len(vals) ** 0.5


def exponent_err(key: str, p0: dict, p1: dict, f: str) -> float | None:
    """Standard error of exponent(...) from the step-to-step spread of the two points (not run-to-run drift)."""
    if p0[key] == p1[key] or min(p0[key], p1[key]) <= 0:
        return None
    return math.hypot(rel_se(p0, f), rel_se(p1, f)) / abs(math.log(p1[key] / p0[key]))


SWEEP_X = {"generate_max_len": ("response_length", "mean response tokens"),
           "generate_max_len (SFT policy)": ("response_length", "mean response tokens"),
           "n_samples_per_prompt": ("n_samples", "samples per prompt"),
           "model_size": ("params", "parameters"),
           "micro_rollout_batch_size (check)": ("micro_rollout", "--micro_rollout_batch_size"),
           PACK_CHECK: ("n_samples", "samples per prompt")}


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"
