"""The text half of the scaling report: what each sweep's growth says, and why (mechanisms, knees, ZeRO memory)."""
from __future__ import annotations

import math

from scaling_common import BASE_MICRO, PACK_CHECK, SWEEP_X, exponent, exponent_err, fmt, model_state_bytes  # (benchmarks/ is on sys.path)


def noise(rows: list[dict]) -> float:
    """Largest deviation of a single measured step from its point's mean step time, in percent."""
    return max((100 * max(r["step_s_max"] - r["step_s"], r["step_s"] - r["step_s_min"]) / r["step_s"]
                for r in rows if "step_s_min" in r), default=float("nan"))


def growth(k: float | None) -> str:
    if k is None:
        return "n/a"
    if k < 0.2:
        return "about flat"
    if k < 0.8:
        return "sublinear"
    if k <= 1.2:
        return "about linear"
    if k <= 1.8:
        return "between linear and quadratic"
    return "about quadratic or worse"


def rl_summary(rows: list[dict]) -> list[str]:
    """One verdict per sweep: measured first-to-last exponent of the step time against the expectation."""
    out = []
    expect = {"n_samples_per_prompt": ("samples", (0.8, 1.2), "about linear"),
              "generate_max_len": ("length (untrained policy)", (0.8, 9.9), "linear or worse"),
              "model_size": ("model size", (0.0, 1.0), "sublinear at these widths, at most linear")}
    for sweep, (what, (lo, hi), exp) in expect.items():
        key = SWEEP_X[sweep][0]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        k, e = exponent(a[key], b[key], a["step_s"], b["step_s"]), exponent_err(key, a, b, "step_s")
        ok = lo <= k <= hi
        near = not ok and e is not None and (lo - 2 * e <= k <= hi + 2 * e)
        out.append(f"- {what}: x{b[key] / a[key]:.2f} -> step time x{b['step_s'] / a['step_s']:.2f}, k = {k:.2f} ± {fmt(e)} "
                   f"({growth(k)}); expected {exp}: "
                   + ("**as expected**" if ok else "**within 2 standard errors of the expectation**" if near
                      else "**not as expected**") + ".")
    return out


def knee_reason(sweep: str, name: str, n: float, pre: dict | None) -> str:
    """The mechanism at a knee, when the knee sits where the code changes regime (n = micro_rollout / rollout)."""
    if pre is None or sweep not in ("n_samples_per_prompt", PACK_CHECK):
        return ""
    mr, rb = int(pre["micro_rollout_batch_size"]), int(pre["rollout_batch_size"])
    if rb * n != mr:
        return ""
    packed = bool(pre.get("packing_samples")) != (sweep == PACK_CHECK)
    why = {"generate": f"up to n = {n}, the {rb} x n samples fit one generate call of up to {mr} sequences, which "
                       f"gets wider at little cost per decode step; above it, calls are added (linear)",
           "logprobs": (f"up to n = {n}, one packed row of {rb} x n sequences grows longer, and its dense block "
                        f"mask makes that quadratic; above it, full rows are added (linear)") if packed else
                       f"at n = {n} the padded batches reach {mr} sequences",
           "step": "the sum of the parts' regimes (see generate and logprobs)"}.get(name, "")
    return f" n = {n} is where {rb} x n = micro_rollout_batch_size {mr}: {why}." if why else ""


def rl_findings(rows: list[dict], pre: dict | None = None) -> list[str]:
    """Statements of measured ratios and exponents, classified by fixed thresholds (no claim beyond the numbers)."""
    out = []
    comps = (("step_s", "step"), ("generate_s", "generate"), ("logprobs_s", "logprobs"), ("train_s", "train"))
    names = {"generate_max_len": "Length (untrained policy; x = mean response tokens)",
             "generate_max_len (SFT policy)": "Length (SFT policy; x = mean response tokens)",
             "n_samples_per_prompt": "Samples per prompt (x = n; samples per step = 16 n)",
             "model_size": "Model size (x = parameters)",
             "micro_rollout_batch_size (check)": "--micro_rollout_batch_size (x; n=4, max len 48)",
             PACK_CHECK: "Samples per prompt with --packing_samples flipped relative to the preset"}
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        key = SWEEP_X[sweep][0]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        xr = b[key] / a[key]
        parts = []
        for f, name in comps:
            k = exponent(a[key], b[key], a[f], b[f])
            parts.append(f"{name} x{b[f] / a[f]:.2f} (k={fmt(k)}, {growth(k)})")
        line = f"- **{names[sweep]}**, x{xr:.2f} from first to last point: " + "; ".join(parts) + "."
        if sweep.startswith("generate_max_len"):
            line += " Mean response / --generate_max_len: " + ", ".join(
                f"{r['response_length']:.1f}/{r['gen_len']}" for r in sorted(pts, key=lambda r: r["gen_len"])) + "."
        if sweep == "n_samples_per_prompt":
            line += " Time per sample: " + ", ".join(
                f"{1000 * r['step_s'] / r['samples_per_step']:.0f} ms (n={r['n_samples']})" for r in pts) + "."
        if sweep == PACK_CHECK:
            base = {r["n_samples"]: r for r in rows if r["sweep"] == "n_samples_per_prompt"}
            line += " Packed / padded step time: " + ", ".join(
                f"{(r['step_s'] / base[r['n_samples']]['step_s']) ** (1 if r['packing'] else -1):.2f} (n={r['n_samples']})"
                for r in pts if r["n_samples"] in base) + "; logprobs packed / padded: " + ", ".join(
                f"{(r['logprobs_s'] / base[r['n_samples']]['logprobs_s']) ** (1 if r['packing'] else -1):.2f}"
                f" (n={r['n_samples']})" for r in pts if r["n_samples"] in base) + "."
        if sweep in ("n_samples_per_prompt", PACK_CHECK, "micro_rollout_batch_size (check)"):
            line += " Logprobs per sample: " + ", ".join(
                f"{1000 * r['logprobs_s'] / r['samples_per_step']:.0f} ms (n={r['n_samples']}, "
                f"{min(r.get('micro_rollout', BASE_MICRO), r['samples_per_step'])} sequences per "
                f"{'packed row' if r.get('packing') else 'padded batch'})" for r in pts) + "."
        out.append(line)
        if len(pts) >= 3:  # a knee: the local exponent changes by more than twice its standard error
            x = lambda r: f"{r[key]:,.0f}" if key != "response_length" else f"{r[key]:.0f} tok"  # noqa: E731
            for f, name in comps:
                ks = [exponent(p0[key], p1[key], p0[f], p1[f]) for p0, p1 in zip(pts, pts[1:])]
                es = [exponent_err(key, p0, p1, f) for p0, p1 in zip(pts, pts[1:])]
                for i in range(len(ks) - 1):
                    if None in (ks[i], ks[i + 1], es[i], es[i + 1]):
                        continue
                    d, lim = ks[i + 1] - ks[i], 2 * math.hypot(es[i], es[i + 1])
                    if abs(d) >= 0.3:
                        out.append(f"  - slope of *{name}* at x = {x(pts[i + 1])}: k = {ks[i]:.2f} ± {es[i]:.2f} "
                                   f"below, {ks[i + 1]:.2f} ± {es[i + 1]:.2f} above: "
                                   + ("**a change beyond twice its standard error**." + knee_reason(sweep, name, pts[i + 1][key], pre)
                                      if abs(d) > lim else "within twice its standard error, so not a measured knee."))
    # the same work measured twice: the SFT policy's seeded samples all end before the smaller max length
    sft = sorted((r for r in rows if r["sweep"] == "generate_max_len (SFT policy)"), key=lambda r: r["gen_len"])
    for r0, r1 in zip(sft, sft[1:]):
        if abs(r0["response_length"] - r1["response_length"]) < 1e-9 and r0["response_length"] < r0["gen_len"] - 1:
            out.append(f"- **Run-to-run noise**: the SFT policy at max {r0['gen_len']} and {r1['gen_len']} generated the same "
                       f"{r0['response_length']:.1f}-token mean (same seeds, every sample ended at EOS before "
                       f"{r0['gen_len']}): the same work, measured {r0['step_s']:.2f} s and {r1['step_s']:.2f} s per step "
                       f"({100 * abs(r1['step_s'] / r0['step_s'] - 1):.0f}% apart) under the recorded load. Differences of that "
                       f"size between any two points are not meaningful; the ± above come from the step-to-step spread "
                       f"within a point only, which understates this drift.")
    return out


def mechanisms(pre: dict) -> str:
    """What the code does per step, for the preset's packing mode: the expectations the exponents are read against."""
    mr, mt, tb = pre["micro_rollout_batch_size"], pre["micro_train_batch_size"], pre["train_batch_size"]
    packed = bool(pre.get("packing_samples"))
    ROLLOUT = int(pre["rollout_batch_size"])  # noqa: N806
    full = max(1, mr // ROLLOUT)
    packed_logp = (
        f"packed into rows of up to {mr} sequences ({ROLLOUT} x n sequences per step: n={max(1, full // 2)} -> "
        f"{ROLLOUT * max(1, full // 2)} sequences per row,\n  n={full} -> {mr}, one full row; beyond that more rows). "
        f"`rlhf_sdpa` (rlhf_ops/models/attention.py) attends each\n  sample in its own slot, so no work is spent on "
        f"padding or on a block mask: about linear in samples and in length,\n  plus the gather/scatter into slots.")
    padded_logp = (
        f"in padded micro-batches of {mr} sequences, each padded to its longest sequence: about linear in samples\n"
        f"  and in the padded length, plus attention quadratic in each sequence's own length (at most prompt +\n"
        f"  --generate_max_len, ~100 tokens here). Padding wastes work when lengths in a micro-batch differ (the\n"
        f"  SFT policy's answers), hardly any when every response runs to --generate_max_len (untrained policies).")
    logp_models = ("a no-grad forward of the reference over every sample (the actor's old logprobs are\n  recorded "
                   "while sampling, `use_rollout_logprobs`)" if pre.get("use_rollout_logprobs") else
                   "a no-grad forward of the actor and of the reference over every sample")
    return f"""\
What the code does per step (rlhf_ops/trainers/rl.py, rl/experience.py, generation/base.py,
data/batching.py), the expectations to read the exponents against. The preset runs with
`packing_samples: {str(packed).lower()}`.
- *generate*: the KV-cached sampler (rlhf_ops/generation/decode.py) on micro-batches of
  `micro_rollout_batch_size` = {mr} sequences; each group of identical prompts is prefilled once, and a
  micro-batch runs until its longest sample stops or hits --generate_max_len, finished rows leaving the
  batch as they end. Expected: about linear in length (each decode step also attends over a growing
  cache); in samples, linear in the number of micro-batches ({ROLLOUT} n / {mr}) plus whatever a wider
  batch costs per decode step.
- *logprobs*: {logp_models}, then KL and advantages, which are cheap;
  {packed_logp if packed else padded_logp}
- *train*: forward + backward of micro-batches of {mt} sequences ({"packed, each sample attended in its own slot"
  if packed else "padded"}), one AdamW step per {tb} samples (`train_batch_size`): expected about linear in
  samples, linear or a little worse in length.
- *score*: the rule-based reward, negligible at every point.
- Model size: matmul work grows about linearly in parameters for a fixed token count; attention does
  not (it scales with tokens times each sample's own length, with the head count fixed at 4);
  at these widths (64-256) fixed per-op overhead is also a large part of a forward, so sublinear
  growth is expected.
- The `{PACK_CHECK}` rows repeat the samples sweep with packing {"off" if packed else "on"};
  the logprob forward then runs {padded_logp if packed else packed_logp}
"""


def zero_findings(baseline: dict, zero: list[dict], P0: dict) -> list[str]:
    out = []
    base = baseline["VmHWM_kb"] / 1024
    for h in sorted(P0):
        rs = sorted((r for r in zero if r["hidden"] == h), key=lambda r: r["zero_stage"])
        if not rs:
            continue
        means = [r["peak_rss_mb_mean"] for r in rs]
        ms = [r["model_state_mb_per_rank"] for r in rs]
        rank_gap = max(max(r["peak_rss_mb_per_rank"]) - min(r["peak_rss_mb_per_rank"]) for r in rs)
        line = (f"- h{h} ({P0[h] / 1e6:.2f}M parameters, {16 * P0[h] / 2**20:.1f} MB of fp32 weights + grads + Adam "
                f"state in all): peak RSS per rank " + ", ".join(f"{m:.0f} MB (ZeRO {r['zero_stage']})" for m, r in zip(means, rs))
                + f"; largest minus smallest {max(means) - min(means):.0f} MB; the two ranks of one run differ by up to "
                f"{rank_gap:.0f} MB. Textbook model states per rank: " + ", ".join(f"{m:.1f}" for m in ms)
                + f" MB, at most {100 * max(ms) / min(means):.1f}% of the smallest peak RSS. The imports alone reach "
                f"{base:.0f} MB ({100 * base / min(means):.0f}% of it).")
        if len(rs) > 1 and rs[0]["zero_stage"] == 0:
            hi = [r["peak_rss_mb_mean"] - rs[0]["peak_rss_mb_mean"] for r in rs[1:]]
            line += (f" ZeRO 1-3 peak {min(hi):+.0f} to {max(hi):+.0f} MB above ZeRO 0 (see below).")
        z0 = next((r for r in rs if r["zero_stage"] == 0), None)
        if z0:
            line += " Measured change vs ZeRO 0 (textbook saving): " + ", ".join(
                f"ZeRO {r['zero_stage']} {r['peak_rss_mb_mean'] - z0['peak_rss_mb_mean']:+.0f} MB "
                f"(-{z0['model_state_mb_per_rank'] - r['model_state_mb_per_rank']:.1f} MB)" for r in rs if r is not z0) + "."
        out.append(line)
    hs = sorted(P0)
    if len(hs) >= 2:
        lo, hi = hs[0], hs[-1]
        dP = P0[hi] - P0[lo]
        marg = {}
        for z in sorted({r["zero_stage"] for r in zero}):
            a = next((r for r in zero if r["hidden"] == lo and r["zero_stage"] == z), None)
            b = next((r for r in zero if r["hidden"] == hi and r["zero_stage"] == z), None)
            if a and b:
                marg[z] = (b["peak_rss_mb_mean"] - a["peak_rss_mb_mean"]) * 2**20 / dP
        gap = max(max(r["peak_rss_mb_per_rank"]) - min(r["peak_rss_mb_per_rank"]) for r in zero)
        err = gap * 2**20 / dP
        line = (f"- Marginal peak RSS per added parameter, h{lo} -> h{hi} (+{dP / 1e6:.2f}M parameters): "
                + "; ".join(f"ZeRO {z}: {v:.0f} B (textbook {model_state_bytes(1, z, 2):.0f} B)" for z, v in marg.items())
                + f"; the rank-to-rank spread ({gap:.0f} MB at most) makes these uncertain by about {err:.0f} B. Part "
                "of it is activations, which grow with the width rather than the parameter count.")
        if 0 in marg and len(marg) > 1:
            above = [z for z in marg if z > 0 and marg[z] > marg[0] + err]
            below = [z for z in marg if z > 0 and marg[z] < marg[0] - err]
            if len(above) == len(marg) - 1:
                line += " Every ZeRO stage >= 1 adds more per parameter than ZeRO 0 here, beyond that uncertainty."
            elif len(below) == len(marg) - 1:
                line += " Every ZeRO stage >= 1 adds less per parameter than ZeRO 0 here, beyond that uncertainty."
            else:
                line += " The stages do not differ consistently beyond that uncertainty."
        out.append(line)
    zc = baseline["with_zero_check_imports"]["VmHWM_kb"] / 1024
    max_saved = max(16.0 * r["params"] / 2**20 - r["model_state_mb_per_rank"] for r in zero)
    higher = all(r["peak_rss_mb_mean"] > z0["peak_rss_mb_mean"] for z0 in zero if z0["zero_stage"] == 0
                 for r in zero if r["hidden"] == z0["hidden"] and r["zero_stage"] > 0)
    out.append(("- Why ZeRO 1-3 use *more* than ZeRO 0 here: " if higher else "- Extra code at ZeRO >= 1: ") +
               f"for any stage >= 1, DeepSpeed 0.19's optimizer sanity "
               f"check (`deepspeed/runtime/zero/utils.py: is_zero_supported_optimizer`) imports "
               f"`deepspeed.runtime.zero.muon.muon_optimizer`, whose `@compiler.compile()` decorator runs "
               f"`torch.compile` at import time and so loads torch._dynamo / torch._inductor / functorch / sympy / "
               f"networkx (found by tracing the imports of `deepspeed.initialize`: 961 new modules at ZeRO 1 vs 288 "
               f"at ZeRO 0). In the imports-only process that import alone adds {zc - base:.0f} MB "
               f"({base:.0f} -> {zc:.0f} MB); in the trainer less is new, as part of torch._dynamo is loaded "
               f"before the engine. The largest textbook saving here is {max_saved:.1f} MB. Nothing is compiled: "
               f"it is import-time memory, paid once per process whatever the model size.")
    out.append("- What ZeRO partitions (optimizer state, gradients, weights: 16 bytes per parameter in fp32 with Adam) "
               "is a few MB to tens of MB at these sizes, while each rank's peak RSS is dominated by what no stage "
               "shards: the interpreter and the torch/transformers/DeepSpeed libraries (the imports-only process), "
               "allocator arenas, the data and the activations. DeepSpeed's own buffers also differ by stage (ZeRO 1/2 "
               "flatten the weights into one buffer and keep an fp32 copy of their partition, see "
               "deepspeed/runtime/zero/stage_1_and_2.py; ZeRO 2/3 add communication buckets), so a stage can hold "
               "more than the textbook count. ZeRO's savings matter when 16 B x parameters is comparable to the device "
               "memory (models of billions of parameters on GPUs), which this machine cannot show.")
    return out
